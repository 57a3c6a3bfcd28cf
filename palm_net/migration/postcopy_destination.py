"""The destination engine's post-copy steps (proto/PROTOCOL.md 7.9), as functions of the
engine: MISSING's pages marked (they come after the switch, with these versions and
MACs), and the durable COMMITTED that PULLED announces.  Sans-IO as the engine is
(palm_net.migration.destination dispatches here; kept apart for its size)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from palm_net.channel.records import Record
from palm_net.errors import ErrorCode, MigrationFailure, RemoteProtocolError
from palm_net.migration.effects import Effect, MarkMissing, PullFinished
from palm_net.wire.messages import MAX_DATA_PAGES, MAX_MISSING_BITMAP, Message, Missing, Pulled
from palm_net.wire.pages import MAX_VERSION, TAG_LEN, ascending_gfns, bitmap_gfns

MARK_BATCH = 65536  # MISSING's pages marked in one hypervisor call, at least (but the last)

if TYPE_CHECKING:
    from palm_net.migration.destination import DestinationEngine


def on_missing(eng: DestinationEngine, msg: Message, _: Record) -> list[Effect]:
    """MISSING: these pages come after the switch, a normal one with the round as its
    version, a protected one with the version and MAC named here."""
    m = msg.get(Missing)
    if not eng.keys_imported or eng.channels > 1:
        raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "MISSING before KEYS, or on more channels than one")
    if m.round < eng.round or (eng.switch_round is not None and m.round != eng.switch_round):
        raise RemoteProtocolError(ErrorCode.ROLLBACK, f"MISSING of round {m.round}")
    gfns = bitmap_gfns(m.base, m.bitmap, eng.npages, "MISSING")
    if eng._named is None:
        eng._named = np.zeros(eng.npages, np.bool_)
    if bool(eng._named[gfns].any()):  # (two ascending runs: before the pause and after it)
        raise RemoteProtocolError(ErrorCode.MALFORMED, "MISSING: a page an earlier MISSING named")
    runs = eng._missing_runs + (not eng._missing or int(gfns[0]) < int(eng._missing[-1][0][-1]))
    protected = eng.begin.protected_pages if eng.begin is not None else eng.npages
    if runs > 2 or len(eng._missing) >= 2 * (eng.npages // (8 * MAX_MISSING_BITMAP) + protected // MAX_DATA_PAGES + 2):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "MISSING: more than two ascending runs, or more messages "
                                                       "than the VM's pages need")
    eng._missing_runs = runs
    pgfns = ascending_gfns(m.gfns, eng.npages, "MISSING's protected pages")
    at = np.searchsorted(gfns, pgfns)
    named = bool((at < len(gfns)).all()) and bool((gfns[np.minimum(at, len(gfns) - 1)] == pgfns).all())
    pvers = np.frombuffer(m.vers, dtype="<u8").astype(np.uint64) if len(m.vers) % 8 == 0 else None
    if (not named or pvers is None or len(pvers) != len(pgfns) or len(m.tags) != TAG_LEN * len(pgfns)
            or (len(pvers) and int(pvers.max()) >= MAX_VERSION)):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "MISSING: a protected page not in its bitmap, arrays that "
                                                       "disagree, or a version out of range")
    slots = eng.applied.slots(pgfns)
    if bool((slots < 0).any()):
        raise RemoteProtocolError(ErrorCode.INTEGRITY, "MISSING: a protected page no protected process owns")
    eng.applied.apply(slots, pvers, pgfns)  # (a version older than one received: rollback)
    vers = np.full(len(gfns), m.round, dtype=np.uint64)
    vers[at] = pvers
    eng.switch_round = m.round
    eng._named[gfns] = True
    eng._missing.append((gfns, vers))
    eng._missing_tags.append(m.tags)
    eng.applied.arrived[gfns] = True  # as far as COMPLETE's check goes: they come later
    eng._unmarked += len(gfns)
    return mark_missing(eng) if eng._unmarked >= MARK_BATCH else []


def mark_missing(eng: DestinationEngine) -> list[Effect]:
    """MISSING's pages not yet marked into the VM's map and metadata: in batches of
    MARK_BATCH pages or more as they come (the first while the source still pauses or
    exports its blob: off the pause's critical path), the rest at the CPU state
    (after the last MISSING); one call for each ascending run of them (those named
    before the pause, those after).  Not one hypervisor call a message: a message may
    name few pages."""
    parts, tags = eng._missing[eng._marked :], eng._missing_tags
    if eng.switch_round is None or not parts:
        return []
    eng._marked, eng._missing_tags, eng._unmarked = len(eng._missing), [], 0
    out: list[Effect] = []
    i = 0
    while i < len(parts):
        j = i + 1
        while j < len(parts) and parts[j][0][0] > parts[j - 1][0][-1]:
            j += 1
        out.append(MarkMissing(eng.switch_round, np.concatenate([p[0] for p in parts[i:j]]),
                               np.concatenate([p[1] for p in parts[i:j]]), b"".join(tags[i:j])))
        i = j
    return out


def pull_finished(eng: DestinationEngine, result: PullFinished) -> list[Effect]:
    if not result.committed:  # the row is not PULLING: nothing to do but say so (the VM stays)
        raise MigrationFailure(ErrorCode.HYPERVISOR, "post-copy: COMMITTED could not be recorded")
    return [eng._send(Pulled(result.digest))]
