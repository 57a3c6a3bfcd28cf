"""The trio shells around the migration engines: they move bytes, run tasks, keep time.

Each engine has one owner, the trio task that runs its session: every call
into an engine, its session protocol and the durable handoff happens on
the trio thread.  Worker threads get plain inputs and return plain outputs:
pages read from the VM, page batches written into it, records sealed or
opened (libsodium drops the GIL), a digest.  A stream backend's relays
(palm_net.migration.relay) hold what the engine lends them until they
return: a session's StreamLease, or a data session's protocol (Lane.lend).

Source: a producer task reads the round's pages in a worker thread, a few
PAGES messages' worth (up to 1 MiB of data each) at a time, into reusable
buffers; the session task turns each batch into a PAGES message and its data
records (the engine) and seals them into the channel's Outbox, whose task
sends the previous batch meanwhile.  A receiver task reads the
destination's messages concurrently, so an ABORT stops the stream at once.

A stream backend's bytes go by a relay a session instead, one worker thread
reading, sealing and sending (source) or reading, opening and writing (a
destination's data sessions) with no hop to trio between them.

Destination: the channel's Inbox task reads the socket into reusable
buffers; the session task opens each buffer's records in place (a worker
thread), gives them to the engine one by one and hands the page batches to
an applier task, which writes them into the VM (a worker thread) while the
next buffer is opened.  Any other request of the engine waits until the
applier is idle: it may depend on the pages before it.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import structlog
import trio
from nacl.signing import SigningKey

from palm_net.channel.transport import (
    Inbox,
    Outbox,
    Record,
    SecureChannel,
    ThreadReceiver,
    ThreadSender,
    bound_queues,
)
from palm_net.errors import ErrorCode, MigrationFailure, PalmError, RemoteProtocolError
from palm_net.faults import fault
from palm_net.hypervisor.backend import (
    Backend,
    HostedVM,
    StreamBackend,
    describe_error,
)
from palm_net.migration.destination import DestinationEngine, Lane, SessionOutcome
from palm_net.migration.effects import (
    AbortForever,
    ApplyPages,
    ChannelsOpened,
    CommitAndActivate,
    Committed,
    Effect,
    EndStream,
    HandOff,
    Note,
    OpenChannels,
    Opened,
    OpenIncoming,
    PagesSent,
    Prepared,
    ReadTranscript,
    Result,
    Send,
    SendPages,
    SendStream,
    StartStream,
    StreamIn,
    StreamSent,
    StreamStarted,
    Transcript,
)
from palm_net.migration.handoff import STORAGE_ERRORS, HandoffStore, Peer
from palm_net.migration.hosts import DestinationHost, SourceHost, error_of
from palm_net.migration.params import Step
from palm_net.migration.relay import DestinationRelay, SourceRelay, in_own_thread
from palm_net.migration.source import Pacer, SourceEngine
from palm_net.trioutil import first_error
from palm_net.wire.messages import MAX_BULK, MAX_CHANNELS, MAX_DATA_PAGES, PAGE_SIZE, Begin
from palm_net.wire.pages import Buffer, RoundGfns, split_lanes
from palm_net.wire.protocol import FINAL

log = structlog.get_logger("palm.migration")

# Work goes to a worker thread in pieces of this many bulk messages (MAX_BULK
# of data each): a hop to a thread and back costs 30-80 us here, so pieces
# are MiB, not records; and each side holds a few of them, so not more (an
# agent stays within 64 MiB outside guest memory, docs/DATAPATH.md).
PER_HOP = 2
READ_AHEAD = 2  # source: pieces read ahead of the one being sealed
# Pieces in flight on each session: the source seals one while the other is sent,
# the destination reads one while the other is opened and written.  A third on
# each side measured no faster here and held 2 MiB more at the peak of every
# migration (docs/DATAPATH.md, "Threads, hops and memory").
BULK_BUFFERS = 2
OUTBOX_BUFFER = PER_HOP * (MAX_BULK + 72 * 1024)  # a piece's records, sealed (header and framing included)
PROGRESS_EVERY = 0.25  # s: a stream's relays' bytes counted this often
RELAY_BUFFER = 2 << 20  # a destination relay's receive buffer (as an Inbox's)
LANE_TAIL = 2 * (65536 + 8)  # a relayed data session's Inbox after its COMPLETE: its close (two frames)
APPLY_WINDOW = 3  # destination: receive buffers handed to the applier and not yet written
COMMIT_WINDOW = 30.0  # destination: at most this long shielded for COMMIT, activation and DONE


def shut_down(conns: Sequence[socket.socket]) -> None:
    """Both ways, not closed: a worker thread blocked on one returns at once (closing
    it under the thread could hand its descriptor to someone else's next open)."""
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


async def unblock_on_cancel(scope: trio.CancelScope, unblock: Callable[[], None]) -> None:
    """Runs until ``scope`` or its nursery is cancelled, then ``unblock``s the worker
    threads of its siblings (a thread cannot be cancelled: one waiting on a quiet
    stream would hold the nursery, and the failure path behind it, for its timeout)."""
    with scope:
        try:
            await trio.sleep_forever()
        finally:
            unblock()


async def every(seconds: float, fn: Callable[[], None], scope: trio.CancelScope) -> None:
    """``fn`` every ``seconds`` until ``scope`` is cancelled (what a stream's relays carried, counted)."""
    with scope:
        while True:
            await trio.sleep(seconds)
            fn()


def session_error(exc: BaseException) -> PalmError:
    """What ended a session, in the one vocabulary: the trio shell's own errors, then
    those of the host and the connection (palm_net.migration.hosts.error_of)."""
    if isinstance(exc, trio.TooSlowError):
        return RemoteProtocolError(ErrorCode.TIMEOUT, "the session ran out of time")
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError)):
        return RemoteProtocolError(ErrorCode.CLOSED, f"connection lost ({describe_error(exc)})")
    return error_of(exc)


def group_error(group: BaseExceptionGroup[Any]) -> PalmError:
    """What ended a session whose nursery raised a group: its first error, mapped."""
    first = first_error(group)
    if first is None:
        raise group
    return session_error(first)


# --------------------------------------------------------------------------
# Source


STOP_GRACE = 5.0  # an operator's cancel not taken by then (a send stuck on a silent peer) cuts the run


class Stop:
    """An operator's cancel of an outgoing migration, taken at the next point where
    nothing is half sent, so that the destination is told (ABORT, from the failure
    path): the bulk path stops reading the VM and sends what it has sealed, then the
    run fails with CANCELLED, before the handoff point.  Not taken within
    ``grace``, ``hard`` (the migration's cancel scope) cuts the run as before,
    and the destination sees the session close."""

    def __init__(self, hard: trio.CancelScope, grace: float = STOP_GRACE) -> None:
        self.hard = hard
        self.grace = grace
        self.requested = False
        self.past_handoff = False  # set by the run as it hands off: from there it completes
        self.wake: Callable[[], None] = lambda: None

    def request(self) -> bool:
        """Asks the run to stop; False if it is past the handoff point."""
        if self.past_handoff:
            return False
        if not self.requested:
            self.requested = True
            self.hard.deadline = min(self.hard.deadline, trio.current_time() + self.grace)
            self.wake()
        return True


class SourceRun:
    """One outgoing migration over an established channel: performs the source
    engine's effects in order (the steps and their order are the engine's), feeds
    it the destination's records as they come and the time when it asked for it."""

    def __init__(self, channel: SecureChannel, engine: SourceEngine, vm: HostedVM, store: HandoffStore,
                 on_progress: Callable[[], None] | None = None, started: float | None = None,
                 stop: Stop | None = None, connect_data: Callable[[], Awaitable[SecureChannel]] | None = None) -> None:
        self.ch = channel
        channel.send_timeout = engine.params.reply_timeout  # a destination that reads nothing for it: lost
        self.connect_data = connect_data  # a DATA session to the destination (more channels, proto 7.8)
        self.data_channels: list[SecureChannel] = []  # channel 1, 2, ...: they close with the main session
        self.engine = engine
        self.vm = vm
        self.store = store
        self.on_progress = on_progress or (lambda: None)
        self.log = log.bind(migration=engine.mid.hex(), vm=engine.info.name, peer=channel.peer_name)
        self.started = time.monotonic() if started is None else started
        self._pacer = Pacer(engine.params.bandwidth, time.monotonic()) if engine.params.bandwidth else None
        self._queue: deque[Effect] = deque()  # effects asked for and not yet performed
        self._woken = trio.Event()  # the receiver or a background task queued effects
        self._streams: list[socket.socket] = []  # a stream backend's migration streams, while they run
        self._relays: list[SourceRelay] = []  # and the relays carrying them
        self._counted: dict[SourceRelay, int] = {}  # bytes each relay sent that the engine has counted
        self._pace_lock = threading.Lock()  # (the relays' threads pace too)
        # Each channel's buffers of pages read and of records sealed, kept from round to
        # round: fresh ones each round were first touched, a page fault a page, in the
        # stop-and-copy too (13 ms of 18 for 530 scattered pages here).
        self._read_buffers: dict[int, list[npt.NDArray[np.uint8]]] = {}
        self._sealed_buffers: dict[int, list[bytearray]] = {}
        self.host = SourceHost(vm, store, engine.mid)
        self.stop = stop
        if stop is not None:
            stop.wake = self._wake_for_stop

    def _wake_for_stop(self) -> None:
        """An operator's cancel: the run looks at once; a hypervisor's streams being carried
        end now (a quiet one would hold its pump, and the cancel past its grace)."""
        self._woken.set()
        for relay in self._relays:
            relay.stop()
        shut_down(self._streams)

    @property
    def abort_token(self) -> bytes | None:
        """A valid abort token from the destination, after COMMIT."""
        return self.engine.abort_token

    # -- plumbing

    @property
    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.requested and not self.stop.past_handoff

    async def _stop_if_asked(self) -> None:
        """Between effects, where nothing is half sent: the messages the engine has
        already made (their sequence numbers taken) go out first, so that the failure
        path's ABORT is the next record the destination expects; then the run fails
        with CANCELLED.  Nothing sent yet (BEGIN still queued): nothing is, and no ABORT."""
        if not self._stopping:
            return
        assert self.stop is not None
        while self.ch.sent[0] and (sends := [e for e in self._queue if isinstance(e, Send)]):
            self._queue.clear()
            await self.ch.send_batch([(e.data, False) for e in sends])  # (the hard deadline still bounds it)
        self.stop.hard.deadline = math.inf  # stopped here: the failure path (bounded) is not cut
        raise MigrationFailure(ErrorCode.CANCELLED, "cancelled by the operator")

    def _queued(self, effects: Sequence[Effect]) -> None:
        self._queue.extend(effects)
        self._woken.set()

    async def _receiver(self) -> None:
        eng = self.engine
        while True:
            rec = await self.ch.receive()
            fault("source.receive")
            self._queued(eng.on_record(rec, time.monotonic()))
            if eng.proto.state in FINAL:
                return  # the session is over: a close from here on is not an error

    async def _sent(self, size: int) -> None:
        """``size`` bytes went on the wire: counted, and paced to the bandwidth cap."""
        self.engine.sent(size)
        wait = self._pace(size)  # (none for a cancel's last sealed records: at once)
        if wait > 0:
            await trio.sleep(wait)

    async def _pump(self, read: Callable[[Any], tuple[Any, bool]], buffers: list[Any],
                    to_records: Callable[[Any], list[Buffer]], channel: SecureChannel | None = None,
                    sealed: list[bytearray] | None = None) -> None:
        """The bulk path: ``read(buffer)`` (a worker thread) fills one of ``buffers``
        and says whether it was the last; ``to_records`` (this task: the engine) makes
        the records of what was read, which the Outbox seals and sends on ``channel``
        (by default the main session), into ``sealed`` buffers if given (and back)."""
        free_send, free = trio.open_memory_channel[Any](len(buffers))
        for b in buffers:
            free_send.send_nowait(b)
        ready_send, ready = trio.open_memory_channel[tuple[Any, Any]](len(buffers) - 1)
        outbox = Outbox(channel or self.ch, OUTBOX_BUFFER, BULK_BUFFERS, on_sent=self._sent, spares=sealed)

        async def produce() -> None:
            async with ready_send:
                last = False
                while not last and not self._stopping:
                    buf = await free.receive()
                    item, last = await trio.to_thread.run_sync(read, buf)
                    await ready_send.send((item, buf))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(outbox.run)
            async for item, buf in ready:
                # A cancel: what is sealed still goes out whole; what was read is dropped
                # before the engine makes its records (no sequence number taken).
                if not self._stopping:
                    records = to_records(item)
                    if records:
                        await outbox.put([(r, True) for r in records])
                    del records  # views of buf: sealed, so buf is free again
                del item
                free_send.send_nowait(buf)
                self.on_progress()
            outbox.close()

    # -- the migration

    async def run(self) -> None:
        """Raises PalmError (or InDoubt) on failure; the durable row then tells
        whether the outcome is in doubt (HANDED_OFF) or the VM may run here again."""
        try:
            await self._run()
        except BaseExceptionGroup as group:
            err = group_error(group)
            raise err from None
        finally:
            self._close_streams()  # also on failure or cancel: QEMU sees its streams end
            if self.stop is not None:  # (the operator's Stop outlives the run, kept with its result:
                self.stop.wake = lambda: None  # it must not keep the run, its VM and its digest alive)

    async def _run(self) -> None:
        eng = self.engine
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receiver)
            self._queued(eng.start(self.started))
            while eng.step is not Step.DONE:
                await self._stop_if_asked()
                if not self._queue:
                    deadline = eng.timer()
                    self._woken = trio.Event()
                    with trio.move_on_after(math.inf if deadline is None else deadline - time.monotonic()):
                        await self._woken.wait()
                    if not self._queue:
                        self._queued(eng.on_timer(time.monotonic()))
                    continue
                eff = self._queue.popleft()
                if eff.beside:  # its result comes back whenever it is ready
                    nursery.start_soon(self._beside, eff)
                    continue
                result = await self._perform(eff)
                await self._stop_if_asked()  # before the engine makes what follows (a stopped pump's rest)
                if result is not None:
                    self._queued(eng.on_result(result, time.monotonic()))
            nursery.cancel_scope.cancel()

    async def _perform(self, eff: Effect) -> Result | None:
        """One effect of the engine; its result, if one is due."""
        if isinstance(eff, Send):  # with the control messages queued behind it, in one batch
            batch = [eff.data]
            while self._queue and isinstance(self._queue[0], Send):
                batch.append(cast(Send, self._queue.popleft()).data)
            fault("source.Send")
            await self._sent(await self.ch.send_batch([(m, False) for m in batch]))
            return None
        if isinstance(eff, Note):
            self.log.info(eff.event, **eff.fields)
            self.on_progress()
            return None
        if isinstance(eff, SendPages):
            await self._send_pages(cast(Backend, self.vm), eff.gfns, eff.round)
            return PagesSent()
        if isinstance(eff, OpenChannels):
            fault("source.OpenChannels")
            await self._open_channels(eff.binds)
            return ChannelsOpened()
        if isinstance(eff, HandOff):
            # A cancel the operator had asked for (while the row said SENDING) lands here,
            # not after the handoff: from this checkpoint to the durable write nothing yields.
            await trio.lowlevel.checkpoint()
            await self._stop_if_asked()
            if self.stop is not None:
                self.stop.past_handoff = True  # asked from here on, it completes
            return self.host.perform(eff)
        if isinstance(eff, ReadTranscript):
            fault("source.ReadTranscript")
            return Transcript(*self.ch.sent)
        if isinstance(eff, StartStream):
            fault("source.StartStream")
            self._streams = await trio.to_thread.run_sync(cast(StreamBackend, self.vm).start_stream,
                                                          eff.downtime_limit, eff.bandwidth, eff.auto_converge,
                                                          eff.channels)
            return StreamStarted()
        if isinstance(eff, SendStream):
            fault("source.SendStream")
            await self._send_stream()
            return StreamSent()
        return await trio.to_thread.run_sync(self.host.perform, eff)  # (its fault point is the host's)

    async def _beside(self, eff: Effect) -> None:
        """An effect performed beside the others (the destination verifies meanwhile)."""
        result = await trio.to_thread.run_sync(self.host.perform, eff)
        assert result is not None
        self._queued(self.engine.on_result(result, time.monotonic()))

    async def _open_channels(self, binds: tuple[bytes, ...]) -> None:
        """A DATA session for each BIND, to the destination of the main session and no
        other agent (its static key), each watched for the destination's close."""
        connect, peer = self.connect_data, self.ch.result.peer.static_pub
        assert connect is not None
        opened: dict[int, SecureChannel] = {}

        async def open_one(i: int, bind: bytes) -> None:
            ch = opened[i] = await connect()
            ch.send_timeout = self.ch.send_timeout
            self.ch.bound.append(ch)
            if not hmac.compare_digest(ch.result.peer.static_pub, peer):
                raise MigrationFailure(ErrorCode.KEY_MISMATCH, f"a data session reached {ch.peer_name!r}, not "
                                       f"the migration's destination {self.ch.peer_name!r}")
            await self._send_on(ch, [bind])
            self._nursery.start_soon(self._watch_channel, ch)

        async with trio.open_nursery() as nursery:
            for i, bind in enumerate(binds):
                nursery.start_soon(open_one, i, bind)
        self.data_channels = [opened[i] for i in range(len(binds))]

    async def _send_on(self, ch: SecureChannel, messages: list[bytes]) -> None:
        """Control messages on a data session, counted and paced."""
        await self._sent(await ch.send_batch([(m, False) for m in messages]))

    async def _watch_channel(self, ch: SecureChannel) -> None:
        """A data session carries nothing from the destination: a record is its error, a
        close before COMMIT fails the migration (after it, the main session decides)."""
        try:
            await ch.receive()
        except (PalmError, trio.BrokenResourceError, trio.ClosedResourceError):
            if self.engine.committed:
                return
            raise
        raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "the destination sent on a data session")

    async def _send_pages(self, vm: Backend, gfns: RoundGfns, round_no: int) -> None:
        """The pages of ``gfns`` on each channel (its share, wire.messages.lane_of) at once."""
        channels = [self.ch, *self.data_channels]
        async with trio.open_nursery() as nursery:
            for i, share in enumerate(split_lanes(gfns, len(channels))):
                nursery.start_soon(self._send_share, vm, share, round_no, i, channels[i])

    async def _send_share(self, vm: Backend, gfns: RoundGfns, round_no: int, channel: int,
                          ch: SecureChannel) -> None:
        """One channel's pages of the round: read ahead in a worker thread, sent as PAGES
        messages; then a data session's ROUND_END (its COMPLETE after the last copy)."""
        eng, pos = self.engine, [0]

        def read(out: Any) -> tuple[list[tuple[Any, int]], bool]:
            fault("source.SendPages")
            batches = []
            for rows in range(0, PER_HOP * MAX_DATA_PAGES, MAX_DATA_PAGES):
                if pos[0] >= len(gfns):
                    break
                batch, pos[0] = vm.read_pages(gfns, pos[0], round_no, out[rows : rows + MAX_DATA_PAGES])
                batches.append((batch, pos[0]))
            return batches, pos[0] >= len(gfns)

        def to_records(batches: list[tuple[Any, int]]) -> list[Buffer]:
            return [r for batch, done in batches for r in eng.pages(batch, len(gfns) - done, channel)]

        if len(gfns):
            # np.empty: memory a page backend that reads runs in place never touches.
            if channel not in self._read_buffers:
                self._read_buffers[channel] = [np.empty((PER_HOP * MAX_DATA_PAGES, PAGE_SIZE), np.uint8)
                                               for _ in range(READ_AHEAD + 1)]
            await self._pump(read, self._read_buffers[channel], to_records, ch,
                             self._sealed_buffers.setdefault(channel, []))
        if channel and not self._stopping:
            await self._send_on(ch, [eng.channel_end(channel, len(gfns), *ch.sent)])

    def _close_streams(self) -> None:
        for conn in self._streams:
            conn.close()
        self._streams = []

    async def _send_stream(self) -> None:
        """A stream backend's own rounds and stop-and-copy: we carry the bytes, each of
        its streams on its channel at once (more channels: QEMU's multifd, proto 7.8),
        each by a relay in a worker thread (palm_net.migration.relay)."""
        channels, streams = [self.ch, *self.data_channels], self._streams
        assert len(streams) == len(channels)
        for ch in channels:  # what they queue when QEMU pauses is downtime
            bound_queues(ch.stream)
        left = [len(streams)]
        unblock, counting = trio.CancelScope(), trio.CancelScope()

        def abort() -> None:
            shut_down(streams)
            for relay in self._relays:
                relay.abort()

        async def send_one(i: int) -> None:
            await self._send_one_stream(streams[i], i, channels[i])
            left[0] -= 1
            if not left[0]:
                unblock.cancel()
                counting.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(unblock_on_cancel, unblock, abort)
                nursery.start_soon(every, PROGRESS_EVERY, self._count_relayed, counting)
                for i in range(len(streams)):
                    nursery.start_soon(send_one, i)
        finally:
            self._close_streams()  # also on failure or cancel: QEMU sees its streams end

    async def _send_one_stream(self, conn: socket.socket, channel: int, ch: SecureChannel) -> None:
        """One of the hypervisor's streams to its end, as STREAM messages; then a data
        session's COMPLETE."""
        eng = self.engine
        lease = eng.lease_stream(channel)
        try:
            sender = ThreadSender(ch)
            relay = SourceRelay(conn, lease, sender, self._pace)
            self._relays.append(relay)
            try:
                if self._stopping:
                    relay.stop()
                await in_own_thread(relay.run)
            finally:
                self._count(relay)
                self._relays.remove(relay)  # (before its sender closes: nothing aborts it after)
                del self._counted[relay]  # (all of it counted: nothing counts it again)
                sender.close()
        finally:
            eng.stream_returned(channel, lease)
        if channel and not self._stopping:
            await self._send_on(ch, [eng.channel_end(channel, 0, *ch.sent)])

    def _count_relayed(self) -> None:
        """What the relays sent, counted (the engine's figures, progress) now and then
        while they run (and by each as it ends)."""
        for relay in self._relays:
            self._count(relay)
        self.on_progress()

    def _count(self, relay: SourceRelay) -> None:
        sent = relay.sent
        self.engine.sent(sent - self._counted.get(relay, 0))
        self._counted[relay] = sent

    def _pace(self, size: int) -> float:
        """A relay's ``size`` bytes sent: how long it waits (the bandwidth cap, shared)."""
        if self._pacer is None or self._stopping:
            return 0.0
        with self._pace_lock:
            return self._pacer.sent(size, time.monotonic())


# --------------------------------------------------------------------------
# Destination


class _Applier:
    """The destination's writer: page batches (or stream bytes) into the VM in a
    worker thread, in order, while the session task opens the next buffer;
    then the buffers their data lies in go back to their Inbox."""

    def __init__(self, host: DestinationHost, window: float = APPLY_WINDOW) -> None:
        self.host = host
        self._send, self._recv = trio.open_memory_channel[tuple[list[Effect], list[bytearray], _Release]](window)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self.discarding = False  # the migration is being aborted: what is left is dropped, not written

    async def submit(self, effects: list[Effect], bufs: list[bytearray], release: _Release = None) -> None:
        if not effects and not bufs:
            return
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        await self._send.send((effects, bufs, release))

    async def drain(self) -> None:
        """Returns once everything submitted is written."""
        await self._idle.wait()

    async def run(self) -> None:
        async for effects, bufs, release in self._recv:
            if effects and not self.discarding:
                try:
                    await trio.to_thread.run_sync(self.host.bulk, effects)
                except PalmError:
                    if not self.discarding:  # (a stream interrupted for the abort fails its writes)
                        raise
            del effects
            for buf in bufs:
                assert release is not None
                release(buf)
            self._pending -= 1
            if not self._pending:
                self._idle.set()


_Release = Callable[[bytearray], None] | None
BIND_WAIT = 10.0  # a data session's BIND waits this long at most for CHANNELS and KEYS
LANE_GRACE = 1.0  # a data session's close ends the migration after this, unless its main session ends it first


class _Bind:
    """A data session waiting to be bound (its first record, BIND)."""

    def __init__(self, channel: SecureChannel, first: Record) -> None:
        self.channel, self.first = channel, first
        self.taken = trio.Event()  # bound (or the run ended)
        self.withdrawn = False  # not bound within BIND_WAIT: closed, never to be bound


class _Opened:
    """What the session task takes next: a buffer's records, opened, from the main
    session (``lane`` None) or a data session; a data session's BIND; or the end of
    a session's stream (``closed``: the peer's close, if it closed); or post-copy's
    vCPU faults (``faults``: gfns a vCPU waits for)."""

    __slots__ = ("bind", "buf", "closed", "ended", "faults", "lane", "records", "release")

    def __init__(self, lane: Lane | None, records: list[Record] | None = None, buf: bytearray | None = None,
                 release: _Release = None, closed: PalmError | None = None,
                 bind: _Bind | None = None, faults: list[int] | None = None) -> None:
        self.lane, self.records, self.buf, self.release = lane, records, buf, release
        self.ended = records is None and bind is None and faults is None
        self.closed, self.bind, self.faults = closed, bind, faults


class DestinationRun:
    """One incoming migration over an established channel.

    ``open_vm(mid, begin, peer)`` is the agent's part of BEGIN: admission, the
    incoming VM, the durable row (MigrationFailure when refused).
    """

    def __init__(self, channel: SecureChannel, engine: DestinationEngine, store: HandoffStore, signing: SigningKey,
                 open_vm: Callable[[bytes, Begin, Peer], Awaitable[HostedVM]],
                 on_running: Callable[[HostedVM], None] | None = None) -> None:
        self.ch = channel
        self.on_running = on_running  # post-copy: the VM runs here before its session ends (its guest starts)
        self.engine = engine
        self.open_vm = open_vm
        self.committing = False  # inside the commit window (an agent asked to stop waits for it)
        self.activation_error: str | None = None  # committed, but the VM does not run (retried by the agent)
        peer = channel.result.peer
        self.host = DestinationHost(store, signing, Peer(peer.name, peer.static_pub, peer.sign_pub))
        self.log = log.bind(peer=channel.peer_name)
        self._opened: trio.MemorySendChannel[_Opened] | None = None  # into the session task, while it runs
        self._opened_recv: trio.MemoryReceiveChannel[_Opened] | None = None
        self._binds: list[_Bind] = []  # data sessions waiting for CHANNELS and KEYS
        self._queues_bounded = False  # a stream backend's session, once its hypervisor listens
        self._attached = 0  # data sessions that asked to join (at most MAX_CHANNELS - 1)
        self._ended = trio.Event()
        self._appliers: dict[int, _Applier] = {}  # who writes each session's data (_applier_of)
        self._faults: list[int] = []  # post-copy: gfns the VM's vCPUs wait for, not yet taken (_watch_faults)
        self._fault_woken = trio.Event()
        self._watching: HostedVM | None = None
        self._hook: Callable[[int], None] | None = None
        self._relays: dict[DestinationRelay, trio.Event] = {}  # a stream's data sessions being carried (_relay)
        self._deadline = trio.CancelScope()  # (the session's, once it runs)
        self._started = 0.0

    @property
    def vm(self) -> HostedVM | None:
        return self.host.vm

    async def run(self, initial: Sequence[Effect] = ()) -> PalmError | None:
        """The session, to its end; returns what ended it early (it is logged), None if it ran through.
        ``initial``: the engine's first effects (a post-copy recovery session's WANTs)."""
        eng = self.engine
        started = trio.current_time()
        error: PalmError | None = None
        try:
            with trio.fail_at(eng.deadline(started)) as deadline:
                self._deadline, self._started = deadline, started
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    opened_send, opened = trio.open_memory_channel[_Opened](1)
                    self._opened, self._opened_recv = opened_send, opened
                    nursery.start_soon(self._feed, None, Inbox(self.ch, buffers=BULK_BUFFERS), opened_send.clone())
                    nursery.start_soon(unblock_on_cancel, trio.CancelScope(), self._interrupt_stream)  # (relays too)
                    nursery.start_soon(self._feed_faults, opened_send.clone())
                    await self._perform(list(initial))
                    self._watch_faults()
                    lost: tuple[float, PalmError] | None = None  # a data session closed before its COMPLETE
                    while True:
                        with trio.move_on_at(lost[0] if lost else math.inf):
                            item = await opened.receive()
                        if lost and trio.current_time() >= lost[0]:
                            raise lost[1]
                        if item.ended and item.lane is None:  # the main session's
                            if item.closed is not None and eng.state not in FINAL:
                                raise item.closed  # (after the records that came before the close)
                            break
                        if item.ended:
                            assert item.lane is not None
                            if item.closed is not None and not item.lane.complete and lost is None:
                                # The migration's end, unless the main session says more at once (the
                                # source's ABORT may cross its data sessions' close).
                                lost = (trio.current_time() + LANE_GRACE, item.closed)
                        elif item.bind is not None:
                            self._binds.append(item.bind)
                        elif item.faults is not None:
                            await self._perform(eng.on_fault(item.faults))
                        else:
                            assert item.records is not None and item.buf is not None
                            await self._process(item.lane, item.records, item.buf, item.release)
                        if eng.state in FINAL:
                            break
                        self._bind_waiting()
                        self._watch_faults()
                        # An absolute deadline: a peer trickling bytes cannot hold its
                        # slot forever (BEGIN soon, then time in proportion to the memory).
                        deadline.deadline = eng.deadline(started)
                    await self._drain()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = group_error(group)
        except Exception as exc:
            error = session_error(exc)
        finally:
            self._opened = None
            if self._watching is not None and cast(Backend, self._watching).on_fault is self._hook:
                cast(Backend, self._watching).on_fault = None  # (only ours: another session may pull now)
            if self._opened_recv is not None:  # a data session still joining is told (attach)
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        left = self._opened_recv.receive_nowait()
                        if left.bind is not None:
                            self._binds.append(left.bind)
                self._opened_recv.close()
            try:
                with trio.CancelScope(shield=True):
                    # cancelled, failed, or the peer went away
                    if eng.outcome not in (SessionOutcome.COMMITTED, SessionOutcome.ABORTED):
                        error = error or RemoteProtocolError(ErrorCode.CLOSED, "")  # (the engine says when)
                        await self._fail(error)  # (its ABORT before the data sessions close)
            finally:
                self._ended.set()
                for bind in self._binds:
                    bind.taken.set()
        return error

    def _watch_faults(self) -> None:
        """Post-copy's serving phase: the VM's vCPU faults (its guest's threads) reach the
        session task, which asks for their pages ahead of the rest (proto 7.9 item 4)."""
        vm = self.host.vm
        if self.engine.puller is None or vm is None or self._watching is vm:
            return
        token = trio.lowlevel.current_trio_token()

        def arrived(gfn: int) -> None:  # (the trio thread)
            self._faults.append(gfn)
            self._fault_woken.set()

        def on_fault(gfn: int) -> None:  # (a vCPU's thread)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(arrived, gfn)

        self._watching, self._hook = vm, on_fault
        cast(Backend, vm).on_fault = on_fault
        # Accesses already waiting asked an earlier hook (a lost session's) or none (a
        # restart): asked again now, first (proto 7.9 item 6); read after the hook is set,
        # so an access begun meanwhile is in one or the other (the engine asks once).
        waiting = cast(Backend, vm).waiting_pages()
        if waiting:
            self._faults.extend(waiting)
            self._fault_woken.set()

    async def _feed_faults(self, out: trio.MemorySendChannel[_Opened]) -> None:
        async with out:
            while True:
                await self._fault_woken.wait()
                self._fault_woken = trio.Event()
                faults, self._faults = self._faults, []
                await out.send(_Opened(None, faults=faults))

    async def _feed(self, lane: Lane | None, inbox: Inbox, out: trio.MemorySendChannel[_Opened]) -> None:
        """One session's records into the session task: its buffers read and opened
        (a worker thread) while the session task takes the one before; then its end."""
        async with out:
            chunks_send, chunks = trio.open_memory_channel[tuple[bytearray, int]](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(inbox.run, chunks_send)
                async for buf, end in chunks:
                    await out.send(_Opened(lane, await inbox.open(buf, end), buf, inbox.release))
            await out.send(_Opened(lane, closed=inbox.closed))

    def _bind_waiting(self) -> None:
        """The data sessions that came before CHANNELS and KEYS (a stream backend: its
        hypervisor listening), bound once those are in (or refused once pages came
        without them): each read from then on.  A stream backend's sessions, main one
        included, get their socket queues bounded as its hypervisor listens."""
        eng = self.engine
        if eng.stream and eng.listening and not self._queues_bounded:
            self._queues_bounded = True
            bound_queues(self.ch.stream)  # what it queues when the source's QEMU pauses is downtime
        while self._binds and (eng.listening if eng.stream else
                               eng.keys_imported and (eng.channels > 1 or eng.page_records)):
            bind = self._binds.pop(0)
            if bind.withdrawn:
                continue
            lane = eng.bind(bind.first, bind.channel.plain)  # the peer's error fails the migration
            if eng.stream:
                bound_queues(bind.channel.stream)
            assert self._opened is not None
            self.log.info("data session bound", channel=lane.index, of=eng.channels)
            if eng.stream and getattr(bind.channel.stream, "socket", None) is not None:
                self._nursery.start_soon(self._relay, lane, bind.channel, self._opened.clone())
            else:
                self._nursery.start_soon(self._feed, lane, Inbox(bind.channel, buffers=BULK_BUFFERS),
                                         self._opened.clone())
            bind.taken.set()

    async def _relay(self, lane: Lane, channel: SecureChannel, out: trio.MemorySendChannel[_Opened]) -> None:
        """A stream's data session: its STREAM messages carried into the hypervisor by a
        relay (a worker thread of its own, palm_net.migration.relay); the records after
        them (its COMPLETE) in the relay's buffer, then the session's end, to the session
        task as ``_feed`` does, with an Inbox of one small buffer (a fresh Inbox's 4 MiB,
        first touched, cost the downtime 10-20 ms here)."""
        eng, index = self.engine, lane.index
        counted = [0, 0]
        receiver = ThreadReceiver(channel, RELAY_BUFFER)
        try:
            relay = DestinationRelay(receiver, eng.lend_lane(lane),
                                     lambda chunks: self.host.bulk([StreamIn(c, index) for c in chunks]))

            def count() -> None:
                eng.lane_carried(lane, relay.messages - counted[0], relay.data - counted[1])
                counted[:] = relay.messages, relay.data
                self._deadline.deadline = eng.deadline(self._started)  # (its data is the session's progress)

            self._relays[relay] = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    ticking = trio.CancelScope()
                    nursery.start_soon(every, PROGRESS_EVERY, count, ticking)
                    try:
                        rest = await in_own_thread(relay.run)
                    finally:
                        ticking.cancel()
            finally:
                count()
                lane.returned()
                self._relays.pop(relay).set()
        finally:
            receiver.close()  # (what it read past its last record goes back to the channel)
        if rest:
            await out.send(_Opened(lane, rest, receiver.buffer, lambda _: None))
        await self._feed(lane, Inbox(channel, LANE_TAIL, buffers=1), out)

    async def attach(self, channel: SecureChannel, first: Record) -> None:
        """A DATA session for this migration, from the peer of its main session (the
        agent checked its key): its BIND goes to the engine in the session task, which
        then reads it; returns when the migration's session ends, or at once (the session
        closed) when the run has all the data sessions it may have or the BIND is not
        taken within BIND_WAIT (no CHANNELS and KEYS by then)."""
        if self._opened is None or self._attached >= MAX_CHANNELS - 1:
            return
        self._attached += 1
        bind = _Bind(channel, first)
        try:
            with trio.move_on_after(BIND_WAIT):
                await self._opened.send(_Opened(None, bind=bind))
                await bind.taken.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the run ended
        if not bind.taken.is_set():
            bind.withdrawn = True
            return
        await self._ended.wait()

    async def _process(self, lane: Lane | None, records: list[Record], buf: bytearray, release: _Release) -> None:
        """One buffer's records through the engine, in order: page batches to the
        applier, any other request once the applier is idle (it may depend on
        them); the buffer goes back once its batches are written."""
        eng = self.engine
        fault("destination.receive")
        bulk: list[Effect] = []
        for i in range(len(records)):
            if eng.state in FINAL:
                break
            effects = eng.on_record(records[i]) if lane is None else eng.on_lane_record(lane, records[i])
            if eng.mid is not None and "migration" not in self.log._context:
                self.log = self.log.bind(migration=eng.mid.hex())
            while effects:
                eff = effects.pop(0)
                if isinstance(eff, (ApplyPages, StreamIn)):
                    bulk.append(eff)
                    continue
                await self._applier_of(lane).submit(bulk, [])
                bulk = []
                if isinstance(eff, AbortForever) and eng.stream:
                    # A stream's writer may wait on a QEMU that reads no more: what is left is dropped.
                    for applier in self._appliers.values():
                        applier.discarding = True
                    self._interrupt_stream()
                    for done in list(self._relays.values()):  # (they write to the VM the abort scrubs)
                        await done.wait()
                if isinstance(eff, EndStream):  # READY's load from here: the writes still due are the pause's too
                    eff = EndStream(since=time.monotonic())
                await self._drain()
                await self._perform([eff])
        records.clear()  # views of buf: only the batches hold it now
        await self._applier_of(lane).submit(bulk + eng.flush(lane), [buf], release)

    def _interrupt_stream(self) -> None:
        """A stream backend's writers, blocked on a hypervisor that stopped reading, return;
        its relays, blocked on a quiet session, too."""
        for relay in self._relays:
            relay.abort()
        if self.engine.stream and self.host.vm is not None:
            cast(StreamBackend, self.host.vm).interrupt_stream()

    def _applier_of(self, lane: Lane | None) -> _Applier:
        """Who writes a session's data: one applier for every page (in order), but a
        stream each its own, so that no stream waits behind another: QEMU reads its
        main stream only as its multifd streams catch up.  A stream's applier takes
        whatever is submitted at once (its session's buffers bound what it holds)."""
        stream = self.engine.stream
        index = lane.index if lane is not None and stream else 0
        if index not in self._appliers:
            self._appliers[index] = _Applier(self.host, math.inf if stream else APPLY_WINDOW)
            self._nursery.start_soon(self._appliers[index].run)
        return self._appliers[index]

    async def _drain(self) -> None:
        """Returns once everything submitted to every applier is written."""
        for applier in list(self._appliers.values()):
            await applier.drain()

    async def _perform(self, effects: list[Effect]) -> None:
        """Performs effects in order: runs of page batches (or stream bytes) in one worker
        call, and each request's result fed back to the engine, whose effects follow."""
        eng, host = self.engine, self.host
        i = 0
        while i < len(effects):
            eff = effects[i]
            if isinstance(eff, (ApplyPages, StreamIn)):
                j = i
                while j < len(effects) and type(effects[j]) is type(eff):
                    j += 1
                await trio.to_thread.run_sync(host.bulk, effects[i:j])
                i = j
                continue
            i += 1
            if isinstance(eff, Send):
                fault("destination.Send")
                await self.ch.send(eff.data)
                continue
            if isinstance(eff, CommitAndActivate):
                await self._commit_window(eff)
                continue
            if isinstance(eff, OpenIncoming):
                fault("destination.OpenIncoming")
                host.vm = await self.open_vm(eff.mid, eff.begin, host.peer)
                if eff.begin.digest:
                    host.vm.start_page_digest()  # the hash of each page as it is written (proto 7.4)
                result: Result | None = Opened(host.vm.info.protected_pages)
            else:
                result = await trio.to_thread.run_sync(host.perform, eff, eng.mid)
            if result is None:
                continue
            await self._perform(eng.on_result(result))
            if isinstance(result, Prepared) and result.persisted:
                self.log.info("prepared", phase="prepared", round=eng.round)

    async def _commit_window(self, eff: CommitAndActivate) -> None:
        """COMMITTED, the VM activated, DONE sent: shielded from cancellation (an agent
        asked to stop, or the session's deadline, waits for it) and bounded.  From
        COMMITTED on, the VM is this agent's whatever happens next: a failed
        activation leaves it committed and not running, retried by the agent."""
        eng = self.engine
        self.committing = True
        try:
            with trio.move_on_after(COMMIT_WINDOW) as scope:
                scope.shield = True
                result = await trio.to_thread.run_sync(self.host.perform, eff, eng.mid)
                assert isinstance(result, Committed)
                if result.committed and not result.running:
                    self.activation_error = result.error or "activation failed"
                    self.log.error("committed, but the VM does not run here: activation will be retried",
                                   phase="committed", error=self.activation_error)
                elif result.committed:
                    self.log.info("committed", phase="committed", round=eng.round)
                await self._perform(eng.on_result(result))  # DONE (or RUNNING; or, aborted before, ABORT)
                if eng.puller is not None and result.running and self.host.vm is not None:
                    eng.puller.in_order()  # (RUNNING is sent: the downtime is over, no vCPU waits yet)
                    self._watch_faults()  # post-copy: its guest runs now, asking for what it touches
                    if self.on_running is not None:
                        self.on_running(self.host.vm)
        finally:
            self.committing = False

    async def _fail(self, error: PalmError) -> None:
        """The engine's way out: abort forever and scrub, then ABORT (best effort)."""
        eng, host = self.engine, self.host
        if eng.mid is not None and "migration" not in self.log._context:  # (a refused BEGIN binds it here)
            self.log = self.log.bind(migration=eng.mid.hex())
        self.log.warning("incoming migration failed", phase="abort", error=error.code.value, reason=error.detail,
                         outcome=eng.outcome)
        try:
            with trio.move_on_after(5):
                await self._perform(eng.fail(error))
        except (PalmError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass  # the abort is durable before ABORT is sent; the send is best effort
        except STORAGE_ERRORS as exc:  # (OSError aside) the abort could not be recorded: tried again below
            self.log.error("the abort failed", phase="abort", error=describe_error(exc))
        if host.vm is not None:  # the abort did not complete: never leave memory behind (the row decides)
            mid = eng.mid if eng.npages else None
            try:
                if await trio.to_thread.run_sync(host.store.abort_forever, mid, host.vm,
                                                 f"{error.code}: {error.detail}"):
                    host.vm = None
            except STORAGE_ERRORS as exc:  # the agent settles it (and a restart, from the row)
                self.log.error("the abort could not be recorded", phase="abort", error=describe_error(exc))
