"""A whole migration on each side: policy, connect, run, the handoff rules, recovery.

Source rules (proto/PROTOCOL.md 7.5):
- before "handed_off" is durable, any failure resumes the VM on the source;
- after it, the source stays paused ("in doubt") until the destination says
  "committed" (the source scrubs) or hands over a valid abort token (the
  source resumes); an operator override exists and is loud.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import structlog
import trio
from nacl.signing import SigningKey

from palm_net.channel.handshake import Purpose, TransportMode
from palm_net.channel.transport import SecureChannel
from palm_net.errors import ErrorCode, MigrationFailure, PalmError
from palm_net.hypervisor.backend import Backend, HostedVM, HypervisorError, describe_error
from palm_net.hypervisor.vmspec import check_policy
from palm_net.migration.destination import DEADLINE_PER_GIB, DestinationEngine
from palm_net.migration.handoff import HandoffState, HandoffStore, InDoubt, Peer
from palm_net.migration.params import MigrationParams, MigrationStats, Phase, Status
from palm_net.migration.runner import DestinationRun, SourceRun, Stop
from palm_net.migration.source import SourceEngine, plain_refusal
from palm_net.wire.messages import Begin, Outcome, Query, RecoveryOutcome
from palm_net.wire.protocol import Role, SessionProtocol, State

log = structlog.get_logger("palm.migration")

# A source row whose VM runs where only the destination's word settles it: asked about
# until answered (post-copy's SERVING also until every page is served, proto 7.9).
IN_DOUBT = (HandoffState.HANDED_OFF, HandoffState.SERVING)

ConnectFn = Callable[[str], Awaitable[SecureChannel]]


@dataclass
class MigrationResult:
    ok: bool
    mid: bytes
    vm: str
    status: str  # completed, failed, in-doubt
    stats: MigrationStats
    error: str | None = None
    phase: str | None = None
    runs_on: str | None = None  # where the VM now runs: source, destination, none (in doubt: paused)
    peer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        st = self.stats
        return {
            "ok": self.ok, "vm": self.vm, "migration_id": self.mid.hex(), "status": self.status,
            "peer": self.peer,
            "total_ms": round(st.total_time * 1000, 1),
            "downtime_ms": round(st.downtime * 1000, 1) if st.downtime is not None else None,
            "expected_downtime_ms": round(st.expected_downtime * 1000, 1) if st.expected_downtime is not None
            else None,
            "setup_ms": round(st.setup_time * 1000, 1),
            "rounds": st.hypervisor["rounds"] if st.hypervisor else len(st.rounds),  # the paused one included
            "bytes": st.transferred, "zero_pages": st.zero_pages, "normal_pages": st.normal_pages,
            "protected_pages": st.protected_pages, "throttle": st.throttle, "channels": st.channels,
            "digest": st.digest, "digest_verified": bool(st.digest) and self.ok and (
                st.postcopy_pages is None or st.digest_at_pause == "equal"),  # (post-copy: checked after PULLED)
            "digest_at_pause": st.digest_at_pause,
            "digest_check_ms": round(st.digest_check * 1000, 1) if st.digest_check is not None else None,
            "round_stats": [r.as_dict() for r in st.rounds],
            "error": self.error, "phase": self.phase, "runs_on": self.runs_on,
            "hypervisor": st.hypervisor,
            "downtime_limit_ms": round(st.downtime_limit * 1000, 1) if st.downtime_limit is not None else None,
            "downtime_exceeded": st.downtime is not None and st.downtime_limit is not None
            and st.downtime > st.downtime_limit,
            "stop_reason": st.stop_reason,
            "ready_wait_ms": round(st.ready_wait * 1000, 1) if st.ready_wait is not None else None,
            "downtime_phases_ms": {k: round(v * 1000, 1) for k, v in st.downtime_phases.items()}
            if st.downtime_phases else None,
            "destination_phases_ms": {k: round(v * 1000, 1) for k, v in st.destination_phases.items()}
            if st.destination_phases else None,
            "postcopy_pages": st.postcopy_pages, "served_pages": st.served_pages, "fetched_pages": st.fetched_pages,
            "serve_ms": round(st.serve_time * 1000, 1) if st.serve_time is not None else None,
        }


async def migrate_out(
    vm: HostedVM,
    store: HandoffStore,
    dest_addr: str,
    params: MigrationParams,
    connect: ConnectFn,
    connect_recovery: ConnectFn,
    on_progress: Callable[[MigrationStats], None] | None = None,
    in_doubt_wait: float = 30.0,
    mid: bytes | None = None,
    spec: bytes = b"",
    stop: Stop | None = None,
    connect_data: ConnectFn | None = None,
) -> MigrationResult:
    """Migrates ``vm`` to the agent at ``dest_addr``; never raises for a failed migration.

    If cancelled (operator cancel, agent shutdown) before the handoff point,
    the VM is resumed here before the cancellation propagates; after it, the
    VM stays paused in doubt and the agent's recovery takes over (``connect_data``: proto 7.8).
    """
    params.validate()
    mid = mid or os.urandom(16)
    stats, started = MigrationStats(), time.monotonic()
    name = vm.info.name

    def fail(error: PalmError, phase: str) -> MigrationResult:
        stats.status = Status.FAILED
        stats.total_time = time.monotonic() - started
        return MigrationResult(False, mid, name, "failed", stats, str(error), phase, "source")

    if (refused := plain_refusal(params, vm.info)) is not None:
        return fail(refused, "setup")
    if not vm.running:
        return fail(MigrationFailure(ErrorCode.VM_STATE, f"VM {name!r} is not running"), "setup")
    try:
        check_policy(vm.policy)
        channel = await connect(dest_addr)
    except PalmError as exc:
        return fail(exc, "handshake")
    except OSError as exc:
        return fail(MigrationFailure(ErrorCode.UNREACHABLE, f"destination {dest_addr} not reachable "
                                                            f"({exc.strerror or exc})"), "connect")
    info = channel.result.peer
    peer = Peer(info.name, info.static_pub, info.sign_pub, dest_addr)
    try:
        try:
            check_policy(vm.policy, info.name, info.measurement)
        except MigrationFailure as exc:
            return fail(exc, "policy")
        try:
            store.open_outgoing(mid, vm, peer)
        except MigrationFailure as exc:  # e.g. no space for the VM's record of the migration
            return fail(exc, "setup")
        engine = SourceEngine(mid, vm.info, params, stream=bool(spec), spec=spec, stats=stats,
                              peer_sign_pub=info.sign_pub)
        run = SourceRun(channel, engine, vm, store, (lambda: on_progress(stats)) if on_progress else None, started,
                        stop, (lambda: connect_data(dest_addr)) if connect_data else None)
        try:
            await run.run()
        except (PalmError, InDoubt) as exc:
            error = exc if isinstance(exc, PalmError) else MigrationFailure(ErrorCode.OUT_OF_STATE, str(exc))
            if store.state_of(mid) not in IN_DOUBT:  # the row decides, not how we got here
                return await _resume_after_failure(vm, store, error, stats, started, channel, engine, peer)
            if run.abort_token is not None:  # the destination refused the commit, with its token
                store.abort_and_resume(mid, vm, str(error), token=run.abort_token)
                return _recovered("aborted", name, mid, stats, started, peer.name)
            # Past the handoff point: ask the destination (in doubt until it answers).
            log.warning("in doubt after COMMIT", migration=mid.hex(), vm=name, peer=peer.name,
                        phase="in-doubt", error=error.code.value)
            stats.status, stats.phase = Status.IN_DOUBT, Phase.IN_DOUBT
            with trio.move_on_after(1):  # (post-copy: the destination's session ends before a recovery's serves)
                await channel.aclose()
            outcome = await _ask_until(store, mid, vm, connect_recovery, in_doubt_wait)
            if outcome is not None:
                return _recovered(outcome, name, mid, stats, started, peer.name)
            stats.total_time = time.monotonic() - started
            serving = store.state_of(mid) is HandoffState.SERVING
            return MigrationResult(False, mid, name, "in-doubt", stats, f"{error}; " + (
                "the VM runs on the destination, its missing pages served from here once it answers" if serving
                else "outcome unknown, VM paused until the destination answers"), "in-doubt",
                "destination (pages still served from here)" if serving else "none (paused, in doubt)", peer.name)
        except BaseException:
            # Cancellation (operator cancel, agent shutdown), or an error of ours:
            # before the handoff point (the row says so) the VM runs here again.
            # (No ABORT: a send the cancellation cut mid-record leaves the session
            # unusable; the destination discards on the closed session.)
            if store.state_of(mid) is HandoffState.SENDING:
                store.abort_and_resume(mid, vm, "cancelled: migration cancelled")
            raise
        stats.digest = engine.pulled.digest.hex() if engine.pulled and params.verify_digest else stats.digest
        try:
            if store.confirm(mid):
                if params.verify_digest and not engine.stream:
                    stats.phase = Phase.DIGEST_CHECK  # the VM runs there; this side re-reads its copy: shown, counted
                    if on_progress is not None:
                        on_progress(stats)
                    await _check_digest_at_pause(vm, stats, mid)
                    stats.total_time = time.monotonic() - started
            # A GiB takes a while to scrub: not on the event loop.  The row read back decides.
            await trio.to_thread.run_sync(store.scrub_handed_over, mid, vm)
        except (OSError, sqlite3.Error, HypervisorError) as exc:
            # The destination runs the VM.  Unconfirmed here, this copy stays paused
            # in doubt and recovery confirms it; confirmed, it is scrubbed at the next start.
            log.error("migration committed on the destination, but this side could not finish",
                      migration=mid.hex(), vm=name, peer=peer.name, phase="done", error=describe_error(exc))
            if store.state_of(mid) in IN_DOUBT:
                stats.status, stats.phase = Status.IN_DOUBT, Phase.IN_DOUBT
                stats.total_time = time.monotonic() - started
                return MigrationResult(False, mid, name, "in-doubt", stats,
                                       f"committed on the destination; not recorded here ({describe_error(exc)})",
                                       "in-doubt", "destination", peer.name)
        store.set_stats(mid, stats.as_dict())
        log.info("migration completed", migration=mid.hex(), vm=name, peer=peer.name, phase="done",
                 round=engine.round, downtime_ms=round((stats.downtime or 0) * 1000, 1))
        return MigrationResult(True, mid, name, "completed", stats, runs_on="destination", peer=peer.name)
    finally:
        with trio.move_on_after(1):
            await channel.aclose()


async def _ask_until(store: HandoffStore, mid: bytes, vm: HostedVM, connect_recovery: ConnectFn,
                     wait: float) -> str | None:
    """Asks the destination about an in-doubt migration until answered or ``wait`` is over
    (an answer being served, post-copy's, runs to its end)."""
    deadline = trio.current_time() + wait
    while trio.current_time() < deadline:
        try:
            outcome = await recover_once(store, mid, vm, connect_recovery)
        except (OSError, sqlite3.Error, HypervisorError) as exc:  # asked again: the row decides
            log.error("recovery attempt failed", migration=mid.hex(), error=describe_error(exc))
            outcome = None
        if outcome is not None:
            return outcome
        await trio.sleep(min(0.5, max(0.0, deadline - trio.current_time())))  # retry backoff
    return None


async def _check_digest_at_pause(vm: HostedVM, stats: MigrationStats, mid: bytes) -> None:
    """The second half of --verify-digest (proto 7.4), after DONE: READY's digest matched
    the pages as this agent last sent them; here they are checked against memory at
    the pause, read afresh from this copy (paused since, and not yet scrubbed), which
    proves the dirty log missed no write.  The destination runs the VM already: a
    difference cannot be undone, so it is said loudly."""
    t0 = time.monotonic()
    full = await trio.to_thread.run_sync(vm.digest)
    stats.digest_check = time.monotonic() - t0
    equal = stats.digest is not None and hmac.compare_digest(full, stats.digest)
    stats.digest_at_pause = "equal" if equal else "differs"
    if not equal:
        log.error("memory at the pause differs from the pages sent: the dirty log missed a write",
                  migration=mid.hex(), vm=vm.info.name, phase="done")


async def _resume_after_failure(vm: HostedVM, store: HandoffStore, error: PalmError, stats: MigrationStats,
                                started: float, channel: SecureChannel, engine: SourceEngine,
                                peer: Peer) -> MigrationResult:
    """Before the handoff point the source may always run again (ABORT to the destination, best effort)."""
    phase = stats.phase
    with trio.CancelScope(shield=True):  # a cancel (agent stop, a drain's) must not leave the VM paused
        await _send_abort(channel, engine, error.code)  # (a second at most)
        store.abort_and_resume(engine.mid, vm, str(error))
    stats.status = Status.FAILED
    stats.total_time = time.monotonic() - started
    runs_on = "source" if vm.running else "source (paused: its resume failed, retried)"
    log.warning("migration failed, VM back on the source", migration=engine.mid.hex(), vm=vm.info.name,
                peer=peer.name, phase=phase, error=error.code.value, reason=error.detail, runs_on=runs_on)
    return MigrationResult(False, engine.mid, vm.info.name, "failed", stats, str(error), phase, runs_on, peer.name)


async def _send_abort(channel: SecureChannel, engine: SourceEngine, code: ErrorCode) -> None:
    """ABORT to the destination, if the session still allows one: best effort, a second at most."""
    abort = engine.abort(code)
    if abort is None or not channel.sent[0]:  # nothing sent yet: the destination knows of no migration
        return
    with trio.move_on_after(1):
        try:
            await channel.send(abort)
        except (PalmError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass  # the destination discards on its own anyway


def _recovered(outcome: str, name: str, mid: bytes, stats: MigrationStats, started: float,
               peer: str) -> MigrationResult:
    stats.total_time = time.monotonic() - started
    if outcome == "committed":
        stats.status = Status.COMPLETED
        return MigrationResult(True, mid, name, "completed", stats, runs_on="destination", peer=peer,
                               extra={"recovered": True})
    stats.status = Status.FAILED
    return MigrationResult(False, mid, name, "failed", stats, "aborted: destination issued an abort token",
                           "in-doubt", "source", peer)


async def recover_once(store: HandoffStore, mid: bytes, vm: HostedVM | None,
                       connect_recovery: ConnectFn) -> str | None:
    """One attempt to learn an in-doubt migration's outcome and apply it; post-copy's
    ``postcopy`` answer: the missing pages served on that session (proto 7.9 item 6).

    Returns "committed" / "aborted" once settled, None if the destination
    could not be asked, gave no usable answer or the serving broke off (try again later).
    """
    row = store.get(mid)
    if row is None or row.role is not Role.SOURCE:
        return None
    if row.state not in IN_DOUBT:
        return "committed" if row.state is HandoffState.DONE else "aborted"
    try:
        channel = await connect_recovery(row.peer.addr)
    except (OSError, PalmError):
        return None
    bound = log.bind(migration=mid.hex(), vm=row.vm, peer=row.peer.name, phase="in-doubt")
    try:
        if not row.is_peer(channel.result.peer.static_pub):
            bound.error("recovery reached another agent")
            return None
        proto = SessionProtocol(Role.SOURCE, mid, recovery=True)
        with trio.fail_after(10):
            await channel.send(proto.send(Query()))
            answer = proto.receive_message((await channel.receive()).data).get(Outcome)
        if answer.outcome == RecoveryOutcome.POSTCOPY:
            return await _serve_again(store, mid, vm, channel, proto, bound)
    except (OSError, PalmError, InDoubt, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    finally:
        with trio.move_on_after(1):
            await channel.aclose()
    if answer.outcome == RecoveryOutcome.COMMITTED:
        store.confirm_and_scrub(mid, vm)
        bound.info("in-doubt migration resolved: committed on the destination, source scrubbed")
        return "committed"
    if answer.outcome == RecoveryOutcome.ABORTED and answer.token:
        try:
            resumed = store.abort_and_resume(mid, vm, "aborted by destination token", token=answer.token)
        except PalmError:
            bound.error("recovery answer with an invalid abort token ignored")
            return None
        if not resumed:  # (SERVING: the VM ran there; nothing here may run it again) asked again
            bound.error("the destination says aborted, but this copy may not run again: still in doubt")
            return None
        bound.warning("in-doubt migration resolved: destination aborted (valid token), VM resumed on the source")
        return "aborted"
    bound.error("the destination does not know this migration as ours; still in doubt", outcome=answer.outcome)
    return None


async def _serve_again(store: HandoffStore, mid: bytes, vm: HostedVM | None, channel: SecureChannel,
                       proto: SessionProtocol, bound: Any) -> str | None:
    """Post-copy's recovery: the VM runs at the destination, which still misses pages only
    this copy holds: SERVING (if RUNNING never came), its WANTs served, then DONE and scrub."""
    if vm is None:  # (the agent keeps a serving VM: never scrubbed before PULLED)
        bound.error("post-copy recovery: this copy of the VM is not here to serve its pages")
        return None
    bound.info("post-copy recovery: serving the destination's missing pages again")
    engine = SourceEngine.recovering(proto, vm.info, MigrationParams())
    await SourceRun(channel, engine, vm, store).run()
    store.confirm_and_scrub(mid, vm)
    bound.info("post-copy recovery: every page served, source scrubbed", pages=engine.stats.served_pages)
    return "committed"


def answer_query(store: HandoffStore, signing: SigningKey, mid: bytes, asker: Peer) -> Outcome:
    """Destination side of recovery, for the source recorded for ``mid`` only:
    'committed', or abort forever and hand out the token.  Another agent
    learns 'unknown' and changes nothing."""
    row = store.get(mid)
    if row is None:
        store.record_unknown(mid, asker)  # a late BEGIN with this id is refused too
    elif row.role is not Role.DESTINATION or not row.is_peer(asker.static_pub):
        return Outcome(RecoveryOutcome.UNKNOWN.value, b"")
    else:
        store.abort_forever(mid, None, "aborted on recovery query")  # a no-op once committed
    row = store.get(mid)
    if row is not None and row.state is HandoffState.COMMITTED:
        return Outcome(RecoveryOutcome.COMMITTED.value, b"")
    if row is not None and row.state is HandoffState.PULLING:  # (never aborted: the VM ran here)
        return Outcome(RecoveryOutcome.POSTCOPY.value, b"")
    token = store.abort_token(mid, asker.static_pub, signing)  # only for what is recorded aborted
    return Outcome(RecoveryOutcome.ABORTED.value, token) if token else Outcome(RecoveryOutcome.UNKNOWN.value, b"")


async def _pull_again(channel: SecureChannel, proto: SessionProtocol, vm: HostedVM, store: HandoffStore,
                      signing: SigningKey, open_vm: Callable[[bytes, Begin, Peer], Awaitable[HostedVM]]) -> None:
    """Post-copy's recovery at the destination (proto 7.9 item 6): WANT what the VM still
    misses, then take it as the first session would have, to COMMITTED and PULLED."""
    state = cast(Backend, vm).postcopy_state()
    empty = np.zeros(0, np.uint64)
    switch_round, missing, vers = state if state is not None else (0, empty, empty)
    engine, first = DestinationEngine.pulling(proto, vm.info.npages, switch_round, missing, vers)
    run = DestinationRun(channel, engine, store, signing, open_vm)
    run.host.vm = vm
    log.info("post-copy recovery: pulling the missing pages", migration=proto.mid.hex() if proto.mid else None,
             vm=vm.info.name, pages=len(missing))
    error = await run.run(first)
    if error is None and engine.state is State.DONE:
        log.info("post-copy recovery: every page in, committed", vm=vm.info.name)


def override_resume(store: HandoffStore, mid: bytes, vm: HostedVM, operator_reason: str) -> None:
    """The operator's loud override: resume an in-doubt VM without the destination's word.

    This can fork the VM if the destination did commit; it is logged as an error.
    """
    row = store.get(mid)
    if row is None or row.state is not HandoffState.HANDED_OFF:
        raise MigrationFailure(ErrorCode.VM_STATE, "no in-doubt migration with that id")
    log.error("OPERATOR OVERRIDE: in-doubt VM resumed without the destination's abort token; "
              "if the destination committed, the VM now runs twice", migration=mid.hex(), vm=vm.info.name,
              peer=row.peer.name, phase="in-doubt", reason=operator_reason)
    store.abort_and_resume(mid, vm, f"OPERATOR OVERRIDE: {operator_reason}", override=True)


async def serve_incoming(
    channel: SecureChannel,
    store: HandoffStore,
    signing: SigningKey,
    open_vm: Callable[[bytes, Begin, Peer], Awaitable[HostedVM]],
    max_pages: int,
    deadline_per_gib: float = DEADLINE_PER_GIB,
    runs: dict[int, DestinationRun] | None = None,
    pulling_vm: Callable[[bytes], HostedVM | None] = lambda mid: None,
    on_running: Callable[[HostedVM], None] | None = None,
) -> DestinationRun | None:
    """Destination side of one attested session: a recovery query (answered here; post-copy's
    ``postcopy``: its missing pages pulled on it), or a migration (returns its run: its
    engine's outcome and VM, for the agent).  ``pulling_vm(mid)``: the VM of a PULLING
    migration, if this agent holds it and no other session pulls into it now."""
    info = channel.result.peer
    if channel.result.purpose is Purpose.RECOVERY:
        proto = SessionProtocol(Role.DESTINATION, recovery=True)
        vm: HostedVM | None = None
        with trio.fail_after(10):
            proto.receive_message((await channel.receive()).data)  # QUERY: the state machine allows nothing else
            assert proto.mid is not None
            outcome = answer_query(store, signing, proto.mid, Peer(info.name, info.static_pub, info.sign_pub))
            if outcome.outcome == RecoveryOutcome.POSTCOPY and (vm := pulling_vm(proto.mid)) is None:
                outcome = Outcome(RecoveryOutcome.UNKNOWN.value, b"")  # not now: asked again
            log.info("recovery query answered", migration=proto.mid.hex(), peer=info.name, phase="in-doubt",
                     outcome=outcome.outcome)
            await channel.send(proto.send(outcome))
        if vm is not None:
            await _pull_again(channel, proto, vm, store, signing, open_vm)
        return None
    engine = DestinationEngine(channel.result.mode is TransportMode.PLAIN_BENCHMARK, max_pages, deadline_per_gib)
    run = DestinationRun(channel, engine, store, signing, open_vm, on_running)
    if runs is not None:
        runs[id(run)] = run
    try:
        await run.run()
    finally:
        if runs is not None:
            runs.pop(id(run), None)
    return run
