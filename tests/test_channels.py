"""More channels (proto 7.8): a page migration carried on the main session and N-1 attested
DATA sessions bound to it; each gfn on its own channel; a lost, tampered or foreign data
session fails the whole migration closed, exactly as one session does."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing
from nacl.signing import SigningKey

from palm_net.channel.handshake import AttestedHandshake, Purpose
from palm_net.channel.records import Record
from palm_net.channel.transport import SecureChannel
from palm_net.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from palm_net.migration import runner
from palm_net.migration.destination import DestinationEngine, Lane
from palm_net.migration.effects import (
    Aborted,
    AbortForever,
    ApplyPages,
    ImportKeys,
    ImportProtection,
    KeysImported,
    Opened,
    OpenIncoming,
    Send,
    Settle,
    Settled,
)
from palm_net.migration.params import MigrationParams
from palm_net.testing.cluster import LocalCluster
from palm_net.testing.hostile import HostilePeer
from palm_net.testing.proxy import FaultProxy, Rule
from palm_net.wire import messages
from palm_net.wire.messages import (
    MAX_CHANNELS,
    Abort,
    Begin,
    Bind,
    Channels,
    Complete,
    Context,
    CpuState,
    Keys,
    Pages,
    RoundEnd,
    lane_of,
)
from palm_net.wire.pages import PageBatch, PageRange, split_lanes
from palm_net.wire.protocol import Role, SessionProtocol, State
from tests.test_destination_engine import FakeStream


@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("workload", ["idle", "random:3000+protected:1000"])
async def test_a_migration_on_n_channels_moves_every_page(cluster, channels, workload):
    a, b = cluster["a"], cluster["b"]
    vm = a.registry.create_model("vm1", 8 << 20, protected=2, workload=workload, seed=7)
    await trio.sleep(0.1)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True, channels=channels))
    assert res.ok, res.error
    assert res.stats.channels == channels and res.stats.digest
    assert cluster.running_copies("vm1") == ["b"]
    moved = b.vms["vm1"]
    report = moved.verify()
    assert report.ok and report.checked + report.in_process_view == moved.info.protected_pages
    assert b.store.get(res.mid).state == "committed"
    del vm


# --------------------------------------------------------------------------
# The destination engine's checks (sans-IO)

MID = bytes(range(16))


class _Dest:
    """A destination engine past BEGIN, KEYS and CHANNELS for a VM of ``npages`` zero
    pages, fed hand-made records of the main session and its data sessions."""

    def __init__(self, npages: int = 512, count: int = 2) -> None:
        self.eng = DestinationEngine(False, 1 << 20)
        self.src = SessionProtocol(Role.SOURCE, MID)
        self.n = 0
        assert isinstance(self.main(Begin("v", bytes(16), npages, 0, 0, 1, False, False, "model", b""))[0],
                          OpenIncoming)
        self.src.receive(self.eng.on_result(Opened(0))[0].data)  # ACCEPT
        assert isinstance(self.main(Keys(b"k"))[0], ImportKeys)
        self.eng.on_result(KeysImported(()))
        assert self.main(Channels(count)) == []
        self.count = count
        self.lanes: dict[int, tuple[SessionProtocol, Lane, list[int]]] = {}

    def main(self, body) -> list:
        rec = Record(self.src.send(body), self.n, bytes(32))
        self.n += 1
        return self.eng.on_record(rec)

    def bind(self, channel: int, count: int | None = None) -> Lane:
        proto = SessionProtocol(Role.SOURCE, MID, data=True)
        lane = self.eng.bind(Record(proto.send(Bind(channel, count or self.count)), 0, bytes(32)), False)
        self.lanes[channel] = (proto, lane, [1])
        return lane

    def on(self, channel: int, body, authenticated: bool = True) -> list:
        proto, lane, n = self.lanes[channel]
        rec = Record(proto.send(body), n[0], bytes(32), authenticated=authenticated)
        n[0] += 1
        return self.eng.on_lane_record(lane, rec)

    def zero_pages(self, gfns: list[int], round_no: int = 0) -> Pages:
        g = np.array(gfns, np.uint64)
        return PageBatch(g, bytes(len(g)), np.full(len(g), round_no, np.uint64), b"").message(round_no)


def test_a_data_session_binds_once_with_the_announced_count():
    d = _Dest()
    with pytest.raises(RemoteProtocolError) as exc:
        d.bind(1, count=3)
    assert exc.value.code is ErrorCode.OUT_OF_STATE
    d.bind(1)
    with pytest.raises(RemoteProtocolError) as exc:
        d.bind(1)
    assert exc.value.code is ErrorCode.REPLAY
    other = SessionProtocol(Role.SOURCE, bytes(16), data=True)  # another migration's id
    with pytest.raises(RemoteProtocolError) as exc:
        d.eng.bind(Record(other.send(Bind(1, 2)), 0, bytes(32)), False)
    assert exc.value.code is ErrorCode.WRONG_MIGRATION
    plain = SessionProtocol(Role.SOURCE, MID, data=True)  # a plain-mode data session for a secure migration
    with pytest.raises(RemoteProtocolError) as exc:
        d.eng.bind(Record(plain.send(Bind(2, 2 + 1)), 0, bytes(32)), True)
    assert exc.value.code is ErrorCode.MODE_MISMATCH
    clear = SessionProtocol(Role.SOURCE, MID, data=True)  # BIND itself in a clear record
    with pytest.raises(RemoteProtocolError) as exc:
        d.eng.bind(Record(clear.send(Bind(1, 2)), 0, bytes(32), authenticated=False), False)
    assert exc.value.code is ErrorCode.UNAUTHENTICATED


def test_bind_names_a_channel_from_1_to_count_minus_1():
    """Bind's own check: channel 0 is the main session, and channel == count is none of them."""
    assert Bind(1, 2).channel == 1 and Bind(15, 16).channel == 15
    for channel, count in ((0, 2), (2, 2), (16, 16)):
        with pytest.raises(LocalProtocolError) as exc:
            Bind(channel, count)
        assert exc.value.code is ErrorCode.MALFORMED


def test_a_gfn_travels_on_its_own_channel_only():
    """Each page on one ordered session keeps its versions in order (proto 7.8)."""
    d = _Dest()
    d.bind(1)
    with pytest.raises(RemoteProtocolError) as exc:
        d.on(1, d.zero_pages([255]))  # block 0: channel 0's
    assert exc.value.code is ErrorCode.MALFORMED and "channel 1" in exc.value.detail
    d2 = _Dest()
    with pytest.raises(RemoteProtocolError) as exc:
        d2.main(d2.zero_pages([256]))  # block 1: channel 1's
    assert exc.value.code is ErrorCode.MALFORMED
    d3 = _Dest()
    d3.bind(1)
    assert [type(e) for e in d3.on(1, d3.zero_pages([256, 300]))] == [ApplyPages]
    assert [type(e) for e in d3.main(d3.zero_pages([0, 255]))] == [ApplyPages]


def test_a_pages_round_never_goes_back_on_its_own_channel():
    """A zero or normal page's version is its round (proto 6), so a channel's rounds never going
    back is what refuses an older copy of it (the destination keeps no version for it)."""
    for channel, gfn in ((0, 0), (1, 256)):
        d = _Dest()
        d.bind(1)
        send = d.main if channel == 0 else lambda body: d.on(1, body)
        g = np.array([gfn], np.uint64)
        send(PageBatch(g, b"\x00", np.ones(1, np.uint64), b"").message(1))
        with pytest.raises(RemoteProtocolError) as exc:
            send(PageBatch(g, b"\x00", np.zeros(1, np.uint64), b"").message(0))
        assert exc.value.code is ErrorCode.ROLLBACK


def test_round_done_waits_for_every_channels_round_end():
    d = _Dest(count=3)
    d.bind(1)
    d.bind(2)
    assert d.main(RoundEnd(0, 256, 0)) == []
    assert d.on(1, RoundEnd(0, 256, 0)) == []
    assert [type(e) for e in d.on(2, RoundEnd(0, 0, 0))] == [Settle]


def test_a_data_sessions_next_round_end_does_not_settle_the_round_again():
    """Once settled, ROUND_DONE of the next round waits for the main session's ROUND_END again."""
    d = _Dest()
    d.bind(1)
    assert d.main(RoundEnd(0, 256, 0)) == []
    assert [type(e) for e in d.on(1, RoundEnd(0, 256, 0))] == [Settle]
    assert [type(e) for e in d.eng.on_result(Settled())] == [Send]  # ROUND_DONE 0
    assert d.on(1, RoundEnd(1, 0, 0)) == []  # channel 1 ahead of the main session
    assert [type(e) for e in d.main(RoundEnd(1, 0, 0))] == [Settle]


def _all_but_completes() -> _Dest:
    """Every page of a 512-page VM in (channel 0's on the main session, channel 1's on its
    data session), the CPU state and the blob, and the main session's COMPLETE."""
    d = _Dest()
    d.bind(1)
    d.main(d.zero_pages(list(range(256))))
    d.on(1, d.zero_pages(list(range(256, 512))))
    d.main(CpuState(b"cpu"))
    d.main(Context(0, 1, b""))
    assert d.main(Complete(d.n, 1, bytes(32))) == []  # every page is in, but channel 1 is not complete
    return d


def test_ready_waits_for_every_data_sessions_complete_and_its_counts():
    d = _all_but_completes()
    with pytest.raises(RemoteProtocolError) as exc:
        d.on(1, Complete(2, 2, bytes(32)))  # one page record sent on it, not two
    assert exc.value.code is ErrorCode.INCOMPLETE
    d2 = _all_but_completes()
    assert [type(e) for e in d2.on(1, Complete(2, 1, bytes(32)))] == [ImportProtection]


def test_a_data_sessions_complete_binds_its_own_records():
    d = _Dest()
    d.bind(1)
    d.on(1, d.zero_pages([256]))
    with pytest.raises(RemoteProtocolError) as exc:
        d.on(1, Complete(3, 1, bytes(32)))  # two records came before it, not three
    assert exc.value.code is ErrorCode.INCOMPLETE


def test_channels_come_before_the_first_page_and_once():
    d = _Dest()
    with pytest.raises(RemoteProtocolError):
        d.main(Channels(2))
    d2 = DestinationEngine(False, 1 << 20)
    src = SessionProtocol(Role.SOURCE, MID)
    d2.on_record(Record(src.send(Begin("v", bytes(16), 512, 0, 0, 1, False, False, "model", b"")), 0, bytes(32)))
    src.receive(d2.on_result(Opened(0))[0].data)  # ACCEPT
    d2.on_record(Record(src.send(PageBatch(np.array([0], np.uint64), b"\x00", np.zeros(1, np.uint64), b"")
                                 .message(0)), 1, bytes(32)))
    with pytest.raises(RemoteProtocolError) as exc:
        d2.on_record(Record(src.send(Channels(2)), 2, bytes(32)))
    assert exc.value.code is ErrorCode.OUT_OF_STATE
    assert not d2.binding  # no CHANNELS, no keys: a data session is not bound
    with pytest.raises(RemoteProtocolError) as exc:
        d2.bind(Record(SessionProtocol(Role.SOURCE, MID, data=True).send(Bind(1, 2)), 0, bytes(32)), False)
    assert exc.value.code is ErrorCode.OUT_OF_STATE


def _bind_refused(d: _Dest) -> None:
    assert not d.eng.binding
    with pytest.raises(RemoteProtocolError) as exc:
        d.bind(1)
    assert exc.value.code is ErrorCode.OUT_OF_STATE


def test_a_data_session_binds_from_channels_and_keys_until_the_session_has_an_outcome():
    """``binding`` (a property: mutmut leaves it alone, so each change was made by hand): a
    BIND is taken once CHANNELS and the keys are in, still after CPU_STATE and after the
    main session's COMPLETE (a late data session's COMPLETE is what READY waits for), and
    never before the keys (its pages would come before what checks them, and KEYS is
    refused only after the main session's first page), nor once the session is aborted
    or its abort found it committed."""
    eng = DestinationEngine(False, 1 << 20)
    src = SessionProtocol(Role.SOURCE, MID)
    eng.on_record(Record(src.send(Begin("v", bytes(16), 512, 0, 0, 1, False, False, "model", b"")), 0, bytes(32)))
    src.receive(eng.on_result(Opened(0))[0].data)  # ACCEPT
    assert isinstance(eng.on_record(Record(src.send(Keys(b"k")), 1, bytes(32)))[0], ImportKeys)
    eng.on_result(KeysImported(()))
    assert not eng.binding  # the keys, no CHANNELS (a BIND's count, at least 2, is refused anyway)
    eng2 = DestinationEngine(False, 1 << 20)
    src2 = SessionProtocol(Role.SOURCE, MID)
    eng2.on_record(Record(src2.send(Begin("v", bytes(16), 512, 0, 0, 1, False, False, "model", b"")), 0, bytes(32)))
    src2.receive(eng2.on_result(Opened(0))[0].data)
    assert eng2.on_record(Record(src2.send(Channels(2)), 1, bytes(32))) == []  # CHANNELS before KEYS
    assert not eng2.binding
    with pytest.raises(RemoteProtocolError) as exc:
        eng2.bind(Record(SessionProtocol(Role.SOURCE, MID, data=True).send(Bind(1, 2)), 0, bytes(32)), False)
    assert exc.value.code is ErrorCode.OUT_OF_STATE

    stopped = _Dest()
    stopped.main(stopped.zero_pages(list(range(256))))
    stopped.main(CpuState(b"cpu"))
    assert stopped.eng.binding
    stopped.bind(1)  # after CPU_STATE
    late = _Dest()
    late.main(late.zero_pages(list(range(256))))
    late.main(CpuState(b"cpu"))
    late.main(Context(0, 1, b""))
    assert late.main(Complete(late.n, 1, bytes(32))) == []
    assert late.eng.binding
    late.bind(1)  # after the main session's COMPLETE: its pages and COMPLETE still make READY
    late.on(1, late.zero_pages(list(range(256, 512))))
    assert [type(e) for e in late.on(1, Complete(2, 1, bytes(32)))] == [ImportProtection]

    aborted = _Dest()  # the source's ABORT, its abort not yet recorded
    assert [type(e) for e in aborted.main(Abort("cancelled", "x", b""))] == [AbortForever]
    _bind_refused(aborted)
    committed = _Dest()  # a failure here, whose abort found the row committed: the session stays STREAMING
    assert [type(e) for e in committed.eng.fail(RemoteProtocolError(ErrorCode.MALFORMED, "x"))] == [AbortForever]
    assert committed.eng.on_result(Aborted(b"", aborted=False)) == []
    assert committed.eng.state is State.STREAMING and committed.eng.outcome is not None
    _bind_refused(committed)


def test_the_lanes_of_a_round_cover_it_once_each_in_ascending_order():
    for n in (1, 255, 256, 257, 1000, 4096 + 17):
        for count in (2, 3, 16):
            shares = split_lanes(PageRange(n), count)
            got = np.concatenate([np.asarray(s) for s in shares])
            assert sorted(got.tolist()) == list(range(n))
            for i, share in enumerate(shares):
                a = np.asarray(share)
                assert len(a) == len(share) and (lane_of(a, count) == i).all() and (np.diff(a.astype(int)) > 0).all()
                assert a.dtype == np.uint64 and share[1:3].dtype == np.uint64  # gfns, as PageRange gives them
            dirty = np.array(sorted({(7 * k * k) % n for k in range(50)}), np.uint64)
            assert sorted(np.concatenate(split_lanes(dirty, count)).tolist()) == dirty.tolist()


def test_a_data_sessions_control_message_in_a_clear_record_is_refused():
    """on_lane_record passes the record's authentication on: ROUND_END in the clear is refused."""
    d = _Dest()
    d.bind(1)
    with pytest.raises(RemoteProtocolError) as exc:
        d.on(1, RoundEnd(0, 0, 0), authenticated=False)
    assert exc.value.code is ErrorCode.UNAUTHENTICATED


# --------------------------------------------------------------------------
# Whole migrations: a foreign, lost or tampered data session


async def _migrating(cluster, nursery, params: MigrationParams, to: str | None = None):
    """Starts a 16 MiB random VM's migration a -> b (paced, so that it lasts); returns its
    result holder and b's run once the run has bound its data sessions."""
    a, b = cluster["a"], cluster["b"]
    a.registry.create_model("vm1", 16 << 20, protected=1, fill="random", seed=3)
    out = {}

    async def go():
        out["res"] = await a.outgoing.migrate("vm1", to or cluster.addr("b"), params)

    nursery.start_soon(go)
    with trio.fail_after(20):
        while not any(len(r.engine.lanes) == r.engine.channels - 1 > 0 for r in b.incoming.runs.values()):
            await trio.sleep(0.005)
    return out, next(iter(b.incoming.runs.values()))


async def _settled(agent, mid: bytes) -> None:
    """The destination's session ended: its row aborted, nothing of the VM left there."""
    with trio.fail_after(10):
        while agent.incoming.runs or agent.store.get(mid) is None or agent.store.get(mid).state != "aborted":
            await trio.sleep(0.01)
    assert "vm1" not in agent.vms


async def _result(out) -> object:
    with trio.fail_after(60):
        while "res" not in out:
            await trio.sleep(0.01)
    return out["res"]


async def test_a_plain_mode_migration_on_channels_seals_each_data_sessions_messages(nursery):
    """In the plain mode BIND, ROUND_END and COMPLETE on a data session still go sealed (_send_on)."""
    from tests.test_hostile_peer import plain_cluster

    c = await plain_cluster(nursery)
    try:
        vm = c["a"].registry.create_model("vm1", 4 << 20, fill="random", seed=3)
        digest = vm.digest()
        res = await c["a"].outgoing.migrate("vm1", c.addr("b"), MigrationParams(plain=True, channels=2))
        assert res.ok, res.error
        assert res.stats.channels == 2 and c.running_copies("vm1") == ["b"] and c["b"].vms["vm1"].digest() == digest
    finally:
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


async def test_another_certified_agent_cannot_join_a_migration(cluster, nursery):
    """Its BIND names the migration, but its key is not the migration's source: closed, and the
    migration goes on untouched (bound, it would take channel 1 twice and fail it)."""
    params = MigrationParams(channels=2, bandwidth=16 << 20)
    out, run = await _migrating(cluster, nursery, params)
    evil = HostilePeer(cluster.authority, cluster.measurement)
    ch = await evil.session(cluster.members["b"].port, Purpose.DATA)
    await ch.send(SessionProtocol(Role.SOURCE, run.engine.mid, data=True).send(Bind(1, 2)))
    with trio.fail_after(15), pytest.raises(RemoteProtocolError):
        await ch.receive()  # closed without an answer
    res = await _result(out)
    assert res.ok, res.error
    assert cluster["b"].incoming.counters.get("refused-data-session") == 1
    assert cluster.running_copies("vm1") == ["b"]


@pytest.mark.parametrize("action", ["flip", "cut"])
async def test_a_tampered_or_lost_data_session_fails_the_migration_closed(cluster, action):
    """A record of a data session altered, or the session cut in its middle: the whole migration
    fails as with one session, the VM runs on at the source and nothing is left at the destination."""
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port),
                       [Rule("c2s", 12, action, connection=1, bit=200)])  # (record 9 of channel 1)
    await cluster.nursery.start(proxy.serve)
    cluster["a"].registry.create_model("vm1", 16 << 20, protected=1, fill="random", seed=3)
    res = await cluster["a"].outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams(channels=2))
    assert not res.ok and proxy.rules[0].fired
    assert res.runs_on == "source" and cluster.running_copies("vm1") == ["a"]
    assert cluster["a"].vms["vm1"].verify().ok
    await _settled(cluster["b"], res.mid)


async def test_a_data_session_must_reach_the_migrations_destination(nursery):
    """A data session that reaches another certified agent (here c, as a redirected address
    would): the source fails the migration before it sends that session anything, and runs on."""
    async with LocalCluster.started(nursery, ("a", "b", "c")) as c3:
        a = c3["a"]
        direct = a.outgoing.connect

        async def redirected(addr, plain, cipher, purpose):
            return await direct(c3.addr("c") if purpose is Purpose.DATA else addr, plain, cipher, purpose)

        a.outgoing.connect = redirected
        a.registry.create_model("vm1", 4 << 20, protected=1, fill="random", seed=3)
        res = await a.outgoing.migrate("vm1", c3.addr("b"), MigrationParams(channels=2))
        assert not res.ok and "key-mismatch" in res.error and "'c'" in res.error
        assert res.runs_on == "source" and c3.running_copies("vm1") == ["a"]
        with trio.fail_after(10):  # c got no BIND, only the session's close
            while c3["c"].incoming.counters.get("refused-data-session") != 1:
                await trio.sleep(0.01)
        await _settled(c3["b"], res.mid)


# --------------------------------------------------------------------------
# What a data session may hold at the destination, and the order of the ends


async def _closed(ch, timeout: float = 5.0) -> bool:
    """The agent closed this session (it sends nothing on a DATA session)."""
    with trio.move_on_after(timeout):
        try:
            await ch.receive()
        except (RemoteProtocolError, trio.BrokenResourceError):
            return True
    return False


async def test_data_sessions_joining_as_the_migration_ends_are_closed_with_it(cluster, monkeypatch):
    """BINDs that reach the run as its session ends: each data session is closed, and its
    connection given back, with the run (they used to wait forever on its queue), not BIND_WAIT later."""
    monkeypatch.setattr(runner, "BIND_WAIT", 60.0)
    b, port = cluster["b"], cluster.members["b"].port
    evil = HostilePeer(cluster.authority, cluster.measurement)
    mid = bytes(range(16))
    ch, proto, reply = await evil.try_begin(port, mid=mid, pages=4096)
    assert reply.type == "ACCEPT"
    datas = [await evil.session(port, Purpose.DATA) for _ in range(8)]
    await ch.send(proto.send(Abort("cancelled", "x", b"")))
    for d in datas:
        await d.send(SessionProtocol(Role.SOURCE, mid, data=True).send(Bind(1, 2)))
    assert all([await _closed(d) for d in datas])
    with trio.fail_after(5):
        while b.incoming.connections > 1:  # (the main session's, until the hostile peer closes it)
            await trio.sleep(0.01)


async def test_a_data_session_lost_before_its_complete_fails_the_migration_though_the_source_says_nothing(cluster):
    """A bound data session closed before its COMPLETE, the main session silent: the run fails closed
    after LANE_GRACE (1 s), not at its session deadline (120 s from BEGIN)."""
    b, port = cluster["b"], cluster.members["b"].port
    keys = cluster["a"].registry.create_model("k", 4 << 20).export_keys()  # (no protected process)
    evil = HostilePeer(cluster.authority, cluster.measurement)
    mid = bytes(range(2, 18))
    ch, proto, reply = await evil.try_begin(port, mid=mid, pages=1024)
    assert reply.type == "ACCEPT"
    await ch.send(proto.send(Keys(keys)))
    await ch.send(proto.send(Channels(2)))
    d = await evil.session(port, Purpose.DATA)
    await d.send(SessionProtocol(Role.SOURCE, mid, data=True).send(Bind(1, 2)))
    run = next(iter(b.incoming.runs.values()))
    with trio.fail_after(10):
        while not run.engine.lanes:
            await trio.sleep(0.01)
    await d.aclose()
    with trio.fail_after(10):
        while b.incoming.runs:
            await trio.sleep(0.01)
    assert run.engine.error is not None and run.engine.error.code is ErrorCode.CLOSED, run.engine.error
    assert b.store.get(mid).state == "aborted"
    await ch.aclose()


async def test_a_migration_takes_at_most_its_data_sessions_and_a_bind_waits_a_bounded_time(cluster, monkeypatch):
    """A peer's data sessions for its own migration that never says CHANNELS: the run holds at
    most MAX_CHANNELS - 1 of them, each for BIND_WAIT at most; the rest are closed at once."""
    monkeypatch.setattr(runner, "BIND_WAIT", 1.0)
    b, port = cluster["b"], cluster.members["b"].port
    evil = HostilePeer(cluster.authority, cluster.measurement)
    mid = bytes(range(1, 17))
    ch, _proto, reply = await evil.try_begin(port, mid=mid, pages=4096)
    assert reply.type == "ACCEPT"
    datas = []
    for _ in range(MAX_CHANNELS):  # 16: one more than a migration may have
        d = await evil.session(port, Purpose.DATA)
        await d.send(SessionProtocol(Role.SOURCE, mid, data=True).send(Bind(1, 2)))
        datas.append(d)
    assert await _closed(datas[-1], 0.8)  # the 16th, at once
    assert not any([await _closed(d, 0.01) for d in datas[:-1]])  # the others wait for CHANNELS and KEYS...
    assert all([await _closed(d, 3.0) for d in datas[:-1]])  # ... for BIND_WAIT, then are closed
    run = next(iter(b.incoming.runs.values()))
    assert run.engine.state.value == "streaming" and not run.engine.lanes  # the migration itself goes on
    await ch.aclose()


async def test_a_bind_not_taken_within_bind_wait_is_withdrawn_and_never_bound(monkeypatch):
    """attach marks a BIND it gave up on: _bind_waiting skips it once CHANNELS and KEYS are in."""
    monkeypatch.setattr(runner, "BIND_WAIT", 0.05)
    run = object.__new__(runner.DestinationRun)  # (the session task's part, without a session)
    opened_send, opened = trio.open_memory_channel(1)
    run._opened, run._attached, run._ended, run._binds = opened_send, 0, trio.Event(), []
    first = Record(SessionProtocol(Role.SOURCE, MID, data=True).send(Bind(1, 2)), 0, bytes(32))
    await run.attach(type("Channel", (), {"plain": False})(), first)  # back after BIND_WAIT: the agent closes it
    run._binds.append(opened.receive_nowait().bind)  # as the session task takes it, too late

    def bind(rec, plain):
        raise AssertionError("a withdrawn data session bound")

    run.engine = type("Engine", (), {"stream": False, "keys_imported": True, "channels": 2, "page_records": 0,
                                     "bind": staticmethod(bind)})()
    run._bind_waiting()
    assert run._binds == []


def test_data_sessions_wait_for_channels_and_keys_then_bind():
    """_bind_waiting binds nothing before CHANNELS (KEYS alone is not enough), then binds on CHANNELS 2."""
    run = object.__new__(runner.DestinationRun)  # (the session task's part, without a session)
    started, bound = [], []
    run._opened, _ = trio.open_memory_channel(1)
    run._nursery = type("Nursery", (), {"start_soon": staticmethod(lambda *a: started.append(a))})()
    run.log = runner.log
    channel = type("Channel", (), {"plain": False, "_receiver": type("R", (), {"take_buffered": lambda self: b""})()})
    waiting = runner._Bind(channel(), Record(SessionProtocol(Role.SOURCE, MID, data=True).send(Bind(1, 2)), 0,
                                             bytes(32)))
    run._binds = [waiting]

    def bind(rec, plain):
        bound.append(rec)
        return Lane(len(bound), SessionProtocol(Role.DESTINATION, data=True))

    run.engine = eng = type("Engine", (), {"stream": False, "keys_imported": True, "channels": 1, "page_records": 0,
                                           "bind": staticmethod(bind)})()
    run._bind_waiting()  # KEYS in, CHANNELS not yet: it waits
    assert bound == [] and run._binds == [waiting] and not waiting.taken.is_set()
    eng.channels = 2
    run._bind_waiting()
    assert bound == [waiting.first] and run._binds == [] and waiting.taken.is_set()
    assert [a[1].index for a in started] == [1]  # then read on its own lane


async def test_a_data_sessions_pages_pending_at_its_buffers_end_go_with_that_buffer():
    """_process flushes the lane's own pending pages at the end of a data session's buffer (its
    data records are views of that buffer, which goes back to the Inbox once its batches are written)."""
    d = _Dest()
    d.bind(1)
    proto = d.lanes[1][0]
    g = np.arange(256, 256 + 30, dtype=np.uint64)
    data = bytes(range(256)) * (30 * 16)  # 30 normal pages: two data records of 15 pages
    msg = proto.send(PageBatch(g, bytes([1]) * 30, np.zeros(30, np.uint64), data).message(0))
    first, _second = proto.send_data(data)
    submitted = []

    class Applier:
        async def submit(self, effects, bufs, release=None):
            submitted.append([type(e) for e in effects])

        async def drain(self):
            pass

    run = object.__new__(runner.DestinationRun)  # (the session task's part, without a session)
    run.engine, run._appliers, run.log = d.eng, {0: Applier()}, runner.log.bind(migration=MID.hex())
    await run._process(d.lanes[1][1], [Record(msg, 1, bytes(32)), Record(first, 2, bytes(32))], bytearray(), None)
    assert submitted == [[ApplyPages]]  # the first 15 pages, with the buffer that holds them


async def test_two_migrations_on_16_channels_at_once_are_not_refused_by_the_session_rate(cluster):
    """Data sessions are bounded by their migration, not counted as sessions of their own."""
    a = cluster["a"]
    for n in ("vm1", "vm2"):
        a.registry.create_model(n, 4 << 20, protected=1, fill="random", seed=3)
    res = {}

    async def go(n):
        res[n] = await a.outgoing.migrate(n, cluster.addr("b"), MigrationParams(channels=MAX_CHANNELS))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(go, "vm1")
        nursery.start_soon(go, "vm2")
    assert all(r.ok for r in res.values()), {n: r.error for n, r in res.items()}
    assert "refused-session-rate" not in cluster["b"].incoming.counters


async def test_a_cancel_on_channels_reaches_the_destination_as_abort(cluster, nursery):
    """The ABORT on the main session goes before the data sessions close (and a data session's
    close that crosses it does not win): the destination says cancelled, as on one channel."""
    out, run = await _migrating(cluster, nursery, MigrationParams(channels=4, bandwidth=8 << 20))
    with trio.fail_after(20):
        while run.engine.page_records < 2:
            await trio.sleep(0.01)
    assert cluster["a"].outgoing.cancel(run.engine.mid.hex()) == "cancelling"
    res = await _result(out)
    assert res.runs_on == "source" and cluster.running_copies("vm1") == ["a"]
    await _settled(cluster["b"], res.mid)
    assert run.engine.error is not None and run.engine.error.code is ErrorCode.CANCELLED, run.engine.error


def test_the_channel_vectors_are_what_a_destination_engine_accepts():
    """proto/vectors/channels_aesgcm.json, fed to a destination engine: the data session binds,
    its page (gfn 256, channel 1's) is applied and its COMPLETE checks."""
    v = json.loads((Path(__file__).resolve().parent.parent / "proto/vectors/channels_aesgcm.json").read_text())
    main = [bytes.fromhex(r["plaintext"]) for r in v["records"] if r["from"] == "initiator"]
    eng = DestinationEngine(False, 1 << 20)
    assert isinstance(eng.on_record(Record(main[0], 0, bytes(32)))[0], OpenIncoming)
    eng.on_result(Opened(0))
    assert isinstance(eng.on_record(Record(main[1], 1, bytes(32)))[0], ImportKeys)
    eng.on_result(KeysImported(()))
    assert eng.on_record(Record(main[2], 2, bytes(32))) == [] and eng.channels == 2 and eng.binding
    data = [bytes.fromhex(r["plaintext"]) for r in v["data_session"]["records"]]
    lane = eng.bind(Record(data[0], 0, bytes(32)), False)
    assert eng.on_lane_record(lane, Record(data[1], 1, bytes(32))) == []
    applied = eng.on_lane_record(lane, Record(data[2], 2, bytes(32)))
    assert [type(e) for e in applied] == [ApplyPages] and applied[0].batch.gfns.tolist() == [256]
    complete = messages.decode(data[3]).body
    assert eng.on_lane_record(lane, Record(data[3], 3, complete.transcript)) == [] and lane.complete


async def test_a_record_from_the_destination_on_a_data_session_fails_the_migration(cluster, monkeypatch):
    """The destination never sends on a DATA session (proto 7.8): the source takes a record there as
    the peer's error, fails the migration before the handoff, and runs on."""
    from palm_net.agent.incoming import IncomingService

    joined = IncomingService._data_session

    async def talking(self, channel):
        await channel.send(b"not for a data session")
        await joined(self, channel)

    monkeypatch.setattr(IncomingService, "_data_session", talking)
    cluster["a"].registry.create_model("vm1", 4 << 20, protected=1, fill="random", seed=3)
    res = await cluster["a"].outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(channels=2))
    assert not res.ok and "the destination sent on a data session" in res.error
    assert res.runs_on == "source" and cluster.running_copies("vm1") == ["a"]
    await _settled(cluster["b"], res.mid)


# --------------------------------------------------------------------------
# A stream backend's channels (QEMU's multifd): the destination engine, sans-IO


class _StreamDest:
    """A destination (engine and synchronous shell) of a stream migration past BEGIN,
    with a stand-in hypervisor that keeps each stream it is fed."""

    def __init__(self, tmp: Path) -> None:
        from palm_net.hypervisor.backend import VmInfo
        from palm_net.migration.handoff import HandoffStore
        from palm_net.testing.engines import DestinationDriver

        self.fake = FakeStream(VmInfo("q", bytes(16), 256, 1, 0, 0))
        self.d = DestinationDriver(HandoffStore(tmp / "d.db"), lambda mid, begin: self.fake)
        self.src = SessionProtocol(Role.SOURCE, MID)
        self.sent: list[bytes] = []
        self.main(Begin("q", bytes(16), 256, 0, 0, 1, False, False, "qemu", b"spec"))
        self.src.receive(self.sent.pop())  # ACCEPT
        self.lanes: dict[int, tuple[SessionProtocol, Lane, list[int]]] = {}

    def main(self, body, data: bytes = b"") -> None:
        self.sent += self.d.feed(self.src.send(body))
        for part in self.src.send_data(data) if data else []:
            self.sent += self.d.feed(bytes(part))

    def bind(self, channel: int, count: int) -> None:
        proto = SessionProtocol(Role.SOURCE, MID, data=True, stream=True)
        lane = self.d.engine.bind(Record(proto.send(Bind(channel, count)), 0, bytes(32)), False)
        self.lanes[channel] = (proto, lane, [1])

    def on(self, channel: int, body, data: bytes = b"") -> None:
        proto, lane, n = self.lanes[channel]
        for rec in [proto.send(body), *(bytes(p) for p in (proto.send_data(data) if data else []))]:
            self.sent += self.d.perform(self.d.engine.on_lane_record(lane, Record(rec, n[0], b"T" * 32)))
            n[0] += 1


def test_a_stream_on_three_channels_loads_once_every_channel_is_complete(tmp_path):
    """CHANNELS makes the hypervisor listen for 3 streams; each channel's bytes go to its
    own stream; the hypervisor loads (EndStream) only once every data session's COMPLETE
    is in, after the main session's STREAM_END, and READY follows."""
    s = _StreamDest(tmp_path)
    s.main(Channels(3))
    assert s.fake.listening == 3
    s.bind(1, 3)
    s.bind(2, 3)
    chunks = {0: b"QEVM" + bytes(70000), 1: b"\x11\x22\x33\x44" + b"a" * 100, 2: b"\x11\x22\x33\x44" + b"b" * 9}
    s.main(messages.Stream(len(chunks[0])), chunks[0])
    for c in (1, 2):
        s.on(c, messages.Stream(len(chunks[c])), chunks[c])
    s.main(messages.StreamEnd(len(chunks[0])))
    s.main(Complete(s.d.index, 1, b"T" * 32))
    s.on(1, Complete(3, 1, b"T" * 32))
    assert not s.fake.ended and s.sent == []  # channel 2's bytes may still come: QEMU waits for them
    s.on(2, Complete(3, 1, b"T" * 32))
    assert s.fake.ended and [messages.decode(m).type for m in s.sent] == ["READY"]
    assert {c: bytes(b) for c, b in s.fake.streams.items()} == chunks


def test_a_stream_channels_page_messages_and_a_short_complete_are_refused(tmp_path):
    s = _StreamDest(tmp_path)
    s.main(Channels(2))
    s.bind(1, 2)
    pages = SessionProtocol(Role.SOURCE, MID, data=True)  # (a page migration's data session, to forge with)
    pages.send(Bind(1, 2))
    with pytest.raises(RemoteProtocolError) as exc:  # a page message on a stream's data session
        s.d.engine.on_lane_record(s.lanes[1][1], Record(pages.send(RoundEnd(0, 0, 0)), 1, bytes(32)))
    assert exc.value.code is ErrorCode.OUT_OF_STATE
    (tmp_path / "2").mkdir()
    s = _StreamDest(tmp_path / "2")
    s.main(Channels(2))
    s.bind(1, 2)
    s.on(1, messages.Stream(3), b"abc")
    with pytest.raises(RemoteProtocolError) as exc:  # COMPLETE that counts two STREAM messages
        s.on(1, Complete(3, 2, b"T" * 32))
    assert exc.value.code is ErrorCode.INCOMPLETE


def test_a_bind_for_a_stream_on_one_channel_or_before_channels_is_refused(tmp_path):
    s = _StreamDest(tmp_path)
    with pytest.raises(RemoteProtocolError) as exc:  # no CHANNELS yet: the hypervisor listens for nothing
        s.bind(1, 2)
    assert exc.value.code is ErrorCode.OUT_OF_STATE and s.fake.listening == 0
    s.main(messages.Stream(3), b"abc")  # one channel, then
    assert s.fake.listening == 1 and bytes(s.fake.streams[0]) == b"abc"
    with pytest.raises(RemoteProtocolError) as exc:
        s.bind(1, 2)
    assert exc.value.code is ErrorCode.OUT_OF_STATE


def test_a_stream_data_session_read_after_the_main_streams_end_still_binds(tmp_path):
    """A data session's BIND may be read after the main session's STREAM_END (SEALED) or
    its COMPLETE (VERIFYING): the hypervisor waits for that channel's stream, so the
    session binds, and READY follows its COMPLETE."""
    for late in ("sealed", "verifying"):
        (tmp_path / late).mkdir()
        s = _StreamDest(tmp_path / late)
        s.main(Channels(2))
        main = b"QEVM" + bytes(100)
        s.main(messages.Stream(len(main)), main)
        s.main(messages.StreamEnd(len(main)))
        if late == "verifying":
            s.main(Complete(s.d.index, 1, b"T" * 32))
        assert s.d.engine.state.value == late and s.d.engine.binding
        s.bind(1, 2)
        multifd = b"\x11\x22\x33\x44" + b"a" * 10
        s.on(1, messages.Stream(len(multifd)), multifd)
        if late == "sealed":
            s.main(Complete(s.d.index, 1, b"T" * 32))
        assert not s.fake.ended and s.sent == []
        s.on(1, Complete(3, 1, b"T" * 32))
        assert s.fake.ended and [messages.decode(m).type for m in s.sent] == ["READY"]
        assert {c: bytes(b) for c, b in s.fake.streams.items()} == {0: main, 1: multifd}


def test_each_stream_message_of_a_data_session_is_counted(tmp_path):
    """A data session carries its stream in many STREAM messages (QEMU's multifd: its
    packets as they are read): each counts towards its COMPLETE's page_records."""
    s = _StreamDest(tmp_path)
    s.main(Channels(2))
    s.bind(1, 2)
    for part in (b"\x11\x22\x33\x44" + b"a" * 10, b"b" * 7, b"c"):
        s.on(1, messages.Stream(len(part)), part)
    s.on(1, Complete(7, 3, b"T" * 32))  # BIND, 3 STREAM and their 3 data records
    assert s.lanes[1][1].complete and s.lanes[1][1].page_records == 3


def test_a_failing_stream_migration_interrupts_its_hypervisors_streams():
    """DestinationRun._interrupt_stream (run by unblock_on_cancel as the migration's nursery
    ends): a stream backend's writers, blocked on a QEMU that stopped reading, are
    interrupted, and its relays, blocked on a quiet data session, aborted; a page
    migration, or one with no VM yet, has none."""
    from types import SimpleNamespace

    calls = []
    vm = SimpleNamespace(interrupt_stream=lambda: calls.append("interrupted"))
    run = object.__new__(runner.DestinationRun)  # (the session task's part, without a session)
    for stream, hosted, relays, expected in ((True, vm, 1, ["relay aborted", "interrupted"]), (False, vm, 0, []),
                                             (True, None, 0, [])):
        calls.clear()
        run.engine, run.host = SimpleNamespace(stream=stream), SimpleNamespace(vm=hosted)
        run._relays = [SimpleNamespace(abort=lambda: calls.append("relay aborted"))] * relays
        run._interrupt_stream()
        assert calls == expected


# --------------------------------------------------------------------------
# A stream backend's channels through the destination's runner (DestinationRun)


class _QemuReadingBehind(FakeStream):
    """A stand-in for a destination QEMU on two streams that, as QEMU does, reads its main
    stream only as far as its multifd stream has caught up: a write to the main stream
    waits (a worker thread, as ``sendall`` on a full socket) until the multifd stream's
    ``behind`` bytes are all in; ``interrupt_stream`` ends such a write with an error, as
    the real one does.  ``main_waiting`` is set (on the trio thread) once one waits."""

    def __init__(self, behind: int) -> None:
        from palm_net.hypervisor.backend import VmInfo

        super().__init__(VmInfo("q", bytes(16), 256, 1, 0, 0))
        self.behind = behind
        self.caught_up = threading.Event()
        self.interrupted = False
        self.main_waiting = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def stream_in(self, data, channel: int = 0) -> None:
        from palm_net.hypervisor.qemu import QemuError

        if channel == 0:
            self._token.run_sync_soon(self.main_waiting.set)
            # (10 s: only a backstop, past the test's deadline, should nothing interrupt it)
            if not self.caught_up.wait(10) or self.interrupted:
                raise QemuError("a write of the main stream interrupted")
        super().stream_in(data, channel)
        if channel == 1 and len(self.streams[1]) >= self.behind:
            self.caught_up.set()

    def interrupt_stream(self) -> None:
        self.interrupted = True
        self.caught_up.set()


def _attested_pair(src, dst, purpose: Purpose) -> tuple[SecureChannel, SecureChannel]:
    """A session between two agents' configs over an in-memory stream: (source's end, destination's)."""
    init = AttestedHandshake(src, True, purpose)
    resp = AttestedHandshake(dst, False, purpose)
    resp.receive_data(init.receive_data(resp.receive_data(init.initiate())))  # msg1, msg2, msg3
    ours, theirs = trio.testing.memory_stream_pair()
    return SecureChannel(ours, init.result), SecureChannel(theirs, resp.result)


async def test_a_stream_destination_writes_each_stream_on_its_own_as_qemu_reads_its_main_stream_behind(tmp_path):
    """DestinationRun._applier_of: at a QEMU destination on 2 channels, the main session's
    bytes and the data session's go to QEMU each through a writer of its own.  QEMU reads its
    main stream only as far as its multifd stream has caught up: here the main stream's write
    waits until the multifd stream's bytes are all in, and they come only after it.  One
    writer for both streams would queue the multifd bytes behind that write, and the
    migration would wait (for STREAM_TIMEOUT, then fail) instead of reaching READY."""
    from palm_net.migration.handoff import HandoffStore
    from palm_net.migration.runner import DestinationRun
    from palm_net.wire.messages import Stream, StreamEnd
    from tests.conftest import Pki

    pki = Pki()
    src_cfg, dst_cfg = pki.config("src"), pki.config("dst")
    main_src, main_dst = _attested_pair(src_cfg, dst_cfg, Purpose.MIGRATION)
    data_src, data_dst = _attested_pair(src_cfg, dst_cfg, Purpose.DATA)
    main_bytes = b"QEVM" + os.urandom(100_000)  # (each more than a data record)
    multifd = b"\x11\x22\x33\x44" + os.urandom(100_000)
    qemu = _QemuReadingBehind(len(multifd))
    store = HandoffStore(tmp_path / "d.db")

    async def open_vm(mid: bytes, begin: Begin, peer):
        store.open_incoming(mid, begin.vm, begin.vm_id, peer)  # (the agent's part)
        return qemu

    run = DestinationRun(main_dst, DestinationEngine(False, 1 << 20), store, SigningKey.generate(), open_vm)
    mid = os.urandom(16)
    src, lane = SessionProtocol(Role.SOURCE, mid), SessionProtocol(Role.SOURCE, mid, data=True, stream=True)

    def stream(proto: SessionProtocol, data: bytes) -> list[tuple[bytes, bool]]:
        return [(proto.send(Stream(len(data))), False), *((bytes(p), True) for p in proto.send_data(data))]

    async def complete(ch: SecureChannel, proto: SessionProtocol) -> None:
        records, transcript = ch.sent
        await ch.send(proto.send(Complete(records, 1, transcript)))  # (one STREAM message)

    with trio.fail_after(1.5):  # (READY comes within about 0.1 s; one writer for both: never)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run.run)
            await main_src.send(src.send(Begin("q", bytes(16), 256, 0, 0, 1, False, False, "qemu", b"spec")))
            assert src.receive((await main_src.receive()).data).type == "ACCEPT"
            await main_src.send(src.send(Channels(2)))
            await data_src.send(lane.send(Bind(1, 2)))
            nursery.start_soon(run.attach, data_dst, await data_dst.receive())  # (as the agent does)
            await main_src.send_batch(stream(src, main_bytes))
            await qemu.main_waiting.wait()  # QEMU's main stream waits for its multifd stream now
            await data_src.send_batch(stream(lane, multifd))
            await complete(data_src, lane)
            await main_src.send(src.send(StreamEnd(len(main_bytes))))
            await complete(main_src, src)
            assert src.receive((await main_src.receive()).data).type == "READY"
            nursery.cancel_scope.cancel()
    assert qemu.ended and {c: bytes(b) for c, b in qemu.streams.items()} == {0: main_bytes, 1: multifd}


class _QemuLoadingSlowly(FakeStream):
    """A destination QEMU that takes its stream's last bytes slowly: a write of the main
    stream waits (a worker thread, as ``sendall`` on a full socket) until ``go`` is set."""

    def __init__(self) -> None:
        from palm_net.hypervisor.backend import VmInfo

        super().__init__(VmInfo("q", bytes(16), 256, 1, 0, 0))
        self.go = threading.Event()

    def stream_in(self, data, channel: int = 0) -> None:
        self.go.wait(10)  # (a backstop past the test's deadline)
        super().stream_in(data, channel)


async def test_readys_load_counts_the_stream_bytes_still_being_written_at_stream_end(tmp_path):
    """proto 7.4: READY's load runs from STREAM_END until the hypervisor loaded the
    stream's end.  What the destination still had to write to QEMU when STREAM_END came
    is part of it (it is inside the pause: with QEMU's zero-page markers it was up to
    49 ms here); timed from the hypervisor's own end alone, it read 0."""
    from palm_net.migration.handoff import HandoffStore
    from palm_net.migration.runner import DestinationRun
    from palm_net.wire.messages import Ready, Stream, StreamEnd, timings_s
    from tests.conftest import Pki

    pki = Pki()
    main_src, main_dst = _attested_pair(pki.config("src"), pki.config("dst"), Purpose.MIGRATION)
    qemu = _QemuLoadingSlowly()
    store = HandoffStore(tmp_path / "d.db")

    async def open_vm(mid: bytes, begin: Begin, peer):
        store.open_incoming(mid, begin.vm, begin.vm_id, peer)
        return qemu

    run = DestinationRun(main_dst, DestinationEngine(False, 1 << 20), store, SigningKey.generate(), open_vm)
    src = SessionProtocol(Role.SOURCE, os.urandom(16))
    data = b"QEVM" + os.urandom(10_000)
    held = 0.3
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run.run)
            await main_src.send(src.send(Begin("q", bytes(16), 256, 0, 0, 1, False, False, "qemu", b"spec")))
            assert src.receive((await main_src.receive()).data).type == "ACCEPT"
            await main_src.send_batch([(src.send(Stream(len(data))), False),
                                       *((bytes(p), True) for p in src.send_data(data))])
            await main_src.send(src.send(StreamEnd(len(data))))
            records, transcript = main_src.sent
            await main_src.send(src.send(Complete(records, 1, transcript)))
            while run.engine.state.value != "sealed":  # STREAM_END taken, the write still due
                await trio.sleep(0.01)
            await trio.sleep(held)
            qemu.go.set()
            ready = src.receive((await main_src.receive()).data)
            assert ready.type == "READY"
            load, _ = timings_s(ready.get(Ready).timings)
            nursery.cancel_scope.cancel()
    assert held <= load < 5 and qemu.ended and bytes(qemu.streams[0]) == data
