"""What a destination has applied (proto/PROTOCOL.md 6): whether each page arrived,
and each protected page's version, for the rollback check.

A zero or normal page record carries its message's round as its version, and a
gfn's rounds never go back (each gfn has one channel, whose rounds ascend): so
only a protected page's version is worth keeping.  A byte a page, plus 4 bytes a
protected page (a 4 GiB guest: 1 MiB, where a version a page took 4 MiB).  Sans-IO,
owned by the destination engine: its checks raise the peer's errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from palm_net.errors import ErrorCode, RemoteProtocolError
from palm_net.wire.pages import Gfns


class Applied:
    def __init__(self, npages: int) -> None:
        self.arrived: npt.NDArray[np.bool_] = np.zeros(npages, np.bool_)
        self._first: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)  # each process's first gfn, ascending
        self._end: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)  # and one past its last
        self._base: npt.NDArray[np.int64] = np.zeros(0, np.int64)  # its first page's slot
        self._version: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)  # per slot: version + 1 (0: none yet)

    def set_layout(self, ranges: Sequence[tuple[int, int]]) -> None:
        """The protected processes' gfns, (first, count) each, as the hypervisor took them
        from KEYS (it refuses overlapping ranges, and ranges past the VM's memory)."""
        rs = sorted(ranges)
        counts = [count for _, count in rs]
        self._first = np.array([first for first, _ in rs], np.uint64)
        self._end = self._first + np.array(counts, np.uint64)
        self._base = np.cumsum([0, *counts[:-1]], dtype=np.int64)[: len(rs)]
        self._version = np.zeros(sum(counts), np.uint32)

    @property
    def protected_pages(self) -> int:
        return len(self._version)

    def slots(self, gfns: Gfns) -> npt.NDArray[np.int64]:
        """Each gfn's protected-version slot, or -1 for a gfn no protected process owns."""
        out = np.full(len(gfns), -1, np.int64)
        if not len(self._first) or not len(gfns):
            return out
        i = np.searchsorted(self._first, gfns, side="right").astype(np.int64) - 1
        at = np.maximum(i, 0)
        inside = (i >= 0) & (gfns < self._end[at])
        out[inside] = self._base[at[inside]] + (gfns[inside] - self._first[at[inside]]).astype(np.int64)
        return out

    def take(self, gfns: Gfns, vers: Gfns, protected: npt.NDArray[np.bool_], round_no: int) -> None:
        """A PAGES message's pages, checked (versions below MAX_VERSION already) and taken as
        applied: a zero or normal page's version is its round, a protected page comes as
        ciphertext and only it does, and none older than what was applied."""
        slots = self.slots(gfns) if len(self._first) else None
        misplaced = protected if slots is None else (slots >= 0) != protected
        if misplaced.any():
            raise RemoteProtocolError(ErrorCode.INTEGRITY, f"page {gfns[np.argmax(misplaced)]}: protected pages "
                                                            "travel as ciphertext, and only they do")
        plain = vers if slots is None else vers[~protected]  # (no protected process: none is protected here)
        if bool((plain != round_no).any()):
            raise RemoteProtocolError(ErrorCode.MALFORMED, "a zero or normal page's version is not its round")
        if slots is not None:
            # The round of a zero or normal page never goes back (its channel's): only a
            # protected page can come older than what was applied.
            self.apply(slots[protected], vers[protected], gfns[protected])
        self.arrived[gfns] = True

    def apply(self, slots: npt.NDArray[np.int64], vers: Gfns, gfns: Gfns) -> None:
        """These protected pages' (``gfns``, each once) versions, as applied: all below
        2**32 - 1, none older than one applied before (RemoteProtocolError ``rollback``)."""
        older = (vers + 1) < self._version[slots]
        if older.any():
            i = int(np.argmax(older))
            raise RemoteProtocolError(ErrorCode.ROLLBACK, f"page {gfns[i]} version {vers[i]} older than applied "
                                                          f"{self.version(int(slots[i]))}")
        self._version[slots] = vers + 1

    def version(self, slot: int) -> int:
        """A protected page's version applied (-1: none yet)."""
        return int(self._version[slot]) - 1

    @property
    def missing(self) -> int:
        """Pages never received."""
        return len(self.arrived) - int(np.count_nonzero(self.arrived))
