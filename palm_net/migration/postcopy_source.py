"""The source engine's post-copy steps (proto/PROTOCOL.md 7.9), as functions of the engine:
the switch's MISSING, SERVING made durable on RUNNING, the pages served (FETCHed ones
first), a recovery session's WANTs, and PULLED.  Sans-IO as the engine is
(palm_net.migration.source dispatches here; kept apart for its size)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from palm_net.errors import ErrorCode, RemoteProtocolError
from palm_net.migration.effects import (
    Effect,
    ExportFinalState,
    FinalState,
    Metadata,
    Note,
    PagesSent,
    ReadMetadata,
    SendPages,
    Serve,
    Served,
)
from palm_net.migration.handoff import InDoubt
from palm_net.migration.params import Phase, Status, Step
from palm_net.migration.postcopy import PageServer
from palm_net.wire.messages import (
    MAX_DATA_PAGES,
    MAX_MISSING_BITMAP,
    MAX_PAGES_PER_MESSAGE,
    Fetch,
    Message,
    Missing,
    Pulled,
    Running,
    Want,
)
from palm_net.wire.pages import (
    KIND_PROTECTED,
    TAG_LEN,
    Gfns,
    ascending_gfns,
    gfn_bitmap,
    protected_spans,
    u64le,
    union_gfns,
)

if TYPE_CHECKING:
    from palm_net.migration.source import SourceEngine


def announce(eng: SourceEngine) -> list[Effect]:
    """Before the pause (the last round is over, the switch decided): MISSING for the
    normal pages of its dirty set.  Their version is the round's whatever the guest
    writes until the pause; the destination marks them while this side pauses.  A
    protected page's version and MAC are final only once the VM is paused: it waits."""
    if not eng.switching:
        return []
    pending = np.asarray(eng.pending, dtype=np.uint64)
    spans, _ = protected_spans(pending, eng.protected_ranges)
    normal = np.ones(len(pending), np.bool_)
    for lo, hi in spans:
        normal[lo:hi] = False
    eng.announced = pending[normal]
    return _missing_messages(eng, eng.announced, np.zeros(0, np.intp), np.zeros(0, np.uint64), b"")


def switch(eng: SourceEngine, dirty: Gfns) -> list[Effect]:
    """Paused: every page not yet sent follows the switch (the last round's dirty set and
    what the guest wrote until the pause); the metadata of those MISSING has not named
    yet is read now.  Only those are worked out inside the pause (the dirty set's
    protected pages, and what is new): the whole set waits for the serving phase."""
    pending, dirty = np.asarray(eng.pending, np.uint64), np.asarray(dirty, np.uint64)
    eng.pending = np.zeros(0, np.uint64)
    named = eng.announced  # the dirty set's normal pages, if any: its protected ones are left
    if len(named):
        _, left = protected_spans(pending, eng.protected_ranges)
        at = np.minimum(np.searchsorted(named, dirty), len(named) - 1)
        eng.unnamed = union_gfns(left, dirty[named[at] != dirty])
    else:
        eng.unnamed = union_gfns(pending, dirty)
    eng.stats.postcopy_pages = n = len(named) + len(eng.unnamed)  # (disjoint: together, every page left)
    return [Note("switch to post-copy", {"phase": "postcopy", "round": eng.round, "missing": n}),
            *eng._request(Step.SWITCHING, ReadMetadata(eng.unnamed), Metadata)]


def metadata(eng: SourceEngine, result: Metadata, now: float) -> list[Effect]:
    """MISSING for every page left to the serving phase not named before the pause,
    then the CPU state and blob as ever."""
    gfns = eng.unnamed
    pidx = np.flatnonzero(np.frombuffer(result.kinds, np.uint8) == KIND_PROTECTED)  # their indices in gfns
    return (_missing_messages(eng, gfns, pidx, result.vers[pidx], result.tags)
            + eng._request(Step.EXPORTING, ExportFinalState(), FinalState))


def _missing_messages(eng: SourceEngine, gfns: Gfns, pidx: npt.NDArray[np.intp], pvers: Gfns,
                      tags: bytes) -> list[Effect]:
    """MISSING messages naming ascending ``gfns``: bitmaps (a normal page comes with the
    round as its version) of at most MAX_MISSING_BITMAP bytes, each with the versions
    and MACs of the protected pages it names (``pidx``: their indices in ``gfns``; at
    most 256 a message).  A bitmap keeps the pause short: 1 bit a page on the wire,
    not 16 bytes."""
    out: list[Effect] = []
    i = 0
    while i < len(gfns):
        j = int(np.searchsorted(gfns, gfns[i] + np.uint64(8 * MAX_MISSING_BITMAP)))  # past the bitmap's span
        k = int(np.searchsorted(pidx, i))  # the first protected page from i on
        if k + MAX_DATA_PAGES < len(pidx) and pidx[k + MAX_DATA_PAGES] < j:
            j = int(pidx[k + MAX_DATA_PAGES])  # no more than 256 protected pages
        k2 = int(np.searchsorted(pidx, j))
        base, bitmap = gfn_bitmap(gfns[i:j])
        out.append(eng._send(Missing(eng.round, base, bitmap, u64le(gfns[pidx[k:k2]]), u64le(pvers[k:k2]),
                                     tags[k * TAG_LEN : k2 * TAG_LEN])))
        i = j
    return out


def on_running(eng: SourceEngine, msg: Message, now: float) -> list[Effect]:
    """Post-copy's RUNNING: the VM runs at the destination (the downtime is over) and
    misses pages only this copy holds: SERVING durable before the first is sent."""
    eng._running(msg.get(Running).timings, now)
    eng.stats.phase = Phase.POSTCOPY
    return eng._request(Step.SERVING, Serve(), Served)


def served(eng: SourceEngine, result: Served, now: float) -> list[Effect]:
    if not result.ok:  # the row is not HANDED_OFF (cannot be: this run handed off): ask again
        raise InDoubt("SERVING could not be recorded")
    if eng.missing is None:  # (after a switch: the pages named before the pause and after it)
        eng.missing = union_gfns(eng.announced, eng.unnamed)
    eng.server = PageServer(eng.missing, eng.round)
    for early in eng._early_fetches:  # FETCHes that came before SERVING was durable (a vCPU waits)
        eng.server.fetch(early)
    eng._early_fetches = []
    eng.stats.marks["serving"] = now
    note = Note("serving", {"phase": "postcopy", "pages": len(eng.missing)})
    if eng._early_pulled is not None:  # every page was in already: the destination said so first
        return [note, *on_pulled(eng, eng._early_pulled, now)]
    return [note, *push(eng, now)]


def push(eng: SourceEngine, now: float) -> list[Effect]:
    """The next slice of missing pages (those a vCPU waits for first), if any is left."""
    assert eng.server is not None
    gfns = eng.server.next_slice()
    if gfns is None:  # every page went: PULLED is due (a destination gone quiet: asked again)
        eng._reply_due(now)
        return []
    eng.stats.served_pages += len(gfns)
    eng.stats.remaining = eng.server.unsent
    return eng._request(Step.SERVING, SendPages(gfns, eng.round), PagesSent)


def on_want(eng: SourceEngine, msg: Message, now: float) -> list[Effect]:
    """A recovery session's WANT: the pages still missing there; the last one starts serving."""
    w = msg.get(Want)
    if (w.more and not w.gfns) or len(eng._wanted) >= eng.info.npages // MAX_PAGES_PER_MESSAGE + 1 or (
            eng._wanted and w.round != eng.round):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "WANT: empty but not the last, more than the VM's pages "
                                                       "need, or of another round")
    eng.round = w.round
    eng._wanted.append(gfns := ascending_gfns(w.gfns, eng.info.npages, "WANT", above=eng._wanted_last))
    eng._wanted_last = int(gfns[-1]) if len(gfns) else eng._wanted_last
    if w.more:
        eng.step = Step.WANTING
        eng._reply_due(now)
        return []
    eng.missing = np.concatenate(eng._wanted)
    eng._wanted = []
    eng.stats.postcopy_pages = len(eng.missing)
    eng.stats.status, eng.stats.phase = Status.ACTIVE, Phase.POSTCOPY
    return eng._request(Step.SERVING, Serve(), Served)


def on_fetch(eng: SourceEngine, body: Fetch, now: float) -> list[Effect]:
    """A vCPU waits for these: next, ahead of the rest (before SERVING is durable: kept for then)."""
    gfns = ascending_gfns(body.gfns, eng.info.npages, "FETCH")
    if not len(gfns):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "FETCH of no page")
    eng.stats.fetched_pages += len(gfns)
    if eng.server is None:  # (RUNNING or the last WANT came; Served not yet): bounded, one a page at most
        if sum(map(len, eng._early_fetches)) < eng.info.npages:
            eng._early_fetches.append(gfns)
        return []
    eng.server.fetch(gfns)
    return push(eng, now) if eng._awaiting is None and eng.step is Step.SERVING else []


def on_message(eng: SourceEngine, body: Fetch | Pulled, now: float) -> list[Effect]:
    """FETCH or PULLED, whenever they come while serving (a PULLED may overtake SERVING's
    durable write when nothing was missing any more: kept for then)."""
    if isinstance(body, Fetch):
        return on_fetch(eng, body, now)
    if eng.server is None and eng._awaiting is Served:
        eng._early_pulled = body
        return []
    if eng.server is None:
        raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "PULLED before serving began")
    return on_pulled(eng, body, now)


def on_pulled(eng: SourceEngine, body: Pulled, now: float) -> list[Effect]:
    """Every page is at the destination and its row COMMITTED: this copy may go."""
    assert eng.server is not None
    if eng.server.unsent:  # it cannot have pages never sent: its word is not taken
        raise InDoubt(f"PULLED with {eng.server.unsent} pages never sent")
    st = eng.stats
    eng.pulled = body
    eng.step = Step.DONE
    st.serve_time = now - st.marks.get("serving", now)
    st.total_time = now - eng.started
    st.status, st.phase = Status.COMPLETED, Phase.COMPLETED
    return []
