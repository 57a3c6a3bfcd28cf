"""The operator's side of the cluster (``palm cluster ...``): read it, revoke, allow, drain.

Everything goes through etcd: the operator needs etcd's endpoints (and its
credentials), not the agents' control sockets.  What changes policy (a
revocation, the allowlist, a drain) is a document signed by the operator's
``Signer`` (palm_net.cluster.policy): agents take nothing else.  A
revocation or an allowlist change is one write; the command then waits
until every live agent has acknowledged it (``lists_revision`` in its
record, written once it enforces the change) and reports how long that
took.  A drain is a request the drained agent carries out itself; the
command follows its status.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack
import trio

from palm_net.cluster.etcd import EtcdClient
from palm_net.cluster.etcdwire import Compare, EtcdError, Put
from palm_net.cluster.model import (
    AgentRecord,
    DrainOptions,
    DrainRequest,
    DrainStatus,
    Keys,
    KnownAgent,
    RecordError,
    Slot,
    VmRecord,
)
from palm_net.cluster.policy import (
    MAX_POLICY,
    PolicyDoc,
    PolicyError,
    Signer,
    next_serial,
    open_agent_record,
    open_known_agent,
    open_vm_record,
    parse_body,
    revocation,
    verify,
)
from palm_net.crypto.identity import validate_name


class AdminError(Exception):
    """The operation was refused (one line)."""


@dataclass
class ClusterView:
    revision: int
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    vms: dict[str, VmRecord] = field(default_factory=dict)
    known: dict[str, KnownAgent] = field(default_factory=dict)  # every name an agent ever registered
    revoked: dict[str, PolicyDoc] = field(default_factory=dict)  # revocations in force
    allowlist: tuple[bytes, ...] | None = None
    drains: dict[str, DrainRequest] = field(default_factory=dict)
    drain_status: dict[str, DrainStatus] = field(default_factory=dict)
    slots: dict[str, Slot] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # values that are not valid records
    config_revision: int = 0  # the newest write under config/ still there (a deletion leaves no trace)


def read_doc(value: bytes, keys: Keys, authority_pub: bytes | None) -> PolicyDoc:
    """A policy document as read: verified when the authority's key is known, else its body
    only (``signer`` then says so)."""
    if authority_pub is not None:
        return verify(value, authority_pub, keys.prefix, time.time())
    try:
        outer = msgpack.unpackb(value, raw=False, max_map_len=4, max_bin_len=MAX_POLICY, max_str_len=1024)
        body = outer["body"]
    except Exception:  # msgpack's own errors, or not a map with a body
        raise PolicyError("malformed", "not a policy document") from None
    if not isinstance(body, bytes):
        raise PolicyError("malformed", "not a policy document")
    return replace(parse_body(body, keys.prefix), signer="signature not checked")


async def read_cluster(etcd: EtcdClient, keys: Keys, authority_pub: bytes | None = None) -> ClusterView:
    """Everything under the prefix, at one revision; policy documents verified when
    ``authority_pub`` is given."""
    snap = await etcd.range_prefix(keys.prefix.encode())
    view = ClusterView(snap.revision)
    for kv in snap.kvs:
        k, v = kv.key, kv.value
        if k.startswith(keys.config):
            view.config_revision = max(view.config_revision, kv.mod_revision)
        try:
            if k.startswith(keys.agents):
                rec = open_agent_record(v, authority_pub, time.time())
                if Keys.tail(keys.agents, k) != rec.name:
                    raise RecordError("agent record under another name")
                view.agents[rec.name] = rec
            elif k.startswith(keys.vms):
                vm = open_vm_record(v, authority_pub, time.time())
                if k != keys.vm(vm.vm_id):
                    raise RecordError("VM record under another VM's key")
                view.vms[vm.vm_id] = vm
            elif k.startswith(keys.known):
                known = open_known_agent(v, authority_pub, time.time())
                if Keys.tail(keys.known, k) != known.name:
                    raise RecordError("known agent under another name")
                view.known[known.name] = known
            elif k.startswith(keys.revoked):
                doc = read_doc(v, keys, authority_pub)
                if k != doc.key(keys):
                    raise RecordError("policy document under another key")
                if doc.revoked:
                    view.revoked[doc.subject] = doc
            elif k == keys.allowlist:
                doc = read_doc(v, keys, authority_pub)
                if doc.kind != "allowlist":
                    raise RecordError("policy document under another key")
                view.allowlist = doc.measurements
            elif k.startswith(keys.drain_statuses):
                st = DrainStatus.decode(v)
                view.drain_status[Keys.tail(keys.drain_statuses, k)] = st
            elif k.startswith(keys.drains):
                doc = read_doc(v, keys, authority_pub)
                if k != doc.key(keys):
                    raise RecordError("policy document under another key")
                if doc.request is not None:
                    view.drains[doc.subject] = doc.request
            elif k.startswith(keys.slots):
                view.slots[k[len(keys.slots):].decode(errors="replace")[:8]] = Slot.decode(v)
        except RecordError as exc:
            view.problems.append(f"{k[:120].decode(errors='replace')}: {exc}")
    return view


def status_dict(view: ClusterView) -> dict[str, Any]:
    """What `palm cluster status --json` prints."""
    agents = []
    for name, a in sorted(view.agents.items()):
        pub = bytes.fromhex(a.static_pub)
        revoked = name in view.revoked or any(pub in d.keys for d in view.revoked.values())
        health = "revoked" if revoked else "draining" if name in view.drains else "ok"
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
            "allowlist": None if view.allowlist is None else [m.hex() for m in view.allowlist],
            "slots": {k: {"agent": s.agent, "vm": s.vm} for k, s in sorted(view.slots.items())},
            "problems": view.problems}


# --------------------------------------------------------------- the lists


@dataclass
class Acks:
    revision: int
    seconds: dict[str, float]  # agent -> when its acknowledgement was seen, from the write
    missing: list[str]  # live agents that did not acknowledge in time
    gone: list[str]  # agents that left the cluster while we waited


async def wait_acks(etcd: EtcdClient, keys: Keys, revision: int, t0: float, timeout: float,
                    authority_pub: bytes | None = None) -> Acks:
    """Until every live agent's record says it enforces lists of ``revision`` or later (only
    records signed by the agent they name count, when ``authority_pub`` is given)."""
    snap = await etcd.range_prefix(keys.agents)
    pending: set[str] = set()
    acks = Acks(revision, {}, [], [])
    for kv in snap.kvs:
        try:
            rec = open_agent_record(kv.value, authority_pub, time.time())
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
                            rec = open_agent_record(ev.kv.value, authority_pub, time.time())
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


async def _current(etcd: EtcdClient, keys: Keys, key: bytes, signer: Signer) -> tuple[PolicyDoc | None, int]:
    """The document under ``key`` if it verifies, and the key's mod_revision (0: absent).
    One that does not verify is overwritten, never built on."""
    kv = await etcd.get(key)
    if kv is None:
        return None, 0
    try:
        return verify(kv.value, signer.authority_pub, keys.prefix, time.time()), kv.mod_revision
    except RecordError:
        return None, kv.mod_revision


async def _put(etcd: EtcdClient, key: bytes, doc: PolicyDoc, mod_revision: int) -> int | None:
    """Writes a signed document if the key is still as read; its revision, or None."""
    got = await etcd.txn([Compare.mod_revision(key, "==", mod_revision)], [Put(key, doc.raw)])
    return got.revision if got.succeeded else None


async def known_agents(etcd: EtcdClient, keys: Keys, authority_pub: bytes) -> dict[str, set[str]]:
    """Every name an agent registered under (alive or not) and the static keys it had (hex),
    from records signed by the agent they name."""
    out: dict[str, set[str]] = {}
    for prefix in (keys.known, keys.agents):
        for kv in (await etcd.range_prefix(prefix)).kvs:
            try:
                now = time.time()
                rec: KnownAgent | AgentRecord = (open_known_agent(kv.value, authority_pub, now)
                                                 if prefix == keys.known
                                                 else open_agent_record(kv.value, authority_pub, now))
                if Keys.tail(prefix, kv.key) != rec.name:
                    continue
            except RecordError:
                continue
            out.setdefault(rec.name, set()).add(rec.static_pub)
    return out


@dataclass
class Changed:
    """What a policy command wrote: the document, where, and which agents enforce it."""

    doc: PolicyDoc
    key: str
    acks: Acks | None
    sent: float = 0.0  # time.monotonic() as the write went out
    written: float = 0.0  # time.monotonic() as etcd's answer came back (scripts/cluster_scale.py times from it)


async def revoke(etcd: EtcdClient, keys: Keys, signer: Signer, name: str, reason: str, by: str, wait: float,
                 force: bool = False) -> Changed:
    """Revokes the name and every static key an agent of that name registered with.  A name
    no agent ever registered is refused (a typo would leave the host meant trusted) unless
    ``force``."""
    validate_name(name)
    known = await known_agents(etcd, keys, signer.authority_pub)
    if name not in known and not force:
        names = ", ".join(sorted(known)[:50]) + (" ..." if len(known) > 50 else "") if known else "none"
        raise AdminError(f"no agent named {name!r} ever registered in the cluster {keys.prefix} (known: {names}); "
                         "nothing revoked. --force revokes a name never seen")

    def revoked(cur: PolicyDoc | None, _: int) -> PolicyDoc:
        pubs = {bytes.fromhex(k) for k in known.get(name, ())} | set(cur.keys if cur is not None and cur.revoked
                                                                    else ())
        return signer.sign(revocation(keys.prefix, name, next_serial(cur.serial if cur else 0), sorted(pubs)[:16],
                                      reason, by))

    changed = await _publish(etcd, keys, keys.revocation(name), signer, wait, revoked)
    assert changed is not None  # (revoked() always makes a document)
    return changed


async def _publish(etcd: EtcdClient, keys: Keys, key: bytes, signer: Signer, wait: float,
                   make: Callable[[PolicyDoc | None, int], PolicyDoc | None]) -> Changed | None:
    """Read the document in force (verified; and the key's mod revision), make the next one
    from it (None: nothing to change), compare-and-swap it in (again if someone changed it
    meanwhile), then wait for the agents to acknowledge it."""
    for _ in range(10):
        cur, mod = await _current(etcd, keys, key, signer)
        doc = make(cur, mod)
        if doc is None:
            return None
        t0 = time.monotonic()
        rev = await _put(etcd, key, doc, mod)
        if rev is not None:
            t1 = time.monotonic()
            return Changed(doc, key.decode(), await wait_acks(etcd, keys, rev, t0, wait, signer.authority_pub),
                           t0, t1)
    raise AdminError(f"{key.decode()} kept changing under this command; try again")


async def unrevoke(etcd: EtcdClient, keys: Keys, signer: Signer, name: str, by: str, wait: float) -> Changed | None:
    """None if the agent was not revoked.  The revocation is superseded by a newer signed
    document, not deleted: agents keep the highest they saw."""
    validate_name(name)

    def lifted(cur: PolicyDoc | None, _: int) -> PolicyDoc | None:
        if cur is None or not cur.revoked:
            return None
        return signer.sign(revocation(keys.prefix, name, next_serial(cur.serial), (), "", by, revoked=False))

    return await _publish(etcd, keys, keys.revocation(name), signer, wait, lifted)


async def change_allowlist(etcd: EtcdClient, keys: Keys, signer: Signer, how: str, measurements: list[str],
                           by: str, wait: float) -> tuple[tuple[bytes, ...] | None, Changed | None]:
    """``how``: add, remove, set or clear (back to each agent's own list).  Read (verified),
    change, sign, compare-and-swap (again if someone else changed it meanwhile).
    (the list in force, what was written or None if nothing changed)."""
    for m in measurements:
        if len(m) != 64 or any(c not in "0123456789abcdef" for c in m):
            raise AdminError(f"bad measurement {m[:80]!r}: 64 lower-case hex digits (palm measurement)")
    wanted = {bytes.fromhex(m) for m in measurements}
    in_force: list[tuple[bytes, ...] | None] = [None]  # the list in force, as the last read found it

    def changed(cur: PolicyDoc | None, mod: int) -> PolicyDoc | None:
        have = in_force[0] = None if cur is None else cur.measurements
        if how == "clear":
            new: tuple[bytes, ...] | None = None
        else:
            base = set(have or ())
            new = tuple(sorted({"add": base | wanted, "remove": base - wanted, "set": wanted}[how]))
            if not new:
                raise AdminError("that leaves the cluster's allowlist empty, which refuses every migration; "
                                 "`palm cluster allowlist clear` goes back to each agent's own list")
        if (cur is not None and new == have) or (cur is None and new is None and mod == 0):
            return None
        return signer.sign(PolicyDoc("allowlist", keys.prefix, "", next_serial(cur.serial if cur else 0),
                                     int(time.time()), by[:128], measurements=new))

    done = await _publish(etcd, keys, keys.allowlist, signer, wait, changed)
    return (done.doc.measurements if done is not None else in_force[0]), done


# --------------------------------------------------------------- drains


async def request_drain(etcd: EtcdClient, keys: Keys, signer: Signer, host: str, options: DrainOptions,
                        by: str) -> tuple[DrainRequest, bool, PolicyDoc | None]:
    """Marks ``host`` draining and asks it to evacuate; (the request, True if it joined
    a drain already under way, the document written if one was)."""
    validate_name(host)
    options.check()
    if await etcd.get(keys.agent(host)) is None:
        raise AdminError(f"agent {host!r} is not alive in the cluster (no record under {keys.prefix}agents/): "
                         "its agent runs the drain, so it must be running")
    cur, mod = await _current(etcd, keys, keys.drain(host), signer)
    if cur is not None and cur.request is not None:
        st = await drain_status(etcd, keys, host)
        req = cur.request
        if not req.stop and (st is None or st.id != req.id or st.state == "running"):
            return req, True, None
    req = DrainRequest(os.urandom(8).hex(), time.time(), by[:128], options)
    doc = signer.sign(PolicyDoc("drain", keys.prefix, host, next_serial(cur.serial if cur else 0),
                                int(time.time()), by[:128], request=req))
    if await _put(etcd, keys.drain(host), doc, mod) is None:
        raise AdminError(f"{keys.drain(host).decode()} changed under this command; try again")
    return req, False, doc


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


async def stop_drain(etcd: EtcdClient, keys: Keys, signer: Signer, host: str, unmark: bool,
                     by: str = "") -> PolicyDoc | None:
    """Starts no more migrations (in-flight ones finish); with ``unmark`` also ends the draining
    mark.  The document written, or None if the host was not draining."""
    validate_name(host)
    key = keys.drain(host)
    cur, mod = await _current(etcd, keys, key, signer)
    if cur is None or cur.request is None or (cur.request.stop and not unmark):
        return None
    req = None if unmark else replace(cur.request, stop=True)
    doc = signer.sign(PolicyDoc("drain", keys.prefix, host, next_serial(cur.serial), int(time.time()), by[:128],
                                request=req))
    if await _put(etcd, key, doc, mod) is None:
        raise AdminError(f"{key.decode()} changed under this command; try again")
    return doc
