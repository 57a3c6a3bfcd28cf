"""The metrics endpoint: loopback unless the operator names an address, and no one
client can hold all of its connections."""

from __future__ import annotations

import pytest
import trio

from palm_net.cluster import metrics


def test_a_bare_port_binds_loopback():
    assert metrics.parse_listen("9400") == ("127.0.0.1", 9400)
    assert metrics.parse_listen("10.0.0.5:9400") == ("10.0.0.5", 9400)
    assert metrics.parse_listen("[::1]:9400") == ("::1", 9400)
    for bad in ("", ":9400", "host:", "host:99999", "x"):
        with pytest.raises(ValueError, match="bad metrics address"):
            metrics.parse_listen(bad)


async def _get(host: str, port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=host)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_one_client_cannot_hold_every_connection(nursery):
    port = await nursery.start(metrics.serve_metrics, "127.0.0.1:0", lambda: b"palm_up 1\n")
    held = [await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.3")
            for _ in range(metrics.MAX_PER_CLIENT)]  # silent: each holds a slot until the deadline
    await trio.sleep(0.1)
    assert await _get("127.0.0.3", port) == b""  # that client's next connection is closed at once
    assert b"palm_up 1" in await _get("127.0.0.4", port)  # another client is served meanwhile
    for s in held:
        await s.aclose()

