"""Evacuating a drained host: the trio shell around palm_net.cluster.placement.DrainPlan.

The drained agent runs its own drain (it is the source of every migration):
the operator's ``palm cluster drain HOST`` only writes the request
``drain/HOST`` and follows ``drain-status/HOST``.  So a drain survives the
operator's command being interrupted, and an agent restarted in the middle
of one takes it up again (the status key remembers what moved).  Each
migration is an ordinary one (the handoff rules, recovery, policy), started
when the plan has room: at most ``max_source`` from this host, and one of
the cluster's ``max_cluster`` slots (``slots/I`` under this agent's lease;
a dead agent's slots free themselves).  Migrations that overrun the
completion timeout or make no progress are cancelled while that is still
possible (before the handoff point) and tried again elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Protocol

import structlog
import trio

from palm_net.cluster.etcd import EtcdClient
from palm_net.cluster.etcdwire import EtcdError
from palm_net.cluster.gate import Lists
from palm_net.cluster.host import ClusterHost
from palm_net.cluster.model import DrainRequest, DrainStatus, Keys, RecordError, Slot
from palm_net.cluster.placement import Candidate, DrainPlan
from palm_net.cluster.policy import PolicyError, PolicyStore, open_agent_record, verify

log = structlog.get_logger("palm.cluster")

TICK = 1.0  # seconds between looks at timeouts, slots and new destinations while a drain waits


class DrainSide(Protocol):
    """What a drain needs of the cluster member (palm_net.cluster.member)."""

    host: ClusterHost
    keys: Keys
    drain_request: DrainRequest | None
    drain_changed: trio.Event
    drain_status: dict[str, Any]
    policy: PolicyStore

    def good(self) -> None: ...

    def bad(self, exc: BaseException) -> None: ...

    async def take_slot(self, etcd: EtcdClient, max_cluster: int, value: bytes) -> bytes | None: ...

    async def give_slot(self, etcd: EtcdClient, key: bytes, value: bytes) -> None: ...


async def candidates(etcd: EtcdClient, keys: Keys, me: str, lists: Lists,
                     policy: PolicyStore) -> list[Candidate]:
    """Every other live agent as a destination, with what placement needs to know: only
    records signed by the agent they name (a forged or squatted one is skipped and counted)."""
    authority_pub = policy.authority_pub
    draining = set()
    now = time.time()
    for kv in (await etcd.range_prefix(keys.drains)).kvs:
        try:
            doc = verify(kv.value, authority_pub, keys.prefix, now)
            if doc.request is not None and kv.key == keys.drain(doc.subject):
                draining.add(doc.subject)
        except (RecordError, ValueError):
            continue  # not signed: it marks nobody
    allowed = lists.allowlist
    out = []
    for kv in (await etcd.range_prefix(keys.agents)).kvs:
        try:
            rec = open_agent_record(kv.value, authority_pub, now)
            if Keys.tail(keys.agents, kv.key) != rec.name:
                raise PolicyError("squatted", "agent record under another name")
        except RecordError as exc:
            log.warning("agent record skipped", error=str(exc))
            policy.count(f"record-{getattr(exc, 'reason', 'malformed')}")
            continue
        if rec.name == me:
            continue
        m = bytes.fromhex(rec.measurement)
        out.append(Candidate(rec.name, rec.addr, m, rec.free, "destination" in rec.roles, rec.accepting,
                             rec.name in draining, lists.is_revoked(rec.name, bytes.fromhex(rec.static_pub)),
                             allowed is None or m in allowed))
    return out


async def run_drains(side: DrainSide, etcd: EtcdClient) -> None:
    """Runs each drain request of this agent as it comes (one at a time)."""
    while True:
        req = side.drain_request
        if req is None or req.stop:
            await side.drain_changed.wait()
            continue
        try:
            ended = await Drain(side, etcd, req).run()
        except EtcdError as exc:
            side.bad(exc)
            ended = False
        if ended:  # until the request changes (a new id, stopped, or gone), this drain is over
            while side.drain_request == req:
                await side.drain_changed.wait()
        else:  # etcd failed under the drain: take it up again shortly
            with trio.move_on_after(TICK):
                await side.drain_changed.wait()


class Drain:
    def __init__(self, side: DrainSide, etcd: EtcdClient, req: DrainRequest) -> None:
        self.side = side
        self.etcd = etcd
        self.req = req
        self.host = side.host
        self.key = side.keys.drain_status(self.host.name)
        self.plan: DrainPlan | None = None
        self._wake = trio.Event()
        self._dirty = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def _previous(self) -> DrainStatus | None:
        kv = await self.etcd.get(self.key)
        if kv is None:
            return None
        try:
            return DrainStatus.decode(kv.value)
        except RecordError as exc:
            log.warning("previous drain status unreadable", error=str(exc))
            return None

    async def run(self) -> bool:
        """Runs the drain to its end (True), or raises EtcdError."""
        req, now = self.req, time.time()
        prev = await self._previous()
        if prev is not None and prev.id == req.id and prev.state != "running":
            self.side.drain_status = {"id": req.id, "state": prev.state, **prev.counts()}
            return True  # this drain has ended (an agent restarted after it): a new request starts another
        plan = self.plan = DrainPlan.resume(req.id, self.host.name, req.options, now, prev)
        log.info("drain started" if prev is None or prev.id != req.id else "drain resumed", drain=req.id,
                 host=self.host.name, max_cluster=req.options.max_cluster, max_source=req.options.max_source)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publisher)
            await self._loop(nursery)
            await self._publish(final=True)
            nursery.cancel_scope.cancel()
        counts = plan.status(time.time()).counts()
        log.info("drain ended", drain=req.id, state=plan.state(), **counts)
        return True

    async def _loop(self, nursery: trio.Nursery) -> None:
        plan = self.plan
        assert plan is not None
        opts = self.req.options
        while True:
            cur = self.side.drain_request
            if cur is None or cur.stop or cur.id != plan.id:
                plan.stopped = True
            here = self.host.movable()
            plan.refresh(here, self.host.departed())
            now = time.time()
            for name, why in plan.overdue(now):
                log.warning("drain migration overdue: cancelling it", vm=name, why=why)
                self.host.drain_cancel(name, why)
            room = opts.max_source - len(plan.flying)
            waiting = any(v.state in ("waiting", "unplaceable") for v in plan.vms.values())
            if room > 0 and waiting and not plan.stopped:
                try:
                    cands = await candidates(self.etcd, self.side.keys, self.host.name, self.host.lists,
                                            self.side.policy)
                    self.side.good()
                    for name, cand in plan.next(here, cands, room):
                        value = Slot(self.host.name, name, time.time()).encode()
                        slot = await self.side.take_slot(self.etcd, opts.max_cluster, value)
                        if slot is None:
                            plan.vms[name] = replace(plan.vms[name], error="waiting for a cluster slot")
                            break
                        plan.began(name, cand.name, time.time())
                        log.info("drain migration started", vm=name, to=cand.name, slot=slot.decode())
                        nursery.start_soon(self._migrate, name, cand, slot, value)
                except EtcdError as exc:
                    self.side.bad(exc)
            self._dirty.set()
            if plan.settled:
                return
            with trio.move_on_after(TICK):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _migrate(self, name: str, cand: Candidate, slot: bytes, value: bytes) -> None:
        plan = self.plan
        assert plan is not None
        try:
            out = await self.host.drain_migrate(name, cand.addr, lambda sent: plan.progress(name, sent, time.time()),
                                                self.req.options.bandwidth)
        finally:
            await self.side.give_slot(self.etcd, slot, value)
        plan.finished(name, out.ok, out.error, out.total_ms, out.downtime_ms)
        log.info("drain migration ended", vm=name, to=cand.name, ok=out.ok, error=out.error[:200] or None,
                 downtime_ms=out.downtime_ms)
        self.wake()

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            try:
                await self._publish()
            except EtcdError as exc:
                self.side.bad(exc)
            await trio.sleep(0.5)  # pacing: at most two status writes a second

    async def _publish(self, final: bool = False) -> None:
        plan = self.plan
        assert plan is not None
        now = time.time()
        status = plan.status(now, finished=now if final else 0.0)
        self.side.drain_status = {"id": status.id, "state": status.state, **status.counts()}
        if final:
            with trio.move_on_after(10) as cs:
                cs.shield = True
                for _ in range(5):  # the final word matters: retry a failing etcd a few times
                    try:
                        await self.etcd.put(self.key, status.encode())
                        return
                    except EtcdError as exc:
                        self.side.bad(exc)
                        await trio.sleep(1)
            return
        await self.etcd.put(self.key, status.encode())
