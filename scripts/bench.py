#!/usr/bin/env python3
"""palm_net benchmarks: the goals of issue 14, each judged against a baseline measured in the same run.

This machine is shared and noisy (2 cores, both agents on them), so no
absolute time is ever a verdict: every goal is a ratio between palm_net and
its baseline (or between two palm_net modes), the compared modes are
interleaved repeat by repeat (A B, then B A) so machine drift hits both
alike, and each figure is the median of --repeat runs with its min-max
spread.  A ratio is the ratio of the medians; its [range] is the spread of the
per-repeat ratios of the interleaved pairs.

Goals (select with --only, by number or name):
  1 tls         `palm migrate` of idle 1 GiB guests vs a TLS 1.3 copy of the same bytes
                (loopback, OpenSSL AES-256-GCM, into fresh memory of another process):
                half-random guest vs a copy of its random half, all-random guest vs a
                copy of all of it; target <= 1.0
  2 protection  protected vs unprotected guest, same content and write rate:
                total <= 1.05x, downtime <= 1.2x
  3 digest      downtime with --verify-digest vs without (the 256 MiB protected demo
                shape, and an idle all-random guest): <= 1.2x, digest still verified
  4 qemu        palm_net QEMU migration vs QEMU alone over plain TCP, same guest, per
                accelerator: total <= 1.1x, downtime <= 1.5x; QEMU's own TLS reported
                beside them
  5 scale       time per GiB across --sizes for half-random and all-random idle guests
                (max/min <= 1.25); agent memory beyond guest memory < 64 MiB at every
                size; idle pause random-filled vs zero-filled at each size, and across
                sizes (<= 1.25, this bench's reading of "the same")
  6 channels    1, 2 and 4 channels (`migrate`'s `channels`, proto 7.8) on the idle
                all-random guest: total time and each agent's CPU seconds per GiB (on 2
                shared cores a channel cannot gain: what it costs); a QEMU guest on 1, 2
                and 4 next to QEMU alone's same multifd streams (CPU per GiB of stream);
                each with a projection for 16 cores and 25 Gbit/s (py-spy: the GIL)
  7 postcopy    a guest writing 50000 pages/s by post-copy vs the same guest idle by
                pre-copy: downtime <= 2x, memory at the switch equal; total time and
                downtime against the hot guest's pre-copy, and how long the destination's
                vCPUs waited for a page (median, 99th percentile): information
Context (no goal): limits (AEAD, TCP, memcpy, fresh-memory populate), ciphers (each
cipher and plain), hotset (a guest writing a hot set).  `goals`, `context` and `all`
select groups.

    scripts/bench                   # full run: 5 repeats, 1 GiB guests, sizes 256MiB,1GiB,4GiB
    scripts/bench --quick           # smoke run: 1 repeat, small guests, ~2 minutes
    scripts/bench --only 1,3        # some goals;  --only scale --sizes 1GiB,2GiB
    scripts/bench --report-only     # re-render the report from bench-out/bench.json

Writes bench-out/bench.json, bench-out/rounds.png (with matplotlib: the `bench`
extra, which also brings py-spy for goal 6's projection) and, for a full run of
everything (not --quick, not a partial --only), docs/BENCHMARKS.md.  The report
opens with the goal table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_channel import aead_gibs  # noqa: E402 - beside this script
from bench_qemu import SETTLE, loader_args, make_tls_creds, qemu_migrate_once  # noqa: E402
from bench_tls import EXPECTED_CIPHER, TlsCopy  # noqa: E402

from palm_net.agent.client import ControlError  # noqa: E402
from palm_net.agent.launcher import AgentProcess, provision, remove_all  # noqa: E402
from palm_net.crypto.noise import CipherName  # noqa: E402
from palm_net.hostfs import memory_backing  # noqa: E402
from palm_net.hypervisor.model_guest import fill_pseudorandom  # noqa: E402
from palm_net.hypervisor.qemu import default_accel, qemu_binary, qemu_version  # noqa: E402
from palm_net.hypervisor.qmp import QmpError  # noqa: E402
from palm_net.units import format_bytes, parse_size  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30

GOALS = {"1": "tls", "2": "protection", "3": "digest", "4": "qemu", "5": "scale", "6": "channels", "7": "postcopy"}
CONTEXT = ("limits", "ciphers", "hotset")
DEMO_MEMORY = 256 * MIB  # `palm demo`'s guest: 2 protected processes under load
DEMO_WORKLOAD = "random:2000+protected:500"
RSS_LIMIT_MIB = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# statistics and verdicts


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float] | None, unit: str = "", digits: int = 2) -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def compare(palm: list[float], base: list[float]) -> dict[str, Any]:
    """Ratio of the medians, and the spread of the per-repeat ratios (runs i of both were interleaved)."""
    pairs = [p / b for p, b in zip(palm, base) if b > 0]
    med_b = statistics.median(base)
    return {"palm": summarize(palm), "base": summarize(base),
            "ratio": statistics.median(palm) / med_b if med_b > 0 else float("inf"),
            "pairs": summarize(pairs) if pairs else None}


def row(goal: str, what: str, palm: str, base: str, cmp: dict[str, Any] | None, target: float | None,
        target_text: str | None = None, verdict: str | None = None) -> dict[str, Any]:
    """One line of the goal table; met when the ratio is at most the target (target None: information only)."""
    ratio = cmp["ratio"] if cmp else None
    if verdict is None:
        if target is None:
            verdict = "info"
        elif ratio is None:
            verdict = "skipped"
        else:
            verdict = "met" if ratio <= target else "MISSED"
    return {"goal": goal, "what": what, "palm": palm, "baseline": base, "ratio": ratio,
            "pairs": cmp.get("pairs") if cmp else None,
            "target": target_text or (f"<= {target:g}" if target is not None else "-"), "verdict": verdict}


def skipped_row(goal: str, what: str, reason: str) -> dict[str, Any]:
    return row(goal, what, "-", "-", None, None, "-", f"skipped: {reason}")


def interleave(rep: int, modes: dict[str, Callable[[], dict[str, Any]]],
               label: str) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Runs every mode once per repeat, alternating the order (A B C, C B A, ...); a mode that fails
    is dropped with its reason and the others go on."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    failed: dict[str, str] = {}
    for i in range(rep):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for m in order:
            if m in failed:
                continue
            log(f"{label} {i + 1}/{rep}: {m}")
            try:
                runs[m].append(modes[m]())
            except Exception as exc:  # the mode is reported with its reason; the others go on
                failed[m] = f"{type(exc).__name__}: {exc}"
                log(f"  {m} failed: {failed[m]}")
                if not isinstance(exc, (RuntimeError, ControlError, QmpError, OSError)):
                    traceback.print_exc()
    return runs, failed


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key_a: str,
           key_b: str | None = None) -> tuple[list[float], list[float]]:
    n = min(len(a), len(b))
    return [r[key_a] for r in a[:n]], [r[key_b or key_a] for r in b[:n]]


# --------------------------------------------------------------------------
# the agents


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far, all threads (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak agent memory outside guest memory: VmRSS - RssShmem, sampled every 20 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample(pid: int) -> int:
        vals = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssShmem"):
                    vals[k] = int(v.split()[0]) * 1024
        return vals.get("VmRSS", 0) - vals.get("RssShmem", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], self._sample(pid))
                except OSError:
                    pass
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._t.join()


RUN_KEYS = ("total_ms", "downtime_ms", "setup_ms", "expected_downtime_ms", "bytes", "rounds")


class Palm:
    """Two agent processes on loopback (source and destination)."""

    def __init__(self, root: Path, names: tuple[str, str] = ("bench-a", "bench-b"), extra: list[str] | None = None,
                 label: str = "") -> None:
        self.root = root
        self.label = label
        root.mkdir(mode=0o700, parents=True, exist_ok=True)  # the agents' control sockets live here
        provision(root, list(names))
        args = ["--allow-plain", "--max-incoming-memory", "64GiB", *(extra or [])]
        self.a = AgentProcess(root, names[0], extra=args).start()
        try:
            self.b = AgentProcess(root, names[1], extra=args).start()
        except BaseException:
            self.a.stop()
            raise
        self.n = 0

    def _discard(self, name: str) -> None:
        for ag in (self.a, self.b):
            with contextlib.suppress(ControlError):
                ag.request("vm.destroy", name=name)

    def migrate(self, memory: int, *, fill: str = "half", protected: int = 0, workload: str = "idle",
                settle: float = 0.0, seed: int | None = None, **args: Any) -> dict[str, Any]:
        """One model guest created on the source, migrated, destroyed; the agent's result plus peak RSS."""
        self.n += 1
        name = f"b{self.n}"
        self.a.request("vm.create", name=name, memory=f"{memory}", protected=protected, workload=workload,
                       seed=self.n if seed is None else seed, fill=fill)
        try:
            deadline = time.monotonic() + 120
            while not self.a.request("vm.show", name=name)["resident"] and time.monotonic() < deadline:
                time.sleep(0.1)  # a running guest's memory is resident: wait until the model's is
            time.sleep(settle)
            rest = self.rss_at_rest()
            cpu0 = self.cpu()
            with RssSampler({"source": self.a.pid(), "destination": self.b.pid()}) as rss:
                r: dict[str, Any] = self.a.request("migrate", name=name, to=self.b.addr, **args)
            cpu = {side: secs - cpu0[side] for side, secs in self.cpu().items()}
        except BaseException:
            self._discard(name)
            raise
        if not r["ok"]:
            self._discard(name)
            raise RuntimeError(f"migration failed in {r.get('phase')}: {r['error']}")
        faults = self.b.request("vm.show", name=name).get("postcopy_faults") if r.get("postcopy_pages") else None
        self.b.request("vm.destroy", name=name)
        rec = run_record(r, memory, rss.peak, rest)
        if r.get("postcopy_pages") is not None:  # post-copy: its figures, and its guest's waits at the destination
            rec.update(postcopy_pages=float(r["postcopy_pages"]), fetched_pages=float(r.get("fetched_pages") or 0),
                       serve_ms=float(r.get("serve_ms") or 0), digest_at_switch=r.get("digest_at_pause") == "equal",
                       fault_count=float((faults or {}).get("count", 0)),
                       fault_median_ms=float((faults or {}).get("median_ms", 0)),
                       fault_p99_ms=float((faults or {}).get("p99_ms", 0)))
        for side, secs in cpu.items():  # the agent's own CPU (user + system, all its threads) per GiB moved
            rec[f"cpu_{side}_s_per_gib"] = secs / (memory / GIB)
        return rec

    def migrate_qemu(self, memory: int, content: Path, downtime_ms: int, channels: int | None = None) -> dict[str, Any]:
        """The same guest as the QEMU-alone runs, as a palm_net QEMU VM, migrated through the attested session
        (``channels`` None: as many as the agent chooses when the operator names none)."""
        self.n += 1
        name = f"q{self.n}"
        image = self.a.images_dir / content.name  # the agent's loader reads only its images directory
        if not image.exists():
            shutil.copyfile(content, image)
        self.a.request("vm.create", name=name, memory=f"{memory}", backend="qemu", qemu_args=loader_args(image))
        try:
            time.sleep(SETTLE)  # past its firmware's start, as in the QEMU-alone runs
            rest = self.rss_at_rest()
            cpu0 = self.cpu()
            with RssSampler({"source": self.a.pid(), "destination": self.b.pid()}) as rss:
                asked = {"channels": channels} if channels else {}
                r: dict[str, Any] = self.a.request("migrate", name=name, to=self.b.addr,
                                                   downtime_ms=float(downtime_ms), **asked)
            cpu = {side: secs - cpu0[side] for side, secs in self.cpu().items()}
        except BaseException:
            self._discard(name)
            raise
        if not r["ok"]:
            self._discard(name)
            raise RuntimeError(f"palm_net QEMU migration failed in {r.get('phase')}: {r['error']}")
        self.b.request("vm.destroy", name=name)
        hv = r.get("hypervisor") or {}
        rec = run_record(r, memory, rss.peak, rest)
        rec.update({"qemu_total_ms": float(hv.get("total_ms") or 0), "qemu_downtime_ms":
                    float(hv.get("downtime_ms") or 0), "stream_bytes": hv.get("stream_bytes") or 0})
        for side, secs in cpu.items():  # the agent's own CPU per GiB of QEMU's stream (what it carries)
            rec[f"cpu_{side}_s_per_gib"] = secs / (max(1, rec["stream_bytes"]) / GIB)
        return rec

    def cpu(self) -> dict[str, float]:
        """Each agent's CPU seconds so far (user + system, all its threads)."""
        return {side: cpu_seconds(ag.pid()) for side, ag in (("source", self.a), ("destination", self.b))}

    def rss_at_rest(self) -> dict[str, int]:
        """Each agent's memory beyond guest memory just before a migration (what it holds anyway)."""
        out = {}
        for side, ag in (("source", self.a), ("destination", self.b)):
            try:
                out[side] = RssSampler._sample(ag.pid())
            except OSError:
                out[side] = 0
        return out

    def close(self) -> None:
        remove_all(self.root, [self.a, self.b])  # QEMU guests outlive their agents by design


def run_record(r: dict[str, Any], memory: int, rss: dict[str, int], rest: dict[str, int]) -> dict[str, Any]:
    rec: dict[str, Any] = {k: float(r.get(k) or 0) for k in RUN_KEYS}
    rec["s_per_gib"] = rec["total_ms"] / 1000 / (memory / GIB)
    rec["wire_gibs"] = rec["bytes"] / GIB / (rec["total_ms"] / 1000) if rec["total_ms"] else 0.0
    rec["rss_source"] = rss["source"] / MIB
    rec["rss_destination"] = rss["destination"] / MIB
    rec["rss_source_rest"] = rest["source"] / MIB
    rec["rss_destination_rest"] = rest["destination"] / MIB
    rec["digest_verified"] = bool(r.get("digest_verified"))
    rec["round_stats"] = r.get("round_stats") or []
    for extra in ("channels",):  # what a newer agent may report
        if extra in r:
            rec[extra] = r[extra]
    for phase, v in (r.get("downtime_phases_ms") or {}).items():  # where the pause went (medians per phase)
        rec[f"down_{phase}_ms"] = float(v)
    for phase, v in (r.get("destination_phases_ms") or {}).items():  # the destination's own account of it
        rec[f"dest_{phase}_ms"] = float(v)
    return rec


def mode_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians [min-max] of each numeric field, the runs themselves (without their rounds), and the
    rounds of the median run (by total time) for the plot."""
    if not runs:
        return {}
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = summarize([float(r[k]) for r in runs])
    mid = sorted(runs, key=lambda r: r.get("total_ms", r.get("ms", 0)))[len(runs) // 2]
    if "round_stats" in mid:
        out["round_stats"] = mid["round_stats"]
    out["runs"] = [{k: v for k, v in r.items() if k != "round_stats"} for r in runs]
    return out


def summaries(runs: dict[str, list[dict[str, Any]]], failed: dict[str, str]) -> dict[str, Any]:
    return {m: ({"skipped": failed[m]} if m in failed and not rs else
                {**mode_summary(rs), **({"failed_later": failed[m]} if m in failed else {})})
            for m, rs in runs.items()}


def ms(s: dict[str, float] | None, digits: int = 0) -> str:
    return fmt(s, " ms", digits)


# --------------------------------------------------------------------------
# goal 1: against a TLS copy of the same bytes


def goal_tls(palm: Palm, tls: TlsCopy, rep: int, guest: int) -> dict[str, Any]:
    half = guest // 2
    modes = {
        "tls_copy_half": lambda: tls.copy(half, "random", seed=1),
        "palm_half": lambda: palm.migrate(guest, fill="half"),
        "tls_copy_full": lambda: tls.copy(guest, "random", seed=2),
        "palm_random": lambda: palm.migrate(guest, fill="random"),
    }
    runs, failed = interleave(rep, modes, "goal 1 (TLS copy)")
    out: dict[str, Any] = {"guest": guest, "modes": summaries(runs, failed)}
    rows = []
    g = format_bytes(guest)
    for palm_mode, copy_mode, what in (
            ("palm_half", "tls_copy_half", f"idle {g} half-random guest vs TLS copy of {format_bytes(half)}"),
            ("palm_random", "tls_copy_full", f"idle {g} all-random guest vs TLS copy of {g}")):
        if not runs[palm_mode] or not runs[copy_mode]:
            rows.append(skipped_row("1. vs TLS copy", what, failed.get(palm_mode) or failed.get(copy_mode, "?")))
            continue
        p, b = paired(runs[palm_mode], runs[copy_mode], "total_ms", "ms")
        c = compare(p, b)
        out[palm_mode + "_vs_copy"] = c
        rows.append(row("1. vs TLS copy", what + " (total time)", ms(c["palm"]), ms(c["base"]), c, 1.0))
    ciphers = {r["cipher"] for m in ("tls_copy_half", "tls_copy_full") for r in runs[m]}
    out["tls_cipher"] = sorted(ciphers)
    if ciphers - {EXPECTED_CIPHER}:
        for r in rows:
            r["baseline"] += f" ({', '.join(sorted(ciphers))})"
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------
# goal 2: protection nearly free


def goal_protection(palm: Palm, rep: int, guest: int, rate: int) -> dict[str, Any]:
    # The same total write rate in both (a quarter of it by the protected
    # processes in their quarter of memory), random content in both, so both
    # send the same bytes: the ratio is the cost of protection alone.
    q = rate // 4
    modes = {
        "unprotected": lambda: palm.migrate(guest, fill="random", workload=f"random:{q}", settle=0.5),
        "protected": lambda: palm.migrate(guest, fill="random", protected=4,
                                          workload=f"random:{q * 3 // 4}+protected:{q // 4}", settle=0.5),
    }
    runs, failed = interleave(rep, modes, "goal 2 (protection)")
    out: dict[str, Any] = {"guest": guest, "rate": q, "modes": summaries(runs, failed)}
    rows = []
    for key, target, digits in (("total_ms", 1.05, 0), ("downtime_ms", 1.2, 1)):
        what = f"{format_bytes(guest)} random guest, {q} writes/s, protected vs unprotected: " + \
               ("total time" if key == "total_ms" else "downtime")
        if not runs["protected"] or not runs["unprotected"]:
            rows.append(skipped_row("2. protection", what, failed.get("protected") or failed.get("unprotected", "?")))
            continue
        c = compare(*paired(runs["protected"], runs["unprotected"], key))
        out[key] = c
        rows.append(row("2. protection", what, ms(c["palm"], digits), ms(c["base"], digits), c, target))
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------
# goal 3: --verify-digest


def goal_digest(palm: Palm, rep: int, guest: int) -> dict[str, Any]:
    shapes: dict[str, tuple[str, dict[str, Any]]] = {
        "demo": (f"the demo: {format_bytes(DEMO_MEMORY)}, 2 protected, {DEMO_WORKLOAD}",
                 {"memory": DEMO_MEMORY, "protected": 2, "workload": DEMO_WORKLOAD, "seed": 42, "settle": 1.0}),
        "idle_random": (f"idle {format_bytes(guest)} all-random", {"memory": guest, "fill": "random"}),
    }
    modes: dict[str, Callable[[], dict[str, Any]]] = {}
    for shape, (_, kw) in shapes.items():
        for verify in (False, True):
            def run(kw: dict[str, Any] = kw, verify: bool = verify) -> dict[str, Any]:
                kw = dict(kw)
                return palm.migrate(kw.pop("memory"), verify_digest=verify, **kw)
            modes[f"{shape}_{'verify' if verify else 'plain'}"] = run
    runs, failed = interleave(rep, modes, "goal 3 (verify-digest)")
    out: dict[str, Any] = {"modes": summaries(runs, failed), "shapes": {k: v[0] for k, v in shapes.items()}}
    rows = []
    for shape, (desc, _) in shapes.items():
        a, b = runs[f"{shape}_verify"], runs[f"{shape}_plain"]
        what = f"{desc}: downtime with --verify-digest vs without"
        if not a or not b:
            rows.append(skipped_row("3. verify-digest", what, failed.get(f"{shape}_verify") or
                                    failed.get(f"{shape}_plain", "?")))
            continue
        c = compare(*paired(a, b, "downtime_ms"))
        verified = sum(r["digest_verified"] for r in a)
        out[shape] = {**c, "verified": verified, "runs": len(a)}
        verdict = None if verified == len(a) else f"MISSED (digest verified in {verified}/{len(a)} runs)"
        rows.append(row("3. verify-digest", what, ms(c["palm"], 1) + f" (digest verified {verified}/{len(a)})",
                        ms(c["base"], 1), c, 1.2, verdict=verdict))
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------
# goal 7: post-copy


POSTCOPY_RATE = 50_000  # pages a second: pre-copy cannot converge on a guest that writes this fast here


def goal_postcopy(palm: Palm, rep: int, guest: int) -> dict[str, Any]:
    """A guest writing POSTCOPY_RATE pages/s, by post-copy (switching where the downtime policy
    would act) and by pre-copy (pausing anyway at the cap), against the same idle guest's
    pre-copy: downtime, total time, and how long its vCPUs waited for a page (proto 7.9)."""
    hot = f"random:{POSTCOPY_RATE}"
    modes = {
        "idle_precopy": lambda: palm.migrate(guest, fill="random", protected=2),
        "hot_postcopy": lambda: palm.migrate(guest, fill="random", protected=2, workload=hot, settle=0.5,
                                             postcopy=True, verify_digest=True),
        "hot_precopy": lambda: palm.migrate(guest, fill="random", protected=2, workload=hot, settle=0.5,
                                            verify_digest=True),  # (as the post-copy runs: its cost on both)
    }
    runs, failed = interleave(rep, modes, "goal 7 (post-copy)")
    out: dict[str, Any] = {"guest": guest, "rate": POSTCOPY_RATE, "modes": summaries(runs, failed)}
    rows = []
    what = (f"{format_bytes(guest)} guest writing {POSTCOPY_RATE} pages/s by post-copy vs the idle guest by "
            "pre-copy: downtime")
    if not runs["hot_postcopy"] or not runs["idle_precopy"]:
        out["rows"] = [skipped_row("7. post-copy", what, failed.get("hot_postcopy") or
                                   failed.get("idle_precopy", "?"))]
        return out
    c = compare(*paired(runs["hot_postcopy"], runs["idle_precopy"], "downtime_ms"))
    pc = runs["hot_postcopy"]
    equal = sum(bool(r["digest_at_switch"]) for r in pc)
    verdict = None if equal == len(pc) else f"MISSED (memory equal to the switch's in {equal}/{len(pc)} runs)"
    rows.append(row("7. post-copy", what, ms(c["palm"], 1) + f" (memory at the switch equal {equal}/{len(pc)})",
                    ms(c["base"], 1), c, 2.0, verdict=verdict))
    if runs["hot_precopy"]:
        t = compare(*paired(pc, runs["hot_precopy"], "total_ms"))
        d = compare(*paired(pc, runs["hot_precopy"], "downtime_ms"))
        rows.append(row("7. post-copy", "the same hot guest, post-copy vs pre-copy (paused at the cap): total time",
                        ms(t["palm"]), ms(t["base"]), t, None))
        rows.append(row("7. post-copy", "the same hot guest, post-copy vs pre-copy: downtime", ms(d["palm"], 1),
                        ms(d["base"], 1), d, None))
    s = summarize([r["fault_median_ms"] for r in pc])
    p = summarize([r["fault_p99_ms"] for r in pc])
    n = summarize([r["fault_count"] for r in pc])
    rows.append(row("7. post-copy", "a page a vCPU waited for at the destination: median / 99th percentile "
                    f"(medians of {len(pc)} runs; {fmt(n, '', 0)} waits a run)", f"{ms(s, 2)} / {ms(p, 2)}", "-",
                    None, None))
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------
# goal 4: QEMU


def qemu_content(work: Path, memory: int) -> Path:
    """What the bench's QEMU guests load: half their memory, pseudo-random (the rest stays zero)."""
    import mmap
    content = work / "qemu-content.bin"
    if not content.exists():
        half = memory // 2
        m = mmap.mmap(-1, half)
        fill_pseudorandom(m, 0, half, 12345)
        content.write_bytes(m[:])
        m.close()
    return content


QEMU_DOWNTIME_MS = 300  # every QEMU migration's downtime limit, QEMU alone's and palm_net's (QEMU's default)


def goal_qemu(pairs: dict[str, Palm], rep: int, memory: int, work: Path) -> dict[str, Any]:
    accels = list(pairs)
    if qemu_binary() is None:
        reason = "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
        return {"skipped": reason, "rows": [skipped_row("4. QEMU", "palm_net vs QEMU alone", reason)]}
    content = qemu_content(work, memory)
    tls_skip = make_tls_creds(work / "tls")
    modes: dict[str, Callable[[], dict[str, Any]]] = {}
    for accel in accels:
        modes[f"qemu_tcp_{accel}"] = lambda a=accel: qemu_migrate_once(work, memory, content, a, False,
                                                                       QEMU_DOWNTIME_MS)
        if tls_skip is None:
            modes[f"qemu_tls_{accel}"] = lambda a=accel: qemu_migrate_once(work, memory, content, a, True,
                                                                           QEMU_DOWNTIME_MS)
        modes[f"palm_qemu_{accel}"] = lambda a=accel: pairs[a].migrate_qemu(memory, content, QEMU_DOWNTIME_MS)
    runs, failed = interleave(rep, modes, "goal 4 (QEMU)")
    if tls_skip:
        for accel in accels:
            runs[f"qemu_tls_{accel}"], failed[f"qemu_tls_{accel}"] = [], tls_skip
    out: dict[str, Any] = {"accels": accels, "memory": memory, "modes": summaries(runs, failed)}
    rows = []
    for accel in accels:
        A = accel.upper()
        p, t = runs[f"palm_qemu_{accel}"], runs[f"qemu_tcp_{accel}"]
        what = f"{format_bytes(memory)} guest, half random ({A}): palm_net vs QEMU alone over plain TCP, total"
        if not p or not t:
            rows.append(skipped_row(f"4. QEMU ({A})", what, failed.get(f"palm_qemu_{accel}") or
                                    failed.get(f"qemu_tcp_{accel}", "?")))
            continue
        c = compare(*paired(p, t, "total_ms"))
        out[f"palm_vs_tcp_{accel}"] = c
        rows.append(row(f"4. QEMU ({A})", what, ms(c["palm"]), ms(c["base"]), c, 1.1))
        d = compare(*paired(p, t, "downtime_ms"))  # the guest's pause: STOP to DONE, STOP to RESUME
        out[f"palm_vs_tcp_downtime_{accel}"] = d
        rows.append(row(f"4. QEMU ({A})", f"palm_net vs QEMU alone over plain TCP ({A}), downtime (the source's "
                        "STOP to DONE; QEMU alone: STOP to the destination's RESUME)", ms(d["palm"]),
                        ms(d["base"]), d, 1.5))
        tls = runs.get(f"qemu_tls_{accel}") or []
        if tls:
            c2 = compare(*paired(p, tls, "total_ms"))
            out[f"palm_vs_tls_{accel}"] = c2
            rows.append(row(f"4. QEMU ({A})", f"palm_net vs QEMU's own TLS ({A}), total",
                            ms(c2["palm"]), ms(c2["base"]), c2, None))
            c3 = compare(*paired(tls, t, "total_ms"))
            out[f"tls_vs_tcp_{accel}"] = c3
            rows.append(row(f"4. QEMU ({A})", f"QEMU's TLS vs QEMU plain TCP ({A}), total: what QEMU pays "
                            "for its own encryption", ms(c3["palm"]), ms(c3["base"]), c3, None))
        else:
            rows.append(skipped_row(f"4. QEMU ({A})", "QEMU's own TLS", failed.get(f"qemu_tls_{accel}", "?")))
    out["rows"] = rows
    return out


def runs_text(modes: dict[str, Any]) -> list[str]:
    """Each run's total and downtime, in run order: a QEMU that pauses its guest early (its
    bandwidth estimate says what is left fits the downtime limit) trades one for the other."""
    lines = [f"- {k}: " + ", ".join(f"{r['total_ms']:.0f} / {r['downtime_ms']:.0f}" for r in e["runs"])
             for k, e in modes.items() if e.get("runs") and "downtime_ms" in e["runs"][0]]
    if not lines:
        return []
    return ["Each run, in run order (total ms / downtime ms): a QEMU migration paused early, with more of its "
            "RAM still to send in the pause, is shorter in total and longer in downtime, up to its limit "
            f"({QEMU_DOWNTIME_MS} ms here) and past it.\n", *lines, ""]


def downtime_breakdown(modes: dict[str, Any], told: list[str]) -> list[str]:
    """The downtime of each palm_net mode by phase, as the source sees it (medians); its
    phases said in words the first time in the report (``told``: the section that did)."""
    phases = ["stop-and-copy", "finish", "destination-prepare", "hand-off", "commit"]
    dest = ["load", "prepare", "commit", "activate"]
    rows = [(k, e) for k, e in modes.items() if f"down_{phases[0]}_ms" in e]
    if not rows:
        return []
    head = ["| migration | downtime | " + " | ".join(phases) + " | " + " | ".join(f"dst {d}" for d in dest) + " |",
            "|---|---|" + "---|" * (len(phases) + len(dest))]
    if told:
        out = [f"Where the downtime goes, by phase (medians, ms; the phases as under {told[0]}):\n", *head]
    else:
        out = ["Where palm_net's downtime goes, as the source sees it (medians, ms): the source's stop-and-copy "
               "to its last byte read and sent (model: the last round, CPU state and blob), the last messages "
               "(finish), the destination loading, checking and making PREPARE durable until READY arrives (a "
               "stream backend's own completion is awaited beside it), the source's durable hand-off, then COMMIT, "
               "the destination's durable COMMIT, `cont` and DONE. The destination's own account of its part "
               "(READY's and DONE's timings): from STREAM_END, what it still held written to the hypervisor and "
               "the hypervisor loading the stream's end (load), PREPARE (prepare), "
               "the durable COMMIT (commit), the activation (activate); a model guest's load is 0.\n", *head]
    for k, e in rows:
        out.append(f"| {k} | {fmt(e['downtime_ms'], '', 1)} | "
                   + " | ".join(fmt(e[f"down_{p}_ms"], "", 1) for p in phases) + " | "
                   + " | ".join(fmt(e[f"dest_{d}_ms"], "", 1) if f"dest_{d}_ms" in e else "-" for d in dest) + " |")
    return [*out, ""]


# --------------------------------------------------------------------------
# goal 5: scale


SCALE_FILLS = ("half", "random", "zero")


def _tls_scaled(tls: TlsCopy, size: int) -> dict[str, Any]:
    r = tls.copy(size, "random", seed=3)
    return {**r, "total_ms": r["ms"], "s_per_gib": r["ms"] / 1000 / (size / GIB)}


def goal_scale(palm: Palm, rep: int, sizes: list[int], tls: TlsCopy | None = None) -> dict[str, Any]:
    modes: dict[str, Callable[[], dict[str, Any]]] = {}
    for size in sizes:
        for fill in SCALE_FILLS:
            modes[f"{fill}@{size}"] = lambda s=size, f=fill: palm.migrate(s, fill=f)
        if tls is not None:  # the machine's own scaling: the same bytes copied over TLS into fresh memory
            modes[f"tls@{size}"] = lambda s=size: _tls_scaled(tls, s)
    runs, failed = interleave(rep, modes, "goal 5 (scale)")
    out: dict[str, Any] = {"sizes": sizes, "modes": summaries(runs, failed)}
    rows = []
    names = {s: format_bytes(s) for s in sizes}
    span = f"{names[sizes[0]]}..{names[sizes[-1]]}"
    # Time per GiB, flat across sizes.
    for fill in ("half", "random"):
        what = f"idle {'half-random' if fill == 'half' else 'all-random'} guests, time per GiB, max/min over {span}"
        rs = {s: runs[f"{fill}@{s}"] for s in sizes}
        bad = [failed.get(f"{fill}@{s}", "no runs") for s in sizes if not rs[s]]
        if bad or len(sizes) < 2:
            rows.append(skipped_row("5. scale", what, bad[0] if bad else "needs two --sizes"))
            continue
        med = {s: statistics.median(r["s_per_gib"] for r in rs[s]) for s in sizes}
        hi, lo = max(med, key=med.__getitem__), min(med, key=med.__getitem__)
        # The bracket: the same two sizes' ratio in each repeat (their runs were interleaved).
        c = {**compare(*paired(rs[hi], rs[lo], "s_per_gib")), "per_size": {str(s): med[s] for s in sizes}}
        out[f"flat_{fill}"] = c
        rows.append(row("5. scale", what, f"{fmt(c['palm'], ' s/GiB')} at {names[hi]}",
                        f"{fmt(c['base'], ' s/GiB')} at {names[lo]}", c, 1.25))
    # The TLS copy at each size: palm_net's all-random guest against it, size by size.
    if tls is not None and len(sizes) >= 2 and all(runs[f"tls@{s}"] for s in sizes):
        med = {s: statistics.median(r["s_per_gib"] for r in runs[f"tls@{s}"]) for s in sizes}
        hi, lo = max(med, key=med.__getitem__), min(med, key=med.__getitem__)
        c = {**compare(*paired(runs[f"tls@{hi}"], runs[f"tls@{lo}"], "s_per_gib")),
             "per_size": {str(s): med[s] for s in sizes}}
        out["flat_tls"] = c
        rows.append(row("5. scale", f"the TLS copy itself (the machine's scaling), time per GiB, max/min over {span}",
                        f"{fmt(c['palm'], ' s/GiB')} at {names[hi]}", f"{fmt(c['base'], ' s/GiB')} at {names[lo]}",
                        c, None, "-", "info"))
        for size in sizes:
            c = compare(*paired(runs[f"random@{size}"], runs[f"tls@{size}"], "total_ms"))
            out[f"vs_tls_{size}"] = c
            rows.append(row("5. scale", f"idle {names[size]} all-random guest vs TLS copy of {names[size]}, total",
                            ms(c["palm"]), ms(c["base"]), c, None, "-", "info"))
    # Agent memory beyond the guest.
    worst: tuple[float, str, str, float] = (0.0, "", "", 0.0)
    for key, rs in runs.items():
        if key.startswith("tls@"):
            continue
        for r in rs:
            for side in ("source", "destination"):
                if r[f"rss_{side}"] > worst[0]:
                    worst = (r[f"rss_{side}"], key, side, r[f"rss_{side}_rest"])
    what = f"agent memory beyond guest memory (peak VmRSS - RssShmem), worst over all sizes and fills, {span}"
    if worst[1]:
        fill, size = worst[1].split("@")
        out["rss_worst"] = {"mib": worst[0], "mode": worst[1], "side": worst[2], "at_rest_mib": worst[3]}
        rows.append(row("5. scale", what, f"{worst[0]:.0f} MiB ({worst[2]}, {fill} {names[int(size)]}; "
                        f"{worst[3]:.0f} MiB just before the migration)", "-", None, None, f"< {RSS_LIMIT_MIB} MiB",
                        "met" if worst[0] < RSS_LIMIT_MIB else "MISSED"))
    # The idle pause: not a function of content, nor of size.
    for size in sizes:
        a, b = runs[f"random@{size}"], runs[f"zero@{size}"]
        what = f"idle {names[size]} guest pause: random-filled vs zero-filled, downtime"
        if not a or not b:
            rows.append(skipped_row("5. scale", what, failed.get(f"random@{size}") or failed.get(f"zero@{size}", "?")))
            continue
        c = compare(*paired(a, b, "downtime_ms"))
        out[f"pause_content_{size}"] = c
        rows.append(row("5. scale", what, ms(c["palm"], 1), ms(c["base"], 1), c, 1.25))
    rs = {s: runs[f"random@{s}"] for s in sizes}
    if len(sizes) >= 2 and all(rs.values()):
        med = {s: statistics.median(r["downtime_ms"] for r in rs[s]) for s in sizes}
        hi, lo = max(med, key=med.__getitem__), min(med, key=med.__getitem__)
        c = {**compare(*paired(rs[hi], rs[lo], "downtime_ms")), "per_size": {str(s): med[s] for s in sizes}}
        out["pause_size"] = c
        rows.append(row("5. scale", f"idle all-random guest pause across sizes, max/min of downtime over {span}",
                        f"{ms(c['palm'], 1)} at {names[hi]}", f"{ms(c['base'], 1)} at {names[lo]}", c, 1.25))
    out["rows"] = rows
    return out


# --------------------------------------------------------------------------
# goal 6: channels


CHANNEL_COUNTS = (1, 2, 4)


LINK_GIBS = 25e9 / 8 / GIB  # a 25 Gbit/s link, in GiB/s
PROJECTED_CORES = 16
QEMU_PROJECTED_CHANNELS = 2  # a QEMU guest's projection: from its runs on this many channels


def gil_held(palm: Palm, migrate: Callable[[], dict[str, Any]], rate: int = 200) -> dict[str, float]:
    """``migrate`` (one migration between ``palm``'s agents) with each agent sampled by py-spy
    only while a thread of it holds the GIL: the seconds each agent's GIL was held, what no
    number of channels in one process can run in parallel."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        raise RuntimeError("py-spy not installed (the bench extra: pip install -e '.[bench]')")
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spies = {side: subprocess.Popen([spy, "record", "--gil", "--nonblocking", "-r", str(rate), "-d", "300",
                                         "-f", "raw", "-o", f"{tmp}/{side}", "-p", str(ag.pid())],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for side, ag in (("source", palm.a), ("destination", palm.b))}
        try:
            time.sleep(1.0)  # (py-spy attached)
            migrate()
        finally:
            for sp in spies.values():
                sp.send_signal(2)
                sp.wait(60)
        for side in spies:
            text = Path(f"{tmp}/{side}").read_text() if Path(f"{tmp}/{side}").exists() else ""
            out[side] = sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.strip()) / rate
    return out


def gil_seconds_per_gib(palm: Palm, guest: int) -> dict[str, float]:
    """One 1-channel migration of an idle all-random model guest, its agents' GIL sampled (gil_held):
    the seconds per GiB each held it, and the wall time per GiB.  A created guest is resident
    before the sampling starts (its idle migration is all the agents do meanwhile)."""
    palm.n += 1
    name = f"gil{palm.n}"
    palm.a.request("vm.create", name=name, memory=str(guest), fill="random", seed=palm.n)
    r: dict[str, Any] = {}
    try:
        while not palm.a.request("vm.show", name=name)["resident"]:
            time.sleep(0.1)
        held = gil_held(palm, lambda: r.update(palm.a.request("migrate", name=name, to=palm.b.addr, channels=1)))
    finally:
        palm._discard(name)
    if not r.get("ok"):
        raise RuntimeError(f"migration failed: {r.get('error')}")
    return {**{f"gil_{side}_s_per_gib": secs / (guest / GIB) for side, secs in held.items()},
            "wall_s_per_gib": r["total_ms"] / 1000 / (guest / GIB)}


def gil_seconds_per_stream_gib(palm: Palm, guest: int, content: Path, channels: int) -> dict[str, float]:
    """The same for a QEMU guest on ``channels`` channels, per GiB of QEMU's stream."""
    r: dict[str, Any] = {}
    held = gil_held(palm, lambda: r.update(palm.migrate_qemu(guest, content, QEMU_DOWNTIME_MS, channels)))
    per = max(1, r["stream_bytes"]) / GIB
    return {**{f"gil_{side}_s_per_gib": secs / per for side, secs in held.items()},
            "wall_s_per_gib": r["total_ms"] / 1000 / per}


def channel_projection(measure: Callable[[], dict[str, float]], one: dict[str, Any]) -> dict[str, Any]:
    """What N channels could reach on a host of PROJECTED_CORES cores a side and a 25 Gbit/s link,
    from per-GiB figures measured here (``one``: a mode's runs; ``measure``: its GIL figures):
    each side's CPU seconds per GiB (all its threads) bounds it by cores, its GIL-held seconds
    per GiB bounds one process whatever the channels (Amdahl), and the link bounds both."""
    try:
        gil = measure()
    except (RuntimeError, ControlError, OSError, subprocess.SubprocessError) as exc:
        return {"skipped": str(exc)}
    bounds = {"link": LINK_GIBS}
    arithmetic = {"link": f"25 Gbit/s = {LINK_GIBS:.2f} GiB/s"}
    for side in ("source", "destination"):
        cpu = (one.get(f"cpu_{side}_s_per_gib") or {}).get("median")
        if cpu:
            bounds[f"{side} cores"] = PROJECTED_CORES / cpu
            arithmetic[f"{side} cores"] = (f"{PROJECTED_CORES} cores / {cpu:.2f} CPU-s per GiB "
                                           f"= {bounds[f'{side} cores']:.2f} GiB/s")
        held = gil[f"gil_{side}_s_per_gib"]
        if held > 0:
            bounds[f"{side} GIL"] = 1 / held
            arithmetic[f"{side} GIL"] = f"1 / {held:.2f} GIL-s per GiB = {bounds[f'{side} GIL']:.2f} GiB/s"
    limit = min(bounds, key=lambda k: bounds[k])
    return {**gil, "bounds_gibs": bounds, "arithmetic": arithmetic, "projected_gibs": bounds[limit],
            "limited_by": limit}


def channel_cpu_table(modes: dict[str, Any], prefix: str = "channels_") -> list[str]:
    """Each agent's CPU seconds per GiB moved (a QEMU guest's: per GiB of its stream), by channel
    count (medians): what a channel costs."""
    L = ["| channels | total (ms) | source CPU s/GiB | destination CPU s/GiB |", "|---|---|---|---|"]
    for n in CHANNEL_COUNTS:
        m = modes.get(f"{prefix}{n}") or {}
        if "total_ms" not in m:
            continue
        L.append(f"| {n} | {fmt(m['total_ms'], '', 0)} | {fmt(m.get('cpu_source_s_per_gib'))} | "
                 f"{fmt(m.get('cpu_destination_s_per_gib'))} |")
    return [*L, ""]


def projection_text(p: dict[str, Any], measured: str = "1 channel") -> list[str]:
    if not p or "skipped" in p:
        return [f"Projection skipped: {p.get('skipped', 'not measured')}.", ""]
    b, how = p["bounds_gibs"], p.get("arithmetic") or {}
    return [f"Projection for {PROJECTED_CORES} cores a side and a 25 Gbit/s link ({LINK_GIBS:.2f} GiB/s), from "
            f"this run's per-GiB figures ({measured}; CPU seconds of all of an agent's threads, and the seconds "
            "py-spy saw a thread of it holding the GIL, which no number of channels in one process runs in "
            f"parallel; {p['wall_s_per_gib']:.2f} s/GiB of wall time here):", "",
            *(f"- {k}: {how.get(k, f'{v:.2f} GiB/s')}" for k, v in b.items()), "",
            f"At most **{p['projected_gibs']:.2f} GiB/s** ({p['projected_gibs'] * 8 * GIB / 1e9:.1f} Gbit/s), "
            f"limited by the {p['limited_by']}: an upper bound, as the channels share one process a side.", ""]


def goal_channels(palm: Palm, rep: int, guest: int, work: Path) -> dict[str, Any]:
    what = f"idle {format_bytes(guest)} all-random guest, {{n}} channels vs 1, total time"
    # The agent must both accept the argument and say it used it; an agent
    # that ignores an unknown argument would otherwise be measured as "2 channels".
    try:
        probe = palm.migrate(16 * MIB, fill="random", channels=2)
    except ControlError as exc:
        reason = f"the agent refused `channels`: {exc}"
    except RuntimeError as exc:
        reason = f"a migration with channels=2 failed: {exc}"
    else:
        reason = "" if probe.get("channels") == 2 else \
            "the agent accepted `channels=2` but its result does not report 2 channels used (argument ignored)"
    if reason:
        log(f"goal 6 skipped: {reason}")
        return {"skipped": reason, "rows": [skipped_row("6. channels", what.format(n=2), reason)]}
    modes = {f"channels_{n}": (lambda n=n: palm.migrate(guest, fill="random", channels=n)) for n in CHANNEL_COUNTS}
    runs, failed = interleave(rep, modes, "goal 6 (channels)")
    out: dict[str, Any] = {"modes": summaries(runs, failed), "cpu_count": os.cpu_count()}
    rows = []
    for n in CHANNEL_COUNTS[1:]:
        if not runs["channels_1"] or not runs[f"channels_{n}"]:
            reason = failed.get(f"channels_{n}") or failed.get("channels_1", "?")
            rows.append(skipped_row("6. channels", what.format(n=n), reason))
            continue
        c = compare(*paired(runs[f"channels_{n}"], runs["channels_1"], "total_ms"))
        out[f"total_ms_{n}"] = c
        rows.append(row("6. channels", what.format(n=n), ms(c["palm"]), ms(c["base"]), c, None,
                        f"information: {os.cpu_count()} cores shared by both agents (a channel gains only "
                        "with cores to spare)"))
    out["projection"] = channel_projection(lambda: gil_seconds_per_gib(palm, guest),
                                           out["modes"].get("channels_1") or {})
    rows += qemu_channels(palm, rep, guest, work, out)
    out["rows"] = rows
    return out


def qemu_channels(palm: Palm, rep: int, guest: int, work: Path, out: dict[str, Any]) -> list[dict[str, Any]]:
    """A QEMU guest on N channels (QEMU's multifd, one palm session a stream) next to
    QEMU alone with the same multifd streams over plain TCP, interleaved in one run."""
    what = f"{format_bytes(guest)} QEMU guest, half random, {{n}} channels: palm_net vs QEMU alone's multifd, {{m}}"
    if qemu_binary() is None:
        return [skipped_row("6. channels (QEMU)", what.format(n="N", m="total"), "qemu-system-x86_64 not installed")]
    content = qemu_content(work, guest)
    accel = default_accel()  # (the default pair's agents start their QEMUs so)
    modes: dict[str, Callable[[], dict[str, Any]]] = {}
    for n in CHANNEL_COUNTS:
        modes[f"palm_qemu_channels_{n}"] = lambda n=n: palm.migrate_qemu(guest, content, QEMU_DOWNTIME_MS, n)
        modes[f"qemu_alone_channels_{n}"] = lambda n=n: qemu_migrate_once(work, guest, content, accel, False,
                                                                             QEMU_DOWNTIME_MS, n)
    runs, failed = interleave(rep, modes, "goal 6 (QEMU channels)")
    out["qemu_modes"], out["qemu_accel"] = summaries(runs, failed), accel
    n = QEMU_PROJECTED_CHANNELS  # (as `palm migrate` chooses with QEMU 9.0 or later)
    out["qemu_projection"] = channel_projection(lambda: gil_seconds_per_stream_gib(palm, guest, content, n),
                                                out["qemu_modes"].get(f"palm_qemu_channels_{n}") or {})
    rows = []
    for n in CHANNEL_COUNTS:
        p, q = runs[f"palm_qemu_channels_{n}"], runs[f"qemu_alone_channels_{n}"]
        for key, m in (("total_ms", "total"), ("downtime_ms", "downtime")):
            w = what.format(n=n, m=m) + f" ({accel.upper()})"
            if not p or not q:
                rows.append(skipped_row("6. channels (QEMU)", w, failed.get(f"palm_qemu_channels_{n}") or
                                        failed.get(f"qemu_alone_channels_{n}", "?")))
                continue
            c = compare(*paired(p, q, key))
            out[f"qemu_{key}_{n}"] = c
            rows.append(row("6. channels (QEMU)", w, ms(c["palm"], 1 if m == "downtime" else 0),
                            ms(c["base"], 1 if m == "downtime" else 0), c, None,
                            "information: the same multifd streams, QEMU alone over plain TCP"))
    return rows


# --------------------------------------------------------------------------
# context: limits, ciphers, hot set


def _tcp_sink(sock: socket.socket, total: int) -> None:
    conn, _ = sock.accept()
    got = 0
    while got < total:
        data = conn.recv(4 * MIB)
        if not data:
            break
        got += len(data)
    conn.sendall(b"k")
    conn.close()


def tcp_gibs(total: int = 2 * GIB) -> float:
    import multiprocessing as mp
    lsock = socket.create_server(("127.0.0.1", 0))
    proc = mp.get_context("fork").Process(target=_tcp_sink, args=(lsock, total))
    proc.start()
    buf = os.urandom(MIB)
    s = socket.create_connection(lsock.getsockname())
    t = time.perf_counter()
    sent = 0
    while sent < total:
        s.sendall(buf)
        sent += MIB
    s.recv(1)
    dt = time.perf_counter() - t
    s.close()
    proc.join()
    lsock.close()
    return total / dt / GIB


def memcpy_gibs(size: int) -> float:
    import mmap
    src = mmap.mmap(-1, size)
    fill_pseudorandom(src, 0, size, 1)
    dst = bytearray(size)
    view = memoryview(src)
    dst[:] = view  # touch once: measure the copy, not first-touch faults
    t = time.perf_counter()
    dst[:] = view
    return size / (time.perf_counter() - t) / GIB


def populate_gibs(size: int) -> float:
    """Fresh memory: what the destination pays for every page it receives."""
    import mmap
    t = time.perf_counter()
    m = mmap.mmap(-1, size)
    m.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
    dt = time.perf_counter() - t
    m.close()
    return size / dt / GIB


def context_limits(rep: int, guest: int, tls: TlsCopy | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in CipherName:
        out[f"aead_1mib_{c.value}"] = summarize([aead_gibs(c, MIB, 512 * MIB) for _ in range(rep)])
        out[f"aead_64k_{c.value}"] = summarize([aead_gibs(c, 65519, 512 * MIB) for _ in range(rep)])
    out["tcp_loopback"] = summarize([tcp_gibs() for _ in range(rep)])
    if tls:
        out["tls_copy_fresh_memory"] = summarize([tls.copy(guest // 2)["gibs"] for _ in range(rep)])
    out["memcpy_guest"] = summarize([memcpy_gibs(guest) for _ in range(rep)])
    out["populate_fresh_memory"] = summarize([populate_gibs(guest) for _ in range(rep)])
    return out


def context_ciphers(palm: Palm, rep: int, guest: int) -> dict[str, Any]:
    modes = {"secure-aesgcm": lambda: palm.migrate(guest, cipher="aesgcm"),
             "secure-chachapoly": lambda: palm.migrate(guest, cipher="chachapoly"),
             "plain": lambda: palm.migrate(guest, plain=True)}
    runs, failed = interleave(rep, modes, "context: ciphers")
    return {"guest": guest, "modes": summaries(runs, failed)}


def context_hotset(palm: Palm, rep: int, guest: int, hotset: str, rate: int) -> dict[str, Any]:
    runs, failed = interleave(rep, {"hotset": lambda: palm.migrate(guest, workload=f"hotset:{hotset}:{rate}",
                                                                   settle=0.5)}, "context: hot set")
    return {"guest": guest, "hotset": hotset, "rate": rate, "modes": summaries(runs, failed)}


# --------------------------------------------------------------------------
# report


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qv = qemu_version()
    return {"cores": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "qemu": f"{qv[0]}.{qv[1]}" if qv != (0, 0) else "none",
            "date": datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds"), "load_start": load_average()}


def load_average() -> str:
    """The machine's 1-minute load average now (what else ran beside the bench)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def fmt_ratio(r: dict[str, Any]) -> str:
    if r["ratio"] is None:
        return "-"
    text = f"{r['ratio']:.2f}"
    p = r.get("pairs")
    if p and p["n"] > 1:
        text += f" [{p['min']:.2f}-{p['max']:.2f}]"
    return text


def modes_table(modes: dict[str, Any], extra: tuple[tuple[str, str, int], ...] = ()) -> list[str]:
    """Migration modes: total, downtime, setup, wire bytes, rounds, agent RSS beyond guest memory."""
    cols = (("total_ms", "total ms", 0), ("downtime_ms", "downtime ms", 1), ("setup_ms", "of which setup ms", 0),
            *extra, ("rounds", "rounds", 0), ("rss_source", "source RSS MiB", 0),
            ("rss_destination", "destination RSS MiB", 0))
    L = ["| mode | " + " | ".join(c[1] for c in cols) + " | wire bytes |", "|---" * (len(cols) + 2) + "|"]
    for mode, v in modes.items():
        if "skipped" in v:
            L.append(f"| {mode} | skipped: {v['skipped']} |" + " |" * len(cols))
            continue
        if "total_ms" not in v:
            continue
        cells = [fmt(v.get(k), "", d) for k, _, d in cols]
        wire = format_bytes(int(v["bytes"]["median"])) if v.get("bytes") else "-"
        L.append(f"| {mode} | " + " | ".join(cells) + f" | {wire} |")
    return L


def report(res: dict[str, Any]) -> str:
    L: list[str] = []
    m = res["machine"]
    L.append("# palm_net benchmarks\n")
    L.append(f"Generated by `{res['command']}` on {m['date']}: {m['cores']} cores, {m['cpu']}, kernel "
             f"{m['kernel']}, Python {m['python']}, QEMU {m.get('qemu', '?')}; guest memory on "
             f"{res.get('work_dir', 'tmpfs')}; load average "
             f"{m.get('load_start', '?')} at the start, {res.get('load_end', '?')} at the end. Medians of "
             f"{res['repeat']} runs [min-max]; compared modes "
             "interleaved repeat by repeat (A B, B A, ...). Regenerate with the same command; do not edit by hand.\n")
    goals = res.get("goals", {})
    told: list[str] = []  # the section whose downtime breakdown says what its phases are

    def breakdown(modes: dict[str, Any], section: str) -> list[str]:
        out = downtime_breakdown(modes, told)
        if out and not told:
            told.append(section)
        return out

    rows = [r for g in GOALS.values() if g in goals for r in goals[g].get("rows", [])]
    if rows:
        L.append("## Goals (issue 14)\n")
        L.append("Every verdict is a ratio against a baseline measured in the same run, never an absolute time. "
                 "Ratio: the ratio of the medians; [range]: the per-repeat ratios of the interleaved pairs.\n")
        L.append("| goal | measure | palm_net | baseline (same run) | ratio | target | verdict |")
        L.append("|---|---|---|---|---|---|---|")
        for r in rows:
            L.append(f"| {r['goal']} | {r['what']} | {r['palm']} | {r['baseline']} | {fmt_ratio(r)} | "
                     f"{r['target']} | {r['verdict']} |")
        met = sum(r["verdict"] == "met" for r in rows)
        judged = sum(r["verdict"] == "met" or r["verdict"].startswith("MISSED") for r in rows)
        L.append(f"\n{met} of {judged} judged targets met"
                 f"{'; ' + str(len(rows) - judged) + ' rows skipped or for information' if judged < len(rows) else ''}"
                 ".\n")
    for g in GOALS.values():
        v = goals.get(g)
        if v and "error" in v:
            L.append(f"**goal {g} failed to run**: {v['error']}\n")
    if "tls" in goals and "modes" in goals["tls"]:
        v = goals["tls"]
        L.append("## Goal 1: against a TLS copy of the same bytes\n")
        L.append("The TLS copy: loopback TLS 1.3 through Python's `ssl` (OpenSSL; negotiated "
                 f"{', '.join(v.get('tls_cipher', [])) or '?'}), from the memory of one process into a fresh memfd "
                 "of a forked process (first-touch page faults included, as at a migration's destination), timed "
                 "from the first byte sent to the receiver's acknowledgement; handshake excluded. palm_net: "
                 "`migrate` of an idle model guest, total time as the agent reports it (its attested handshake and "
                 "setup included), default cipher.\n")
        L.append("| mode | ms | GiB/s | cipher |\n|---|---|---|---|")
        for k in ("tls_copy_half", "tls_copy_full"):
            e = v["modes"].get(k, {})
            if "ms" in e:
                L.append(f"| {k} | {fmt(e['ms'], '', 0)} | {fmt(e['gibs'])} | {e['runs'][0]['cipher']} |")
            elif "skipped" in e:
                L.append(f"| {k} | skipped: {e['skipped']} | | |")
        L.append("")
        L += modes_table({k: v["modes"][k] for k in ("palm_half", "palm_random") if k in v["modes"]},
                         (("wire_gibs", "wire GiB/s", 2),))
        L.append("")
        L += breakdown(v["modes"], "Goal 1")
    if "protection" in goals and "modes" in goals["protection"]:
        v = goals["protection"]
        L.append("## Goal 2: protection nearly free\n")
        L.append(f"Random content in both guests; the same total write rate ({v['rate']} pages/s), in the protected "
                 "guest a quarter of it by its 4 protected processes in their pages.\n")
        L += modes_table(v["modes"])
        L.append("")
        L += breakdown(v["modes"], "Goal 2")
    if "digest" in goals and "modes" in goals["digest"]:
        v = goals["digest"]
        L.append("## Goal 3: --verify-digest\n")
        L.append("Each shape migrated with and without `verify_digest` (both sides digest the memory at the "
                 "pause; COMMIT only when equal). Shapes: " + "; ".join(f"{k}: {d}" for k, d in v["shapes"].items())
                 + ".\n")
        L += modes_table(v["modes"])
        L.append("")
        L += breakdown(v["modes"], "Goal 3")
    if "qemu" in goals and "modes" in goals["qemu"]:
        v = goals["qemu"]
        L.append("## Goal 4: against QEMU's own migration\n")
        L.append(f"One QEMU guest ({format_bytes(v['memory'])}, half of it random content loaded by `-device "
                 "loader`), each run for 3 s first (past its firmware's start, which under KVM rewrites RAM: "
                 "a migration started then sends every page twice), migrated by QEMU alone over plain TCP and "
                 "over QEMU's TLS (x509, verify-peer), and as a palm_net QEMU VM: QEMU's stream in records "
                 "of the attested Noise session, with the "
                 "one-copy handoff, on as many channels as `palm migrate` chooses when none are named (two "
                 "with QEMU 9.0 or later: its main stream and one multifd stream, on which QEMU leaves alone "
                 "the zero pages it is not sent data for). Each accelerator has its own agent pair "
                 "(`--qemu-accel`). QEMU alone's total is "
                 "QEMU's total-time (both QEMUs started before); palm_net's includes its setup (handshake, "
                 "destination QEMU start). Downtime: palm_net from the source QEMU's STOP to DONE; QEMU alone from "
                 "the source's STOP event to the destination's RESUME event.\n")
        L.append("| migration | channels | total ms | of which setup ms | downtime ms | QEMU-reported downtime ms "
                 "| bytes |")
        L.append("|---|---|---|---|---|---|---|")
        for k, e in v["modes"].items():
            if "skipped" in e:
                L.append(f"| {k} | | skipped: {e['skipped']} | | | | |")
            elif "total_ms" in e:
                setup = fmt(e["setup_ms"], "", 0) if "setup_ms" in e else "- (started before)"
                chans = f"{e['channels']['median']:.0f}" if "channels" in e else "1 (no multifd)"
                L.append(f"| {k} | {chans} | {fmt(e['total_ms'], '', 0)} | {setup} | {fmt(e['downtime_ms'], '', 1)} | "
                         f"{fmt(e.get('qemu_downtime_ms'), '', 1)} | "
                         f"{format_bytes(int(e['bytes']['median'])) if e.get('bytes') else '-'} |")
        L.append("")
        L += runs_text(v["modes"])
        L += breakdown(v["modes"], "Goal 4")
    if "scale" in goals and "modes" in goals["scale"]:
        v = goals["scale"]
        L.append("## Goal 5: scale\n")
        L.append("Idle model guests of each size, filled half random (first half random, second half zero pages), "
                 "all random, or all zero; all interleaved.\n")
        L.append("Agent memory: peak VmRSS - RssShmem during the migration, and (at rest) just before it.\n")
        L.append("| guest | fill | total ms | s per GiB | downtime ms | source RSS MiB | at rest | destination RSS MiB "
                 "| at rest |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for k, e in v["modes"].items():
            fill, size = k.split("@")
            if "skipped" in e:
                L.append(f"| {format_bytes(int(size))} | {fill} | skipped: {e['skipped']} | | | | | | |")
            elif fill == "tls":
                L.append(f"| {format_bytes(int(size))} | TLS copy of it (random) | {fmt(e['total_ms'], '', 0)} | "
                         f"{fmt(e['s_per_gib'])} | - | - | - | - | - |")
            elif "total_ms" in e:
                L.append(f"| {format_bytes(int(size))} | {fill} | {fmt(e['total_ms'], '', 0)} | "
                         f"{fmt(e['s_per_gib'])} | {fmt(e['downtime_ms'], '', 1)} | {fmt(e['rss_source'], '', 0)} | "
                         f"{fmt(e.get('rss_source_rest'), '', 0)} | {fmt(e['rss_destination'], '', 0)} | "
                         f"{fmt(e.get('rss_destination_rest'), '', 0)} |")
        L.append("")
    if "channels" in goals:
        v = goals["channels"]
        L.append("## Goal 6: channels\n")
        if "skipped" in v:
            L.append(f"Skipped: {v['skipped']}.\n")
        elif "modes" in v:
            L += modes_table(v["modes"])
            L.append("")
            L += channel_cpu_table(v["modes"])
            L += projection_text(v.get("projection") or {})
        if "qemu_modes" in v:
            L.append(f"\n### A QEMU guest on N channels ({v['qemu_accel'].upper()}): palm_net and QEMU alone's "
                     "multifd\n")
            L += modes_table(v["qemu_modes"])
            L.append("")
            L.append(f"What decides them on {m['cores']} cores shared by two QEMUs and two agents: on one "
                     "channel the destination QEMU reads every zero page it is sent, so the agent faults in the "
                     "whole RAM file ahead of it (the destination's CPU per GiB below; docs/QEMU.md), which is why "
                     "from QEMU 9.0 `palm migrate` takes two; beyond two, each stream's bytes cost each agent the "
                     "CPU below (one relay thread a session a side, docs/DATAPATH.md), on the cores QEMU's own "
                     "multifd threads need too.\n")
            L += channel_cpu_table(v["qemu_modes"], "palm_qemu_channels_")
            L += projection_text(v.get("qemu_projection") or {},
                                 f"{QEMU_PROJECTED_CHANNELS} channels, per GiB of QEMU's stream; the agents only, "
                                 "not QEMU's own processes")
    if "postcopy" in goals and "modes" in goals["postcopy"]:
        v = goals["postcopy"]
        L.append("## Goal 7: post-copy\n")
        L.append(f"A {format_bytes(v['guest'])} guest with 2 protected processes, all random, writing "
                 f"{v['rate']} pages/s: by post-copy (`--postcopy --verify-digest`, the switch where the downtime "
                 "policy would act), by pre-copy (`--verify-digest`, paused at the cap), and the same guest idle "
                 "by pre-copy. "
                 "Fault waits: how long the destination's guest waited for each page it touched before it "
                 "arrived (its summary, `palm vm show`).\n")
        L += modes_table(v["modes"], (("postcopy_pages", "post-copy pages", 0), ("fetched_pages", "asked for", 0),
                                      ("fault_median_ms", "fault median ms", 2), ("fault_p99_ms", "fault p99 ms", 2)))
        L.append("")
    ctx = res.get("context", {})
    if ctx:
        L.append("## Context (no goal)\n")
    lim = ctx.get("limits")
    if lim and "error" not in lim:
        L.append("### Limits (same run)\n")
        L.append("| measure | GiB/s |\n|---|---|")
        for k, s in lim.items():
            L.append(f"| {k} | {fmt(s)} |")
        L.append("")
    if "ciphers" in ctx and "modes" in ctx["ciphers"]:
        v = ctx["ciphers"]
        L.append(f"### Idle {format_bytes(v['guest'])} guest, half random: each cipher, and plain\n")
        L += modes_table(v["modes"], (("wire_gibs", "wire GiB/s", 2),))
        L.append("")
    if "hotset" in ctx and "modes" in ctx["hotset"]:
        v = ctx["hotset"]
        L.append(f"### Hot set of {v['hotset']} written at {v['rate']} pages/s ({format_bytes(v['guest'])} guest)\n")
        L += modes_table(v["modes"], (("expected_downtime_ms", "expected downtime ms", 1),))
        L.append("")
    for k, v in ctx.items():
        if isinstance(v, dict) and "error" in v:
            L.append(f"**{k} failed to run**: {v['error']}\n")
    if res.get("plot"):
        L.append(f"![bytes and dirty pages per round]({res['plot']})\n")
    if rows:
        L.append("## Closing note\n")
        for r in rows:
            fig = f"{r['palm']} vs {r['baseline']}" if r["baseline"] != "-" else r["palm"]
            L.append(f"- {r['goal']}, {r['what']}: {fig}; ratio {fmt_ratio(r)}, target {r['target']}: "
                     f"**{r['verdict']}**.")
        L.append("")
    return "\n".join(L) + "\n"


def plot(res: dict[str, Any], out: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = []
    goals, ctx = res.get("goals", {}), res.get("context", {})
    for src, mode, label in ((goals.get("tls"), "palm_half", "idle, half random"),
                             (goals.get("protection"), "protected", "protected, under load"),
                             (goals.get("digest"), "demo_verify", "demo, --verify-digest"),
                             (ctx.get("hotset"), "hotset", "hot set")):
        v = (src or {}).get("modes", {}).get(mode, {})
        if v.get("round_stats"):
            series.append((label, v["round_stats"]))
    if not series:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rs in series:
        ax1.plot([r["round"] for r in rs], [r["bytes"] / MIB for r in rs], marker="o", label=label)
        ax2.plot([r["round"] for r in rs], [r["dirty_pages"] for r in rs], marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("MiB sent")
    ax2.set_xlabel("round")
    ax2.set_ylabel("pages dirtied during the round")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(out)
    return str(out)


# --------------------------------------------------------------------------
# main


def parse_only(text: str) -> set[str]:
    names = [*GOALS.values(), *CONTEXT]
    out: set[str] = set()
    for tok in (t.strip().lower() for t in text.split(",")):
        if not tok:
            continue
        if tok == "all":
            out |= set(names)
        elif tok == "goals":
            out |= set(GOALS.values())
        elif tok == "context":
            out |= set(CONTEXT)
        elif tok in GOALS:
            out.add(GOALS[tok])
        elif tok in names:
            out.add(tok)
        else:
            raise ValueError(f"unknown {tok!r}: use goal numbers 1-7, names ({', '.join(names)}), goals, context "
                             "or all")
    return out


def parse_accels(text: str) -> list[str]:
    if text == "auto":
        return [default_accel(), *(["tcg"] if default_accel() != "tcg" else [])]
    accels = [a.strip() for a in text.split(",") if a.strip()]
    if not accels or any(a not in ("kvm", "tcg") for a in accels):
        raise ValueError("--qemu-accel: auto, or a list of kvm and tcg")
    return accels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repeat, 256 MiB guests, sizes 64MiB,256MiB; never writes docs/")
    ap.add_argument("--repeat", type=int, metavar="N", help="runs of each mode (default 5, --quick 1)")
    ap.add_argument("--guest", default=None, metavar="SIZE",
                    help="guest size of goals 1, 2, 3 (idle shape), 4, 6 and the context "
                         "(default 1GiB, --quick 256MiB)")
    ap.add_argument("--sizes", default=None, metavar="LIST",
                    help="goal 5's guest sizes, ascending (default 256MiB,1GiB,4GiB, --quick 64MiB,256MiB)")
    ap.add_argument("--hotset", default="64MiB", metavar="SIZE", help="context hot set size (default 64MiB)")
    ap.add_argument("--hot-rate", type=int, default=20000, metavar="N",
                    help="hot-set writes per second; goal 2 writes a quarter of it (default 20000)")
    ap.add_argument("--only", default="all", metavar="LIST",
                    help="goals and scenarios to run: numbers 1-6 or names tls, protection, digest, qemu, scale, "
                         "channels, limits, ciphers, hotset; or goals, context, all (default all)")
    ap.add_argument("--qemu-accel", default="auto", metavar="LIST",
                    help="goal 4's accelerators: auto (KVM when usable, and TCG), or e.g. tcg or kvm,tcg")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for every `palm agent` started (repeat it; e.g. --agent-arg=--memory-dir="
                         "/mnt/huge to try huge-page-backed guests)")
    ap.add_argument("--out", default=str(ROOT / "bench-out"), metavar="DIR", help="bench.json, rounds.png")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    ap.add_argument("--work-dir", metavar="DIR", help="where the agents keep guest memory and the bench its files "
                    "(default /dev/shm; e.g. a tmpfs mounted with huge=within_size, docs/DATAPATH.md)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the report (and docs/BENCHMARKS.md) from --out/bench.json, measuring nothing")
    args = ap.parse_args()
    try:
        only = parse_only(args.only)
        accels = parse_accels(args.qemu_accel)
        guest = parse_size(args.guest or ("256MiB" if args.quick else "1GiB"))
        sizes = sorted(parse_size(s) for s in (args.sizes or ("64MiB,256MiB" if args.quick else
                                                               "256MiB,1GiB,4GiB")).split(","))
    except ValueError as exc:
        ap.error(str(exc))
    rep = args.repeat or (1 if args.quick else 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    full = only == {*GOALS.values(), *CONTEXT}
    if args.report_only:
        res = json.loads((out / "bench.json").read_text())
        res["plot"] = plot(res, out / "rounds.png") or res.get("plot")  # matplotlib may be there now
        write_report(res, out, doc=not args.no_doc and not res.get("partial") and not res.get("quick"))
        return 0
    res: dict[str, Any] = {"command": "scripts/bench " + " ".join(sys.argv[1:]), "machine": machine(),
                           "repeat": rep, "guest": guest, "sizes": sizes, "quick": args.quick, "partial": not full,
                           "selected": sorted(only), "goals": {}, "context": {}}
    shm = args.work_dir or "/dev/shm"
    work = Path(tempfile.mkdtemp(prefix="palm-bench-", dir=shm if Path(shm).is_dir() else None))
    res["work_dir"] = memory_backing(work)
    pairs: dict[str, Palm] = {}
    t_start = time.monotonic()
    try:
        tls: TlsCopy | None = None
        tls_skip = ""
        if only & {"tls", "limits", "scale"}:
            try:
                tls = TlsCopy(work)
            except (OSError, subprocess.CalledProcessError) as exc:
                tls_skip = f"no TLS copy peer: cannot make its certificate with openssl ({exc})"
                log(tls_skip)

        def palm(accel: str | None = None) -> Palm:
            """The agent pair (started once); for goal 4, one per QEMU accelerator."""
            key = accel or "default"
            if accel == default_accel() and "default" in pairs:
                key = "default"
            if key not in pairs:
                extra = [*args.agent_arg, *(["--qemu-accel", accel] if accel else [])]
                log(f"starting two agents{' (QEMU ' + accel + ')' if accel else ''}")
                pairs[key] = Palm(work / f"agents-{key}", extra=extra, label=key)
            return pairs[key]

        def run(group: str, name: str, fn: Callable[[], dict[str, Any]]) -> None:
            if name not in only:
                return
            log(f"{group} {name}")
            try:
                res[group][name] = fn()
            except Exception as exc:  # one goal's failure must not lose the others' figures
                traceback.print_exc()
                err = f"{type(exc).__name__}: {exc}"
                res[group][name] = {"error": err, "rows": [row(name, "could not run", "-", "-", None, None, "-",
                                                               f"error: {err}")]}

        run("context", "limits", lambda: context_limits(rep, guest, tls))
        run("goals", "tls", lambda: goal_tls(palm(), tls, rep, guest) if tls else
            {"skipped": tls_skip, "rows": [skipped_row("1. vs TLS copy", "palm_net vs TLS copy", tls_skip)]})
        run("goals", "protection", lambda: goal_protection(palm(), rep, guest, args.hot_rate))
        run("goals", "digest", lambda: goal_digest(palm(), rep, guest))
        run("goals", "qemu", lambda: goal_qemu({a: palm(a) for a in accels}, rep, guest, work))
        for key in [k for k in pairs if k != "default"]:
            pairs.pop(key).close()  # the other accelerator's agents: done
        run("goals", "scale", lambda: goal_scale(palm(), rep, sizes, tls))
        run("goals", "channels", lambda: goal_channels(palm(), rep, guest, work))
        run("goals", "postcopy", lambda: goal_postcopy(palm(), rep, guest))
        run("context", "ciphers", lambda: context_ciphers(palm(), rep, guest))
        run("context", "hotset", lambda: context_hotset(palm(), rep, guest, args.hotset, args.hot_rate))
    finally:
        for p in pairs.values():
            p.close()
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    log(f"measured in {res['seconds']:.0f} s")
    res["plot"] = plot(res, out / "rounds.png")
    res["load_end"] = load_average()
    (out / "bench.json").write_text(json.dumps(res, indent=1))
    doc = not args.no_doc and not args.quick and full
    if not doc and not args.no_doc:
        log("docs/BENCHMARKS.md left alone (written only by a full run: no --quick, no partial --only)")
    write_report(res, out, doc)
    return 0


def write_report(res: dict[str, Any], out: Path, doc: bool) -> None:
    text = report(res)
    print(text)
    (out / "BENCHMARKS.md").write_text(text)
    if doc:
        path = ROOT / "docs" / "BENCHMARKS.md"
        path.parent.mkdir(exist_ok=True)
        if res.get("plot"):
            shutil.copy(out / "rounds.png", path.parent / "rounds.png")
            text = text.replace(f"]({res['plot']})", "](rounds.png)")
        path.write_text(text)
        log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
