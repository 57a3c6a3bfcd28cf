"""Post-copy's two sides (proto/PROTOCOL.md 7.9), sans-IO: which page goes next, which may come.

``PageServer`` is the source's: the pages still missing at the destination,
those a vCPU waits for (FETCH) first, in the order asked, then the rest in
ascending order, each at most once per session.  ``Puller`` is the
destination's: a page is taken only if it is missing, not yet taken in this
session, and of exactly the version MISSING named; it says which faults to
ask for and, in a recovery session, which pages are still wanted (WANT).
Neither touches a VM, socket or store: the engines hand them messages and
turn what they return into effects.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from palm_net.errors import ErrorCode, RemoteProtocolError
from palm_net.wire.messages import MAX_FETCH, MAX_PAGES_PER_MESSAGE, Pages, Want
from palm_net.wire.pages import Gfns, IncomingPages, u64le

SERVE_SLICE = 64  # pages a push sends at a time while a FETCH waits (256 KiB: the fetched ones first)
SERVE_BULK = 1024  # and when none does (4 MiB: a push's own costs spread; a FETCH waits behind at most this)


class PageServer:
    """The source's pages still to send in post-copy: ``pending`` (ascending gfns)."""

    def __init__(self, pending: Gfns, round_no: int) -> None:
        self.round = round_no
        self.pending = np.asarray(pending, dtype=np.uint64)  # ascending, each once (the dirty set, or WANTs)
        if len(self.pending) > 1 and not bool((self.pending[1:] > self.pending[:-1]).all()):
            raise ValueError("pages to serve are in ascending order, each once")
        self.sent = np.zeros(len(self.pending), dtype=bool)
        self.asked = np.zeros(len(self.pending), dtype=bool)  # a FETCH named it (once is enough)
        self._cursor = 0  # the ascending push: every index below it is sent
        self._asked: deque[int] = deque()  # indices a FETCH asked for, in order: at most one each

    @property
    def unsent(self) -> int:
        return len(self.pending) - int(np.count_nonzero(self.sent))

    def _index(self, gfns: Gfns) -> tuple[np.ndarray, np.ndarray]:
        idx = np.searchsorted(self.pending, gfns)
        ok = idx < len(self.pending)
        ok[ok] = self.pending[idx[ok]] == gfns[ok]
        return idx, ok

    def fetch(self, gfns: Gfns) -> None:
        """A FETCH: these go next (a gfn not pending or sent already is ignored: its
        page is on its way, or the destination asked about one it has)."""
        idx, ok = self._index(gfns)
        new = idx[ok][~self.sent[idx[ok]] & ~self.asked[idx[ok]]]
        self.asked[new] = True
        self._asked.extend(int(i) for i in new)

    def next_slice(self) -> Gfns | None:
        """The next pages to send (ascending, as PAGES wants), marked sent; None: all sent.
        Pages a FETCH asked for go first, the rest of the slice from the ascending push (a
        slice of one page each would cost a read, a message and its overheads a page)."""
        take: list[int] = []
        while self._asked and len(take) < SERVE_SLICE:
            i = self._asked.popleft()
            if not self.sent[i]:
                self.sent[i] = True
                take.append(i)
        n, size = len(self.pending), SERVE_SLICE if take else SERVE_BULK
        while len(take) < size and self._cursor < n:
            hi = min(n, self._cursor + size - len(take))
            fresh = np.flatnonzero(~self.sent[self._cursor : hi]) + self._cursor
            self.sent[fresh] = True
            take.extend(int(i) for i in fresh)
            self._cursor = hi
        if not take:
            return None
        return self.pending[np.sort(np.asarray(take, dtype=np.int64))]


class Puller:
    """The destination's pages still missing in post-copy: ``missing`` (gfns, each once),
    each due with version ``vers``; ``round``: the switch's round.  Put in gfn order on
    first use, not when made: a switch's MISSING names two ascending runs (before the
    pause, after it), and the Puller is made inside the pause (at COMMIT)."""

    def __init__(self, round_no: int, missing: Gfns, vers: Gfns) -> None:
        self.round = round_no
        self.missing = np.asarray(missing, dtype=np.uint64)
        self.vers = np.asarray(vers, dtype=np.uint64)
        if len(self.vers) != len(self.missing):
            raise ValueError("one version per missing page")
        self._sorted = len(self.missing) < 2 or bool((self.missing[1:] > self.missing[:-1]).all())
        self.taken = np.zeros(len(self.missing), dtype=bool)  # accepted in this session
        self._taken = 0
        self._asked: set[int] = set()

    def in_order(self) -> None:
        """Sorted now (the runner's, once RUNNING is sent: not on a waiting vCPU's path)."""
        if not self._sorted:
            # (ascending runs, each page once: the engine saw to it; merged in linear time)
            order = np.argsort(self.missing, kind="stable")
            self.missing, self.vers, self._sorted = self.missing[order], self.vers[order], True

    @property
    def remaining(self) -> int:
        """Pages not yet taken (their PAGES not yet accepted)."""
        return len(self.missing) - self._taken

    def take(self, p: Pages) -> IncomingPages:
        """A PAGES message of the serving phase, checked: each gfn missing and not yet
        taken (else ``replay``), of the switch's round and the version MISSING named
        (else ``rollback``).  The hypervisor checks each page's kind and MAC as it fills it."""
        batch = IncomingPages(p)
        self.in_order()
        if p.round != self.round:
            raise RemoteProtocolError(ErrorCode.ROLLBACK, f"post-copy page of round {p.round}, not {self.round}")
        idx = np.searchsorted(self.missing, batch.gfns)
        known = idx < len(self.missing)
        known[known] = self.missing[idx[known]] == batch.gfns[known]
        if not known.all() or self.taken[idx].any():
            raise RemoteProtocolError(ErrorCode.REPLAY, "a post-copy page that is not missing here")
        if not bool((self.vers[idx] == batch.vers).all()):
            raise RemoteProtocolError(ErrorCode.ROLLBACK, "a post-copy page of another version than announced")
        self.taken[idx] = True
        self._taken += len(idx)
        return batch

    def faults(self, gfns: list[int]) -> bytes | None:
        """The FETCH body for vCPU faults on ``gfns`` (those still missing and not asked
        for in this session, at most MAX_FETCH), or None if there is nothing to ask."""
        want = sorted({g for g in gfns if g not in self._asked})
        if not want:
            return None
        arr = np.asarray(want, dtype=np.uint64)
        self.in_order()
        idx = np.searchsorted(self.missing, arr)
        ok = idx < len(self.missing)
        ok[ok] = self.missing[idx[ok]] == arr[ok]
        ok[ok] = ~self.taken[idx[ok]]
        ask = arr[ok][:MAX_FETCH]
        if not len(ask):
            return None
        self._asked.update(int(g) for g in ask)
        return u64le(ask)

    def wants(self) -> list[Want]:
        """The pages still missing, as a recovery session's WANT messages (at least one)."""
        self.in_order()
        left = self.missing[~self.taken]
        chunks = [left[i : i + MAX_PAGES_PER_MESSAGE] for i in range(0, len(left), MAX_PAGES_PER_MESSAGE)] or [left]
        return [Want(self.round, u64le(c), i + 1 < len(chunks)) for i, c in enumerate(chunks)]
