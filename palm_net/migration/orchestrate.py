"""A whole migration on each side: policy, connect, run, the handoff rules, recovery.

Source rules (proto/PROTOCOL.md 7.4):
- before "handed_off" is durable, any failure resumes the VM on the source;
- after it, the source stays paused ("in doubt") until the destination says
  "committed" (the source scrubs) or hands over a valid abort token (the
  source resumes); an operator override exists and is loud.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio
from nacl.signing import SigningKey

from palm_net.channel.handshake import Purpose, TransportMode
from palm_net.channel.transport import SecureChannel
from palm_net.hypervisor.qemu import QemuVM
from palm_net.hypervisor.vms import AnyVM
from palm_net.migration.engine import (
    DestinationEngine,
    MigrationFailure,
    MigrationParams,
    MigrationStats,
    SourceEngine,
    StreamSourceEngine,
    check_abort_token,
    describe,
    make_abort_token,
)
from palm_net.migration.runner import DEADLINE_PER_GIB, DestinationRun, SourceRun
from palm_net.migration.store import HandoffStore
from palm_net.wire.errors import ProtocolError
from palm_net.wire.messages import Message
from palm_net.wire.protocol import Role, SessionProtocol

log = structlog.get_logger("palm.migration")

ConnectFn = Callable[[str], Awaitable[SecureChannel]]


class PolicyError(MigrationFailure):
    pass


def check_policy(policy: str, peer_name: str | None = None, peer_measurement: bytes | None = None) -> None:
    """Per-VM migration policy, in the spirit of SEV's NOSEND / DOMAIN.

    ``any``; ``none`` (never migrates); ``agents:NAME[,NAME...]``;
    ``measurements:HEX[,HEX...]``.  Checked before connecting (``none``) and
    after the handshake, before any page is sent.
    """
    kind, _, arg = policy.partition(":")
    allowed = [a for a in arg.split(",") if a]
    if kind == "any":
        return
    if kind == "none":
        raise PolicyError("policy", "the VM's policy forbids migration")
    if kind == "agents":
        if peer_name is not None and peer_name not in allowed:
            raise PolicyError("policy", f"the VM's policy does not allow agent {peer_name!r}")
        return
    if kind == "measurements":
        if peer_measurement is not None and peer_measurement.hex() not in allowed:
            raise PolicyError("policy", "the VM's policy does not allow the destination's measurement")
        return
    raise PolicyError("policy", f"unknown policy {policy!r}")


def validate_policy(policy: str) -> str:
    kind, _, arg = policy.partition(":")
    if kind in ("any", "none") and not arg:
        return policy
    if kind in ("agents", "measurements") and arg:
        return policy
    raise ValueError(f"bad policy {policy!r}: any, none, agents:NAME,... or measurements:HEX,...")


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
            "rounds": st.hypervisor["rounds"] if st.hypervisor
            else len(st.rounds) + (1 if st.status == "completed" else 0),
            "bytes": st.transferred, "zero_pages": st.zero_pages, "normal_pages": st.normal_pages,
            "protected_pages": st.protected_pages, "throttle": st.throttle,
            "digest": st.digest, "digest_verified": bool(st.digest) and self.ok,
            "round_stats": [r.__dict__ for r in st.rounds],
            "error": self.error, "phase": self.phase, "runs_on": self.runs_on,
            "hypervisor": st.hypervisor,
        }


async def migrate_out(
    vm: AnyVM,
    store: HandoffStore,
    dest_addr: str,
    params: MigrationParams,
    connect: ConnectFn,
    connect_recovery: ConnectFn,
    on_progress: Callable[[MigrationStats], None] | None = None,
    in_doubt_wait: float = 30.0,
    mid: bytes | None = None,
) -> MigrationResult:
    """Migrates ``vm`` to the agent at ``dest_addr``; never raises for a failed migration.

    If cancelled (operator cancel, agent shutdown) before the handoff point,
    the VM is resumed here before the cancellation propagates; after it, the
    VM stays paused in doubt and the agent's recovery takes over.
    """
    params.validate()
    mid = mid or os.urandom(16)
    stats = MigrationStats()
    started = time.monotonic()

    def fail(code: str, reason: str, phase: str) -> MigrationResult:
        stats.status = "failed"
        stats.total_time = time.monotonic() - started
        return MigrationResult(False, mid, vm.name, "failed", stats, f"{code}: {reason}", phase, "source")

    if params.plain and vm.info.protected_pages:
        return fail("plain-refused", "a VM with protected processes never uses the plain benchmark mode", "setup")
    if vm.state != "running":
        return fail("state", f"VM {vm.name!r} is {vm.state}, not running", "setup")
    try:
        check_policy(vm.policy)
        channel = await connect(dest_addr)
    except (MigrationFailure, ProtocolError) as exc:
        return fail(*describe(exc, "handshake"), "handshake")
    except OSError as exc:
        return fail("unreachable", f"destination {dest_addr} not reachable ({exc.strerror or exc})", "connect")
    peer = channel.result.peer
    try:
        try:
            check_policy(vm.policy, peer.name, peer.measurement)
        except MigrationFailure as exc:
            return fail(exc.code, exc.reason, "policy")
        store.create(mid, "source", vm.name, vm.vm_id, peer.name, dest_addr, peer.static_pub, peer.sign_pub,
                     "sending")
        vm.set_migration(mid)
        engine: SourceEngine | StreamSourceEngine = (
            StreamSourceEngine(vm, mid, params, stats, vm.spec.encode()) if isinstance(vm, QemuVM)
            else SourceEngine(vm, mid, params, stats))
        run = SourceRun(channel, engine, store, (lambda: on_progress(stats)) if on_progress else None, started)
        try:
            await run.run()
        except Exception as exc:
            code, reason = describe(exc, type(exc).__name__)
            if not run.handed_off:
                return await _resume_after_failure(vm, store, mid, stats, code, reason, started, channel,
                                                   engine, peer.name)
            # Past the handoff point: ask the destination (in doubt until it answers).
            log.warning("in doubt after COMMIT", migration=mid.hex(), vm=vm.name, peer=peer.name,
                        phase="in-doubt", error=code)
            stats.status = "in-doubt"
            stats.phase = "in-doubt"
            with trio.move_on_after(in_doubt_wait):
                while True:
                    outcome = await recover_once(store, mid, vm, connect_recovery)
                    if outcome is not None:
                        return _recovered(outcome, vm, mid, stats, started, peer.name)
                    await trio.sleep(0.5)  # retry backoff
            stats.total_time = time.monotonic() - started
            return MigrationResult(False, mid, vm.name, "in-doubt", stats,
                                   f"{code}: {reason}; outcome unknown, VM paused until the destination answers",
                                   "in-doubt", "none (paused, in doubt)", peer.name)
        except BaseException:
            # Cancellation (operator cancel, agent shutdown), possibly grouped by a
            # nursery: before the handoff point the VM runs here again.
            if not run.handed_off:
                _resume_source(vm, store, mid, "cancelled", "migration cancelled")
            raise
        store.transition(mid, ("handed_off",), "done")
        store.set_stats(mid, stats.as_dict())
        vm.scrub()
        log.info("migration completed", migration=mid.hex(), vm=vm.name, peer=peer.name, phase="done",
                 round=engine.round, downtime_ms=round((stats.downtime or 0) * 1000, 1))
        return MigrationResult(True, mid, vm.name, "completed", stats, runs_on="destination", peer=peer.name)
    finally:
        with trio.move_on_after(1):
            await channel.aclose()


async def _resume_after_failure(vm: AnyVM, store: HandoffStore, mid: bytes, stats: MigrationStats, code: str,
                                reason: str, started: float, channel: SecureChannel,
                                engine: SourceEngine | StreamSourceEngine, peer: str) -> MigrationResult:
    phase = stats.phase
    abort = engine.abort(code, reason)
    if abort is not None:
        with trio.move_on_after(1):
            try:
                await channel.send_record(abort)
            except Exception:  # noqa: S110 - best effort: the destination discards on its own anyway
                pass
    _resume_source(vm, store, mid, code, reason)
    stats.status = "failed"
    stats.total_time = time.monotonic() - started
    log.warning("migration failed, VM resumed on the source", migration=mid.hex(), vm=vm.name, peer=peer,
                phase=phase, error=code, reason=reason)
    return MigrationResult(False, mid, vm.name, "failed", stats, f"{code}: {reason}", phase, "source", peer)


def _resume_source(vm: AnyVM, store: HandoffStore, mid: bytes, code: str, reason: str) -> None:
    """Before the handoff point the source may always run again."""
    store.transition(mid, ("sending",), "aborted", error=f"{code}: {reason}"[:500])
    vm.resume_after_migration()


def _recovered(outcome: str, vm: AnyVM, mid: bytes, stats: MigrationStats, started: float,
               peer: str) -> MigrationResult:
    stats.total_time = time.monotonic() - started
    if outcome == "committed":
        stats.status = "completed"
        return MigrationResult(True, mid, vm.name, "completed", stats, runs_on="destination", peer=peer,
                               extra={"recovered": True})
    stats.status = "failed"
    return MigrationResult(False, mid, vm.name, "failed", stats, "aborted: destination issued an abort token",
                           "in-doubt", "source", peer)


async def recover_once(store: HandoffStore, mid: bytes, vm: AnyVM | None, connect_recovery: ConnectFn) -> str | None:
    """One attempt to learn an in-doubt migration's outcome and apply it.

    Returns "committed" / "aborted" once settled, None if the destination
    could not be asked (try again later).
    """
    row = store.get(mid)
    if row is None or row.role != "source":
        return None
    if row.state != "handed_off":
        return row.state
    try:
        channel = await connect_recovery(row.peer_addr)
    except (OSError, ProtocolError):
        return None
    try:
        peer = channel.result.peer
        if peer.static_pub != row.peer_static:
            log.error("recovery reached another agent", migration=mid.hex(), peer=peer.name, phase="in-doubt")
            return None
        proto = SessionProtocol(Role.SOURCE, mid, recovery=True)
        with trio.fail_after(10):
            await channel.send_record(proto.send("QUERY"))
            msg = proto.receive(await channel.receive_record())
    except (OSError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return None
    finally:
        with trio.move_on_after(1):
            await channel.aclose()
    outcome, token = msg.body["outcome"], msg.body["token"]
    bound = log.bind(migration=mid.hex(), vm=row.vm, peer=row.peer, phase="in-doubt")
    if outcome == "committed":
        store.transition(mid, ("handed_off",), "done")
        if vm is not None:
            vm.scrub()
        bound.info("in-doubt migration resolved: committed on the destination, source scrubbed")
        return "committed"
    if outcome == "aborted" and check_abort_token(row.peer_sign, mid, token):
        store.transition(mid, ("handed_off",), "aborted", token=token, error="aborted by destination token")
        if vm is not None:
            vm.resume_after_migration()
        bound.warning("in-doubt migration resolved: destination aborted (valid token), VM resumed on the source")
        return "aborted"
    if outcome == "unknown":
        bound.error("the destination does not know this migration as ours; still in doubt")
        return None
    bound.error("recovery answer without a valid abort token ignored", outcome=outcome)
    return None


def answer_query(store: HandoffStore, signing: SigningKey, mid: bytes, asker_static: bytes,
                 asker_name: str = "?", asker_sign: bytes = b"") -> tuple[str, bytes]:
    """Destination side of recovery, for the source recorded for ``mid`` only:
    'committed', or abort forever and hand out the token.  Another agent
    learns 'unknown' and changes nothing."""
    row = store.get(mid)
    if row is None:
        # Never heard of it: record the abort (bounded per peer, expiring) so
        # that a late BEGIN with this id is refused too.
        store.record_unknown_query(mid, asker_name, asker_static, asker_sign)
        row = store.get(mid)
    elif row.role != "destination" or not hmac.compare_digest(row.peer_static, asker_static):
        return "unknown", b""
    else:
        store.transition(mid, ("receiving", "prepared"), "aborted", error="aborted on recovery query")
        row = store.get(mid)
    if row is not None and row.state == "committed":
        return "committed", b""
    if row is not None and row.state == "aborted":  # a token only for what is recorded aborted
        return "aborted", make_abort_token(signing, mid)
    return "unknown", b""


def override_resume(store: HandoffStore, mid: bytes, vm: AnyVM, operator_reason: str) -> None:
    """The operator's loud override: resume an in-doubt VM without the destination's word.

    This can fork the VM if the destination did commit; it is logged as an error.
    """
    row = store.get(mid)
    if row is None or row.state != "handed_off":
        raise MigrationFailure("state", "no in-doubt migration with that id")
    store.transition(mid, ("handed_off",), "aborted", error=f"OPERATOR OVERRIDE: {operator_reason}"[:500])
    log.error("OPERATOR OVERRIDE: in-doubt VM resumed without the destination's abort token; "
              "if the destination committed, the VM now runs twice", migration=mid.hex(), vm=vm.name,
              peer=row.peer, phase="in-doubt", reason=operator_reason)
    vm.resume_after_migration()


async def serve_incoming(
    channel: SecureChannel,
    store: HandoffStore,
    signing: SigningKey,
    make_vm: Callable[[Message], AnyVM],
    max_pages: int,
    on_engine: Callable[[DestinationEngine], None] | None = None,
    admit: Callable[[bytes, int], Callable[[], None]] | None = None,
    deadline_per_gib: float = DEADLINE_PER_GIB,
) -> None:
    """Destination side of one attested session: a migration or a recovery query."""
    peer = channel.result.peer
    if channel.result.purpose is Purpose.RECOVERY:
        proto = SessionProtocol(Role.DESTINATION, recovery=True)
        with trio.fail_after(10):
            proto.receive(await channel.receive_record())  # QUERY: the state machine allows nothing else
            assert proto.mid is not None
            outcome, token = answer_query(store, signing, proto.mid, peer.static_pub, peer.name, peer.sign_pub)
            log.info("recovery query answered", migration=proto.mid.hex(), peer=peer.name, phase="in-doubt",
                     outcome=outcome)
            await channel.send_record(proto.send("OUTCOME", outcome=outcome, token=token))
        return
    engine = DestinationEngine(make_vm, store, signing, peer.name, peer.static_pub, peer.sign_pub,
                               channel.result.mode is TransportMode.PLAIN_BENCHMARK, max_pages, admit)
    if on_engine is not None:
        on_engine(engine)
    await DestinationRun(channel, engine, deadline_per_gib=deadline_per_gib).run()
