"""Where a VM may go, and the plan of a drain: plain objects, no I/O, no clock.

Placement: a destination is an agent that is alive, holds the destination
role, is neither draining nor revoked, runs a measurement the cluster allows,
accepts migrations, is allowed by the VM's policy (proto 7.6) and has the
VM's memory free once the migrations already planned to it are counted.  Of
those, the one with the most memory left afterwards wins (the load spreads;
ties by name), and a VM goes elsewhere than where its earlier attempts failed
when it can.

The drain plan (``DrainPlan``) keeps, for one drained host, what each of its
VMs has become; the drain's shell asks it which migrations to start (at most
``max_source`` in flight from the host; the cluster-wide limit is the shell's,
by slots in etcd), tells it how each one ended, and asks which ones overran
their completion or progress timeout (KubeVirt's two: per GiB of memory, and
without progress).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from palm_net.cluster.model import DrainOptions, DrainStatus, DrainVm
from palm_net.errors import MigrationFailure
from palm_net.hypervisor.vmspec import check_policy

GIB = 1 << 30
MIN_COMPLETION = 60.0  # seconds: the completion timeout of a small VM is at least this


@dataclass(frozen=True)
class Candidate:
    name: str
    addr: str
    measurement: bytes
    free: int
    destination: bool = True  # holds the destination role
    accepting: bool = True
    draining: bool = False
    revoked: bool = False
    allowed: bool = True  # its measurement is allowed


@dataclass(frozen=True)
class Movable:
    """A VM of the drained host as it is now."""

    name: str
    memory: int
    policy: str
    running: bool = True
    in_doubt: bool = False  # handed off, outcome unknown: the handoff decides, not the drain
    migrating: bool = False  # a migration the drain did not start


def policy_allows(policy: str, cand: Candidate) -> bool:
    try:
        check_policy(policy, cand.name, cand.measurement)
    except MigrationFailure:
        return False
    return True


def why_not(vm: Movable, cand: Candidate, planned: int) -> str | None:
    if not cand.destination:
        return "not a destination"
    if cand.revoked:
        return "revoked"
    if cand.draining:
        return "draining"
    if not cand.allowed:
        return "measurement not allowed"
    if not cand.accepting:
        return "not accepting"
    if not policy_allows(vm.policy, cand):
        return "the VM's policy"
    if cand.free - planned < vm.memory:
        return "not enough free memory"
    return None


def place(vm: Movable, candidates: list[Candidate], planned: dict[str, int],
          avoid: frozenset[str] = frozenset()) -> Candidate | str:
    """The destination for ``vm``, or why there is none.  ``planned``: memory already
    on its way to each agent; ``avoid``: agents where earlier attempts failed (used
    only when there is no other)."""
    if vm.policy == "none":
        return "the VM's policy forbids migration"
    fits: list[Candidate] = []
    reasons: dict[str, int] = {}
    for c in candidates:
        why = why_not(vm, c, planned.get(c.name, 0))
        if why is None:
            fits.append(c)
        else:
            reasons[why] = reasons.get(why, 0) + 1
    if not fits:
        if not candidates:
            return "no other agent is alive"
        return "no destination: " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    fresh = [c for c in fits if c.name not in avoid] or fits
    return max(fresh, key=lambda c: (c.free - planned.get(c.name, 0) - vm.memory, c.name))


def completion_timeout(memory: int, options: DrainOptions) -> float:
    return max(MIN_COMPLETION, options.per_gib * memory / GIB)


@dataclass
class InFlight:
    name: str
    to: str
    memory: int
    started: float
    sent: int = 0
    progressed: float = 0.0  # when ``sent`` last grew
    cancelled: str = ""  # why the drain asked to cancel it


@dataclass
class DrainPlan:
    """One drain of ``host``: its VMs, from waiting to moved (or why not)."""

    id: str
    host: str
    options: DrainOptions
    started: float
    vms: dict[str, DrainVm] = field(default_factory=dict)
    flying: dict[str, InFlight] = field(default_factory=dict)
    avoid: dict[str, set[str]] = field(default_factory=dict)  # VM -> agents where it failed
    max_parallel: int = 0
    stopped: bool = False

    @classmethod
    def resume(cls, id: str, host: str, options: DrainOptions, now: float,
               previous: DrainStatus | None) -> DrainPlan:
        """A plan that keeps what a previous run of the same drain achieved."""
        plan = cls(id, host, options, now)
        if previous is not None and previous.id == id:
            plan.started = previous.started
            plan.max_parallel = previous.max_parallel
            for name, v in previous.vms.items():
                if v.state == "moved":
                    plan.vms[name] = v
                else:  # whatever was under way has been settled by the handoff since
                    plan.vms[name] = replace(v, state="waiting", sent=0)
        return plan

    # -- what the host has now

    def refresh(self, here: list[Movable], left: dict[str, str] | None = None) -> None:
        """What the host has now; ``left``: VMs that left it by a committed migration, to where
        (one that was under way when the agent restarted, or one moved by hand)."""
        left = left or {}
        names = {v.name for v in here}
        for v in here:
            cur = self.vms.get(v.name)
            if v.name in self.flying:
                continue
            if cur is None or cur.state in ("moved", "gone"):
                # new on this host (or back: a VM that arrived after it was moved is evacuated too)
                self.vms[v.name] = DrainVm("waiting", memory=v.memory, attempts=0)
            elif cur.memory != v.memory:
                self.vms[v.name] = replace(cur, memory=v.memory)
        for name, cur in list(self.vms.items()):
            if name not in names and name not in self.flying and cur.state in ("waiting", "unplaceable", "failed"):
                if name in left:
                    self.vms[name] = replace(cur, state="moved", to=left[name],
                                             error="committed while the drain was not watching (a restart)")
                else:
                    self.vms[name] = replace(cur, state="gone", error="no longer on this host (not moved by a "
                                                                      "migration)")

    # -- choosing

    def next(self, here: list[Movable], candidates: list[Candidate], room: int) -> list[tuple[str, Candidate]]:
        """Up to ``room`` migrations to start now (at most max_source in flight from the host)."""
        if self.stopped:
            return []
        room = min(room, self.options.max_source - len(self.flying))
        planned: dict[str, int] = {}
        for f in self.flying.values():
            planned[f.to] = planned.get(f.to, 0) + f.memory
        picks: list[tuple[str, Candidate]] = []
        by_name = {v.name: v for v in here}
        for name in sorted(self.vms, key=lambda n: (-self.vms[n].memory, n)):  # the largest first
            cur = self.vms[name]
            vm = by_name.get(name)
            if vm is None or name in self.flying or cur.state not in ("waiting", "unplaceable"):
                continue
            if vm.in_doubt or vm.migrating:
                self.vms[name] = replace(cur, state="waiting",
                                         error="in doubt: waiting for the handoff" if vm.in_doubt
                                         else "migrating (not by the drain)")
                continue
            if not vm.running:
                self.vms[name] = replace(cur, state="unplaceable", error="not running (a migration needs a "
                                                                         "running VM)")
                continue
            if len(picks) >= room:
                continue  # no room now: the VMs above are still looked at, so their state says why they wait
            where = place(vm, candidates, planned, frozenset(self.avoid.get(name, ())))
            if isinstance(where, str):
                self.vms[name] = replace(cur, state="unplaceable", error=where)
                continue
            planned[where.name] = planned.get(where.name, 0) + vm.memory
            picks.append((name, where))
        return picks

    def began(self, name: str, to: str, now: float) -> None:
        cur = self.vms[name]
        self.vms[name] = replace(cur, state="migrating", to=to, attempts=cur.attempts + 1, error="", sent=0)
        self.flying[name] = InFlight(name, to, cur.memory, now, progressed=now)
        self.max_parallel = max(self.max_parallel, len(self.flying))

    def progress(self, name: str, sent: int, now: float) -> None:
        f = self.flying.get(name)
        if f is not None and sent > f.sent:
            f.sent, f.progressed = sent, now
            self.vms[name] = replace(self.vms[name], sent=sent)

    def overdue(self, now: float) -> list[tuple[str, str]]:
        """Migrations to cancel now, with why (each named once)."""
        out = []
        for f in self.flying.values():
            if f.cancelled:
                continue
            limit = completion_timeout(f.memory, self.options)
            if now - f.started > limit:
                f.cancelled = f"completion timeout ({limit:.0f} s for {f.memory >> 20} MiB)"
            elif now - f.progressed > self.options.progress_timeout:
                f.cancelled = f"no progress for {self.options.progress_timeout:.0f} s"
            if f.cancelled:
                out.append((f.name, f.cancelled))
        return out

    def finished(self, name: str, ok: bool, error: str = "", total_ms: float = 0.0,
                 downtime_ms: float = 0.0) -> None:
        f = self.flying.pop(name)
        cur = self.vms[name]
        if ok:
            self.vms[name] = replace(cur, state="moved", to=f.to, error="", total_ms=total_ms,
                                     downtime_ms=downtime_ms)
            return
        self.avoid.setdefault(name, set()).add(f.to)
        why = f"{f.cancelled}: {error}" if f.cancelled else error
        state = "failed" if cur.attempts >= self.options.attempts else "waiting"
        self.vms[name] = replace(cur, state=state, error=why[:300])

    # -- the end

    @property
    def settled(self) -> bool:
        """Nothing in flight and nothing more to try (or the drain was stopped)."""
        if self.flying:
            return False
        return self.stopped or all(v.state in ("moved", "failed", "unplaceable", "gone") for v in self.vms.values())

    def state(self) -> str:
        if not self.settled:
            return "running"
        if self.stopped and any(v.state in ("waiting", "migrating") for v in self.vms.values()):
            return "stopped"
        return "done" if all(v.state in ("moved", "gone") for v in self.vms.values()) else "incomplete"

    def status(self, now: float, finished: float = 0.0, note: str = "") -> DrainStatus:
        return DrainStatus(self.id, self.host, self.state(), self.started, now, dict(self.vms), finished,
                           self.max_parallel, note)
