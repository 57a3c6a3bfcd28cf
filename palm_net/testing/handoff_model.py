"""An exhaustive, explicit-state model of the handoff (proto/PROTOCOL.md 7.5, and
post-copy's, 7.9).

One migration of one VM between a source and a destination agent, pre-copy or
post-copy (the source's choice at the pause; ``Bounds.postcopy`` explores both).
A state is what survives and what is in flight:

- each side's durable row (source: none / sending / handed_off / serving /
  done / aborted; destination: none / receiving / prepared / pulling /
  committed / aborted);
- each side's copy of the VM (source: running / paused / scrubbed;
  destination: none / incoming / running / scrubbed; "incoming" with a
  committed or pulling row is the not-running copy a failed activation
  leaves), and whether the destination's copy still misses pages only the
  source's holds (post-copy's map, durable with the VM);
- each side up or crashed, and what its process is in the middle of (lost in
  a crash): the source's ``migrate_out``, its recovery and serving sessions,
  the destination's session (the migration's, or a recovery one pulling);
- the messages in flight, a bounded multiset: any of them may be lost,
  duplicated, delayed past any other (so reordered), or delivered.

Post-copy: COMPLETE carries MISSING; at COMMIT the destination moves prepared
-> pulling (SWITCH), runs the VM and answers RUNNING instead of DONE; the source
moves handed_off -> serving (SERVE) and sends PAGES (every page the destination
misses, FETCHed or pushed: one message), keeping its copy paused; once they are
in, the destination moves pulling -> committed (PULLED) and says PULLED, and
the source moves serving -> done (CONFIRM) and scrubs.  Recovery: a source in
doubt (handed_off or serving) asks with QUERY; a pulling destination answers
``postcopy`` (its WANTs with it) and that session pulls, the source's serves
(handed_off -> serving first), ending in PULLED as above.

The operator's abandon (proto 7.5's last column, 7.9 item 7; ``Bounds.abandon``):
once the other host is lost, either side moves serving / pulling to abandoned,
ends what reads its copy and scrubs it (a destination's VM that misses no page
commits instead).  It is taken from the table (``move``), anywhere the table
allows it, and may lose the VM: that loss is allowed only where post-copy's
inherent risk is (the destination runs the VM before it has every page: its row
pulling), and is counted apart; anywhere else it is a violation, and so is any
fork.

The steps are the code's, in the code's order (persist, then act), with the
durable move and the VM action as separate steps so that a crash may fall
between them.  Every state move is taken from ``handoff.MOVES`` / ``leaving``,
every decision to resume, scrub or run from ``handoff.may_resume`` /
``may_scrub`` / ``may_run``, and which source rows are in doubt (asked about)
from ``orchestrate.IN_DOUBT``, looked up at call time (a test may monkeypatch
them); what the operator may touch is decided by the real
``VmRegistry.operable``.  The properties checked are the model's own (they do
not use those functions, so a wrong rule cannot redefine what is right):

- never two runnable copies (the source's running, and the destination's
  running, committed or pulling), except after the operator's override
  (never after an abandon);
- never no copy at all: some copy that may run (now, or once the in-doubt
  handoff is settled) always exists, unless the operator destroyed one, or
  abandoned it where post-copy risks it (``at_risk``: counted apart).
  Post-copy: while the destination's copy (which ran) misses pages, the VM is
  whole only with both, that copy and the source's paused one (not done):
  either scrubbed or lost before PULLED is a loss;
- from every reachable state, recovery alone (no more crashes, losses or
  forged messages; restarts, timeouts, deliveries, queries and answers, a
  committed activation retried) can reach a settled state with exactly one
  running copy and nothing left over: no row in flight, no page missing
  (checked as "AG EF settled"; not after a loss the operator's abandon
  allowed, where nothing can settle on a copy);
- and there, from every state with an abandoned row, recovery alone reaches
  that side done with it: its copy scrubbed, its process idle (no session,
  no asking: "AG EF quiet").

What is abstracted: the pages, keys and checks of 7.1-7.4 are one BEGIN and
one COMPLETE (a failed check is a session failure, which is modelled); one
migration id and one peer (other migrations, other agents' queries, name
reuse and the pruning of old rows are not modelled); a crash loses the
messages to that side (its sessions die) but not those it already sent; the
abort token is valid or not (a forged or garbled one is "not"), never stolen.
Post-copy's serving is one PAGES message (FETCH, WANT, the push and a refused
page are not told apart: a session that breaks off is modelled); sessions that
serve or pull at once (the migration's and a recovery one) are one on each
side (they share the row and the VM's map); a page's content is the same from
any session (the source's copy is paused since the switch).  The source
host's loss while serving (post-copy's inherent risk, 7.9 item 7) is not
modelled: a crash loses no durable row and no copy.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, cast

from palm_net.agent.errors import AgentError
from palm_net.agent.registry import VmRegistry
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.qemu import Confinement
from palm_net.hypervisor.vms import AnyVM
from palm_net.migration import handoff, orchestrate
from palm_net.migration.handoff import HandoffState, HandoffStore, Step
from palm_net.wire.protocol import Role

SOURCE, DESTINATION = Role.SOURCE, Role.DESTINATION
MID = b"\x01" * 16


class Vm(enum.Enum):
    NONE = "none"  # the destination's, before BEGIN
    RUNNING = "running"
    PAUSED = "paused"  # the source's, from the stop-and-copy
    INCOMING = "incoming"  # the destination's, before activation (committed or not)
    SCRUBBED = "scrubbed"


class Msg(enum.IntEnum):
    # to the destination
    BEGIN = 0  # BEGIN..the pages: the destination opens its row and the incoming VM
    COMPLETE = 1  # the last pages, CPU state, COMPLETE: the destination verifies and prepares
    COMMIT = 2
    ABORT = 3  # the source's (before the handoff point; no token)
    QUERY = 4  # recovery (purpose RECOVERY, a new session)
    # to the source
    READY = 5
    DONE = 6
    ABORT_TOKEN = 7  # the destination's ABORT with a valid abort token
    ABORT_BAD = 8  # an ABORT with no token, or one that does not verify
    OUT_COMMITTED = 9  # OUTCOME committed
    OUT_ABORTED = 10  # OUTCOME aborted, with a valid token
    OUT_BAD = 11  # OUTCOME aborted with a (non-empty) token that does not verify
    OUT_UNKNOWN = 12
    # post-copy (proto 7.9)
    PAGES = 13  # to the destination: the pages it misses (FETCHed or pushed; the WANT set on recovery)
    RUNNING = 14  # to the source: PULLING durable, the VM runs at the destination (instead of DONE)
    PULLED = 15  # to the source: every page in, COMMITTED durable
    OUT_POSTCOPY = 16  # OUTCOME postcopy (and the destination's WANTs): the session goes on serving


TO_DST = frozenset({Msg.BEGIN, Msg.COMPLETE, Msg.COMMIT, Msg.ABORT, Msg.QUERY, Msg.PAGES})
TO_SRC = frozenset(Msg) - TO_DST
NO_MSGS = (0,) * len(Msg)
ALL_MSGS = tuple(Msg)  # by index (Msg(i) is slow)


class SrcPc(enum.Enum):
    """Where the source's process is (lost in a crash)."""

    START = "start"  # the operator asked for the migration
    IDLE = "idle"
    PRECOPY = "precopy"  # row sending, BEGIN sent, the VM runs
    WAIT_READY = "wait-ready"  # paused, COMPLETE sent
    COMMIT_SENT = "commit-sent"  # only with commit_before_handoff (a mutation): COMMIT left, handed_off not durable
    WAIT_DONE = "wait-done"  # handed_off durable, COMMIT sent
    SERVING = "serving"  # post-copy: serving durable, PAGES sent, PULLED awaited (migrate_out's or recovery's session)
    IN_DOUBT = "in-doubt"  # handed_off, asking the destination (recovery loop)
    RESUME = "resume"  # the row says aborted; resume_after_migration is next
    SCRUB = "scrub"  # the row says done (or the answer said committed); the scrub is next


class DstPc(enum.Enum):
    """Where the destination's session is (lost in a crash)."""

    IDLE = "idle"
    RECEIVING = "receiving"
    WAIT_COMMIT = "wait-commit"  # prepared, READY sent
    ACTIVATE = "activate"  # the row says committed; activation is next, then DONE
    SCRUB_SEND = "scrub-send"  # abort_forever moved (or not): the scrub decision, then ABORT (a failure)
    SCRUB_QUIET = "scrub-quiet"  # the same, no ABORT (the source aborted)
    SCRUB_LOAD = "scrub-load"  # the same, at restart (registry.load)
    PULLING = "pulling"  # post-copy: the migration's session after RUNNING, taking PAGES
    PULL_AGAIN = "pull-again"  # post-copy: a recovery session answered postcopy, taking PAGES (others get unknown)
    FINISH = "finish"  # post-copy: every page in; the pulled move is next, then PULLED


SRC_PENDING = frozenset({SrcPc.RESUME, SrcPc.SCRUB})  # mid-call: only the act itself, or a crash
DST_PENDING = frozenset({DstPc.SCRUB_SEND, DstPc.SCRUB_QUIET, DstPc.SCRUB_LOAD})
MIGRATING = frozenset({SrcPc.PRECOPY, SrcPc.WAIT_READY, SrcPc.COMMIT_SENT, SrcPc.WAIT_DONE,
                       SrcPc.SERVING})  # migrate_out runs
UNSETTLED = frozenset({HandoffState.HANDED_OFF, HandoffState.SERVING})  # a source row only the destination settles
PULLERS = frozenset({DstPc.PULLING, DstPc.PULL_AGAIN})


class State(NamedTuple):
    src_row: HandoffState | None
    src_vm: Vm
    src_up: bool
    src_pc: SrcPc
    dst_row: HandoffState | None
    dst_vm: Vm
    dst_up: bool
    dst_pc: DstPc
    msgs: tuple[int, ...]  # copies in flight of each Msg
    crashes: int  # crashes so far (both sides)
    forged: int  # forged messages so far
    override: bool  # the operator overrode (set only by an override: every trace to here has one)
    destroyed: bool  # the operator destroyed a copy (a VM may then be gone on purpose)
    postcopy: bool = False  # the source switched (post-copy) instead of the stop-and-copy; COMPLETE says so
    dst_missing: bool = False  # the destination's copy misses pages only the source's holds (its post-copy map)
    abandoned: bool = False  # the operator abandoned where post-copy risks the VM (at_risk): a loss is allowed
    needless: bool = False  # the operator abandoned where the VM was not at risk: a loss is a violation


INITIAL = State(None, Vm.RUNNING, True, SrcPc.START, None, Vm.NONE, True, DstPc.IDLE, NO_MSGS, 0, 0, False, False)


@dataclass(frozen=True)
class Bounds:
    """What is explored.  The default is the one the suite checks."""

    copies: int = 2  # copies of each message in flight at once
    crashes: int = 3  # crashes in a run (either side; restarts are free)
    forged: int = 1  # forged ABORT / OUTCOME with a token that does not verify
    override: bool = False  # the operator's --override
    operator: bool = True  # the operator's vm resume / vm destroy (where operable allows)
    commit_before_handoff: bool = False  # a mutation: COMMIT sent before handed_off is durable
    unexpected_errors: bool = True  # commit_and_activate raising past the engine (the row committed)
    settle_by_outcome: bool = False  # incoming._settle scrubs by the engine's outcome (the code today)
    postcopy: bool = True  # the source may switch to post-copy at the pause (both are explored)
    answer_pulling_committed: bool = False  # a mutation: answer_query says committed for a pulling row
    abandon: bool = True  # the operator's abandon, wherever the table allows it (proto 7.5's last column)

    def describe(self) -> str:
        return (f"<= {self.copies} copies of each message in flight, <= {self.crashes} crashes, "
                f"<= {self.forged} forged messages, override {'on' if self.override else 'off'}, "
                f"abandon {'on' if self.abandon else 'off'}, "
                f"{'pre-copy and post-copy' if self.postcopy else 'pre-copy only'}")


class Edge(NamedTuple):
    label: str
    state: State
    fair: bool  # a step of recovery (no crash, loss, duplication, forgery, failed activation, operator act)


# --------------------------------------------------------------------------
# The code's rules, looked up at call time


def move(side: Role, row: HandoffState | None, step: Step) -> HandoffState | None:
    """The store's ``_move``: the new state, or None if ``row`` is not one the step may
    leave.  Like ``_move_from``, the target is the first leaving state's."""
    sources = handoff.leaving(side, step)
    if row is None or row not in sources:
        return None
    return handoff.MOVES[(side, sources[0], step)]


def resume_move(row: HandoffState | None, *, token_ok: bool = False, override: bool = False) -> HandoffState | None:
    """``abort_and_resume``'s durable half: the row after it, or None if it refuses."""
    if not handoff.may_resume(row, token_ok=token_ok, override=override):
        return None
    if row is None or (SOURCE, row, Step.ABORT) not in handoff.MOVES:  # _move_from raises
        return None
    return handoff.MOVES[(SOURCE, row, Step.ABORT)]


class _Store:
    """Just enough of a HandoffStore for ``VmRegistry.operable``."""

    def __init__(self) -> None:
        self.row: handoff.MigrationRow | None = None

    def get(self, mid: bytes) -> handoff.MigrationRow | None:
        return self.row

    def list(self, role: Role | None = None, states: tuple[HandoffState, ...] | None = None,
             limit: int = 0) -> list[handoff.MigrationRow]:
        r = self.row
        return [r] if r is not None and role in (None, r.role) and (states is None or r.state in states) else []


class _Vm(ModelVM):
    """Just enough of a hosted model VM for ``VmRegistry.operable`` (nothing of it is opened)."""

    def __init__(self, state: str, migration: bytes | None, missing: int) -> None:  # (no super().__init__)
        self.name, self.vm_id = "vm", b"id"  # (the model's row names this identity)
        self.config = {"state": state, "migration": migration.hex() if migration else None}
        self._pages_missing = missing

    def missing_count(self) -> int:
        return self._pages_missing


class Operable:
    """The real ``VmRegistry.operable``, asked about a model copy (memoised)."""

    def __init__(self) -> None:
        self._store = _Store()
        self._migrating = False
        self.registry = VmRegistry(Path("/nonexistent"), Path("/nonexistent"), b"", cast(HandoffStore, self._store),
                                   cast(Confinement, None), None, lambda name: self._migrating)
        self._seen: dict[tuple[Role, HandoffState | None, str, bool, bool, bool], bool] = {}

    def __call__(self, side: Role, row: HandoffState | None, vm_state: str, records_mid: bool,
                 migrating: bool, missing: bool = False) -> bool:
        key = (side, row, vm_state, records_mid, migrating, missing)
        if key not in self._seen:
            self._migrating = migrating
            self._store.row = None if row is None else handoff.MigrationRow(
                MID, side, "vm", b"id", handoff.Peer("peer", b"", b""), row, None, None, None, 0.0, 0.0)
            self.registry.vms = {"vm": cast(AnyVM, _Vm(vm_state, MID if records_mid else None, int(missing)))}
            try:
                self.registry.operable("vm")
                self._seen[key] = True
            except AgentError:
                self._seen[key] = False
        return self._seen[key]


# --------------------------------------------------------------------------
# The transitions


class Model:
    def __init__(self, bounds: Bounds) -> None:
        self.b = bounds
        self.operable = Operable()

    # -- messages

    def send(self, s: State, m: Msg) -> State:
        """One more copy of ``m`` in flight (to a side that is down, or beyond the bound: lost)."""
        up = s.dst_up if m in TO_DST else s.src_up
        if not up or s.msgs[m] >= self.b.copies:
            return s
        return s._replace(msgs=(*s.msgs[:m], s.msgs[m] + 1, *s.msgs[m + 1:]))

    @staticmethod
    def take(s: State, m: Msg) -> State:
        return s._replace(msgs=(*s.msgs[:m], s.msgs[m] - 1, *s.msgs[m + 1:]))

    @staticmethod
    def drop_to(s: State, side: Role) -> State:
        """A crash: the sessions to that side die, and what was on its way to it with them."""
        lost = TO_DST if side is DESTINATION else TO_SRC
        return s._replace(msgs=tuple(0 if ALL_MSGS[i] in lost else n for i, n in enumerate(s.msgs)))

    # -- the source

    def src_fail_before_handoff(self, s: State) -> State:
        """migrate_out before the handoff point: ABORT (best effort), then abort_and_resume."""
        s = self.send(s, Msg.ABORT)
        row = resume_move(s.src_row)
        if row is None:
            return s._replace(src_pc=SrcPc.IDLE)
        return s._replace(src_row=row, src_pc=SrcPc.RESUME)

    def src_session_failed(self, s: State) -> State:
        """migrate_out's session failed after COMMIT: the row decides.  In doubt
        (``orchestrate.IN_DOUBT``), the outgoing service's ``_settle`` decides by the row
        (scrub, or resume a copy it may run) and its recovery task asks until answered;
        else as before the handoff point."""
        if s.src_row not in orchestrate.IN_DOUBT:
            return self.src_fail_before_handoff(s)
        s = s._replace(src_pc=SrcPc.IN_DOUBT)
        if handoff.may_scrub(SOURCE, s.src_row):
            return s._replace(src_vm=Vm.SCRUBBED)
        if s.src_vm is Vm.PAUSED and handoff.may_run(SOURCE, s.src_row):  # activation_failed, retried: resumed
            return s._replace(src_pc=SrcPc.RESUME)
        return s

    def src_serve(self, s: State, *, recovery: bool) -> State:
        """Post-copy: ``store.serve`` (SERVING, or already), then PAGES; PULLED awaited.
        If the row does not read SERVING: the migration's session raises InDoubt (the
        row decides), a recovery session returns None (asked again)."""
        row = move(SOURCE, s.src_row, Step.SERVE) or s.src_row
        if row is HandoffState.SERVING and s.src_vm is not Vm.SCRUBBED:  # (_serve_again needs the copy)
            return self.send(s._replace(src_row=row, src_pc=SrcPc.SERVING), Msg.PAGES)
        return s._replace(src_row=row) if recovery else self.src_session_failed(s._replace(src_row=row))

    def src_answer(self, s: State, m: Msg) -> State:
        """recover_once applying an OUTCOME (the recovery loop's, or the operator's --resolve)."""
        if m is Msg.OUT_POSTCOPY:  # _serve_again: SERVING (if RUNNING never came), the WANT set, PULLED
            return self.src_serve(s, recovery=True) if s.src_row in orchestrate.IN_DOUBT else s
        if m is Msg.OUT_COMMITTED:  # confirm_and_scrub: DONE, then the scrub the row allows
            row = move(SOURCE, s.src_row, Step.CONFIRM) or s.src_row
            return s._replace(src_row=row, src_pc=SrcPc.SCRUB)
        if m in (Msg.OUT_ABORTED, Msg.OUT_BAD):  # abort_and_resume with the token it carries
            row = resume_move(s.src_row, token_ok=m is Msg.OUT_ABORTED)
            if row is not None:
                return s._replace(src_row=row, src_pc=SrcPc.RESUME)
        return s  # unknown, or a token refused: still in doubt

    def src_receive(self, s: State, m: Msg) -> State:
        pc = s.src_pc
        if m is Msg.READY and pc is SrcPc.WAIT_READY:
            if self.b.commit_before_handoff:
                return self.send(s, Msg.COMMIT)._replace(src_pc=SrcPc.COMMIT_SENT)
            row = move(SOURCE, s.src_row, Step.HAND_OFF)  # the handoff point: durable before COMMIT leaves
            if row is None:
                return self.src_fail_before_handoff(s)
            return self.send(s._replace(src_row=row, src_pc=SrcPc.WAIT_DONE), Msg.COMMIT)
        if m is Msg.DONE and pc is SrcPc.WAIT_DONE:
            row = move(SOURCE, s.src_row, Step.CONFIRM)  # migrate_out: confirm, then scrub
            return s._replace(src_row=row, src_pc=SrcPc.SCRUB) if row else s._replace(src_pc=SrcPc.IDLE)
        if m is Msg.RUNNING and pc is SrcPc.WAIT_DONE:  # post-copy: serve, durable before the first page
            return self.src_serve(s, recovery=False)
        if m is Msg.PULLED and pc is SrcPc.SERVING:  # confirm (serving -> done), then the scrub the row allows
            return s._replace(src_row=move(SOURCE, s.src_row, Step.CONFIRM) or s.src_row, src_pc=SrcPc.SCRUB)
        if m in (Msg.ABORT_TOKEN, Msg.ABORT_BAD):
            if pc in (SrcPc.PRECOPY, SrcPc.WAIT_READY, SrcPc.COMMIT_SENT):  # before the handoff point
                return self.src_fail_before_handoff(s)
            if pc in (SrcPc.WAIT_DONE, SrcPc.SERVING):  # after it: the token decides (migrate_out)
                if m is Msg.ABORT_TOKEN:
                    row = resume_move(s.src_row, token_ok=True)
                    if row is not None:
                        return s._replace(src_row=row, src_pc=SrcPc.RESUME)
                return self.src_session_failed(s)
            return s
        if m in (Msg.OUT_COMMITTED, Msg.OUT_ABORTED, Msg.OUT_BAD, Msg.OUT_UNKNOWN, Msg.OUT_POSTCOPY):
            return self.src_answer(s, m)
        return s  # no session expects it here

    def src_restart(self, s: State) -> State:
        """registry.load, then the outgoing service's recovery of in-doubt rows."""
        s = s._replace(src_up=True, src_pc=SrcPc.IDLE)
        if s.src_vm is Vm.SCRUBBED:
            return s  # not in the memory directory: load does nothing (an in-doubt row is still asked)
        row = s.src_row
        if row is HandoffState.SENDING:  # aborted by restart, resumed
            new = resume_move(row)
            return s._replace(src_row=new, src_pc=SrcPc.RESUME) if new else s
        if row is HandoffState.ABORTED and handoff.may_run(SOURCE, row):
            return s._replace(src_pc=SrcPc.RESUME)
        if handoff.may_scrub(SOURCE, row):  # done (or abandoned): only the scrub was missing
            return s._replace(src_pc=SrcPc.SCRUB)
        if row in orchestrate.IN_DOUBT:  # handed_off, or serving (its copy stays paused): asked about
            return s._replace(src_pc=SrcPc.IN_DOUBT)
        return s

    def source(self, s: State) -> Iterator[Edge]:
        b = self.b
        if not s.src_up:
            yield Edge("source restarts", self.src_restart(s), True)
            return
        if s.crashes < b.crashes:
            yield Edge("source crashes", self.drop_to(s, SOURCE)._replace(
                src_up=False, src_pc=SrcPc.IDLE, crashes=s.crashes + 1), False)
        pc = s.src_pc
        if pc is SrcPc.RESUME:
            vm: Vm = Vm.RUNNING if s.src_vm is Vm.PAUSED else s.src_vm  # resume_after_migration
            yield Edge("source resumes its copy", s._replace(src_vm=vm, src_pc=SrcPc.IDLE), True)
            return
        if pc is SrcPc.SCRUB:
            vm = Vm.SCRUBBED if handoff.may_scrub(SOURCE, s.src_row) else s.src_vm
            yield Edge("source scrubs its copy" if vm is Vm.SCRUBBED else "source keeps its copy",
                       s._replace(src_vm=vm, src_pc=SrcPc.IDLE), True)
            return
        row: HandoffState | None
        if pc is SrcPc.START:
            row = handoff.MOVES[(SOURCE, None, Step.OPEN)]
            yield Edge("source opens (sending), BEGIN", self.send(s._replace(src_row=row, src_pc=SrcPc.PRECOPY),
                                                                  Msg.BEGIN), True)
        elif pc is SrcPc.PRECOPY:
            paused = s._replace(src_vm=Vm.PAUSED, src_pc=SrcPc.WAIT_READY)
            yield Edge("source pauses, COMPLETE", self.send(paused, Msg.COMPLETE), True)
            if b.postcopy:  # the switch: MISSING names what is not sent, then COMPLETE
                yield Edge("source switches (post-copy): pauses, MISSING, COMPLETE",
                           self.send(paused._replace(postcopy=True), Msg.COMPLETE), True)
        elif pc is SrcPc.COMMIT_SENT:
            row = move(SOURCE, s.src_row, Step.HAND_OFF)
            yield Edge("source persists handed_off (after COMMIT)",
                       s._replace(src_row=row, src_pc=SrcPc.WAIT_DONE) if row else self.src_fail_before_handoff(s),
                       True)
        if pc in (SrcPc.PRECOPY, SrcPc.WAIT_READY, SrcPc.COMMIT_SENT):
            yield Edge("source fails before the handoff point", self.src_fail_before_handoff(s), True)
        if pc is SrcPc.WAIT_DONE:
            yield Edge("source times out after COMMIT: in doubt", self.src_session_failed(s), True)
        if pc is SrcPc.SERVING:  # the session breaks off (lost, timed out, a page refused)
            yield Edge("source serving session ends: in doubt", self.src_session_failed(s), True)
        # the recovery loop (or --resolve, handed_off only) asks
        asks = s.src_row is HandoffState.HANDED_OFF or (s.src_row in orchestrate.IN_DOUBT and pc is SrcPc.IN_DOUBT)
        if asks and s.msgs[Msg.QUERY] < b.copies:
            yield Edge("source asks (QUERY)", self.send(s, Msg.QUERY), True)
        if b.override and s.src_row is HandoffState.HANDED_OFF and s.src_vm is not Vm.SCRUBBED:
            row = resume_move(s.src_row, override=True)  # override_resume
            if row is not None:
                yield Edge("OPERATOR OVERRIDE: source resumes in doubt",
                           s._replace(src_row=row, src_pc=SrcPc.RESUME, override=True), False)
        row = move(SOURCE, s.src_row, Step.ABANDON) if b.abandon else None
        if row is not None:  # palm_net.agent.abandon: the row, what serves the copy ended, the scrub next
            yield Edge("OPERATOR ABANDON (source)", abandoning(s)._replace(src_row=row, src_pc=SrcPc.SCRUB), False)
        if b.operator and s.src_vm in (Vm.RUNNING, Vm.PAUSED):
            records = s.src_row is not None and not (s.src_row is HandoffState.ABORTED and s.src_vm is Vm.RUNNING)
            state = "running" if s.src_vm is Vm.RUNNING else "paused"
            if self.operable(SOURCE, s.src_row, state, records, pc in MIGRATING):
                if s.src_vm is Vm.PAUSED:
                    yield Edge("operator: vm resume (source)", s._replace(src_vm=Vm.RUNNING), False)
                yield Edge("operator: vm destroy (source)", s._replace(src_vm=Vm.SCRUBBED, destroyed=True), False)
        for m in Msg:
            if m not in TO_DST and s.msgs[m]:
                yield Edge(f"source gets {m.name}", self.src_receive(self.take(s, m), m), True)

    # -- the destination

    def dst_abort(self, s: State, then: DstPc) -> State:
        """abort_forever's durable half (a no-op on a committed row); the scrub decision next."""
        row = move(DESTINATION, s.dst_row, Step.ABORT) or s.dst_row
        return s._replace(dst_row=row, dst_pc=then)

    def dst_answer(self, s: State) -> State:
        """answer_query: record an unknown id aborted, or abort forever what is not committed; then say it.
        A pulling row: ``postcopy``, and this session pulls (serve_incoming, _pull_again), unless
        a recovery session pulls already or the VM is not here (``unknown``: asked again)."""
        if s.dst_row is None:
            s = s._replace(dst_row=handoff.MOVES[(DESTINATION, None, Step.ABORT)])  # record_unknown
        else:
            s = s._replace(dst_row=move(DESTINATION, s.dst_row, Step.ABORT) or s.dst_row)
        if s.dst_row is HandoffState.COMMITTED:
            return self.send(s, Msg.OUT_COMMITTED)
        if s.dst_row is HandoffState.PULLING:
            if self.b.answer_pulling_committed:
                return self.send(s, Msg.OUT_COMMITTED)
            if s.dst_pc is DstPc.PULL_AGAIN or s.dst_vm not in (Vm.RUNNING, Vm.INCOMING):  # _pulling_vm: None
                return self.send(s, Msg.OUT_UNKNOWN)
            if s.dst_pc in (DstPc.IDLE, DstPc.PULLING):  # (the migration's own session is not registered)
                # WANT what the map holds; an empty map: settled and pulled at once
                s = s._replace(dst_pc=DstPc.PULL_AGAIN if s.dst_missing else DstPc.FINISH)
            return self.send(s, Msg.OUT_POSTCOPY)  # (mid-call elsewhere: that session pulls once it is done)
        return self.send(s, Msg.OUT_ABORTED if s.dst_row is HandoffState.ABORTED else Msg.OUT_UNKNOWN)

    def dst_receive(self, s: State, m: Msg) -> State:
        pc = s.dst_pc
        if m is Msg.QUERY:
            return self.dst_answer(s)
        if m is Msg.BEGIN:
            if s.dst_row is None and pc is DstPc.IDLE:  # admitted: the VM, then the row
                return s._replace(dst_row=handoff.MOVES[(DESTINATION, None, Step.OPEN)], dst_vm=Vm.INCOMING,
                                  dst_pc=DstPc.RECEIVING)
            return s  # an id already recorded: a replay, refused (its ABORT goes to whoever replayed it)
        if m is Msg.COMPLETE and pc is DstPc.RECEIVING:
            s = s._replace(dst_missing=s.postcopy)  # MISSING, before COMPLETE: the map, kept with the VM
            row = move(DESTINATION, s.dst_row, Step.PREPARE)  # synced, then prepared
            if row is None:  # aborted meanwhile (a query): the engine fails
                return self.dst_abort(s, DstPc.SCRUB_SEND)
            return self.send(s._replace(dst_row=row, dst_pc=DstPc.WAIT_COMMIT), Msg.READY)
        if m is Msg.COMMIT and pc is DstPc.WAIT_COMMIT:  # commit_and_activate (post-copy: switch_and_activate)
            row = move(DESTINATION, s.dst_row, Step.SWITCH if s.postcopy else Step.COMMIT)
            if not handoff.may_run(DESTINATION, row or s.dst_row):  # aborted before: the abort stands
                return self.dst_abort(s, DstPc.SCRUB_SEND)
            if row is None:  # committed by an earlier call
                return self.dst_activated(s)
            return s._replace(dst_row=row, dst_pc=DstPc.ACTIVATE)
        if m is Msg.ABORT and pc in (DstPc.RECEIVING, DstPc.WAIT_COMMIT):
            return self.dst_abort(s, DstPc.SCRUB_QUIET)
        if m is Msg.PAGES and pc in PULLERS and s.dst_missing:  # written, then their bits cleared
            return s._replace(dst_missing=False, dst_pc=DstPc.FINISH)
        return s  # no session expects it

    def dst_activated(self, s: State) -> State:
        """After the commit window: DONE; post-copy RUNNING, and this session pulls."""
        if s.postcopy:
            return self.send(s._replace(dst_pc=DstPc.PULLING), Msg.RUNNING)
        return self.send(s._replace(dst_pc=DstPc.IDLE), Msg.DONE)

    def dst_restart(self, s: State) -> Iterator[Edge]:
        """registry.load: a committed incoming VM is activated (which may fail again);
        anything else in flight is aborted forever and its VM scrubbed."""
        s = s._replace(dst_up=True, dst_pc=DstPc.IDLE)
        if s.dst_vm is Vm.INCOMING and handoff.may_run(DESTINATION, s.dst_row):  # committed (or pulling)
            yield Edge("destination restarts, activates", s._replace(dst_vm=Vm.RUNNING), True)
            yield Edge("destination restarts, activation fails", s, False)
            return
        if s.dst_vm is Vm.INCOMING:
            yield Edge("destination restarts, aborts", self.dst_abort(s, DstPc.SCRUB_LOAD), True)
            return
        if s.dst_vm is Vm.RUNNING and s.dst_row is HandoffState.ABANDONED:  # registry._scrub_abandoned
            yield Edge("destination restarts, its abandoned VM to scrub", s._replace(dst_pc=DstPc.SCRUB_LOAD), True)
            return
        if s.dst_row in (HandoffState.RECEIVING, HandoffState.PREPARED):
            s = self.dst_abort(s, DstPc.IDLE)
        yield Edge("destination restarts", s, True)

    def destination(self, s: State) -> Iterator[Edge]:
        b = self.b
        if not s.dst_up:
            yield from self.dst_restart(s)
            return
        if s.crashes < b.crashes:
            yield Edge("destination crashes", self.drop_to(s, DESTINATION)._replace(
                dst_up=False, dst_pc=DstPc.IDLE, crashes=s.crashes + 1), False)
        pc = s.dst_pc
        if pc in DST_PENDING:
            # abort_forever's second half: the row read back decides (incoming._settle then
            # scrubs whatever the engine did not see committed, if settle_by_outcome).
            scrub = handoff.may_scrub(DESTINATION, s.dst_row) or (b.settle_by_outcome and pc is not DstPc.SCRUB_LOAD)
            vm = Vm.SCRUBBED if scrub and s.dst_vm is not Vm.NONE else s.dst_vm
            t = s._replace(dst_vm=vm, dst_pc=DstPc.IDLE)
            if pc is DstPc.SCRUB_SEND:  # then ABORT, with the token only for what is recorded aborted
                t = self.send(t, Msg.ABORT_TOKEN if t.dst_row is HandoffState.ABORTED else Msg.ABORT_BAD)
            yield Edge("destination scrubs" if vm is Vm.SCRUBBED else "destination keeps its copy", t, True)
            if s.msgs[Msg.QUERY]:  # answer_query runs on the agent's thread, the store's call in a worker
                yield Edge("destination gets QUERY", self.dst_answer(self.take(s, Msg.QUERY)), True)
            return
        if pc is DstPc.FINISH:  # pulled: synced, then COMMITTED, then PULLED (not committed: the session ends)
            row = move(DESTINATION, s.dst_row, Step.PULLED)
            t = s._replace(dst_pc=DstPc.IDLE)
            yield Edge("destination pulled: committed, PULLED",
                       self.send(t._replace(dst_row=row), Msg.PULLED) if row else t, True)
            return
        if pc is DstPc.ACTIVATE:
            said = "RUNNING" if s.postcopy else "DONE"
            yield Edge(f"destination activates, {said}", self.dst_activated(s._replace(dst_vm=Vm.RUNNING)), True)
            yield Edge(f"destination activation fails (committed, not running), {said}", self.dst_activated(s),
                       False)
            if b.unexpected_errors:  # the engine never learns it committed: the runner's _fail
                yield Edge("destination commit raises past the engine", self.dst_abort(s, DstPc.SCRUB_SEND), False)
        if pc in (DstPc.RECEIVING, DstPc.WAIT_COMMIT):  # deadline, lost connection, peer refused
            yield Edge("destination session fails", self.dst_abort(s, DstPc.SCRUB_SEND), True)
        if pc in PULLERS:  # its deadline, the source gone, a page refused: the VM runs on, waiting for recovery
            yield Edge("destination pulling session ends", s._replace(dst_pc=DstPc.IDLE), True)
        retry = pc in (DstPc.IDLE, DstPc.PULL_AGAIN) and handoff.may_run(DESTINATION, s.dst_row)
        if retry and s.dst_vm is Vm.INCOMING:
            # what a restart does (registry.load), without the crash: the retry of a committed activation
            yield Edge("destination retries activation", s._replace(dst_vm=Vm.RUNNING), True)
        row = move(DESTINATION, s.dst_row, Step.ABANDON) if b.abandon and pc is not DstPc.ACTIVATE else None
        if row is not None:  # palm_net.agent.abandon (the commit window is waited for: not mid-way)
            if s.dst_vm in (Vm.RUNNING, Vm.INCOMING) and not s.dst_missing:  # every page here: committed instead
                done = move(DESTINATION, s.dst_row, Step.PULLED)
                if done is not None:
                    yield Edge("operator: abandon (destination), nothing missing: committed instead",
                               s._replace(dst_row=done, dst_pc=DstPc.IDLE), False)
            else:  # the row, its sessions ended (settled), the scrub the row allows next
                yield Edge("OPERATOR ABANDON (destination)",
                           abandoning(s)._replace(dst_row=row, dst_pc=DstPc.SCRUB_QUIET), False)
        if b.operator and s.dst_vm in (Vm.RUNNING, Vm.INCOMING):
            state = "running" if s.dst_vm is Vm.RUNNING else "incoming"
            if self.operable(DESTINATION, s.dst_row, state, s.dst_vm is Vm.INCOMING, False, s.dst_missing):
                yield Edge("operator: vm destroy (destination)", s._replace(dst_vm=Vm.SCRUBBED, destroyed=True),
                           False)
        for m in TO_DST:
            if s.msgs[m] and (pc is not DstPc.ACTIVATE or m is Msg.QUERY):
                yield Edge(f"destination gets {m.name}", self.dst_receive(self.take(s, m), m), True)

    # -- the network

    def network(self, s: State) -> Iterator[Edge]:
        for m in Msg:
            n = s.msgs[m]
            if n:
                yield Edge(f"{m.name} lost", self.take(s, m), False)
            if n == 1 and self.b.copies > 1:
                yield Edge(f"{m.name} duplicated", self.send(s, m), False)
        if s.forged < self.b.forged and s.src_up:
            for m in (Msg.ABORT_BAD, Msg.OUT_BAD):
                if s.msgs[m] < self.b.copies and alive(s, m):
                    yield Edge(f"forged {m.name}", self.send(s, m)._replace(forged=s.forged + 1), False)

    def successors(self, s: State) -> Iterator[Edge]:
        if s.destroyed:  # no fork can follow, and a copy may be gone on purpose: nothing left to check
            return
        for e in (*self.source(s), *self.destination(s), *self.network(s)):
            yield e._replace(state=forget_dead(e.state))


SESSION_PCS = frozenset({SrcPc.START, SrcPc.PRECOPY, SrcPc.WAIT_READY, SrcPc.COMMIT_SENT, SrcPc.WAIT_DONE})


def alive(s: State, m: Msg) -> bool:
    """Can ``m``, delivered now or later, still change anything?  (A message no handler
    will ever act on again is forgotten: fewer states, the same behaviours.)"""
    if m is Msg.BEGIN:
        return s.dst_row is None
    if m in (Msg.COMPLETE, Msg.COMMIT, Msg.ABORT):  # the destination's session, once over, never comes back
        return s.dst_row is None or s.dst_pc in (DstPc.RECEIVING, DstPc.WAIT_COMMIT)
    if m is Msg.QUERY:
        return s.src_row in UNSETTLED or s.dst_row not in (HandoffState.COMMITTED, HandoffState.ABORTED,
                                                            HandoffState.ABANDONED)
    if m is Msg.READY:
        return s.src_pc in (SrcPc.START, SrcPc.PRECOPY, SrcPc.WAIT_READY)
    if m in (Msg.DONE, Msg.RUNNING):  # the source's session, likewise
        return s.src_pc in SESSION_PCS
    if m in (Msg.ABORT_TOKEN, Msg.ABORT_BAD):
        return s.src_pc in SESSION_PCS or s.src_pc is SrcPc.SERVING
    if m is Msg.PAGES:  # a pulling session's (or one about to pull, mid-commit window), while pages are missing
        return (s.dst_row is HandoffState.PULLING and s.dst_missing
                and (s.dst_pc in PULLERS or s.dst_pc is DstPc.ACTIVATE))
    if m is Msg.PULLED:  # a serving session's
        return s.src_pc is SrcPc.SERVING
    if m is Msg.OUT_UNKNOWN:  # changes nothing anywhere
        return False
    # OUTCOMEs: acted on while in doubt; "committed" also scrubs what the row lets go
    return s.src_row in UNSETTLED or (m is Msg.OUT_COMMITTED and s.src_vm is not Vm.SCRUBBED)


def forget_dead(s: State) -> State:
    if not any(s.msgs):
        return s
    msgs = tuple(n if n == 0 or alive(s, ALL_MSGS[i]) else 0 for i, n in enumerate(s.msgs))
    return s if msgs == s.msgs else s._replace(msgs=msgs)


# --------------------------------------------------------------------------
# The properties (the model's own, not the code's rules)


TAKEN_OVER = frozenset({HandoffState.COMMITTED, HandoffState.PULLING})  # the destination took the VM at COMMIT


def at_risk(s: State) -> bool:
    """Post-copy's window (proto 7.9 item 7): the VM runs at the destination before it has
    every page, and is not committed there: a lost host now loses the VM, and only now may
    the operator's abandon declare it lost.  (Anywhere else one copy is whole.)"""
    return s.postcopy and s.dst_row is HandoffState.PULLING


def abandoning(s: State) -> State:
    """The operator's abandon taken in ``s``: allowed to lose the VM if it was at risk (or
    already lost by an allowed abandon: the other side's, following it), else not."""
    if at_risk(s) or (s.abandoned and not s.needless):
        return s._replace(abandoned=True)
    return s._replace(needless=True)


def fork(s: State) -> bool:
    """Two runnable copies: the source's running, and the destination's running, or
    committed (post-copy: pulling) and not running."""
    return s.src_vm is Vm.RUNNING and (s.dst_vm is Vm.RUNNING or (s.dst_vm is Vm.INCOMING
                                                                  and s.dst_row in TAKEN_OVER))


def has_copy(s: State) -> bool:
    """Some copy may run, now or once the handoff settles: the source's while it has not
    confirmed the commit, the destination's once committed (running or not).  Post-copy:
    once the destination took the VM (pulling: it ran) while its copy still misses pages,
    the VM is whole only with both, the destination's copy and the source's paused one."""
    src = s.src_vm in (Vm.RUNNING, Vm.PAUSED) and s.src_row is not HandoffState.DONE
    dst = s.dst_vm in (Vm.RUNNING, Vm.INCOMING)
    if s.dst_row in (HandoffState.PULLING, HandoffState.ABANDONED) or (s.dst_row is HandoffState.COMMITTED
                                                                      and s.dst_missing):
        return dst and (src or not s.dst_missing)
    return src or (dst and s.dst_row is HandoffState.COMMITTED)


def settled(s: State) -> bool:
    """Exactly one running copy, nothing in flight on either side, nothing left over."""
    if not (s.src_up and s.dst_up and s.src_pc is SrcPc.IDLE and s.dst_pc is DstPc.IDLE):
        return False
    if (s.src_row in (HandoffState.SENDING, HandoffState.HANDED_OFF, HandoffState.SERVING)
            or s.dst_row in (HandoffState.RECEIVING, HandoffState.PREPARED, HandoffState.PULLING)):
        return False
    here = s.src_vm is Vm.RUNNING and s.dst_vm in (Vm.NONE, Vm.SCRUBBED)
    there = s.dst_vm is Vm.RUNNING and not s.dst_missing and s.src_vm is Vm.SCRUBBED
    return here or there


def quiet(s: State) -> bool:
    """Each side whose row is abandoned is done with it: up, idle, its copy scrubbed (or none)."""
    src = s.src_row is not HandoffState.ABANDONED or (
        s.src_up and s.src_pc is SrcPc.IDLE and s.src_vm is Vm.SCRUBBED)
    dst = s.dst_row is not HandoffState.ABANDONED or (
        s.dst_up and s.dst_pc is DstPc.IDLE and s.dst_vm in (Vm.NONE, Vm.SCRUBBED))
    return src and dst


# --------------------------------------------------------------------------
# The search


@dataclass
class Violation:
    kind: str  # fork, loss, stuck
    trace: list[str]
    state: State

    def __str__(self) -> str:
        steps = "\n".join(f"  {i + 1}. {step}" for i, step in enumerate(self.trace))
        return f"{self.kind} after {len(self.trace)} steps:\n{steps}\n  -> {show(self.state)}"


@dataclass
class Result:
    bounds: Bounds
    states: int = 0
    edges: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # this process's CPU seconds (the machine may be busy: the wall clock says less)
    violations: list[Violation] = field(default_factory=list)
    overridden: list[Violation] = field(default_factory=list)  # forks after an override (documented, loud)
    abandoned: int = 0  # states where the VM is lost by the operator's abandon, where post-copy risked it
    abandoned_example: Violation | None = None  # the first of them (a shortest trace)
    seen: list[State] = field(default_factory=list)  # every state reached

    def first(self, kind: str) -> Violation | None:
        return next((v for v in self.violations if v.kind == kind), None)

    def summary(self) -> str:
        return (f"handoff model: {self.states} states, {self.edges} transitions in {self.seconds:.1f} s "
                f"({self.cpu:.1f} s of CPU) "
                f"({self.bounds.describe()}); {len(self.violations)} violations"
                + (f"; {self.abandoned} states lost by the operator's abandon" if self.abandoned else ""))


def show(s: State) -> str:
    msgs = ",".join(f"{m.name}x{s.msgs[m]}" for m in Msg if s.msgs[m]) or "-"
    src = f"{s.src_row.value if s.src_row else '-'}/{s.src_vm.value}/{s.src_pc.value}{'' if s.src_up else '/DOWN'}"
    dst = f"{s.dst_row.value if s.dst_row else '-'}/{s.dst_vm.value}/{s.dst_pc.value}{'' if s.dst_up else '/DOWN'}"
    mode = f" (post-copy{', pages missing' if s.dst_missing else ''})" if s.postcopy else ""
    mode += " (abandoned)" if s.abandoned else " (abandoned where the VM was whole)" if s.needless else ""
    return f"source {src}; destination {dst}; in flight {msgs}{mode}"


def explore(bounds: Bounds | None = None, *, stop_at_first: bool = False,
            liveness: bool = True, progress: Callable[[int], None] | None = None) -> Result:
    """Every state reachable from INITIAL within ``bounds`` (breadth first: each trace
    found is a shortest one), the safety properties on each, then liveness."""
    bounds = bounds or Bounds()
    model = Model(bounds)
    result = Result(bounds)
    started, cpu = time.monotonic(), time.process_time()
    index: dict[State, int] = {INITIAL: 0}
    states = [INITIAL]
    parent: list[tuple[int, str]] = [(-1, "")]
    fair: list[list[int]] = []
    queue = deque([0])

    def trace(i: int) -> list[str]:
        out = []
        while parent[i][0] >= 0:
            out.append(parent[i][1])
            i = parent[i][0]
        return out[::-1]

    while queue:
        i = queue.popleft()
        s = states[i]
        if progress is not None and i % 100000 == 0:
            progress(i)
        if fork(s):
            (result.overridden if s.override else result.violations).append(Violation("fork", trace(i), s))
        if not s.destroyed and not has_copy(s):
            if s.abandoned and not s.needless:  # lost on purpose, where only post-copy's risk allows it
                result.abandoned += 1
                if result.abandoned_example is None:
                    result.abandoned_example = Violation("loss (abandoned)", trace(i), s)
            else:
                result.violations.append(Violation("loss", trace(i), s))
        if stop_at_first and result.violations:
            break
        succ: list[int] = []
        for e in model.successors(s):
            result.edges += 1
            j = index.get(e.state)
            if j is None:
                j = index[e.state] = len(states)
                states.append(e.state)
                parent.append((i, e.label))
                queue.append(j)
            if e.fair and j != i:
                succ.append(j)
        fair.append(succ)
    result.states = len(states)
    result.seen = states
    if liveness and not (stop_at_first and result.violations):
        # AG EF settled over the fair edges: backwards from the settled states.
        back: list[list[int]] = [[] for _ in states]
        for i, succ in enumerate(fair):
            for j in succ:
                back[j].append(i)

        def reaching(goal: Callable[[State], bool]) -> list[bool]:
            good = [goal(s) for s in states]
            todo = [i for i, g in enumerate(good) if g]
            while todo:
                for p in back[todo.pop()]:
                    if not good[p]:
                        good[p] = True
                        todo.append(p)
            return good

        good = reaching(settled)
        for i, s in enumerate(states):
            if not good[i] and not s.override and not s.destroyed and not (s.abandoned and not s.needless):
                result.violations.append(Violation("stuck", trace(i), s))
                break
        done = reaching(quiet)
        for i, s in enumerate(states):
            if not done[i] and not s.override and not s.destroyed:
                result.violations.append(Violation("stuck", trace(i), s))
                break
    result.seconds, result.cpu = time.monotonic() - started, time.process_time() - cpu
    return result
