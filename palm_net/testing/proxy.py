"""A fault-injecting TCP proxy that understands palm_net's framing.

Every unit on a palm_net connection is a frame (u32be length + body), from
the preamble on, so the proxy can count frames per direction without any
key: client->server frame 0 is the preamble, 1 the first handshake message,
2 the third, 3.. the source's records; server->client frame 0 is the second
handshake message, 1 ACCEPT, then a ROUND_DONE per pre-copy round, READY and
DONE (for a migration session): ``sealed(TYPE, body)`` picks one of those by
its length.

A plan is a list of Rules; each names the connection (0 = first), the
direction, the frame index and the action: drop, duplicate, flip (one bit),
truncate, delay, replay (a frame seen earlier, possibly in an earlier
connection), cut (close both sides before forwarding), cut_after, call (run
a test's callback, e.g. a guest write, then forward), or forge (an on-path
attacker: the callback sees every frame so far and returns the frames to
send instead, in either direction).  A rule may instead pick its frame by a
predicate over (index, frame).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import trio

from palm_net.wire.messages import WIRE_VERSION

Direction = Literal["c2s", "s2c"]
Action = Literal["drop", "duplicate", "flip", "truncate", "delay", "replay", "cut", "cut_after", "call", "forge"]
Forger = Callable[[dict[tuple[int, "Direction", int], bytes], bytes], list[tuple["Direction", bytes]]]


@dataclass
class Rule:
    direction: Direction
    frame: int
    action: Action
    connection: int = 0
    bit: int = 0  # flip: which bit of the frame (after the prefix); truncate: bytes to keep
    seconds: float = 0.0  # delay
    replay_of: tuple[int, Direction, int] | None = None  # (connection, direction, frame) to inject
    callback: Callable[[], None] | None = None  # call: run this (e.g. a guest write), then forward
    forger: Forger | None = None  # forge: (frames seen, this frame) -> frames to send instead
    # Instead of ``frame``: the first frame (index, whole frame) this accepts,
    # for records whose index varies (the end of a hypervisor's stream).
    match: Callable[[int, bytes], bool] | None = None
    fired: bool = False


def sealed(mtype: str, body: dict[str, Any] | None = None, plain: bool = False) -> Callable[[int, bytes], bool]:
    """A Rule's ``match``: a sealed record of this message type, told by its length
    (the sequence number takes 1, 2 or 5 bytes; the rest is fixed by the body;
    ``plain``: the plain benchmark mode's kind byte too)."""
    lengths = {4 + int(plain) + len(msgpack.packb({"v": WIRE_VERSION, "t": mtype, "mid": bytes(16), "seq": seq,
                                                   "b": body or {}}, use_bin_type=True)) + 16
               for seq in (1, 200, 70000)}
    return lambda _, frame: len(frame) in lengths


READY = sealed("READY", {"digest": b"", "timings": bytes(8)})  # a page migration's READY ...
DONE = sealed("DONE", {"timings": bytes(8)})  # ... and its DONE


@dataclass
class ProxyLog:
    frames: dict[tuple[int, Direction], int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


class FaultProxy:
    def __init__(self, target: tuple[str, int], rules: list[Rule] | None = None,
                 listen_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.rules = rules or []
        self.log = ProxyLog()
        self.seen: dict[tuple[int, Direction, int], bytes] = {}
        self.connections = 0
        self.port = 0
        self._dst: dict[tuple[int, Direction], trio.SocketStream] = {}
        self._fired: set[int] = set()
        self.cut_event = trio.Event()

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = self.connections
        self.connections += 1
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        self._dst[(conn, "c2s")], self._dst[(conn, "s2c")] = server, client
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, conn, "c2s", client, server, nursery.cancel_scope)
            nursery.start_soon(self._pump, conn, "s2c", server, client, nursery.cancel_scope)

    async def _pump(self, conn: int, direction: Direction, src: trio.SocketStream, dst: trio.SocketStream,
                    scope: trio.CancelScope) -> None:
        buf = bytearray()
        index = 0
        try:
            while True:
                data = await src.receive_some(65536 * 4)
                if not data:
                    await dst.send_eof() if hasattr(dst, "send_eof") else None
                    return
                buf += data
                while len(buf) >= 4:
                    (n,) = struct.unpack_from(">I", buf)
                    if n > 1 << 24:  # not palm_net framing: pass through raw
                        await dst.send_all(bytes(buf))
                        buf.clear()
                        break
                    if len(buf) < 4 + n:
                        break
                    frame = bytes(buf[: 4 + n])
                    del buf[: 4 + n]
                    self.seen[(conn, direction, index)] = frame
                    self.log.frames[(conn, direction)] = index + 1
                    if not await self._apply(conn, direction, index, frame, dst, scope):
                        return
                    index += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()

    async def _apply(self, conn: int, direction: Direction, index: int, frame: bytes, dst: trio.SocketStream,
                     scope: trio.CancelScope) -> bool:
        out = [frame]
        for n, r in enumerate(self.rules):
            # Fired once per proxy (a Rule shared by parametrized tests fires again in the next one);
            # ``r.fired`` tells a test's observer.
            if n in self._fired or r.connection != conn or r.direction != direction:
                continue
            if (r.frame != index) if r.match is None else not r.match(index, frame):
                continue
            self._fired.add(n)
            r.fired = True
            self.log.events.append(f"conn {conn} {direction} frame {index}: {r.action}")
            if r.action == "drop":
                out = []
            elif r.action == "duplicate":
                out = [frame, frame]
            elif r.action == "flip":
                b = bytearray(frame)
                pos = 4 + (r.bit // 8) % max(1, len(frame) - 4)
                b[pos] ^= 1 << (r.bit % 8)
                out = [bytes(b)]
            elif r.action == "truncate":  # part of the frame, then the connection drops
                await dst.send_all(frame[: 4 + r.bit])
                scope.cancel()
                return False
            elif r.action == "delay":
                await trio.sleep(r.seconds)
            elif r.action == "call" and r.callback is not None:
                r.callback()
            elif r.action == "forge" and r.forger is not None:
                out = []
                for d, forged in r.forger(self.seen, frame):
                    if d == direction:
                        out.append(forged)
                    else:
                        await self._dst[(conn, d)].send_all(forged)
            elif r.action == "replay" and r.replay_of is not None:
                old = self.seen.get(r.replay_of)
                if old is not None:
                    out = [old, frame]
            elif r.action == "cut":
                self.cut_event.set()
                scope.cancel()
                return False
            elif r.action == "cut_after":
                await dst.send_all(frame)
                self.cut_event.set()
                scope.cancel()
                return False
        for f in out:
            await dst.send_all(f)
        return True


class ProxyThread:
    """Runs a FaultProxy in its own thread and trio loop (for tests that drive processes)."""

    def __init__(self, target: tuple[str, int], rules: list[Rule] | None = None,
                 listen_host: str = "127.0.0.1") -> None:
        import threading

        self.proxy = FaultProxy(target, rules, listen_host)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                await nursery.start(self.proxy.serve)
                self._ready.set()

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        self._ready.wait(10)
        return self

    @property
    def port(self) -> int:
        return self.proxy.port

    def __exit__(self, *_: object) -> None:
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)
