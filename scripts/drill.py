#!/usr/bin/env python3
"""Scripted cluster drills: N agents, VMs, migrations, faults, kills; invariants after every step.

    scripts/drill scripts/drills/basic.toml [--agents N] [--seed S] [--loopback]
    scripts/drill scripts/drills/cluster.toml       # with a real etcd cluster (scripts/cluster_drill.py)
    scripts/drill --containers scripts/drills/containers.toml

Each agent runs as its own process.  As root with `ip` available, each lives
in its own network namespace, joined to a bridge by a veth link (so link
rate limits with `tc tbf` are real); otherwise all run on loopback ports and
the drill says so.  Namespaces, links and processes it creates are removed
at the end, also on failure or Ctrl-C.

With --containers the agents are the containers of scripts/compose.yaml,
built and run by Podman from a private store (scripts/container_cluster.py):
the same steps (migrate, ring, concurrent, kill -9 of a container) and the
same invariants, between containers on their own network; every container,
volume, network and image it made is removed at the end, also on failure or
Ctrl-C, and so is what Podman left on the host.

Invariants checked after every step: each VM runs on exactly one agent;
digest continuity for VMs without a workload; no leftover state (no incoming
VM, no unfinished or in-doubt migration once settled); protected pages verify;
with etcd, the cluster record of every VM names the agent that runs it.
Exit status 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from palm_net.agent.launcher import AgentProcess, provision, provision_operator, remove_all  # noqa: E402
from palm_net.cli import CliError  # noqa: E402
from palm_net.hypervisor.qemu import live_processes  # noqa: E402
from palm_net.testing.proxy import ProxyThread, Rule  # noqa: E402

PORT = 7400
UNSETTLED = ("sending", "receiving", "prepared", "handed_off", "serving", "pulling")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


class ProcessCluster:
    """Agents as processes on this host: in network namespaces (root) or on loopback;
    with ``etcd`` members, an etcd cluster beside them (scripts/cluster_drill.py)."""

    def __init__(self, n: int, loopback: bool, root: Path, etcd: int = 0) -> None:
        self.root = root
        self.net = Network(n + etcd, loopback)
        self.etcd = None
        extra = ["--max-incoming", "8"]
        if etcd:
            from cluster_drill import DrillEtcd

            self.etcd = DrillEtcd(self.net, n, etcd)
        names = [f"agent{i}" for i in range(n)]
        ca = provision(root, names)
        if self.etcd is not None:  # `palm cluster` signs as an operator (the authority's key stays aside)
            self.etcd.signer = provision_operator(root, ca)
        self.agents = [AgentProcess(root, name, host=self.net.host(i), port=PORT if self.net.netns else None,
                                    prefix=self.net.prefix(i), extra=extra)
                       for i, name in enumerate(names)]
        self.kind = "network namespaces" if self.net.netns else "loopback"
        if etcd:
            self.kind += f", etcd of {etcd} members"

    def start(self) -> None:
        if self.etcd is not None:
            self.etcd.start()
            for ag in self.agents:
                ag.extra = [*ag.extra, *self.etcd.agent_args()]  # its members' addresses are known now
        for ag in self.agents:
            ag.start()

    def proxy_host(self) -> str:
        return self.net.proxy_host()

    def rate_limit(self, i: int, rate: str | None) -> str:
        return self.net.rate_limit(i, rate)

    def close(self) -> list[str]:
        remove_all(self.root, self.agents)
        if self.etcd is not None:
            self.etcd.stop()
        self.net.cleanup()
        return []


class Network:
    """Namespaces + veths on a bridge (root) or plain loopback."""

    def __init__(self, n: int, loopback: bool) -> None:
        self.tag = f"{os.getpid() % 10000}"
        self.netns = not loopback and os.geteuid() == 0 and shutil.which("ip") is not None
        self.bridge = f"palmbr{self.tag}"
        self.names = [f"palm{self.tag}n{i}" for i in range(n)]
        self.subnet = f"10.213.{os.getpid() % 200 + 1}"
        self.created: list[str] = []
        if self.netns:
            try:
                self._up(n)
            except subprocess.CalledProcessError as exc:
                self.cleanup()
                print(f"drill: network namespaces unavailable ({exc.stderr.strip()}); using loopback",
                      file=sys.stderr)
                self.netns = False
        if not self.netns:
            print("drill: running on loopback ports (network namespaces need root and iproute2)", file=sys.stderr)

    def _up(self, n: int) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.created.append("bridge")
        sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            host, peer = f"vh{self.tag}n{i}", f"vp{self.tag}n{i}"
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", ns)
            sh("ip", "link", "set", host, "master", self.bridge)
            sh("ip", "link", "set", host, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.subnet}.{i + 1}/24", "dev", peer)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", peer, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def host(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}" if self.netns else "127.0.0.1"

    def proxy_host(self) -> str:
        return f"{self.subnet}.254" if self.netns else "127.0.0.1"

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]] if self.netns else []

    def rate_limit(self, i: int, rate: str | None) -> str:
        if not self.netns:
            return "skipped (loopback)"
        dev = f"vp{self.tag}n{i}"
        if rate is None:
            sh("ip", "netns", "exec", self.names[i], "tc", "qdisc", "del", "dev", dev, "root", check=False)
            return "removed"
        sh("ip", "netns", "exec", self.names[i], "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
           "burst", "256kb", "latency", "100ms")
        return f"tbf {rate}"

    def cleanup(self) -> None:
        for ns in self.names:
            if ns in self.created:
                sh("ip", "netns", "del", ns, check=False)
        if "bridge" in self.created:
            sh("ip", "link", "del", self.bridge, check=False)
        self.created.clear()


@dataclass
class VmSpec:
    name: str
    on: int
    memory: str = "32MiB"
    protected: int = 1
    workload: str = "idle"
    digest: str | None = None
    backend: str = "model"  # or "qemu": a QEMU guest with known random content at QEMU_LOAD


QEMU_LOAD = 0x1000000  # where a drill's QEMU guest gets its random content (-device loader)
QEMU_CONTENT = 4 << 20


@dataclass
class StepResult:
    n: int
    action: str
    detail: str
    outcome: str
    downtime_ms: float | None = None
    violations: list[str] = field(default_factory=list)


class Cluster(Protocol):
    """Where a drill's agents run: ProcessCluster, or container_cluster.ContainerCluster."""

    agents: Sequence[AgentProcess]
    kind: str

    def start(self) -> None: ...

    def close(self) -> list[str]: ...  # what it could not remove


class Drill:
    def __init__(self, scenario: dict[str, Any], cluster: Cluster, seed: int, root: Path) -> None:
        self.sc = scenario
        self.rng = random.Random(seed)
        self.root = root
        self.cluster = cluster
        self.agents = cluster.agents
        self.vms: dict[str, VmSpec] = {}
        self.results: list[StepResult] = []
        self.counts: dict[str, int] = {}
        self.etcd = getattr(cluster, "etcd", None)  # scripts/cluster_drill.DrillEtcd, with etcd = N
        self.cluster_notes: list[str] = []

    def index(self, name: str | int) -> int:
        if isinstance(name, int):
            return name
        return int(str(name).removeprefix("agent").removeprefix("a"))

    # -- invariants

    def where(self) -> dict[str, list[tuple[int, str]]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for i, ag in enumerate(self.agents):
            for v in ag.request("vm.list", timeout=30):
                out.setdefault(v["name"], []).append((i, v["state"]))
        return out

    def settle(self, timeout: float = 60) -> list[str]:
        """Waits for in-doubt migrations to resolve, then checks every invariant."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self._check_once(final=time.monotonic() > deadline)
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(0.3)

    def _check_once(self, final: bool) -> list[str]:
        problems = []
        where = self.where()
        for name, spec in self.vms.items():
            copies = where.get(name, [])
            running = [i for i, s in copies if s == "running"]
            if len(running) > 1:
                problems.append(f"{name} RUNS TWICE on agents {running}")
                continue
            if len(running) != 1 or len(copies) != 1:
                problems.append(f"{name} not runnable on exactly one agent: {copies}")
                continue
            spec.on = running[0]
        for i, ag in enumerate(self.agents):
            for m in ag.request("migrations", timeout=30):
                if m["state"] in UNSETTLED:
                    problems.append(f"agent{i}: migration {m['migration_id'][:8]} still {m['state']}")
        if problems:
            return problems
        for name, spec in self.vms.items():
            ag = self.agents[spec.on]
            if spec.workload == "idle" and spec.digest is not None:
                if self.digest(ag, spec) != spec.digest:
                    problems.append(f"{name}: digest changed (memory lost or corrupted)")
            if spec.backend == "qemu":
                show = ag.request("vm.show", name=name, timeout=30)
                procs = live_processes(bytes.fromhex(show["vm_id"]))
                if show["qemu_status"] != "running" or procs != [show["pid"]]:
                    problems.append(f"{name}: QEMU says {show['qemu_status']}, QEMU processes on the host {procs}")
            if not ag.request("vm.verify", name=name, timeout=60)["ok"]:
                problems.append(f"{name}: protected pages fail verification")
        if self.etcd is not None and not problems:
            from cluster_drill import record_problems

            problems += record_problems(self)
        return problems

    # -- actions

    def create_vms(self) -> None:
        for v in self.sc.get("vm", []):
            backend = v.get("backend", "model")
            spec = VmSpec(v["name"], self.index(v.get("on", 0)), v.get("memory", "32MiB"),
                          v.get("protected", 1 if backend == "model" else 0), v.get("workload", "idle"),
                          backend=backend)
            ag = self.agents[spec.on]
            if backend == "qemu":
                if shutil.which("qemu-system-x86_64") is None:
                    raise SystemExit("drill: this scenario needs qemu-system-x86_64 (Debian qemu-system-x86)")
                content = ag.images_dir / f"{spec.name}.content"  # the loader reads only the images directory
                content.write_bytes(self.rng.randbytes(QEMU_CONTENT))
                ag.request("vm.create", name=spec.name, memory=spec.memory, backend="qemu", qemu_args=[
                    "-device", f"loader,file={content},addr={QEMU_LOAD:#x},force-raw=on"])
            else:
                ag.request("vm.create", name=spec.name, memory=spec.memory, protected=spec.protected,
                           workload=spec.workload, seed=self.rng.randrange(1 << 30), fill="random")
            if spec.workload == "idle":
                spec.digest = self.digest(ag, spec)
            self.vms[spec.name] = spec

    @staticmethod
    def digest(ag: AgentProcess, spec: VmSpec) -> str:
        """A running QEMU guest writes its RAM (its BIOS): its content region is what must not change."""
        args = {"range": f"{QEMU_LOAD:#x}:{QEMU_CONTENT}"} if spec.backend == "qemu" else {}
        return str(ag.request("vm.digest", name=spec.name, timeout=60, **args)["digest"])

    def scratch_vm(self, on: int) -> str:
        """A small idle VM on agent ``on`` for probes (made once, then checked like the others)."""
        name = f"probe{on}"
        if name not in self.vms:
            spec = VmSpec(name, on, "8MiB", 0)
            self.agents[on].request("vm.create", name=name, memory=spec.memory, fill="random")
            spec.digest = self.digest(self.agents[on], spec)
            self.vms[name] = spec
        return name

    def migrate_start(self, vm: str, to: int, **args: Any) -> tuple[threading.Thread, dict[str, Any]]:
        args.setdefault("reply_timeout", 5.0)
        return self.agents[self.vms[vm].on].migrate_async(vm, self.agents[to].addr, **args)

    def migrate_finish(self, vm: str, to: int, t: threading.Thread, result: dict[str, Any]) -> tuple[str, float | None]:
        t.join(300)
        r = result.get("result")
        if r is None:
            return f"source agent gone ({result.get('error', 'killed')})", None
        if r["ok"]:
            self.vms[vm].on = to
            return "migrated", r["downtime_ms"]
        return f"{r['status']}: {str(r['error'])[:60]}", None

    def migrate(self, vm: str, to: int, rule: Rule | None = None, kill: str | None = None,
                **args: Any) -> tuple[str, float | None]:
        spec = self.vms[vm]
        src, dst = self.agents[spec.on], self.agents[to]
        if spec.on == to:
            return "skipped (already there)", None
        target = dst.addr
        proxy = None
        if rule is not None:
            # In namespace mode the proxy listens on the bridge address of the root namespace.
            assert isinstance(self.cluster, ProcessCluster), "faults need agents as processes"
            proxy = ProxyThread((dst.host, dst.port), [rule], listen_host=self.cluster.proxy_host())
            proxy.__enter__()
            target = f"{self.cluster.proxy_host()}:{proxy.port}"
        args.setdefault("reply_timeout", 5.0)  # a dropped reply should cost seconds, not the 30 s default
        if kill:
            args.setdefault("bandwidth", "16MiB/s")  # slow enough for the kill to land mid-migration
        t, result = src.migrate_async(vm, target, **args)
        if kill:
            time.sleep(self.rng.uniform(0.05, 1.2))
            victim = src if kill == "source" else dst
            victim.stop(signal.SIGKILL)
            victim.start()
        t.join(300)
        if proxy is not None:
            proxy.__exit__()
        r = result.get("result")
        if r is None:
            return f"source agent gone ({result.get('error', 'killed')})", None
        if r["ok"]:
            spec.on = to
            return "migrated", r["downtime_ms"]
        return f"{r['status']}: {str(r['error'])[:60]}", None

    def random_fault(self) -> tuple[Rule | None, str | None, str]:
        kind = self.rng.choice(["cut", "flip", "drop", "delay", "duplicate", "kill-source", "kill-destination"])
        if kind.startswith("kill"):
            return None, kind.split("-")[1], kind
        direction = self.rng.choice(["c2s", "s2c"])
        frame = self.rng.randrange(1, 4) if direction == "s2c" else self.rng.randrange(3, 40)
        rule = Rule(direction, frame, kind if kind != "delay" else "delay", bit=self.rng.randrange(4096),
                    seconds=self.rng.uniform(0.1, 1.5))
        return rule, None, f"{kind} {direction}#{frame}"

    def run_step(self, n: int, step: dict[str, Any]) -> None:
        action = step["action"]
        t0 = time.monotonic()
        if action == "migrate":
            vm, to = step["vm"], self.index(step["to"])
            fault = dict(step.get("fault", {}))
            if "replay_of" in fault:
                fault["replay_of"] = tuple(fault["replay_of"])
            rule = Rule(**fault) if fault else None
            for kind in ([rule.action] if rule else []) + ([f"kill-{step['kill']}"] if step.get("kill") else []):
                self.counts[kind] = self.counts.get(kind, 0) + 1
            outcome, down = self.migrate(vm, to, rule, step.get("kill"), **step.get("args", {}))
            self._record(n, action, f"{vm} -> agent{to}" + (f" with {step['fault']}" if rule else "")
                         + (f" kill -9 {step['kill']}" if step.get("kill") else ""), outcome, down)
        elif action == "ring":
            vm = step["vm"]
            for _ in range(step.get("laps", 1) * len(self.agents)):
                to = (self.vms[vm].on + 1) % len(self.agents)
                outcome, down = self.migrate(vm, to)
                self._record(n, action, f"{vm} -> agent{to}", outcome, down)
        elif action == "concurrent":
            to = self.index(step["to"])
            out: dict[str, tuple[str, float | None]] = {}
            threads = [threading.Thread(target=lambda v=v: out.__setitem__(v, self.migrate(v, to)))
                       for v in step["vms"]]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            for v in step["vms"]:
                oc, down = out.get(v, ("no result", None))
                self._record(n, action, f"{v} -> agent{to}", oc, down)
        elif action == "rate":
            assert isinstance(self.cluster, ProcessCluster), "rate limits need agents as processes"
            detail = self.cluster.rate_limit(self.index(step["agent"]), step.get("rate"))
            self._record(n, action, f"agent{self.index(step['agent'])} {step.get('rate')}", detail)
        elif action == "random":
            count, p = step.get("count", 100), step.get("fault_probability", 0.3)
            for k in range(count):
                vm = self.rng.choice(sorted(self.vms))
                to = self.rng.choice([i for i in range(len(self.agents)) if i != self.vms[vm].on])
                rule, kill, desc = self.random_fault() if self.rng.random() < p else (None, None, "none")
                self.counts[desc.split()[0]] = self.counts.get(desc.split()[0], 0) + 1
                outcome, down = self.migrate(vm, to, rule, kill)
                self._record(n, action, f"#{k} {vm} -> agent{to} fault {desc}", outcome, down,
                             check=step.get("check_every", 1) and k % step.get("check_every", 1) == 0)
        else:
            from cluster_drill import run_step

            if not run_step(self, n, step):
                raise SystemExit(f"drill: unknown action {action!r}" + ("" if self.etcd else
                                                                       " (cluster steps need etcd = N in [drill])"))
        del t0

    def record(self, n: int, action: str, detail: str, outcome: str, down: float | None = None,
               check: bool = True) -> None:
        self._record(n, action, detail, outcome, down, check)

    def _record(self, n: int, action: str, detail: str, outcome: str, down: float | None = None,
                check: bool = True) -> None:
        violations = self.settle() if check else []
        self.results.append(StepResult(n, action, detail, outcome, down, violations))
        mark = "OK " if not violations else "VIOLATION"
        print(f"  [{len(self.results):4d}] {mark} {action:<10} {detail:<48} {outcome[:50]}"
              + (f" downtime {down:.1f} ms" if down is not None else "")
              + "".join(f"\n         ! {v}" for v in violations), flush=True)

    def table(self) -> str:
        rows = [f"{'#':>4}  {'step':<10} {'what':<52} {'outcome':<40} {'downtime':>9}  invariants"]
        for i, r in enumerate(self.results, 1):
            rows.append(f"{i:>4}  {r.action:<10} {r.detail[:52]:<52} {r.outcome[:40]:<40} "
                        f"{'-' if r.downtime_ms is None else f'{r.downtime_ms:.1f}':>9}  "
                        f"{'ok' if not r.violations else '; '.join(r.violations)}")
        migrated = sum(1 for r in self.results if r.outcome == "migrated")
        failed = sum(1 for r in self.results if r.action in ("migrate", "ring", "concurrent", "random")
                     and r.outcome != "migrated"
                     and not r.outcome.startswith("skipped"))
        viol = sum(len(r.violations) for r in self.results)
        downs = sorted(r.downtime_ms for r in self.results if r.downtime_ms is not None)
        med = f"{downs[len(downs) // 2]:.1f} ms" if downs else "-"
        rows.append("")
        rows.append(f"steps {len(self.results)}, migrations completed {migrated}, failed closed {failed}, "
                    f"median downtime {med}, faults injected {self.counts or {}}, invariant violations {viol}")
        rows += self.cluster_notes
        return "\n".join(rows)


def container_problem(sc: dict[str, Any]) -> str | None:
    """Why a scenario cannot run between containers (faults and rate limits act on host-side links)."""
    for v in sc.get("vm", []):
        if v.get("backend", "model") != "model":
            return f"VM {v.get('name')}: --containers drills model VMs only"
    for n, step in enumerate(sc.get("step", []), 1):
        if "fault" in step or step.get("action") == "rate" or (step.get("action") == "random"
                                                               and step.get("fault_probability", 0.3) > 0):
            return f"step {n} ({step.get('action')}): proxy faults and rate limits need agents as processes"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", type=Path)
    ap.add_argument("--agents", type=int, default=None, help="default: the scenario's, else 3")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--loopback", action="store_true", help="no network namespaces even as root")
    ap.add_argument("--containers", action="store_true",
                    help="the agents of scripts/compose.yaml as Podman containers (root; see README)")
    a = ap.parse_args()
    try:
        sc = tomllib.loads(a.scenario.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"drill: cannot read {a.scenario}: {exc}", file=sys.stderr)
        return 2
    meta = sc.get("drill", {})
    n = a.agents or meta.get("agents", 3)
    if a.containers:
        import container_cluster

        why = container_problem(sc) or container_cluster.missing()
        if why:
            print(f"drill: --containers: {why}", file=sys.stderr)
            return 2

    def on_signal(signum: int, _: Any) -> None:
        raise KeyboardInterrupt

    from palm_net import logs

    logs.configure("console", "warning")  # the drill's own etcd client: warnings only

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="palm-drill-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    cluster: Cluster | None = None
    rc = 1
    try:
        cluster = (container_cluster.ContainerCluster(n, root) if a.containers
                   else ProcessCluster(n, a.loopback, root, int(meta.get("etcd", 0))))
        drill = Drill(sc, cluster, a.seed if a.seed is not None else meta.get("seed", 1), root)
        print(f"drill {meta.get('name', a.scenario.stem)}: {len(drill.agents)} agents ({cluster.kind}), "
              f"root {root}", flush=True)
        cluster.start()
        drill.create_vms()
        problems = drill.settle()
        if problems:
            print("drill: invariants fail before any step: " + "; ".join(problems), file=sys.stderr)
            return 1
        for k, step in enumerate(sc.get("step", []), 1):
            drill.run_step(k, step)
        print()
        print(drill.table())
        rc = 1 if any(r.violations for r in drill.results) else 0
    except KeyboardInterrupt:
        print("drill: interrupted, cleaning up", file=sys.stderr)
        rc = 130
    except Exception as exc:
        if not a.containers or not isinstance(exc, (container_cluster.ContainerError, CliError)):
            raise
        print(f"drill: {exc}", file=sys.stderr)
        rc = 1
    finally:
        left = cluster.close() if cluster is not None else []
        log = root / "containers.log"
        if rc == 1 and log.exists():  # the podman commands' output, before it goes with the root
            print("drill: the last lines of the container log:\n" + "".join(log.read_text().splitlines(True)[-30:]),
                  file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        if a.containers:
            print(f"drill: {time.monotonic() - t0:.1f} s in all", flush=True)
    return rc or (1 if left else 0)


if __name__ == "__main__":
    sys.exit(main())
