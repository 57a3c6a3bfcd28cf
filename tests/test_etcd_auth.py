"""etcd's own users and roles (docs/CLUSTER.md, "Who may write what") on a real
etcd with authentication on, set up by `palm cluster etcd-roles`: an agent's
user writes its own keys and no other agent's nor a policy document; the
token goes with every request and is replaced once when etcd refuses it; a
wrong password and a password file others can read are refused in one line;
agents run under their roles."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
import trio

from palm_net.cli import main
from palm_net.cluster.etcd import EtcdClient, EtcdConfig, EtcdCredentials, Password, read_password_file
from palm_net.cluster.etcdauth import SetUp, agent_permissions, ensure_role, role_permissions, set_up
from palm_net.cluster.etcdwire import CODE_PERMISSION_DENIED, CODE_UNAUTHENTICATED, Compare, EtcdError, Put
from palm_net.cluster.model import Keys, RecordError
from palm_net.cluster.policy import Signer, open_agent_record
from palm_net.testing.cluster import LocalCluster
from palm_net.testing.etcd import MISSING_REASON, EtcdCluster, find_etcd

pytestmark = pytest.mark.skipif(find_etcd() is None, reason=MISSING_REASON)

KEYS = Keys("/palm/")
PASSWORDS = {"root": "root-secret-1", "agent-a": "a-secret-2", "agent-b": "b-secret-3", "alice": "alice-secret-4"}
VM_ID = "ab" * 16


def _password_file(d: Path, user: str, mode: int = 0o600) -> Path:
    p = d / f"{user}.pw"
    p.write_text(PASSWORDS[user] + "\n")
    os.chmod(p, mode)
    return p


class AuthEtcd:
    def __init__(self, cluster: EtcdCluster, pw_dir: Path) -> None:
        self.cluster = cluster
        self.pw_dir = pw_dir
        self.url = cluster.urls[0]

    def creds(self, user: str) -> EtcdCredentials:
        return EtcdCredentials.from_file(user, self.pw_dir / f"{user}.pw")

    def client(self, user: str | None, **kw) -> EtcdClient:
        return EtcdClient(self.cluster.config(credentials=self.creds(user) if user else None, **kw))

    def flags(self, user: str) -> list[str]:
        return ["--etcd", self.url, "--etcd-user", user, "--etcd-password-file", str(self.pw_dir / f"{user}.pw")]


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    """One etcd with authentication on, set up by the command an operator runs."""
    d = tmp_path_factory.mktemp("pw")
    os.chmod(d, 0o700)
    for user in PASSWORDS:
        _password_file(d, user)
    with EtcdCluster(1) as cluster:
        rc = main(["cluster", "etcd-roles", "--etcd", cluster.urls[0], "--agent", f"a={d}/agent-a.pw",
                   "--agent", f"b={d}/agent-b.pw", "--operator", f"alice={d}/alice.pw",
                   "--root-password-file", f"{d}/root.pw", "--enable"])
        assert rc == 0
        yield AuthEtcd(cluster, d)


async def _denied(client: EtcdClient, coro, key: bytes) -> None:
    with pytest.raises(EtcdError) as info:
        await coro
    assert info.value.code == CODE_PERMISSION_DENIED
    assert str(info.value).count("\n") == 0
    assert "permission denied: etcd user 'agent-a'" in str(info.value) and key.decode() in str(info.value)


async def test_an_agent_user_writes_its_own_keys_and_no_other(authed):
    own = [KEYS.agent("a"), KEYS.known_agent("a"), KEYS.drain_status("a"), KEYS.vm(VM_ID), KEYS.slot(0)]
    others = [KEYS.agent("b"), KEYS.known_agent("b"), KEYS.drain_status("b"), KEYS.revocation("b"),
              KEYS.allowlist, KEYS.drain("a"), KEYS.drain("b"), b"/palm-other/x", b"/palm"]
    async with authed.client("root") as root:
        for key in others:
            await root.put(key, b"the operator's")
    async with authed.client("agent-a") as a:
        for key in own:
            assert await a.put(key, b"mine") > 0
            got = await a.txn([Compare.value(key, "==", b"mine")], [Put(key, b"mine again")])
            assert got.succeeded
        async with a.lease(5) as lease:  # revoking a lease needs write on every key under it
            await a.put(KEYS.agent("a"), b"leased", lease=lease.id)
        for key in others:
            await _denied(a, a.put(key, b"squatted"), key)
            await _denied(a, a.delete(key), key)
            await _denied(a, a.txn([], [Put(key, b"squatted")]), key)
        # it reads the whole prefix (and only it), and watches under it
        assert len((await a.range_prefix(KEYS.prefix.encode())).kvs) >= len(own)
        await _denied(a, a.get(b"/palm-other/x"), b"/palm-other/x")
        async with a.watch(KEYS.config) as w:
            assert w.next_revision > 0
        with pytest.raises(EtcdError, match="permission denied: etcd user 'agent-a' may not read it"):
            async with a.watch(b"/palm-other/"):
                pass
    async with authed.client("root") as root:
        for key in others:
            kv = await root.get(key)
            assert kv is not None and kv.value == b"the operator's", key


async def test_the_operator_role_writes_policy_documents_and_no_agent_key(authed):
    async with authed.client("alice") as op:
        for key in (KEYS.revocation("zz"), KEYS.allowlist, KEYS.drain("zz")):
            await op.put(key, b"signed, in real life")
            await op.delete(key)
        for key in (KEYS.agent("zz"), KEYS.vm(VM_ID), KEYS.drain_status("zz")):
            with pytest.raises(EtcdError, match="permission denied: etcd user 'alice'"):
                await op.put(key, b"x")


async def test_the_roles_are_exactly_the_listed_permissions(authed):
    async with authed.client("root") as root:
        await root.auth_call("/v3/auth/role/grant", {"name": "agent-a", "perm": {
            "permType": "READWRITE", "key": "L3BhbG0vYWdlbnRzL2I="}})  # /palm/agents/b, by hand
        changes = await ensure_role(root, "agent-a", agent_permissions(KEYS, "a"))
        assert changes == ["role agent-a: revoked readwrite /palm/agents/b"]
        assert await role_permissions(root, "agent-a") == agent_permissions(KEYS, "a")
        assert await set_up(root, KEYS, SetUp(enable=True)) == []  # already on: nothing to do


async def test_a_refused_token_is_replaced_once(authed, monkeypatch):
    async with authed.client("agent-a") as a, authed.client("root") as root:
        await a.get(KEYS.agent("a"))
        assert a.authentications == 1
        # Setting a password ends the user's tokens in every member (as an expired one): the
        # next call is refused with "invalid auth token", authenticates again and goes through.
        await root.auth_call("/v3/auth/user/changepw", {"name": "agent-a", "password": PASSWORDS["agent-a"]})
        await a.put(KEYS.known_agent("a"), b"after")
        assert a.authentications == 2
        await root.auth_call("/v3/auth/user/changepw", {"name": "agent-a", "password": PASSWORDS["agent-a"]})
        async with a.watch(KEYS.config) as w:  # a watch too
            assert a.authentications == 3
            await root.put(KEYS.revocation("w"), b"seen")
            with trio.fail_after(5):
                batch = await w.__anext__()
            assert batch.events[0].kv.key == KEYS.revocation("w")
        lease = await a.lease_grant(5)
        await root.auth_call("/v3/auth/user/changepw", {"name": "agent-a", "password": PASSWORDS["agent-a"]})
        assert await a.lease_keepalive_once(lease.id) > 0
        await a.lease_revoke(lease.id)
        assert a.authentications == 4

        # bounded: a token etcd never takes fails the call after one new one, not in a loop
        calls = 0

        async def useless() -> str:
            nonlocal calls
            calls += 1
            return "not-a-token"

        monkeypatch.setattr(a, "_authenticate", useless)
        a._token = None
        with pytest.raises(EtcdError, match="invalid auth token") as info:
            await a.get(KEYS.agent("a"))
        assert info.value.code == CODE_UNAUTHENTICATED and calls == 2


async def test_without_a_user_etcd_with_auth_on_is_refused_clearly(authed):
    async with authed.client(None) as anon:
        with pytest.raises(EtcdError, match="etcd has authentication on and this client gives no user"):
            await anon.put(KEYS.agent("a"), b"x")
        with pytest.raises(EtcdError, match="etcd has authentication on and this client gives no user"):
            async with anon.watch(KEYS.config):
                pass


def test_a_wrong_password_is_refused_in_one_line(authed, tmp_path, capsys):
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-" + PASSWORDS["agent-a"])
    os.chmod(wrong, 0o600)
    creds = EtcdCredentials.from_file("agent-a", wrong)

    async def go() -> None:
        async with EtcdClient(authed.cluster.config(credentials=creds)) as c:
            with pytest.raises(EtcdError) as info:
                await c.get(KEYS.agent("a"))
            assert str(info.value) == "etcd user 'agent-a': authentication failed (wrong user name or password)"
            with pytest.raises(EtcdError, match="authentication failed"):
                async with c.watch(KEYS.config):
                    pass
            assert c.authentications == 0
    trio.run(go)
    rc = main(["cluster", "status", "--etcd", authed.url, "--etcd-user", "agent-a", "--etcd-password-file",
               str(wrong)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "authentication failed (wrong user name or password)" in err
    assert PASSWORDS["agent-a"] not in err
    # the right one: the agent's user reads the status
    assert main(["cluster", "status", *authed.flags("agent-a")]) == 0
    assert "agents alive" in capsys.readouterr().out


def test_a_password_file_others_can_read_is_refused(tmp_path, capsys):
    d = tmp_path / "pw"
    d.mkdir(mode=0o700)
    for mode in (0o644, 0o640, 0o604, 0o660):
        p = _password_file(d, "agent-a", mode)
        with pytest.raises(EtcdError, match=f"has mode {mode:04o}: it must be readable by its owner only"):
            read_password_file(p)
        rc = main(["cluster", "status", "--etcd", "http://127.0.0.1:9", "--etcd-user", "agent-a",
                   "--etcd-password-file", str(p)])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "chmod 600" in err
    p = _password_file(d, "agent-a", 0o600)
    assert read_password_file(p).reveal() == PASSWORDS["agent-a"]  # without the newline
    if os.geteuid() == 0:  # another user's file, even 0600: refused
        other = _password_file(d, "agent-b", 0o600)
        os.chown(other, 65534, 65534)
        with pytest.raises(EtcdError, match="belongs to uid 65534, not to this user"):
            read_password_file(other)
    link = d / "link.pw"
    link.symlink_to(p)
    with pytest.raises(EtcdError, match="is a symlink"):
        read_password_file(link)
    # never shown: not in the config's repr, not in the credentials'
    creds = EtcdCredentials.from_file("agent-a", p)
    cfg = EtcdConfig(("http://127.0.0.1:9",), credentials=creds)
    assert PASSWORDS["agent-a"] not in repr(cfg) and PASSWORDS["agent-a"] not in str(creds.password)
    with pytest.raises(EtcdError, match="bad etcd user name"):
        EtcdCredentials("agent a", Password("x"))


async def test_agents_run_under_their_roles(authed, nursery):
    """Registration (with its lease), VM records and the lists all go through with the
    agent's own user; a revocation written by the operator's user is enforced."""
    from palm_net.cluster.admin import revoke

    local = LocalCluster(("a", "b"), in_doubt_wait=3.0)
    local.nursery = nursery
    for name in ("a", "b"):
        m = local.members[name]
        m.config.etcd = authed.cluster.config(credentials=authed.creds(f"agent-{name}"), timeout=2.0,
                                              attempt_timeout=1.0)
        m.config.etcd_prefix = KEYS.prefix
        m.config.cluster_lease_ttl = 2
        m.config.cluster_reconcile_every = 0.5
    signer = Signer(local.authority.signing, local.authority.public)

    def names(snap) -> set[str]:
        out = set()
        for kv in snap.kvs:
            with contextlib.suppress(RecordError):
                out.add(open_agent_record(kv.value, signer.authority_pub, time.time()).name)
        return out

    async with authed.client("root") as root:
        await root.delete_prefix(KEYS.prefix.encode())  # the other tests' values
    try:
        for name in ("a", "b"):
            await local.start(name)
        async with authed.client("alice") as op:
            with trio.fail_after(15):
                while True:
                    if names(await op.range_prefix(KEYS.agents)) == {"a", "b"}:
                        break
                    await trio.sleep(0.05)  # polling etcd, not synchronising with a task
            vm = local["a"].registry.create_model("web", 8 << 20)
            with trio.fail_after(15):
                while await op.get(KEYS.vm(vm.vm_id.hex())) is None:
                    await trio.sleep(0.05)
            await revoke(op, KEYS, signer, "b", "test", "alice", 10.0)
            member = local["a"].cluster.member
            with trio.fail_after(10):
                while "b" not in member.lists.revoked:
                    await trio.sleep(0.05)
            # Someone with more rights deletes it: the agents keep enforcing it, and may not
            # write it back (etcd's roles): each says so once and its lists task goes on.
            async with authed.client("root") as root:
                await root.delete(KEYS.revocation("b"))
            with trio.fail_after(10):
                while not member._not_restorable:
                    await trio.sleep(0.05)
            assert member._not_restorable == {(KEYS.revocation("b"), member.policy.kept[("revocation", "b")].serial)}
            await op.put(KEYS.revocation("b"), member.policy.kept[("revocation", "b")].raw)  # the operator's part
        assert "b" in member.lists.revoked
        assert local["a"].status()["cluster"]["etcd"] == "reachable"
    finally:
        for name in ("a", "b"):
            await local.stop(name)
        local.cleanup()



async def test_credentials_given_before_auth_is_on_work_then_authenticate(tmp_path):
    """The roll-out order: agents get their users first, then etcd turns authentication on."""
    d = tmp_path / "pw"
    d.mkdir(mode=0o700)
    for user in PASSWORDS:
        _password_file(d, user)
    with EtcdCluster(1) as cluster:
        cfg = cluster.config(credentials=EtcdCredentials.from_file("agent-a", d / "agent-a.pw"))
        async with EtcdClient(cluster.config()) as setup, EtcdClient(cfg) as a:
            await a.put(KEYS.agent("a"), b"before")  # auth off: no token, no refusal
            assert a.authentications == 0 and not await a.authenticated()
            await set_up(setup, KEYS, SetUp(agents={"a": read_password_file(d / "agent-a.pw")},
                                            root_password=read_password_file(d / "root.pw"), enable=True))
            await a.put(KEYS.agent("a"), b"after")  # "user name is empty": it authenticates now
            assert a.authentications == 1 and await a.authenticated()
            with pytest.raises(EtcdError, match="permission denied"):
                await a.put(KEYS.agent("b"), b"x")


def test_the_etcd_user_flags_are_checked_before_anything_starts(tmp_path, capsys):
    d = tmp_path / "pw"
    d.mkdir(mode=0o700)
    loose = _password_file(d, "agent-a", 0o644)
    agent = ["agent", "--dir", str(tmp_path / "a"), "--listen", "127.0.0.1:0", "--ca", str(tmp_path / "none.pub")]
    for args, rc, said in (
            ([*agent, "--etcd", "http://127.0.0.1:9", "--etcd-user", "agent-a", "--etcd-password-file", str(loose)],
             1, "has mode 0644: it must be readable by its owner only"),
            ([*agent, "--etcd", "http://127.0.0.1:9", "--etcd-user", "agent-a"], 2, "go together"),
            ([*agent, "--etcd-user", "agent-a", "--etcd-password-file", str(loose)], 2, "need --etcd"),
            (["cluster", "etcd-roles", "--etcd", "http://127.0.0.1:9", "--agent", "bad name=/x"], 2, "invalid name"),
            (["cluster", "etcd-roles", "--etcd", "http://127.0.0.1:9", "--operator", "agent-x=/x"], 2,
             "is not an operator's name"),
            (["cluster", "etcd-roles", "--etcd", "http://127.0.0.1:9"], 2, "nothing to do")):
        assert main(args) == rc, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "a").exists()  # refused before the agent made anything
