"""The PAGES codec (proto/PROTOCOL.md 6): parallel little-endian arrays and page data.

``gfns`` and ``vers`` are u64le each, whatever the host's byte order;
``kinds`` one byte each (0 zero page, 1 normal page, 2 protected page as
ciphertext); ``data`` the 4096-byte pages of kinds 1 and 2 in order;
``tags`` the 16-byte MAC of each protected page, in order.
"""

from __future__ import annotations

import sys
from array import array
from dataclasses import dataclass

from palm_net.wire.errors import ErrorCode, RemoteProtocolError
from palm_net.wire.messages import PAGE_SIZE, Pages

KIND_ZERO = 0
KIND_NORMAL = 1
KIND_PROTECTED = 2
TAG_LEN = 16
ENTRY_BYTES = 8 + 1 + 8  # gfn, kind, version in a PAGES message
_SWAP = sys.byteorder != "little"


def u64le(values: array[int]) -> bytes:
    """An array of unsigned 64-bit ints as u64le bytes."""
    if values.itemsize != 8:
        values = array("Q", values)
    if _SWAP:
        values = array("Q", values)
        values.byteswap()
    return values.tobytes()


def from_u64le(data: bytes) -> array[int]:
    out = array("Q", data)
    if _SWAP:
        out.byteswap()
    return out


@dataclass
class PageBatch:
    """Page records as they travel: parallel arrays plus the data of non-zero pages."""

    gfns: array[int]  # typecode Q
    kinds: bytes
    vers: array[int]  # typecode Q
    data: bytes
    tags: bytes = b""  # the MAC of each protected page, in order

    def __len__(self) -> int:
        return len(self.gfns)

    def message(self, round_no: int) -> Pages:
        return Pages(round_no, u64le(self.gfns), self.kinds, u64le(self.vers), self.data, self.tags)


def unpack(p: Pages) -> PageBatch:
    """A PAGES message's arrays, checked against each other (RemoteProtocolError)."""
    n = len(p.kinds)
    if n == 0 or len(p.gfns) != 8 * n or len(p.vers) != 8 * n:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES arrays disagree in length")
    zero, protected = p.kinds.count(KIND_ZERO), p.kinds.count(KIND_PROTECTED)
    if p.kinds.count(KIND_NORMAL) + protected != n - zero:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "unknown page kind")
    if len(p.data) != (n - zero) * PAGE_SIZE:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES data length disagrees with its kinds")
    if len(p.tags) != TAG_LEN * protected:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES tags disagree with its protected pages")
    return PageBatch(from_u64le(p.gfns), p.kinds, from_u64le(p.vers), p.data, p.tags)
