"""The handoff store (palm_net.migration.handoff.HandoffStore): its rows, the guarded moves past the
hand-off, the abort token, and pruning."""

from __future__ import annotations

import os
import time

import pytest
import trio
from nacl.signing import SigningKey

from palm_net.hypervisor.model import ModelVM
from palm_net.migration import handoff
from palm_net.migration.handoff import HandoffState, HandoffStore, Peer, check_abort_token
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
