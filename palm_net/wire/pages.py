"""The PAGES codec (proto/PROTOCOL.md 6): parallel little-endian arrays, then page data.

``gfns`` and ``vers`` are u64le each, whatever the host's byte order;
``kinds`` one byte each (0 zero page, 1 normal page, 2 protected page as
ciphertext); ``tags`` the 16-byte MAC of each protected page, in order.  The
4096-byte pages of kinds 1 and 2 follow, in order, in the data records
(DATA_RECORD bytes, 15 pages, each but the last).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from palm_net.errors import ErrorCode, RemoteProtocolError
from palm_net.wire.messages import DATA_RECORD, LANE_BLOCK, PAGE_SIZE, Pages, lane_of

KIND_ZERO = 0
KIND_NORMAL = 1
KIND_PROTECTED = 2
TAG_LEN = 16
ENTRY_BYTES = 8 + 1 + 8  # gfn, kind, version in a PAGES message
PAGES_PER_RECORD = DATA_RECORD // PAGE_SIZE
U64LE = np.dtype("<u8")  # whatever the host's byte order
MAX_VERSION = 2**32 - 1  # page versions are below this (proto 6): a destination keeps 4 bytes a protected page

Gfns = npt.NDArray[np.uint64]
Buffer = bytes | bytearray | memoryview


def union_gfns(a: Any, b: Any) -> Gfns:
    """The gfns in ``a`` or ``b``, sorted, each once: np.union1d's result without
    np.unique, which imports numpy.ma on its first call (1.2 MiB an agent then
    holds for good, and 40 ms inside the first migration's pause)."""
    out = np.concatenate((np.asarray(a, np.uint64), np.asarray(b, np.uint64)))
    out.sort(kind="stable")  # two ascending runs: merged in linear time (4x quicker than the default here)
    if len(out) > 1:
        first = np.empty(len(out), np.bool_)
        first[0] = True
        np.not_equal(out[1:], out[:-1], out=first[1:])
        out = out[first]
    return out


class PageRange:
    """The gfns 0 .. n-1 as a round sends them, made a slice at a time (round 0 of
    a 4 GiB guest would otherwise hold an 8 MiB array of all of them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> Gfns:
        lo, hi, _ = s.indices(self.n)
        return np.arange(lo, max(lo, hi), dtype=np.uint64)

    def __array__(self, dtype: Any = None, copy: Any = None) -> Gfns:
        return np.arange(self.n, dtype=dtype or np.uint64)


class LaneRange:
    """The gfns 0 .. n-1 of one channel (palm_net.wire.messages.lane_of: its blocks of
    LANE_BLOCK pages, every ``channels``-th from ``lane``), a slice at a time like PageRange."""

    def __init__(self, n: int, channels: int, lane: int) -> None:
        self.channels, self.lane = channels, lane
        blocks = -(-n // LANE_BLOCK)
        mine = len(range(lane, blocks, channels))
        tail = n % LANE_BLOCK
        self.n = mine * LANE_BLOCK - (LANE_BLOCK - tail if tail and mine and (blocks - 1) % channels == lane else 0)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, s: slice) -> Gfns:
        lo, hi, _ = s.indices(self.n)
        pos = np.arange(lo, max(lo, hi), dtype=np.uint64)
        return ((pos // LANE_BLOCK) * self.channels + self.lane) * LANE_BLOCK + pos % LANE_BLOCK

    def __array__(self, dtype: Any = None, copy: Any = None) -> Gfns:
        return self[:].astype(dtype or np.uint64, copy=False)


RoundGfns = Gfns | PageRange | LaneRange


def split_lanes(gfns: RoundGfns, channels: int) -> list[RoundGfns]:
    """A round's gfns by channel (proto 7.8), each in ascending order (one channel: as they are)."""
    if channels == 1:
        return [gfns]
    if isinstance(gfns, PageRange):
        return [LaneRange(gfns.n, channels, lane) for lane in range(channels)]
    g = np.asarray(gfns, dtype=np.uint64)
    which = lane_of(g, channels)
    return [g[which == lane] for lane in range(channels)]


def u64le(values: Gfns) -> bytes:
    """Unsigned 64-bit ints as u64le bytes."""
    return np.asarray(values, dtype=U64LE).tobytes()


def from_u64le(data: bytes) -> Gfns:
    return np.frombuffer(data, dtype=U64LE).astype(np.uint64, copy=False)


def ascending_gfns(data: bytes, npages: int, what: str, above: int = -1) -> Gfns:
    """A list of gfns from the wire (MISSING, FETCH, WANT): u64le, strictly ascending,
    above ``above`` and below ``npages`` (RemoteProtocolError ``malformed``)."""
    if len(data) % 8:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{what}: gfns not a whole number of u64le")
    gfns = from_u64le(data)
    if len(gfns) and (int(gfns[0]) <= above or int(gfns[-1]) >= npages
                      or (len(gfns) > 1 and not bool((gfns[1:] > gfns[:-1]).all()))):
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{what}: gfns not ascending, or outside the VM")
    return gfns


def protected_spans(gfns: Gfns, ranges: Any) -> tuple[list[tuple[int, int]], Gfns]:
    """Where ascending ``gfns`` fall in the protected processes' ``ranges`` ((first,
    count) each): a process owns one range, so its pages are one slice of ``gfns``
    (no lookup a page: the switch's pause needs this for up to every page); the
    slices (lo, hi) ascending, and those pages."""
    spans = [(int(lo), int(hi)) for first, count in sorted(ranges)
             for lo, hi in [np.searchsorted(gfns, (first, first + count))] if hi > lo]
    return spans, (np.concatenate([gfns[lo:hi] for lo, hi in spans]) if spans else gfns[:0])


def gfn_bitmap(gfns: Gfns) -> tuple[int, bytes]:
    """Ascending ``gfns`` as (base, bitmap): bit i (byte i // 8, least significant bit
    first) set for page base + i; base is the first gfn (MISSING, proto 7.9)."""
    base = int(gfns[0])
    bits = np.zeros(int(gfns[-1]) - base + 1, dtype=bool)
    bits[np.asarray(gfns, dtype=np.uint64) - np.uint64(base)] = True
    return base, np.packbits(bits, bitorder="little").tobytes()


def bitmap_gfns(base: int, bitmap: bytes, npages: int, what: str) -> Gfns:
    """The gfns a (base, bitmap) names, ascending: at least one, all below ``npages``
    (RemoteProtocolError ``malformed``)."""
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    offsets = np.flatnonzero(bits.view(np.bool_))  # (as bool: twice as fast)
    if not len(offsets) or base + int(offsets[-1]) >= npages:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{what}: no page, or one outside the VM")
    return offsets.astype(np.uint64) + np.uint64(base)


@dataclass
class PageBatch:
    """Page records as they travel: parallel arrays plus the data of non-zero pages."""

    gfns: Gfns
    kinds: bytes
    vers: Gfns
    data: Buffer | list[Buffer]  # the pages of kinds 1 and 2, in order: one buffer, or parts of whole pages
    tags: bytes = b""  # the MAC of each protected page, in order

    def __len__(self) -> int:
        return len(self.gfns)

    def message(self, round_no: int) -> Pages:
        return Pages(round_no, u64le(self.gfns), self.kinds, u64le(self.vers), self.tags)


class IncomingPages:
    """A PAGES message at the receiver, checked (RemoteProtocolError), gathering its
    data records: ``zero()`` is the batch of its zero pages; ``add(data)`` takes the
    next data record, and ``take()`` the batch of the data pages added since the
    last take (their data: the records, in order, each a whole number of pages)."""

    def __init__(self, p: Pages) -> None:
        n = len(p.kinds)
        if n == 0 or len(p.gfns) != 8 * n or len(p.vers) != 8 * n:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES arrays disagree in length")
        kinds = np.frombuffer(p.kinds, dtype=np.uint8)
        if int(np.count_nonzero(kinds > KIND_PROTECTED)):
            raise RemoteProtocolError(ErrorCode.MALFORMED, "unknown page kind")
        protected = kinds == KIND_PROTECTED
        if len(p.tags) != TAG_LEN * int(np.count_nonzero(protected)):
            raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES tags disagree with its protected pages")
        self.gfns = from_u64le(p.gfns)
        # The source sends each message's gfns in ascending order: checking that
        # is cheaper than finding duplicates, and rules them out.
        if n > 1 and not bool((self.gfns[1:] > self.gfns[:-1]).all()):
            raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES gfns are not in ascending order")
        self.vers = from_u64le(p.vers)
        self.protected = protected
        self._zero = kinds == KIND_ZERO
        has_data = ~self._zero
        self._gfns, self._vers, self._kinds = self.gfns[has_data], self.vers[has_data], kinds[has_data]
        self._tags = p.tags
        self._parts: list[Buffer] = []
        self._rows = 0  # data pages in _parts
        self._taken = 0  # data pages taken before them

    def __len__(self) -> int:
        return len(self.gfns)

    def zero(self) -> PageBatch | None:
        if not self._zero.any():
            return None
        g = self.gfns[self._zero]
        return PageBatch(g, bytes(len(g)), self.vers[self._zero], b"", b"")

    def add(self, data: Buffer) -> None:
        self._parts.append(data)
        self._rows += len(data) // PAGE_SIZE

    def take(self) -> PageBatch | None:
        if not self._parts:
            return None
        a, b = self._taken, self._taken + self._rows
        kinds = self._kinds[a:b]
        t0 = int(np.count_nonzero(self._kinds[:a] == KIND_PROTECTED))
        t1 = t0 + int(np.count_nonzero(kinds == KIND_PROTECTED))
        batch = PageBatch(self._gfns[a:b], kinds.tobytes(), self._vers[a:b], self._parts,
                          self._tags[t0 * TAG_LEN : t1 * TAG_LEN])
        self._parts, self._rows, self._taken = [], 0, b
        return batch
