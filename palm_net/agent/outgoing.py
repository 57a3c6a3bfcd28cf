"""The outgoing service: the operator's migrations, cancels, resolutions, and in-doubt recovery.

A migration out runs under the handoff rules (palm_net.migration.orchestrate):
before the handoff point any failure or cancel runs the VM here again;
after it the VM stays paused until the destination's word, which a
recovery task keeps asking for (with back-off, also after a restart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from palm_net.agent.client import CANCELLED
from palm_net.agent.errors import AgentError
from palm_net.agent.limits import release_free_memory
from palm_net.agent.registry import VmRegistry
from palm_net.channel.handshake import PeerInfo, Purpose
from palm_net.channel.transport import SecureChannel
from palm_net.crypto.noise import CipherName
from palm_net.errors import PalmError
from palm_net.hypervisor.vms import AnyVM
from palm_net.migration.handoff import STORAGE_ERRORS, HandoffState, HandoffStore, may_run, may_scrub
from palm_net.migration.orchestrate import IN_DOUBT, MigrationResult, migrate_out, override_resume, recover_once
from palm_net.migration.params import MigrationParams, MigrationStats, default_channels
from palm_net.migration.runner import Stop
from palm_net.trioutil import Changes
from palm_net.wire.protocol import Role

log = structlog.get_logger("palm.agent")

ConnectFn = Callable[[str, bool, CipherName | None, Purpose], Awaitable[SecureChannel]]  # MIGRATION or DATA
RecoveryFn = Callable[[str], Awaitable[SecureChannel]]  # address -> a RECOVERY session
KEEP_FINISHED = 50  # finished migrations kept for `palm migrations`
ABANDONED = "abandoned by the operator (palm migrate --resolve ID --abandon): the VM is lost"


def parse_hostport(text: str) -> tuple[str, int]:
    if "/" in text:  # a URL (http://host:7400/): the agents speak palm, not HTTP
        raise ValueError(f"bad address {text!r}: use HOST:PORT (no scheme, no path)")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r}: use HOST:PORT")
    return host.strip("[]"), int(port)


async def channels_by_default(vm: AnyVM) -> int:
    """The channels a migration of ``vm`` takes when none are named: the host's default,
    at least what its hypervisor migrates on best (a QEMU's asks its binary: off the
    event loop)."""
    return default_channels(await trio.to_thread.run_sync(lambda: vm.channels_wanted))


@dataclass
class LiveMigration:
    mid: bytes
    vm: str
    peer: str
    stats: MigrationStats
    started: float
    cancel: trio.CancelScope
    result: MigrationResult | None = None
    peer_info: PeerInfo | None = None  # the attested destination, once the handshake named it
    cancel_reason: str | None = None  # None: the operator's (CANCELLED)
    stop: Stop = field(init=False)  # the operator's cancel, taken where the destination can be told

    def __post_init__(self) -> None:
        self.stop = Stop(self.cancel)


class OutgoingService:
    def __init__(self, store: HandoffStore, registry: VmRegistry, connect: ConnectFn, connect_recovery: RecoveryFn,
                 in_doubt_wait: Callable[[], float]) -> None:
        self.store = store
        self.registry = registry
        self.connect = connect
        self.connect_recovery = connect_recovery
        self.in_doubt_wait = in_doubt_wait  # read at each migration (the setting may change)
        self.live: dict[bytes, LiveMigration] = {}
        self.nursery: trio.Nursery | None = None  # where recovery tasks run (set by the agent's serve)
        self.on_result: list[Callable[[MigrationResult], None]] = []  # told of each migration's result
        self._recovering: set[bytes] = set()  # in-doubt migrations a recovery task asks about
        # What may read a migration's copy now besides migrate_out (its recovery task, a --resolve):
        # the operator's abandon ends them before the copy is scrubbed (palm_net.agent.abandon).
        self._readers: dict[bytes, set[trio.CancelScope]] = {}
        self._ended = Changes()  # a migration's result, or a reader of its copy, ended (end_readers waits on it)
        # Why this agent itself may start no migration now (the cluster revoked it), or None.
        self.self_refusal: Callable[[], str | None] = lambda: None

    def migrating(self, name: str) -> bool:
        return any(lm.vm == name and lm.result is None for lm in self.live.values())

    def check(self, name: str, to: str, params: MigrationParams) -> AnyVM:
        """The VM to migrate, or AgentError (one line) if the request is refused."""
        vm = self.registry.operable(name)  # not while migrating, arriving or in doubt
        try:
            parse_hostport(to)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if not vm.running:
            raise AgentError(f"VM {name!r} is {vm.state}: only a running VM migrates (palm vm resume {name})")
        why = self.self_refusal()
        if why:
            raise AgentError(why)
        if vm.backend == "qemu" and params.postcopy:
            raise AgentError("post-copy is for model VMs: QEMU's own postcopy-ram is not carried (proto 7.9)")
        if params.postcopy and not getattr(vm, "postcopy_allowed", True):
            raise AgentError(f"VM {name!r} was created with --no-postcopy: it migrates by pre-copy only")
        if vm.backend == "qemu" and params.downtime_policy != "pause":
            raise AgentError("a QEMU guest converges by QEMU's own rule (it iterates until the expected downtime "
                             "fits; --auto-converge throttles): --downtime-policy is for model VMs")
        return vm

    async def migrate(self, name: str, to: str, params: MigrationParams, cipher: CipherName | None = None,
                      on_progress: Callable[[MigrationStats], None] | None = None,
                      mid: bytes | None = None) -> MigrationResult:
        """Migrates a VM out; AgentError for a request refused before anything starts."""
        vm = self.check(name, to, params)

        mid = mid or os.urandom(16)
        lm = LiveMigration(mid, name, to, MigrationStats(), time.time(), trio.CancelScope())

        async def connect(addr: str) -> SecureChannel:
            channel = await self.connect(addr, params.plain, cipher, Purpose.MIGRATION)
            lm.peer_info = channel.result.peer
            return channel

        async def connect_data(addr: str) -> SecureChannel:
            return await self.connect(addr, params.plain, cipher, Purpose.DATA)

        def progress(stats: MigrationStats) -> None:
            lm.stats = stats
            if on_progress:
                on_progress(stats)

        self.live[mid] = lm
        result: MigrationResult | None = None
        try:
            with lm.cancel:
                result = await migrate_out(vm, self.store, to, params, connect, self.connect_recovery, progress,
                                           self.in_doubt_wait(), mid=mid, spec=vm.migration_spec(), stop=lm.stop,
                                           connect_data=connect_data)
        except BaseException:
            del self.live[mid]  # refused on the way (e.g. the destination is this agent): not a migration
            self._ended.changed()
            self._after(vm, mid)  # or it ended some other way: its row says what is left to do
            raise
        handed_off = self._state(mid) in IN_DOUBT
        if self._state(mid) is HandoffState.ABANDONED:  # the operator's abandon ended it (proto 7.9 item 7)
            result = MigrationResult(False, mid, name, "failed", lm.stats, ABANDONED, lm.stats.phase,
                                     "none (abandoned: the VM is lost)", lm.peer_info.name if lm.peer_info else to)
        elif result is None and handed_off:  # a cancel that came too late: the handoff rules decide
            result = MigrationResult(False, mid, name, "in-doubt", lm.stats, "cancelled after the handoff point: "
                                     "outcome unknown, VM paused until the destination answers", "in-doubt",
                                     "none (paused, in doubt)", lm.peer_info.name if lm.peer_info else to)
        elif result is None:  # cancelled by the operator before the handoff: the VM runs here
            why = CANCELLED if lm.cancel_reason is None else f"cancelled: {lm.cancel_reason}"
            result = MigrationResult(False, mid, name, "cancelled", lm.stats, why,
                                     lm.stats.phase, "source" if vm.running else "none (paused, in doubt)")
        elif lm.stop.requested and not result.ok and self._state(mid) is HandoffState.ABORTED:
            # The operator's cancel, taken at a safe point (the destination told): the row says aborted.
            result = dataclasses.replace(result, status="cancelled", error=CANCELLED)
        lm.result = result
        self._ended.changed()
        if not result.ok and self.store.get(mid) is None:  # failed before BEGIN: no row, so say it here
            log.warning("migration failed before it began", migration=mid.hex(), vm=name, peer=to,
                        phase=result.phase, error=result.error)
        self._after(vm, mid)
        self._trim()
        release_free_memory()
        for fn in self.on_result:
            fn(result)
        return result

    def _state(self, mid: bytes) -> HandoffState | None:
        try:
            return self.store.state_of(mid)
        except STORAGE_ERRORS:
            return None

    def _after(self, vm: AnyVM | None, mid: bytes) -> None:
        """However a migration out ended (a result, an error, a cancel that came too
        late), from its row: settled here, and asked about until answered if handed off."""
        try:
            self._settle(vm, mid)
        except STORAGE_ERRORS as exc:
            log.error("migration not settled: the state database failed", migration=mid.hex(), error=str(exc))
        if self._state(mid) in IN_DOUBT and self.nursery is not None and mid not in self._recovering:
            self.nursery.start_soon(self.recover, mid)

    def _settle(self, vm: AnyVM | None, mid: bytes) -> None:
        """After a migration's outcome is known, from its durable row: the VM was handed
        over (DONE: forgotten here; a copy whose scrub failed goes at the next start),
        or it runs here again."""
        if vm is None or self.store.state_of(mid) is HandoffState.ABANDONED:  # (the abandon scrubs it)
            return
        if may_scrub(Role.SOURCE, self.store.state_of(mid)):
            if vm.dir.exists():  # its scrub failed: it never runs here again, and is retried
                self.registry.scrub_failed(vm, mid)
            else:
                self.registry.forget(vm)
        elif vm.running:
            self.registry.start_workload(vm)
        elif may_run(Role.SOURCE, self.store.state_of(mid)):  # ours (aborted, or never handed off): resume failed
            self.registry.activation_failed(vm, "did not resume after the migration ended (see the log)")

    def _trim(self) -> None:
        done = [m for m, lm in self.live.items() if lm.result is not None]
        for m in done[:-KEEP_FINISHED]:
            del self.live[m]

    def cancel(self, mid_hex: str) -> str:
        for lm in list(self.live.values()):
            if lm.mid.hex() == mid_hex and lm.result is None:
                row = self.store.get(lm.mid)
                if row is not None and row.state is not HandoffState.SENDING:
                    raise AgentError("migration is past the handoff point; it cannot be cancelled")
                if not lm.stop.request():
                    raise AgentError("migration is past the handoff point; it cannot be cancelled")
                return "cancelling"
        raise AgentError(f"no migration in flight with id {mid_hex}")

    def cancel_before_handoff(self, lm: LiveMigration, reason: str) -> bool:
        """Cancels a migration in flight if it has not reached the handoff point (it then
        resumes here); False if it has (the handoff rules decide)."""
        row = self.store.get(lm.mid)
        if lm.result is not None or (row is not None and row.state is not HandoffState.SENDING):
            return False
        lm.cancel_reason = reason
        lm.cancel.cancel()
        return True

    def recheck(self, refusal: Callable[[PeerInfo], PalmError | None]) -> None:
        """The peers allowed changed: a migration in flight to one now refused ends before
        the handoff point (it never hands off); past it, the handoff rules decide."""
        for lm in list(self.live.values()):
            if lm.result is not None or lm.peer_info is None:
                continue
            err = refusal(lm.peer_info)
            if err is None:
                continue
            if self.cancel_before_handoff(lm, err.detail):
                log.warning("migration cancelled before the handoff: peer now refused", migration=lm.mid.hex(),
                            vm=lm.vm, peer=lm.peer_info.name, phase=lm.stats.phase, error=err.code.value)
            else:
                log.warning("peer now refused, but the migration is past the handoff point: the handoff rules "
                            "decide", migration=lm.mid.hex(), vm=lm.vm, peer=lm.peer_info.name)

    def in_doubt(self) -> list[bytes]:
        return [r.mid for r in self.store.list(role=Role.SOURCE, states=IN_DOUBT)]

    async def recover(self, mid: bytes) -> None:
        """Asks the destination until an in-doubt migration is settled (back-off up to 10 s)."""
        if mid in self._recovering:
            return
        self._recovering.add(mid)
        try:
            with self._reading(mid):
                await self._recover(mid)
        finally:
            self._recovering.discard(mid)

    @contextlib.contextmanager
    def _reading(self, mid: bytes) -> Iterator[trio.CancelScope]:
        """A task that may serve this migration's pages from its copy: the operator's abandon
        cancels it, and waits for its end, before the copy is scrubbed (``end_readers``)."""
        scope = trio.CancelScope()
        readers = self._readers.setdefault(mid, set())
        readers.add(scope)
        try:
            with scope:
                yield scope
        finally:
            readers.discard(scope)
            if not readers:
                self._readers.pop(mid, None)
            self._ended.changed()

    async def end_readers(self, mid: bytes) -> None:
        """Ends whatever may read this migration's copy (migrate_out's session, its recovery, a
        --resolve) and returns once each has ended: no page is read from a copy being scrubbed.
        The caller made the row final first (nothing starts serving it again)."""
        lm = self.live.get(mid)
        running = lm if lm is not None and lm.result is None else None
        if running is not None:
            running.cancel.cancel()
        for scope in self._readers.get(mid, ()):
            scope.cancel()
        await self._ended.until(lambda: not self._readers.get(mid) and (
            running is None or running.result is not None or self.live.get(mid) is not running))

    async def _recover(self, mid: bytes) -> None:
        delay = 0.5
        while True:
            try:
                row = self.store.get(mid)
                if row is None or row.state not in IN_DOUBT:
                    if row is not None:  # settled meanwhile (a resolution, or an attempt that failed late)
                        self._settle(self.registry.of(row), mid)
                    return
                vm = self.registry.of(row)
                outcome = await recover_once(self.store, mid, vm, self.connect_recovery)
                if outcome is not None:
                    self._settle(vm, mid)
                    return
            except Exception:  # a storage error, a failed scrub: asked again (the row decides each time)
                log.exception("recovery attempt failed", migration=mid.hex(), phase="in-doubt")
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def resolve(self, mid_hex: str, override: bool, reason: str) -> str:
        try:
            mid = bytes.fromhex(mid_hex)
        except ValueError:
            raise AgentError(f"bad migration id {mid_hex!r}") from None
        row = self.store.get(mid)
        if row is None or row.role is not Role.SOURCE or row.state not in IN_DOUBT:
            raise AgentError(f"no in-doubt migration with id {mid_hex}")
        vm = self.registry.of(row)
        if override and row.state is HandoffState.SERVING:
            raise AgentError(f"migration {mid_hex} is post-copy: the VM runs on {row.peer.name} and still needs "
                             "pages only this copy holds; no override resumes it here (without --override, "
                             "palm asks the destination now and serves them)")
        if override:
            if vm is None:
                raise AgentError(f"the VM of migration {mid_hex} is no longer here: nothing to resume")
            override_resume(self.store, mid, vm, reason or "operator override")
            self.registry.start_workload(vm)
            return "resumed (override)"
        outcome = None
        with self._reading(mid) as scope:
            outcome = await recover_once(self.store, mid, vm, self.connect_recovery)
        if scope.cancelled_caught:
            return "abandoned by the operator meanwhile"
        if outcome is None:
            return "still in doubt: destination not reachable"
        self._settle(vm, mid)
        return outcome

    def migrations(self) -> list[dict[str, Any]]:
        """Recent migrations, newest first: the durable rows, and migrations out that
        failed before BEGIN (kept in memory only: they never had a row)."""
        now = time.time()
        out = []
        rows = self.store.list(limit=50)
        for row in rows:
            lm = self.live.get(row.mid)
            stats = lm.stats.as_dict() if lm is not None else row.stats
            in_flight = lm is not None and lm.result is None
            vm = self.registry.of(row)
            not_running = self.registry.not_running.get(vm.name) if vm is not None else None
            out.append({"migration_id": row.mid.hex(), "role": row.role.value, "vm": row.vm, "peer": row.peer.name,
                        "state": row.state.value, "in_flight": in_flight,
                        "not_running": not_running,  # ours by this row, but its activation or resume failed
                        "error": row.error, "started": row.created, "updated": row.updated, "stats": stats,
                        **_figures(stats, (now if in_flight else row.updated) - row.created, in_flight)})
        known = {row.mid for row in rows}
        for lm in self.live.values():
            if lm.mid in known or lm.result is None:
                continue
            res = lm.result
            stats = res.stats.as_dict()
            out.append({"migration_id": lm.mid.hex(), "role": "source", "vm": lm.vm, "peer": res.peer or lm.peer,
                        "state": res.status, "in_flight": False, "error": res.error,
                        "started": lm.started, "updated": lm.started + res.stats.total_time, "stats": stats,
                        **_figures(stats, res.stats.total_time, False)})
        out.sort(key=lambda m: -float(m["started"]))
        return out[:50]


def _figures(stats: dict[str, Any] | None, elapsed: float, in_flight: bool) -> dict[str, Any]:
    """A migrations row's figures with the keys and units of a migration result (ms, bytes)."""
    st = stats or {}
    down = st.get("downtime")
    ms = round(max(0.0, elapsed) * 1000, 1)
    return {"elapsed_ms": ms, "total_ms": None if in_flight else ms,
            "downtime_ms": round(down * 1000, 1) if down is not None else None,
            "bytes": st.get("transferred"),
            "remaining_pages": st.get("remaining") if st.get("phase") in ("round", "stop-and-copy") else None}
