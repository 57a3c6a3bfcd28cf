"""A certified but hostile peer: a real identity from the cluster's authority
that speaks the protocol correctly and chooses its messages maliciously."""

from __future__ import annotations

import os
from typing import Any

import trio

from palm_net.channel.handshake import ChannelConfig, Purpose
from palm_net.channel.transport import SecureChannel, connect
from palm_net.crypto.identity import AgentIdentity, Authority
from palm_net.wire.messages import Begin, Message, Query
from palm_net.wire.protocol import Role, SessionProtocol


class HostilePeer:
    def __init__(self, authority: Authority, measurement: bytes, name: str = "evil") -> None:
        ident = AgentIdentity.generate(name)
        cert = authority.issue(name, ident.static.public, ident.sign_pub, measurement)
        self.identity = ident
        self.config = ChannelConfig(ident, cert, authority.public, measurement, frozenset({measurement}))

    async def session(self, port: int, purpose: Purpose = Purpose.MIGRATION) -> SecureChannel:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        return await connect(stream, self.config, purpose=purpose)

    @staticmethod
    def begin(proto: SessionProtocol, name: str = "v", pages: int = 16, backend: str = "model",
              spec: bytes = b"", vm_id: bytes | None = None) -> bytes:
        return proto.send(Begin(name, vm_id or os.urandom(16), pages, 0, 0, 1, False, False, backend, spec))

    async def try_begin(self, port: int, mid: bytes | None = None, timeout: float = 10,
                        **kw: Any) -> tuple[SecureChannel, SessionProtocol, Message]:
        """A session with one BEGIN; returns it open, with the destination's answer."""
        ch = await self.session(port)
        proto = SessionProtocol(Role.SOURCE, mid or os.urandom(16))
        await ch.send(self.begin(proto, **kw))
        with trio.fail_after(timeout):
            reply = proto.receive_message((await ch.receive()).data)
        return ch, proto, reply

    async def query(self, port: int, mid: bytes, timeout: float = 10) -> Message:
        ch = await self.session(port, Purpose.RECOVERY)
        try:
            proto = SessionProtocol(Role.SOURCE, mid, recovery=True)
            await ch.send(proto.send(Query()))
            with trio.fail_after(timeout):
                return proto.receive_message((await ch.receive()).data)
        finally:
            await ch.aclose()
