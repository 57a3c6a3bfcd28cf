"""Three agents as Podman containers, for a person to use: `scripts/containers up|status|down`.

`up` does what `scripts/drill --containers` does before its first step (a
Debian base made with mmdebstrap, the Dockerfile built on it with Podman in a
private store, authority-init, three healthy agents: scripts/container_cluster.py)
and leaves the agents running; it prints how to reach each agent's control
socket from the host.  `status` shows them; `down` removes every container,
volume, network and image, the private store and what Podman and CNI added
to the host, as the drill does at its end, and says "nothing left behind" or
names what is.  One such cluster at a time on a host (and no container drill
while it runs).  Needs root; no image registry.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import container_cluster
from container_cluster import ContainerCluster, ContainerError, find_kept

from palm_net.agent.client import ControlError

AGENTS = 3


def kept_or_none() -> tuple[Path, dict[str, Any]] | None:
    path = find_kept()
    return (path, json.loads(path.read_text())) if path else None


def up() -> int:
    why = container_cluster.missing()
    if why:
        print(f"containers: {why}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="palm-containers-", dir="/var/tmp"))
    cluster: ContainerCluster | None = None
    try:
        cluster = ContainerCluster(AGENTS, root)
        cluster.start()
        cluster.keep()
    except (KeyboardInterrupt, ContainerError) as exc:
        print("containers: interrupted, cleaning up" if isinstance(exc, KeyboardInterrupt) else f"containers: {exc}",
              file=sys.stderr)
        if cluster is not None:
            cluster.close()
        shutil.rmtree(root, ignore_errors=True)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    print(f"containers: up in {time.monotonic() - t0:.1f} s; {AGENTS} agents on network {cluster.tag}_palm "
          f"(they reach each other as NAME:{container_cluster.PORT}):")
    for ag in cluster.agents:
        print(f"  {ag.name}  palm vm list --control {ag.control}")
    a, b = cluster.agents[0], cluster.agents[1]
    print(f"  try:     palm vm create web --memory 256MiB --protected 2 --control {a.control}")
    print(f"           palm migrate web --to {b.name}:{container_cluster.PORT} --control {a.control}")
    print(f"  Podman:  export CONTAINERS_CONF={cluster.env['CONTAINERS_CONF']} "
          f"CONTAINERS_STORAGE_CONF={cluster.env['CONTAINERS_STORAGE_CONF']}")
    print("containers: `scripts/containers down` removes them and everything they made")
    return 0


def status() -> int:
    kept = kept_or_none()
    if kept is None:
        print("containers: none are up (`scripts/containers up` starts them)", file=sys.stderr)
        return 1
    _, st = kept
    cluster = ContainerCluster(AGENTS, Path(st["root"]), kept=st)
    try:
        print(f"{'AGENT':8} {'CONTAINER':28} {'STATE':8} {'VMS':12} CONTROL")
        for ag in cluster.agents:
            state = cluster.podman("inspect", "--format", "{{.State.Status}}", ag.container,
                                   check=False).stdout.strip() or "gone"
            try:
                vms = ",".join(sorted(v["name"] for v in ag.request("vm.list", timeout=10))) or "-"
            except (ControlError, OSError) as exc:
                vms = f"({str(exc)[:40]})"
            print(f"{ag.name:8} {ag.container:28} {state:8} {vms:12} {ag.control}")
    finally:
        cluster.keep()
    return 0


def down() -> int:
    kept = kept_or_none()
    if kept is None:
        print("containers: none are up (nothing to remove)", file=sys.stderr)
        return 1
    path, st = kept
    cluster = ContainerCluster(AGENTS, Path(st["root"]), kept=st)
    path.unlink()
    t0 = time.monotonic()
    left = cluster.close()
    shutil.rmtree(st["root"], ignore_errors=True)
    print(f"containers: down in {time.monotonic() - t0:.1f} s")
    return 1 if left else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/containers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("up", "status", "down"))
    a = ap.parse_args()

    def on_signal(signum: int, _: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        return {"up": up, "status": status, "down": down}[a.command]()
    except ContainerError as exc:
        print(f"containers: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
