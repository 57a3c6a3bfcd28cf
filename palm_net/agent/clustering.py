"""The agent's side of the cluster: the peer gate, the etcd member, the metrics endpoint.

``AgentCluster`` is made with every agent (without ``--etcd`` its gate holds
the local allowlist and nothing is revoked: everything works as before) and
wires the agent's services to the cluster layer (palm_net.cluster):

- the gate: consulted after each handshake, incoming (IncomingService.gate)
  and outgoing (``check_outgoing``); when the lists change, the sessions and
  migrations in flight are checked again (before READY they end);
- the member (with ``--etcd``): the agent answers what it asks (its record,
  the handoff's facts about each VM, its VMs for a drain, migrations) and
  tells it when something changed (the registry's ``changed``);
- the metrics (with ``--metrics``): each migration's result, and the
  agent's state at each scrape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from palm_net.agent.errors import AgentError
from palm_net.agent.incoming import IncomingService
from palm_net.agent.outgoing import OutgoingService, channels_by_default, parse_hostport
from palm_net.agent.registry import VmRegistry
from palm_net.channel.handshake import ChannelConfig, PeerInfo, Purpose
from palm_net.channel.transport import SecureChannel
from palm_net.cluster.gate import Lists, PeerGate
from palm_net.crypto.identity import AgentIdentity, Certificate
from palm_net.errors import PalmError
from palm_net.hypervisor.backend import PAGE_SIZE
from palm_net.migration.handoff import HandoffState, HandoffStore
from palm_net.migration.orchestrate import IN_DOUBT, MigrationResult
from palm_net.migration.params import MigrationParams, MigrationStats
from palm_net.wire.protocol import Role

# The member and what it uses (etcd's client, h11, the records, placement) are
# imported where they are used: only an agent with --etcd runs them, and an
# agent without it is 1-2 MiB smaller (docs/DATAPATH.md, "Threads, hops and memory").
if TYPE_CHECKING:
    from palm_net.cluster.converge import Fact
    from palm_net.cluster.host import DrainOutcome
    from palm_net.cluster.member import ClusterMember
    from palm_net.cluster.metrics import AgentMetrics
    from palm_net.cluster.model import AgentRecord
    from palm_net.cluster.placement import Movable

log = structlog.get_logger("palm.agent")


def _version() -> str:
    from importlib import metadata  # only a cluster member says its version (1 MiB of imports)

    try:
        return metadata.version("palm-net")
    except metadata.PackageNotFoundError:
        return "unknown"


class ClusterAgent(Protocol):
    """What of the agent (palm_net.agent.agent.Agent, which imports this module) the glue uses."""

    cfg: Any  # its AgentConfig: etcd, etcd_prefix, advertise, listen, capacity, metrics, cluster_*
    identity: AgentIdentity
    certificate: Certificate
    measurement: bytes
    channel_config: ChannelConfig
    state_dir: Path
    listen_port: int
    registry: VmRegistry
    store: HandoffStore
    incoming: IncomingService
    outgoing: OutgoingService


class AgentCluster:
    def __init__(self, agent: ClusterAgent) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.gate = PeerGate(agent.channel_config.allowed_measurements)
        self.gate.on_change += [agent.incoming.recheck, lambda: agent.outgoing.recheck(self._refusal)]
        agent.incoming.gate = self.gate.check
        self.refused_out: dict[str, int] = {}  # outgoing migrations refused after the handshake, by reason
        self.member: ClusterMember | None = None
        self.metrics: AgentMetrics | None = None
        self.metrics_port = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self.started = time.time()
        if cfg.etcd is not None:
            from palm_net.cluster.etcdwire import EtcdError
            from palm_net.cluster.member import ClusterMember, MemberConfig
            from palm_net.cluster.model import Keys

            try:
                cfg.etcd.ssl_context()  # unreadable TLS files: refuse now, in one line, not retry forever
            except EtcdError as exc:
                raise AgentError(str(exc)) from None
            keys = Keys(cfg.etcd_prefix)
            # Each agent starts with another member (by its name): the load spreads over them.
            eps = cfg.etcd.endpoints
            k = int.from_bytes(hashlib.blake2b(self.name.encode(), digest_size=4).digest(), "big") % len(eps)
            etcd = dataclasses.replace(cfg.etcd, endpoints=eps[k:] + eps[:k])
            self.member = ClusterMember(MemberConfig(etcd, keys, agent.state_dir, agent.channel_config.authority_pub,
                                                     cfg.cluster_lease_ttl,
                                                     cfg.cluster_reconcile_every), self)
        if cfg.metrics is not None:
            try:
                from palm_net.cluster.metrics import AgentMetrics
            except ImportError:
                raise AgentError("--metrics needs the prometheus_client package "
                                 "(pip install 'palm-net[metrics]')") from None
            self.metrics = AgentMetrics(self._snapshot)
            agent.outgoing.on_result.append(self._source_ended)
            agent.incoming.on_settled.append(self.metrics.destination_ended)
        agent.registry.changed = self._changed
        agent.outgoing.self_refusal = self._self_revoked

    def _self_revoked(self) -> str | None:
        """A revoked agent is told so when it starts a migration: every peer closes its
        sessions without a record (proto/PROTOCOL.md 3.3), which it could not tell apart."""
        if not self.gate.lists.is_revoked(self.name, self.agent.identity.static.public):
            return None
        return (f"revoked: this agent ({self.name}) is revoked in the cluster, so every peer refuses it "
                f"(palm cluster unrevoke {self.name} lifts it)")

    # -- the gate

    def _refusal(self, peer: PeerInfo) -> PalmError | None:
        return self.gate.check(peer, Purpose.MIGRATION)

    async def check_outgoing(self, channel: SecureChannel) -> None:
        """After an outgoing MIGRATION handshake: a refused peer is closed, and the migration
        fails with the reason (nothing was sent)."""
        refused = self.gate.check(channel.result.peer, channel.result.purpose)
        if refused is None:
            return
        self.refused_out[refused.code.value] = self.refused_out.get(refused.code.value, 0) + 1
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await channel.aclose()
        raise refused

    @property
    def lists(self) -> Lists:
        return self.gate.lists

    def apply_lists(self, lists: Lists) -> None:
        """New lists from the cluster: the handshake's allowlist, then the gate (which re-checks
        what is in flight)."""
        a = self.agent
        allowlist = self.gate.local | (lists.allowlist or frozenset())
        if allowlist != a.channel_config.allowed_measurements:
            a.channel_config = dataclasses.replace(a.channel_config, allowed_measurements=allowlist)
            a.incoming.config = a.channel_config
        self.gate.update(lists)

    # -- the service

    async def start(self, nursery: trio.Nursery) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if self.metrics is not None:
            metrics = self.metrics
            try:
                self.metrics_port = await nursery.start(_serve_metrics, self.agent.cfg.metrics, metrics.render)
            except OSError as exc:
                raise AgentError(str(exc)) from None
            log.info("metrics served", listen=self.agent.cfg.metrics, port=self.metrics_port)
        if self.member is not None:
            self.advertise()  # a bad --advertise fails now, not in the background
            await nursery.start(self._run_member)

    async def _run_member(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The member never takes the agent down: a bug in it is logged and it starts again."""
        assert self.member is not None
        first = True
        while True:
            try:
                if first:
                    first = False
                    await self.member.run(task_status=task_status)
                else:
                    await self.member.run()
            except Exception:
                log.exception("cluster member failed; starting it again in 5 s")
                if first:
                    task_status.started()
            await trio.sleep(5)

    def _changed(self) -> None:
        """From any thread (the registry's pause, resume and destroy run in worker threads)."""
        if self.member is not None and self._token is not None:
            self._token.run_sync_soon(self.member.poke)

    def status(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self.member is not None:
            out.update(self.member.status())
        elif self.gate.lists.revision:
            out["lists"] = {"revision": self.gate.lists.revision}
        if self.metrics is not None:
            out["metrics_port"] = self.metrics_port
        if self.refused_out:
            out["refused_outgoing"] = dict(self.refused_out)
        return out or None

    async def destinations(self, vm_name: str) -> dict[str, Any]:
        """`palm migrate VM --to NAME|auto`: the other live agents whose records are signed by
        the agent they name (verified against the authority, as a drain reads them), with
        where each one stands for this VM, and where a drain would place it."""
        m = self.member
        if m is None:
            return {"cluster": False, "self": self.name}
        from palm_net.cluster.drainer import candidates
        from palm_net.cluster.etcd import EtcdClient
        from palm_net.cluster.etcdwire import EtcdError
        from palm_net.cluster.placement import place, why_not

        vm = next((v for v in self.movable() if v.name == vm_name), None)
        if vm is None:
            self.agent.registry.get(vm_name)  # unknown: says so; known but arriving: not movable yet
            raise AgentError(f"VM {vm_name!r} is arriving here: it cannot migrate until it runs")
        try:
            with trio.fail_after(10):
                async with EtcdClient(m.cfg.etcd) as etcd:
                    cands = await candidates(etcd, m.cfg.keys, self.name, self.lists, m.policy)
        except (EtcdError, trio.TooSlowError) as exc:
            raise AgentError(f"cannot read the cluster's agents from etcd: {exc or 'no answer in 10 s'}") from None
        agents = [{"name": c.name, "addr": c.addr, "why_not": why_not(vm, c, 0)}
                  for c in sorted(cands, key=lambda c: c.name)]
        out: dict[str, Any] = {"cluster": True, "self": self.name, "agents": agents}
        where = place(vm, cands, {})
        if isinstance(where, str):
            out["auto_error"] = where
        else:
            out["auto"] = {"name": where.name, "addr": where.addr}
        return out

    # -- what the member asks (palm_net.cluster.host.ClusterHost)

    @property
    def name(self) -> str:
        return self.agent.identity.name

    def _memory(self) -> tuple[int, int]:
        a = self.agent
        st = os.statvfs(a.registry.memory_dir)
        fs_total, fs_free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        used = sum(vm.info.npages * PAGE_SIZE for vm in a.registry) + a.incoming.admission.memory
        capacity = a.cfg.capacity if a.cfg.capacity is not None else fs_total
        return capacity, max(0, min(capacity - used, fs_free))

    def seal(self, body: bytes, kind: str = "agent") -> bytes:
        from palm_net.cluster.policy import seal_record

        return seal_record(body, self.agent.identity.signing, self.agent.certificate, kind)

    def advertise(self) -> AgentRecord:
        from palm_net.cluster.model import AgentRecord, Outgoing

        a = self.agent
        addr = a.cfg.advertise or a.cfg.listen
        try:
            host, port = parse_hostport(addr)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if host in ("0.0.0.0", "::", "") and not a.cfg.advertise:  # noqa: S104 - checking, not binding
            raise AgentError(f"--listen {a.cfg.listen} names no address other agents can reach: "
                             "give --advertise HOST:PORT")
        if port == 0:
            port = a.listen_port
        host = f"[{host}]" if ":" in host else host
        capacity, free = self._memory()
        migrating = tuple(Outgoing(lm.mid.hex(), lm.vm, lm.peer_info.name if lm.peer_info else lm.peer[:64],
                                   lm.stats.phase[:32], lm.started)
                          for lm in list(a.outgoing.live.values()) if lm.result is None)[:64]
        return AgentRecord(self.name, f"{host}:{port}", a.measurement.hex(), a.identity.static.public.hex(),
                           tuple(r for r in a.certificate.roles if r in ("source", "destination")), capacity, free,
                           len(a.registry), _version(), self.started, accepting=a.incoming.accepting,
                           in_doubt=len(a.outgoing.in_doubt()), migrating=migrating)

    def vm_facts(self) -> dict[str, Fact]:
        from palm_net.cluster.converge import Fact, FactKind
        from palm_net.cluster.model import VM_STATES, VmRecord

        a = self.agent
        store = a.store
        # Settled migrations, newest first: where a VM that left went (DONE), and which
        # migration put a VM here (COMMITTED; an activated VM no longer records it).
        settled = store.list(states=(HandoffState.DONE, HandoffState.COMMITTED), limit=2000)
        placed: dict[bytes, tuple[str, str]] = {}  # vm_id -> (migration id, the agent it came from)
        for done in settled:
            if done.role is Role.DESTINATION:
                placed.setdefault(done.vm_id, (done.mid.hex(), done.peer.name))
        facts: dict[str, Fact] = {}
        for vm in a.registry:
            vid = vm.info.vm_id.hex()
            mid = vm.migration
            row = store.get(mid) if mid else None
            if vm.state == "incoming":
                facts[vid] = Fact(FactKind.ARRIVING, vid)
                continue
            if row is not None and row.role is Role.SOURCE and row.state in IN_DOUBT:
                facts[vid] = Fact(FactKind.IN_DOUBT, vid)
                continue
            state = vm.state if vm.state in VM_STATES else "unknown"
            by, came_from = placed.get(vm.info.vm_id, ("", ""))
            facts[vid] = Fact(FactKind.HOSTS, vid, VmRecord(vid, vm.name, self.name, by, vm.info.npages * PAGE_SIZE,
                                                            vm.backend, vm.policy, state), came_from=came_from)
        # VMs no longer here: the newest settled migration of each says where it went
        # (DONE: to its destination), or that it came here and left otherwise (destroyed).
        seen = set(facts)
        for row in settled:
            vid = row.vm_id.hex()
            if vid in seen or not row.vm_id:
                continue
            seen.add(vid)
            if row.role is Role.SOURCE:
                facts[vid] = Fact(FactKind.GONE_TO, vid, to=row.peer.name, migration=row.mid.hex())
        return facts

    def movable(self) -> list[Movable]:
        from palm_net.cluster.placement import Movable

        a = self.agent
        out = []
        for vm in a.registry:
            if vm.state == "incoming":
                continue
            mid = vm.migration
            row = a.store.get(mid) if mid else None
            in_doubt = row is not None and row.role is Role.SOURCE and row.state in IN_DOUBT
            out.append(Movable(vm.name, vm.info.npages * PAGE_SIZE, vm.policy, vm.running, in_doubt,
                               a.outgoing.migrating(vm.name)))
        return out

    def departed(self) -> dict[str, str]:
        a = self.agent
        out: dict[str, str] = {}
        for row in a.store.list(role=Role.SOURCE, states=(HandoffState.DONE,), limit=1000):  # newest first
            if row.vm not in a.registry.vms:
                out.setdefault(row.vm, row.peer.name)
        return out

    async def drain_migrate(self, name: str, addr: str, on_sent: Callable[[int], None],
                            bandwidth: int = 0) -> DrainOutcome:
        from palm_net.cluster.host import DrainOutcome

        def progress(stats: MigrationStats) -> None:
            on_sent(stats.transferred)

        vm = self.agent.registry.vms.get(name)  # (gone: migrate says so)
        params = MigrationParams(bandwidth=float(bandwidth) if bandwidth else None,
                                 channels=await channels_by_default(vm) if vm is not None else 1)
        try:
            r = await self.agent.outgoing.migrate(name, addr, params, None, progress)
        except (AgentError, PalmError, ValueError) as exc:
            return DrainOutcome(False, str(exc))
        d = r.as_dict()
        return DrainOutcome(r.ok, r.error or "", float(d["total_ms"]), float(d["downtime_ms"] or 0.0))

    def drain_cancel(self, name: str, why: str) -> None:
        for lm in list(self.agent.outgoing.live.values()):
            if lm.vm == name and lm.result is None:
                self.agent.outgoing.cancel_before_handoff(lm, why)

    # -- metrics

    def _source_ended(self, r: MigrationResult) -> None:
        if self.metrics is not None:
            st = r.stats
            self.metrics.source_ended(r.status, st.total_time, st.downtime, st.transferred)

    def _snapshot(self) -> Any:
        from palm_net.cluster.metrics import Snapshot

        a = self.agent
        refused: dict[tuple[str, str], int] = {}
        for k, n in a.incoming.counters.items():
            if k.startswith("refused-"):
                refused[("incoming", k.removeprefix("refused-"))] = n
        for k, n in self.refused_out.items():
            refused[("outgoing", k)] = n
        s = Snapshot(vms=len(a.registry), incoming=len(a.incoming.runs),
                     outgoing=sum(1 for lm in a.outgoing.live.values() if lm.result is None),
                     in_doubt=len(a.outgoing.in_doubt()), refused=refused,
                     committed_not_running=len(a.registry.not_running))
        m = self.member
        if m is not None:
            st = m.status()
            s.etcd = 1 if m.reachable else 0
            s.etcd_unreachable_seconds = float(st.get("unreachable_for_s", 0.0))
            s.lists_revision = m.lists.revision
            s.record_conflicts = len(m.converger.conflicts)
            s.policy_refused = dict(m.policy.refused)
        return s


async def _serve_metrics(listen: str | None, render: Callable[[], bytes],
                         task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    from palm_net.cluster.metrics import serve_metrics

    assert listen is not None
    await serve_metrics(listen, render, task_status=task_status)
