"""The metadata digest of a protected process (proto/PROTOCOL.md 7.3), kept block by block.

    R(g)     = u64le(the version of page g) || its MAC (16 bytes)               (24 bytes)
    M_j      = BLAKE2b-256(person "palm-meta-block", R(first+64j) || ... || R(first+64j+63))
               (the last block shorter)
    metadata = BLAKE2b-256(person "palm-page-meta", u64le(count) || M_0 || M_1 || ...)

One pass over all of a process's versions and MACs costs 1.8 ms per 256 MiB of
protected memory here, on each side, inside the pause: it grew with the
process, not with what changed.  So a page whose version or MAC changes makes
its block stale (``touch``, after the change), ``refresh`` hashes the stale
blocks again as the migration goes, and the digest at the pause costs the
blocks changed since the last refresh plus one hash over 32 bytes a block.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

BLOCK = 64  # pages a block covers
RECORD = 8 + 16  # a page's version (u64le) and MAC
BLOCK_PERSON = b"palm-meta-block"
DIGEST_PERSON = b"palm-page-meta"


class MetadataDigest:
    """The block hashes of every protected process's versions and MACs.

    ``versions`` and ``tags`` are the VM's per-page arrays (read, never written);
    ``layout`` the processes' (first, count).  Whoever changes a protected page's
    version or MAC calls ``touch`` after the change: a refresh that read the block
    before it then hashes it again, one that reads it after has it."""

    def __init__(self, versions: npt.NDArray[np.uint64], tags: npt.NDArray[np.uint8],
                 layout: Sequence[tuple[int, int]]) -> None:
        self._versions, self._tags = versions, tags
        # Kept in gfn order (the search below needs it), whatever the layout's order.
        self._order = sorted(range(len(layout)), key=lambda i: layout[i][0])
        self._first = np.array([layout[i][0] for i in self._order], np.int64)
        self._count = np.array([layout[i][1] for i in self._order], np.int64)
        nblocks = -(-self._count // BLOCK)
        self._base = np.array([0, *np.cumsum(nblocks)], np.int64)  # the i-th in gfn order: base[i] .. base[i+1]
        self._blocks = np.zeros((int(self._base[-1]), 32), np.uint8)
        self._stale = np.ones(int(self._base[-1]), np.bool_)  # nothing hashed yet
        self._lock = threading.Lock()  # the stale flags: taken briefly, by writers under the VM's lock too
        self._hashing = threading.Lock()  # one refresh at a time, and the block hashes
        self.hashed = 0  # blocks hashed so far (the first refresh hashes them all)

    def _block_of(self, gfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        proc = np.searchsorted(self._first, gfns, side="right") - 1
        block: npt.NDArray[np.int64] = self._base[proc] + (gfns - self._first[proc]) // BLOCK
        return block

    def touch(self, gfns: npt.NDArray[np.uint64] | int) -> None:
        """The versions or MACs of these protected gfns changed (or may have)."""
        blocks = self._block_of(np.atleast_1d(np.asarray(gfns)).astype(np.int64))
        with self._lock:
            self._stale[blocks] = True

    def refresh(self) -> None:
        """Hashes the stale blocks again: their flags cleared first, then their records
        read, all at once, and hashed a block at a time (a touch meanwhile stales it anew)."""
        with self._hashing:
            with self._lock:
                stale = np.flatnonzero(self._stale)
                self._stale[stale] = False
            if not len(stale):
                return
            proc = np.searchsorted(self._base, stale, side="right") - 1
            lo = self._first[proc] + (stale - self._base[proc]) * BLOCK
            lens = np.minimum(lo + BLOCK, self._first[proc] + self._count[proc]) - lo
            ends = np.cumsum(lens)
            recs = np.empty((int(ends[-1]), RECORD), np.uint8)
            versions = self._versions.astype("<u8", copy=False)  # (a view: the hosts are little-endian)
            if len(stale) == len(self._stale):  # all of them (the first): the processes' runs as they lie
                at = 0
                for first, count in zip(self._first.tolist(), self._count.tolist()):
                    recs[at : at + count, :8] = versions[first : first + count, None].view(np.uint8)
                    recs[at : at + count, 8:] = self._tags[first : first + count]
                    at += count
            else:
                gfns = np.repeat(lo - (ends - lens), lens) + np.arange(len(recs))
                recs[:, :8] = versions[gfns, None].view(np.uint8)
                recs[:, 8:] = self._tags[gfns]
            flat = recs.reshape(-1).data
            bounds = (ends * RECORD).tolist()
            out = [hashlib.blake2b(flat[at:end], digest_size=32, person=BLOCK_PERSON).digest()
                   for at, end in zip([0, *bounds[:-1]], bounds)]
            self._blocks[stale] = np.frombuffer(b"".join(out), np.uint8).reshape(-1, 32)
            self.hashed += len(stale)

    def digest(self, process: int) -> bytes:
        """The metadata digest of the process at this index of the layout."""
        self.refresh()
        i = self._order.index(process)
        with self._hashing:
            h = hashlib.blake2b(int(self._count[i]).to_bytes(8, "little"), digest_size=32, person=DIGEST_PERSON)
            h.update(self._blocks[self._base[i] : self._base[i + 1]].tobytes())
            return h.digest()
