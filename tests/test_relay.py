"""The stream relays (palm_net.migration.relay) and what is lent to them: a session's
STREAM messages (StreamLease), its socket one way (ThreadSender, ThreadReceiver), a
stream's data session (DestinationEngine.lend_lane)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from palm_net.channel.handshake import HandshakeResult
from palm_net.channel.records import Record, RecordReceiver, RecordSender
from palm_net.channel.transport import SecureChannel, ThreadReceiver, ThreadSender
from palm_net.crypto.noise import CIPHERS, CipherState
from palm_net.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from palm_net.migration.relay import DestinationRelay, SourceRelay, in_own_thread
from palm_net.wire import messages
from palm_net.wire.messages import MAX_BULK, Bind, Complete, Stream
from palm_net.wire.protocol import Role, SessionProtocol
from tests.test_channels import _StreamDest

MID = bytes(range(16))
RANDOM = os.urandom(MAX_BULK)


def _bound() -> tuple[SessionProtocol, SessionProtocol]:
    """A stream's data session past BIND, at the source and at the destination."""
    src = SessionProtocol(Role.SOURCE, MID, data=True, stream=True)
    dst = SessionProtocol(Role.DESTINATION, data=True, stream=True)
    dst.receive(src.send(Bind(1, 2)))
    return src, dst


def _socket_channels() -> tuple[SecureChannel, SecureChannel]:
    """Two channels over a socket pair, with matching record layers."""
    a, b = socket.socketpair()

    def channel(sock: socket.socket, tx: RecordSender, rx: RecordReceiver) -> SecureChannel:
        r = object.__new__(HandshakeResult)
        object.__setattr__(r, "sender", tx)
        object.__setattr__(r, "receiver", rx)
        return SecureChannel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)), r)

    k1, k2 = os.urandom(32), os.urandom(32)
    cs = lambda k: CipherState(CIPHERS["AESGCM"], k)  # noqa: E731
    return (channel(a, RecordSender(cs(k1)), RecordReceiver(cs(k2))),
            channel(b, RecordSender(cs(k2)), RecordReceiver(cs(k1))))


# --------------------------------------------------------------------------
# StreamLease


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, MAX_BULK), min_size=1, max_size=5))
def test_a_lease_makes_exactly_the_records_send_would_have_and_the_session_goes_on_from_it(lengths):
    leased, _ = _bound()
    direct, dst = _bound()
    lease = leased.lease_stream()
    for n in lengths:
        made = [bytes(r) for r in lease.frame(RANDOM[:n])]
        assert made == [direct.send(Stream(n)), *(bytes(p) for p in direct.send_data(RANDOM[:n]))]
        for rec in made:
            dst.receive(rec)  # (and the destination takes them as any others)
    assert (lease.messages, lease.data_bytes) == (len(lengths), sum(lengths))
    leased.end_lease(lease)
    assert leased.send(Complete(0, len(lengths), bytes(32))) == direct.send(Complete(0, len(lengths), bytes(32)))


def test_a_session_sends_nothing_of_its_own_while_its_stream_is_leased():
    """A message sent beside a lease would take a sequence number the lease is making
    messages with: refused, as is a second lease, or the return of another's."""
    src, _ = _bound()
    lease = src.lease_stream()
    with pytest.raises(LocalProtocolError, match="leased out"):
        src.send(Complete(0, 0, bytes(32)))
    assert not src.can_send(Complete)
    with pytest.raises(LocalProtocolError):
        src.lease_stream()
    other, _ = _bound()
    with pytest.raises(LocalProtocolError, match="not this session's lease"):
        src.end_lease(other.lease_stream())
    lease.frame(b"x")
    src.end_lease(lease)
    assert messages.decode(src.send(Complete(0, 1, bytes(32)))).seq == 2  # BIND, the leased STREAM, then this


def test_no_lease_where_a_stream_message_is_not_allowed_or_would_not_keep_the_state():
    pages = SessionProtocol(Role.SOURCE, MID, data=True)  # a page migration's data session
    pages.send(Bind(1, 2))
    with pytest.raises(LocalProtocolError, match="no STREAM to lease"):
        pages.lease_stream()
    with pytest.raises(LocalProtocolError):  # no migration id yet
        SessionProtocol(Role.SOURCE, data=True, stream=True).lease_stream()
    done, _ = _bound()
    done.send(Complete(0, 0, bytes(32)))  # the data session's last message
    with pytest.raises(LocalProtocolError, match="no STREAM to lease"):
        done.lease_stream()


# --------------------------------------------------------------------------
# ThreadSender, ThreadReceiver


async def test_a_thread_sender_seals_and_sends_what_the_peer_opens_in_order():
    a, b = _socket_channels()
    msgs = [os.urandom(n) for n in (1, 1000, 65000, 300)]
    sender = ThreadSender(a)
    try:
        sent = await trio.to_thread.run_sync(sender.seal_and_send, [(m, False) for m in msgs])
    finally:
        sender.close()
    assert sent == a.frames_size([(m, False) for m in msgs]) and a.sent[0] == len(msgs)
    with trio.fail_after(5):
        assert [bytes((await b.receive()).data) for _ in msgs] == msgs
    await a.send(b"after")  # the channel sends for itself again
    assert bytes((await b.receive()).data) == b"after"


async def test_a_thread_sender_to_a_peer_that_takes_nothing_times_out_or_returns_when_aborted():
    """A peer that reads nothing: the send fails after the channel's send timeout, as
    ``send_sealed`` does; aborted meanwhile (the run torn down), it returns at once."""
    a, _b = _socket_channels()
    a.send_timeout = 0.3
    big = [(os.urandom(65000), False)] * 200  # 13 MB: more than the socket pair holds
    sender = ThreadSender(a)
    try:
        with trio.fail_after(10), pytest.raises(RemoteProtocolError) as exc:
            await trio.to_thread.run_sync(sender.seal_and_send, big)
        assert exc.value.code is ErrorCode.TIMEOUT
    finally:
        sender.close()
    a.send_timeout = 60
    sender = ThreadSender(a)
    try:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, sender.seal_and_send, big)
            await trio.sleep(0.3)
            sender.abort()
        assert time.monotonic() - started < 5  # (not the send timeout's 60 s)
    finally:
        sender.close()


async def test_a_thread_receiver_gives_back_the_start_of_a_frame_read_past_its_last_record():
    """Records after the relay's last are read by the session's own receiver (an Inbox,
    ``receive``): a frame's start the thread read is given back to it, not lost."""
    a, b = _socket_channels()
    frames = bytearray()
    for m in (b"one", b"two", b"three", b"four"):
        frames += a._sender.seal(m)
    cut = len(frames) - 5
    raw = a.stream.socket
    await raw.send(frames[:cut])
    receiver = ThreadReceiver(b)
    try:
        with trio.fail_after(5):
            got = await trio.to_thread.run_sync(receiver.records)
        assert got is not None and [bytes(r.data) for r in got] == [b"one", b"two", b"three"]
    finally:
        receiver.close()
    await raw.send(frames[cut:])
    with trio.fail_after(5):
        assert bytes((await b.receive()).data) == b"four"


async def test_a_thread_receiver_on_a_quiet_session_returns_when_aborted_and_refuses_a_tampered_record():
    a, b = _socket_channels()
    receiver = ThreadReceiver(b)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, receiver.records)
                await trio.sleep(0.2)
                receiver.abort()
    finally:
        receiver.close()
    frame = bytearray(a._sender.seal(b"a record"))
    frame[-1] ^= 1
    await a.stream.socket.send(frame)
    receiver = ThreadReceiver(b)
    try:
        with trio.fail_after(5), pytest.raises(RemoteProtocolError) as exc:
            await trio.to_thread.run_sync(receiver.records)
        assert exc.value.code is ErrorCode.BAD_RECORD
    finally:
        receiver.close()


async def test_a_thread_sender_times_out_a_peer_that_takes_a_little_at_a_time():
    """Each piece (SEND_CHUNK) must go within the send timeout, as in ``send_sealed``, not
    each wait: a peer taking a kilobyte now and then does not hold the sender (a paused
    guest) for ever."""
    a, _b = _socket_channels()
    a.send_timeout = 0.3
    sender = ThreadSender(a)
    real, turn = sender._sock, [0]

    class Trickle:  # the socket's peer takes 1000 bytes every other try, ready again 10 ms on
        def send(self, data: memoryview, flags: int) -> int:
            turn[0] += 1
            if turn[0] % 2:
                raise BlockingIOError
            return min(len(data), 1000)

    sender._sock, sender._wait = Trickle(), lambda timeout: (time.sleep(0.01), True)[1]
    try:
        started = time.monotonic()
        with pytest.raises(RemoteProtocolError) as exc:
            await trio.to_thread.run_sync(sender.seal_and_send, [(os.urandom(65000), False)] * 4)
        assert exc.value.code is ErrorCode.TIMEOUT and time.monotonic() - started < 2
    finally:
        sender._sock = real
        sender.close()


def test_a_lent_socket_aborted_after_it_is_closed_writes_to_no_descriptor():
    """A relay aborted after its sender closed (a migration's end): the wake-up's descriptor
    number may be another's by then (a session's, the store's): nothing is written to it."""
    a, _b = _socket_channels()
    sender = ThreadSender(a)
    sender.close()
    r, w = os.pipe()  # (the numbers just freed, most likely)
    try:
        os.set_blocking(r, False)
        sender.abort()
        sender.close()  # (twice: nothing either)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)
    assert sender.aborted


async def test_a_relay_has_a_thread_of_its_own_when_trios_are_all_taken():
    """A relay holds its thread for its session's whole stream: not one of trio's pool,
    which many channels (or a peer's quiet data sessions) would otherwise use up."""
    limiter = trio.to_thread.current_default_thread_limiter()
    total, limiter.total_tokens = limiter.total_tokens, 1
    release = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, release.wait)  # (the pool's only token)
            await trio.sleep(0.1)
            try:
                with trio.fail_after(5):
                    assert await in_own_thread(lambda: "ran") == "ran"
            finally:
                release.set()
    finally:
        limiter.total_tokens = total


# --------------------------------------------------------------------------
# The relays


async def test_a_source_relay_carries_a_stream_to_its_end_and_a_stopped_one_makes_nothing_of_its_read():
    a, b = _socket_channels()
    src, dst = _bound()
    ours, qemu = socket.socketpair()
    data = os.urandom(3 << 20)
    try:
        writer = threading.Thread(target=lambda: (qemu.sendall(data), qemu.shutdown(socket.SHUT_WR)))
        writer.start()
        lease, sender = src.lease_stream(), ThreadSender(a)
        got = bytearray()

        async def destination() -> None:
            while len(got) < len(data):
                ev = dst.receive((rec := await b.receive()).data, rec.authenticated)
                if isinstance(ev, messages.Message):
                    assert isinstance(ev.body, Stream)
                else:
                    got.extend(ev.data)

        try:
            relay = SourceRelay(ours, lease, sender, lambda size: 0.0)
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, writer.join)
                    nursery.start_soon(destination)
                    ended = await trio.to_thread.run_sync(relay.run)
        finally:
            sender.close()
            src.end_lease(lease)
        assert ended and lease.data_bytes == len(data) and relay.sent > len(data)
        assert got == data
        # Stopped (the operator's cancel): what it reads then is dropped, no message made of it.
        again, _ = _bound()
        lease2, sender2 = again.lease_stream(), ThreadSender(a)
        ours2, qemu2 = socket.socketpair()
        qemu2.sendall(b"read, never sent")
        qemu2.shutdown(socket.SHUT_WR)
        try:
            relay2 = SourceRelay(ours2, lease2, sender2, lambda size: 0.0)
            relay2.stop()
            with trio.fail_after(5):
                assert await trio.to_thread.run_sync(relay2.run) is False
        finally:
            sender2.close()
            ours2.close()
            qemu2.close()
        assert lease2.messages == 0 and relay2.sent == 0
        # Stopped in a pacing wait (a bandwidth cap): the wait ends at once.
        again3, _ = _bound()
        lease3, sender3 = again3.lease_stream(), ThreadSender(a)
        ours3, qemu3 = socket.socketpair()
        qemu3.sendall(b"paced")
        try:
            relay3 = SourceRelay(ours3, lease3, sender3, lambda size: 20.0)
            started = time.monotonic()
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(b.receive)  # (what it sent before the wait)
                    nursery.start_soon(lambda: trio.to_thread.run_sync(relay3.run))
                    await trio.sleep(0.3)
                    relay3.stop()
                    ours3.shutdown(socket.SHUT_RDWR)  # (as the run's stop does: a read returns)
            assert time.monotonic() - started < 3  # (a thread is never cancelled: timed by hand)
        finally:
            sender3.close()
            ours3.close()
            qemu3.close()
        assert lease3.messages == 1
    finally:
        ours.close()
        qemu.close()


async def test_a_destination_relay_writes_what_its_protocol_takes_and_stops_at_the_first_other_record():
    a, b = _socket_channels()
    src, dst = _bound()
    chunks = [os.urandom(n) for n in (70000, 1, MAX_BULK)]
    frames = [m for c in chunks for m in (src.send(Stream(len(c))), *map(bytes, src.send_data(c)))]
    frames.append(src.send(Complete(0, 3, bytes(32))))
    written: list[bytes] = []
    receiver = ThreadReceiver(b)
    try:
        relay = DestinationRelay(receiver, dst, lambda parts: written.extend(bytes(p) for p in parts))
        async def source() -> None:
            await a.send_batch([(f, True) for f in frames])
            a.stream.socket.shutdown(socket.SHUT_WR)  # (then nothing more: a relay reading on would see the end)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(source)
                rest = await trio.to_thread.run_sync(relay.run)
    finally:
        receiver.close()
    assert rest is not None and type(messages.decode(rest[0].data).body) is Complete
    assert b"".join(written) == b"".join(chunks) and (relay.messages, relay.data) == (3, sum(map(len, chunks)))


async def test_a_destination_relay_refuses_a_record_its_lanes_protocol_refuses():
    """A STREAM message replayed (or forged): the lane's protocol refuses it in the relay
    as it would in the engine, and nothing of the buffer it came in is written."""
    a, b = _socket_channels()
    src, dst = _bound()
    first, data = src.send(Stream(10)), bytes(src.send_data(b"0123456789")[0])
    await a.send_batch([(first, True), (data, True), (first, True)])  # (its STREAM again: sequence 1)
    a.stream.socket.shutdown(socket.SHUT_WR)  # (then nothing more)
    written: list[bytes] = []
    receiver = ThreadReceiver(b)
    try:
        relay = DestinationRelay(receiver, dst, lambda parts: written.extend(bytes(p) for p in parts))
        with trio.fail_after(10), pytest.raises(RemoteProtocolError):
            await trio.to_thread.run_sync(relay.run)
    finally:
        receiver.close()
    assert written == []


# --------------------------------------------------------------------------
# A data session lent to its relay (the destination engine)


def test_a_lane_lent_to_its_relay_takes_no_record_and_what_it_carried_counts_at_complete(tmp_path):
    s = _StreamDest(tmp_path)
    s.main(messages.Channels(2))
    s.bind(1, 2)
    eng, (proto, lane, n) = s.d.engine, s.lanes[1]
    with pytest.raises(LocalProtocolError):  # the main session is never lent
        eng.lend_lane(eng.main)
    assert eng.lend_lane(lane) is lane.proto
    with pytest.raises(LocalProtocolError):
        eng.lend_lane(lane)
    with pytest.raises(LocalProtocolError, match="lent to its relay"):
        eng.on_lane_record(lane, Record(proto.send(Stream(3)), n[0], bytes(32)))
    proto._next_seq[Role.SOURCE] -= 1  # (that STREAM never went: it goes below, as a relay takes it)
    proto._bulk[Role.SOURCE].due = 0
    for rec in [proto.send(Stream(3)), *map(bytes, proto.send_data(b"abc"))]:  # as a relay takes them
        lane.proto.receive(rec)
        n[0] += 1
    eng.lane_carried(lane, 1, 3)
    lane.returned()
    assert lane.page_records == 1 and lane.stream_bytes == 3
    s.on(1, Complete(3, 1, b"T" * 32))  # COMPLETE's count is the relay's
    assert lane.complete


def test_only_a_stream_migrations_data_session_is_ever_lent(tmp_path):
    s = _StreamDest(tmp_path)
    s.main(messages.Channels(2))
    s.bind(1, 2)
    eng, (_, lane, _) = s.d.engine, s.lanes[1]
    eng.stream = False  # (as a page migration's: its records are for the engine alone)
    with pytest.raises(LocalProtocolError):
        eng.lend_lane(lane)


def test_a_complete_counting_more_than_the_relay_carried_is_refused(tmp_path):
    s = _StreamDest(tmp_path)
    s.main(messages.Channels(2))
    s.bind(1, 2)
    eng, (_, lane, _) = s.d.engine, s.lanes[1]
    eng.lend_lane(lane)
    eng.lane_carried(lane, 1, 3)
    lane.returned()
    with pytest.raises(RemoteProtocolError) as exc:
        s.on(1, Complete(1, 2, b"T" * 32))
    assert exc.value.code is ErrorCode.INCOMPLETE


async def test_a_destinations_abort_waits_for_its_relays_before_it_scrubs():
    """The abort scrubs the incoming VM: a relay still writing to it (between reading a
    buffer and writing it) would write into what is being scrubbed.  The session task
    aborts the relays and waits until each has returned, then performs the abort."""
    from types import SimpleNamespace

    from palm_net.migration import runner
    from palm_net.migration.effects import AbortForever

    order: list[str] = []
    done = trio.Event()
    class Relay:
        def abort(self) -> None:
            order.append("relay aborted")

    relay = Relay()
    run = object.__new__(runner.DestinationRun)  # (the session task's part, without a session)
    run.engine = SimpleNamespace(state=None, stream=True, mid=MID, on_record=lambda rec: [AbortForever("x", True)],
                                 flush=lambda lane: [])
    run.host = SimpleNamespace(vm=SimpleNamespace(interrupt_stream=lambda: order.append("interrupted")))
    run.log, run._appliers, run._relays = SimpleNamespace(_context={"migration": 1}), {}, {relay: done}

    async def perform(effects: list) -> None:
        order.append(type(effects[0]).__name__)

    async def relay_returns() -> None:
        await trio.sleep(0.2)
        order.append("relay returned")
        done.set()

    run._perform = perform
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            run._nursery = nursery
            nursery.start_soon(relay_returns)
            await run._process(None, [SimpleNamespace()], bytearray(1), lambda buf: None)
            nursery.cancel_scope.cancel()
    assert order == ["relay aborted", "interrupted", "relay returned", "AbortForever"]
