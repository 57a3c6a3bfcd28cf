"""A stream backend's bulk path: one worker thread a session carries the
hypervisor's bytes, with no hop to trio between reading, sealing or opening, and
writing them.

Source (``SourceRelay``): the hypervisor's stream read from its socket, made into
STREAM messages (the session's StreamLease), sealed and sent (ThreadSender).
Destination (``DestinationRelay``, a data session's): records read and opened
(ThreadReceiver), checked by the lane's protocol (lent), their bytes written to
the hypervisor's stream of that channel.

Through the trio shell each piece took hops to a thread and back, a wake-up of
the event loop for every send or receive, and the GIL handed between four
threads: 1.6-4.1 CPU-s of each agent for a 1 GiB QEMU guest's 515 MiB of stream,
where the same work in plain threads takes 0.6-0.9 (docs/QEMU.md, "The stream in
one thread").  A relay owns nothing of its engine: what it uses is lent to it
until it returns, and the engine counts what it carried from its counters.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

from palm_net.channel.transport import Record, ThreadReceiver, ThreadSender
from palm_net.errors import PalmError
from palm_net.faults import fault
from palm_net.hypervisor.qemu import read_stream
from palm_net.wire import messages
from palm_net.wire.messages import MAX_BULK, Stream
from palm_net.wire.pages import Buffer
from palm_net.wire.protocol import Data, SessionProtocol, StreamLease

T = TypeVar("T")


async def in_own_thread(fn: Callable[[], T]) -> T:
    """``fn`` (a relay's, or its receiver's) in a worker thread of its own: not one of the
    trio pool's 40, which a relay holds for its session's whole stream (so many
    channels, or a peer's quiet data sessions, would starve every other hop)."""
    return await trio.to_thread.run_sync(fn, limiter=trio.CapacityLimiter(1))


# A read of the hypervisor's stream, at most: what our buffers hold when QEMU pauses
# the guest is loaded by the destination inside the downtime (1 GiB KVM guest, under
# load: 34 and 33 ms against 73 and 38 with 2 MiB reads and 4 MiB socket buffers).
STREAM_READ = MAX_BULK // 2


class SourceRelay:
    """One of the hypervisor's streams to its end on one session (``run``, a worker
    thread).  ``stop`` (the operator's cancel) reads no more and drops what was read
    before a message is made of it, so what is made always goes out whole; ``abort``
    (the run torn down) ends a send at once."""

    def __init__(self, conn: socket.socket, lease: StreamLease, sender: ThreadSender,
                 pace: Callable[[int], float]) -> None:
        self.conn = conn
        self.lease = lease
        self.sender = sender
        self._pace = pace  # bytes sent -> seconds to wait (the bandwidth cap; thread-safe)
        self._stopped = threading.Event()
        self.sent = 0  # bytes on the wire so far (read by the owner for progress)

    def stop(self) -> None:
        self._stopped.set()

    def abort(self) -> None:
        self._stopped.set()
        self.sender.abort()

    def run(self) -> bool:
        """Blocking: True when the stream ended, False when stopped or aborted first."""
        with memoryview(bytearray(STREAM_READ)) as view:
            while True:
                n, ended = read_stream(self.conn, view)
                if self._stopped.is_set():
                    return False
                if n:
                    size = self.sender.seal_and_send([(r, True) for r in self.lease.frame(view[:n])])
                    self.sent += size
                    wait = self._pace(size)
                    if wait > 0:
                        self._stopped.wait(wait)  # (a stop or an abort ends it)
                if ended:
                    return True


class DestinationRelay:
    """A stream's data session into the hypervisor (``run``, a worker thread): its
    STREAM messages checked by the lane's protocol, their data written by ``write``,
    until a record that is anything else (its COMPLETE), which ``run`` returns with
    those after it, for the session task.  ``abort`` ends it at once."""

    def __init__(self, receiver: ThreadReceiver, proto: SessionProtocol,
                 write: Callable[[list[Buffer]], None]) -> None:
        self.receiver = receiver
        self.proto = proto
        self._write = write
        self.messages = 0  # STREAM messages taken (read by the owner: the engine's count)
        self.data = 0  # their bytes written

    def abort(self) -> None:
        self.receiver.abort()

    def run(self) -> list[Record] | None:
        """Blocking: the records from the first that is not a STREAM's on; None when the
        peer closed the session first, or on ``abort``."""
        proto = self.proto
        while not self.receiver.aborted:
            records = self.receiver.records()
            if records is None:
                return None
            fault("destination.receive")
            chunks: list[Buffer] = []
            try:
                for i, rec in enumerate(records):
                    if not proto.data_due and type(messages.decode(rec.data).body) is not Stream:
                        self._written(chunks)
                        return records[i:]
                    ev = proto.receive(rec.data, rec.authenticated)
                    if isinstance(ev, Data):
                        chunks.append(ev.data)
                    else:
                        self.messages += 1
                self._written(chunks)
            except PalmError:
                if self.receiver.aborted:  # (a stream interrupted for the abort fails its writes)
                    return None
                raise
        return None

    def _written(self, chunks: list[Buffer]) -> None:
        if chunks:
            self._write(chunks)
            self.data += sum(len(c) for c in chunks)
