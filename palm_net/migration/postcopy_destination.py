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
from palm_net.wire.messages import Message, Missing, Pulled
from palm_net.wire.pages import MAX_VERSION, ascending_gfns

if TYPE_CHECKING:
    from palm_net.migration.destination import DestinationEngine


def on_missing(eng: DestinationEngine, msg: Message, _: Record) -> list[Effect]:
    """MISSING: these pages come after the switch, with these versions and MACs."""
    m = msg.get(Missing)
    if not eng.keys_imported or eng.channels > 1:
        raise RemoteProtocolError(ErrorCode.OUT_OF_STATE, "MISSING before KEYS, or on more channels than one")
    if m.round < eng.round or (eng.switch_round is not None and m.round != eng.switch_round):
        raise RemoteProtocolError(ErrorCode.ROLLBACK, f"MISSING of round {m.round}")
    last = int(eng._missing[-1][0][-1]) if eng._missing else -1
    gfns = ascending_gfns(m.gfns, eng.npages, "MISSING", above=last)
    vers = np.frombuffer(m.vers, dtype="<u8").astype(np.uint64) if len(m.vers) % 8 == 0 else None
    if not len(gfns) or vers is None or len(vers) != len(gfns) or int(vers.max()) >= MAX_VERSION:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "MISSING arrays disagree, or a version out of range")
    eng.switch_round = m.round
    eng._missing.append((gfns, vers))
    eng._missing_tags.append(m.tags)
    eng.applied[gfns] = vers + 1  # arrived, as far as COMPLETE's check goes: they come later
    return []  # marked all at once with the CPU state (one hypervisor call, not one a message)


def mark_missing(eng: DestinationEngine) -> list[Effect]:
    """MISSING's pages into the VM's map and metadata, at the CPU state (after the last MISSING)."""
    if eng.switch_round is None:
        return []
    gfns, vers = (np.concatenate([p[i] for p in eng._missing]) for i in (0, 1))
    tags, eng._missing_tags = b"".join(eng._missing_tags), []
    return [MarkMissing(eng.switch_round, gfns, vers, tags)]


def pull_finished(eng: DestinationEngine, result: PullFinished) -> list[Effect]:
    if not result.committed:  # the row is not PULLING: nothing to do but say so (the VM stays)
        raise MigrationFailure(ErrorCode.HYPERVISOR, "post-copy: COMMITTED could not be recorded")
    return [eng._send(Pulled(result.digest))]
