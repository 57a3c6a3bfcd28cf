#!/usr/bin/env python3
"""The cluster at scale: a real 3-member etcd and N simulated agents (issue 22.7).

    scripts/cluster_scale.py [--agents 1000] [--processes 4] [--json]

Starts a 3-member etcd on loopback ports (palm_net.testing.etcd), an
authority and an operator key (as `palm ca issue --role operator`), and N
simulated agents spread over P worker processes.  Each simulated agent is
the real agent's cluster member (palm_net.cluster.member.ClusterMember: its
signed agent record under a lease, kept alive; the signed policy under
config/ read and watched, every document verified against the authority's
key by palm_net.cluster.policy and kept in its own state directory; its own
drain key watched; its drains run) with a stub in place of the hypervisor:
no VMs (but the drained one's), migrations that succeed at once.

Then, measured:

- revocation: the operator revokes one agent through palm_net.cluster.admin.revoke
  (what `palm cluster revoke` runs).  Each simulated agent notes the monotonic
  time at which its member hands lists that refuse that agent (by name and
  static key) to its gate; the delay is from the moment etcd's answer to the
  write came back to the operator (CLOCK_MONOTONIC is one clock for every
  process of the machine).  Median, p99, worst, and how many enforced it; also
  what `palm cluster revoke` itself reports (each agent's acknowledgement,
  lists_revision in its record, from before the write).
- drain plan: for one host with --vms VMs among the N agents, what the drained
  agent's drainer does before its first migrations: read every agent record
  and drain request from etcd, verifying each (palm_net.cluster.drainer.candidates),
  then DrainPlan.next placing all the VMs at once (max_source = the VM count);
  timed apart, --repeat times.  Then a real drain (`palm cluster drain`'s
  request_drain and follow_drain) with KubeVirt's default limits, its
  migrations instant: the drain machinery's own time.
- the etcd members' and the workers' CPU time and RSS (/proc, getrusage),
  and their CPU while the N agents are idle for --idle seconds.

Everything listens on 127.0.0.1; the state (etcd's data, each simulated
agent's policy file) is on tmpfs when /dev/shm exists (no disk fsync is
timed).  Every wait is bounded; the whole run stops after --timeout seconds;
the etcd members, the worker processes and the temporary directory are
removed at the end, also on failure or Ctrl-C.  Exit status 1 with one line
on stderr if something failed or not every agent enforced the revocation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import structlog  # noqa: E402
import trio  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from palm_net.agent.launcher import provision_operator  # noqa: E402
from palm_net.cluster.admin import AdminError, follow_drain, request_drain, revoke  # noqa: E402
from palm_net.cluster.converge import Fact  # noqa: E402
from palm_net.cluster.drainer import candidates  # noqa: E402
from palm_net.cluster.etcd import EtcdClient, EtcdConfig  # noqa: E402
from palm_net.cluster.etcdwire import EtcdError  # noqa: E402
from palm_net.cluster.gate import Lists  # noqa: E402
from palm_net.cluster.host import DrainOutcome  # noqa: E402
from palm_net.cluster.member import ClusterMember, MemberConfig  # noqa: E402
from palm_net.cluster.model import AgentRecord, DrainOptions, DrainStatus, Keys  # noqa: E402
from palm_net.cluster.placement import DrainPlan, Movable  # noqa: E402
from palm_net.cluster.policy import PolicyStore, Signer, seal_record  # noqa: E402
from palm_net.crypto.identity import AgentIdentity, Authority, Certificate  # noqa: E402
from palm_net.crypto.noise import keypair_from_private  # noqa: E402
from palm_net.testing.etcd import EtcdCluster, find_etcd  # noqa: E402

PREFIX = "/palm-scale/"
KEYS = Keys(PREFIX)
GIB = 1 << 30
MEASUREMENT = bytes.fromhex("5c" * 32)
VM_MEMORY = 2 * GIB


class ScaleError(Exception):
    """The run failed (one line)."""


# ------------------------------------------------------------------ a simulated agent


class SimHost:
    """What ClusterMember needs of its agent (palm_net.cluster.host.ClusterHost), without a
    hypervisor: a signed record, lists it notes the time of, VMs only on the drained host."""

    def __init__(self, index: int, ident: AgentIdentity, cert: Certificate, target: str, target_pub: bytes,
                 vms: int) -> None:
        self.ident, self.cert = ident, cert
        self._name = ident.name
        self.addr = f"127.0.0.1:{20000 + index}"  # never dialled: the drain's migrations are stubs
        self.capacity = 256 * GIB
        self.free_mem = (8 + (index * 7919) % 200) * GIB  # varied, so placement has something to choose
        self.started = time.time()
        self.target, self.target_pub = target, target_pub
        self.vms = {f"vm{k:02d}": VM_MEMORY for k in range(vms)}
        self._lists = Lists()
        self.first_lists: float | None = None  # monotonic: its member first read the policy from etcd
        self.enforced_at: float | None = None  # monotonic: its lists refuse the target
        self.migrated = 0

    @property
    def name(self) -> str:
        return self._name

    def advertise(self) -> AgentRecord:
        return AgentRecord(self._name, self.addr, MEASUREMENT.hex(), self.ident.static.public.hex(),
                           ("source", "destination"), self.capacity, self.free_mem, len(self.vms), "scale",
                           self.started)

    def seal(self, body: bytes, kind: str = "agent") -> bytes:
        return seal_record(body, self.ident.signing, self.cert, kind)

    def vm_facts(self) -> dict[str, Fact]:
        return {}

    def apply_lists(self, lists: Lists) -> None:
        self._lists = lists
        if lists.revision and self.first_lists is None:
            self.first_lists = time.monotonic()
        if self.enforced_at is None and lists.is_revoked(self.target, self.target_pub):
            self.enforced_at = time.monotonic()

    @property
    def lists(self) -> Lists:
        return self._lists

    def movable(self) -> list[Movable]:
        return [Movable(name, mem, "any") for name, mem in sorted(self.vms.items())]

    def departed(self) -> dict[str, str]:
        return {}

    async def drain_migrate(self, name: str, addr: str, on_sent: Any, bandwidth: int = 0) -> DrainOutcome:
        await trio.sleep(0)  # no guest: the drain's own machinery is what is timed
        on_sent(self.vms.pop(name, 0))
        self.migrated += 1
        return DrainOutcome(True)

    def drain_cancel(self, name: str, why: str) -> None:
        pass


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "maxrss_mib": round(ru.ru_maxrss / 1024, 1)}


async def _worker(spec: dict[str, Any], lifetime: float) -> None:
    ap = spec["authority_pub"]
    root = Path(spec["root"])
    hosts: list[SimHost] = []
    members: list[ClusterMember] = []
    urls = spec["endpoints"]
    for index, name, x, ed, cert in spec["agents"]:
        ident = AgentIdentity(name, keypair_from_private(x), SigningKey(ed))
        host = SimHost(index, ident, Certificate.decode(cert), spec["target"], spec["target_pub"],
                       spec["drain_vms"] if name == spec["drained"] else 0)
        state = root / "state" / name
        state.mkdir(mode=0o700, parents=True)
        k = index % len(urls)  # each agent names every member, starting from another one: the load spreads
        cfg = MemberConfig(EtcdConfig(tuple(urls[k:] + urls[:k])), KEYS, state, ap)
        hosts.append(host)
        members.append(ClusterMember(cfg, host))
    t0 = time.monotonic()
    stopped = trio.Event()

    async def commands() -> None:
        """The main process's lines: ``usage``, ``stop``; its end (EOF) stops this worker too."""
        stdin = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while len(buf) < 4096:
            data = await stdin.receive_some(4096)
            if not data:
                break  # the main process is gone
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if line == b"stop":
                    stopped.set()
                    return
                if line == b"usage":
                    _emit({"usage": _usage()})
        stopped.set()

    with trio.move_on_after(lifetime):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commands)
            for i, m in enumerate(members):
                nursery.start_soon(m.run)
                if i % 10 == 9:
                    await trio.sleep(0.02)  # a staggered start: 500 agents a second per worker at most
            while not stopped.is_set() and not all(m.lease is not None and h.first_lists is not None
                                                   for m, h in zip(members, hosts)):
                await trio.sleep(0.1)
            if not stopped.is_set():
                _emit({"ready": len(hosts), "seconds": round(time.monotonic() - t0, 2)})
            announced = False
            while not stopped.is_set():
                if not announced and all(h.enforced_at is not None for h in hosts):
                    _emit({"enforced_all": len(hosts)})
                    announced = True
                with trio.move_on_after(0.05):  # the times are taken by the agents: this only announces
                    await stopped.wait()
            nursery.cancel_scope.cancel()
    _emit({"result": {"enforced": {h.name: h.enforced_at for h in hosts},
                      "refused": sum(sum(m.policy.refused.values()) for m in members),
                      "migrated": sum(h.migrated for h in hosts), **_usage()}})


def worker_main(spec_path: str, lifetime: float) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = msgpack.unpackb(Path(spec_path).read_bytes(), raw=False)
    try:
        trio.run(_worker, spec, lifetime)
    except BaseException as exc:
        print(f"cluster_scale worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    return 0


# ------------------------------------------------------------------ the main process


class Worker:
    def __init__(self, i: int, root: Path, spec: Path, lifetime: float, out: queue.Queue[tuple[int, Any]]) -> None:
        self.i = i
        self.log = root / f"worker{i}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(spec), "--timeout", str(lifetime)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        self.thread = threading.Thread(target=self._read, args=(out,), daemon=True)
        self.thread.start()

    def _read(self, out: queue.Queue[tuple[int, Any]]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                out.put((self.i, json.loads(line)))
            except ValueError:
                print(f"cluster_scale: worker {self.i} said {line[:200]!r}", file=sys.stderr)
        out.put((self.i, None))  # exited

    def send(self, what: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(what.encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass

    def tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return " | ".join(ln[:200] for ln in lines[-3:]) or "no output"



def _collect(q: queue.Queue[tuple[int, Any]], workers: list[Worker], key: str, deadline: float,
             what: str) -> dict[int, Any]:
    got: dict[int, Any] = {}
    while len(got) < len(workers):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [w.i for w in workers if w.i not in got]
            raise ScaleError(f"{what}: workers {missing} did not answer in time ({workers[missing[0]].tail()})")
        try:
            i, msg = q.get(timeout=min(left, 1.0))
        except queue.Empty:
            continue
        if msg is None:
            if i in got:
                continue  # it answered, then exited (after "stop")
            rc = workers[i].proc.wait()
            raise ScaleError(f"{what}: worker {i} exited with status {rc}: {workers[i].tail()}")
        if key in msg:
            got[i] = msg
    return got


def _proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        rss = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if ln.startswith("VmRSS:")) / 1024
        return cpu, rss
    except (OSError, ValueError, StopIteration, IndexError):
        return 0.0, 0.0


def _etcd_usage(etcd: EtcdCluster) -> list[tuple[float, float]]:
    return [_proc_usage(m.proc.pid) if m.proc is not None else (0.0, 0.0) for m in etcd.members]


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _ms(x: float) -> float:
    return round(x * 1000, 1)


async def _revoke(cfg: EtcdConfig, signer: Signer, target: str, wait: float) -> dict[str, Any]:
    async with EtcdClient(cfg) as etcd:
        changed = await revoke(etcd, KEYS, signer, target, "cluster_scale", "cluster_scale", wait)
    acks = changed.acks
    assert acks is not None
    return {"sent": changed.sent, "written": changed.written, "acks": list(acks.seconds.values()),
            "missing": len(acks.missing), "gone": len(acks.gone)}


async def _drain(cfg: EtcdConfig, signer: Signer, ca_pub: bytes, drained: str, vms: int, target: str,
                 target_pub: bytes, repeat: int, timeout: float) -> dict[str, Any]:
    here = [Movable(f"vm{k:02d}", VM_MEMORY, "any") for k in range(vms)]
    lists = Lists(frozenset({target}), None, 1, time.time(), frozenset({target_pub}))
    reads, places = [], []
    out: dict[str, Any] = {"vms": vms}
    async with EtcdClient(cfg) as etcd:
        for _ in range(repeat):
            store = PolicyStore(ca_pub, KEYS, drained)  # the drained agent's, for what it counts
            t0 = time.perf_counter()
            cands = await candidates(etcd, KEYS, drained, lists, store)
            t1 = time.perf_counter()
            plan = DrainPlan.resume("00" * 8, drained, DrainOptions(max_cluster=vms, max_source=vms), time.time(),
                                    None)
            plan.refresh(here)
            picks = plan.next(here, cands, vms)
            t2 = time.perf_counter()
            reads.append(t1 - t0)
            places.append(t2 - t1)
            if len(picks) != vms or any(c.name in (drained, target) for _, c in picks):
                raise ScaleError(f"drain plan: {len(picks)} of {vms} VMs placed, or on the drained or revoked host")
            out["candidates"] = len(cands)
            out["refused_records"] = sum(store.refused.values())
            out["destinations"] = len({c.name for _, c in picks})
        out["read_ms"] = [_ms(x) for x in reads]
        out["place_ms"] = [_ms(x) for x in places]
        # The real drain: request_drain as `palm cluster drain` writes it, the drained agent's
        # member runs it (KubeVirt's limits: 5 in the cluster, 2 from the host), migrations instant.
        t0 = time.monotonic()
        req, _, _ = await request_drain(etcd, KEYS, signer, drained, DrainOptions(), "cluster_scale")
        end: DrainStatus | None = None
        with trio.move_on_after(timeout):
            end = await follow_drain(etcd, KEYS, drained, req.id, lambda st: None)
        out["drain_s"] = round(time.monotonic() - t0, 2)
        if end is None:
            raise ScaleError(f"the drain of {drained} did not end within {timeout:.0f} s")
        out["drain_state"] = end.state
        out["drain_counts"] = end.counts()
        out["drain_max_parallel"] = end.max_parallel
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    if find_etcd() is None:
        raise ScaleError("no etcd binary (Debian's etcd-server, or PALM_ETCD)")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None  # state on tmpfs: no disk fsync timed
    root = Path(tempfile.mkdtemp(prefix="palm-scale-", dir=base))
    etcd = EtcdCluster(3, heartbeat_ms=100, election_ms=1000)  # etcd's own default timers
    workers: list[Worker] = []
    res: dict[str, Any] = {"agents": args.agents, "processes": args.processes, "etcd_members": 3,
                           "state_on": "tmpfs" if base else "disk", "cpus": os.cpu_count()}
    try:
        etcd.start()
        cfg = etcd.config()
        ca = Authority.generate()
        ca.save(root / "ca")
        signer = Signer.load(provision_operator(root, ca, "ops"))
        names = [f"sim{i:04d}" for i in range(args.agents)]
        drained, target = names[0], names[-1]
        agents: list[list[Any]] = []
        for i, name in enumerate(names):
            ident = AgentIdentity.generate(name)
            cert = ca.issue(name, ident.static.public, ident.sign_pub, MEASUREMENT, days=1)
            agents.append([i, name, ident.static.private, bytes(ident.signing), cert.encode()])
        target_pub = keypair_from_private(agents[-1][2]).public
        lifetime = max(10.0, deadline - time.monotonic() + 10)  # a worker outlives the main process by 10 s at most
        q: queue.Queue[tuple[int, Any]] = queue.Queue()
        for k in range(args.processes):
            spec = root / f"worker{k}.spec"
            fd = os.open(spec, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private keys: the owner's only
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb({"root": str(root), "endpoints": list(cfg.endpoints),
                                       "authority_pub": ca.public, "target": target, "target_pub": target_pub,
                                       "drained": drained, "drain_vms": args.vms,
                                       "agents": agents[k::args.processes]}))
            workers.append(Worker(k, root, spec, lifetime, q))
        ready = _collect(q, workers, "ready", min(deadline, time.monotonic() + args.start_timeout),
                         f"{args.agents} agents registering")
        res["registered_s"] = round(time.monotonic() - t_start, 1)
        res["worker_start_s"] = max(r["seconds"] for r in ready.values())
        # idle: N agents registered, keeping their leases alive and watching
        e0, c0 = _etcd_usage(etcd), _collect_usage(q, workers, deadline)
        time.sleep(args.idle)
        e1, c1 = _etcd_usage(etcd), _collect_usage(q, workers, deadline)
        res["idle"] = {"seconds": args.idle,
                       "etcd_cpu_pct": [round(100 * (b[0] - a[0]) / max(args.idle, 0.001)) for a, b in zip(e0, e1)],
                       "workers_cpu_pct": round(100 * sum(c1[i]["usage"]["cpu_s"] - c0[i]["usage"]["cpu_s"] for i in c0)
                                                / max(args.idle, 0.001))}
        # the revocation
        rv = trio.run(_revoke, cfg, signer, target, min(60.0, max(1.0, deadline - time.monotonic() - 5)))
        try:
            _collect(q, workers, "enforced_all", min(deadline, time.monotonic() + 60), "enforcing the revocation")
        except ScaleError as exc:  # not every agent enforced it: the figures still say how many did
            if "exited" in str(exc):
                raise
            res["note"] = str(exc)
        # the drain
        res["drain"] = trio.run(_drain, cfg, signer, ca.public, drained, args.vms, target, target_pub, args.repeat,
                                min(120.0, max(1.0, deadline - time.monotonic() - 5)))
        e2 = _etcd_usage(etcd)
        for w in workers:
            w.send("stop")
        results = {i: m["result"] for i, m in _collect(q, workers, "result", deadline + 10,
                                                        "the workers' results").items()}
        enforced = {k: v for r in results.values() for k, v in r["enforced"].items()}
        delays = [v - rv["written"] for v in enforced.values() if v is not None]
        acks = rv["acks"]
        res["revocation"] = {
            "enforced": len(delays), "of": args.agents,
            "median_ms": _ms(statistics.median(delays)) if delays else None,
            "p99_ms": _ms(_quantile(delays, 0.99)) if delays else None,
            "worst_ms": _ms(max(delays)) if delays else None,
            "earliest_ms": _ms(min(delays)) if delays else None,
            "write_ms": _ms(rv["written"] - rv["sent"]),
            "acknowledged": len(acks), "ack_missing": rv["missing"],
            "ack_median_ms": _ms(statistics.median(acks)) if acks else None,
            "ack_worst_ms": _ms(max(acks)) if acks else None,
            "refused_documents": sum(r["refused"] for r in results.values()),
        }
        res["etcd"] = [{"member": f"m{i}", "cpu_s": round(c, 1), "rss_mib": round(r)} for i, (c, r) in enumerate(e2)]
        res["workers"] = [{"worker": i, "cpu_s": r["cpu_s"], "maxrss_mib": r["maxrss_mib"]}
                          for i, r in sorted(results.items())]
        res["total_s"] = round(time.monotonic() - t_start, 1)
        return res
    finally:
        for w in workers:  # each has exited after "stop", or is killed now (a failure, Ctrl-C)
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
        etcd.stop()
        if os.environ.get("PALM_SCALE_KEEP"):  # debugging: the workers' logs stay
            print(f"cluster_scale: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _collect_usage(q: queue.Queue[tuple[int, Any]], workers: list[Worker], deadline: float) -> dict[int, Any]:
    for w in workers:
        w.send("usage")
    return _collect(q, workers, "usage", min(deadline, time.monotonic() + 30), "usage")


def report(res: dict[str, Any]) -> str:
    r, d = res["revocation"], res["drain"]
    lines = [
        f"cluster scale: {res['agents']} simulated agents in {res['processes']} processes, a 3-member etcd on "
        f"loopback, {res['cpus']} CPUs (state on {res['state_on']})",
        f"  registered in {res['registered_s']} s; idle for {res['idle']['seconds']} s: etcd members "
        f"{'/'.join(str(x) for x in res['idle']['etcd_cpu_pct'])} % CPU, the agents' processes "
        f"{res['idle']['workers_cpu_pct']} % CPU",
        f"  revocation enforced by {r['enforced']} of {r['of']} agents: median {r['median_ms']} ms, p99 "
        f"{r['p99_ms']} ms, worst {r['worst_ms']} ms after the write returned (write {r['write_ms']} ms; earliest "
        f"{r['earliest_ms']} ms)",
        f"  `palm cluster revoke` saw {r['acknowledged']} acknowledgements ({r['ack_missing']} missing): median "
        f"{r['ack_median_ms']} ms, last {r['ack_worst_ms']} ms from before the write",
        f"  drain plan of {d['vms']} VMs among {d['candidates']} candidates: reading and "
        f"verifying the records {statistics.median(d['read_ms']):.1f} ms (median of {len(d['read_ms'])}; worst "
        f"{max(d['read_ms']):.1f}), placing them {statistics.median(d['place_ms']):.1f} ms (worst "
        f"{max(d['place_ms']):.1f}) "
        f"onto {d['destinations']} hosts",
        f"  real drain, migrations instant, 5 in the cluster and 2 from the host at most: {d['drain_state']} in "
        f"{d['drain_s']} s ({d['drain_counts'].get('moved', 0)} moved)",
        "  etcd " + ", ".join(f"{e['member']} {e['cpu_s']} s CPU {e['rss_mib']} MiB" for e in res["etcd"])
        + "; workers " + ", ".join(f"{w['cpu_s']} s CPU {w['maxrss_mib']} MiB" for w in res["workers"]),
        f"  run took {res['total_s']} s",
    ]
    if res.get("note"):
        lines.append(f"  NOTE: {res['note']}")
    return "\n".join(lines)


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000, metavar="N", help="simulated agents (default 1000)")
    ap.add_argument("--processes", type=int, default=4, metavar="P", help="worker processes (default 4)")
    ap.add_argument("--vms", type=int, default=20, metavar="N", help="VMs on the drained host (default 20)")
    ap.add_argument("--repeat", type=int, default=5, metavar="N", help="drain plans timed (default 5)")
    ap.add_argument("--idle", type=float, default=5.0, metavar="S",
                    help="seconds the registered agents idle while CPU is measured (default 5)")
    ap.add_argument("--start-timeout", type=float, default=180.0, metavar="S",
                    help="for every agent to register and read the policy (default 180)")
    ap.add_argument("--timeout", type=float, default=290.0, metavar="S", help="the whole run (default 290)")
    ap.add_argument("--json", action="store_true", help="the figures as JSON")
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.timeout)
    if not 2 <= args.agents <= 5000 or not 1 <= args.processes <= 64 or not 1 <= args.vms <= 100:
        ap.error("--agents 2..5000, --processes 1..64, --vms 1..100")
    if not 1 <= args.repeat <= 100 or not 0 <= args.idle <= 60 or not 10 <= args.timeout <= 3600:
        ap.error("--repeat 1..100, --idle 0..60, --timeout 10..3600")
    args.processes = min(args.processes, args.agents)
    signal.signal(signal.SIGTERM, _terminated)  # killed politely: clean up as on Ctrl-C
    try:
        res = run(args)
    except (ScaleError, AdminError, EtcdError, RuntimeError, OSError) as exc:
        print(f"cluster_scale: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cluster_scale: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(res, indent=1) if args.json else report(res))
    r = res["revocation"]
    if r["enforced"] != r["of"]:
        print(f"cluster_scale: only {r['enforced']} of {r['of']} agents enforced the revocation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
