"""The trio shell around the migration engines: moves bytes, runs tasks, keeps time.

Source pipeline: a producer advances the engine's message generator in a
worker thread (reading pages, encoding and sealing records; libsodium
releases the GIL) and hands ~1 MiB chunks of sealed frames through a bounded
memory channel to the sender task, which writes them to the socket.  The
window of chunks in flight bounds the agent's memory whatever the guest size.
A receiver task reads the destination's messages concurrently so an ABORT
stops the stream at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import structlog
import trio

from palm_net.channel.transport import SecureChannel
from palm_net.hypervisor.backend import PAGE_SIZE, HypervisorError
from palm_net.migration.engine import (
    DestinationEngine,
    MigrationFailure,
    SourceEngine,
    StreamSourceEngine,
    check_abort_token,
    describe,
)
from palm_net.migration.store import HandoffStore
from palm_net.trioutil import single_error
from palm_net.wire.errors import ProtocolError
from palm_net.wire.messages import Message
from palm_net.wire.protocol import CLEAR_ALLOWED, State

log = structlog.get_logger("palm.migration")

RECORDS_PER_CHUNK = 16  # ~1 MiB of frames per hand-off to the sender
RECV_CHUNK = 1 << 20  # destination: bytes per socket read handed to the worker
WINDOW = 4  # chunks in flight between producer and sender
IDLE_TIMEOUT = 60.0  # destination: longest silence from the source
BEGIN_TIMEOUT = 30.0  # destination: BEGIN within this of the session's start
SESSION_BASE = 120.0  # destination: a whole migration within this plus DEADLINE_PER_GIB per GiB
DEADLINE_PER_GIB = 150.0


@dataclass
class Flush:
    done: trio.Event


class InDoubt(Exception):
    """The handoff point passed and the outcome is unknown: the VM stays paused."""


class SourceRun:
    """One outgoing migration over an established channel."""

    def __init__(self, channel: SecureChannel, engine: SourceEngine | StreamSourceEngine, store: HandoffStore,
                 on_progress: Callable[[], None] | None = None, started: float | None = None) -> None:
        self.ch = channel
        self.engine = engine
        self.store = store
        self.on_progress = on_progress or (lambda: None)
        self.log = log.bind(migration=engine.mid.hex(), vm=engine.info.name, peer=channel.peer_name)
        self._send, self._recv = trio.open_memory_channel[bytes | Flush](WINDOW)
        self._inbox_send, self._inbox = trio.open_memory_channel[Message](8)
        self.started = time.monotonic() if started is None else started
        self.handed_off = False

    # -- plumbing

    async def _sender(self) -> None:
        stats, cap = self.engine.stats, self.engine.params.bandwidth
        t0, sent = time.monotonic(), 0
        async for item in self._recv:
            if isinstance(item, Flush):
                item.done.set()
                continue
            await self.ch.stream.send_all(item)
            sent += len(item)
            stats.transferred += len(item)
            if cap:  # pacing to the bandwidth cap
                ahead = sent / cap - (time.monotonic() - t0)
                if ahead > 0:
                    await trio.sleep(ahead)

    async def _receiver(self) -> None:
        while True:
            data = await self.ch.receive_record()
            msg = self.engine.receive(data)
            if msg.type == "ABORT" and self.engine.proto.state is State.ABORTED and not self.handed_off:
                raise MigrationFailure(msg.body["code"], "destination aborted: " + msg.body["reason"])
            await self._inbox_send.send(msg)
            if self.engine.proto.state in (State.DONE, State.ABORTED):
                return  # the session is over: a close from here on is not an error

    def _seal_some(self, it: Iterator[bytes], limit: int) -> tuple[bytes, bool]:
        parts: list[bytes] = []
        seal, proto = self.ch.sender.seal_parts, self.engine.proto
        plain = self.ch.sender.plain
        for msg in it:
            # Each message is yielded right after the protocol made it: in the
            # plain benchmark mode, only bulk data goes in the clear.
            parts.extend(seal(msg, plain and proto.last_sent in CLEAR_ALLOWED))
            if len(parts) >= 2 * limit:
                return b"".join(parts), False  # one copy of the chunk, not one per frame
        return b"".join(parts), True

    async def _pump(self, messages: Iterable[bytes]) -> None:
        it = iter(messages)
        try:
            while True:
                chunk, done = await trio.to_thread.run_sync(self._seal_some, it, RECORDS_PER_CHUNK)
                if chunk:
                    await self._send.send(chunk)
                self.on_progress()
                if done:
                    return
        finally:
            # A generator left half-way (failure, cancel) releases what it holds
            # now (a hypervisor's migration socket), not when the traceback dies.
            close = getattr(it, "close", None)
            if close is not None:
                close()

    async def _flush(self) -> None:
        ev = trio.Event()
        await self._send.send(Flush(ev))
        await ev.wait()

    async def _expect(self, mtype: str, timeout: float) -> Message:
        with trio.fail_after(timeout):
            msg = await self._inbox.receive()
        if msg.type != mtype:
            raise MigrationFailure(msg.body.get("code", "protocol"), f"expected {mtype}, got {msg.type}")
        return msg

    # -- the migration

    async def run(self) -> None:
        """Raises on failure; ``handed_off`` then tells whether the outcome is in doubt."""
        with single_error():
            await self._run()

    async def _run(self) -> None:
        eng, st = self.engine, self.engine.stats
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sender)
            nursery.start_soon(self._receiver)
            await self._pump([eng.begin()])
            await self._expect("ACCEPT", self.engine.params.reply_timeout)
            st.setup_time = time.monotonic() - self.started
            if isinstance(eng, StreamSourceEngine):
                self.log.info("migration started", phase="stream", backend=eng.backend, pages=eng.info.npages)
                await self._pump(eng.stream_messages())
                hv = st.hypervisor or {}
                self.log.info("stream done", phase="stop-and-copy", rounds=hv.get("rounds"),
                              stream_bytes=eng.stream_bytes, hypervisor_downtime_ms=hv.get("downtime_ms"))
            else:
                await self._precopy(eng)
            await self._pump([eng.complete(self.ch.sender.count, self.ch.sender.transcript)])
            self.log.debug("complete sent", phase="verify", round=eng.round,
                           paused_ms=round((time.monotonic() - (eng.paused_at or 0)) * 1000, 1))
            # Our digest (if asked) while the destination verifies: both run at once.
            async with trio.open_nursery() as digest_nursery:
                digest_nursery.start_soon(trio.to_thread.run_sync, eng.digest_paused)
                ready = await self._expect("READY", self.engine.params.reply_timeout)
            eng.check_ready(ready)
            # The handoff point: durable before COMMIT leaves.
            if not self.store.transition(eng.mid, ("sending",), "handed_off"):
                raise MigrationFailure("state", "migration was cancelled before the handoff")
            self.handed_off = True
            self.log.info("handed off", phase="commit", round=eng.round)
            await self._pump([eng.commit()])
            await self._flush()
            with trio.fail_after(self.engine.params.reply_timeout):
                msg = await self._inbox.receive()
            self._finish(msg)
            nursery.cancel_scope.cancel()

    async def _precopy(self, eng: SourceEngine) -> None:
        """Pre-copy rounds until convergence, then stop-and-copy."""
        st = eng.stats
        await self._pump([eng.start()])
        self.log.info("migration started", phase="round", round=0, pages=eng.info.npages)
        while True:
            t0, b0 = time.monotonic(), st.transferred
            await self._pump(eng.page_messages())
            await self._flush()
            end_msg, stop = eng.end_round(time.monotonic() - t0, st.transferred - b0)
            r = st.rounds[-1]
            self.log.info("round done", phase="round", round=r.round, pages=r.pages, dirty=r.dirty_pages,
                          seconds=round(r.duration, 4), expected_downtime=st.expected_downtime)
            await self._pump([end_msg])
            if stop:
                break
        self.log.info("stop-and-copy", phase="stop-and-copy", round=eng.round, pages=len(eng.pending))
        await self._pump(eng.stop_and_copy())

    def _finish(self, msg: Message) -> None:
        eng, st = self.engine, self.engine.stats
        if msg.type == "DONE":
            st.downtime = time.monotonic() - (eng.paused_at or time.monotonic())
            st.total_time = time.monotonic() - self.started
            st.status = st.phase = "completed"
            return
        # ABORT after COMMIT: only with a valid token may the source resume.
        token = msg.body.get("token", b"")
        if msg.type == "ABORT" and check_abort_token(self.ch.result.peer.sign_pub, eng.mid, token):
            raise MigrationFailure("aborted", "destination refused the commit: " + msg.body.get("reason", ""))
        raise InDoubt("unexpected answer to COMMIT")


class DestinationRun:
    """One incoming migration over an established channel."""

    def __init__(self, channel: SecureChannel, engine: DestinationEngine,
                 idle_timeout: float = IDLE_TIMEOUT, deadline_per_gib: float = DEADLINE_PER_GIB) -> None:
        self.ch = channel
        self.engine = engine
        self.idle_timeout = idle_timeout
        self.deadline_per_gib = deadline_per_gib
        self.log = log.bind(peer=channel.peer_name)

    async def _reader(self, send: trio.MemorySendChannel[bytes]) -> None:
        async with send:
            while True:
                with trio.fail_after(self.idle_timeout):
                    data = await self.ch.stream.receive_some(RECV_CHUNK)
                if not data:
                    raise ProtocolError("closed", "peer closed the connection")
                await send.send(bytes(data))

    def _process(self) -> list[bytes]:
        """Worker thread: opens, decodes and applies every whole record buffered."""
        eng, rx = self.engine, self.ch.receiver
        replies: list[bytes] = []
        while eng.state not in (State.DONE, State.ABORTED):
            before, count = rx.transcript, rx.count
            rec = rx.next_record()
            if rec is None:
                break
            replies += eng.receive(rec, before, count, rx.authenticated)
        return replies

    async def run(self) -> None:
        """Pipelined: the trio task reads the socket while a worker thread
        decrypts and applies what arrived before (libsodium drops the GIL)."""
        eng, ch = self.engine, self.ch
        started = trio.current_time()
        try:
            # An absolute deadline: a peer trickling bytes cannot hold its slot
            # forever.  BEGIN comes soon; the whole migration then gets time
            # in proportion to the memory it announced.
            with single_error(), trio.fail_at(started + BEGIN_TIMEOUT) as deadline:
                async with trio.open_nursery() as nursery:
                    send, recv = trio.open_memory_channel[bytes](WINDOW)
                    # Records that arrived with the last handshake message are
                    # already buffered: handle them before waiting for more.
                    await send.send(b"")
                    nursery.start_soon(self._reader, send)
                    async for chunk in recv:
                        ch.receiver.receive_data(chunk)
                        replies = await trio.to_thread.run_sync(self._process)
                        if eng.mid is not None and "migration" not in self.log._context:
                            self.log = self.log.bind(migration=eng.mid.hex())
                        if eng.npages and deadline.deadline == started + BEGIN_TIMEOUT:
                            gib = eng.npages * PAGE_SIZE / (1 << 30)
                            deadline.deadline = started + SESSION_BASE + self.deadline_per_gib * gib
                        for r in replies:
                            await ch.send_record(r)
                        if replies and eng.outcome in ("prepared", "committed"):
                            self.log.info(eng.outcome, phase=eng.outcome, round=eng.round)
                        if eng.state in (State.DONE, State.ABORTED):
                            nursery.cancel_scope.cancel()
        except (ProtocolError, MigrationFailure, HypervisorError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as exc:
            code, reason = describe(exc, "timeout" if isinstance(exc, trio.TooSlowError) else "closed")
            abort = eng.fail(code, reason)
            self.log.warning("incoming migration failed", phase="abort", error=code, reason=reason,
                             outcome=eng.outcome)
            if abort is not None:
                with trio.move_on_after(2):
                    try:
                        await ch.send_record(abort)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            raise

