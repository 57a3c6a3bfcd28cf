"""The thin trio shell: runs the sans-IO handshake and record layer over a stream.

Besides one record at a time (``send``, ``receive``), a channel has a bulk
path for the migration's page and stream data: ``Outbox`` seals records
into reusable buffers in a worker thread while one task sends the previous
ones; ``Inbox`` reads the socket into reusable buffers and opens the
records where they lie.  No record is copied on either side but by the
kernel and the cipher.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import trio

from palm_net.channel.handshake import (
    AttestedHandshake,
    ChannelConfig,
    HandshakeResult,
    Purpose,
    TransportMode,
)
from palm_net.channel.records import Record, RecordReceiver, RecordSender
from palm_net.crypto.noise import Buffer, CipherName
from palm_net.errors import ErrorCode, HandshakeError, RemoteProtocolError
from palm_net.trioutil import ConflictDetector
from palm_net.wire.protocol import REPLY_TIMEOUT

__all__ = ["Inbox", "Outbox", "Record", "SecureChannel", "ThreadReceiver", "ThreadSender", "accept", "connect"]

RECV_CHUNK = 256 * 1024
# A send moves this much at a time, each piece within the channel's send timeout
# (the peer must take 256 KiB in it: a link of 1 Mbit/s does in 2 s).
SEND_CHUNK = 256 * 1024
# Linux's TCP_USER_TIMEOUT on every session's socket, in ms: data the peer has not
# acknowledged after the reply timeout (a host gone, a link cut without a reset, a
# peer whose window stays shut) ends the connection in the kernel too (proto 1).
# Never less (a lost segment's retransmissions must fit); more for a source whose
# reply timeout is longer (its send timeout), so the kernel never cuts first.
TCP_USER_TIMEOUT_MS = int(REPLY_TIMEOUT * 1000)


def set_user_timeout(stream: trio.abc.Stream, seconds: float = REPLY_TIMEOUT) -> None:
    """TCP_USER_TIMEOUT on a TCP stream's socket (at least TCP_USER_TIMEOUT_MS), where
    the platform has it (Linux)."""
    opt = getattr(socket, "TCP_USER_TIMEOUT", None)
    if opt is None or not isinstance(stream, trio.SocketStream) or \
            stream.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # (a connection already broken: the handshake says so)
        stream.setsockopt(socket.IPPROTO_TCP, opt, max(TCP_USER_TIMEOUT_MS, int(seconds * 1000)))


# The queues of a session's socket (docs/QEMU.md): what the kernel holds between two
# agents when a hypervisor pauses its guest is drained inside the downtime, and the
# kernel's autotuning let 4 MiB wait unsent and up to 32 MiB unread here.
NOTSENT_LOWAT = 128 * 1024  # unsent bytes beyond what is in flight (no cost to throughput)
RECEIVE_QUEUE = 512 * 1024  # a session's receive window, where it still carries LINK_RATE
LINK_RATE = 25e9 / 8  # bytes/s a session must keep: a 25 Gbit/s link
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_TCPI_RTT = 68  # struct tcp_info: tcpi_rtt, u32 microseconds


def _rmem_max() -> int:
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def bound_queues(stream: trio.abc.Stream) -> None:
    """A hypervisor stream's session (after its handshake, whose round trips
    measured the link): its unsent bytes bounded, and its receive window too where
    the round trip lets RECEIVE_QUEUE carry LINK_RATE (a window then lasts a round
    trip); elsewhere the kernel's autotuning stays, which a long round trip needs.
    Not a page backend's: its source waits for the last round to be written before
    it pauses.  Linux only; best effort."""
    if not isinstance(stream, trio.SocketStream) or stream.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        info = stream.socket.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), _TCPI_RTT + 4)
        rtt = int.from_bytes(info[_TCPI_RTT : _TCPI_RTT + 4], "little") / 1e6 if len(info) >= _TCPI_RTT + 4 else 0
        window = min(RECEIVE_QUEUE, _rmem_max())  # (the kernel caps SO_RCVBUF there)
        if 0 < rtt and window >= LINK_RATE * rtt:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)


class SecureChannel:
    """An attested session: the only way into its record layer.

    Sending and receiving are each one task's at a time (ConflictDetector);
    sealing and opening many records run in a worker thread (libsodium drops
    the GIL), while the cipher states stay the channel's own.
    """

    def __init__(self, stream: trio.abc.Stream, result: HandshakeResult, leftover: bytes = b"") -> None:
        self.stream = stream
        self.result = result
        self._sender: RecordSender = result.sender
        self._receiver: RecordReceiver = result.receiver
        if leftover:
            self._receiver.receive_data(leftover)
        self._sending = ConflictDetector("another task is sending on this channel")
        self._sealing = ConflictDetector("another task is sealing on this channel")
        self._receiving = ConflictDetector("another task is receiving on this channel")
        self._raw: socket.socket | None = None  # see read_ready
        self._send_timeout = REPLY_TIMEOUT  # (the socket's TCP_USER_TIMEOUT is set by the handshake)
        # Sessions that close with this one, after it (a migration's data sessions,
        # proto 7.8: its ABORT on this session goes before they close).
        self.bound: list[SecureChannel] = []

    def __repr__(self) -> str:
        return f"SecureChannel(peer={self.peer_name!r}, {self.result.protocol_name})"

    @property
    def peer_name(self) -> str:
        return self.result.peer.name

    @property
    def plain(self) -> bool:
        """The plain benchmark mode: bulk records may go in the clear."""
        return self._sender.plain

    @property
    def sent(self) -> tuple[int, bytes]:
        """(records sent, send transcript): what COMPLETE binds."""
        return self._sender.count, self._sender.transcript

    # -- sending

    @property
    def send_timeout(self) -> float:
        """A send the peer takes nothing of for this long ends the session (a source: its
        reply timeout), whether the peer is gone or alive and not reading."""
        return self._send_timeout

    @send_timeout.setter
    def send_timeout(self, seconds: float) -> None:
        self._send_timeout = seconds
        set_user_timeout(self.stream, seconds)

    async def send(self, plaintext: bytes) -> int:
        """One record, sealed; returns the bytes put on the wire."""
        return await self.send_batch([(plaintext, False)])

    async def send_batch(self, messages: Sequence[tuple[bytes, bool]]) -> int:
        """Records in order: (plaintext, bulk) pairs, bulk ones in the clear in the
        plain benchmark mode; returns the bytes put on the wire."""
        with self._sending, self._sealing:
            parts: list[bytes] = []
            for data, bulk in messages:
                parts.extend(self._sender.seal_parts(data, self.plain and bulk))
            frames = b"".join(parts)
            await self._send_all(frames)
        return len(frames)

    def frames_size(self, messages: Sequence[tuple[Buffer, bool]]) -> int:
        return sum(RecordSender.frame_size(len(m), self.plain) for m, _ in messages)

    def seal_into(self, messages: Sequence[tuple[Buffer, bool]], out: memoryview) -> int:
        """Seals records in order into ``out`` (blocking: a worker thread's); returns
        the bytes written.  The caller sends them before anything sealed later."""
        with self._sealing:
            pos = 0
            for data, bulk in messages:
                pos += self._sender.seal_into(data, out[pos:], self.plain and bulk)
            return pos

    async def send_sealed(self, frames: Buffer) -> None:
        with self._sending:
            await self._send_all(frames)

    async def _send_all(self, frames: Buffer) -> None:
        """``frames`` onto the stream, SEND_CHUNK at a time, each within ``send_timeout``:
        a peer that takes nothing for that long ends the session (``timeout``) instead of
        holding its sender for ever (trio's send_all has no deadline of its own)."""
        with memoryview(frames) as view:
            for pos in range(0, len(view) or 1, SEND_CHUNK):
                with trio.move_on_after(self.send_timeout) as scope:
                    await self.stream.send_all(view[pos : pos + SEND_CHUNK])
                if scope.cancelled_caught:
                    raise _took_nothing(self.send_timeout)

    # -- receiving

    async def receive(self) -> Record:
        """The next record, which must have been sealed (the clear records of the plain
        benchmark mode carry bulk data only, which only the Inbox returns)."""
        with self._receiving:
            while True:
                rec = self._open_one()
                if rec is not None:
                    if not rec.authenticated:
                        self._receiver.failed = True
                        raise RemoteProtocolError(ErrorCode.UNAUTHENTICATED, "a record arrived in the clear")
                    return rec
                self._receiver.receive_data(await self._read_some(RECV_CHUNK))

    def _open_one(self) -> Record | None:
        rx = self._receiver
        index, before = rx.count, rx.transcript
        data = rx.next_record()
        return None if data is None else Record(data, index, before, rx.authenticated)

    async def _read_some(self, max_bytes: int) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        if not data:
            raise RemoteProtocolError(ErrorCode.CLOSED, "peer closed the connection")
        return bytes(data)

    def read_ready(self, view: memoryview) -> int:
        """Reads what the socket holds already into ``view``, never waiting (0 if
        nothing, or no socket); an end of stream is left for ``read_into`` to see."""
        if self._raw is None:
            sock = getattr(self.stream, "socket", None)
            if sock is None:
                return 0
            # Our own handle on the socket (a duplicate descriptor): the stdlib's
            # recv_into with MSG_DONTWAIT, which trio's socket has no way to ask for.
            self._raw = socket.socket(fileno=os.dup(sock.fileno()))
        got = 0
        while got < len(view):
            try:
                n = self._raw.recv_into(view[got:], 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # read_into raises it, in trio
            if not n:
                break
            got += n
        return got

    async def read_into(self, view: memoryview) -> int:
        """Reads what the socket has into ``view`` (at least one byte)."""
        sock = getattr(self.stream, "socket", None)
        if sock is not None:
            got: int = await sock.recv_into(view)
        else:  # a stream without a socket (tests): one copy
            data = await self.stream.receive_some(len(view))
            got = len(data)
            view[:got] = data
        if not got:
            raise RemoteProtocolError(ErrorCode.CLOSED, "peer closed the connection")
        return got

    async def aclose(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        try:
            await self.stream.aclose()
        finally:
            while self.bound:
                await self.bound.pop().aclose()


def _took_nothing(timeout: float) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.TIMEOUT, f"the peer took nothing sent for {timeout:g} s (not reading, "
                                                  "or unreachable)")


@contextlib.contextmanager
def _lend(detector: ConflictDetector) -> Iterator[None]:
    """Holds ``detector`` from here until the lent socket's ``close``; not if lending fails."""
    detector.__enter__()
    try:
        yield
    except BaseException:
        detector.__exit__()
        raise


def _begin(rx: RecordReceiver, view: memoryview, carry: bytes) -> tuple[int, int]:
    """A receive buffer begun with the frame cut at the end of the last: the bytes in it,
    and where its whole frames end."""
    view[: len(carry)] = carry
    return len(carry), rx.whole_frames(view, len(carry))


class _LentSocket:
    """A session's socket lent to one worker thread (a stream relay's), one way: a
    descriptor of its own on the same socket, which trio keeps non-blocking, so a
    call that would block polls it, with ``abort`` (from any thread) beside it to
    end a wait at once."""

    def __init__(self, channel: SecureChannel, events: int) -> None:
        sock = getattr(channel.stream, "socket", None)
        if sock is None:
            raise TypeError("only a socket's session is lent to a thread")
        self.ch = channel  # (its sending or receiving detector already held: _lend)
        self.aborted = False
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            self._sock.close()
            raise
        self._lock = threading.Lock()  # abort (any thread) against close: never a descriptor closed
        self._poll = select.poll()
        self._poll.register(self._sock, events)
        self._poll.register(self._wake_r, select.POLLIN)

    def _wait(self, timeout: float | None) -> bool:
        """Until the socket is ready (True), aborted, or ``timeout`` passed (False)."""
        return bool(self._poll.poll(None if timeout is None else max(timeout, 0.0) * 1000))

    def abort(self) -> None:
        """Any thread: the thread's wait ends now; after ``close``, nothing (its descriptors
        are closed, and their numbers may be someone else's by then)."""
        with self._lock:
            self.aborted = True
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"!")

    def close(self) -> None:
        """The owner's, once the thread is done (again: nothing)."""
        with self._lock:
            if self._wake_w < 0:
                return
            self._sock.close()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1


class ThreadSender(_LentSocket):
    """A session's sending side lent to a worker thread: records sealed and sent there,
    blocking, with no hop to trio between them, each piece (SEND_CHUNK) taken within
    the channel's send timeout as in ``send_sealed``.  Nothing else sends on it until
    ``close``."""

    def __init__(self, channel: SecureChannel) -> None:
        with _lend(channel._sending):
            super().__init__(channel, select.POLLOUT)
        self.timeout = channel.send_timeout
        self._out = bytearray()

    def seal_and_send(self, messages: Sequence[tuple[Buffer, bool]]) -> int:
        """Records in order (as ``Outbox.put``); the bytes put on the wire, all of them
        unless aborted."""
        need = self.ch.frames_size(messages)
        if len(self._out) < need:
            self._out = bytearray(need)
        with memoryview(self._out) as out:
            size = self.ch.seal_into(messages, out)
            pos = 0
            while pos < size and not self.aborted:
                piece, deadline = min(size, pos + SEND_CHUNK), time.monotonic() + self.timeout
                while pos < piece and not self.aborted:
                    try:
                        pos += self._sock.send(out[pos:piece], socket.MSG_DONTWAIT)
                        continue
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError as exc:
                        raise RemoteProtocolError(ErrorCode.CLOSED, f"connection lost ({_lost(exc)})") from None
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._wait(left):
                        raise _took_nothing(self.timeout)
        return size

    def close(self) -> None:
        if self._wake_w >= 0:
            self.ch._sending.__exit__()
        super().close()


class ThreadReceiver(_LentSocket):
    """A session's receiving side lent to a worker thread: its records read and opened
    there in a buffer of its own, as an ``Inbox`` does.  ``close`` gives what was read
    and not yet opened (a frame's start) back to the channel, for whoever reads it next."""

    def __init__(self, channel: SecureChannel, size: int = 2 << 20) -> None:
        with _lend(channel._receiving):
            super().__init__(channel, select.POLLIN)
        self._rx = channel._receiver
        self.buffer = bytearray(size)
        self._carry = self._rx.take_buffered()

    def records(self) -> list[Record] | None:
        """The next whole records, opened (views of a buffer that is reused at the next
        call); None once the peer closed the connection or the receiver was aborted."""
        rx = self._rx
        with memoryview(self.buffer) as view:
            filled, end = _begin(rx, view, self._carry)
            while not end:
                try:
                    n = self._sock.recv_into(view[filled:], 0, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    if not self.aborted:
                        self._wait(None)
                        continue
                    n = 0
                except OSError as exc:
                    raise RemoteProtocolError(ErrorCode.CLOSED, f"connection lost ({_lost(exc)})") from None
                if not n:
                    self._carry = bytes(view[:filled])
                    return None
                filled += n
                end = rx.whole_frames(view, filled)
            self._carry = bytes(view[end:filled])
            return rx.open_in_place(view[:end])

    def close(self) -> None:
        if self._wake_w >= 0:
            self._rx.receive_data(self._carry)
            self._carry = b""
            self.ch._receiving.__exit__()
        super().close()


class _Buffers:
    """A bounded pool of reusable bytearrays (taken first from ``spares``, if given).
    One still viewed (a record's data held somewhere) cannot be resized: it is left
    to the garbage collector and a fresh one takes its place, so a buffer is never
    written while anything sees it."""

    def __init__(self, count: int, size: int, spares: list[bytearray] | None = None) -> None:
        self.size = size
        self._send, self._recv = trio.open_memory_channel[bytearray](count)
        for _ in range(count):
            self._send.send_nowait(spares.pop() if spares else self._new())

    def give_back(self, spares: list[bytearray]) -> None:
        """The buffers in the pool now, to ``spares`` (for the next pool)."""
        while True:
            try:
                spares.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def _new(self) -> bytearray:
        buf = bytearray(self.size + 1)
        del buf[-1]  # a byte to spare: the check below then never reallocates
        return buf

    async def get(self) -> bytearray:
        buf = await self._recv.receive()
        try:
            buf.append(0)  # BufferError while any view of it lives
            buf.pop()
        except BufferError:
            buf = self._new()
        return buf

    def put(self, buf: bytearray) -> None:
        self._send.send_nowait(buf)


class Outbox:
    """The sending side of the bulk path: ``put`` seals a batch of records into a
    free buffer (in a worker thread) while ``run`` (one task) sends the earlier
    ones, in order; ``run`` returns once ``close`` was called and all is sent.
    Nothing else may send on the channel meanwhile."""

    def __init__(self, channel: SecureChannel, size: int, buffers: int = 3,
                 on_sent: Callable[[int], Awaitable[None]] | None = None,
                 spares: list[bytearray] | None = None) -> None:
        self.ch = channel
        self._spares = spares  # buffers of an earlier Outbox: already touched, taken and given back
        self._pool = _Buffers(buffers, size, spares)
        self._queue_send, self._queue = trio.open_memory_channel[tuple[bytearray, int]](buffers - 1)
        self._on_sent = on_sent

    async def put(self, messages: Sequence[tuple[Buffer, bool]]) -> int:
        """Seals ``messages`` (plaintext, bulk) and queues them; returns their size on the wire."""
        need = self.ch.frames_size(messages)
        buf = await self._pool.get() if need <= self._pool.size else bytearray(need)
        with memoryview(buf) as view:
            size = await trio.to_thread.run_sync(self.ch.seal_into, messages, view)
        await self._queue_send.send((buf, size))
        return size

    def close(self) -> None:
        self._queue_send.close()

    async def run(self) -> None:
        async for buf, size in self._queue:
            with memoryview(buf) as view:
                await self.ch.send_sealed(view[:size])
            if len(buf) == self._pool.size:
                self._pool.put(buf)
            if self._on_sent is not None:
                await self._on_sent(size)
        if self._spares is not None:  # all sent: each buffer is back in the pool, or lost to a cancel
            self._pool.give_back(self._spares)


class Inbox:
    """The receiving side of the bulk path: ``run`` (one task) reads the socket into
    free buffers and passes on each buffer's whole frames; ``open`` opens them in
    place (in a worker thread), and ``release`` gives a buffer back once nothing
    needs its records any more."""

    def __init__(self, channel: SecureChannel, size: int = 2 << 20, buffers: int = 3) -> None:
        if size < 2 * (65536 + 8):
            raise ValueError("an Inbox buffer holds at least two largest frames")
        self.ch = channel
        self._pool = _Buffers(buffers, size)
        # Bytes that arrived with the handshake: the start of the first buffer.
        self._carry = channel._receiver.take_buffered()
        self.closed: RemoteProtocolError | None = None  # the peer closed the connection (after what was passed on)

    async def run(self, out: trio.MemorySendChannel[tuple[bytearray, int]]) -> None:
        """Waits for bytes, then takes whatever else the socket holds already, until
        whole frames are in: a consumer that falls behind gets few full buffers, not
        many small ones.  The part of a frame at the end starts the next buffer.
        The peer's close ends ``out`` after everything before it (a last ABORT
        then a close are read in that order), and is kept in ``closed``."""
        rx = self.ch._receiver
        async with out:
            while True:
                buf = await self._pool.get()
                with memoryview(buf) as view:
                    filled, end = _begin(rx, view, self._carry)
                    while not end:
                        try:
                            filled += await self.ch.read_into(view[filled:])
                        except RemoteProtocolError as exc:
                            if exc.code is not ErrorCode.CLOSED:
                                raise
                            self.closed = exc
                            return
                        filled += self.ch.read_ready(view[filled:])
                        end = rx.whole_frames(view, filled)
                    self._carry = bytes(view[end:filled])
                await out.send((buf, end))

    async def open(self, buf: bytearray, end: int) -> list[Record]:
        with self.ch._receiving:
            return await trio.to_thread.run_sync(self.ch._receiver.open_in_place, memoryview(buf)[:end])

    def release(self, buf: bytearray) -> None:
        self._pool.put(buf)



def _lost(exc: BaseException) -> str:
    """Why a connection ended, in words: the socket's error (trio's BrokenResourceError carries
    it as its cause), else that it broke or was closed; never an exception's class name."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError):
        return cause.strerror or str(cause) or "the connection broke"
    return "the connection was closed" if isinstance(exc, trio.ClosedResourceError) else "the connection broke"

def _printable(data: bytes | bytearray) -> str:
    """A peer's first bytes, quoted and safe to print."""
    return repr("".join(c if c.isprintable() else "." for c in data.decode("latin-1")))


async def _drive(stream: trio.abc.Stream, hs: AttestedHandshake, first: bytes, timeout: float) -> SecureChannel:
    set_user_timeout(stream)  # (every session's socket, both sides: they all come here)
    try:
        with trio.fail_after(timeout):
            if first:
                await stream.send_all(first)
            while not hs.complete:
                data = await stream.receive_some(65536 + 8)
                if not data:
                    raise HandshakeError(ErrorCode.CLOSED, "peer closed the connection during the handshake")
                awaiting_reply = bool(first) and hs.progress <= 2  # (initiator: nothing valid back yet)
                try:
                    out = hs.receive_data(data)
                except RemoteProtocolError as exc:
                    if awaiting_reply and exc.code is ErrorCode.OVERSIZE:  # "HTTP/1.1 400", "SSH-2.0-": not a frame
                        raise HandshakeError(ErrorCode.OVERSIZE, "the address does not speak palm (it answered "
                                             f"{_printable(data[:24])})") from None
                    raise
                if out:
                    await stream.send_all(out)
    except trio.TooSlowError:
        raise HandshakeError(ErrorCode.TIMEOUT, f"handshake not finished within {timeout:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HandshakeError(ErrorCode.CLOSED, f"connection lost during the handshake ({_lost(exc)})") from None
    assert hs.result is not None
    return SecureChannel(stream, hs.result, hs.leftover())


async def connect(
    stream: trio.abc.Stream,
    config: ChannelConfig,
    purpose: Purpose = Purpose.MIGRATION,
    mode: TransportMode = TransportMode.SECURE,
    cipher: CipherName | None = None,
) -> SecureChannel:
    hs = AttestedHandshake(config, initiator=True, purpose=purpose, mode=mode, cipher=cipher)
    return await _drive(stream, hs, hs.initiate(), config.handshake_timeout)


async def accept(stream: trio.abc.Stream, config: ChannelConfig, purpose: Purpose | None = None,
                 on_start: Callable[[AttestedHandshake], None] | None = None) -> SecureChannel:
    """Responder side.  ``on_start`` sees the handshake object (its progress),
    for an agent that must choose which pending handshake to drop."""
    hs = AttestedHandshake(config, initiator=False, purpose=purpose)
    if on_start is not None:
        on_start(hs)
    return await _drive(stream, hs, b"", config.handshake_timeout)
