"""The memory digest of a page backend, kept page by page (proto/PROTOCOL.md 7.4).

    H(page)  = BLAKE2b-128(person "palm-page-hash", the page's 4096 bytes as the
               guest sees them: a protected page in plaintext)
    B_j      = BLAKE2b-256(H(64j) || ... || H(64j+63))          (the last block shorter)
    digest   = BLAKE2b-256(person "palm-vm-digest", u64le(pages) || B_0 || B_1 || ...)

A migration keeps H for every page as it is sent (the source) or written (the
destination), and the blocks whose pages changed are hashed again as it goes;
the digest at the end then costs a few small hashes, not a pass over memory.
The same function over all of memory at once is ``ModelVM.digest``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
HASH_LEN = 16
BLOCK = 64  # pages a block hash covers
PAGE_PERSON = b"palm-page-hash"
DIGEST_PERSON = b"palm-vm-digest"

Buffer = bytes | bytearray | memoryview
ZERO_PAGE_HASH = hashlib.blake2b(bytes(PAGE_SIZE), digest_size=HASH_LEN, person=PAGE_PERSON).digest()


Pages = Sequence[Buffer] | Sequence[npt.NDArray[np.uint8]] | npt.NDArray[np.uint8]


def hash_pages(pages: Pages) -> npt.NDArray[np.uint8]:
    """H of each page, as rows (hashlib releases the GIL while it hashes a page)."""
    out = b"".join([hashlib.blake2b(p.data if isinstance(p, np.ndarray) else p, digest_size=HASH_LEN,
                                    person=PAGE_PERSON).digest() for p in pages])
    return np.frombuffer(out, np.uint8).reshape(-1, HASH_LEN)


class PageDigest:
    """H of every page of a VM (all zero pages to begin with), and its digest."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.hashes = np.empty((npages, HASH_LEN), np.uint8)
        self.hashes[:] = np.frombuffer(ZERO_PAGE_HASH, np.uint8)
        nblocks = -(-npages // BLOCK)
        self._blocks = np.zeros((nblocks, 32), np.uint8)
        self._stale = np.ones(nblocks, np.bool_)
        self._lock = threading.Lock()  # the reader or writer thread records, the handoff digests

    def record(self, gfns: npt.NDArray[np.uint64], hashes: npt.NDArray[np.uint8]) -> None:
        with self._lock:
            self.hashes[gfns] = hashes
            self._stale[gfns // BLOCK] = True

    def record_zero(self, gfns: npt.NDArray[np.uint64]) -> None:
        self.record(gfns, np.frombuffer(ZERO_PAGE_HASH, np.uint8))

    def refresh(self) -> None:
        """Hashes the blocks that changed (the writer calls it as it goes, so that
        ``digest`` at the end finds few)."""
        with self._lock:
            for j in np.flatnonzero(self._stale):
                self._blocks[j] = np.frombuffer(hashlib.blake2b(
                    self.hashes[j * BLOCK : (j + 1) * BLOCK].tobytes(), digest_size=32).digest(), np.uint8)
            self._stale[:] = False

    def digest(self) -> str:
        self.refresh()
        with self._lock:
            h = hashlib.blake2b(self.npages.to_bytes(8, "little"), digest_size=32, person=DIGEST_PERSON)
            h.update(self._blocks.tobytes())
            return h.hexdigest()
