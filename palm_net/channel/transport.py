"""The thin trio shell: runs the sans-IO handshake and record layer over a stream."""

from __future__ import annotations

from collections.abc import Callable

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
from palm_net.wire.errors import HandshakeError, ProtocolError

RECV_CHUNK = 256 * 1024


class SecureChannel:
    """An attested session: send and receive record plaintexts."""

    def __init__(self, stream: trio.abc.Stream, result: HandshakeResult, leftover: bytes = b"") -> None:
        self.stream = stream
        self.result = result
        self.sender: RecordSender = result.sender
        self.receiver: RecordReceiver = result.receiver
        if leftover:
            self.receiver.receive_data(leftover)
        self._send_lock = trio.Lock()

    def __repr__(self) -> str:
        return f"SecureChannel(peer={self.peer_name!r}, {self.result.protocol_name})"

    @property
    def peer_name(self) -> str:
        return self.result.peer.name

    async def send_record(self, plaintext: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.sender.seal(plaintext))

    async def send_frames(self, frames: bytes | bytearray) -> None:
        """Sends frames already sealed by ``self.sender`` (batched by the caller)."""
        async with self._send_lock:
            await self.stream.send_all(frames)

    async def receive_record(self) -> bytes:
        """The next record, which must have been sealed (the clear records of
        the plain benchmark mode carry bulk data only, read by the destination's
        pipeline straight from ``receiver``)."""
        while True:
            rec = self.receiver.next_record()
            if rec is not None:
                if not self.receiver.authenticated:
                    self.receiver.failed = True
                    raise ProtocolError("unauthenticated", "a record arrived in the clear")
                return rec
            data = await self.stream.receive_some(RECV_CHUNK)
            if not data:
                raise ProtocolError("closed", "peer closed the connection")
            self.receiver.receive_data(data)

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
                    raise HandshakeError("closed", "peer closed the connection during the handshake")
                out = hs.receive_data(data)
                if out:
                    await stream.send_all(out)
    except trio.TooSlowError:
        raise HandshakeError("timeout", f"handshake not finished within {timeout:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HandshakeError("closed", f"connection lost during the handshake ({type(exc).__name__})") from None
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
