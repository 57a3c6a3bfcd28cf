"""The PAGES codec (proto/PROTOCOL.md 6): parallel little-endian arrays and page data.

``gfns`` and ``vers`` are u64le each, whatever the host's byte order;
``kinds`` one byte each (0 zero page, 1 normal page, 2 protected page as
ciphertext); ``data`` the 4096-byte pages of kinds 1 and 2 in order;
``tags`` the 16-byte MAC of each protected page, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from palm_net.wire.errors import ErrorCode, RemoteProtocolError
from palm_net.wire.messages import PAGE_SIZE, Pages

KIND_ZERO = 0
KIND_NORMAL = 1
KIND_PROTECTED = 2
TAG_LEN = 16
ENTRY_BYTES = 8 + 1 + 8  # gfn, kind, version in a PAGES message
U64LE = np.dtype("<u8")  # whatever the host's byte order

Gfns = npt.NDArray[np.uint64]


def u64le(values: Gfns) -> bytes:
    """Unsigned 64-bit ints as u64le bytes."""
    return np.asarray(values, dtype=U64LE).tobytes()


def from_u64le(data: bytes) -> Gfns:
    return np.frombuffer(data, dtype=U64LE).astype(np.uint64, copy=False)


@dataclass
class PageBatch:
    """Page records as they travel: parallel arrays plus the data of non-zero pages."""

    gfns: Gfns
    kinds: bytes
    vers: Gfns
    data: bytes | memoryview  # the pages of kinds 1 and 2, in order
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
    kinds = np.frombuffer(p.kinds, dtype=np.uint8)
    protected = int(np.count_nonzero(kinds == KIND_PROTECTED))
    zero = int(np.count_nonzero(kinds == KIND_ZERO))
    if int(np.count_nonzero(kinds == KIND_NORMAL)) + protected != n - zero:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "unknown page kind")
    if len(p.data) != (n - zero) * PAGE_SIZE:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES data length disagrees with its kinds")
    if len(p.tags) != TAG_LEN * protected:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "PAGES tags disagree with its protected pages")
    gfns = from_u64le(p.gfns)
    if np.unique(gfns).size != n:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "a gfn appears twice in one PAGES message")
    return PageBatch(gfns, p.kinds, from_u64le(p.vers), p.data, p.tags)
