"""`palm demo`: a throw-away cluster on loopback, one protected VM migrated under load.

Creates an authority and two agents (separate processes, as in production)
in a temporary directory, a VM with protected processes and a running
workload on the first, migrates it to the second with the memory digest
checked on both sides while paused, verifies every protected page on the
destination, checks the VM runs on the destination only, prints the summary
and removes everything it made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from palm_net.cli import CliError, control_request, migrate_summary
from palm_net.units import format_bytes, parse_size


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def _start_agent(root: Path, name: str, ca_pub: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    d = root / name
    control = root / f"{name}.sock"
    log = open(root / f"{name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "palm_net.cli", "--log-format", "json", "agent", "--dir", str(d), "--listen",
         "127.0.0.1:0", "--control", str(control), "--ca", str(ca_pub), "--memory-dir", str(root / f"{name}-mem")],
        stdout=log, stderr=log, start_new_session=True,
    )
    return proc, str(control), root / f"{name}.log"


def _wait_ready(proc: subprocess.Popen[bytes], control: str, log: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"agent exited at start: {log.read_text()[-500:]}")
        if Path(control).exists():
            with contextlib.suppress(CliError):
                return int(control_request(control, "status", {}, timeout=5)["listen_port"])
        time.sleep(0.05)
    raise CliError("agent did not start within 20 s")


def run_demo(a: argparse.Namespace) -> int:
    from palm_net.agent.agent import default_measurement
    from palm_net.crypto.identity import CERT_FILE, AgentIdentity, Authority

    quiet = a.json
    try:
        memory = parse_size(a.memory)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    if memory < 16 << 20:
        raise CliError("demo memory must be at least 16MiB", 2)
    shm = "/dev/shm"  # noqa: S108 - mkdtemp makes a private 0700 directory
    root = Path(tempfile.mkdtemp(prefix="palm-demo-", dir=shm if Path(shm).is_dir() else None))
    procs: list[subprocess.Popen[bytes]] = []
    t_start = time.monotonic()
    try:
        _say(quiet, f"palm demo: throw-away cluster in {root}")
        ca = Authority.generate()
        ca.save(root / "ca")
        m = default_measurement()
        for name in ("host-a", "host-b"):
            ident = AgentIdentity.generate(name)
            ident.save(root / name)
            (root / name / CERT_FILE).write_bytes(
                ca.issue(name, ident.static.public, ident.sign_pub, m, days=1).encode())
        _say(quiet, f"  authority {ca.key_id.hex()[:16]}..., agents host-a and host-b, measurement {m.hex()[:16]}...")
        agents = []
        for name in ("host-a", "host-b"):
            proc, control, log = _start_agent(root, name, root / "ca" / "ca.pub")
            procs.append(proc)
            agents.append((proc, control, log))
        ports = [_wait_ready(p, c, lg) for p, c, lg in agents]
        (_, ctl_a, _), (_, ctl_b, _) = agents
        _say(quiet, f"  agents listening on 127.0.0.1:{ports[0]} and 127.0.0.1:{ports[1]}")
        vm = control_request(ctl_a, "vm.create", {"name": "demo-vm", "memory": a.memory, "protected": 2,
                                                  "workload": a.workload, "seed": 42})
        _say(quiet, f"  VM demo-vm on host-a: {format_bytes(vm['memory'])}, {vm['protected_processes']} protected "
                    f"processes owning {vm['protected_pages']} pages, workload {vm['workload']}")
        time.sleep(1.0)  # let the workload dirty memory before migrating
        _say(quiet, "  migrating demo-vm host-a -> host-b over the attested Noise channel ...")
        result = control_request(ctl_a, "migrate", {"name": "demo-vm", "to": f"127.0.0.1:{ports[1]}",
                                                     "verify_digest": True})
        verify = control_request(ctl_b, "vm.verify", {"name": "demo-vm"}) if result["ok"] else None
        on_a = [v["name"] for v in control_request(ctl_a, "vm.list", {})]
        on_b = [v["name"] for v in control_request(ctl_b, "vm.list", {})]
        state_b = next((v["state"] for v in control_request(ctl_b, "vm.list", {}) if v["name"] == "demo-vm"), None)
        ok = bool(result["ok"] and verify and verify["ok"] and result["digest_verified"]
                  and "demo-vm" not in on_a and "demo-vm" in on_b and state_b == "running")
        summary: dict[str, Any] = {
            "ok": ok, "migration": result, "verify": verify, "vm_on_source": "demo-vm" in on_a,
            "vm_on_destination": "demo-vm" in on_b, "destination_state": state_b,
            "digest_equal": result.get("digest_verified", False), "demo_seconds": round(time.monotonic() - t_start, 2),
        }
        if a.json:
            print(json.dumps(summary))
        else:
            print(migrate_summary(result))
            if verify:
                print(f"  destination verify: {'OK' if verify['ok'] else 'FAILED'}, {verify['checked']} protected "
                      f"pages checked against their MACs")
            print(f"  demo-vm now on: {'host-a ' if 'demo-vm' in on_a else ''}"
                  f"{'host-b (' + str(state_b) + ')' if 'demo-vm' in on_b else ''}")
            print(f"demo {'PASSED' if ok else 'FAILED'} in {summary['demo_seconds']} s")
        if not ok:
            for _, _, log in agents:
                sys.stderr.write(f"--- {log.name} (last lines)\n{log.read_text()[-2000:]}\n")
        return 0 if ok else 1
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if a.keep:
            _say(quiet, f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
