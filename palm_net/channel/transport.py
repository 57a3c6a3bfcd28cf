"""The thin trio shell: runs the sans-IO handshake and record layer over a stream."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from palm_net.channel.handshake import (
    AttestedHandshake,
    ChannelConfig,
    HandshakeResult,
    Purpose,
    TransportMode,
)
from palm_net.channel.records import RecordReceiver, RecordSender
from palm_net.crypto.noise import CipherName
from palm_net.trioutil import ConflictDetector
from palm_net.wire.errors import ErrorCode, HandshakeError, RemoteProtocolError

RECV_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Record:
    """One record as the channel opened it: its plaintext, its index in the
    session, the receive transcript before it, and whether it came sealed."""

    data: bytes
    index: int
    transcript_before: bytes
    authenticated: bool = True


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
        self._receiving = ConflictDetector("another task is receiving on this channel")

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

    async def send(self, plaintext: bytes) -> int:
        """One record, sealed; returns the bytes put on the wire."""
        with self._sending:
            frame = self._sender.seal(plaintext)
            await self.stream.send_all(frame)
        return len(frame)

    async def send_batch(self, messages: Sequence[tuple[bytes, bool]]) -> int:
        """Many records, in order: (plaintext, bulk) pairs; bulk ones go in the clear in
        the plain benchmark mode.  Sealed in a worker thread, then sent; returns the bytes
        put on the wire."""
        with self._sending:
            frames = await trio.to_thread.run_sync(self._seal_all, messages)
            await self.stream.send_all(frames)
        return len(frames)

    def _seal_all(self, messages: Sequence[tuple[bytes, bool]]) -> bytes:
        seal, plain = self._sender.seal_parts, self._sender.plain
        parts: list[bytes] = []
        for data, bulk in messages:
            parts.extend(seal(data, plain and bulk))
        return b"".join(parts)  # one copy of the whole batch, not one per frame

    # -- receiving

    async def receive(self) -> Record:
        """The next record, which must have been sealed (the clear records of the plain
        benchmark mode carry bulk data only, which only ``open_buffered`` returns)."""
        with self._receiving:
            while True:
                rec = self._open_one()
                if rec is not None:
                    if not rec.authenticated:
                        self._receiver.failed = True
                        raise RemoteProtocolError(ErrorCode.UNAUTHENTICATED, "a record arrived in the clear")
                    return rec
                self._receiver.receive_data(await self._read_some(RECV_CHUNK))

    async def read_into_buffer(self, max_bytes: int) -> int:
        """Reads what the socket has (at most ``max_bytes``) into the record buffer; returns how much."""
        data = await self._read_some(max_bytes)
        with self._receiving:
            self._receiver.receive_data(data)
        return len(data)

    async def read_some(self, max_bytes: int) -> bytes:
        """Raw bytes from the socket, for a reader task that runs ahead of ``feed``."""
        return await self._read_some(max_bytes)

    def feed(self, data: bytes) -> None:
        with self._receiving:
            self._receiver.receive_data(data)

    async def open_buffered(self, limit: int = 1 << 30) -> list[Record]:
        """Opens the whole records buffered (at most ``limit``), in a worker thread."""
        with self._receiving:
            return await trio.to_thread.run_sync(self._open_all, limit)

    def _open_one(self) -> Record | None:
        rx = self._receiver
        index, before = rx.count, rx.transcript
        data = rx.next_record()
        return None if data is None else Record(data, index, before, rx.authenticated)

    def _open_all(self, limit: int) -> list[Record]:
        out: list[Record] = []
        while len(out) < limit:
            rec = self._open_one()
            if rec is None:
                break
            out.append(rec)
        return out

    async def _read_some(self, max_bytes: int) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        if not data:
            raise RemoteProtocolError(ErrorCode.CLOSED, "peer closed the connection")
        return bytes(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _drive(stream: trio.abc.Stream, hs: AttestedHandshake, first: bytes, timeout: float) -> SecureChannel:
    try:
        with trio.fail_after(timeout):
            if first:
                await stream.send_all(first)
            while not hs.complete:
                data = await stream.receive_some(65536 + 8)
                if not data:
                    raise HandshakeError(ErrorCode.CLOSED, "peer closed the connection during the handshake")
                out = hs.receive_data(data)
                if out:
                    await stream.send_all(out)
    except trio.TooSlowError:
        raise HandshakeError(ErrorCode.TIMEOUT, f"handshake not finished within {timeout:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HandshakeError(ErrorCode.CLOSED, f"connection lost during the handshake ({type(exc).__name__})") from None
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
