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
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from palm_net.cli.output import CliError, control_request, migrate_failure, migrate_summary
from palm_net.units import exact_size, format_bytes, parse_memory


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def run_demo(a: argparse.Namespace) -> int:
    from palm_net.agent.agent import default_measurement
    from palm_net.agent.launcher import AgentProcess, provision

    quiet = a.json
    try:
        memory = parse_memory(a.memory)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    if memory < 16 << 20:
        raise CliError("demo memory must be at least 16MiB", 2)
    shm = "/dev/shm"  # noqa: S108 - mkdtemp makes a private 0700 directory
    root = Path(tempfile.mkdtemp(prefix="palm-demo-", dir=shm if Path(shm).is_dir() else None))
    agents: list[AgentProcess] = []
    t_start = time.monotonic()
    try:
        _say(quiet, f"palm demo: throw-away cluster in {root}")
        ca = provision(root, ["host-a", "host-b"])
        _say(quiet, f"  authority {ca.key_id.hex()[:16]}..., agents host-a and host-b, "
                    f"measurement {default_measurement().hex()[:16]}...")
        for name in ("host-a", "host-b"):
            agents.append(AgentProcess(root, name).start())
        src, dst = agents
        ctl_a, ctl_b = src.control, dst.control
        _say(quiet, f"  agents listening on {src.addr} and {dst.addr}")
        vm = control_request(ctl_a, "vm.create", {"name": "demo-vm", "memory": exact_size(memory), "protected": 2,
                                                  "workload": a.workload, "seed": 42})
        _say(quiet, f"  VM demo-vm on host-a: {format_bytes(vm['memory'])}, {vm['protected_processes']} protected "
                    f"processes owning {vm['protected_pages']} pages, workload {vm['workload']}")
        time.sleep(1.0)  # let the workload dirty memory before migrating
        _say(quiet, "  migrating demo-vm host-a -> host-b over the attested Noise channel ...")
        result = control_request(ctl_a, "migrate", {"name": "demo-vm", "to": dst.addr, "verify_digest": True})
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
            if not result["ok"]:
                print(migrate_failure(result))
            print(migrate_summary(result))
            if verify:
                print(f"  destination verify: {'OK' if verify['ok'] else 'FAILED'}, {verify['checked']} protected "
                      f"pages checked against their MACs")
            print(f"  demo-vm now on: {'host-a ' if 'demo-vm' in on_a else ''}"
                  f"{'host-b (' + str(state_b) + ')' if 'demo-vm' in on_b else ''}")
            print(f"demo {'PASSED' if ok else 'FAILED'} in {summary['demo_seconds']} s")
        if not ok:
            for ag in agents:
                sys.stderr.write(f"--- {ag.log_path.name} (last lines)\n{ag.log_tail()}\n")
        return 0 if ok else 1
    finally:
        for ag in agents:
            ag.stop()
        if a.keep:
            _say(quiet, f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
