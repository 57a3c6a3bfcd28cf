"""The durable handoff (proto/PROTOCOL.md 7.5): its states, its legal moves, its operations.

At most one copy of a VM ever runs, and after any failure exactly one does,
because a few facts are durable before the message that announces them:
the source "handed off" (from then on it never resumes on its own), the
destination "prepared" / "committed" / "aborted" (an abort is forever).

``MOVES`` is the whole table; ``HandoffStore`` keeps each migration's state
in SQLite (synchronous=FULL) and changes it only by a move of the table,
one atomic UPDATE guarded by the states the move may leave.  The operations
pair each durable step with its effect on the VM, in the order that keeps
the promise (persist, then act): ``prepare``, ``hand_off``,
``commit_and_activate``, ``confirm_and_scrub``, ``abort_forever``,
``abort_and_resume``, and the operator's ``abandon`` then ``scrub_abandoned``.
Nothing outside this module names a state by string.
"""

from __future__ import annotations

import enum
import errno
import hmac
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from palm_net.errors import ErrorCode, LocalProtocolError, MigrationFailure
from palm_net.faults import fault
from palm_net.hypervisor.backend import HostedVM, HypervisorError, describe_error
from palm_net.wire.protocol import Role

log = structlog.get_logger("palm.migration")

ABORT_DOMAIN = b"palm-net/abort/v1\x00"


class InDoubt(Exception):
    """The handoff point passed and the outcome is unknown: the VM stays paused."""


class HandoffState(enum.StrEnum):
    # the source
    SENDING = "sending"
    HANDED_OFF = "handed_off"  # COMMIT may have left: never resume without the destination's word
    SERVING = "serving"  # post-copy: the VM runs at the destination; this copy serves its missing pages
    DONE = "done"
    # the destination
    RECEIVING = "receiving"
    PREPARED = "prepared"  # verified and synced; READY may have left
    PULLING = "pulling"  # post-copy: the VM runs here; pages it misses still come from the source
    COMMITTED = "committed"  # the VM runs here
    # either side, forever
    ABORTED = "aborted"
    # Post-copy, either side, forever: the operator declared the VM lost (its other host is
    # gone): this side's copy never runs again and is scrubbed; no abort token is ever issued.
    ABANDONED = "abandoned"


class Step(enum.StrEnum):
    OPEN = "open"
    PREPARE = "prepare"
    HAND_OFF = "hand-off"
    COMMIT = "commit"
    CONFIRM = "confirm"
    ABORT = "abort"
    SWITCH = "switch"  # post-copy (proto 7.9): the destination runs the VM before it has every page
    SERVE = "serve"
    PULLED = "pulled"
    ABANDON = "abandon"  # the operator's only (palm migrate --resolve ID --abandon), never a message's


SOURCE, DESTINATION = Role.SOURCE, Role.DESTINATION
# (side, state before (None: no row yet), step) -> state after.  proto 7.5.
MOVES: dict[tuple[Role, HandoffState | None, Step], HandoffState] = {
    (SOURCE, None, Step.OPEN): HandoffState.SENDING,
    (SOURCE, HandoffState.SENDING, Step.HAND_OFF): HandoffState.HANDED_OFF,
    # the destination said "committed" (DONE or OUTCOME)
    (SOURCE, HandoffState.HANDED_OFF, Step.CONFIRM): HandoffState.DONE,
    (SOURCE, HandoffState.SENDING, Step.ABORT): HandoffState.ABORTED,  # before the handoff point: always
    # after it: only with an abort token, or the operator's override
    (SOURCE, HandoffState.HANDED_OFF, Step.ABORT): HandoffState.ABORTED,
    (DESTINATION, None, Step.OPEN): HandoffState.RECEIVING,
    (DESTINATION, HandoffState.RECEIVING, Step.PREPARE): HandoffState.PREPARED,
    (DESTINATION, HandoffState.PREPARED, Step.COMMIT): HandoffState.COMMITTED,
    (DESTINATION, HandoffState.RECEIVING, Step.ABORT): HandoffState.ABORTED,
    (DESTINATION, HandoffState.PREPARED, Step.ABORT): HandoffState.ABORTED,
    (DESTINATION, None, Step.ABORT): HandoffState.ABORTED,  # a QUERY about an id never seen here: refused forever
    # Post-copy (proto 7.9): no abort from either, nothing undoes a VM that ran at the destination.
    (DESTINATION, HandoffState.PREPARED, Step.SWITCH): HandoffState.PULLING,
    (DESTINATION, HandoffState.PULLING, Step.PULLED): HandoffState.COMMITTED,
    (SOURCE, HandoffState.HANDED_OFF, Step.SERVE): HandoffState.SERVING,
    (SOURCE, HandoffState.SERVING, Step.CONFIRM): HandoffState.DONE,
    # The operator's way out once the other host is lost (proto 7.5, 7.9 item 7): the VM is lost.
    (SOURCE, HandoffState.SERVING, Step.ABANDON): HandoffState.ABANDONED,
    (DESTINATION, HandoffState.PULLING, Step.ABANDON): HandoffState.ABANDONED,
}
FINAL = frozenset({HandoffState.DONE, HandoffState.COMMITTED, HandoffState.ABORTED, HandoffState.ABANDONED})


def leaving(side: Role, step: Step) -> tuple[HandoffState, ...]:
    """The states ``step`` may leave on ``side`` (the guard of its UPDATE)."""
    return tuple(s for (r, s, st) in MOVES if r is side and st is step and s is not None)


# What each side may do to its copy of the VM, decided from its durable row
# alone (the state read back after the move, never a variable or an exception
# path).  The store's operations and the model checker (tests/) both use these.


def may_resume(state: HandoffState | None, *, token_ok: bool = False, override: bool = False) -> bool:
    """May the source leave ``state`` by ABORT (and run its copy again)?  Before the
    handoff point always; after it only with the destination's abort token or the
    operator's override; never once the destination's commit was confirmed."""
    if state is HandoffState.HANDED_OFF:
        return token_ok or override
    return state in leaving(SOURCE, Step.ABORT)


def may_scrub(side: Role, state: HandoffState | None) -> bool:
    """May this side destroy its copy, its row being in ``state`` (read after the move)?
    The source once DONE (the destination committed); the destination once ABORTED
    (forever: it never activates), or with no row at all (nothing recorded, nothing
    to commit); either once ABANDONED (the operator's: the VM is lost).  A committed
    VM is never scrubbed."""
    if side is SOURCE:
        return state in (HandoffState.DONE, HandoffState.ABANDONED)
    return state in (None, HandoffState.ABORTED, HandoffState.ABANDONED)


def may_run(side: Role, state: HandoffState | None) -> bool:
    """May this side's copy run, its row being in ``state``?  The destination's only
    once COMMITTED (or PULLING: post-copy, its missing pages still to come); the
    source's while no handoff happened, or after an abort."""
    if side is DESTINATION:
        return state in (HandoffState.COMMITTED, HandoffState.PULLING)
    return state in (None, HandoffState.SENDING, HandoffState.ABORTED)


# --------------------------------------------------------------------------
# Abort tokens: the destination's signed promise never to activate a migration.


def make_abort_token(signing: SigningKey, mid: bytes) -> bytes:
    return signing.sign(ABORT_DOMAIN + mid).signature


def check_abort_token(sign_pub: bytes, mid: bytes, token: bytes) -> bool:
    try:
        VerifyKey(sign_pub).verify(ABORT_DOMAIN + mid, token)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------
# The store

SCHEMA = """
CREATE TABLE IF NOT EXISTS migrations (
    mid         BLOB PRIMARY KEY,
    role        TEXT NOT NULL,          -- source | destination
    vm          TEXT NOT NULL,
    vm_id       BLOB NOT NULL,          -- the VM's identity (names can be reused)
    peer        TEXT NOT NULL,          -- peer agent name (from its certificate)
    peer_addr   TEXT NOT NULL,          -- host:port to reach the destination (source side)
    peer_static BLOB NOT NULL,          -- the peer's Noise static key
    peer_sign   BLOB NOT NULL,          -- the peer's Ed25519 key (verifies abort tokens)
    state       TEXT NOT NULL,
    token       BLOB,                   -- abort token (source: the one received)
    error       TEXT,
    stats       TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);
"""
UNKNOWN_VM = ""  # the VM name of a row made for a QUERY about an id we never saw
MAX_UNKNOWN_PER_PEER = 256  # such rows a peer can leave behind; the oldest go first
UNKNOWN_TTL = 86400.0  # and they expire after a day
HISTORY_TTL = 30 * 86400.0  # finished rows kept this long ("committed" and "abandoned" forever: an
# in-doubt source may ask at any time, and the answer must never turn into "aborted")
MAX_ABORTED_PER_PEER = 1000  # and at most this many aborted incoming ones per peer


@dataclass(frozen=True)
class Activation:
    """What COMMIT did on the destination."""

    committed: bool  # the row says COMMITTED: the VM is this agent's, running or not
    running: bool  # it runs here now
    error: str | None = None  # why it does not run (committed: retried and reported, never scrubbed)
    took: float = 0.0  # seconds the activation took (for the record)


# What a durable write (SQLite, a file) can fail with, besides a crash.
STORAGE_ERRORS = (OSError, sqlite3.Error, HypervisorError)


def _storage_code(exc: BaseException) -> ErrorCode:
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return ErrorCode.NO_SPACE if full or (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)) \
        else ErrorCode.HYPERVISOR


def activate_committed(vm: HostedVM) -> Activation:
    """Runs a committed VM (its row is COMMITTED).  A failure is reported, not raised:
    the VM stays committed and not running, to be retried or resumed by the operator."""
    t0 = time.monotonic()
    try:
        fault("destination.vm.activate")
        vm.activate()
    except (HypervisorError, OSError) as exc:  # (a VM that runs but whose vm.json lags says running)
        return Activation(True, vm.running, describe_error(exc), time.monotonic() - t0)
    return Activation(True, True, took=time.monotonic() - t0)


@dataclass(frozen=True)
class Peer:
    """The other agent of a migration, as its certificate names it."""

    name: str
    static_pub: bytes  # its Noise static key: who may ask about this migration
    sign_pub: bytes  # its Ed25519 key: verifies its abort tokens
    addr: str = ""  # host:port (source side: where to ask when in doubt)


@dataclass(frozen=True)
class MigrationRow:
    mid: bytes
    role: Role
    vm: str
    vm_id: bytes
    peer: Peer
    state: HandoffState
    token: bytes | None
    error: str | None
    stats: dict[str, Any] | None
    created: float
    updated: float

    def is_peer(self, static_pub: bytes) -> bool:
        return hmac.compare_digest(self.peer.static_pub, static_pub)


class HandoffStore:
    """Every migration of this agent and its durable state.  Thread-safe (a
    lock around the one SQLite connection); each move is one atomic UPDATE."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # -- rows

    def _open(self, mid: bytes, side: Role, vm: str, vm_id: bytes, peer: Peer, step: Step = Step.OPEN,
              error: str | None = None) -> None:
        state = MOVES[(side, None, step)]
        now = time.time()
        fault(f"{side.value}.store.open")
        with self._lock:
            self._db.execute(
                "INSERT INTO migrations (mid, role, vm, vm_id, peer, peer_addr, peer_static, peer_sign, state,"
                " error, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (mid, side.value, vm, vm_id, peer.name, peer.addr, peer.static_pub, peer.sign_pub, state.value,
                 error, now, now))
        fault(f"{side.value}.store.open.done")

    def _move(self, mid: bytes, side: Role, step: Step, *, token: bytes | None = None,
              error: str | None = None) -> bool:
        """Moves ``mid`` by ``step`` if the table allows it from where it is; False if it was elsewhere."""
        return self._move_from(mid, side, step, leaving(side, step), token=token, error=error)

    def _move_from(self, mid: bytes, side: Role, step: Step, sources: tuple[HandoffState, ...], *,
                   token: bytes | None = None, error: str | None = None) -> bool:
        """Moves ``mid`` by ``step`` if it is in one of ``sources`` (each a state the table
        lets ``step`` leave); False if it was elsewhere."""
        if not sources or any((side, s, step) not in MOVES for s in sources):
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, f"no {step} move for a {side.value}")
        marks = ",".join("?" * len(sources))  # placeholders only: the states are parameters
        sql = ("UPDATE migrations SET state=?, token=COALESCE(?, token), error=COALESCE(?, error), updated=?"  # noqa: S608
               f" WHERE mid=? AND role=? AND state IN ({marks})")
        fault(f"{side.value}.store.{step.value}")
        with self._lock:
            cur = self._db.execute(sql, (MOVES[(side, sources[0], step)].value, token, error[:500] if error else None,
                                         time.time(), mid, side.value, *(s.value for s in sources)))
            moved = cur.rowcount == 1
        if moved:
            fault(f"{side.value}.store.{step.value}.done")
        return moved

    def get(self, mid: bytes) -> MigrationRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM migrations WHERE mid=?", (mid,)).fetchone()
        return self._row(row) if row else None

    def state_of(self, mid: bytes) -> HandoffState | None:
        """The durable state of ``mid`` (None: no row), read now: every safety decision's input."""
        row = self.get(mid)
        return row.state if row is not None else None

    def list(self, role: Role | None = None, states: tuple[HandoffState, ...] | None = None,
             limit: int = 100) -> list[MigrationRow]:
        q, args = "SELECT * FROM migrations WHERE 1=1", []
        if role:
            q += " AND role=?"
            args.append(role.value)
        if states:
            q += f" AND state IN ({','.join('?' * len(states))})"
            args.extend(s.value for s in states)
        q += " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(q, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM migrations").fetchone()[0])

    def set_stats(self, mid: bytes, stats: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("UPDATE migrations SET stats=? WHERE mid=?", (json.dumps(stats), mid))

    def prune(self, now: float | None = None) -> int:
        """Forgets finished migrations older than HISTORY_TTL, and aborted incoming ones
        beyond the newest MAX_ABORTED_PER_PEER of each peer; never a committed or abandoned one."""
        cutoff = (time.time() if now is None else now) - HISTORY_TTL
        with self._lock:
            n = self._db.execute("DELETE FROM migrations WHERE state IN (?, ?) AND updated<?",
                                 (HandoffState.DONE.value, HandoffState.ABORTED.value, cutoff)).rowcount
            n += self._db.execute(
                "DELETE FROM migrations WHERE mid IN (SELECT mid FROM (SELECT mid, ROW_NUMBER() OVER"
                " (PARTITION BY peer_static ORDER BY updated DESC) AS k FROM migrations WHERE role=? AND state=?)"
                " WHERE k>?)", (DESTINATION.value, HandoffState.ABORTED.value, MAX_ABORTED_PER_PEER)).rowcount
            return n

    @staticmethod
    def _row(r: tuple[Any, ...]) -> MigrationRow:
        return MigrationRow(r[0], Role(r[1]), r[2], r[3], Peer(r[4], r[6], r[7], r[5]), HandoffState(r[8]), r[9],
                            r[10], json.loads(r[11]) if r[11] else None, r[12], r[13])

    # -- the source's operations

    def open_outgoing(self, mid: bytes, vm: HostedVM, peer: Peer) -> None:
        """SENDING, and the VM records the migration it is part of (a restart acts on that id).
        MigrationFailure if either cannot be written (no row is left SENDING then)."""
        try:
            self._open(mid, SOURCE, vm.info.name, vm.info.vm_id, peer)
        except STORAGE_ERRORS as exc:
            raise MigrationFailure(_storage_code(exc), f"cannot record the migration: {describe_error(exc)}") from None
        try:
            vm.set_migration(mid)
        except STORAGE_ERRORS as exc:
            self._move(mid, SOURCE, Step.ABORT, error=f"cannot mark the VM: {describe_error(exc)}")
            raise MigrationFailure(_storage_code(exc), f"cannot mark VM {vm.info.name!r} as migrating: "
                                                       f"{describe_error(exc)}") from None

    def hand_off(self, mid: bytes) -> bool:
        """The handoff point: durable before COMMIT leaves.  False if the migration was
        cancelled meanwhile (it then resumes here)."""
        return self._move(mid, SOURCE, Step.HAND_OFF)

    def confirm(self, mid: bytes) -> bool:
        """The destination committed: DONE.  The caller scrubs this copy next."""
        return self._move(mid, SOURCE, Step.CONFIRM)

    def confirm_and_scrub(self, mid: bytes, vm: HostedVM | None) -> bool:
        """The destination committed: DONE, then this copy's memory and keys go."""
        moved = self.confirm(mid)
        self.scrub_handed_over(mid, vm)
        return moved

    def serve(self, mid: bytes) -> bool:
        """Post-copy (proto 7.9): the destination runs the VM and still misses pages:
        SERVING, this copy never runs again and is kept until it has them all.  True
        if the row reads SERVING after it (a recovery session serves a row moved before)."""
        self._move(mid, SOURCE, Step.SERVE)
        return self.state_of(mid) is HandoffState.SERVING

    def scrub_handed_over(self, mid: bytes, vm: HostedVM | None) -> bool:
        """The source's copy goes if, and only if, the row read back says DONE."""
        if vm is None or not may_scrub(SOURCE, self.state_of(mid)):
            return False
        fault("source.vm.scrub")
        vm.scrub()
        return True

    def abort_and_resume(self, mid: bytes, vm: HostedVM | None, why: str, *, token: bytes | None = None,
                         override: bool = False) -> bool:
        """The VM runs here again: before the handoff point always; after it only
        with the destination's abort token (verified against the key recorded
        for it) or the operator's override."""
        row = self.get(mid)
        if row is None or row.role is not SOURCE:
            raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "no outgoing migration with that id")
        token_ok = bool(token) and check_abort_token(row.peer.sign_pub, mid, token or b"")
        if not may_resume(row.state, token_ok=token_ok, override=override):
            if row.state is HandoffState.HANDED_OFF:
                raise LocalProtocolError(ErrorCode.OUT_OF_STATE, "an in-doubt migration resumes only with the "
                                                                 "destination's abort token or an override")
            return False  # aborted already (resumed then) or done (the destination runs it)
        # The guard of the UPDATE is the state just checked: a concurrent move
        # (the handoff, a confirmation) makes this one fail, and nothing resumes.
        try:
            moved = self._move_from(mid, SOURCE, Step.ABORT, (row.state,), token=token, error=why)
        except STORAGE_ERRORS:
            # The write failed (a full or failing disk), or failed to report: the
            # row read back decides.  Before the handoff point no COMMIT ever left,
            # so the VM is the source's whether or not the abort could be recorded
            # (a restart records it); after it, nothing resumes without the record.
            if self.state_of(mid) not in (HandoffState.SENDING, HandoffState.ABORTED):
                raise
            moved = True
        if moved and vm is not None:
            try:
                fault("source.vm.resume")
                vm.resume_after_migration()
            except STORAGE_ERRORS as exc:
                # The VM is the source's (its row says so) but does not run: the
                # agent sees it paused and retries (palm_net.agent.registry).
                vm.mark_stopped()
                log.error("VM did not resume after its migration ended", vm=vm.info.name, migration=mid.hex(),
                          error=describe_error(exc))
        return moved

    # -- the destination's operations

    def open_incoming(self, mid: bytes, vm_name: str, vm_id: bytes, peer: Peer) -> None:
        """RECEIVING; an id already recorded here, in any state, is a replay."""
        try:
            self._open(mid, DESTINATION, vm_name, vm_id, peer)
        except sqlite3.IntegrityError:
            raise MigrationFailure(ErrorCode.REPLAY, "migration id already used on this agent") from None

    def prepare(self, mid: bytes, vm: HostedVM) -> bool:
        """The VM verified: synced (with everything activation will need written and
        reserved: activation only flips what is in place), then PREPARED (READY may
        follow).  False if aborted meanwhile."""
        fault("destination.vm.sync")
        vm.sync()
        return self._move(mid, DESTINATION, Step.PREPARE)

    def commit_and_activate(self, mid: bytes, vm: HostedVM) -> Activation:
        """COMMITTED, then the VM runs here.  Not committed if the migration was
        aborted before (a timeout, a recovery query): the abort stands, the VM never
        runs.  Once committed, a failed activation leaves the VM committed and not
        running (to be retried, reported; never scrubbed): the row decides, not the error."""
        moved = self._move(mid, DESTINATION, Step.COMMIT)
        if not may_run(DESTINATION, self.state_of(mid)):
            return Activation(False, False)
        if not moved:  # committed by an earlier call: activation is that call's (or the restart's)
            return Activation(True, vm.running)
        return activate_committed(vm)

    def switch_and_activate(self, mid: bytes, vm: HostedVM) -> Activation:
        """Post-copy (proto 7.9): PULLING, then the VM runs here with its missing pages
        still to come; as ``commit_and_activate`` otherwise (the row decides)."""
        moved = self._move(mid, DESTINATION, Step.SWITCH)
        if not may_run(DESTINATION, self.state_of(mid)):
            return Activation(False, False)
        if not moved:
            return Activation(True, vm.running)
        return activate_committed(vm)

    def pulled(self, mid: bytes, vm: HostedVM) -> bool:
        """Post-copy: every page is in and synced, then COMMITTED (PULLED may follow)."""
        fault("destination.vm.sync")
        vm.sync()
        return self._move(mid, DESTINATION, Step.PULLED)

    def abort_forever(self, mid: bytes | None, vm: HostedVM | None, why: str) -> bool:
        """ABORTED (this migration is never activated), then what arrived is scrubbed,
        if the row read back says aborted (or there is none).  A committed VM stays:
        False then (the caller keeps it; it is this agent's now)."""
        if mid is not None:
            self._move(mid, DESTINATION, Step.ABORT, error=why)
        if not may_scrub(DESTINATION, self.state_of(mid) if mid is not None else None):
            return False
        if vm is not None:
            fault("destination.vm.scrub")
            vm.scrub()
        return True

    def record_unknown(self, mid: bytes, peer: Peer) -> None:
        """A QUERY about an id never seen here: recorded aborted, so that a late BEGIN
        with it is refused too; bounded per peer and expiring (a peer cannot fill the store)."""
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM migrations WHERE vm=? AND state=? AND updated<?",
                             (UNKNOWN_VM, HandoffState.ABORTED.value, now - UNKNOWN_TTL))
            self._db.execute(
                "DELETE FROM migrations WHERE mid IN (SELECT mid FROM migrations WHERE vm=? AND peer_static=?"
                " AND state=? ORDER BY created DESC LIMIT -1 OFFSET ?)",
                (UNKNOWN_VM, peer.static_pub, HandoffState.ABORTED.value, MAX_UNKNOWN_PER_PEER - 1))
        try:
            self._open(mid, DESTINATION, UNKNOWN_VM, b"", peer, Step.ABORT, error="unknown migration queried")
        except sqlite3.IntegrityError:
            pass  # it exists after all (a concurrent BEGIN): the caller reads it again

    def abort_token(self, mid: bytes, peer_static: bytes, signing: SigningKey) -> bytes:
        """The abort token, only for a migration recorded aborted here and begun by that peer."""
        row = self.get(mid)
        if (row is None or row.role is not DESTINATION or row.state is not HandoffState.ABORTED
                or not row.is_peer(peer_static)):
            return b""
        return make_abort_token(signing, mid)

    # -- either side: the operator's way out of post-copy (proto 7.5, 7.9 item 7)

    def abandon(self, mid: bytes, side: Role, why: str) -> bool:
        """ABANDONED, from SERVING (the source) or PULLING (the destination) only: the operator
        declared the VM lost, its other host gone.  This side's copy never runs again and goes
        next (``scrub_abandoned``, once nothing reads it).  False if the row was elsewhere."""
        return self._move(mid, side, Step.ABANDON, error=why)

    def scrub_abandoned(self, mid: bytes, vm: HostedVM | None) -> bool:
        """This side's copy goes if, and only if, the row read back says ABANDONED."""
        row = self.get(mid)
        if vm is None or row is None or row.state is not HandoffState.ABANDONED or not may_scrub(row.role, row.state):
            return False
        fault(f"{row.role.value}.vm.scrub")
        vm.scrub()
        return True
