"""The trio shells around the migration engines: they move bytes, run tasks, keep time.

Each engine has one owner, the trio task that runs its session: every call
into an engine, its session protocol and the durable handoff happens on
the trio thread.  Worker threads get plain inputs and return plain outputs:
pages read from the VM, page batches written into it, records sealed or
opened (libsodium drops the GIL), a digest.

Source: a producer task reads the round's pages in a worker thread, a few
PAGES messages' worth (up to 1 MiB of data each) at a time, into reusable
buffers; the session task turns each batch into a PAGES message and its data
records (the engine) and seals them into the channel's Outbox, whose task
sends the previous batch meanwhile.  A receiver task reads the
destination's messages concurrently, so an ABORT stops the stream at once.

Destination: the channel's Inbox task reads the socket into reusable
buffers; the session task opens each buffer's records in place (a worker
thread), gives them to the engine one by one and hands the page batches to
an applier task, which writes them into the VM (a worker thread) while the
next buffer is opened.  Any other request of the engine waits until the
applier is idle: it may depend on the pages before it.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import numpy as np
import structlog
import trio
from nacl.signing import SigningKey

from palm_net.channel.transport import Inbox, Outbox, Record, SecureChannel
from palm_net.faults import fault
from palm_net.hypervisor.backend import (
    Backend,
    HostedVM,
    HypervisorError,
    NoRoomError,
    StreamBackend,
    describe_error,
)
from palm_net.hypervisor.protection import IntegrityError
from palm_net.hypervisor.qemu import read_stream
from palm_net.migration.destination import DestinationEngine
from palm_net.migration.effects import (
    Aborted,
    AbortForever,
    ApplyPages,
    CommitAndActivate,
    Committed,
    Effect,
    EndStream,
    ImportCpuState,
    ImportKeys,
    ImportProtection,
    KeysImported,
    Opened,
    OpenIncoming,
    Prepare,
    Prepared,
    ProtectionImported,
    Result,
    Send,
    Settle,
    Settled,
    StreamIn,
    StreamLoaded,
)
from palm_net.migration.handoff import STORAGE_ERRORS, HandoffStore, Peer, check_abort_token
from palm_net.migration.source import Pacer, SourceEngine
from palm_net.wire.errors import ErrorCode, MigrationFailure, PalmError, RemoteProtocolError
from palm_net.wire.messages import MAX_BULK, MAX_DATA_PAGES, PAGE_SIZE, Abort, Begin, Message, RoundDone
from palm_net.wire.pages import Buffer, RoundGfns
from palm_net.wire.protocol import FINAL

log = structlog.get_logger("palm.migration")

# Work goes to a worker thread in pieces of this many bulk messages (MAX_BULK
# of data each): a hop to a thread and back costs 30-80 us here, so pieces
# are MiB, not records; and each side holds a few of them, so not more (an
# agent stays within 64 MiB outside guest memory, docs/DATAPATH.md).
PER_HOP = 2
READ_AHEAD = 2  # source: pieces read ahead of the one being sealed
OUTBOX_BUFFER = PER_HOP * (MAX_BULK + 72 * 1024)  # a piece's records, sealed (header and framing included)
APPLY_WINDOW = 3  # destination: receive buffers handed to the applier and not yet written
COMMIT_WINDOW = 30.0  # destination: at most this long shielded for COMMIT, activation and DONE
CATCH_UP_WAIT = 2.0  # source: at most this long for the destination to write the last round before the pause


# Errors of the host's own storage, never of a connection.
LOCAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


class InDoubt(Exception):
    """The handoff point passed and the outcome is unknown: the VM stays paused."""


def session_error(exc: BaseException) -> PalmError:
    """What ended a session, in the one vocabulary (the I/O layer's own errors mapped once, here).
    A file system's error is named as it is (no space on which file system, an I/O
    error), never as a lost connection."""
    if isinstance(exc, PalmError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return RemoteProtocolError(ErrorCode.TIMEOUT, "the session ran out of time")
    if isinstance(exc, IntegrityError):
        return MigrationFailure(ErrorCode.INTEGRITY, str(exc))
    if isinstance(exc, NoRoomError):
        return MigrationFailure(ErrorCode.NO_SPACE, str(exc))
    if isinstance(exc, HypervisorError):
        return MigrationFailure(ErrorCode.HYPERVISOR, str(exc))
    if isinstance(exc, sqlite3.Error):  # the state database (a full or failing disk)
        full = "full" in str(exc)
        return MigrationFailure(ErrorCode.NO_SPACE if full else ErrorCode.HYPERVISOR, f"state database: {exc}")
    if isinstance(exc, TimeoutError):  # a local wait (QMP, a worker), not the peer
        return MigrationFailure(ErrorCode.TIMEOUT, describe_error(exc))
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in LOCAL_ERRNOS):
        return MigrationFailure(ErrorCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                else ErrorCode.HYPERVISOR, describe_error(exc))
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        return RemoteProtocolError(ErrorCode.CLOSED, f"connection lost ({describe_error(exc)})")
    raise exc


def first_error(group: BaseExceptionGroup[Any]) -> PalmError:
    """The first error of a nursery's group that is not a cancellation."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return session_error(exc)
    raise group


# --------------------------------------------------------------------------
# Source


class SourceRun:
    """One outgoing migration over an established channel."""

    def __init__(self, channel: SecureChannel, engine: SourceEngine, vm: HostedVM, store: HandoffStore,
                 on_progress: Callable[[], None] | None = None, started: float | None = None) -> None:
        self.ch = channel
        self.engine = engine
        self.vm = vm
        self.store = store
        self.on_progress = on_progress or (lambda: None)
        self.log = log.bind(migration=engine.mid.hex(), vm=engine.info.name, peer=channel.peer_name)
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](8)
        self.started = time.monotonic() if started is None else started
        self.abort_token: bytes | None = None  # a valid one from the destination, after COMMIT
        self._pacer = Pacer(engine.params.bandwidth, time.monotonic()) if engine.params.bandwidth else None
        self._written_round = -1  # the last round the destination says it has written (ROUND_DONE)
        self._round_written = trio.Event()

    # -- plumbing

    async def _receiver(self) -> None:
        while True:
            rec = await self.ch.receive()
            fault("source.receive")
            msg = self.engine.on_record(rec)
            if isinstance(msg.body, RoundDone):
                self._written_round = max(self._written_round, msg.body.round)
                self._round_written.set()
                self._round_written = trio.Event()
                continue
            await self._inbox_send.send(msg)
            if self.engine.proto.state in FINAL:
                return  # the session is over: a close from here on is not an error

    async def _send(self, messages: Sequence[bytes]) -> None:
        fault("source.send")
        await self._sent(await self.ch.send_batch([(m, False) for m in messages]))

    async def _sent(self, size: int) -> None:
        """``size`` bytes went on the wire: counted, and paced to the bandwidth cap."""
        self.engine.stats.transferred += size
        if self._pacer is not None:
            wait = self._pacer.sent(size, time.monotonic())
            if wait > 0:
                await trio.sleep(wait)

    async def _pump(self, read: Callable[[Any], tuple[Any, bool]], buffers: list[Any],
                    to_records: Callable[[Any], list[Buffer]]) -> None:
        """The bulk path: ``read(buffer)`` (a worker thread) fills one of ``buffers``
        and says whether it was the last; ``to_records`` (this task: the engine) makes
        the records of what was read, which the Outbox seals and sends."""
        free_send, free = trio.open_memory_channel[Any](len(buffers))
        for b in buffers:
            free_send.send_nowait(b)
        ready_send, ready = trio.open_memory_channel[tuple[Any, Any]](len(buffers) - 1)
        outbox = Outbox(self.ch, OUTBOX_BUFFER, on_sent=self._sent)

        async def produce() -> None:
            async with ready_send:
                last = False
                while not last:
                    buf = await free.receive()
                    item, last = await trio.to_thread.run_sync(read, buf)
                    await ready_send.send((item, buf))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(outbox.run)
            async for item, buf in ready:
                records = to_records(item)
                if records:
                    await outbox.put([(r, True) for r in records])
                del records, item  # views of buf: sealed, so buf is free again
                free_send.send_nowait(buf)
                self.on_progress()
            outbox.close()

    async def _expect(self, timeout: float) -> Message:
        with trio.fail_after(timeout):
            return await self._inbox.receive()

    # -- the migration

    async def run(self) -> None:
        """Raises PalmError (or InDoubt) on failure; the durable row then tells
        whether the outcome is in doubt (HANDED_OFF) or the VM may run here again."""
        try:
            await self._run()
        except BaseExceptionGroup as group:
            err = first_error(group)
            raise err from None

    async def _run(self) -> None:
        eng, st, timeout = self.engine, self.engine.stats, self.engine.params.reply_timeout
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receiver)
            await self._send([eng.begin()])
            eng.accepted(await self._expect(timeout))
            st.setup_time = time.monotonic() - self.started
            if eng.stream:
                await self._stream(cast(StreamBackend, self.vm))
            else:
                await self._precopy(cast(Backend, self.vm))
            st.marks.setdefault("last-byte", time.monotonic())  # (model: the last round, CPU state and blob sent)
            await self._send([eng.complete(*self.ch.sent)])
            completed_at = st.marks["complete"] = time.monotonic()
            self.log.debug("complete sent", phase="verify", round=eng.round,
                           paused_ms=round((time.monotonic() - (eng.paused_at or 0)) * 1000, 1))
            # Our digest (if asked) while the destination verifies: both run at once.
            digest: list[str] = []
            async with trio.open_nursery() as digest_nursery:
                if eng.params.verify_digest:
                    digest_nursery.start_soon(self._digest, digest)
                ready = await self._expect(timeout)
            st.marks["ready"] = time.monotonic()
            st.ready_wait = st.marks["ready"] - completed_at  # READY and our digest, if asked
            eng.check_ready(ready, digest[0] if digest else None)
            # A cancel the operator had asked for (while the row said SENDING) lands here,
            # not after the handoff: from this checkpoint to the durable write nothing yields.
            await trio.lowlevel.checkpoint()
            # The handoff point: durable before COMMIT leaves.
            if not self.store.hand_off(eng.mid):
                raise MigrationFailure(ErrorCode.CANCELLED, "migration was cancelled before the handoff")
            st.marks["handed-off"] = time.monotonic()
            self.log.info("handed off", phase="commit", round=eng.round)
            await self._send([eng.commit()])
            self._finish(await self._expect(timeout))
            nursery.cancel_scope.cancel()

    async def _digest(self, out: list[str]) -> None:
        out.append(await trio.to_thread.run_sync(self.vm.page_digest))

    async def _precopy(self, vm: Backend) -> None:
        """Pre-copy rounds until convergence, then stop-and-copy."""
        eng, st = self.engine, self.engine.stats

        def start() -> bytes:
            fault("source.vm.start")
            if eng.params.verify_digest:
                vm.start_page_digest()  # the hash of each page as it is sent (proto 7.4)
            vm.enable_dirty_log()  # before the first page is read
            return vm.export_keys()

        await self._send([eng.keys(await trio.to_thread.run_sync(start))])
        self.log.info("migration started", phase="round", round=0, pages=eng.info.npages)
        while True:
            t0, b0 = time.monotonic(), st.transferred
            await self._send_pages(vm, eng.pending)
            dirty = await trio.to_thread.run_sync(self._collect_dirty, vm)
            end_msg, stop, throttle = eng.end_round(time.monotonic() - t0, st.transferred - b0, dirty)
            if throttle is not None:
                vm.set_throttle(throttle)
            r = st.rounds[-1]
            self.log.info("round done", phase="round", round=r.round, pages=r.pages, dirty=r.dirty_pages,
                          seconds=round(r.duration, 4), expected_downtime=st.expected_downtime)
            await self._send([end_msg])
            if stop:
                # Pause once the destination has written this round: what it still
                # had to write would be downtime.  The guest runs meanwhile (its
                # writes go to the last copy); a slow destination is not waited for long.
                with trio.move_on_after(CATCH_UP_WAIT):
                    while self._written_round < r.round:
                        await self._round_written.wait()
                break

        def pause() -> tuple[float, Any]:
            fault("source.vm.pause")
            vm.pause()
            paused_at = time.monotonic()
            dirty = vm.collect_dirty()  # what the guest wrote until the pause
            vm.disable_dirty_log()
            return paused_at, dirty

        paused_at, dirty = await trio.to_thread.run_sync(pause)
        gfns = eng.stop_and_copy(paused_at, dirty)
        self.log.info("stop-and-copy", phase="stop-and-copy", round=eng.round, pages=len(gfns))
        b0 = st.transferred
        await self._send_pages(vm, gfns)
        cpu, blob = await trio.to_thread.run_sync(self._export_final, vm)
        await self._send(eng.final_state(cpu, blob))
        eng.end_final_round(time.monotonic() - paused_at, st.transferred - b0)

    @staticmethod
    def _collect_dirty(vm: Backend) -> Any:
        fault("source.vm.collect_dirty")
        return vm.collect_dirty()

    @staticmethod
    def _export_final(vm: Backend) -> tuple[bytes, bytes]:
        fault("source.vm.export_final")
        return vm.export_cpu_state(), vm.export_protection()

    async def _send_pages(self, vm: Backend, gfns: RoundGfns) -> None:
        """The pages of ``gfns``: read ahead in a worker thread, sent as PAGES messages."""
        eng, round_no, pos = self.engine, self.engine.round, [0]

        def read(out: Any) -> tuple[list[tuple[Any, int]], bool]:
            fault("source.vm.read_pages")
            batches = []
            for rows in range(0, PER_HOP * MAX_DATA_PAGES, MAX_DATA_PAGES):
                if pos[0] >= len(gfns):
                    break
                batch, pos[0] = vm.read_pages(gfns, pos[0], round_no, out[rows : rows + MAX_DATA_PAGES])
                batches.append((batch, pos[0]))
            return batches, pos[0] >= len(gfns)

        def to_records(batches: list[tuple[Any, int]]) -> list[Buffer]:
            return [r for batch, done in batches for r in eng.pages(batch, len(gfns) - done)]

        if len(gfns):
            # np.empty: memory a page backend that reads runs in place never touches.
            buffers = [np.empty((PER_HOP * MAX_DATA_PAGES, PAGE_SIZE), np.uint8) for _ in range(READ_AHEAD + 1)]
            await self._pump(read, buffers, to_records)

    async def _stream(self, vm: StreamBackend) -> None:
        """A stream backend: its own rounds and stop-and-copy; we carry the bytes."""
        eng, p = self.engine, self.engine.params
        self.log.info("migration started", phase="stream", backend=vm.backend, pages=eng.info.npages)
        fault("source.vm.start")
        conn = await trio.to_thread.run_sync(vm.start_stream, p.downtime_limit, p.bandwidth, p.auto_converge)

        def read(out: bytearray) -> tuple[memoryview, bool]:
            view = memoryview(out)
            n, ended = read_stream(conn, view)
            return view[:n], ended

        def to_records(data: memoryview) -> list[Buffer]:
            return [r for i in range(0, len(data), MAX_BULK) for r in eng.stream_chunk(data[i : i + MAX_BULK])]

        try:
            await self._pump(read, [bytearray(PER_HOP * MAX_BULK) for _ in range(READ_AHEAD + 1)], to_records)
            eng.stats.marks["last-byte"] = time.monotonic()  # QEMU's last byte read and sent on
        finally:
            conn.close()  # also on failure or cancel: QEMU sees its stream end
        fault("source.vm.export_final")
        stats = await trio.to_thread.run_sync(vm.finish_stream)
        await self._send([eng.stream_end(vm.paused_at, stats)])
        hv = eng.stats.hypervisor or {}
        self.log.info("stream done", phase="stop-and-copy", rounds=hv.get("rounds"), stream_bytes=eng.stream_bytes,
                      hypervisor_downtime_ms=hv.get("downtime_ms"))

    def _finish(self, msg: Message) -> None:
        eng = self.engine
        if isinstance(msg.body, Abort):
            # ABORT after COMMIT: only with a valid token may the source resume.
            if check_abort_token(self.ch.result.peer.sign_pub, eng.mid, msg.body.token):
                self.abort_token = msg.body.token
                raise MigrationFailure(ErrorCode.ABORTED, "destination refused the commit: " + msg.body.reason)
            raise InDoubt("an abort without a valid token after COMMIT")
        eng.done(msg, time.monotonic(), self.started)


# --------------------------------------------------------------------------
# Destination


class DestinationHost:
    """Performs a destination engine's requests on the incoming VM and the durable
    handoff.  Blocking, and touching neither the engine nor the session: the
    shell runs it in a worker thread (tests may call it directly)."""

    def __init__(self, store: HandoffStore, signing: SigningKey, peer: Peer) -> None:
        self.store = store
        self.signing = signing
        self.peer = peer
        self.vm: HostedVM | None = None

    def bulk(self, effects: Sequence[Effect]) -> None:
        """Page batches into the VM (protected ones verified on arrival), or stream bytes to it."""
        vm = self.vm
        assert vm is not None
        try:
            for eff in effects:
                fault(f"destination.{type(eff).__name__}")
                if isinstance(eff, ApplyPages):
                    cast(Backend, vm).write_pages(eff.batch)
                elif isinstance(eff, StreamIn):
                    cast(StreamBackend, vm).stream_in(eff.data)
        except (IntegrityError, HypervisorError, OSError) as exc:
            raise session_error(exc) from None

    def perform(self, eff: Effect, mid: bytes | None) -> Result | None:
        """One request (not Send, not OpenIncoming: those are the shell's); its result, if one is due.
        ``mid``: the session's migration id (None before a valid first message)."""
        fault(f"destination.{type(eff).__name__}")
        if isinstance(eff, AbortForever):
            # The row decides: a committed VM stays (this agent's now), whatever went wrong.
            recorded = eff.recorded and mid is not None
            if not self.store.abort_forever(mid if recorded else None, self.vm, eff.why):
                return Aborted(b"", aborted=False)
            self.vm = None
            return Aborted(self.store.abort_token(mid, self.peer.static_pub, self.signing)
                           if recorded and mid is not None else b"")
        vm = self.vm
        assert vm is not None and mid is not None  # the engine asks for these only after OpenIncoming
        try:
            if isinstance(eff, (ApplyPages, StreamIn)):
                self.bulk([eff])
                return None
            if isinstance(eff, ImportKeys):
                cast(Backend, vm).import_keys(eff.data)
                return KeysImported(vm.info.protected_pages)
            if isinstance(eff, ImportCpuState):
                cast(Backend, vm).import_cpu_state(eff.state)
                return None
            if isinstance(eff, ImportProtection):
                cast(Backend, vm).import_protection(eff.blob)
                return ProtectionImported(vm.info.protected_pages)
            if isinstance(eff, EndStream):
                cast(StreamBackend, vm).end_stream()
                return StreamLoaded()
            if isinstance(eff, Settle):
                cast(Backend, vm).settle()
                return Settled()
            if isinstance(eff, Prepare):
                persisted = self.store.prepare(mid, vm)
                return Prepared(persisted, bytes.fromhex(vm.page_digest()) if persisted and eff.digest else b"")
            if isinstance(eff, CommitAndActivate):
                act = self.store.commit_and_activate(mid, vm)
                return Committed(act.committed, act.running, act.error)
        except (IntegrityError, *STORAGE_ERRORS) as exc:
            raise session_error(exc) from None
        raise AssertionError(f"no host for {eff!r}")


class _Applier:
    """The destination's writer: page batches (or stream bytes) into the VM in a
    worker thread, in order, while the session task opens the next buffer;
    then the buffers their data lies in go back to the Inbox."""

    def __init__(self, host: DestinationHost, release: Callable[[bytearray], None]) -> None:
        self.host = host
        self.release = release
        self._send, self._recv = trio.open_memory_channel[tuple[list[Effect], list[bytearray]]](APPLY_WINDOW)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    async def submit(self, effects: list[Effect], bufs: list[bytearray]) -> None:
        if not effects and not bufs:
            return
        self._pending += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        await self._send.send((effects, bufs))

    async def drain(self) -> None:
        """Returns once everything submitted is written."""
        await self._idle.wait()

    async def run(self) -> None:
        async for effects, bufs in self._recv:
            if effects:
                await trio.to_thread.run_sync(self.host.bulk, effects)
            del effects
            for buf in bufs:
                self.release(buf)
            self._pending -= 1
            if not self._pending:
                self._idle.set()


class DestinationRun:
    """One incoming migration over an established channel.

    ``open_vm(mid, begin, peer)`` is the agent's part of BEGIN: admission, the
    incoming VM, the durable row (MigrationFailure when refused).
    """

    def __init__(self, channel: SecureChannel, engine: DestinationEngine, store: HandoffStore, signing: SigningKey,
                 open_vm: Callable[[bytes, Begin, Peer], Awaitable[HostedVM]]) -> None:
        self.ch = channel
        self.engine = engine
        self.open_vm = open_vm
        self.committing = False  # inside the commit window (an agent asked to stop waits for it)
        self.activation_error: str | None = None  # committed, but the VM does not run (retried by the agent)
        peer = channel.result.peer
        self.host = DestinationHost(store, signing, Peer(peer.name, peer.static_pub, peer.sign_pub))
        self.log = log.bind(peer=channel.peer_name)

    @property
    def vm(self) -> HostedVM | None:
        return self.host.vm

    async def run(self) -> PalmError | None:
        """The session, to its end; returns what ended it early (it is logged), None if it ran through."""
        eng = self.engine
        started = trio.current_time()
        error: PalmError | None = None
        try:
            with trio.fail_at(eng.deadline(started)) as deadline:
                async with trio.open_nursery() as nursery:
                    inbox = Inbox(self.ch)
                    applier = _Applier(self.host, inbox.release)
                    chunks_send, chunks = trio.open_memory_channel[tuple[bytearray, int]](1)
                    nursery.start_soon(inbox.run, chunks_send)
                    nursery.start_soon(applier.run)
                    async for buf, end in chunks:
                        await self._process(await inbox.open(buf, end), buf, applier)
                        if eng.state in FINAL:
                            break
                        # An absolute deadline: a peer trickling bytes cannot hold its
                        # slot forever (BEGIN soon, then time in proportion to the memory).
                        deadline.deadline = eng.deadline(started)
                    await applier.drain()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = first_error(group)
        except Exception as exc:
            error = session_error(exc)
        finally:
            with trio.CancelScope(shield=True):
                if eng.outcome not in ("committed", "aborted"):  # cancelled, failed, or the peer went away
                    error = error or RemoteProtocolError(ErrorCode.CLOSED, "session ended before COMMIT")
                    await self._fail(error)
        return error

    async def _process(self, records: list[Record], buf: bytearray, applier: _Applier) -> None:
        """One buffer's records through the engine, in order: page batches to the
        applier, any other request once the applier is idle (it may depend on
        them); the buffer goes back once its batches are written."""
        eng = self.engine
        fault("destination.receive")
        bulk: list[Effect] = []
        for i in range(len(records)):
            if eng.state in FINAL:
                break
            effects = eng.on_record(records[i])
            if eng.mid is not None and "migration" not in self.log._context:
                self.log = self.log.bind(migration=eng.mid.hex())
            while effects:
                eff = effects.pop(0)
                if isinstance(eff, (ApplyPages, StreamIn)):
                    bulk.append(eff)
                    continue
                await applier.submit(bulk, [])
                bulk = []
                await applier.drain()
                await self._perform([eff])
        records.clear()  # views of buf: only the batches hold it now
        await applier.submit(bulk + eng.flush(), [buf])

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
                await self._perform(eng.on_result(result))  # DONE (or, aborted before, ABORT)
        finally:
            self.committing = False

    async def _fail(self, error: PalmError) -> None:
        """The engine's way out: abort forever and scrub, then ABORT (best effort)."""
        eng, host = self.engine, self.host
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
