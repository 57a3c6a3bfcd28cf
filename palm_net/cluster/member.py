"""An agent in the cluster: the trio shell around etcd (``palm agent --etcd``).

Four tasks, each the one owner of its part, under one nursery:

- membership: the agent's record ``agents/NAME`` under a lease, kept alive
  (every TTL/3) and published again when it changes; it disappears when the
  agent stops (the lease is revoked) or dies (the lease expires);
- lists: the signed revocations and allowlist under ``config/``, read and
  then watched; a document is taken only if it verifies and is newer than the
  one kept (palm_net.cluster.policy); the lists it makes go to the agent's
  peer gate, the documents are kept in the state directory (a restart during
  an etcd outage, or etcd losing them, changes nothing) and the change is
  acknowledged in the agent record (``lists_revision``); documents etcd lost
  or rolled back are written back (they are signed: any agent may);
- VM records: the rules of palm_net.cluster.converge, run when something
  changed here and every ``reconcile_every`` seconds;
- drain: the signed request ``drain/NAME``, watched; while one stands, the
  host's VMs are evacuated (palm_net.cluster.drainer).

Whatever etcd does, the agent goes on: migrations, recovery and the control
socket never wait for etcd; while etcd is unreachable the agent enforces its
last known lists and says so in its status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import trio

from palm_net.cluster.converge import Converger, Read, Write
from palm_net.cluster.drainer import run_drains
from palm_net.cluster.etcd import EtcdClient, EtcdConfig
from palm_net.cluster.etcdwire import CODE_NOT_FOUND, CODE_PERMISSION_DENIED, Compare, Delete, EtcdError, Lease, Put
from palm_net.cluster.gate import Lists
from palm_net.cluster.host import ClusterHost
from palm_net.cluster.model import AgentRecord, DrainRequest, Keys, KnownAgent, RecordError
from palm_net.cluster.policy import (
    MAX_POLICY,
    MAX_REVOCATIONS,
    PolicyDoc,
    PolicyStore,
    open_agent_record,
    open_vm_record,
)
from palm_net.hostfs import UnsafePathError, read_nofollow, write_atomic
from palm_net.trioutil import single_error

log = structlog.get_logger("palm.cluster")

POLICY_FILE = "cluster-policy"  # the highest signed documents this agent verified (msgpack)


@dataclass(frozen=True)
class MemberConfig:
    etcd: EtcdConfig
    keys: Keys
    state_dir: Path  # the policy documents it keeps are here
    authority_pub: bytes  # policy documents are signed by it or by an operator it certified
    lease_ttl: int = 10
    reconcile_every: float = 15.0
    publish_every: float = 10.0  # the agent record at least this often when it changed


class _LeaseLost(Exception):
    pass


class _NameTaken(Exception):
    pass


class ClusterMember:
    def __init__(self, cfg: MemberConfig, host: ClusterHost) -> None:
        self.cfg = cfg
        self.keys = cfg.keys
        self.host = host
        self.converger = Converger(host.name)
        self.lease: Lease | None = None
        self.lists = Lists()
        self.policy = PolicyStore(cfg.authority_pub, cfg.keys, host.name)
        self._offered: dict[bytes, bytes] = {}  # the config/ values last offered to the policy
        self._not_restorable: set[tuple[bytes, int]] = set()  # (key, serial) etcd's roles keep us from writing
        self.drain_request: DrainRequest | None = None
        self.drain_changed = trio.Event()
        self.drain_status: dict[str, Any] = {}
        self._publish = trio.Event()
        self._reconcile = trio.Event()
        self._failing_since: float | None = time.time()  # until etcd first answers
        self._last_error = "not contacted yet"
        self._name_taken = ""
        self.written = 0  # VM record writes that landed
        self._load_policy()

    # -- what the agent asks

    def poke(self) -> None:
        """Something changed on this agent: publish its record and reconcile its VM records soon."""
        self._publish.set()
        self._reconcile.set()

    @property
    def reachable(self) -> bool:
        return self._failing_since is None

    def status(self) -> dict[str, Any]:
        lists = self.lists
        now = time.time()
        out: dict[str, Any] = {
            "etcd": "reachable" if self.reachable else "unreachable",
            "endpoints": list(self.cfg.etcd.endpoints),
            "registered": self.lease is not None,
            "lists": {"revision": lists.revision, "revoked": sorted(lists.revoked),
                      "revoked_keys": sorted(k.hex() for k in lists.revoked_keys),
                      "allowlist": None if lists.allowlist is None else sorted(m.hex() for m in lists.allowlist),
                      "confirmed": round(lists.read_at, 3),
                      "serials": {f"{k}/{n}" if n else k: d.serial for (k, n), d in sorted(self.policy.kept.items())},
                      "refused": dict(sorted(self.policy.refused.items()))},
            "conflicts": sorted(self.converger.conflicts),
            "draining": self.drain_request is not None,
        }
        if not self.reachable:
            since = self._failing_since or now
            out["unreachable_for_s"] = round(now - since, 1)
            out["last_error"] = self._last_error[:300]
            out["note"] = (f"etcd unreachable for {now - since:.0f} s: enforcing the last known lists "
                           f"(revision {lists.revision})")
        if self._name_taken:
            out["name_taken"] = self._name_taken
        if self.drain_status:
            out["drain"] = self.drain_status
        return out

    def good(self) -> None:
        if self._failing_since is not None:
            log.info("etcd reachable", endpoint_count=len(self.cfg.etcd.endpoints))
        self._failing_since = None

    def bad(self, exc: BaseException) -> None:
        self._last_error = str(exc)[:300] or type(exc).__name__
        if self._failing_since is None:
            self._failing_since = time.time()
            log.warning("etcd unreachable: going on with the last known lists", error=self._last_error,
                        lists_revision=self.lists.revision)

    # -- the service

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs until cancelled; never waits for etcd to start (the agent works without it)."""
        self.host.apply_lists(self.lists)
        async with EtcdClient(self.cfg.etcd) as etcd, trio.open_nursery() as nursery:
            nursery.start_soon(self._membership, etcd)
            nursery.start_soon(self._forever, "lists", self._lists, etcd)
            nursery.start_soon(self._records, etcd)
            nursery.start_soon(self._forever, "drain", self._drain_watch, etcd)
            nursery.start_soon(run_drains, self, etcd)
            task_status.started()

    async def _forever(self, what: str, fn: Callable[[EtcdClient], Awaitable[None]], etcd: EtcdClient) -> None:
        """Runs ``fn`` again after each etcd failure (paced: etcd may be down for long)."""
        delay = 0.2
        while True:
            try:
                await fn(etcd)
                delay = 0.2
            except (EtcdError, RecordError) as exc:
                self.bad(exc)
                log.debug("etcd task failed", task=what, error=str(exc)[:200])
            await trio.sleep(delay)  # pacing between attempts, not synchronization
            delay = min(delay * 2, 5.0)

    # -- membership

    def record(self) -> AgentRecord:
        return replace(self.host.advertise(), lists_revision=self.lists.revision,
                       conflicts=len(self.converger.conflicts))

    async def _membership(self, etcd: EtcdClient) -> None:
        delay = 0.2
        key = self.keys.agent(self.host.name)
        while True:
            lease: Lease | None = None
            try:
                lease = await etcd.lease_grant(self.cfg.lease_ttl)
                self.good()
                await self._claim(etcd, key, lease)
                self.lease = lease
                delay = 0.2
                log.info("registered in the cluster", agent=self.host.name, ttl=lease.ttl)
                with single_error():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._keepalive, etcd, lease)
                        await self._publish_loop(etcd, key, lease)
            except (EtcdError, _LeaseLost, _NameTaken, RecordError) as exc:
                if not isinstance(exc, _NameTaken):
                    self.bad(exc)
                if isinstance(exc, _LeaseLost):
                    log.warning("cluster lease lost: registering again", error=str(exc))
            finally:
                self.lease = None
                if lease is not None:
                    with trio.move_on_after(2) as cs:
                        cs.shield = True
                        try:
                            await etcd.lease_revoke(lease.id)  # at a clean stop: gone from the cluster at once
                        except EtcdError:
                            pass
            await trio.sleep(delay)  # pacing between attempts
            delay = min(delay * 2, 5.0)

    async def _claim(self, etcd: EtcdClient, key: bytes, lease: Lease) -> None:
        """Puts our record under ``lease``, unless a live agent of another identity has the name."""
        mine = self.record()
        kv = await etcd.get(key)
        if kv is not None:
            try:
                theirs = open_agent_record(kv.value, self.cfg.authority_pub, time.time())
            except RecordError as exc:  # not signed by an agent of that name: a squatter's, taken back
                self.policy.count(f"record-{getattr(exc, 'reason', 'malformed')}")
                theirs = None
            if theirs is not None and theirs.static_pub != mine.static_pub:
                self._name_taken = (f"the name {self.host.name!r} is registered by another agent (static key "
                                    f"{theirs.static_pub[:16]}...); this agent stays out of the cluster until it "
                                    "is gone")
                log.error("cluster name taken", agent=self.host.name, other=theirs.static_pub[:16])
                raise _NameTaken(self._name_taken)
        got = await etcd.txn([Compare.mod_revision(key, "==", kv.mod_revision if kv else 0)],
                             [Put(key, self.host.seal(mine.encode()), lease.id)])
        if not got.succeeded:
            raise _NameTaken("the agent record changed while registering")
        self._name_taken = ""
        # No lease: the name stays known after the agent leaves (`palm cluster revoke` checks it).
        await etcd.put(self.keys.known_agent(self.host.name),
                       self.host.seal(KnownAgent(self.host.name, mine.static_pub, round(time.time(), 3)).encode()))

    async def _keepalive(self, etcd: EtcdClient, lease: Lease) -> None:
        period = lease.ttl / 3
        last_ok = trio.current_time()
        while True:
            await trio.sleep_until(last_ok + period)
            while True:
                try:
                    await etcd.lease_keepalive_once(lease.id)
                    last_ok = trio.current_time()
                    self.good()
                    break
                except EtcdError as exc:
                    if exc.code == CODE_NOT_FOUND:
                        raise _LeaseLost(str(exc)) from None
                    self.bad(exc)
                    if trio.current_time() - last_ok > lease.ttl:
                        raise _LeaseLost(f"no keep-alive reached etcd for {lease.ttl} s") from None
                    await trio.sleep(min(period, 1.0))  # pacing the next try

    async def _publish_loop(self, etcd: EtcdClient, key: bytes, lease: Lease) -> None:
        last = sealed = b""
        while True:
            self._publish = trio.Event()  # before reading the record: a change after it wakes us
            data = self.record().encode()
            if data != last:
                sealed = self.host.seal(data)
                await etcd.put(key, sealed, lease=lease.id)
                last = data
                self.good()
            await trio.sleep(0.1)  # pacing: at most ten puts a second, however busy the agent
            with trio.move_on_after(self.cfg.publish_every) as quiet:
                await self._publish.wait()
            if quiet.cancelled_caught:  # nothing changed here: is our record still ours in etcd?
                kv = await etcd.get(key)
                if kv is None or kv.value != sealed:
                    log.warning("agent record overwritten in etcd (by a squatter?): publishing it again")
                    last = b""

    # -- lists

    def _load_policy(self) -> None:
        path = self.cfg.state_dir / POLICY_FILE
        if not path.exists():
            return
        try:
            n = self.policy.load(read_nofollow(path, (MAX_REVOCATIONS + 2) * (MAX_POLICY + 8) + 64))
        except (OSError, UnsafePathError, RecordError) as exc:
            log.error("kept policy documents not usable; waiting for etcd's", error=str(exc))
            return
        self.lists = self.policy.lists(0, 0.0)
        self.drain_request = self.policy.drain_request()
        log.info("cluster policy loaded from the state directory", documents=n, revoked=len(self.lists.revoked))

    def _keep_policy(self) -> None:
        try:
            write_atomic(self.cfg.state_dir / POLICY_FILE, self.policy.encode())
        except (OSError, UnsafePathError) as exc:
            log.error("cannot keep the cluster policy in the state directory", error=str(exc))

    def _offer(self, key: bytes, value: bytes, now: float) -> bool:
        """A value under ``config/``; True if a newer signed document was taken."""
        if key == self.keys.allowlist:
            kind, subject = "allowlist", ""
        elif key.startswith(self.keys.revoked):
            kind = "revocation"
            try:
                subject = Keys.tail(self.keys.revoked, key)
            except RecordError:
                log.error("ignored a revocation key that is not an agent name",
                          key=key[:100].decode(errors="replace"))
                return False
        else:
            return False
        got = self.policy.offer(kind, subject, value, now)
        if got not in ("new", "same"):
            log.warning("policy document refused: the kept one stays in force", kind=kind, subject=subject,
                        why=got)
        return got == "new"

    def _take_lists(self, values: dict[bytes, bytes], revision: int) -> None:
        now = time.time()
        # each value once: a refused one left in etcd is not counted again at every change
        taken = [self._offer(key, value, now) for key, value in values.items() if self._offered.get(key) != value]
        self._offered = dict(values)
        if any(taken):
            self._keep_policy()  # before anything acts on them
        lists = self.policy.lists(revision, now)
        old = self.lists
        self.lists = lists
        if (lists.revoked, lists.revoked_keys, lists.allowlist) != (old.revoked, old.revoked_keys, old.allowlist):
            log.warning("cluster lists changed", revision=revision, revoked=sorted(lists.revoked),
                        newly_revoked=sorted(lists.revoked - old.revoked),
                        allowlist=None if lists.allowlist is None else len(lists.allowlist))
        self.host.apply_lists(lists)
        self._publish.set()  # acknowledge: lists_revision in the agent record

    async def _restore(self, etcd: EtcdClient, current: dict[bytes, bytes], docs: list[PolicyDoc]) -> None:
        """Writes back kept documents etcd lost or holds older (only if the key is still as read)."""
        for doc in docs:
            key = doc.key(self.keys)
            if (key, doc.serial) in self._not_restorable:
                continue
            cmp = (Compare.value(key, "==", current[key]) if key in current
                   else Compare.version(key, "==", 0))
            try:
                got = await etcd.txn([cmp], [Put(key, doc.raw)])
            except EtcdError as exc:
                if exc.code != CODE_PERMISSION_DENIED:
                    raise
                # With etcd's roles on (docs/CLUSTER.md) only operators write policy
                # documents: the kept one stays in force here, an operator writes it back.
                self._not_restorable.add((key, doc.serial))
                log.warning("policy document not written back: etcd's roles do not let this agent",
                            kind=doc.kind, subject=doc.subject, serial=doc.serial)
                continue
            if got.succeeded:
                log.warning("policy document restored in etcd (it was deleted, older or not signed)",
                            kind=doc.kind, subject=doc.subject, serial=doc.serial)

    async def _lists(self, etcd: EtcdClient) -> None:
        snap = await etcd.range_prefix(self.keys.config)
        self.good()
        values = {kv.key: kv.value for kv in snap.kvs}
        self._take_lists(values, snap.revision)
        await self._restore(etcd, values, [d for d in self.policy.stale(values) if d.kind != "drain"])
        async with etcd.watch(self.keys.config, start_revision=snap.revision + 1) as watch:
            async for batch in watch:
                for ev in batch.events:
                    if ev.type == "put":
                        values[ev.kv.key] = ev.kv.value
                    else:
                        values.pop(ev.kv.key, None)
                self._take_lists(values, batch.revision)
                await self._restore(etcd, values, [d for d in self.policy.stale(values) if d.kind != "drain"])

    # -- VM records

    async def _records(self, etcd: EtcdClient) -> None:
        scanned = False
        while True:
            wait = self.cfg.reconcile_every
            try:
                if not scanned:  # once: the records that name us, whatever happened while we were away
                    for kv in (await etcd.range_prefix(self.keys.vms)).kvs:
                        try:
                            rec = open_vm_record(kv.value, self.cfg.authority_pub, time.time())
                        except RecordError:
                            continue
                        if rec.agent == self.host.name:
                            self.converger.mine.add(rec.vm_id)
                    scanned = True
                await self.reconcile(etcd)
                self.good()
            except EtcdError as exc:
                self.bad(exc)
                wait = 1.0
            with trio.move_on_after(wait):
                await self._reconcile.wait()
            self._reconcile = trio.Event()

    async def _read(self, etcd: EtcdClient, vm_id: str) -> Read:
        kv = await etcd.get(self.keys.vm(vm_id))
        if kv is None:
            return Read(vm_id, None, 0)
        try:
            rec = open_vm_record(kv.value, self.cfg.authority_pub, time.time())
        except RecordError as exc:  # garbage, forged, or not its writer's: its host writes over it
            log.warning("VM record unreadable or not its writer's", vm_id=vm_id, error=str(exc))
            self.policy.count(f"record-{getattr(exc, 'reason', 'malformed')}")
            return Read(vm_id, None, kv.mod_revision, invalid=True)
        if rec.vm_id != vm_id:
            log.warning("VM record under another VM's key", vm_id=vm_id)
            return Read(vm_id, None, kv.mod_revision, invalid=True)
        return Read(vm_id, rec, kv.mod_revision)

    async def reconcile(self, etcd: EtcdClient) -> int:
        """Passes until nothing is left to write (a few at most); returns the writes that landed."""
        landed = 0
        for _ in range(5):
            ids = self.converger.wanted(self.host.vm_facts())
            reads = {vm_id: await self._read(etcd, vm_id) for vm_id in ids}
            facts = self.host.vm_facts()  # after the reads: a fact never predates its record
            actions = self.converger.plan(facts, reads, time.time())
            again = bool(set(facts) - set(reads))
            for action in actions:
                key = self.keys.vm(action.record.vm_id if isinstance(action, Write) else action.vm_id)
                op: Put | Delete = (Put(key, self.host.seal(action.record.encode(), "vm")) if isinstance(action, Write)
                                    else Delete(key))
                result = await etcd.txn([Compare.mod_revision(key, "==", action.expect)], [op])
                self.converger.done(action, result.succeeded)
                if result.succeeded:
                    landed += 1
                    self.written += 1
                    log.info("VM record written" if isinstance(action, Write) else "VM record removed",
                             vm=action.record.name if isinstance(action, Write) else None,
                             vm_id=(action.record.vm_id if isinstance(action, Write) else action.vm_id)[:16],
                             agent=action.record.agent if isinstance(action, Write) else None,
                             migration=action.record.migration[:16] if isinstance(action, Write) else None,
                             why=action.why)
                else:
                    again = True  # the record moved under us: read it again
            if not again:
                break
        if self.converger.conflicts:
            log.error("VM records another agent also claims; not written (a forked VM? see palm migrate "
                      "--resolve)", vm_ids=sorted(self.converger.conflicts)[:10])
        return landed

    # -- drain requests

    def _take_drain(self, value: bytes | None) -> None:
        """A deleted request changes nothing: only a newer signed document ends a drain."""
        if value is not None:
            got = self.policy.offer("drain", self.host.name, value, time.time())
            if got == "new":
                self._keep_policy()
            elif got != "same":
                log.error("drain request refused", why=got)
        req = self.policy.drain_request()
        if req != self.drain_request:
            self.drain_request = req
            self.drain_changed.set()
            self.drain_changed = trio.Event()
            self._publish.set()

    async def _drain_watch(self, etcd: EtcdClient) -> None:
        key = self.keys.drain(self.host.name)
        snap = await etcd.range_prefix(key)
        self.good()
        value = next((kv.value for kv in snap.kvs if kv.key == key), None)
        self._take_drain(value)
        current = {} if value is None else {key: value}
        await self._restore(etcd, current, [d for d in self.policy.stale(current) if d.kind == "drain"])
        async with etcd.watch(key, prefix=False, start_revision=snap.revision + 1) as watch:
            async for batch in watch:
                for ev in batch.events:
                    self._take_drain(ev.kv.value if ev.type == "put" else None)
                    current = {key: ev.kv.value} if ev.type == "put" else {}
                await self._restore(etcd, current, [d for d in self.policy.stale(current) if d.kind == "drain"])

    async def take_slot(self, etcd: EtcdClient, max_cluster: int, value: bytes) -> bytes | None:
        """One of the cluster's ``max_cluster`` drain slots, under our lease (None: all taken)."""
        lease = self.lease
        if lease is None:
            return None
        for i in range(max_cluster):
            key = self.keys.slot(i)
            got = await etcd.txn([Compare.create_revision(key, "==", 0)], [Put(key, value, lease.id)])
            if got.succeeded:
                return key
        return None

    async def give_slot(self, etcd: EtcdClient, key: bytes, value: bytes) -> None:
        with trio.move_on_after(5) as cs:
            cs.shield = True
            try:
                await etcd.txn([Compare.value(key, "==", value)], [Delete(key)])
            except EtcdError as exc:
                log.warning("drain slot not given back (its lease will)", error=str(exc))
