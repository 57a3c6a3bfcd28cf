"""The incoming service: connections, handshakes and sessions from other agents.

Before any work, a connection passes a cap on connections held and a rate
per source address; after the handshake, a rate per certified peer.  A
MIGRATION session's BEGIN is then admitted in one place (palm_net.agent.limits.Admission),
before anything is made; the session runs under the destination engine's
shell (palm_net.migration.runner), and when it ends, however it ends, it is
settled here: its VM runs here (committed) or is gone, and its place in the
limits is given back.  A RECOVERY session is answered by the handoff rules.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog
import trio
from nacl.signing import SigningKey

from palm_net.agent.errors import AgentError
from palm_net.agent.limits import Admission, TokenBuckets, release_free_memory
from palm_net.agent.registry import VmRegistry
from palm_net.channel.handshake import ChannelConfig, PeerInfo, Purpose
from palm_net.channel.transport import SecureChannel, accept
from palm_net.errors import ErrorCode, MigrationFailure, PalmError
from palm_net.hypervisor.backend import PAGE_SIZE, HypervisorError, describe_error
from palm_net.hypervisor.vms import AnyVM
from palm_net.migration.handoff import STORAGE_ERRORS, HandoffState, HandoffStore, Peer, may_run
from palm_net.migration.orchestrate import serve_incoming
from palm_net.migration.runner import DestinationRun
from palm_net.trioutil import Changes
from palm_net.wire import messages
from palm_net.wire.messages import Begin
from palm_net.wire.protocol import FINAL, Role

log = structlog.get_logger("palm.agent")

MAX_PENDING_HANDSHAKES = 256
BIND_TIMEOUT = 10.0  # a DATA session's BIND within this of its handshake


@dataclass(frozen=True)
class IncomingLimits:
    max_sessions: int
    max_memory: int
    max_per_peer: int
    max_memory_per_peer: int
    deadline_per_gib: float
    max_connections: int
    handshake_rate: float
    session_rate: float


def _peer_host(stream: trio.SocketStream) -> str:
    """The key of a source address for its rate: the address, or its /64 for IPv6
    (one host easily holds a whole /64)."""
    try:
        host = str(stream.socket.getpeername()[0])
    except (OSError, IndexError):
        return "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and not (ip.ipv4_mapped or ip.is_loopback):
        return str(ipaddress.ip_network(f"{host}/64", strict=False))
    return host


async def _close(resource: trio.abc.AsyncResource | SecureChannel) -> None:
    with trio.move_on_after(1) as cs:
        cs.shield = True
        await resource.aclose()


class Session:
    """One incoming MIGRATION session's hold on the agent: its admission and its VM."""

    def __init__(self) -> None:
        self.release: Callable[[], None] | None = None
        self.vm: AnyVM | None = None
        self.mid: bytes | None = None  # the migration recorded for it (its row decides how it ends)
        self.name: str | None = None  # reserved in the registry
        self.pulling: bytes | None = None  # a RECOVERY session pulling post-copy's pages (proto 7.9)


class IncomingService:
    def __init__(self, config: ChannelConfig, store: HandoffStore, signing: SigningKey, registry: VmRegistry,
                 limits: IncomingLimits, accept_qemu: bool) -> None:
        self.config = config
        self.store = store
        self.signing = signing
        self.registry = registry
        self.limits = limits
        self.accept_qemu = accept_qemu
        self.admission = Admission(limits.max_sessions, limits.max_memory, limits.max_per_peer,
                                   limits.max_memory_per_peer)
        self.handshakes = TokenBuckets(limits.handshake_rate, 4 * limits.handshake_rate)  # per source address
        self.sessions = TokenBuckets(limits.session_rate, 4 * limits.session_rate)  # per certified peer
        self.connections = 0
        self.runs: dict[int, DestinationRun] = {}  # sessions in progress
        self.counters: dict[str, int] = {}  # refusals by reason, handshakes completed
        self._pending: dict[object, list[Any]] = {}  # key -> [cancel scope, handshake]
        self._refusals: dict[str, int] = {}
        self._refusal_logged = 0.0
        # The cluster's peer gate (palm_net.cluster.gate), consulted after each handshake
        # and, when its lists change, for every session in flight (recheck).
        self.gate: Callable[[PeerInfo, Purpose], PalmError | None] = lambda peer, purpose: None
        self._live: dict[object, tuple[SecureChannel, trio.CancelScope]] = {}
        self._settled = Changes()  # a session left _live, settled (without_sessions waits on it)
        self.on_settled: list[Callable[[str], None]] = []  # told how each MIGRATION session ended
        self._pulling: set[bytes] = set()  # post-copy migrations a recovery session pulls into now

    @property
    def accepting(self) -> bool:
        return self.admission.accepting

    def stop_accepting(self) -> None:
        self.admission.accepting = False

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def _log_refusal(self, code: str, detail: str) -> None:
        """A flood must not turn into a flood of log lines: one summary line a second."""
        now = time.monotonic()
        self._refusals[code] = self._refusals.get(code, 0) + 1
        if now - self._refusal_logged >= 1.0:
            log.warning("handshakes refused", counts=dict(self._refusals), last_reason=detail)
            self._refusals.clear()
            self._refusal_logged = now

    def _admit_handshake(self) -> None:
        """Keeps the pending handshakes bounded: when full, drops the oldest of
        those that got least far (a flood of half-open or garbage peers loses
        its slots before an honest peer that is already mid-handshake)."""
        if len(self._pending) < MAX_PENDING_HANDSHAKES:
            return
        victim = min(self._pending, key=lambda k: self._pending[k][1].progress if self._pending[k][1] else -1)
        self._pending.pop(victim)[0].cancel()

    # -- a connection

    async def handle(self, stream: trio.SocketStream) -> None:
        """One connection; never raises (one session's failure must not take the agent down)."""
        try:
            await self._handle(stream)
        except Exception:
            log.exception("incoming connection failed")

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Before any work: a cap on connections held, and a rate per source
        # address (a first message costs us a Diffie-Hellman and our
        # certificate, the sender almost nothing).
        if self.connections >= self.limits.max_connections or not self.handshakes.take(_peer_host(stream)):
            reason = "connections" if self.connections >= self.limits.max_connections else "rate"
            self._count(f"refused-{reason}")
            self._log_refusal(reason, "connection closed before the handshake")
            await _close(stream)
            return
        self.connections += 1
        try:
            channel = await self._handshake(stream)
            if channel is None:
                await _close(stream)
                return
            try:
                await self._session(channel)
            finally:
                await _close(channel)
        finally:
            self.connections -= 1

    async def _handshake(self, stream: trio.SocketStream) -> SecureChannel | None:
        # Every handshake has a deadline and a small buffer, and the number
        # pending is bounded (_admit_handshake).
        scope = trio.CancelScope()
        key = object()
        self._admit_handshake()
        entry: list[Any] = [scope, None]
        self._pending[key] = entry
        try:
            with scope:
                channel = await accept(stream, self.config, on_start=lambda hs: entry.__setitem__(1, hs))
        except PalmError as exc:
            self._count(f"refused-{exc.code}")
            self._log_refusal(exc.code.value, exc.detail)
            return None
        finally:
            self._pending.pop(key, None)
        if scope.cancelled_caught:
            return None
        refused = self.gate(channel.result.peer, channel.result.purpose)
        if refused is not None:
            self._count(f"refused-{refused.code}")
            self._log_refusal(refused.code.value, refused.detail)
            await _close(channel)
            return None
        # (A DATA session is not a session of its own: bound to its migration or closed
        # within BIND_TIMEOUT, at most MAX_CHANNELS - 1 to a migration.)
        if channel.result.purpose is not Purpose.DATA and not self.sessions.take(channel.result.peer.static_pub):
            self._count("refused-session-rate")
            self._log_refusal("session-rate", f"peer {channel.peer_name!r} opens sessions too fast")
            await _close(channel)
            return None
        self._count("handshakes")
        return channel

    async def _session(self, channel: SecureChannel) -> None:
        log.debug("session accepted", peer=channel.peer_name, purpose=channel.result.purpose.name)
        if channel.result.purpose is Purpose.DATA:
            await self._data_session(channel)
            return
        session = Session()

        async def open_vm(mid: bytes, begin: Begin, peer: Peer) -> AnyVM:
            return await self._open(session, mid, begin, peer)

        def pulling_vm(mid: bytes) -> AnyVM | None:
            vm = self._pulling_vm(mid)
            if vm is not None:
                session.pulling = mid
            return vm

        run: DestinationRun | None = None
        key, scope = session, trio.CancelScope()  # (the operator's abandon finds a migration's sessions by key)
        self._live[key] = (channel, scope)
        try:
            with scope:  # cancelled by recheck: the peer was refused before READY
                run = await serve_incoming(channel, self.store, self.signing, open_vm,
                                           self.limits.max_memory // PAGE_SIZE, self.limits.deadline_per_gib,
                                           self.runs, pulling_vm, lambda vm: self.registry.start_workload(
                                               cast(AnyVM, vm)))
        except (PalmError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if channel.result.purpose is Purpose.RECOVERY:
                log.warning("recovery session refused", peer=channel.peer_name, error=type(exc).__name__,
                            reason=str(exc)[:200])
        finally:
            # However it ended (an error, the agent's stop, a cancellation after the
            # commit), the durable row says what the session left: never a variable.
            del self._live[key]
            if session.pulling is not None:
                self._pulling.discard(session.pulling)
            try:
                outcome = self._settle(session, run)
            finally:
                self._settled.changed()  # (settled, or it failed to be: the abandon's wait goes on either way)
            release_free_memory()
            if channel.result.purpose is Purpose.MIGRATION:
                for fn in self.on_settled:
                    fn(outcome)

    @contextlib.asynccontextmanager
    async def without_sessions(self, mid: bytes) -> AsyncIterator[None]:
        """Ends the sessions of a migration (its own, a recovery one pulling into its VM), once
        each has ended and been settled enters the block, and no session pulls into its VM
        until the block is over (asked again): the operator's abandon (palm_net.agent.abandon)."""
        def of_mid(key: object) -> bool:
            return isinstance(key, Session) and mid in (key.mid, key.pulling)

        for key, (_, scope) in list(self._live.items()):
            if of_mid(key):
                scope.cancel()
        await self._settled.until(lambda: not any(of_mid(key) for key in self._live))
        self._pulling.add(mid)
        try:
            yield
        finally:
            self._pulling.discard(mid)

    def _pulling_vm(self, mid: bytes) -> AnyVM | None:
        """Post-copy's recovery: the VM of a PULLING migration, if it is here and no other
        session pulls into it now (taken until that session ends)."""
        row = self.store.get(mid)
        if row is None or row.state is not HandoffState.PULLING or mid in self._pulling or any(
                r.engine.mid == mid and r.engine.state not in FINAL for r in self.runs.values()):
            return None  # (its first session still live: this one is asked again once it ended)
        vm = self.registry.vms.get(row.vm)  # (activated, it records no migration: its identity says it is)
        if vm is None or vm.vm_id != row.vm_id:
            return None
        self._pulling.add(mid)
        return vm

    async def _data_session(self, channel: SecureChannel) -> None:
        """A DATA session (proto 7.8): its BIND names a migration in progress here whose
        main session has this peer's static key, and it becomes part of that migration
        (the engine checks the rest); else it is closed, and no migration is touched."""
        first, mid = None, None
        with trio.move_on_after(BIND_TIMEOUT):
            try:
                first = await channel.receive()
                mid = messages.decode(first.data).mid
            except (PalmError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        key = channel.result.peer.static_pub
        run = next((r for r in self.runs.values() if mid is not None and r.engine.mid == mid
                    and hmac.compare_digest(r.host.peer.static_pub, key)), None)
        if run is None or first is None:
            self._count("refused-data-session")
            self._log_refusal("data-session", f"peer {channel.peer_name!r}: a data session for no migration of "
                                              "its own here")
            return
        await run.attach(channel, first)

    def recheck(self) -> None:
        """The peers allowed changed: each session in flight with a peer now refused ends
        if its destination engine has not reached READY (it aborts forever and sends no
        READY); past READY the handoff rules decide."""
        for channel, scope in list(self._live.values()):
            refused = self.gate(channel.result.peer, channel.result.purpose)
            if refused is None:
                continue
            run = next((r for r in self.runs.values() if r.ch is channel), None)
            outcome = run.engine.outcome if run is not None else None
            if outcome is None:
                log.warning("incoming migration ended before READY: peer now refused", peer=channel.peer_name,
                            migration=run.engine.mid.hex() if run is not None and run.engine.mid else None,
                            error=refused.code.value, reason=refused.detail)
                self._count(f"ended-{refused.code}")
                scope.cancel()
            else:
                log.warning("peer now refused, but the migration is past READY: the handoff rules decide",
                            peer=channel.peer_name, outcome=outcome)

    # -- BEGIN: admission, the VM, the durable row; and the end of a session

    async def _open(self, session: Session, mid: bytes, begin: Begin, peer: Peer) -> AnyVM:
        """The agent's part of BEGIN, in this order (proto 7.1): the id, the
        limits (checked and taken at once), the name, the room, the VM, the row.
        A refusal leaves nothing behind: no row, no slot, no memory, no name."""
        if self.store.get(mid) is not None:
            raise MigrationFailure(ErrorCode.REPLAY, "migration id already used on this agent")
        if begin.backend == "qemu" and not self.accept_qemu:
            raise MigrationFailure(ErrorCode.BACKEND, "this agent does not accept QEMU VMs")
        size = begin.pages * PAGE_SIZE
        session.release = self.admission.admit(peer.static_pub, size)
        try:
            self.registry.reserve(begin.vm, begin.vm_id)
        except ValueError as exc:
            raise MigrationFailure(ErrorCode.MALFORMED, str(exc)) from None
        except AgentError as exc:
            raise MigrationFailure(ErrorCode.EXISTS, str(exc)) from None
        session.name = begin.vm
        free = os.statvfs(self.registry.memory_dir)
        if size > free.f_bavail * free.f_frsize:  # before any allocation; the reservation then makes sure
            raise MigrationFailure(ErrorCode.NO_SPACE, f"{size >> 20} MiB asked, "
                                                       f"{free.f_bavail * free.f_frsize >> 20} MiB free")
        try:
            vm = await trio.to_thread.run_sync(self.registry.make_incoming, begin.vm, begin.vm_id, mid, begin.pages,
                                               begin.vcpus, begin.backend, begin.spec)
        except HypervisorError as exc:
            raise MigrationFailure(ErrorCode.NO_SPACE if "no room" in str(exc) else ErrorCode.BACKEND,
                                   str(exc)) from None
        try:
            self.store.open_incoming(mid, begin.vm, begin.vm_id, peer)  # MigrationFailure(replay) if raced
        except BaseException:
            await trio.to_thread.run_sync(vm.scrub)
            raise
        session.vm, session.mid = vm, mid
        self.registry.add(vm)
        return vm

    def _settle(self, session: Session, run: DestinationRun | None) -> str:
        """After a session ends, whatever way, decided from its durable row: the VM is
        this agent's (committed: running, or kept and retried if activation failed),
        or nothing of it is left.  Returns the outcome: committed, aborted, refused."""
        try:
            vm, mid = session.vm, session.mid
            try:
                state = self.store.state_of(mid) if mid else None
            except STORAGE_ERRORS as exc:  # unknown: kept (never scrubbed unread), settled by the retry
                if vm is not None:
                    self.registry.activation_failed(vm, f"state database unreadable ({describe_error(exc)}): "
                                                        "settled when it reads again")
                return "unknown"
            if vm is not None and may_run(Role.DESTINATION, state):
                if vm.running:
                    self.registry.start_workload(vm)
                else:
                    self.registry.activation_failed(vm, (run.activation_error if run is not None else None)
                                                    or "the commit window ended before activation")
                return "committed"
            if vm is not None:
                # The runner scrubs on every way out; never leave memory behind (the row decides).
                try:
                    if not vm.dir.exists() or self.store.abort_forever(mid, vm, "session ended before COMMIT"):
                        self.registry.forget(vm)
                except STORAGE_ERRORS as exc:
                    # Not recorded aborted, so not scrubbed: never runnable (not committed),
                    # and the next start aborts and scrubs it from its row.
                    log.error("incoming VM kept until the agent's next start: its abort could not be recorded",
                              vm=vm.name, error=describe_error(exc))
                    self.registry.forget(vm)
            if session.name is not None and session.name not in self.registry.vms:
                self.registry.unreserve(session.name)
            return "aborted" if vm is not None else "refused"
        finally:
            if session.release is not None:  # a committed VM is simply ours now
                session.release()

    @property
    def committing(self) -> int:
        """Sessions inside their commit window (an agent asked to stop waits for them)."""
        return sum(1 for r in self.runs.values() if r.committing)
