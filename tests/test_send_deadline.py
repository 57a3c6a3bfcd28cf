"""A sender never waits for ever on a peer that takes nothing (proto 1): every session's
socket has TCP_USER_TIMEOUT (the kernel's bound on unacknowledged data), and every send
moves within the channel's send timeout (the source's reply timeout) or ends the session."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import trio

from palm_net.channel.transport import TCP_USER_TIMEOUT_MS, Outbox, SecureChannel, accept, connect
from palm_net.errors import ErrorCode, RemoteProtocolError
from palm_net.migration.params import MigrationParams
from palm_net.migration.runner import SourceRun
from palm_net.trioutil import first_error
from palm_net.wire.protocol import REPLY_TIMEOUT

GUARD = 10.0  # a hang fails the test here instead of holding the suite (not a measure)


async def _tcp_pair(pki) -> tuple[SecureChannel, SecureChannel]:
    """A session over loopback TCP: (initiator, responder), the handshake complete."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    out: dict[str, SecureChannel] = {}
    async with trio.open_nursery() as n:
        async def serve_one() -> None:
            out["b"] = await accept(await listeners[0].accept(), pki.config("dst"))
        n.start_soon(serve_one)
        out["a"] = await connect(await trio.open_tcp_stream("127.0.0.1", port), pki.config("src"))
    await listeners[0].aclose()
    return out["a"], out["b"]


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP_USER_TIMEOUT")
async def test_every_session_socket_has_the_reply_timeout_as_its_tcp_user_timeout(pki):
    a, b = await _tcp_pair(pki)
    assert TCP_USER_TIMEOUT_MS == REPLY_TIMEOUT * 1000 == MigrationParams().reply_timeout * 1000
    def user_timeout(ch: SecureChannel) -> int:
        return ch.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)

    for ch in (a, b):  # the initiator's (agent outgoing) and the responder's (agent incoming)
        assert user_timeout(ch) == TCP_USER_TIMEOUT_MS
    a.send_timeout = 120.0  # a source's longer reply timeout: the kernel does not cut first
    assert user_timeout(a) == 120_000
    a.send_timeout = 0.5  # a shorter one: never below the default (retransmissions fit)
    assert user_timeout(a) == TCP_USER_TIMEOUT_MS and a.send_timeout == 0.5
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize("path", ["send", "outbox"])
async def test_a_peer_that_stops_reading_ends_the_send_within_the_send_timeout(pki, path):
    """The peer completes the handshake, then reads nothing: the sender's sends fill the
    socket buffers, then one does not move for the send timeout and ends the session
    (``timeout``) instead of blocking for ever."""
    a, b = await _tcp_pair(pki)
    a.send_timeout = 0.2
    record = os.urandom(60000)
    with trio.fail_after(GUARD), pytest.raises(BaseException) as err:
        if path == "send":  # control messages (SourceRun._perform's Send)
            while True:
                await a.send(record)
        else:  # the bulk path (pages): sealed into buffers, sent by the Outbox's task
            outbox = Outbox(a, 1 << 20, 2)
            async with trio.open_nursery() as n:
                n.start_soon(outbox.run)
                while True:
                    await outbox.put([(record, False)] * 8)
    exc = first_error(err.value) if isinstance(err.value, BaseExceptionGroup) else err.value
    assert isinstance(exc, RemoteProtocolError) and exc.code is ErrorCode.TIMEOUT
    await a.aclose()
    await b.aclose()


def test_a_source_run_sends_within_its_reply_timeout_on_every_channel():
    """SourceRun gives its channel the migration's reply timeout as its send timeout (a
    data session takes the main session's: SourceRun._open_channels)."""
    params = MigrationParams(reply_timeout=0.7)
    ch = SimpleNamespace(send_timeout=REPLY_TIMEOUT, peer_name="b")
    engine = SimpleNamespace(params=params, mid=bytes(16), info=SimpleNamespace(name="vm"))
    SourceRun(ch, engine, None, None)  # type: ignore[arg-type]
    assert ch.send_timeout == 0.7
