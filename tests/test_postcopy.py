"""Post-copy (proto 7.9): the session's new states, the source's page server, the
destination's puller, and the handoff rows that go with them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm_net.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from palm_net.migration import handoff, postcopy
from palm_net.migration.handoff import DESTINATION, SOURCE, HandoffState, Step, may_resume, may_run, may_scrub
from palm_net.migration.postcopy import SERVE_BULK, SERVE_SLICE, PageServer, Puller
from palm_net.wire.messages import (
    Accept,
    Begin,
    Commit,
    Complete,
    Context,
    CpuState,
    Done,
    Fetch,
    Keys,
    Missing,
    Outcome,
    Pages,
    Pulled,
    Query,
    Ready,
    RecoveryOutcome,
    Running,
    Want,
)
from palm_net.wire.pages import PageBatch, ascending_gfns, bitmap_gfns, gfn_bitmap, u64le
from palm_net.wire.protocol import Role, SessionProtocol, State

MID = bytes(range(16))


def _pair() -> tuple[SessionProtocol, SessionProtocol]:
    return SessionProtocol(Role.SOURCE, MID), SessionProtocol(Role.DESTINATION)


def _to_switch(src: SessionProtocol, dst: SessionProtocol, postcopy: bool = True) -> None:
    """A page migration to COMMITTING: BEGIN .. MISSING (post-copy) .. COMPLETE, READY, COMMIT."""
    def s2d(body: object) -> None:
        dst.receive(src.send(body))  # type: ignore[arg-type]

    def d2s(body: object) -> None:
        src.receive(dst.send(body))  # type: ignore[arg-type]

    s2d(Begin("vm", bytes(16), 8, 0, 0, 1, False, False, "model", b""))
    d2s(Accept())
    s2d(Keys(b"k"))
    s2d(Pages(0, u64le(np.arange(8)), bytes(8), u64le(np.zeros(8)), b""))
    if postcopy:
        s2d(Missing(1, 3, b"\x05", b"", b"", b""))  # gfns 3 and 5, normal
        assert src.state is State.SWITCHING
    s2d(CpuState(b"c"))
    s2d(Context(0, 1, b"x"))
    s2d(Complete(5, 1, bytes(32)))
    d2s(Ready(b""))
    s2d(Commit())


def test_a_post_copy_session_runs_through_serving_to_done():
    src, dst = _pair()
    _to_switch(src, dst)
    src.receive(dst.send(Running()))
    assert src.state is dst.state is State.SERVING
    src.receive(dst.send(Fetch(u64le(np.array([5])))))
    batch = PageBatch(np.array([5], np.uint64), bytes(1), np.array([1], np.uint64), b"")
    dst.receive(src.send(batch.message(1)))
    src.receive(dst.send(Pulled(b"")))
    assert src.state is dst.state is State.DONE


def test_done_never_answers_a_post_copy_commit_nor_running_a_pre_copy_one():
    src, dst = _pair()
    _to_switch(src, dst)
    with pytest.raises(RemoteProtocolError) as e:
        src.receive(_forged(dst, Done()))
    assert e.value.code is ErrorCode.OUT_OF_STATE
    with pytest.raises(LocalProtocolError):
        dst.send(Done())  # our own stack refuses it too
    src2, dst2 = _pair()
    _to_switch(src2, dst2, postcopy=False)
    with pytest.raises(LocalProtocolError):
        dst2.send(Running())
    with pytest.raises(RemoteProtocolError):
        src2.receive(_forged(dst2, Running()))


def _forged(dst: SessionProtocol, body: object) -> bytes:
    """``body`` as the destination's next message, made by a stack that does not check the state."""
    from palm_net.wire import messages
    return messages.encode(messages.Message(MID, dst._next_seq[Role.DESTINATION], body))  # type: ignore[arg-type]


def test_no_abort_and_no_want_in_a_migration_session_while_serving():
    from palm_net.wire.messages import Abort
    src, dst = _pair()
    _to_switch(src, dst)
    src.receive(dst.send(Running()))
    assert not src.can_send(Abort) and not dst.can_send(Abort)
    with pytest.raises(RemoteProtocolError) as e:
        src.receive(_forged(dst, Want(1, b"", False)))
    assert e.value.code is ErrorCode.OUT_OF_STATE


def test_outcome_postcopy_leads_a_recovery_session_to_serving_and_want_is_taken_there():
    src, dst = SessionProtocol(Role.SOURCE, MID, recovery=True), SessionProtocol(Role.DESTINATION, recovery=True)
    dst.receive(src.send(Query()))
    src.receive(dst.send(Outcome(RecoveryOutcome.POSTCOPY.value, b"")))
    assert src.state is dst.state is State.SERVING and src.postcopy
    src.receive(dst.send(Want(1, u64le(np.array([2, 4])), False)))
    src.receive(dst.send(Pulled(b"")))
    assert src.state is State.DONE
    other_s, other_d = SessionProtocol(Role.SOURCE, MID, recovery=True), SessionProtocol(Role.DESTINATION,
                                                                                        recovery=True)
    other_d.receive(other_s.send(Query()))
    other_s.receive(other_d.send(Outcome(RecoveryOutcome.COMMITTED.value, b"")))
    assert other_s.state is State.CLOSED


def test_missing_after_the_cpu_state_or_on_a_stream_backend_is_out_of_state():
    src, dst = _pair()
    dst.receive(src.send(Begin("vm", bytes(16), 8, 0, 0, 1, False, False, "model", b"")))
    src.receive(dst.send(Accept()))
    dst.receive(src.send(CpuState(b"c")))
    with pytest.raises(LocalProtocolError):
        src.send(Missing(1, 1, b"\x01", b"", b"", b""))
    qs, qd = _pair()
    qd.receive(qs.send(Begin("vm", bytes(16), 8, 0, 0, 1, False, False, "qemu", b"s")))
    qs.receive(qd.send(Accept()))
    with pytest.raises(LocalProtocolError) as e:
        qs.send(Missing(1, 1, b"\x01", b"", b"", b""))
    assert e.value.code is ErrorCode.OUT_OF_STATE


def test_wire_gfn_lists_are_ascending_and_inside_the_vm():
    assert list(ascending_gfns(u64le(np.array([1, 2, 9])), 10, "X")) == [1, 2, 9]
    for bad in ([2, 2], [3, 1], [10]):
        with pytest.raises(RemoteProtocolError):
            ascending_gfns(u64le(np.array(bad)), 10, "X")
    with pytest.raises(RemoteProtocolError):
        ascending_gfns(b"\x00" * 7, 10, "X")
    with pytest.raises(RemoteProtocolError):
        ascending_gfns(u64le(np.array([4])), 10, "X", above=4)


# -- the page server and the puller


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 5000), min_size=1, max_size=400), st.lists(st.integers(0, 5000), max_size=80),
       st.integers(0, 10))
def test_the_server_sends_every_pending_page_once_fetched_ones_first(pending, fetched, fetch_after):
    server = PageServer(np.array(sorted(pending), np.uint64), 3)
    sent: list[int] = []
    slices = 0
    while True:
        if slices == fetch_after:
            server.fetch(np.array(sorted(set(fetched)), np.uint64))
            asked = [g for g in sorted(set(fetched)) if g in pending and g not in sent]
            nxt = server.next_slice()
            if nxt is not None:
                if asked:  # fetched ones first
                    assert set(asked[:SERVE_SLICE]) <= {int(g) for g in nxt}
                sent += [int(g) for g in nxt]
            slices += 1
            continue
        nxt = server.next_slice()
        if nxt is None:
            break
        assert len(nxt) <= SERVE_BULK and bool((nxt[1:] > nxt[:-1]).all())  # ascending, as PAGES wants
        sent += [int(g) for g in nxt]
        slices += 1
    assert sorted(sent) == sorted(pending) and len(sent) == len(set(sent)) and server.unsent == 0


def _pages(gfns: list[int], vers: list[int], round_no: int = 4) -> Pages:
    return PageBatch(np.array(gfns, np.uint64), bytes(len(gfns)), np.array(vers, np.uint64), b"").message(round_no)


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 2, 0]])  # ascending, or two runs (named before the pause, after)
def test_the_puller_takes_only_missing_pages_once_and_of_the_announced_version(order):
    puller = Puller(4, np.array([2, 5, 9], np.uint64)[order], np.array([4, 7, 4], np.uint64)[order])
    assert [int(g) for g in np.frombuffer(puller.faults([9, 5, 2, 3]) or b"", "<u8")] == [2, 5, 9]
    puller.take(_pages([2, 9], [4, 4]))
    assert puller.remaining == 1
    for gfns, vers, rnd, code in (([2], [4], 4, ErrorCode.REPLAY),  # taken already
                                  ([3], [4], 4, ErrorCode.REPLAY),  # never missing
                                  ([5], [6], 4, ErrorCode.ROLLBACK),  # another version than announced
                                  ([5], [7], 3, ErrorCode.ROLLBACK)):  # another round
        with pytest.raises(RemoteProtocolError) as e:
            puller.take(_pages(gfns, vers, rnd))
        assert e.value.code is code
    assert puller.remaining == 1  # a refused message takes nothing
    puller.take(_pages([5], [7]))
    assert puller.remaining == 0


def test_the_puller_asks_for_a_fault_once_and_wants_what_is_left():
    puller = Puller(4, np.arange(0, 5000, 2, dtype=np.uint64), np.full(2500, 4, np.uint64))
    assert puller.faults([3]) is None  # not missing
    body = puller.faults([10, 4, 10])
    assert body is not None and list(np.frombuffer(body, "<u8")) == [4, 10]
    assert puller.faults([4, 10]) is None  # asked already
    assert len(Fetch(puller.faults(list(range(100, 400, 2))) or b"").gfns) == 8 * 64  # at most MAX_FETCH
    puller.take(_pages([0, 2], [4, 4]))
    wants = puller.wants()
    assert [w.more for w in wants] == [True, False] and all(w.round == 4 for w in wants)
    left = np.concatenate([np.frombuffer(w.gfns, "<u8") for w in wants])
    assert len(left) == 2498 and left[0] == 4
    assert [w.gfns for w in Puller(4, np.zeros(0, np.uint64), np.zeros(0, np.uint64)).wants()] == [b""]


# -- the handoff rows


def test_post_copy_rows_never_abort_and_never_scrub_before_pulled():
    assert may_run(DESTINATION, HandoffState.PULLING) and not may_scrub(DESTINATION, HandoffState.PULLING)
    assert not may_run(SOURCE, HandoffState.SERVING) and not may_scrub(SOURCE, HandoffState.SERVING)
    assert not may_resume(HandoffState.SERVING, token_ok=True, override=True)
    assert (DESTINATION, HandoffState.PULLING, Step.ABORT) not in handoff.MOVES
    assert (SOURCE, HandoffState.SERVING, Step.ABORT) not in handoff.MOVES


def test_the_store_moves_post_copy_rows_and_refuses_an_abort_of_them(tmp_path):
    from palm_net.migration.handoff import HandoffStore, Peer
    store = HandoffStore(tmp_path / "s.db")
    peer = Peer("p", bytes(32), bytes(32), "h:1")
    src, dst = b"s" * 16, b"d" * 16
    store._open(src, SOURCE, "vm", bytes(16), peer)
    assert not store.serve(src)  # only from HANDED_OFF
    assert store.hand_off(src) and store.serve(src) and store.serve(src)  # (a recovery's: already SERVING)
    assert not store.abort_and_resume(src, None, "no", override=True)
    assert store.state_of(src) is HandoffState.SERVING
    assert store.confirm(src) and store.state_of(src) is HandoffState.DONE
    store.open_incoming(dst, "vm", bytes(16), peer)
    store._move(dst, DESTINATION, Step.PREPARE)
    assert store._move(dst, DESTINATION, Step.SWITCH)
    assert not store.abort_forever(dst, None, "no")  # kept: the VM ran here
    assert store.state_of(dst) is HandoffState.PULLING
    assert store._move(dst, DESTINATION, Step.PULLED) and store.state_of(dst) is HandoffState.COMMITTED


# -- a whole post-copy migration between the two engines (no sockets, threads or clock)


def _pc_pair(shm, params, **kw):
    from palm_net.hypervisor.model import ModelVM
    from palm_net.migration.handoff import HandoffStore
    from palm_net.testing.engines import DestinationDriver, SourceDriver
    from tests.conftest import KEY
    src = ModelVM.create(shm / "src", "vm", 256, KEY, protected_processes=2, protected_pages=32, fill="random",
                         seed=5)
    dest = DestinationDriver(HandoffStore(shm / "dst.db"), lambda mid, b: ModelVM.create_incoming(
        shm / "dst", b.vm, b.vm_id, b.pages, b.vcpus, KEY, migration=mid))
    return src, SourceDriver(src, HandoffStore(shm / "src.db"), dest, params, **kw)


def _dirty(src):
    """After round 0: normal pages and both processes' pages written (the missing set)."""
    def between(r: int) -> None:
        for g in range(10, 210):
            src.guest_write(g, b"after round %d" % r)
        for p in range(2):
            first = src.processes[p].first
            for g in range(first, first + 5):
                src.process_write(p, g, b"protected %d" % g)
    return between


PC = dict(postcopy=True, postcopy_after=1)


def test_a_post_copy_migration_between_the_two_engines(shm):
    from palm_net.migration.params import MigrationParams
    from palm_net.migration.source import Step
    src, drv = _pc_pair(shm, MigrationParams(verify_digest=True, **PC))
    drv.player.between = _dirty(src)
    drv.run()
    eng, dest = drv.engine, drv.dest
    assert eng.step is Step.DONE and eng.pulled is not None and eng.stats.stop_reason == "postcopy"
    assert eng.stats.postcopy_pages == 210 == eng.stats.served_pages
    assert drv.player.host.store.get(eng.mid).state is HandoffState.SERVING  # DONE is the shell's next write
    assert dest.store.get(eng.mid).state is HandoffState.COMMITTED
    assert dest.vm is not None and dest.vm.running and dest.vm.verify().ok
    assert dest.vm.digest() == src.digest()  # the source's memory at the switch, every page
    assert eng.pulled.digest.hex() == src.digest()  # PULLED's: the pages as the migration wrote them
    assert dest.vm.postcopy_state() is None
    sent = [type(e).__name__ for e in drv.player.effects]
    assert "ReadMetadata" in sent and "Serve" in sent and sent.index("HandOff") < sent.index("Serve")


def test_a_fetched_page_goes_before_the_rest(shm, monkeypatch):
    monkeypatch.setattr(postcopy, "SERVE_BULK", SERVE_SLICE)  # (slices of 64 pages: several of them)
    from palm_net.channel.records import Record
    from palm_net.migration.params import MigrationParams
    from palm_net.wire import messages as m
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    order: list[int] = []

    def deliver(record: bytes) -> bytes | None:
        dest = drv.dest.engine
        if dest.puller is not None and not order:
            order.append(-1)  # once, right after RUNNING: a vCPU touches gfn 209 (the last missing normal page)
            for fetch in drv.dest.perform(dest.on_fault([209])):
                drv.player.queue.extend(drv.engine.on_record(Record(fetch, 0, bytes(32)), drv.player.now))
        try:
            body = m.decode(record).body
        except Exception:
            return record
        if isinstance(body, Pages) and dest.puller is not None:
            order.extend(int(g) for g in np.frombuffer(body.gfns, "<u8"))
        return record

    drv.deliver = deliver
    drv.run()
    # The first slice (64 pages) was on its way; 209 goes in the next, not 200th as in order.
    assert 1 + 64 <= order.index(209) < 1 + 128 and drv.engine.stats.fetched_pages == 1
    assert drv.dest.vm is not None and drv.dest.vm.digest() == src.digest()


def test_a_tampered_post_copy_page_keeps_the_vm_and_recovery_finishes_it(shm, monkeypatch):
    """A protected page's ciphertext altered in the serving phase: refused (integrity), nothing
    aborts (the VM ran at the destination: row PULLING, the source's SERVING); a recovery
    session (WANT, then serving) brings the rest, and the VM is whole."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", SERVE_SLICE)  # (slices of 64 pages: several of them)
    from palm_net.channel.records import Record
    from palm_net.migration.destination import DestinationEngine
    from palm_net.migration.hosts import error_of
    from palm_net.migration.params import MigrationParams
    from palm_net.migration.source import SourceEngine, Step
    from palm_net.testing.engines import SourcePlayer
    from palm_net.wire import messages as m
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    flipped = []

    def deliver(record: bytes) -> bytes | None:
        dest = drv.dest.engine
        if dest.puller is not None and dest.main.pages is not None and not flipped and \
                2 in dest.main.pages._kinds:  # a data record ending with a protected page
            flipped.append(1)
            return record[:-1] + bytes([record[-1] ^ 1])
        return record

    drv.deliver = deliver
    with pytest.raises(Exception):
        drv.run()
    dest = drv.dest
    assert flipped and dest.engine.outcome == "committed"
    assert dest.store.get(drv.engine.mid).state is HandoffState.PULLING  # kept: the VM ran here
    assert drv.player.host.store.get(drv.engine.mid).state is HandoffState.SERVING
    assert dest.vm is not None and dest.vm.running and dest.vm.postcopy_state() is not None
    # Recovery: QUERY answered postcopy (the protocol), then WANT and serving.
    s_proto, d_proto = SessionProtocol(Role.SOURCE, drv.engine.mid, recovery=True), SessionProtocol(
        Role.DESTINATION, recovery=True)
    d_proto.receive(s_proto.send(Query()))
    s_proto.receive(d_proto.send(Outcome(RecoveryOutcome.POSTCOPY.value, b"")))
    rnd, missing, vers = dest.vm.postcopy_state()
    d_eng, first = DestinationEngine.pulling(d_proto, 256, rnd, missing, vers)
    dest.engine = d_eng
    s_eng = SourceEngine.recovering(s_proto, src.info, MigrationParams())
    wants = dest.perform(first)

    def reply(record: bytes, before: bytes) -> list[bytes]:
        try:
            return dest.feed(record, before)
        except Exception as exc:
            return dest.fail(error_of(exc))

    player = SourcePlayer(src, s_eng, drv.player.host.store, reply)
    player.started = True
    for w in wants:
        player.queue.extend(s_eng.on_record(Record(w, 0, bytes(32)), 0.0))
    list(player.run())
    assert s_eng.step is Step.DONE and 0 < s_eng.stats.served_pages < 210
    assert dest.store.get(s_eng.mid).state is HandoffState.COMMITTED
    assert dest.vm.digest() == src.digest() and dest.vm.verify().ok
    assert m.TYPES["WANT"] is Want


def test_a_pulling_destination_answers_postcopy_and_never_aborts(tmp_path):
    """QUERY about a migration whose VM ran here with pages missing: `postcopy` (serve me),
    never `aborted` with a token (the source would resume a second copy) nor `committed`
    (the source would scrub pages only it holds); another agent learns nothing."""
    from nacl.signing import SigningKey

    from palm_net.migration.handoff import HandoffStore, Peer
    from palm_net.migration.orchestrate import answer_query
    store = HandoffStore(tmp_path / "d.db")
    src = Peer("a", b"S" * 32, bytes(SigningKey.generate().verify_key))
    mid = b"p" * 16
    store.open_incoming(mid, "vm", bytes(16), src)
    store._move(mid, DESTINATION, Step.PREPARE)
    store._move(mid, DESTINATION, Step.SWITCH)
    signing = SigningKey.generate()
    assert answer_query(store, signing, mid, src) == Outcome(RecoveryOutcome.POSTCOPY.value, b"")
    assert store.state_of(mid) is HandoffState.PULLING
    other = Peer("c", b"C" * 32, bytes(SigningKey.generate().verify_key))
    assert answer_query(store, signing, mid, other).outcome == RecoveryOutcome.UNKNOWN
    store._move(mid, DESTINATION, Step.PULLED)
    assert answer_query(store, signing, mid, src).outcome == RecoveryOutcome.COMMITTED


def test_a_pulled_before_every_page_went_is_not_believed(shm, monkeypatch):
    """PULLED while the source has pages it never sent: not taken (its copy would be scrubbed
    with pages the destination cannot have): in doubt, asked again."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", SERVE_SLICE)  # (slices of 64 pages: several of them)
    from palm_net.migration.handoff import InDoubt
    from palm_net.migration.params import MigrationParams
    from palm_net.wire import messages as m
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    forged: list[bytes] = []

    def deliver(record: bytes) -> bytes | None:
        dest = drv.dest.engine
        if dest.puller is not None and not forged:  # the first page served: a PULLED overtakes the rest
            forged.append(m.encode(m.Message(drv.engine.mid, dest.proto._next_seq[Role.DESTINATION], Pulled(b""))))
            from palm_net.channel.records import Record
            drv.player.queue.extend(drv.engine.on_record(Record(forged[0], 0, bytes(32)), drv.player.now))
        return record

    drv.deliver = deliver
    with pytest.raises(InDoubt, match="never sent"):
        drv.run()
    assert drv.player.host.store.get(drv.engine.mid).state is HandoffState.SERVING


# -- what a hostile or quiet destination can make a source do (review findings)


def _recovering_engine(npages: int = 4096):
    from palm_net.migration.params import MigrationParams
    from palm_net.migration.source import SourceEngine

    class Info:
        name, vm_id, protected_pages, processes, vcpus = "vm", bytes(16), 0, 0, 1

    Info.npages = npages
    s, d = SessionProtocol(Role.SOURCE, MID, recovery=True), SessionProtocol(Role.DESTINATION, recovery=True)
    d.receive(s.send(Query()))
    s.receive(d.send(Outcome(RecoveryOutcome.POSTCOPY.value, b"")))
    eng = SourceEngine.recovering(s, Info(), MigrationParams())
    assert eng.start(0.0) == [] and eng.timer() is not None  # the destination's WANTs are due, not awaited forever
    return eng, d


def test_wants_are_bounded_and_one_round():
    from palm_net.channel.records import Record
    eng, d = _recovering_engine()
    with pytest.raises(RemoteProtocolError) as e:
        eng.on_record(Record(d.send(Want(1, b"", True)), 0, bytes(32)), 0.0)  # empty, and more to come: a flood
    assert e.value.code is ErrorCode.MALFORMED
    eng, d = _recovering_engine()
    eng.on_record(Record(d.send(Want(1, u64le(np.array([1])), True)), 0, bytes(32)), 0.0)
    with pytest.raises(RemoteProtocolError):
        eng.on_record(Record(d.send(Want(2, u64le(np.array([2])), False)), 0, bytes(32)), 0.0)  # another round
    eng, d = _recovering_engine(npages=2048)
    for g in range(2):
        eng.on_record(Record(d.send(Want(1, u64le(np.array([g])), True)), 0, bytes(32)), 0.0)
    with pytest.raises(RemoteProtocolError):  # more WANTs than 2048 pages can need
        eng.on_record(Record(d.send(Want(1, u64le(np.array([5])), True)), 0, bytes(32)), 0.0)


def test_a_page_asked_for_again_and_again_is_queued_once():
    server = PageServer(np.arange(100, dtype=np.uint64), 1)
    for _ in range(1000):
        server.fetch(np.array([7, 9], np.uint64))
    assert len(server._asked) == 2 and {7, 9} <= {int(g) for g in server.next_slice()}
    server.fetch(np.array([7], np.uint64))
    assert len(server._asked) == 0  # sent already


def test_a_fetch_before_serving_is_durable_is_kept_and_served_first(shm):
    """RUNNING, then at once a vCPU's FETCH, before the source's SERVING is durable: kept (it
    used to end the session), and the page goes first once serving begins."""
    from palm_net.channel.records import Record
    from palm_net.migration.effects import Serve
    from palm_net.migration.params import MigrationParams
    from palm_net.wire import messages as m
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    perform, order = drv.player.host.perform, []

    def serve_late(eff):
        if isinstance(eff, Serve):
            dest = drv.dest.engine
            for fetch in drv.dest.perform(dest.on_fault([209])):
                assert drv.engine.on_record(Record(fetch, 0, bytes(32)), drv.player.now) == []
        return perform(eff)

    def deliver(record: bytes) -> bytes | None:
        try:
            body = m.decode(record).body
        except Exception:
            return record
        if isinstance(body, Pages) and drv.dest.engine.puller is not None:
            order.append([int(g) for g in np.frombuffer(body.gfns, "<u8")])
        return record

    drv.player.host.perform, drv.deliver = serve_late, deliver
    drv.run()
    assert 209 in order[0] and drv.engine.stats.fetched_pages == 1
    assert drv.dest.vm is not None and drv.dest.vm.digest() == src.digest()


def test_a_source_that_sent_every_page_waits_for_pulled_only_so_long(shm):
    """PULLED never comes (the destination gone quiet without a close): the session is taken
    as lost after the reply timeout (then recovery asks), not waited for forever."""
    from palm_net.migration.params import MigrationParams
    from palm_net.wire import messages as m
    src, drv = _pc_pair(shm, MigrationParams(reply_timeout=5.0, **PC))
    drv.player.between = _dirty(src)
    reply = drv.player.reply

    def no_pulled(record: bytes, before: bytes) -> list[bytes]:
        return [a for a in reply(record, before) if not isinstance(m.decode(a).body, Pulled)]

    drv.player.reply = no_pulled
    with pytest.raises(RemoteProtocolError) as e:
        drv.run()
    assert e.value.code is ErrorCode.TIMEOUT and drv.engine.server is not None and not drv.engine.server.unsent


def test_a_recovery_with_nothing_missing_any_more_settles_at_once(shm):
    """The destination filled every page but died before COMMITTED: recovery's WANT names no
    page and its PULLED follows at once, overtaking the source's durable SERVING: taken."""
    from palm_net.channel.records import Record
    from palm_net.migration.destination import DestinationEngine
    from palm_net.migration.params import MigrationParams
    from palm_net.migration.source import SourceEngine, Step
    from palm_net.testing.engines import SourcePlayer
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    drv.player.reply = lambda record, before: [a for a in drv._reply(record, before)
                                               if not isinstance(m_decode(a), Pulled)]
    with pytest.raises(RemoteProtocolError):  # (PULLED lost: the session times out)
        drv.run()
    dest = drv.dest
    assert dest.store.get(drv.engine.mid).state is HandoffState.COMMITTED and dest.vm.postcopy_state() is None
    dest.store._db.execute("UPDATE migrations SET state='pulling' WHERE mid=?", (drv.engine.mid,))  # (died before)
    s_proto, d_proto = SessionProtocol(Role.SOURCE, drv.engine.mid, recovery=True), SessionProtocol(
        Role.DESTINATION, recovery=True)
    d_proto.receive(s_proto.send(Query()))
    s_proto.receive(d_proto.send(Outcome(RecoveryOutcome.POSTCOPY.value, b"")))
    empty = np.zeros(0, np.uint64)
    d_eng, first = DestinationEngine.pulling(d_proto, 256, 1, empty, empty)
    dest.engine = d_eng
    sent = dest.perform(first)  # WANT (no page), then at once PULLED
    assert [type(m_decode(r)).__name__ for r in sent] == ["Want", "Pulled"]
    s_eng = SourceEngine.recovering(s_proto, src.info, MigrationParams())
    player = SourcePlayer(src, s_eng, drv.player.host.store)
    player.started = True
    for r in sent:
        player.queue.extend(s_eng.on_record(Record(r, 0, bytes(32)), 0.0))
    list(player.run())
    assert s_eng.step is Step.DONE and s_eng.stats.served_pages == 0


def m_decode(record: bytes):
    from palm_net.wire import messages as m
    return m.decode(record).body


# -- written for the mutation run over post-copy's safety code (docs/MUTATION.md)


def test_a_pure_post_copy_migration_switches_before_round_0(shm):
    """``postcopy_after`` 0 (proto 7.9 item 1): MISSING names every page, with round 0, the
    destination's own round too; gfn 0 is among them."""
    from palm_net.migration.params import MigrationParams
    from palm_net.migration.source import Step
    src, drv = _pc_pair(shm, MigrationParams(verify_digest=True, postcopy=True, postcopy_after=0))
    rounds: list[int] = []
    _watch(drv, Missing, lambda body: rounds.append(body.round))
    drv.run()
    assert rounds == [0] and drv.engine.step is Step.DONE and drv.engine.stats.postcopy_pages == 256
    assert drv.dest.vm is not None and drv.dest.vm.digest() == src.digest() and drv.dest.vm.postcopy_state() is None


def _watch(drv, kind: type, see) -> None:
    """Each message of ``kind`` the source sends is shown to ``see`` on its way (unchanged)."""
    from palm_net.wire import messages as m

    def deliver(record: bytes) -> bytes | None:
        try:
            body = m.decode(record).body
        except Exception:
            return record  # (a data record)
        if isinstance(body, kind):
            see(body)
        return record

    drv.deliver = deliver


def _split_missing(monkeypatch) -> None:
    """MISSING messages of bitmaps of at most 4 bytes (32 pages), at most 3 protected pages
    each (16384 and 256 on the wire)."""
    from palm_net.migration import postcopy_destination, postcopy_source
    for side in (postcopy_source, postcopy_destination):  # (the destination's bound on their number too)
        monkeypatch.setattr(side, "MAX_MISSING_BITMAP", 4)
        monkeypatch.setattr(side, "MAX_DATA_PAGES", 3)
    monkeypatch.setattr(postcopy, "SERVE_BULK", SERVE_SLICE)


@pytest.mark.parametrize("mark_batch", [65536, 20])
def test_missing_in_several_messages_marks_every_page(shm, monkeypatch, mark_batch):
    """Every page of several MISSING messages is marked: at the CPU state, or in batches
    as they come (``mark_batch``: 20 pages, so every message or two)."""
    from palm_net.migration import postcopy_destination
    from palm_net.migration.effects import MarkMissing
    from palm_net.migration.params import MigrationParams
    monkeypatch.setattr(postcopy_destination, "MARK_BATCH", mark_batch)
    marks: list[MarkMissing] = []
    real_mark = postcopy_destination.mark_missing

    def mark(eng):
        out = real_mark(eng)
        marks.extend(out)
        return out

    monkeypatch.setattr(postcopy_destination, "mark_missing", mark)
    from palm_net.migration.source import Step
    _split_missing(monkeypatch)
    src, drv = _pc_pair(shm, MigrationParams(verify_digest=True, **PC))
    drv.player.between = _dirty(src)
    seen: list[Missing] = []
    _watch(drv, Missing, seen.append)
    drv.run()
    eng = drv.engine
    assert len(seen) > 5 and eng.step is Step.DONE
    gfns = np.concatenate([bitmap_gfns(b.base, b.bitmap, 256, "MISSING") for b in seen])
    assert len(gfns) == 210 and bool((gfns[1:] > gfns[:-1]).all())
    assert eng.stats.served_pages == eng.stats.postcopy_pages == 210  # in slices of 64: counted across them
    assert len(marks) == 1 if mark_batch > 210 else len(marks) > 5  # (at most 32 pages a message)
    assert list(np.concatenate([k.gfns for k in marks])) == list(gfns)
    assert drv.dest.vm is not None and drv.dest.vm.digest() == src.digest() and drv.dest.vm.verify().ok




def _clear_first_protected(b, _):
    """The bitmap without the bit of the first protected page it names."""
    bits = bytearray(b.bitmap)
    off = int(np.frombuffer(b.gfns, "<u8")[0]) - b.base
    bits[off // 8] &= ~(1 << (off % 8))
    return replace(b, bitmap=bytes(bits))


@pytest.mark.parametrize("which,alter,code", [
    (0, lambda b, e: setattr(e, "keys_imported", False), ErrorCode.OUT_OF_STATE),  # KEYS' import not done
    (0, lambda b, e: setattr(e, "channels", 2), ErrorCode.OUT_OF_STATE),  # post-copy is on one channel
    (0, lambda b, e: replace(b, round=0), ErrorCode.ROLLBACK),  # a round before the pages'
    (1, lambda b, e: replace(b, round=b.round + 1), ErrorCode.ROLLBACK),  # another round
    (0, lambda b, e: replace(b, bitmap=bytes(len(b.bitmap))), ErrorCode.MALFORMED),  # no page
    (0, lambda b, e: replace(b, bitmap=b""), ErrorCode.MALFORMED),  # no page
    (0, lambda b, e: replace(b, base=e.npages - 1, bitmap=b"\x03"), ErrorCode.MALFORMED),  # past the VM's last page
    (1, lambda b, e: replace(b, base=int(e._missing[0][0][-1]), bitmap=b"\x01"),
     ErrorCode.MALFORMED),  # the last message's last gfn again
    (1, lambda b, e: replace(b, base=int(e._missing[0][0][0]), bitmap=b"\x01" + b.bitmap[1:]),
     ErrorCode.MALFORMED),  # the first message's first gfn, among others
    ("p", lambda b, e: replace(b, vers=b.vers[:-1]), ErrorCode.MALFORMED),  # not whole u64s
    ("p", lambda b, e: replace(b, vers=b.vers[:-8]), ErrorCode.MALFORMED),  # a version short
    ("p", lambda b, e: replace(b, gfns=b.gfns[:-8]), ErrorCode.MALFORMED),  # a protected gfn short
    ("p", lambda b, e: replace(b, tags=b.tags[:-1]), ErrorCode.MALFORMED),  # a MAC short
    ("p", lambda b, e: replace(b, vers=u64le(np.array([2**32 - 1])) + b.vers[8:]), ErrorCode.MALFORMED),  # MAX_VERSION
    ("p", _clear_first_protected, ErrorCode.MALFORMED),  # a protected page its bitmap does not name
    ("p", lambda b, e: replace(b, gfns=b.gfns[8:] + b.gfns[:8]), ErrorCode.MALFORMED),  # protected ones not ascending
])
def test_a_missing_that_does_not_fit_is_refused(shm, monkeypatch, which, alter, code):
    """A hostile source's MISSING (proto 7.9 item 1): the first, the second, or the first
    naming protected pages ("p") of a switch."""
    from palm_net.migration.params import MigrationParams
    from palm_net.wire import messages as m
    _split_missing(monkeypatch)
    src, drv = _pc_pair(shm, MigrationParams(postcopy=True, postcopy_after=2, downtime_limit=0.0))
    drv.player.between = _dirty(src)
    count, failed, fail, at = [0], [], drv.dest.fail, []
    drv.dest.fail = lambda exc: (failed.append(exc), fail(exc))[1]

    def deliver(record: bytes) -> bytes | None:
        try:
            msg = m.decode(record)
        except Exception:
            return record
        if isinstance(msg.body, Missing):
            count[0] += 1
            if not at and (count[0] == which + 1 if which != "p" else len(msg.body.gfns) >= 16):
                at.append(count[0] - 1)
                forged = alter(msg.body, drv.dest.engine)
                if forged is not None:
                    return m.encode(m.Message(msg.mid, msg.seq, forged))
        return record

    drv.deliver = deliver
    with pytest.raises(Exception) as ei:
        drv.run()
    assert len(failed) == 1 and isinstance(failed[0], RemoteProtocolError) and failed[0].code is code, ei.value
    assert len(drv.dest.engine._missing) == at[0]  # refused as it came (not at the CPU state): none of it taken


def test_missing_in_a_third_run_or_more_messages_than_the_vm_needs_is_refused():
    """The destination bounds MISSING (proto 7.9 item 1): two ascending runs at most (named
    before the pause, after it), and no more messages than the VM's pages need (a bitmap's
    span, or 256 protected pages, a message: 2 x (pages / 131072 + protected / 256 + 2)).
    Without them, one-page messages in any order would cost the destination a hypervisor
    call, or a sum over all before, each."""
    from types import SimpleNamespace

    from palm_net.migration import postcopy_destination
    from palm_net.migration.applied import Applied

    def engine(npages: int) -> SimpleNamespace:
        return SimpleNamespace(keys_imported=True, channels=1, round=4, switch_round=None, _missing=[],
                               _missing_tags=[], npages=npages, applied=Applied(npages), _marked=0,
                               _unmarked=0, _missing_runs=0, _named=None, begin=SimpleNamespace(protected_pages=0))

    def missing(eng: SimpleNamespace, gfn: int) -> None:
        m = Missing(5, gfn, b"\x01", b"", b"", b"")
        postcopy_destination.on_missing(eng, SimpleNamespace(get=lambda _: m), None)

    eng = engine(1_000_000)  # (up to 18 messages)
    for gfn in (10, 20, 5, 7):  # two runs
        missing(eng, gfn)
    with pytest.raises(RemoteProtocolError) as e:
        missing(eng, 6)  # a third
    assert e.value.code is ErrorCode.MALFORMED and eng._missing_runs == 2 and len(eng._missing) == 4
    eng = engine(1000)  # 2 x (0 + 0 + 2) messages at most
    for gfn in range(4):
        missing(eng, gfn)
    with pytest.raises(RemoteProtocolError):
        missing(eng, 4)
    assert eng._unmarked == 4 and len(eng._missing) == 4


def test_a_missing_naming_a_page_no_protected_process_owns_as_protected_is_refused():
    """MISSING's protected pages (their versions kept for the rollback check) must be in KEYS'
    layout: an unprotected page named as one is refused (``integrity``), not given a slot;
    and none at a version older than one received (``rollback``)."""
    from types import SimpleNamespace

    from palm_net.migration import postcopy_destination
    from palm_net.migration.applied import Applied

    applied = Applied(1000)
    applied.set_layout([(16, 8)])
    eng = SimpleNamespace(keys_imported=True, channels=1, round=4, switch_round=None, _missing=[], _missing_tags=[],
                          npages=1000, applied=applied, _marked=0, _unmarked=0, _missing_runs=0, _named=None,
                          begin=SimpleNamespace(protected_pages=8))

    def missing(gfn: int) -> None:
        m = Missing(5, gfn, b"\x01", u64le(np.array([gfn])), u64le(np.array([3])), bytes(16))
        postcopy_destination.on_missing(eng, SimpleNamespace(get=lambda _: m), None)

    missing(17)
    assert applied.version(1) == 3 and bool(applied.arrived[17])
    with pytest.raises(RemoteProtocolError) as e:
        missing(24)  # one past the process's pages
    assert e.value.code is ErrorCode.INTEGRITY and len(eng._missing) == 1
    applied.apply(applied.slots(np.array([19], np.uint64)), np.array([10], np.uint64), np.array([19], np.uint64))
    with pytest.raises(RemoteProtocolError) as e:
        missing(19)  # received at version 10 before the switch: named at 3, a rollback
    assert e.value.code is ErrorCode.ROLLBACK and len(eng._missing) == 1 and applied.version(3) == 10


def test_missing_names_the_dirty_normal_pages_before_the_pause_and_the_rest_after(shm):
    """Proto 7.9 item 1: the last round's dirty normal pages are named while the VM still
    runs (their version is the round's); its protected pages, and what the guest wrote
    since, once it is paused (their metadata is final then).  Each page once."""
    from palm_net.migration.params import MigrationParams
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    seen: list[tuple[bool, Missing]] = []
    _watch(drv, Missing, lambda body: seen.append((src.state == "running", body)))
    drv.run()
    named = [(running, bitmap_gfns(b.base, b.bitmap, 256, "M"), b) for running, b in seen]
    before = np.concatenate([g for running, g, _ in named if running])
    after = np.concatenate([g for running, g, _ in named if not running])
    owners = src.arrays.owners
    assert len(before) and not owners[before].any() and all(not b.gfns for running, _, b in named if running)
    assert owners[after].any() and not set(before.tolist()) & set(after.tolist())
    eng = drv.engine
    assert len(before) + len(after) == eng.stats.postcopy_pages == eng.stats.served_pages
    assert drv.dest.vm is not None and drv.dest.vm.digest() == src.digest() and drv.dest.vm.verify().ok


def _fake_source(missing: np.ndarray, round_no: int = 5):
    from types import SimpleNamespace
    return SimpleNamespace(missing=missing, unnamed=missing, round=round_no, _send=lambda body: body,
                           _request=lambda *a: [])


@pytest.mark.parametrize("kinds", [
    "p" * 3 + "n" * 30,  # 3 protected, then normal pages past the bitmap's span: a split at 16, not at 3
    "p" * 3 + "n" * 60,  # and the next message too (its MACs counted from its own first page)
    "p" * 7 + "n" * 5 + "p" * 4,
    "n" * 15 + "p" * 5,
    "np" * 20,
    "p" * 9,
    "n" * 40,
])
def test_missing_is_split_at_the_first_page_that_would_pass_a_limit(monkeypatch, kinds):
    """The source's MISSING messages (proto 7.9 item 1): each as full as the limits allow
    (a bitmap's span, protected pages a message), the MACs in order with their pages."""
    from palm_net.migration import postcopy_source
    from palm_net.migration.effects import Metadata
    from palm_net.wire.pages import KIND_NORMAL, KIND_PROTECTED, TAG_LEN
    monkeypatch.setattr(postcopy_source, "MAX_MISSING_BITMAP", 4)  # 32 pages: 16 of these, a gfn every other
    monkeypatch.setattr(postcopy_source, "MAX_DATA_PAGES", 3)
    n = len(kinds)
    gfns = np.arange(3, 3 + 2 * n, 2, dtype=np.uint64)
    prot = np.array([k == "p" for k in kinds])
    tags = b"".join(bytes([i % 251]) * TAG_LEN for i in np.flatnonzero(prot))
    kind_bytes = np.where(prot, KIND_PROTECTED, KIND_NORMAL).astype(np.uint8).tobytes()
    out = postcopy_source.metadata(_fake_source(gfns), Metadata(kind_bytes, np.where(prot, 9, 0).astype(np.uint64),
                                                                tags), 0.0)
    expected: list[list[int]] = [[]]  # greedy: a message ends where the next page would pass a limit
    for i in range(n):
        cur = expected[-1]
        if cur and (gfns[i] - gfns[cur[0]] >= 32 or (prot[i] and sum(prot[j] for j in cur) == 3)):
            expected.append(cur := [])
        cur.append(i)
    assert [list(bitmap_gfns(b.base, b.bitmap, 1000, "M")) for b in out] == [[int(gfns[i]) for i in c]
                                                                             for c in expected]
    for b, c in zip(out, expected):
        assert b.round == 5 and b.base == gfns[c[0]] and len(b.bitmap) <= 4
        assert list(np.frombuffer(b.gfns, "<u8")) == [int(gfns[i]) for i in c if prot[i]]
        assert list(np.frombuffer(b.vers, "<u8")) == [9 for i in c if prot[i]]
        assert b.tags == b"".join(bytes([i % 251]) * TAG_LEN for i in c if prot[i])


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 4999), min_size=1), st.integers(0, 6000), st.binary(max_size=64))
def test_gfn_bitmaps_round_trip_and_any_bitmap_names_only_pages_of_the_vm(gfns, base, bitmap):
    arr = np.array(sorted(gfns), np.uint64)
    b, bm = gfn_bitmap(arr)
    assert list(bitmap_gfns(b, bm, 5000, "M")) == list(arr) and len(bm) == (int(arr[-1]) - b) // 8 + 1
    try:
        out = bitmap_gfns(base, bitmap, 5000, "M")
    except RemoteProtocolError as e:
        assert e.code is ErrorCode.MALFORMED
        return
    assert len(out) and int(out[0]) >= base and int(out[-1]) < 5000 and bool((out[1:] > out[:-1]).all())


def test_a_gfn_bitmap_round_trips_and_names_only_pages_of_the_vm():
    gfns = np.array([5, 6, 13, 40], np.uint64)
    base, bitmap = gfn_bitmap(gfns)
    assert base == 5 and bitmap == bytes([0b11, 0b1, 0, 0, 0b1000]) and len(bitmap) == 5
    assert list(bitmap_gfns(base, bitmap, 41, "M")) == [5, 6, 13, 40]
    for bad in (bitmap, b"", bytes(5)):  # gfn 40 outside a VM of 40 pages; no page at all
        with pytest.raises(RemoteProtocolError):
            bitmap_gfns(base, bad, 40, "M")
    assert list(bitmap_gfns(0, b"\x00\x02", 10, "M")) == [9]  # leading clear bits are allowed


def test_the_page_server_refuses_pages_out_of_order_and_slices_as_documented():
    for bad in ([5, 3], [3, 3], [1, 3, 2]):
        with pytest.raises(ValueError):
            PageServer(np.array(bad, np.uint64), 1)
    n = 4 * SERVE_BULK
    server = PageServer(np.arange(n, dtype=np.uint64), 1)
    assert len(server.next_slice()) == SERVE_BULK  # no FETCH waits: a bulk slice
    server.fetch(np.array([n - 1], np.uint64))
    first = server.next_slice()
    assert len(first) == SERVE_SLICE and n - 1 in first  # a FETCH waits: a small slice, the fetched page in it
    asked = np.arange(2 * SERVE_BULK, 2 * SERVE_BULK + 100, dtype=np.uint64)[::-1].copy()
    server.fetch(np.sort(asked))
    assert list(server.next_slice()) == list(np.sort(asked)[:SERVE_SLICE])  # the first 64 asked, only they
    rest = server.next_slice()  # the other 36 asked, and the push's next ones
    assert len(rest) == SERVE_SLICE and set(np.sort(asked)[SERVE_SLICE:].tolist()) <= set(rest.tolist())


def test_the_puller_knows_a_page_above_every_missing_one_is_not_missing():
    puller = Puller(4, np.array([2, 5, 9], np.uint64), np.array([4, 4, 4], np.uint64))
    with pytest.raises(RemoteProtocolError) as e:
        puller.take(_pages([9, 10], [4, 4]))
    assert e.value.code is ErrorCode.REPLAY and puller.remaining == 3
    assert puller.faults([10, 11]) is None
    assert np.frombuffer(puller.faults([9, 10]) or b"", "<u8").tolist() == [9]


def _want(eng, d, rnd: int, gfns: list[int], more: bool, now: float = 0.0):
    from palm_net.channel.records import Record
    return eng.on_record(Record(d.send(Want(rnd, u64le(np.array(gfns, np.uint64)), more)), 0, bytes(32)), now)


def test_wants_are_bounded_by_the_messages_the_vm_s_pages_need_and_ascend_across_messages():
    eng, d = _recovering_engine(npages=3000)  # two WANTs at most (2048 a message)
    _want(eng, d, 1, [1], True)
    _want(eng, d, 1, [2], True)
    with pytest.raises(RemoteProtocolError) as e:
        _want(eng, d, 1, [3], True)
    assert e.value.code is ErrorCode.MALFORMED
    eng, d = _recovering_engine()
    _want(eng, d, 1, [4, 7], True)
    with pytest.raises(RemoteProtocolError) as e:
        _want(eng, d, 1, [7, 9], False)  # not above the last message's
    assert e.value.code is ErrorCode.MALFORMED
    eng, d = _recovering_engine()
    _want(eng, d, 1, [4, 7], True)
    with pytest.raises(RemoteProtocolError) as e:
        eng.on_record(_rec(d.send(Pulled(b""))), 0.0)  # WANTs still due: serving has not begun
    assert e.value.code is ErrorCode.OUT_OF_STATE


def _rec(record: bytes):
    from palm_net.channel.records import Record
    return Record(record, 0, bytes(32))


def test_fetches_before_serving_is_durable_are_kept_up_to_the_vm_s_pages():
    from palm_net.migration.effects import Served
    eng, d = _recovering_engine(npages=8)
    _want(eng, d, 1, [1, 2, 3, 4, 5, 6], False)
    for g in (6, 5, 4, 3, 2, 1, 6, 5, 4, 3, 2, 1):
        assert eng.on_record(_rec(d.send(Fetch(u64le(np.array([g], np.uint64))))), 0.0) == []
    assert sum(map(len, eng._early_fetches)) == 8 and eng.stats.fetched_pages == 12
    out = eng.on_result(Served(True), 1.0)
    first = [e for e in out if type(e).__name__ == "SendPages"]
    assert first and list(first[0].gfns)[:6] == [1, 2, 3, 4, 5, 6]


def test_a_fetch_after_every_page_went_sends_nothing_and_waits_for_pulled_anew():
    """The last pages on their way, a vCPU faults on one of them: its FETCH is ignored, and
    PULLED is due from then (the destination is there)."""
    from palm_net.migration.effects import PagesSent, Served
    from palm_net.migration.source import Step
    eng, d = _recovering_engine(npages=8)
    _want(eng, d, 1, [2, 5], False)
    out = eng.on_result(Served(True), 1.0)
    assert [type(e).__name__ for e in out] == ["Note", "SendPages"]
    assert eng.on_result(PagesSent(), 2.0) == [] and eng.step is Step.SERVING and eng._awaiting is None
    assert eng.timer() == 2.0 + eng.params.reply_timeout
    assert eng.on_record(_rec(d.send(Fetch(u64le(np.array([5], np.uint64))))), 7.0) == []
    assert eng.timer() == 7.0 + eng.params.reply_timeout


@pytest.mark.parametrize("early", [False, True])
def test_a_recovery_that_wants_no_page_waits_for_pulled_only_so_long(early):
    """WANT names no page: PULLED is due at once (and taken if it came before SERVING was durable)."""
    from palm_net.migration.effects import Served
    from palm_net.migration.source import Step
    eng, d = _recovering_engine(npages=8)
    _want(eng, d, 1, [], False)
    pulled = Pulled(b"\x01" * 32)
    if early:
        assert eng.on_record(_rec(d.send(pulled)), 2.0) == []
    assert [type(e).__name__ for e in eng.on_result(Served(True), 3.0)] == ["Note"]
    if not early:
        assert eng.timer() == 3.0 + eng.params.reply_timeout and eng.step is Step.SERVING
        eng.on_record(_rec(d.send(pulled)), 4.0)
    assert eng.pulled == pulled and eng.step is Step.DONE


# -- waits begun before a recovery session (issue 26)


def test_more_pages_waited_for_than_one_fetch_holds_are_all_asked_for():
    """A recovery finds more accesses waiting than MAX_FETCH (64): FETCHes of 64, none left out."""
    from palm_net.migration.destination import DestinationEngine
    from palm_net.wire.messages import MAX_FETCH, decode
    _, d = _recovering_engine()
    missing = np.arange(0, 400, 2, dtype=np.uint64)
    eng, _ = DestinationEngine.pulling(d, 4096, 1, missing, np.ones(len(missing), np.uint64))
    waited = [int(g) for g in missing[-150:]]
    bodies = [decode(e.data).body for e in eng.on_fault(waited)]
    asked = [int(g) for b in bodies for g in np.frombuffer(b.gfns, "<u8")]
    assert [len(b.gfns) // 8 for b in bodies] == [MAX_FETCH, MAX_FETCH, 150 - 2 * MAX_FETCH] and asked == waited
    assert eng.on_fault(waited) == []  # each asked once


def test_a_recovery_serves_a_page_waited_for_before_it_began_ahead_of_lower_ones(shm, monkeypatch):
    """The link broke right after RUNNING (nothing served arrived), with a vCPU waiting for
    the highest missing page: the recovery session's WANTs, then its FETCH, and that page
    goes in the first slice, ahead of the lower pages of later slices."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", SERVE_SLICE)  # (slices of 64 pages: several of them)
    from palm_net.channel.records import Record
    from palm_net.migration.destination import DestinationEngine
    from palm_net.migration.params import MigrationParams
    from palm_net.migration.source import SourceEngine, Step
    from palm_net.testing.engines import SourcePlayer
    src, drv = _pc_pair(shm, MigrationParams(**PC))
    drv.player.between = _dirty(src)
    drv.deliver = lambda record: None if drv.dest.engine.puller is not None else record  # the link is gone
    with pytest.raises(RemoteProtocolError):  # (PULLED never comes: the session times out)
        drv.run()
    dest = drv.dest
    rnd, missing, vers = dest.vm.postcopy_state()
    high = int(missing[-1])
    s_proto, d_proto = SessionProtocol(Role.SOURCE, drv.engine.mid, recovery=True), SessionProtocol(
        Role.DESTINATION, recovery=True)
    d_proto.receive(s_proto.send(Query()))
    s_proto.receive(d_proto.send(Outcome(RecoveryOutcome.POSTCOPY.value, b"")))
    d_eng, first = DestinationEngine.pulling(d_proto, 256, rnd, missing, vers)
    dest.engine = d_eng
    opening = dest.perform(first) + dest.perform(d_eng.on_fault([high]))  # the shell's: its WANTs, then the wait
    assert [type(m_decode(r)).__name__ for r in opening] == ["Want", "Fetch"]
    s_eng = SourceEngine.recovering(s_proto, src.info, MigrationParams())
    slices: list[list[int]] = []

    def reply(record: bytes, before: bytes) -> list[bytes]:
        try:
            body = m_decode(record)
        except RemoteProtocolError:
            body = None  # a data record
        if isinstance(body, Pages):
            slices.append([int(g) for g in np.frombuffer(body.gfns, "<u8")])
        return dest.feed(record, before)

    player = SourcePlayer(src, s_eng, drv.player.host.store, reply)
    player.started = True
    for r in opening:
        player.queue.extend(s_eng.on_record(Record(r, 0, bytes(32)), 0.0))
    list(player.run())
    assert s_eng.step is Step.DONE and len(slices) > 2 and high in slices[0]
    assert max(slices[-1]) < high  # the last slice's lower pages came after it
    assert dest.vm.digest() == src.digest() and dest.store.get(s_eng.mid).state is HandoffState.COMMITTED
