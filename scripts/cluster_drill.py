"""The drill's etcd: a real etcd cluster beside the agents, and the cluster steps.

With ``etcd = N`` in a scenario's [drill] table, the drill starts N etcd
members, each in a network namespace of its own on the agents' bridge (or on
loopback ports without namespaces), and every agent with ``--etcd`` naming
all of them.  Steps:

    drain       agent, [args]    `palm cluster drain agentK --json` (the real command), its summary
    undrain     agent
    etcd-kill   member ("leader" or an index); a migration runs meanwhile
    etcd-restart member
    etcd-cut    agent, vm, to    the agent cut off from etcd (iptables in its namespace) while the
                                 VM migrates to or from it; then healed
    revoke      agent, vm, to    `palm cluster revoke` while the VM migrates from/to the agent (slowly);
                                 then every other agent must refuse a migration to it
    unrevoke    agent

Invariant added to the drill's: once settled, the cluster record of every VM
names the agent that runs it, and no record names a VM the drill does not
know; nothing was started or lost because of etcd (the drill's own
exactly-one-copy check).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

from palm_net.cluster.admin import read_cluster
from palm_net.cluster.etcd import EtcdClient, EtcdConfig
from palm_net.cluster.model import Keys
from palm_net.testing.etcd import EtcdCluster, find_etcd

PREFIX = "/palm/"


class DrillEtcd:
    """The drill's etcd members, in namespaces ``first..first+n-1`` of the drill's network."""

    def __init__(self, net: Any, first: int, n: int) -> None:
        if find_etcd() is None:
            raise SystemExit("drill: this scenario needs etcd (Debian etcd-server)")
        self.net = net
        self.first = first
        if net.netns:
            hosts = [net.host(first + i) for i in range(n)]
            prefixes = [net.prefix(first + i) for i in range(n)]
            self.cluster = EtcdCluster(n, hosts=hosts, prefixes=prefixes, heartbeat_ms=100, election_ms=1000)
        else:
            self.cluster = EtcdCluster(n, heartbeat_ms=100, election_ms=1000)
        self.cut_agents: set[int] = set()
        self.signer: Path | None = None  # the operator's directory (`palm cluster --signer`), once provisioned

    def start(self) -> None:
        self.cluster.start()

    @property
    def urls(self) -> str:
        return ",".join(self.cluster.urls)

    def agent_args(self) -> list[str]:
        return ["--etcd", self.urls, "--capacity", "1GiB"]

    def stop(self) -> None:
        for i in list(self.cut_agents):
            self.heal(i)
        self.cluster.stop()

    # -- partitions

    def _rules(self, i: int, op: str) -> None:
        ns = self.net.prefix(i)
        for rule in (["OUTPUT", "-p", "tcp", "--dport", "2379", "-j", "REJECT", "--reject-with", "tcp-reset"],
                     ["INPUT", "-p", "tcp", "--sport", "2379", "-j", "DROP"]):
            subprocess.run([*ns, "iptables", op, *rule], check=True, capture_output=True)

    def cut(self, i: int) -> str:
        if not self.net.netns:
            return "skipped (loopback: no namespace to cut)"
        self._rules(i, "-A")
        self.cut_agents.add(i)
        return "cut"

    def heal(self, i: int) -> None:
        if i in self.cut_agents:
            self._rules(i, "-D")
            self.cut_agents.discard(i)

    # -- reading the cluster

    def view(self) -> Any:
        async def go() -> Any:
            async with EtcdClient(EtcdConfig.from_urls(self.urls)) as etcd:
                return await read_cluster(etcd, Keys(PREFIX))

        return trio.run(go)

    def palm(self, *args: str, timeout: float = 600) -> tuple[int, dict[str, Any] | None, str, float]:
        """Runs the real `palm cluster` command (from the root namespace); (rc, JSON, stderr, seconds)."""
        t0 = time.monotonic()
        env = {**os.environ, **({"PALM_SIGNER": str(self.signer)} if self.signer else {})}
        p = subprocess.run([sys.executable, "-m", "palm_net.cli", "cluster", *args, "--etcd", self.urls, "--json"],
                           capture_output=True, text=True, timeout=timeout, env=env)
        took = time.monotonic() - t0
        try:
            out = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            out = None
        return p.returncode, out, p.stderr, took


def record_problems(drill: Any) -> list[str]:
    """The cluster records against where the drill's VMs run (drill.vms, settled)."""
    etcd: DrillEtcd = drill.etcd
    try:
        view = etcd.view()
    except Exception as exc:  # etcd itself unreachable from the drill: report, do not crash
        return [f"cannot read the cluster: {exc}"]
    by_name: dict[str, list[str]] = {}
    for rec in view.vms.values():
        by_name.setdefault(rec.name, []).append(rec.agent)
    problems = []
    for name, spec in drill.vms.items():
        agents = by_name.pop(name, [])
        want = f"agent{spec.on}"
        if agents != [want]:
            problems.append(f"{name}: cluster record says {agents or 'nothing'}, the handoff says {want}")
    for name, agents in by_name.items():
        problems.append(f"record for unknown VM {name} on {agents}")
    problems += [f"invalid record: {p}" for p in view.problems]
    problems += [f"{a.name} reports {a.conflicts} VM records another agent also claims"
                 for a in view.agents.values() if a.conflicts]
    return problems


def settle_records(drill: Any, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        problems = record_problems(drill)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.3)


def toward(drill: Any, vm: str, i: int) -> int:
    """Where to migrate ``vm`` so that agent ``i`` takes part: to it, or away from it if it is there."""
    return i if drill.vms[vm].on != i else (i + 1) % len(drill.agents)


def run_step(drill: Any, n: int, step: dict[str, Any]) -> bool:
    """The cluster's steps; False if ``step`` is not one of them."""
    action = step["action"]
    etcd: DrillEtcd | None = getattr(drill, "etcd", None)
    if etcd is None:
        return False
    if action == "drain":
        i = drill.index(step["agent"])
        args = [str(a) for a in step.get("args", [])]
        stop = threading.Event()
        moves: list[tuple[str, float | None]] = []
        bg = None
        if "background" in step:  # the cluster busy meanwhile: a VM migrating back and forth elsewhere
            vm, between = step["background"], [drill.index(x) for x in step["between"]]

            def background() -> None:
                k = 0
                while not stop.is_set():
                    to = between[k % 2] if drill.vms[vm].on != between[k % 2] else between[(k + 1) % 2]
                    moves.append(drill.migrate(vm, to))
                    k += 1

            bg = threading.Thread(target=background, daemon=True)
            bg.start()
        rc, out, err, took = etcd.palm("drain", f"agent{i}", *args)
        stop.set()
        if bg is not None:
            bg.join(300)
            ok = sum(1 for m in moves if m[0] == "migrated")
            drill.record(n, "background", f"{step['background']} back and forth during the drain",
                         f"{ok} of {len(moves)} migrations completed", check=False)
        if out is None:
            drill.record(n, action, f"agent{i}", f"no summary (rc {rc}): {err.strip()[-200:]}")
            return True
        for name, v in out["vms"].items():
            if v["state"] == "moved" and name in drill.vms:
                drill.vms[name].on = drill.index(v["to"])
        drill.cluster_notes.append(out["summary"])
        drill.record(n, action, f"agent{i}: {len(out['vms'])} VMs", f"{out['state']} in {took:.1f} s: "
                     f"{out['counts']['moved']} moved, {out['counts']['failed']} failed")
        return True
    if action == "undrain":
        i = drill.index(step["agent"])
        rc, out, err, _ = etcd.palm("undrain", f"agent{i}")
        drill.record(n, action, f"agent{i}", "undrained" if rc == 0 else f"rc {rc}: {err.strip()[-100:]}")
        return True
    if action == "etcd-kill":
        which = step.get("member", "leader")
        i = etcd.cluster.leader() if which == "leader" else int(which)
        etcd.cluster.kill(i)
        drill.record(n, action, f"member m{i}{' (the leader)' if which == 'leader' else ''}", "killed")
        if "vm" in step:
            outcome, down = drill.migrate(step["vm"], drill.index(step["to"]))
            drill.record(n, "migrate", f"{step['vm']} -> agent{drill.index(step['to'])} (a member down)", outcome,
                         down)
        return True
    if action == "etcd-restart":
        i = int(step["member"]) if "member" in step else next(k for k, m in enumerate(etcd.cluster.members)
                                                               if not m.running)
        t0 = time.monotonic()
        etcd.cluster.restart(i)
        drill.record(n, action, f"member m{i}", f"serving again after {time.monotonic() - t0:.1f} s")
        return True
    if action == "etcd-cut":
        # In the middle of a migration (slowed down), the agent loses etcd; the migration
        # ends by the handoff alone; the record is fixed by whoever can reach etcd, or
        # by the agent itself once healed.
        i, vm = drill.index(step["agent"]), step["vm"]
        to = toward(drill, vm, i)
        cut = [i] + ([drill.vms[vm].on if to == i else to] if step.get("with_peer") else [])
        t, result = drill.migrate_start(vm, to, bandwidth=step.get("bandwidth", "32MiB/s"))
        time.sleep(float(step.get("after", 0.5)))
        how = ", ".join(etcd.cut(k) for k in cut)
        drill.record(n, action, f"{' and '.join(f'agent{k}' for k in cut)} cut off from etcd mid-migration", how,
                     check=False)
        outcome, down = drill.migrate_finish(vm, to, t, result)
        drill.record(n, "migrate", f"{vm} -> agent{to} (agent{i} cut off)", outcome, down, check=False)
        time.sleep(float(step.get("hold", 2.0)))
        before = record_problems(drill)
        t0 = time.monotonic()
        for k in cut:
            etcd.heal(k)
        problems = settle_records(drill)
        drill.record(n, "etcd-heal", f"record {'STALE' if before else 'right'} before the heal",
                     f"records converged in {time.monotonic() - t0:.1f} s" if not problems else "NOT converged")
        if before:
            drill.cluster_notes.append(f"etcd-cut: before the heal: {'; '.join(before)}")
        return True
    if action == "revoke":
        i, vm = drill.index(step["agent"]), step.get("vm")
        t = result = None
        to = toward(drill, vm, i) if vm is not None else i
        if vm is not None:
            t, result = drill.migrate_start(vm, to, bandwidth=step.get("bandwidth", "8MiB/s"))
            time.sleep(float(step.get("after", 1.0)))
        rc, out, err, took = etcd.palm("revoke", f"agent{i}", "--reason", "drill")
        acks = (out or {}).get("acks") or {}
        slowest = max(acks.get("acknowledged_ms", {}).values(), default=float("nan"))
        line = (f"in force on {len(acks.get('acknowledged_ms', {}))} agents after {slowest:.0f} ms"
                + (f", missing {acks['missing']}" if acks.get("missing") else ""))
        drill.cluster_notes.append(f"revoke agent{i}: {line} (command {took * 1000:.0f} ms in all)")
        drill.record(n, action, f"agent{i}", line, check=False)
        if vm is not None and t is not None and result is not None:
            outcome, down = drill.migrate_finish(vm, to, t, result)
            drill.record(n, "migrate", f"{vm} -> agent{to} (agent{i} revoked meanwhile)", outcome, down)
        # every other agent refuses it now: a migration to it fails, and nothing moves
        refused = 0
        others = [k for k in range(len(drill.agents)) if k != i]
        for k in others:
            name = drill.scratch_vm(k)
            outcome, _ = drill.migrate(name, i)
            refused += outcome != "migrated"
        drill.record(n, "check", f"{len(others)} agents migrate to agent{i}",
                     f"refused by {refused} of {len(others)}" + ("" if refused == len(others) else " (NOT ALL)"))
        if refused != len(others):
            drill.results[-1].violations.append(f"agent{i} revoked but {len(others) - refused} migrations to it "
                                                "went through")
        return True
    if action == "unrevoke":
        i = drill.index(step["agent"])
        rc, out, err, took = etcd.palm("unrevoke", f"agent{i}")
        acks = (out or {}).get("acks") or {}
        slowest = max(acks.get("acknowledged_ms", {}).values(), default=float("nan"))
        drill.record(n, action, f"agent{i}", f"in force on {len(acks.get('acknowledged_ms', {}))} agents after "
                                            f"{slowest:.0f} ms")
        return True
    return False

