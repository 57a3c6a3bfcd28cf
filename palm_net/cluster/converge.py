"""The VM records follow the handoff: the convergence rules, sans-IO.

The handoff (SQLite and the abort token, proto 7.5) is the only authority on
where a VM runs; an agent acts on it and on nothing else.  The cluster record
``vms/VM_ID`` is a projection of it that every agent keeps true for its own
part, and changes only by compare-and-swap: every write compares the key's
``mod_revision`` with the one just read (or that the key does not exist), so a
write decided on a stale read never lands, however late it arrives.

What an agent knows about a VM (a ``Fact``) and what it does to the record:

| fact | the record says | the agent writes |
|---|---|---|
| HOSTS: it runs here (not in doubt, not arriving) | nothing | the record naming it |
| HOSTS | this agent | only what changed (state, name, migration id) |
| HOSTS, arrived by M from A | A (before M) | the record naming it and M: COMMIT's move |
| HOSTS | another agent, or garbage | the record naming it (the handoff says it runs here, and only here) |
| GONE_TO(B, M): it left by migration M, committed on B | this agent | the record naming B and M |
| GONE: it is not here and nothing says where it went | this agent | deletes the record |
| IN_DOUBT (handed off, no answer yet), ARRIVING (not committed) | anything | nothing |

The destination writes at COMMIT (HOSTS), the source at DONE or when recovery
settles it (GONE_TO); whichever reaches etcd first wins, the other finds the
record done.  An agent cut off from etcd writes when it is back; a record
left stale by a partition is corrected by the agent that hosts the VM, or
by the one it names.  Only the VM's host ever names itself, and the handoff
lets one host at a time run a VM, so two agents never fight over a record,
except after an operator's override forked a VM: an agent that had to take
over a record naming an agent other than the one the VM came from
``CONFLICT_LIMIT`` times within ``CONFLICT_WINDOW`` stops writing it and
reports the conflict (its status, and the agent record).

Nothing here, and nothing anywhere, starts or stops a VM because of a record.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, replace

from palm_net.cluster.model import VmRecord

CONFLICT_LIMIT = 3
CONFLICT_WINDOW = 60.0


class FactKind(enum.Enum):
    HOSTS = "hosts"
    GONE_TO = "gone-to"
    IN_DOUBT = "in-doubt"
    ARRIVING = "arriving"


@dataclass(frozen=True)
class Fact:
    """What this agent's handoff says of one VM."""

    kind: FactKind
    vm_id: str
    record: VmRecord | None = None  # HOSTS: the record as this agent would write it
    to: str = ""  # GONE_TO: the destination agent
    migration: str = ""  # GONE_TO: the migration that took it there
    came_from: str = ""  # HOSTS: the source of the migration that put it here ("" if made here)


@dataclass(frozen=True)
class Read:
    """A record as read: its value (None: absent, or ``invalid``) and its mod_revision (0: absent)."""

    vm_id: str
    record: VmRecord | None
    mod_revision: int
    invalid: bool = False


@dataclass(frozen=True)
class Write:
    """Put ``record`` if the key's mod_revision is still ``expect`` (0: the key does not exist)."""

    record: VmRecord
    expect: int
    why: str


@dataclass(frozen=True)
class Remove:
    vm_id: str
    expect: int
    why: str


Action = Write | Remove


def _same(a: VmRecord, b: VmRecord) -> bool:
    return a == b


class Converger:
    """One agent's side of the VM records.  ``wanted`` says which records to read,
    ``plan`` what to write given what was read and what the handoff says now (read
    the records first, then take the facts: a fact never predates the record it
    is compared with), ``done`` what happened to each write."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.mine: set[str] = set()  # records that named this agent when last seen
        self.conflicts: set[str] = set()
        self._takeovers: dict[str, deque[float]] = {}

    def wanted(self, facts: dict[str, Fact]) -> list[str]:
        return sorted(set(facts) | self.mine)

    def saw(self, read: Read) -> None:
        if read.record is not None and read.record.agent == self.me:
            self.mine.add(read.vm_id)
        else:
            self.mine.discard(read.vm_id)

    def plan(self, facts: dict[str, Fact], reads: dict[str, Read], now: float) -> list[Action]:
        actions: list[Action] = []
        for vm_id, read in sorted(reads.items()):
            self.saw(read)
            action = self._one(facts.get(vm_id), read, now)
            if action is not None:
                actions.append(action)
        return actions

    def _one(self, fact: Fact | None, read: Read, now: float) -> Action | None:
        rec, rev = read.record, read.mod_revision
        mine = rec is not None and rec.agent == self.me
        if fact is None:  # not here, and nothing says where it went
            self._calm(read.vm_id)
            return Remove(read.vm_id, rev, "the VM is not on this agent") if mine else None
        if fact.kind is FactKind.GONE_TO:
            self._calm(read.vm_id)
            if not mine:
                return None
            assert rec is not None
            return Write(replace(rec, agent=fact.to, migration=fact.migration), rev,
                         f"migration {fact.migration[:8]} committed on {fact.to}")
        if fact.kind is not FactKind.HOSTS:
            return None  # in doubt or arriving: the handoff has not decided; neither do we
        want = fact.record
        assert want is not None
        if rec is None and not read.invalid:
            self._calm(read.vm_id)
            return Write(want, 0, "runs here, no record yet")
        if mine:
            assert rec is not None
            self._calm(read.vm_id)
            if not want.migration:
                want = replace(want, migration=rec.migration)  # not known here: keep what the record knows
            return None if _same(rec, want) else Write(want, rev, "runs here, record out of date")
        # The record names another agent (or cannot be read): the handoff says the VM runs here.
        if rec is not None and fact.came_from and rec.agent == fact.came_from and want.migration \
                and rec.migration != want.migration:
            # The COMMIT of the migration that put it here, from the agent it came from: the
            # expected move, keyed by that migration's id.
            self._calm(read.vm_id)
            return Write(want, rev, f"committed here by migration {want.migration[:8]} from {rec.agent}")
        if read.vm_id in self.conflicts:
            return None
        seen = self._takeovers.setdefault(read.vm_id, deque())
        while seen and seen[0] < now - CONFLICT_WINDOW:
            seen.popleft()
        if len(seen) >= CONFLICT_LIMIT:
            self.conflicts.add(read.vm_id)
            return None
        seen.append(now)
        was = "an unreadable record" if rec is None else f"a record naming {rec.agent}"
        return Write(want, rev, f"runs here by the handoff; replaces {was}")

    def _calm(self, vm_id: str) -> None:
        self.conflicts.discard(vm_id)
        self._takeovers.pop(vm_id, None)

    def done(self, action: Action, ok: bool) -> None:
        """A write landed (``ok``) or found the record changed (read it again)."""
        if not ok:
            return
        if isinstance(action, Write):
            if action.record.agent == self.me:
                self.mine.add(action.record.vm_id)
            else:
                self.mine.discard(action.record.vm_id)
        else:
            self.mine.discard(action.vm_id)
