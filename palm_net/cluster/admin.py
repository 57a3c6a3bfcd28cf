"""The operator's side of the cluster (``palm cluster ...``): read it, revoke, allow, drain.

Everything goes through etcd: the operator needs etcd's endpoints (and its
credentials), not the agents' control sockets.  A revocation or an allowlist
change is one write; the command then waits until every live agent has
acknowledged it (``lists_revision`` in its record, written once it enforces
the change) and reports how long that took.  A drain is a request the
drained agent carries out itself; the command follows its status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from palm_net.cluster.etcd import EtcdClient
from palm_net.cluster.etcdwire import Compare, Delete, EtcdError, Put
from palm_net.cluster.model import (
    AgentRecord,
    Allowlist,
    DrainOptions,
    DrainRequest,
    DrainStatus,
    Keys,
    RecordError,
    Revocation,
    Slot,
    VmRecord,
)
from palm_net.crypto.identity import validate_name


class AdminError(Exception):
    """The operation was refused (one line)."""


@dataclass
class ClusterView:
    revision: int
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    vms: dict[str, VmRecord] = field(default_factory=dict)
    revoked: dict[str, Revocation | None] = field(default_factory=dict)
    allowlist: Allowlist | None = None
    drains: dict[str, DrainRequest] = field(default_factory=dict)
    drain_status: dict[str, DrainStatus] = field(default_factory=dict)
    slots: dict[str, Slot] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # values that are not valid records
    config_revision: int = 0  # the newest write under config/ still there (a deletion leaves no trace)


async def read_cluster(etcd: EtcdClient, keys: Keys) -> ClusterView:
    """Everything under the prefix, at one revision."""
    snap = await etcd.range_prefix(keys.prefix.encode())
    view = ClusterView(snap.revision)
    for kv in snap.kvs:
        k, v = kv.key, kv.value
        if k.startswith(keys.config):
            view.config_revision = max(view.config_revision, kv.mod_revision)
        try:
            if k.startswith(keys.agents):
                rec = AgentRecord.decode(v)
                if Keys.tail(keys.agents, k) != rec.name:
                    raise RecordError("agent record under another name")
                view.agents[rec.name] = rec
            elif k.startswith(keys.vms):
                vm = VmRecord.decode(v)
                if k != keys.vm(vm.vm_id):
                    raise RecordError("VM record under another VM's key")
                view.vms[vm.vm_id] = vm
            elif k.startswith(keys.revoked):
                name = Keys.tail(keys.revoked, k)
                try:
                    view.revoked[name] = Revocation.decode(v)
                except RecordError:
                    view.revoked[name] = None  # revoked all the same
            elif k == keys.allowlist:
                view.allowlist = Allowlist.decode(v)
            elif k.startswith(keys.drain_statuses):
                st = DrainStatus.decode(v)
                view.drain_status[Keys.tail(keys.drain_statuses, k)] = st
            elif k.startswith(keys.drains):
                view.drains[Keys.tail(keys.drains, k)] = DrainRequest.decode(v)
            elif k.startswith(keys.slots):
                view.slots[k[len(keys.slots):].decode(errors="replace")[:8]] = Slot.decode(v)
        except RecordError as exc:
            view.problems.append(f"{k[:120].decode(errors='replace')}: {exc}")
    return view


def status_dict(view: ClusterView) -> dict[str, Any]:
    """What `palm cluster status --json` prints."""
    agents = []
    for name, a in sorted(view.agents.items()):
        health = "revoked" if name in view.revoked else "draining" if name in view.drains else "ok"
        if a.in_doubt:
            health += f", {a.in_doubt} in doubt"
        if a.conflicts:
            health += f", {a.conflicts} record conflicts"
        if not a.accepting:
            health += ", not accepting"
        agents.append({"name": name, "addr": a.addr, "health": health, "alive": True, "vms": a.vms,
                       "free": a.free, "capacity": a.capacity, "measurement": a.measurement, "roles": list(a.roles),
                       "version": a.version, "lists_revision": a.lists_revision,
                       "lists_behind": a.lists_revision < view.config_revision, "started": a.started})
    for name in sorted(set(view.revoked) - set(view.agents)):
        agents.append({"name": name, "health": "revoked", "alive": False})
    vms = []
    for vm in sorted(view.vms.values(), key=lambda v: (v.name, v.vm_id)):
        vms.append({"name": vm.name, "vm_id": vm.vm_id, "agent": vm.agent, "agent_alive": vm.agent in view.agents,
                    "state": vm.state, "memory": vm.memory, "backend": vm.backend, "policy": vm.policy,
                    "migration": vm.migration})
    flying = [{"migration_id": m.mid, "vm": m.vm, "from": a.name, "to": m.to, "phase": m.phase,
               "seconds": round(time.time() - m.started, 1)}
              for a in view.agents.values() for m in a.migrating]
    drains = []
    for host, req in sorted(view.drains.items()):
        st = view.drain_status.get(host)
        drains.append({"host": host, "id": req.id, "stopped": req.stop,
                       "state": st.state if st is not None and st.id == req.id else "requested",
                       **(st.counts() if st is not None and st.id == req.id else {})})
    return {"revision": view.revision, "agents": agents, "vms": vms, "migrations": flying, "drains": drains,
            "revoked": sorted(view.revoked),
            "allowlist": None if view.allowlist is None else list(view.allowlist.measurements),
            "slots": {k: {"agent": s.agent, "vm": s.vm} for k, s in sorted(view.slots.items())},
            "problems": view.problems}


# --------------------------------------------------------------- the lists


@dataclass
class Acks:
    revision: int
    seconds: dict[str, float]  # agent -> when its acknowledgement was seen, from the write
    missing: list[str]  # live agents that did not acknowledge in time
    gone: list[str]  # agents that left the cluster while we waited


async def wait_acks(etcd: EtcdClient, keys: Keys, revision: int, t0: float, timeout: float) -> Acks:
    """Until every live agent's record says it enforces lists of ``revision`` or later."""
    snap = await etcd.range_prefix(keys.agents)
    pending: set[str] = set()
    acks = Acks(revision, {}, [], [])
    for kv in snap.kvs:
        try:
            rec = AgentRecord.decode(kv.value)
        except RecordError:
            continue
        if rec.lists_revision >= revision:
            acks.seconds[rec.name] = time.monotonic() - t0
        else:
            pending.add(rec.name)
    if pending:
        with trio.move_on_after(timeout):
            async with etcd.watch(keys.agents, start_revision=snap.revision + 1) as watch:
                async for batch in watch:
                    for ev in batch.events:
                        try:
                            name = Keys.tail(keys.agents, ev.kv.key)
                        except RecordError:
                            continue
                        if ev.type == "delete":
                            if name in pending:
                                pending.discard(name)
                                acks.gone.append(name)
                            continue
                        try:
                            rec = AgentRecord.decode(ev.kv.value)
                        except RecordError:
                            continue
                        if rec.lists_revision >= revision and name not in acks.seconds:
                            acks.seconds[name] = time.monotonic() - t0
                            pending.discard(name)
                        elif rec.lists_revision < revision and name not in acks.seconds:
                            pending.add(name)  # a new agent came up meanwhile
                    if not pending:
                        break
    acks.missing = sorted(pending)
    return acks


async def revoke(etcd: EtcdClient, keys: Keys, name: str, reason: str, by: str, wait: float) -> Acks:
    validate_name(name)
    t0 = time.monotonic()
    rev = await etcd.put(keys.revocation(name), Revocation(name, time.time(), by[:128], reason[:500]).encode())
    return await wait_acks(etcd, keys, rev, t0, wait)


async def unrevoke(etcd: EtcdClient, keys: Keys, name: str, wait: float) -> Acks | None:
    """None if the agent was not revoked."""
    validate_name(name)
    t0 = time.monotonic()
    got = await etcd.txn([Compare.version(keys.revocation(name), ">", 0)], [Delete(keys.revocation(name))])
    if not got.succeeded:
        return None
    return await wait_acks(etcd, keys, got.revision, t0, wait)


async def change_allowlist(etcd: EtcdClient, keys: Keys, how: str, measurements: list[str], by: str,
                           wait: float) -> tuple[Allowlist | None, Acks | None]:
    """``how``: add, remove, set or clear (back to each agent's own list).  Read, change,
    compare-and-swap (again if someone else changed it meanwhile)."""
    for m in measurements:
        if len(m) != 64 or any(c not in "0123456789abcdef" for c in m):
            raise AdminError(f"bad measurement {m[:80]!r}: 64 lower-case hex digits (palm measurement)")
    for _ in range(10):
        kv = await etcd.get(keys.allowlist)
        cur = Allowlist.decode(kv.value) if kv is not None else None
        have = set(cur.measurements) if cur is not None else set()
        if how == "clear":
            if kv is None:
                return None, None
            t0 = time.monotonic()
            got = await etcd.txn([Compare.mod_revision(keys.allowlist, "==", kv.mod_revision)],
                                 [Delete(keys.allowlist)])
            if got.succeeded:
                return None, await wait_acks(etcd, keys, got.revision, t0, wait)
            continue
        new = {"add": have | set(measurements), "remove": have - set(measurements), "set": set(measurements)}[how]
        if not new:
            raise AdminError("that leaves the cluster's allowlist empty, which refuses every migration; "
                             "`palm cluster allowlist clear` goes back to each agent's own list")
        if cur is not None and new == have:
            return cur, None
        al = Allowlist(tuple(sorted(new)), time.time(), by[:128])
        t0 = time.monotonic()
        got = await etcd.txn([Compare.mod_revision(keys.allowlist, "==", kv.mod_revision if kv else 0)],
                             [Put(keys.allowlist, al.encode())])
        if got.succeeded:
            return al, await wait_acks(etcd, keys, got.revision, t0, wait)
    raise AdminError("the allowlist kept changing under this command; try again")


# --------------------------------------------------------------- drains


async def request_drain(etcd: EtcdClient, keys: Keys, host: str, options: DrainOptions,
                        by: str) -> tuple[DrainRequest, bool]:
    """Marks ``host`` draining and asks it to evacuate; (the request, True if it joined
    a drain already under way)."""
    validate_name(host)
    options.check()
    if await etcd.get(keys.agent(host)) is None:
        raise AdminError(f"agent {host!r} is not alive in the cluster (no record under {keys.prefix}agents/): "
                         "its agent runs the drain, so it must be running")
    kv = await etcd.get(keys.drain(host))
    if kv is not None:
        try:
            cur = DrainRequest.decode(kv.value)
        except RecordError:
            cur = None
        st = await drain_status(etcd, keys, host)
        if cur is not None and not cur.stop and (st is None or st.id != cur.id or st.state == "running"):
            return cur, True
    req = DrainRequest(os.urandom(8).hex(), time.time(), by[:128], options)
    await etcd.put(keys.drain(host), req.encode())
    return req, False


async def drain_status(etcd: EtcdClient, keys: Keys, host: str) -> DrainStatus | None:
    kv = await etcd.get(keys.drain_status(host))
    if kv is None:
        return None
    try:
        return DrainStatus.decode(kv.value)
    except RecordError:
        return None


async def follow_drain(etcd: EtcdClient, keys: Keys, host: str, drain_id: str,
                       on_status: Callable[[DrainStatus], None]) -> DrainStatus:
    """Until the drain ``drain_id`` of ``host`` has ended; ``on_status`` sees each update."""
    key = keys.drain_status(host)
    while True:
        snap = await etcd.range_prefix(key)
        st: DrainStatus | None = None
        for kv in snap.kvs:
            if kv.key == key:
                try:
                    st = DrainStatus.decode(kv.value)
                except RecordError:
                    st = None
        if st is not None and st.id == drain_id:
            on_status(st)
            if st.state != "running":
                return st
        try:
            async with etcd.watch(key, prefix=False, start_revision=snap.revision + 1) as watch:
                async for batch in watch:
                    for ev in batch.events:
                        if ev.type != "put":
                            continue
                        try:
                            st = DrainStatus.decode(ev.kv.value)
                        except RecordError:
                            continue
                        if st.id != drain_id:
                            continue
                        on_status(st)
                        if st.state != "running":
                            return st
        except EtcdError as exc:
            if not exc.compact_revision:
                raise


async def stop_drain(etcd: EtcdClient, keys: Keys, host: str, unmark: bool) -> bool:
    """Starts no more migrations (in-flight ones finish); with ``unmark`` also ends the draining
    mark.  False if the host was not draining."""
    validate_name(host)
    kv = await etcd.get(keys.drain(host))
    if kv is None:
        return False
    if unmark:
        await etcd.txn([Compare.mod_revision(keys.drain(host), "==", kv.mod_revision)], [Delete(keys.drain(host))])
        return True
    try:
        cur = DrainRequest.decode(kv.value)
    except RecordError:
        await etcd.delete(keys.drain(host))
        return True
    stopped = DrainRequest(cur.id, cur.at, cur.by, cur.options, stop=True)
    await etcd.txn([Compare.mod_revision(keys.drain(host), "==", kv.mod_revision)],
                   [Put(keys.drain(host), stopped.encode())])
    return True
