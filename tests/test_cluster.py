"""The cluster on a real etcd (palm_net.testing.etcd): membership, the VM records
following the handoff (also when an agent is cut off from etcd at COMMIT, and
after a partition heals), revocation and the cluster allowlist pushed to every
agent (a migration in flight ends before READY; after READY the handoff
decides), a drain, the metrics endpoint, and the `palm cluster` commands."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import trio

from palm_net.agent.errors import AgentError
from palm_net.cluster import EtcdClient
from palm_net.cluster.admin import read_cluster, revoke, status_dict, unrevoke
from palm_net.cluster.etcd import EtcdConfig
from palm_net.cluster.model import AgentRecord, Keys, KnownAgent, RecordError, VmRecord
from palm_net.cluster.policy import PolicyDoc, Signer, next_serial, open_agent_record, open_vm_record
from palm_net.cluster.policy import revocation as revocation_doc
from palm_net.migration.handoff import HandoffState
from palm_net.migration.params import MigrationParams
from palm_net.testing.cluster import LocalCluster
from palm_net.testing.cutproxy import CutProxy
from palm_net.testing.etcd import MISSING_REASON, OPENSSL_MISSING_REASON, EtcdCluster, find_etcd
from palm_net.testing.proxy import READY, FaultProxy, Rule
from palm_net.wire.protocol import Role

pytestmark = pytest.mark.skipif(find_etcd() is None, reason=MISSING_REASON)

KEYS = Keys("/palm/")
MiB = 1 << 20


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster(1) as cluster:
        yield cluster


@pytest.fixture
def prefix(request) -> str:
    return f"/t{abs(hash(request.node.name)) % 10**8}/"


async def eventually(check, seconds: float = 10.0, what: str = "the condition"):
    """Polls ``check`` (sync or async) until it returns something truthy."""
    deadline = trio.current_time() + seconds
    while True:
        got = check()
        if hasattr(got, "__await__"):
            got = await got
        if got:
            return got
        if trio.current_time() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        await trio.sleep(0.05)


class Cluster:
    """In-process agents, each reaching etcd through its own CutProxy."""

    def __init__(self, nursery, etcd: EtcdCluster, prefix: str, names=("a", "b"), etcd_for=None, **kw) -> None:
        self.nursery = nursery
        self.etcd = etcd
        self.keys = Keys(prefix)
        self.local = LocalCluster(tuple(names), in_doubt_wait=3.0)
        self.signer = Signer(self.local.authority.signing, self.local.authority.public)
        self.local.nursery = nursery
        self.proxies: dict[str, CutProxy] = {}
        self.etcd_for = set(names if etcd_for is None else etcd_for)
        self.kw = kw

    async def start(self) -> Cluster:
        target = ("127.0.0.1", self.etcd.members[0].client_port)
        for name, m in self.local.members.items():
            if name in self.etcd_for:
                proxy = CutProxy(target)
                await self.nursery.start(proxy.serve)
                self.proxies[name] = proxy
                m.config.etcd = EtcdConfig((proxy.url,), timeout=2.0, attempt_timeout=1.0)
                m.config.etcd_prefix = self.keys.prefix
                m.config.cluster_lease_ttl = 2
                m.config.cluster_reconcile_every = self.kw.get("reconcile_every", 0.5)
                m.config.capacity = self.kw.get("capacity")
            await self.local.start(name)
        return self

    def __getitem__(self, name: str):
        return self.local[name]

    async def client(self) -> EtcdClient:
        return EtcdClient(self.etcd.config())

    async def vm_record(self, vm_id: bytes) -> VmRecord | None:
        async with EtcdClient(self.etcd.config()) as c:
            kv = await c.get(self.keys.vm(vm_id.hex()))
        try:
            return open_vm_record(kv.value, self.signer.authority_pub, time.time()) if kv else None
        except RecordError:
            return None  # not its writer's (the test's own forgeries)

    async def agents(self) -> dict[str, AgentRecord]:
        async with EtcdClient(self.etcd.config()) as c:
            snap = await c.range_prefix(self.keys.agents)
        now = time.time()
        return {r.name: r for r in (open_agent_record(kv.value, self.signer.authority_pub, now) for kv in snap.kvs)}

    async def close(self) -> None:
        for name in list(self.local.members):
            await self.local.stop(name)
        self.local.cleanup()


@pytest.fixture
async def make(nursery, etcd, prefix):
    made = []

    async def make(**kw) -> Cluster:
        c = await Cluster(nursery, etcd, prefix, **kw).start()
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


async def test_agents_register_with_their_facts_and_leave_at_once(make):
    c = await make(capacity=1 << 30)
    recs = await eventually(lambda: _both(c), what="both agents registered")
    a = recs["a"]
    assert a.addr == c.local.addr("a") and a.measurement == c["a"].measurement.hex()
    assert a.static_pub == c["a"].identity.static.public.hex() and set(a.roles) == {"source", "destination"}
    assert a.capacity == 1 << 30 and a.free == 1 << 30 and a.vms == 0 and a.accepting
    c["a"].registry.create_model("web", 8 * MiB)
    rec = await eventually(lambda: _record_with(c, "a", lambda r: r.vms == 1), what="a's record shows its VM")
    assert rec.free == (1 << 30) - 8 * MiB
    assert c["a"].status()["cluster"]["etcd"] == "reachable"
    await c.local.stop("b")  # a clean stop revokes the lease: gone at once, not after its TTL
    assert "b" not in await c.agents()


async def _both(c: Cluster):
    recs = await c.agents()
    return recs if {"a", "b"} <= set(recs) else None


async def _record_with(c: Cluster, name: str, pred):
    rec = (await c.agents()).get(name)
    return rec if rec is not None and pred(rec) else None


async def test_vm_records_follow_create_migrate_destroy(make):
    c = await make()
    vm = c["a"].registry.create_model("web", 8 * MiB, protected=1)
    vid = vm.info.vm_id
    rec = await eventually(lambda: c.vm_record(vid), what="the VM's record")
    assert (rec.agent, rec.name, rec.migration, rec.memory, rec.state) == ("a", "web", "", 8 * MiB, "running")
    result = await c["a"].outgoing.migrate("web", c.local.addr("b"), MigrationParams())
    assert result.ok
    rec = await eventually(lambda: _rec_on(c, vid, "b"), what="the record following the migration")
    assert rec.migration == result.mid.hex()  # keyed by the migration that put it there
    await trio.to_thread.run_sync(c["b"].registry.destroy, "web")
    await eventually(lambda: _gone(c, vid), what="the record removed with the VM")


async def _rec_on(c: Cluster, vid: bytes, agent: str):
    rec = await c.vm_record(vid)
    return rec if rec is not None and rec.agent == agent else None


async def _gone(c: Cluster, vid: bytes):
    return await c.vm_record(vid) is None


async def test_record_converges_when_agents_are_cut_off_at_commit_and_after_the_partition_heals(make):
    c = await make()
    vm = c["a"].registry.create_model("web", 8 * MiB)
    vid = vm.info.vm_id
    await eventually(lambda: _rec_on(c, vid, "a"))
    # The destination is cut off from etcd at COMMIT: the source writes the record.
    c.proxies["b"].cut()
    r1 = await c["a"].outgoing.migrate("web", c.local.addr("b"), MigrationParams())
    assert r1.ok and c.local.running_copies("web") == ["b"]
    rec = await eventually(lambda: _rec_on(c, vid, "b"), what="the source writing the destination's record")
    assert rec.migration == r1.mid.hex()
    await eventually(lambda: c["b"].status()["cluster"]["etcd"] == "unreachable", what="b noticing")
    # Both cut off: the VM goes back and nobody can tell etcd; the record is stale.
    c.proxies["a"].cut()
    r2 = await c["b"].outgoing.migrate("web", c.local.addr("a"), MigrationParams())
    assert r2.ok and c.local.running_copies("web") == ["a"]
    await trio.sleep(1.0)
    assert (await c.vm_record(vid)).agent == "b"  # stale, and it moved nothing: the VM runs on a only
    assert c.local.running_copies("web") == ["a"] and "web" not in c["b"].vms
    # The partition heals (the old destination first): the record converges to the handoff's truth.
    c.proxies["b"].heal()
    rec = await eventually(lambda: _rec_on(c, vid, "a"), what="convergence after the partition healed")
    assert rec.migration == r2.mid.hex()
    c.proxies["a"].heal()
    await trio.sleep(1.0)
    assert (await c.vm_record(vid)).agent == "a" and c.local.running_copies("web") == ["a"]


async def test_a_bogus_record_starts_nothing_stops_nothing_and_is_corrected(make):
    c = await make()
    vm = c["a"].registry.create_model("web", 8 * MiB)
    vid = vm.info.vm_id
    await eventually(lambda: _rec_on(c, vid, "a"))
    ghost = VmRecord("ab" * 16, "ghost", "b", memory=8 * MiB)
    async with EtcdClient(c.etcd.config()) as e:
        await e.put(c.keys.vm(vid.hex()), VmRecord(vid.hex(), "web", "b", memory=8 * MiB).encode())
        await e.put(c.keys.vm(ghost.vm_id), ghost.encode())
    await eventually(lambda: _rec_on(c, vid, "a"), what="the host correcting the record")
    assert c.local.running_copies("web") == ["a"] and "web" not in c["b"].vms
    assert "ghost" not in c["b"].vms and "ghost" not in c["a"].vms  # no VM started for a record
    async with EtcdClient(c.etcd.config()) as e:  # nobody hosts it: nobody writes it
        assert (await e.get(c.keys.vm(ghost.vm_id))).value == ghost.encode()
    # b, certified, writes a record of a's VM in a's name (not its own to write): a writes over it
    from palm_net.cluster.policy import seal_record

    b = c["b"]
    forged = VmRecord(vid.hex(), "renamed", "a", memory=8 * MiB)
    async with EtcdClient(c.etcd.config()) as e:
        await e.put(c.keys.vm(vid.hex()), seal_record(forged.encode(), b.identity.signing, b.certificate, "vm"))
    rec = await eventually(lambda: _rec_on(c, vid, "a"), what="a correcting b's record")
    assert rec.name == "web" and c["a"].cluster.member.policy.refused.get("record-not-its-own", 0) >= 1


async def test_revocation_refuses_handshakes_everywhere_and_is_kept_across_restarts(make, nursery):
    # c is outside the cluster (no etcd): it cannot know it is revoked; b refuses it.
    c = await make(names=("a", "b", "c"), etcd_for=("a", "b"))
    await eventually(lambda: _both(c))
    for name in ("a", "c"):
        c[name].registry.create_model(f"vm-{name}", 8 * MiB)
    async with EtcdClient(c.etcd.config()) as e:
        acks = (await revoke(e, c.keys, c.signer, "c", "compromised", "test", 10.0, force=True)).acks
        assert set(acks.seconds) == {"a", "b"} and not acks.missing
    assert c["b"].cluster.gate.lists.revoked == {"c"}
    r = await c["c"].outgoing.migrate("vm-c", c.local.addr("b"), MigrationParams())
    assert not r.ok and c.local.running_copies("vm-c") == ["c"]
    assert c["b"].status()["counters"].get("refused-revoked") == 1
    # a refuses c as a destination right after the handshake, before anything is sent
    r = await c["a"].outgoing.migrate("vm-a", c.local.addr("c"), MigrationParams())
    assert not r.ok and "revoked" in r.error and r.phase == "handshake"
    assert c.local.running_copies("vm-a") == ["a"] and not c["c"].store.list(role=Role.DESTINATION)
    # b restarts while etcd is unreachable: it still enforces what it last knew
    c.proxies["b"].cut()
    await c.local.stop("b")
    await c.local.start("b")
    assert c["b"].cluster.gate.lists.revoked == {"c"}
    st = await eventually(lambda: c["b"].status()["cluster"].get("note"), what="b saying it is cut off")
    assert "enforcing the last known lists" in st
    r = await c["c"].outgoing.migrate("vm-c", c.local.addr("b"), MigrationParams())
    assert not r.ok
    c.proxies["b"].heal()
    await eventually(lambda: c["b"].cluster.member.lease is not None, what="b registered again")
    async with EtcdClient(c.etcd.config()) as e:
        changed = await unrevoke(e, c.keys, c.signer, "c", "test", 10.0)
        assert changed is not None and set(changed.acks.seconds) == {"a", "b"}
    r = await c["c"].outgoing.migrate("vm-c", c.local.addr("b"), MigrationParams())
    assert r.ok, r.error


async def test_a_revoked_host_with_etcd_credentials_stays_revoked_and_drains_nobody(make):
    """Issue 22's reproductions on a real etcd: c, revoked, holds an etcd credential as every
    agent does; it deletes its revocation, then writes an unsigned one lifting it and an
    unsigned drain of a, its victim.  c stays refused, the revocation is written back, a does
    not drain."""
    import json as _json

    from palm_net.cluster.model import DrainOptions, DrainRequest

    c = await make(names=("a", "b", "c"))
    await eventually(lambda: _all_registered(c, 3))
    c["a"].registry.create_model("victim-vm", 8 * MiB, protected=1)
    c["c"].registry.create_model("vm-c", 8 * MiB)
    async with EtcdClient(c.etcd.config()) as e:
        changed = await revoke(e, c.keys, c.signer, "c", "compromised", "test", 10.0)  # known: no --force
        assert changed.doc.keys == (c["c"].identity.static.public,)
        revocation = changed.doc.raw
        await e.delete(c.keys.revocation("c"))  # with c's own etcd credential
        await eventually(lambda: e.get(c.keys.revocation("c")), what="the agents writing the revocation back")
        assert (await e.get(c.keys.revocation("c"))).value == revocation
        await e.put(c.keys.revocation("c"), _json.dumps({"v": 1, "name": "c", "at": 1}).encode())
        # c's own keys: as if the authority (no certificate), or with its agent certificate
        own = c["c"].identity.signing
        lift = revocation_doc(c.keys.prefix, "c", next_serial(changed.doc.serial), (), "", "c", revoked=False)
        await e.put(c.keys.revocation("c"), Signer(own, c.signer.authority_pub).sign(lift).raw)
        req = DrainRequest("01" * 8, 1.0, "c", DrainOptions())
        await e.put(c.keys.drain("a"), _json.dumps({"v": 1, **req.to_dict()}).encode())
        as_agent = Signer(own, c.signer.authority_pub, c["c"].certificate)
        await e.put(c.keys.drain("a"), as_agent.sign(PolicyDoc("drain", c.keys.prefix, "a", next_serial(0), 1,
                                                                request=req)).raw)
        await eventually(lambda: sum(c["a"].cluster.member.policy.refused.values()) >= 4, what="a refusing all")
    assert set(c["a"].cluster.member.policy.refused) == {"malformed", "bad-signature", "wrong-role"}
    for name in ("a", "b"):
        assert c[name].cluster.gate.lists.is_revoked("c", c["c"].identity.static.public)
    with pytest.raises(AgentError, match=r"^revoked: this agent \(c\) is revoked in the cluster"):
        await c["c"].outgoing.migrate("vm-c", c.local.addr("b"), MigrationParams())
    assert c.local.running_copies("vm-c") == ["c"]
    assert c["a"].cluster.member.drain_request is None and c.local.running_copies("victim-vm") == ["a"]


async def test_forged_agent_records_are_ignored_and_counted(make):
    """Each agent writes only what is its own: a record squatting b's name (c's key and
    certificate, or no signature) neither keeps b out nor draws a drain's VMs."""
    from palm_net.cluster.admin import follow_drain, request_drain
    from palm_net.cluster.model import DrainOptions
    from palm_net.cluster.policy import seal_record

    c = await make(names=("a", "b", "c"), capacity=64 * MiB)
    await eventually(lambda: _all_registered(c, 3))
    await c.local.stop("b")
    await c.local.stop("c")
    fake = dataclasses.replace(c["a"].cluster.advertise(), name="b", addr=c.local.addr("c"), free=1 << 40,
                               capacity=1 << 40, static_pub="ee" * 32)
    async with EtcdClient(c.etcd.config()) as e:
        await e.put(c.keys.agent("b"), fake.encode())  # not signed, no lease: b was kept out before
    await c.local.start("b")
    await eventually(lambda: c["b"].cluster.member.lease is not None, what="b registering over the squatter")
    assert c["b"].cluster.member.policy.refused == {"record-malformed": 1}
    await c.local.start("c")
    await eventually(lambda: _all_registered(c, 3))
    # c, certified, claims b's name with its own key: the drain of a skips it
    c_ident, c_cert = c["c"].identity, c["c"].certificate
    async with EtcdClient(c.etcd.config()) as e:
        await e.put(c.keys.agent("b"), seal_record(fake.encode(), c_ident.signing, c_cert))
        c["a"].registry.create_model("vm0", 8 * MiB)
        req, _, _ = await request_drain(e, c.keys, c.signer, "a", DrainOptions(), "test")
        st = await follow_drain(e, c.keys, "a", req.id, lambda s: None)
    assert st.state == "done" and st.vms["vm0"].to == "c"  # not to the "b" at c's address, 1 TiB free
    assert c["a"].cluster.member.policy.refused.get("record-squatted", 0) >= 1


async def test_migrate_to_an_agent_by_name_or_auto(make):
    """`palm migrate VM --to NAME` takes an agent's name (its address from its signed record),
    `--to auto` places the VM as a drain would; a name that no verified record has (a typo, an
    unsigned record) is one line naming the agents there are, exit 2."""
    c = await make(names=("a", "b", "c"), capacity=64 * MiB)
    await eventually(lambda: _all_registered(c, 3))
    sock = {n: str(m.config.control) for n, m in c.local.members.items()}
    c["a"].registry.create_model("web", 8 * MiB)
    c["c"].registry.create_model("filler", 32 * MiB)
    await eventually(lambda: _record_with(c, "c", lambda r: r.free <= 32 * MiB), what="c's record with filler")
    fake = dataclasses.replace(c["a"].cluster.advertise(), name="evil", addr=c.local.addr("a"), free=1 << 40,
                               capacity=1 << 40, static_pub="ee" * 32)
    async with EtcdClient(c.etcd.config()) as e:
        await e.put(c.keys.agent("evil"), fake.encode())  # not signed: no destination, by name or by placement

    async def palm(*args: str) -> tuple[int, str, str]:
        p = await trio.run_process([sys.executable, "-m", "palm_net.cli", *args], capture_stdout=True,
                                   capture_stderr=True, check=False)
        return p.returncode, p.stdout.decode(), p.stderr.decode()

    code, out, err = await palm("migrate", "web", "--control", sock["a"], "--to", "auto")
    assert code == 0 and "migrated web to b in" in out, err  # b has the most room
    assert c.local.running_copies("web") == ["b"]
    code, out, err = await palm("migrate", "web", "--control", sock["b"], "--to", "c")
    assert code == 0 and "migrated web to c in" in out, err
    assert c.local.running_copies("web") == ["c"]
    for bad in ("evil", "host-zz"):
        code, out, err = await palm("migrate", "web", "--control", sock["c"], "--to", bad)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"--to {bad}: no agent of that name in the cluster (other agents: a, b;" in err, err
    code, out, err = await palm("migrate", "web", "--control", sock["c"], "--to", "c")
    assert code == 1 and "a VM cannot migrate to the agent it runs on" in err, err
    assert c.local.running_copies("web") == ["c"]



async def test_cluster_status_explains_its_lists_column_and_acks_say_in_force_once(make):
    c = await make()
    await eventually(lambda: _both(c))
    p = await trio.run_process([sys.executable, "-m", "palm_net.cli", "cluster", "status", "--etcd",
                                c.etcd.urls[0], "--etcd-prefix", c.keys.prefix], capture_stdout=True)
    out = p.stdout.decode()
    assert "LISTS" in out.splitlines()[2] and "\nLISTS: the etcd revision of the revocations and allowlist" in out
    p = await trio.run_process([sys.executable, "-m", "palm_net.cli", "cluster", "status", "--help"],
                               capture_stdout=True)
    assert "LISTS: the etcd revision" in p.stdout.decode()
    for cmd in ("revoke", "unrevoke"):  # what the acknowledgements say, said once
        p = await trio.run_process([sys.executable, "-m", "palm_net.cli", "cluster", cmd, "b", "--etcd",
                                    c.etcd.urls[0], "--etcd-prefix", c.keys.prefix, "--signer",
                                    str(c.local.root / "ca")], capture_stdout=True)
        out = p.stdout.decode()
        assert "\nin force on 2 of 2 live agents after " in out and "in force: in force" not in out, out


@pytest.mark.parametrize("when", ["before READY", "after READY"])
async def test_a_peer_revoked_in_flight(make, nursery, when):
    """Before READY the destination aborts and never sends READY; after READY the handoff decides."""
    c = await make(names=("a", "b", "c"), etcd_for=("a", "b"))  # c, the source, does not learn it
    await eventually(lambda: _both(c))
    c["c"].registry.create_model("web", 16 * MiB)
    rule = Rule("c2s", 6, "delay", seconds=1.5) if when == "before READY" else \
        Rule("s2c", 0, "delay", match=READY, seconds=1.5)
    proxy = FaultProxy(("127.0.0.1", c.local.members["b"].port), [rule])
    await nursery.start(proxy.serve)
    out = {}

    async def migrate():
        out["r"] = await c["c"].outgoing.migrate("web", f"127.0.0.1:{proxy.port}", MigrationParams())

    nursery.start_soon(migrate)
    await eventually(lambda: rule.fired, what="the proxy holding the frame")
    run = next(iter(c["b"].incoming.runs.values()))
    assert run.engine.outcome == (None if when == "before READY" else "prepared")
    async with EtcdClient(c.etcd.config()) as e:
        await revoke(e, c.keys, c.signer, "c", "", "test", 10.0, force=True)
    r = await eventually(lambda: out.get("r"), what="the migration's end")
    row = c["b"].store.get(r.mid)
    if when == "before READY":
        assert not r.ok and c.local.running_copies("web") == ["c"]
        assert row.state is HandoffState.ABORTED
        assert c["b"].status()["counters"].get("ended-revoked") == 1
    else:
        assert r.ok and c.local.running_copies("web") == ["b"] and row.state is HandoffState.COMMITTED


async def test_the_cluster_allowlist_replaces_the_local_one(make):
    c = await make()
    await eventually(lambda: _both(c))
    c["a"].registry.create_model("web", 8 * MiB)
    from palm_net.cluster.admin import change_allowlist

    other = "11" * 32
    async with EtcdClient(c.etcd.config()) as e:
        al, changed = await change_allowlist(e, c.keys, c.signer, "set", [other], "test", 10.0)
        assert set(changed.acks.seconds) == {"a", "b"}
    r = await c["a"].outgoing.migrate("web", c.local.addr("b"), MigrationParams())
    assert not r.ok and "measurement-not-allowed" in r.error and c.local.running_copies("web") == ["a"]
    async with EtcdClient(c.etcd.config()) as e:
        await change_allowlist(e, c.keys, c.signer, "add", [c["a"].measurement.hex()], "test", 10.0)
    r = await c["a"].outgoing.migrate("web", c.local.addr("b"), MigrationParams())
    assert r.ok, r.error
    async with EtcdClient(c.etcd.config()) as e:
        al, changed = await change_allowlist(e, c.keys, c.signer, "clear", [], "test", 10.0)
        assert al is None and changed is not None
    assert c["a"].cluster.gate.lists.allowlist is None


async def test_drain_evacuates_a_host_within_the_limits(make, prefix):
    from palm_net.cluster.admin import follow_drain, request_drain
    from palm_net.cluster.model import DrainOptions

    c = await make(names=("a", "b", "c"), capacity=64 * MiB)
    await eventually(lambda: _all_registered(c, 3))
    for i in range(4):
        c["a"].registry.create_model(f"vm{i}", 8 * MiB, protected=1)
    c["a"].registry.create_model("pinned", 8 * MiB, policy="agents:c")
    c["a"].registry.create_model("stays", 8 * MiB, policy="none")
    async with EtcdClient(c.etcd.config()) as e:
        req, joined, _ = await request_drain(e, c.keys, c.signer, "a", DrainOptions(max_cluster=5, max_source=2),
                                             "test")
        assert not joined
        seen = []
        st = await follow_drain(e, c.keys, "a", req.id, seen.append)
    counts = st.counts()
    assert (counts["moved"], counts["unplaceable"]) == (5, 1) and st.state == "incomplete"
    assert st.vms["pinned"].to == "c" and "policy forbids" in st.vms["stays"].error
    assert st.max_parallel == 2
    assert {v.to for n, v in st.vms.items() if v.state == "moved"} == {"b", "c"}
    for n in (*(f"vm{i}" for i in range(4)), "pinned"):
        assert len(c.local.running_copies(n)) == 1 and c.local.running_copies(n) != ["a"]
    assert c.local.running_copies("stays") == ["a"]
    # while marked draining nothing is placed on a: a drain of b goes to c only
    async with EtcdClient(c.etcd.config()) as e:
        req, _, _ = await request_drain(e, c.keys, c.signer, "b", DrainOptions(), "test")
        st = await follow_drain(e, c.keys, "b", req.id, lambda s: None)
        assert st.state == "done" and {v.to for v in st.vms.values()} == {"c"}
        view = status_dict(await read_cluster(e, c.keys))
    assert {d["host"] for d in view["drains"]} == {"a", "b"}
    on = {v["name"]: v["agent"] for v in view["vms"]}
    await eventually(lambda: _records_are(c, {n: "c" for n in on if n != "stays"} | {"stays": "a"}),
                     what="the records following the drains")


async def test_a_drain_goes_on_after_its_agent_restarts(make):
    from palm_net.cluster.admin import drain_status, follow_drain, request_drain
    from palm_net.cluster.model import DrainOptions

    c = await make(names=("a", "b"))
    await eventually(lambda: _both(c))
    for i in range(4):
        c["a"].registry.create_model(f"vm{i}", 16 * MiB)
    opts = DrainOptions(max_source=1, bandwidth=32 * MiB)  # one at a time, half a second each
    async with EtcdClient(c.etcd.config()) as e:
        req, _, _ = await request_drain(e, c.keys, c.signer, "a", opts, "test")
        first = await eventually(lambda: _moved(e, c.keys, 1), what="the first VM moved")
        await c.local.stop("a")  # the agent stops in the middle of the drain (the command is not even running)
        mid = await drain_status(e, c.keys, "a")
        assert mid is not None and mid.id == req.id and mid.counts()["moved"] < 4
        await c.local.start("a")
        st = await follow_drain(e, c.keys, "a", req.id, lambda s: None)
    assert st.state == "done" and st.counts()["moved"] == 4 and st.started == first.started
    assert sorted(c["b"].vms) == [f"vm{i}" for i in range(4)] and not c["a"].vms


async def _moved(e: EtcdClient, keys: Keys, n: int):
    from palm_net.cluster.admin import drain_status

    st = await drain_status(e, keys, "a")
    return st if st is not None and st.counts()["moved"] >= n else None


async def _all_registered(c: Cluster, n: int):
    return len(await c.agents()) == n


async def _records_are(c: Cluster, want: dict[str, str]):
    async with EtcdClient(c.etcd.config()) as e:
        view = await read_cluster(e, c.keys)
    return {v.name: v.agent for v in view.vms.values()} == want


async def test_metrics_endpoint(make):
    c = await make(names=("a", "b"))
    for m in c.local.members.values():
        m.config.metrics = "127.0.0.1:0"
    await c.local.stop("a")
    await c.local.start("a")
    await c.local.stop("b")
    await c.local.start("b")
    c["a"].registry.create_model("web", 8 * MiB)
    r = await c["a"].outgoing.migrate("web", c.local.addr("b"), MigrationParams())
    assert r.ok
    port = c["a"].cluster.metrics_port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    text = body.decode()
    assert 'palm_migrations_total{outcome="completed",role="source"} 1.0' in text
    assert "palm_migration_downtime_seconds_count 1.0" in text
    assert "palm_migrations_in_doubt 0.0" in text and "palm_etcd_reachable 1.0" in text
    assert "palm_migration_bytes_total" in text
    assert "# TYPE palm_cluster_refused_total counter" in text
    bport = c["b"].cluster.metrics_port
    stream = await trio.open_tcp_stream("127.0.0.1", bport)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    assert b'palm_migrations_total{outcome="committed",role="destination"} 1.0' in data


@pytest.mark.skipif(shutil.which("openssl") is None, reason=OPENSSL_MISSING_REASON)
async def test_an_agent_joins_over_tls_with_a_client_certificate(nursery, tmp_path):
    with EtcdCluster(1, tls=True) as tls_etcd:
        local = LocalCluster(("a",))
        local.nursery = nursery
        m = local.members["a"]
        m.config.etcd = tls_etcd.config()
        try:
            await local.start("a")
            async with EtcdClient(tls_etcd.config()) as e:
                await eventually(lambda: e.get(KEYS.agent("a")), what="registration over TLS")
            await local.stop("a")
            m.config.etcd = dataclasses.replace(tls_etcd.config(), cert_file=tmp_path / "none.crt")
            with pytest.raises(AgentError, match="etcd TLS files"):
                await local.start("a")
        finally:
            await local.stop("a")
            local.cleanup()


def test_cli_status_revoke_and_drain(etcd, prefix, capsys, tmp_path: Path):
    """The commands against etcd, with no agent: what they say and exit with."""
    from palm_net.agent.launcher import provision_operator
    from palm_net.cli import main
    from palm_net.cluster.policy import seal_record
    from palm_net.crypto.identity import AgentIdentity, Authority

    url = etcd.urls[0]
    ca = Authority.generate()
    ca.save(tmp_path / "ca")
    op = str(provision_operator(tmp_path, ca, "alice"))
    at = ["--etcd", url, "--etcd-prefix", prefix]
    assert main(["cluster", "status", *at]) == 0
    assert "0 agents alive" in capsys.readouterr().out
    assert main(["cluster", "revoke", "ghost", *at, "--wait", "1"]) == 2  # nothing unsigned
    assert "--signer DIR is required" in capsys.readouterr().err
    # a name no agent ever registered (a typo): refused, and the known names are said
    ident = AgentIdentity.generate("host-c")
    cert = ca.issue("host-c", ident.static.public, ident.sign_pub, bytes(32))

    async def register():
        async with EtcdClient(etcd.config()) as e:
            known = KnownAgent("host-c", ident.static.public.hex(), 1.7e9).encode()
            await e.put(Keys(prefix).known_agent("host-c"), seal_record(known, ident.signing, cert))
            await e.put(Keys(prefix).known_agent("squat"), KnownAgent("squat", "cd" * 32, 1.7e9).encode())
    trio.run(register)
    assert main(["cluster", "revoke", "host-zz", *at, "--wait", "1", "--signer", op]) == 1
    err = capsys.readouterr().err
    assert "no agent named 'host-zz' ever registered" in err and "known: host-c)" in err and "--force" in err
    assert main(["cluster", "status", "--json", *at]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == []  # nothing was written
    assert main(["cluster", "revoke", "ghost", *at, "--wait", "1", "--signer", op, "--force"]) == 0
    out = capsys.readouterr().out
    assert "agent ghost revoked by name only" in out and "signed by the operator alice" in out
    assert f"written to {prefix}config/revoked/ghost" in out and "no agent is alive" in out
    assert main(["cluster", "revoke", "host-c", *at, "--wait", "1", "--signer", str(tmp_path / "ca")]) == 0
    assert f"with its static key {ident.static.public.hex()[:16]}..." in capsys.readouterr().out
    assert main(["cluster", "status", "--json", *at, "--ca", str(tmp_path / "ca" / "ca.pub")]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["revoked"] == ["ghost", "host-c"]
    assert len(st["problems"]) == 1 and "known/squat" in st["problems"][0]  # not signed by an agent
    assert {"name": "ghost", "health": "revoked", "alive": False} in st["agents"]
    assert main(["cluster", "drain", "ghost", *at, "--signer", op]) == 1
    assert "not alive in the cluster" in capsys.readouterr().err
    assert main(["cluster", "allowlist", "remove", "ab" * 32, *at, "--signer", op]) == 1
    assert "empty" in capsys.readouterr().err
    assert main(["cluster", "allowlist", "set", "ab" * 32, *at, "--signer", op, "--wait", "1"]) == 0
    out = capsys.readouterr().out
    assert "allowlist changed (serial " in out
    assert f"signed by the operator alice, written to {prefix}config/allowlist" in out
    assert main(["cluster", "allowlist", "show", *at, "--ca", str(tmp_path / "ca" / "ca.pub")]) == 0
    out = capsys.readouterr().out
    assert "ab" * 32 in out and "signed by the operator alice" in out
    assert main(["cluster", "allowlist", "set", "ab" * 32, *at, "--signer", op]) == 0
    assert "unchanged: nothing written" in capsys.readouterr().out
    assert main(["cluster", "undrain", "ghost", *at, "--signer", op]) == 0
    assert "was not draining: nothing changed" in capsys.readouterr().out
    assert main(["cluster", "status", "--etcd", "http://127.0.0.1:1", "--etcd-prefix", prefix]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no endpoint answered" in err
    assert main(["cluster", "status"]) == 2
    assert "--etcd" in capsys.readouterr().err
