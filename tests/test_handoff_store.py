"""The handoff store (palm_net.migration.handoff.HandoffStore): its rows, the guarded moves past the
hand-off, the abort token, and pruning."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import trio
from nacl.signing import SigningKey

from palm_net.errors import LocalProtocolError, MigrationFailure
from palm_net.hypervisor.model import ModelVM
from palm_net.migration import handoff
from palm_net.migration.handoff import HandoffState, HandoffStore, Peer, Step, check_abort_token
from palm_net.testing.hostile import HostilePeer
from palm_net.wire.messages import Abort
from palm_net.wire.protocol import Role
from tests.conftest import KEY


def test_the_handoff_store_gives_back_every_field_it_was_given(shm):
    store = HandoffStore(shm / "d.db")
    peers = [Peer(f"peer{i}", bytes([i]) * 32, bytes([0x80 + i]) * 32, f"10.0.0.{i}:7400") for i in (1, 2)]
    mids = [bytes([i]) * 16 for i in range(1, 4)]
    before = time.time()
    store.open_incoming(mids[0], "web", b"W" * 16, peers[0])
    store.open_incoming(mids[1], "db", b"D" * 16, peers[1])
    store.open_incoming(mids[2], "db2", b"E" * 16, peers[1])
    store.set_stats(mids[0], {"rounds": 3})
    store.abort_forever(mids[1], None, "integrity: a page failed its check")
    row = store.get(mids[0])
    assert row is not None and (row.mid, row.role, row.vm, row.vm_id, row.peer) == (
        mids[0], Role.DESTINATION, "web", b"W" * 16, peers[0])
    assert (row.state, row.token, row.error, row.stats) == (HandoffState.RECEIVING, None, None, {"rounds": 3})
    assert before <= row.created <= row.updated <= time.time()
    aborted = store.get(mids[1])
    assert aborted is not None and aborted.state is HandoffState.ABORTED and aborted.peer == peers[1]
    assert aborted.error == "integrity: a page failed its check" and aborted.stats is None
    assert [r.mid for r in store.list()] == mids[::-1]  # newest first
    assert [r.mid for r in store.list(limit=2)] == mids[:0:-1]
    assert [r.mid for r in store.list(states=(HandoffState.ABORTED,))] == [mids[1]]
    assert store.list(role=Role.SOURCE) == [] and store.count() == 3
    # the abort token: only for a recorded abort, only to the peer that began it
    signing = SigningKey.generate()
    assert check_abort_token(signing.verify_key.encode(), mids[1],
                             store.abort_token(mids[1], peers[1].static_pub, signing))
    assert store.abort_token(mids[1], peers[0].static_pub, signing) == b""
    assert store.abort_token(mids[0], peers[0].static_pub, signing) == b""
    assert store.abort_token(b"\x07" * 16, peers[0].static_pub, signing) == b""  # never recorded
    # finished rows go after their time to live, the rest stay
    assert store.prune(now=time.time()) == 0
    assert store.prune(now=time.time() + 31 * 86400) == 1 and store.get(mids[1]) is None
    assert store.count() == 2


def test_past_the_handoff_a_source_resumes_only_with_the_token_or_by_the_operator(shm):
    from palm_net.errors import LocalProtocolError
    from palm_net.migration.handoff import make_abort_token

    store = HandoffStore(shm / "s.db")
    dest_key = SigningKey.generate()
    peer = Peer("dst", b"S" * 32, dest_key.verify_key.encode(), "127.0.0.1:1")
    vms = [ModelVM.create(shm / f"vm{i}", f"vm{i}", 16, KEY) for i in range(3)]
    mids = [bytes([i + 1]) * 16 for i in range(3)]
    for mid, vm in zip(mids, vms, strict=True):
        store.open_outgoing(mid, vm, peer)
        vm.pause()
        assert store.hand_off(mid)
    store.open_incoming(b"\x09" * 16, "in", b"I" * 16, peer)
    for mid in (b"\x08" * 16, b"\x09" * 16):  # unknown; incoming
        with pytest.raises(LocalProtocolError):
            store.abort_and_resume(mid, None, "x")
    for token in (None, b"", make_abort_token(SigningKey.generate(), mids[0]), make_abort_token(dest_key, mids[1])):
        with pytest.raises(LocalProtocolError):  # none, empty, another key's, another migration's
            store.abort_and_resume(mids[0], vms[0], "x", token=token)
    assert store.get(mids[0]).state is HandoffState.HANDED_OFF and vms[0].state == "paused"
    token = make_abort_token(dest_key, mids[0])
    assert store.abort_and_resume(mids[0], vms[0], "destination aborted", token=token)
    row = store.get(mids[0])
    assert row.state is HandoffState.ABORTED and row.token == token and row.error == "destination aborted"
    assert vms[0].state == "running"
    assert store.abort_and_resume(mids[1], vms[1], "operator", override=True) and vms[1].state == "running"
    assert store.confirm(mids[2])  # DONE: it never runs here again, whatever is asked
    assert not store.abort_and_resume(mids[2], vms[2], "late", override=True) and vms[2].state == "paused"
    for vm in vms:
        vm.close()


def test_abort_token_is_bound_to_the_migration():
    from palm_net.migration.handoff import make_abort_token

    b, a = SigningKey.generate(), SigningKey.generate()  # the destination's key, another agent's
    mid = os.urandom(16)
    token = make_abort_token(b, mid)
    assert check_abort_token(bytes(b.verify_key), mid, token)
    assert not check_abort_token(bytes(b.verify_key), os.urandom(16), token)
    assert not check_abort_token(bytes(a.verify_key), mid, token)


# Red-team review of the security fixes, F3 (low-medium): finished rows were never pruned, and not
# bounded per peer.


async def test_rows_are_pruned_and_bounded_per_peer(cluster, monkeypatch):
    monkeypatch.setattr(handoff, "MAX_ABORTED_PER_PEER", 5)
    b = cluster["b"]
    b.incoming.sessions.rate = b.incoming.sessions.burst = 1000.0
    evil = HostilePeer(cluster.authority, cluster.measurement)
    for i in range(8):
        with trio.fail_after(10):  # one at a time: the last one's place is given back first
            while b.incoming.admission.sessions:
                await trio.sleep(0.01)
        ch, proto, reply = await evil.try_begin(cluster.members["b"].port, name=f"junk{i}")
        assert reply.type == "ACCEPT"
        await ch.send(proto.send(Abort("x", "x", b"")))  # admitted, then aborted: a row each
        await ch.aclose()
    with trio.fail_after(10):
        while b.incoming.admission.sessions:
            await trio.sleep(0.02)
    assert len(b.store.list(role=Role.DESTINATION, states=(HandoffState.ABORTED,))) == 8
    b.store.prune()
    assert len(b.store.list(role=Role.DESTINATION, states=(HandoffState.ABORTED,))) == 5
    b.store._db.execute("UPDATE migrations SET updated = updated - 31*86400")
    assert b.store.prune() == 5 and b.store.count() == 0
    # A committed row is never pruned: an in-doubt source may ask for years.
    b.store._open(os.urandom(16), Role.DESTINATION, "kept", bytes(16), Peer("p", bytes(32), bytes(32)))
    (row,) = b.store.list()
    assert b.store._move(row.mid, Role.DESTINATION, handoff.Step.PREPARE)
    assert b.store._move(row.mid, Role.DESTINATION, handoff.Step.COMMIT)
    b.store._db.execute("UPDATE migrations SET updated = updated - 3650*86400")
    b.store.prune()
    assert b.store.get(row.mid) is not None


# Issue 27: the store's own rules, each test killing the mutants named in docs/MUTATION.md.


class _Copy:
    """A stand-in for a hosted VM that only counts what the store does to it."""

    def __init__(self, name: str = "vm") -> None:
        self.info = SimpleNamespace(name=name, vm_id=name.encode().ljust(16, b"_"))
        self.scrubbed = self.resumed = 0
        self.migration: bytes | None = None

    def set_migration(self, mid: bytes) -> None:
        self.migration = mid

    def scrub(self) -> None:
        self.scrubbed += 1

    def resume_after_migration(self) -> None:
        self.resumed += 1


def _clock(monkeypatch) -> list[float]:
    """The store's wall clock, set by the test (rows ordered and expired by it)."""
    now = [1000.0]
    monkeypatch.setattr(handoff.time, "time", lambda: now[0])
    return now


def test_a_move_the_table_does_not_have_is_refused_and_the_row_stays(shm):
    """Guards _move_from's check that every move is one of MOVES (no UPDATE otherwise)."""
    store = HandoffStore(shm / "m.db")
    mid = b"\x01" * 16
    store.open_outgoing(mid, _Copy(), Peer("dst", b"S" * 32, b"K" * 32))
    with pytest.raises(LocalProtocolError):  # no PREPARE for a source: no state it may leave
        store._move(mid, Role.SOURCE, Step.PREPARE)
    with pytest.raises(LocalProtocolError):  # a state the source's ABORT may not leave
        store._move_from(mid, Role.SOURCE, Step.ABORT, (HandoffState.DONE,))
    assert store.state_of(mid) is HandoffState.SENDING


def test_the_source_s_copy_is_scrubbed_only_when_its_row_reads_done(shm):
    """Guards scrub_handed_over: never a copy whose row is not DONE, and its answer (restart forgets on True)."""
    store = HandoffStore(shm / "s.db")
    peer = Peer("dst", b"S" * 32, b"K" * 32)
    mid, vm = b"\x02" * 16, _Copy()
    store.open_outgoing(mid, vm, peer)
    assert store.hand_off(mid)
    assert not store.scrub_handed_over(mid, vm) and vm.scrubbed == 0  # in doubt: kept
    assert store.abort_and_resume(mid, vm, "operator", override=True)
    assert not store.confirm_and_scrub(mid, vm) and vm.scrubbed == 0  # resumed: a late DONE changes nothing
    other, copy = b"\x03" * 16, _Copy("b")
    store.open_outgoing(other, copy, peer)
    assert store.hand_off(other) and store.confirm(other)
    assert not store.scrub_handed_over(other, None)
    assert store.scrub_handed_over(other, copy) and copy.scrubbed == 1


def test_a_resume_that_loses_the_race_to_the_handoff_leaves_the_vm_paused(shm, monkeypatch):
    """Guards abort_and_resume: the VM resumes only if its guarded ABORT moved the row."""
    store = HandoffStore(shm / "r.db")
    mid, vm = b"\x04" * 16, _Copy()
    store.open_outgoing(mid, vm, Peer("dst", b"S" * 32, b"K" * 32))
    real_get = store.get

    def read_then_hand_off(m: bytes):
        row = real_get(m)  # read while SENDING (a resume is allowed) ...
        monkeypatch.setattr(store, "get", real_get)
        assert store.hand_off(m)  # ... and the handoff lands before the guarded UPDATE
        return row

    monkeypatch.setattr(store, "get", read_then_hand_off)
    assert not store.abort_and_resume(mid, vm, "cancelled")
    assert store.state_of(mid) is HandoffState.HANDED_OFF and vm.resumed == 0


def test_unknown_queries_are_recorded_aborted_bounded_per_peer_and_expire(shm, monkeypatch):
    """Guards record_unknown: its row, the per-peer bound and the time to live (a late BEGIN is refused)."""
    monkeypatch.setattr(handoff, "MAX_UNKNOWN_PER_PEER", 3)
    now = _clock(monkeypatch)
    store = HandoffStore(shm / "u.db")
    a, b = Peer("a", b"A" * 32, b"a" * 32), Peer("b", b"B" * 32, b"b" * 32)
    mids = [bytes([i]) * 16 for i in range(1, 6)]
    store.record_unknown(b"\x0b" * 16, b)
    for mid in mids[:4]:
        now[0] += 1
        store.record_unknown(mid, a)
    row = store.get(mids[3])
    assert row is not None and (row.role, row.vm, row.vm_id, row.peer, row.state, row.error) == (
        Role.DESTINATION, "", b"", a, HandoffState.ABORTED, "unknown migration queried")
    kept = {r.mid for r in store.list(states=(HandoffState.ABORTED,))}
    assert kept == {b"\x0b" * 16, *mids[1:4]}  # a's oldest went; b's is its own
    with pytest.raises(MigrationFailure):
        store.open_incoming(mids[3], "late", b"L" * 16, a)
    store.open_incoming(b"\x0c" * 16, "web", b"W" * 16, b)
    store.record_unknown(b"\x0c" * 16, b)  # begun meanwhile: the BEGIN's row stands
    assert store.state_of(b"\x0c" * 16) is HandoffState.RECEIVING
    now[0] = 1000.5 + handoff.UNKNOWN_TTL
    store.record_unknown(mids[4], b)  # a day after b's first: it is gone, a's younger ones stay
    assert {r.mid for r in store.list(states=(HandoffState.ABORTED,))} == {*mids[1:5]}
    now[0] += 3
    store.record_unknown(b"\x0d" * 16, b)
    assert {r.mid for r in store.list(states=(HandoffState.ABORTED,))} == {*mids[3:5], b"\x0d" * 16}


def test_prune_keeps_each_peer_s_newest_aborted_rows_and_counts_what_it_removed(shm, monkeypatch):
    """Guards prune's per-peer bound and count, a row's own times and the 500-character reason."""
    monkeypatch.setattr(handoff, "MAX_ABORTED_PER_PEER", 2)
    now = _clock(monkeypatch)
    store = HandoffStore(shm / "p.db")
    a, b = Peer("a", b"A" * 32, b"a" * 32), Peer("b", b"B" * 32, b"b" * 32)
    mids = [bytes([i]) * 16 for i in range(1, 6)]
    for mid in mids:
        now[0] += 1
        store.open_incoming(mid, "vm", b"V" * 16, b if mid == mids[0] else a)
        now[0] += 1
        store.abort_forever(mid, None, "x" * 600)
    row = store.get(mids[0])
    assert row is not None and (row.created, row.updated, row.error) == (1001.0, 1002.0, "x" * 500)
    assert store.prune() == 2
    assert {r.mid for r in store.list()} == {mids[0], mids[3], mids[4]}
