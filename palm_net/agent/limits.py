"""What an agent lets peers take: connections, handshakes, sessions, memory.

A certified peer may still be hostile, and anyone can open a TCP connection.
Each limit has one owner and is checked and taken in one call:

- ``TokenBuckets``: a rate per key (a source address before the handshake,
  a peer's static key after it), with a bounded number of keys;
- ``Admission``: the incoming migrations admitted, in all and per peer, and
  the guest memory they reserve, in all and per peer.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from palm_net.errors import ErrorCode, MigrationFailure

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None)
except OSError:
    _libc = None


M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024


def bound_malloc() -> None:
    """Allocations of 256 KiB and more get their own mapping, given back when freed.
    glibc's default raises that threshold as large blocks are freed, and then
    serves them from heaps it cannot shrink: after one QEMU migration an agent
    held 36-46 MiB more at rest than before it.  A migration's large buffers
    are pooled, so the few extra mappings cost nothing measurable."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def freeze_heap() -> None:
    """What the agent holds for good from its start (its modules, classes, functions:
    40,000 objects) moved out of the cyclic garbage collector's way.  A full
    collection walked all of them, 22 ms with the GIL held, at whatever moment the
    allocations made it due: once inside a destination's pause (perf: 12 ms of
    ``gc_collect_main`` in the thread awaiting QEMU's load).  Objects made later are
    collected as ever (its VMs too: frozen before they are loaded, a VM in a cycle
    would never be freed); freed by their reference counts, the frozen ones still go."""
    gc.collect()
    gc.freeze()


def release_free_memory() -> None:
    """Hands the memory a migration freed back to the system (what glibc keeps in
    its heaps below the threshold above).  Best effort, a few ms."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second, at most ``burst``.
    The least recently seen keys are forgotten beyond ``max_keys`` (a flood of
    addresses costs bounded memory; a forgotten key starts with a full bucket)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, stamp)

    def take(self, key: Hashable) -> bool:
        now = self.clock()
        tokens, stamp = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class Admission:
    """Incoming migrations: check the limits and take the place in one call.

    Engines call ``admit`` when BEGIN arrives (from the worker thread that
    applies records), the agent calls the returned release when the session
    is settled; a lock makes the check and the take one step.
    """

    max_sessions: int
    max_memory: int
    max_per_peer: int
    max_memory_per_peer: int
    accepting: bool = True
    sessions: int = 0
    memory: int = 0
    per_peer: dict[bytes, int] = field(default_factory=dict)
    memory_per_peer: dict[bytes, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def admit(self, peer: bytes, size: int) -> Callable[[], None]:
        with self._lock:
            if not self.accepting:
                raise MigrationFailure(ErrorCode.SHUTTING_DOWN, "destination agent is shutting down")
            if self.sessions >= self.max_sessions:
                raise MigrationFailure(ErrorCode.BUSY, f"{self.sessions} incoming migrations already (limit "
                                                       f"{self.max_sessions})")
            if self.per_peer.get(peer, 0) >= self.max_per_peer:
                raise MigrationFailure(ErrorCode.BUSY, f"this peer has {self.max_per_peer} incoming migrations "
                                                       "already")
            if self.memory + size > self.max_memory:
                raise MigrationFailure(ErrorCode.BUSY, f"{self.memory >> 20} MiB reserved for incoming VMs, "
                                                       f"{size >> 20} MiB more exceeds {self.max_memory >> 20} MiB")
            if self.memory_per_peer.get(peer, 0) + size > self.max_memory_per_peer:
                held = self.memory_per_peer.get(peer, 0)
                raise MigrationFailure(ErrorCode.BUSY, f"{held >> 20} MiB reserved for this peer's incoming VMs, "
                                                       f"{size >> 20} MiB more exceeds its share of incoming memory, "
                                                       f"{self.max_memory_per_peer >> 20} MiB")
            self.sessions += 1
            self.memory += size
            self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
            self.memory_per_peer[peer] = self.memory_per_peer.get(peer, 0) + size
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self.sessions -= 1
                self.memory -= size
                _decrease(self.per_peer, peer, 1)
                _decrease(self.memory_per_peer, peer, size)

        return release


def _decrease(counts: dict[bytes, int], key: bytes, by: int) -> None:
    left = counts[key] - by
    if left:
        counts[key] = left
    else:
        del counts[key]
