"""The cluster's signed policy (proto 10), without etcd: what verifies, what an agent keeps,
and the two reproductions of issue 22 at the member (a revoked host deleting or rolling
back its revocation; an unsigned drain of a victim), fast."""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from nacl.signing import SigningKey

from palm_net.cluster.etcd import EtcdConfig
from palm_net.cluster.gate import Lists
from palm_net.cluster.member import POLICY_FILE, ClusterMember, MemberConfig
from palm_net.cluster.model import AgentRecord, DrainOptions, DrainRequest, Keys, RecordError, VmRecord
from palm_net.cluster.policy import (
    MAX_KEYS,
    MAX_POLICY,
    MAX_REVOCATIONS,
    MAX_SERIAL,
    POLICY_DOMAIN,
    PolicyDoc,
    PolicyError,
    PolicyStore,
    Signer,
    open_agent_record,
    open_vm_record,
    revocation,
    seal_record,
    verify,
)
from palm_net.crypto.identity import CA_PUB_FILE, CERT_FILE, OPERATOR_ROLE, AgentIdentity, Authority, KeyFileError

KEYS = Keys("/palm/")
CA = Authority.generate()
BY_CA = Signer(CA.signing, CA.public)
NOW = float(int(time.time()))  # the member checks certificate windows against the clock
EVIL = b"\xee" * 32  # the revoked host's static key


def certified(roles: tuple[str, ...], days: float = 1, not_before: int | None = None) -> Signer:
    ident = AgentIdentity.generate("op-" + roles[0])
    cert = CA.issue(ident.name, ident.static.public, ident.sign_pub, bytes(32), roles, days=days,
                    not_before=int(NOW) - 60 if not_before is None else not_before)
    return Signer(ident.signing, CA.public, cert)


OPERATOR = certified((OPERATOR_ROLE,))
# The revoked host's own attempts: its agent certificate (no operator role), or its own key
# claiming to be the authority (no certificate).
AS_AGENT = certified(("source", "destination"))
AS_AUTHORITY = Signer(SigningKey.generate(), CA.public)


def revoke(serial: int, name: str = "evil", revoked: bool = True, signer: Signer = BY_CA) -> bytes:
    return signer.sign(revocation(KEYS.prefix, name, serial, [EVIL] if revoked else [], "test", "t",
                                  revoked)).raw


def allow(serial: int, *ms: bytes, signer: Signer = OPERATOR) -> bytes:
    return signer.sign(PolicyDoc("allowlist", KEYS.prefix, "", serial, int(NOW), measurements=ms or None)).raw


def drain(serial: int, host: str = "victim", stop: bool = False, signer: Signer = OPERATOR) -> bytes:
    req = DrainRequest("0" * 15 + str(serial % 10), NOW, "t", DrainOptions(), stop)
    return signer.sign(PolicyDoc("drain", KEYS.prefix, host, serial, int(NOW), request=req)).raw


def refused(data: bytes, now: float = NOW, cluster: str = KEYS.prefix) -> str:
    with pytest.raises(PolicyError) as e:
        verify(data, CA.public, cluster, now)
    return e.value.reason


# ------------------------------------------------------------------ the document


def test_signed_by_the_authority_or_an_operator_it_certified():
    assert verify(revoke(1), CA.public, KEYS.prefix, NOW).signer == "authority"
    doc = verify(allow(2, b"\x01" * 32), CA.public, KEYS.prefix, NOW)
    assert doc.signer.startswith("operator ") and doc.measurements == (b"\x01" * 32,) and doc.serial == 2


def test_unsigned_forged_or_foreign_documents_are_refused():
    body_only = json.dumps({"v": 1, "measurements": ["ab" * 32], "at": 1, "by": "x"}).encode()  # the old format
    assert refused(body_only) == "malformed"
    other_ca = Authority.generate()
    assert refused(Signer(other_ca.signing, other_ca.public).sign(
        PolicyDoc("allowlist", KEYS.prefix, "", 5, 1, measurements=None)).raw) == "bad-signature"
    assert refused(revoke(1), cluster="/other/") == "other-cluster"
    assert refused(b"\x00" * 9000) == "malformed"  # bounded before anything is read


def test_a_document_signed_by_a_certificate_without_the_operator_role_is_refused():
    assert refused(allow(9, b"\x02" * 32, signer=AS_AGENT)) == "wrong-role"
    assert refused(drain(9, signer=AS_AGENT)) == "wrong-role"
    with pytest.raises(ValueError, match="alone"):
        certified((OPERATOR_ROLE, "source"))


def test_an_expired_operator_still_revokes_but_lifts_and_widens_nothing():
    old = certified((OPERATOR_ROLE,), days=1, not_before=int(NOW) - 10 * 86400)
    assert verify(revoke(3, signer=old), CA.public, KEYS.prefix, NOW).revoked
    assert refused(revoke(4, revoked=False, signer=old)) == "expired"
    assert refused(allow(4, b"\x03" * 32, signer=old)) == "expired"


def test_the_store_keeps_the_highest_serial_and_refuses_older_or_equivocal_ones():
    store = PolicyStore(CA.public, KEYS, "me")
    assert store.offer("revocation", "evil", revoke(5), NOW) == "new"
    assert store.offer("revocation", "evil", revoke(5), NOW) == "same"
    assert store.offer("revocation", "evil", revoke(4, revoked=False), NOW) == "older"
    assert store.offer("revocation", "evil", revoke(5, revoked=False), NOW) == "equivocation"
    assert store.offer("revocation", "other", revoke(6), NOW) == "misplaced"  # evil's document under other's key
    assert store.lists(1, NOW).is_revoked("evil", b"\x00" * 32)
    assert store.lists(1, NOW).is_revoked("renamed", EVIL)  # the key, whatever name it claims
    assert store.offer("revocation", "evil", revoke(6, revoked=False), NOW) == "new"
    assert not store.lists(2, NOW).is_revoked("evil", EVIL)
    assert store.refused == {"older": 1, "equivocation": 1, "misplaced": 1}
    assert store.offer("drain", "someone-else", drain(1, "someone-else"), NOW) == "ignored"


def test_what_an_agent_writes_back_into_etcd():
    """Lost, older or unsigned: written back; as high (refused here or not): left alone, so two
    agents never overwrite each other's."""
    store = PolicyStore(CA.public, KEYS, "me")
    store.offer("revocation", "evil", revoke(5), NOW)
    key = KEYS.revocation("evil")
    for there in (None, revoke(4), b"junk", revoke(9, revoked=False, signer=AS_AGENT)):
        assert [d.serial for d in store.stale({} if there is None else {key: there})] == [5], there
    for there in (revoke(5), revoke(5, revoked=False), revoke(6, revoked=False)):
        assert store.stale({key: there}) == []


# ------------------------------------------------------------------ at the member (no etcd)


class Host:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lists = Lists()

    def apply_lists(self, lists: Lists) -> None:
        self.lists = lists


def member(tmp_path: Path, name: str = "good") -> ClusterMember:
    tmp_path.mkdir(mode=0o700, exist_ok=True)
    tmp_path.chmod(0o700)
    cfg = MemberConfig(EtcdConfig.from_urls("http://127.0.0.1:1"), KEYS, tmp_path, CA.public)
    return ClusterMember(cfg, Host(name))  # type: ignore[arg-type]


def test_a_revoked_host_cannot_lift_its_revocation(tmp_path):
    """Issue 22's first reproduction: the revoked host deletes its revocation key, writes an
    older document or an unsigned one; it stays revoked.  Only a newer signed one lifts it."""
    m = member(tmp_path)
    key = KEYS.revocation("evil")
    m._take_lists({key: revoke(10)}, 5)
    assert m.host.lists.revoked == {"evil"}
    for values in ({}, {key: revoke(9, revoked=False)}, {key: b'{"v":1,"name":"evil","at":1}'},
                   {key: revoke(12, revoked=False, signer=AS_AUTHORITY)},
                   {key: revoke(12, revoked=False, signer=AS_AGENT)}):
        m._take_lists(values, 6)  # deleted / rolled back / unsigned / signed by itself
        assert m.host.lists.is_revoked("evil", EVIL), values
    assert m.policy.refused == {"older": 1, "malformed": 1, "bad-signature": 1, "wrong-role": 1}
    assert [d.serial for d in m.policy.stale({})] == [10]  # what it writes back to etcd
    m._take_lists({key: revoke(11, revoked=False)}, 7)
    assert not m.host.lists.is_revoked("evil", EVIL)


def test_the_highest_document_survives_a_restart_even_if_etcd_lost_it(tmp_path):
    m = member(tmp_path)
    m._take_lists({KEYS.revocation("evil"): revoke(10), KEYS.allowlist: allow(3, b"\x05" * 32)}, 5)
    path = tmp_path / POLICY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = member(tmp_path)  # a new agent process on the same state directory, etcd empty or unreachable
    assert again.lists.is_revoked("evil", EVIL) and again.lists.allowlist == {b"\x05" * 32}
    again._take_lists({}, 9)
    assert again.host.lists.is_revoked("evil", EVIL) and again.host.lists.allowlist == {b"\x05" * 32}
    path.write_bytes(path.read_bytes()[:-3])  # damaged: refused as a whole, said so
    assert member(tmp_path).lists == Lists()


def test_an_unsigned_widened_allowlist_changes_nothing(tmp_path):
    m = member(tmp_path)
    m._take_lists({KEYS.allowlist: allow(3, b"\x05" * 32)}, 5)
    forged = json.dumps({"v": 1, "measurements": ["05" * 32, "66" * 32], "at": 1}).encode()
    for bad in (forged, allow(4, b"\x05" * 32, b"\x66" * 32, signer=AS_AUTHORITY)):
        m._take_lists({KEYS.allowlist: bad}, 6)
        assert m.host.lists.allowlist == {b"\x05" * 32}
    fresh = member(tmp_path / "fresh")  # nothing kept yet: the forged list is not taken either
    fresh._take_lists({KEYS.allowlist: forged}, 6)
    assert fresh.host.lists.allowlist is None


def test_a_drain_request_must_be_signed_and_newer(tmp_path):
    """Issue 22's second reproduction: the revoked host writes drain/victim (unsigned, or an
    old signed one replayed): the victim does not drain."""
    victim = member(tmp_path, "victim")
    unsigned = DrainRequest("01" * 8, NOW, "evil", DrainOptions())
    victim._take_drain(json.dumps({"v": 1, **unsigned.to_dict()}).encode())
    victim._take_drain(drain(3, signer=AS_AUTHORITY))
    victim._take_drain(drain(3, signer=AS_AGENT))
    assert victim.drain_request is None
    assert victim.policy.refused == {"malformed": 1, "bad-signature": 1, "wrong-role": 1}
    victim._take_drain(drain(5))
    assert victim.drain_request is not None and not victim.drain_request.stop
    victim._take_drain(None)  # deleted: the drain goes on
    assert victim.drain_request is not None
    undrain = OPERATOR.sign(PolicyDoc("drain", KEYS.prefix, "victim", 6, int(NOW))).raw
    victim._take_drain(undrain)
    assert victim.drain_request is None
    victim._take_drain(drain(5))  # the old request replayed
    assert victim.drain_request is None and victim.policy.refused["older"] == 1
    assert member(tmp_path, "victim").drain_request is None  # and after a restart


# ------------------------------------------------------------------ the operator's key


def test_operator_certificates_from_the_cli(tmp_path):
    from palm_net.cli import main

    assert main(["ca", "init", "--dir", str(tmp_path / "ca")]) == 0
    assert main(["keygen", "--dir", str(tmp_path / "op"), "--name", "alice"]) == 0
    assert main(["ca", "issue", "--ca", str(tmp_path / "ca"), "--agent", str(tmp_path / "op"), "--role",
                 "operator", "--role", "source"]) == 2  # never an agent's and an operator's at once
    assert main(["ca", "issue", "--ca", str(tmp_path / "ca"), "--agent", str(tmp_path / "op"), "--role",
                 "operator"]) == 0
    signer = Signer.load(tmp_path / "op")
    assert signer.name == "operator alice" and Signer.load(tmp_path / "ca").name == "authority"
    ca = Authority.load(tmp_path / "ca")
    assert verify(signer.sign(PolicyDoc("allowlist", "/palm/", "", 1, 1)).raw, ca.public, "/palm/", None)
    assert main(["keygen", "--dir", str(tmp_path / "agent"), "--name", "host-a"]) == 0
    assert main(["ca", "issue", "--ca", str(tmp_path / "ca"), "--agent", str(tmp_path / "agent")]) == 0
    (tmp_path / "agent" / "ca.pub").write_bytes((tmp_path / "ca" / "ca.pub").read_bytes())
    with pytest.raises(KeyFileError, match="not an operator"):
        Signer.load(tmp_path / "agent")


# ------------------------------------------------------------------ what an agent says of itself


def test_agent_records_are_the_named_agents_own():
    from palm_net.cluster.model import AgentRecord
    from palm_net.cluster.policy import open_agent_record, seal_record

    def agent(name: str):
        ident = AgentIdentity.generate(name)
        return ident, CA.issue(name, ident.static.public, ident.sign_pub, bytes(32), not_before=int(NOW) - 60)

    (b, b_cert), (c, c_cert) = agent("b"), agent("c")
    rec = AgentRecord("b", "10.0.0.2:7400", "cd" * 32, b.static.public.hex(), ("source", "destination"),
                      1 << 30, 1 << 30, 0, "1", NOW)
    body = rec.encode()
    assert open_agent_record(seal_record(body, b.signing, b_cert), CA.public, NOW) == rec
    for value, why in ((seal_record(body, c.signing, c_cert), "squatted"),  # c claiming b's name
                       (body, "malformed"),  # the JSON alone: not signed
                       (seal_record(body, c.signing, b_cert), "bad-signature"),
                       (seal_record(body, OPERATOR.key, OPERATOR.cert), "wrong-role")):  # type: ignore[arg-type]
        with pytest.raises(PolicyError) as e:
            open_agent_record(value, CA.public, NOW)
        assert e.value.reason == why
    assert open_agent_record(seal_record(body, c.signing, c_cert), None, NOW) == rec  # unchecked: status without --ca


def test_vm_records_are_their_hosts_or_their_last_sources():
    from palm_net.cluster.model import VmRecord
    from palm_net.cluster.policy import open_vm_record, seal_record

    ident = AgentIdentity.generate("b")
    cert = CA.issue("b", ident.static.public, ident.sign_pub, bytes(32), not_before=int(NOW) - 60)
    here = VmRecord("aa" * 16, "web", "b")
    assert open_vm_record(seal_record(here.encode(), ident.signing, cert, "vm"), CA.public, NOW) == here
    moved = VmRecord("aa" * 16, "web", "c", migration="bb" * 16)  # b, the source, after DONE (proto 7.5)
    assert open_vm_record(seal_record(moved.encode(), ident.signing, cert, "vm"), CA.public, NOW) == moved
    for value, why in ((seal_record(VmRecord("aa" * 16, "web", "c").encode(), ident.signing, cert, "vm"),
                        "not-its-own"),
                       (seal_record(here.encode(), ident.signing, cert, "agent"), "bad-signature"),  # another kind
                       (here.encode(), "malformed")):
        with pytest.raises(PolicyError) as e:
            open_vm_record(value, CA.public, NOW)
        assert e.value.reason == why


# ------------------------------------------------------------------ bounds and edges
# (palm_net/cluster/policy.py under mutation: each test below fails with a mutant that
# survived the selection before it; docs/MUTATION.md)


def signed_body(change: dict[str, object], base: PolicyDoc | None = None, signer: Signer = BY_CA) -> bytes:
    """A document whose body is ``base``'s with ``change`` applied, signed as it is (no check)."""
    doc = base or revocation(KEYS.prefix, "evil", 5, [EVIL], "test", "t")
    body = msgpack.packb({**msgpack.unpackb(doc.body()), **change})
    return msgpack.packb({"body": body, "sig": signer.key.sign(POLICY_DOMAIN + body).signature,
                          "cert": b"" if signer.cert is None else signer.cert.encode()})


def test_a_signed_body_is_held_to_its_version_types_and_bounds():
    doc = verify(signed_body({}), CA.public, KEYS.prefix, NOW)
    assert (doc.kind, doc.cluster, doc.subject, doc.serial, doc.by, doc.reason, doc.keys) == (
        "revocation", KEYS.prefix, "evil", 5, "t", "test", (EVIL,))
    at_the_bounds: list[dict[str, object]] = [
        {"serial": 1}, {"serial": MAX_SERIAL}, {"at": 0}, {"at": (1 << 40) - 1}, {"by": "b" * 128},
        {"reason": "r" * 500}, {"keys": [bytes([i]) * 32 for i in range(MAX_KEYS)]}]
    for change in at_the_bounds:
        got = verify(signed_body(change), CA.public, KEYS.prefix, NOW)
        assert all(getattr(got, k) == (tuple(v) if isinstance(v, list) else v) for k, v in change.items()), change
    beyond: list[dict[str, object]] = [
        {"v": 2}, {"serial": 0}, {"serial": MAX_SERIAL + 1}, {"serial": "5"}, {"serial": True}, {"at": -1},
        {"at": 1 << 40}, {"by": "b" * 129}, {"reason": "r" * 501}, {"revoked": 1},
        {"keys": [bytes([i]) * 32 for i in range(MAX_KEYS + 1)]}, {"keys": [bytes(31)]}, {"keys": ["k" * 32]},
        {"keys": ""}, {"keys": {}}]
    for change in beyond:
        assert refused(signed_body(change)) == "malformed", change
    not_a_map = msgpack.packb([1])
    assert refused(msgpack.packb({"body": not_a_map, "sig": CA.signing.sign(POLICY_DOMAIN + not_a_map).signature,
                                  "cert": b""})) == "malformed"


def test_a_document_of_exactly_the_bound_is_signed_and_read_one_byte_more_is_not():
    def padded(n: int, by: int) -> PolicyDoc:
        return PolicyDoc("allowlist", KEYS.prefix, "", 1, int(NOW), "b" * by,
                         measurements=tuple(i.to_bytes(32, "big") for i in range(n)))
    size = len(BY_CA.sign(padded(200, 32)).raw)
    n = 200 + (MAX_POLICY - size) // 34  # each measurement: 34 bytes
    doc = padded(n, 32 + MAX_POLICY - len(BY_CA.sign(padded(n, 32)).raw))
    raw = BY_CA.sign(doc).raw
    assert len(raw) == MAX_POLICY and verify(raw, CA.public, KEYS.prefix, NOW).measurements == doc.measurements
    assert refused(raw + b"\x00") == "malformed"
    with pytest.raises(ValueError):
        BY_CA.sign(replace(doc, by=doc.by + "b"))


def test_a_signed_value_with_another_field_beside_body_sig_and_cert_is_refused():
    outer = msgpack.unpackb(revoke(5))
    assert refused(msgpack.packb({**outer, "x": 1})) == "unsigned"
    ident = AgentIdentity.generate("b")
    cert = CA.issue("b", ident.static.public, ident.sign_pub, bytes(32), not_before=int(NOW) - 60)
    rec = VmRecord("aa" * 16, "web", "b")
    sealed = msgpack.unpackb(seal_record(rec.encode(), ident.signing, cert, "vm"))
    with pytest.raises(PolicyError) as e:
        open_vm_record(msgpack.packb({**sealed, "x": 1}), CA.public, NOW)
    assert e.value.reason == "unsigned"


def test_a_signer_s_certificate_is_judged_at_the_time_given_not_the_host_clock():
    later, earlier = NOW + 3 * 86400, NOW - 3600  # OPERATOR holds one day from NOW - 60
    assert refused(allow(2, b"\x01" * 32), now=later) == "expired"
    assert refused(allow(2, b"\x01" * 32), now=earlier) == "not-yet-valid"
    store = PolicyStore(CA.public, KEYS, "me")
    assert store.offer("allowlist", "", allow(2, b"\x01" * 32), later) == "expired"
    assert store.kept == {} and store.refused == {"expired": 1}
    ident = AgentIdentity.generate("b")
    cert = CA.issue("b", ident.static.public, ident.sign_pub, bytes(32), not_before=int(NOW) - 60, days=1)
    agent = AgentRecord("b", "10.0.0.2:7400", "cd" * 32, ident.static.public.hex(), ("source", "destination"),
                        1 << 30, 1 << 30, 0, "1", NOW)
    vm = VmRecord("aa" * 16, "web", "b")
    for value, opener in ((seal_record(agent.encode(), ident.signing, cert), open_agent_record),
                          (seal_record(vm.encode(), ident.signing, cert, "vm"), open_vm_record)):
        opener(value, CA.public, NOW)  # type: ignore[operator]
        for now, why in ((later, "expired"), (earlier, "not-yet-valid")):
            with pytest.raises(PolicyError) as e:
                opener(value, CA.public, now)  # type: ignore[operator]
            assert e.value.reason == why


def test_a_record_of_its_name_under_another_key_is_squatted():
    ident, other = AgentIdentity.generate("b"), AgentIdentity.generate("b")
    cert = CA.issue("b", ident.static.public, ident.sign_pub, bytes(32), not_before=int(NOW) - 60)
    for name, static in (("b", other.static.public), ("c", ident.static.public)):
        rec = AgentRecord(name, "10.0.0.2:7400", "cd" * 32, static.hex(), ("source",), 1 << 30, 1 << 30, 0, "1",
                          NOW)
        with pytest.raises(PolicyError) as e:
            open_agent_record(seal_record(rec.encode(), ident.signing, cert), CA.public, NOW)
        assert e.value.reason == "squatted", name


def test_revocations_kept_are_bounded_a_lifted_one_makes_room_and_all_survive_a_restart():
    store = PolicyStore(CA.public, KEYS, "me")
    for i in range(MAX_REVOCATIONS):
        assert store.take(verify(revoke(5, f"h{i}"), CA.public, KEYS.prefix, NOW)) == "new", i
    assert store.take(verify(revoke(5, "one-more"), CA.public, KEYS.prefix, NOW)) == "too-many"
    assert store.take(verify(allow(2, b"\x01" * 32), CA.public, KEYS.prefix, NOW)) == "new"  # not a revocation
    assert store.take(verify(revoke(6, "h0", revoked=False), CA.public, KEYS.prefix, NOW)) == "new"
    assert store.take(verify(revoke(5, "one-more"), CA.public, KEYS.prefix, NOW)) == "new"  # h0's lifting goes
    assert ("revocation", "h0") not in store.kept
    assert sum(k[0] == "revocation" for k in store.kept) == MAX_REVOCATIONS
    assert store.refused == {"too-many": 1}
    again = PolicyStore(CA.public, KEYS, "me")
    assert again.load(store.encode()) == MAX_REVOCATIONS + 1
    assert again.kept.keys() == store.kept.keys()


def test_the_kept_file_is_a_version_1_map_and_a_document_twice_in_it_is_taken_once():
    store = PolicyStore(CA.public, KEYS, "me")
    doc = revoke(5)
    assert store.load(msgpack.packb({"v": 1, "docs": [doc, doc]})) == 1 and store.refused == {}
    assert store.take(verify(doc, CA.public, KEYS.prefix, NOW)) == "same" and store.refused == {}
    for bad in ({"v": 2, "docs": []}, [1, 2], {"v": 1, "docs": {}}):
        with pytest.raises(RecordError):
            PolicyStore(CA.public, KEYS, "me").load(msgpack.packb(bad))


def test_what_is_written_back_goes_on_past_a_document_etcd_holds_and_includes_the_own_drain():
    store = PolicyStore(CA.public, KEYS, "me")
    for subject in ("a", "b", "c"):
        store.offer("revocation", subject, revoke(5, subject), NOW)
    store.offer("drain", "me", drain(4, "me"), NOW)
    held = {KEYS.revocation("a"): revoke(5, "a"), KEYS.revocation("b"): revoke(7, "b", revoked=False)}
    assert [(d.kind, d.subject) for d in store.stale(held)] == [("revocation", "c"), ("drain", "me")]


def test_refusals_are_counted_each_and_the_lists_carry_their_revision_and_time():
    store = PolicyStore(CA.public, KEYS, "me")
    for _ in range(3):
        store.offer("revocation", "evil", b"junk", NOW)
    assert store.refused == {"malformed": 3}
    lists = store.lists(7, 1234.5)
    assert (lists.revision, lists.read_at) == (7, 1234.5)


def test_a_revocation_made_for_the_cli_revokes_by_default_and_its_text_fits_what_agents_accept():
    doc = revocation(KEYS.prefix, "evil", 5, [EVIL, EVIL], "r" * 600, "b" * 200)
    assert doc.revoked and doc.keys == (EVIL,)
    got = verify(BY_CA.sign(doc).raw, CA.public, KEYS.prefix, NOW)
    assert got.revoked and (got.reason, got.by) == ("r" * 500, "b" * 128)


def test_a_signer_loaded_from_a_directory_signs_and_knows_the_authority(tmp_path):
    ca_dir, op_dir = tmp_path / "ca", tmp_path / "op"
    CA.save(ca_dir)
    ident = AgentIdentity.generate("alice")
    ident.save(op_dir)
    (op_dir / CERT_FILE).write_bytes(CA.issue("alice", ident.static.public, ident.sign_pub, bytes(32),
                                              (OPERATOR_ROLE,), not_before=int(NOW) - 60).encode())
    (op_dir / CA_PUB_FILE).write_bytes((ca_dir / CA_PUB_FILE).read_bytes())
    for d in (ca_dir, op_dir):
        signer = Signer.load(d)
        assert signer.authority_pub == CA.public
        assert verify(signer.sign(PolicyDoc("allowlist", KEYS.prefix, "", 1, 1)).raw, CA.public, KEYS.prefix,
                      NOW).signer == signer.name
