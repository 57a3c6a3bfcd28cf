"""The container harness (issue 15): scripts/drill --containers for real, and its pure parts.

The end-to-end tests build the image and run the agents as Podman containers
(about a minute each); they form the `containers` tier, outside the default
run: `pytest -m containers` (.ci/run runs it after the default suite).  They
skip, saying why, where Podman cannot run containers.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import container_cluster  # noqa: E402
from container_cluster import TAG_PREFIX, HostState, parse_sources  # noqa: E402
from drill import container_problem  # noqa: E402

DRILL = [sys.executable, str(ROOT / "scripts" / "drill.py"), "--containers",
         str(ROOT / "scripts" / "drills" / "containers.toml")]
SUMMARY = re.compile(r"^steps (\d+), migrations completed (\d+), failed closed (\d+), median downtime .*, "
                     r"faults injected (\{.*\}), invariant violations (\d+)$", re.M)


def test_debian_sources_in_both_formats():
    one_line = """
# comment
deb http://mirror.example/debian bookworm main contrib
deb [signed-by=/usr/share/keyrings/k.gpg arch=amd64] http://mirror.example/debian-security bookworm-security main
deb-src http://mirror.example/debian bookworm main
deb http://other.example/repo nodistro contrib
"""
    assert parse_sources(one_line, deb822=False) == [("http://mirror.example/debian", "bookworm"),
                                                     ("http://mirror.example/debian-security", "bookworm-security")]
    deb822 = """Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main
"""
    assert parse_sources(deb822, deb822=True) == [("http://mirror.example/debian", "bookworm"),
                                                  ("http://mirror.example/debian", "bookworm-updates")]


@pytest.mark.parametrize(("scenario", "why"), [
    ({"vm": [{"name": "q", "backend": "qemu"}]}, "model VMs only"),
    ({"step": [{"action": "migrate", "vm": "a", "to": 1, "fault": {"direction": "s2c", "frame": 2,
                                                                    "action": "cut"}}]}, "step 1 (migrate)"),
    ({"step": [{"action": "rate", "agent": 1, "rate": "1gbit"}]}, "step 1 (rate)"),
    ({"step": [{"action": "random", "count": 3}]}, "step 1 (random)"),
])
def test_container_drill_refuses_what_needs_host_side_links(scenario, why):
    assert why in (container_problem(scenario) or "")


def test_container_scenario_is_accepted():
    import tomllib

    assert container_problem(tomllib.loads((ROOT / "scripts" / "drills" / "containers.toml").read_text())) is None


# --------------------------------------------------------------------------
# the containers tier


def podman_or_skip() -> None:
    why = container_cluster.missing()
    if why:
        pytest.skip(why)


def left_on_host(before: HostState) -> list[str]:
    return HostState.take(TAG_PREFIX).added_since(before)


@pytest.mark.containers
def test_container_drill_migrates_between_containers_and_leaves_nothing():
    podman_or_skip()
    before = HostState.take(TAG_PREFIX)
    t0 = time.monotonic()
    p = subprocess.run(DRILL, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    took = time.monotonic() - t0
    print(p.stdout[-6000:], p.stderr[-3000:], f"\nthe drill took {took:.1f} s", sep="\n")
    assert p.returncode == 0, p.stderr[-3000:]
    m = SUMMARY.search(p.stdout)
    assert m, p.stdout[-2000:]
    steps, completed, _failed, faults, violations = m.groups()
    assert int(steps) == 11 and int(violations) == 0
    assert int(completed) >= 9  # the ring twice, two at once, one more; a killed migration may still complete
    assert faults == "{'kill-destination': 1, 'kill-source': 1}"
    assert "each agent mounts its own volume and the public ca.pub (read-only) only" in p.stdout
    assert "refuses a QEMU guest unconfined: QEMU guests are refused: this agent does not run as root" in p.stdout
    assert "nothing left behind" in p.stdout
    assert left_on_host(before) == []


@pytest.mark.containers
def test_container_drill_interrupted_mid_migration_cleans_up():
    podman_or_skip()
    before = HostState.take(TAG_PREFIX)
    proc = subprocess.Popen(DRILL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if re.match(r"\s+\[\s+1\] ", line):  # the first migration is done: the second one is under way
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out) + rest
    print(text[-4000:], err[-2000:], sep="\n")
    assert any(re.match(r"\s+\[\s+1\] ", ln) for ln in out), text[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert "drill: interrupted, cleaning up" in err
    assert "nothing left behind" in text
    assert left_on_host(before) == []


CONTAINERS = [sys.executable, str(ROOT / "scripts" / "containers.py")]
PALM = [sys.executable, "-m", "palm_net.cli"]


@pytest.mark.containers
def test_containers_up_leaves_agents_to_use_and_down_leaves_nothing():
    """Issue 25.8: `scripts/containers up` leaves the three agents running and says how to reach each control
    socket; a model VM made on one moves to another through those sockets; `down` removes everything."""
    podman_or_skip()
    before = HostState.take(TAG_PREFIX)
    try:
        t0 = time.monotonic()
        up = subprocess.run([*CONTAINERS, "up"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
        print(up.stdout, up.stderr[-3000:], f"up took {time.monotonic() - t0:.1f} s", sep="\n")
        assert up.returncode == 0, up.stderr[-3000:]
        socks = dict(re.findall(r"^  (agent-\w)  palm vm list --control (\S+)$", up.stdout, re.M))
        assert sorted(socks) == ["agent-a", "agent-b", "agent-c"], up.stdout

        def palm(*args: str) -> subprocess.CompletedProcess[str]:
            p = subprocess.run([*PALM, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
            assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
            return p

        assert palm("vm", "list", "--control", socks["agent-a"]).stdout.strip().lower() == "no vms"
        palm("vm", "create", "web", "--memory", "256MiB", "--protected", "2", "--control", socks["agent-a"])
        moved = palm("migrate", "web", "--to", "agent-b:7400", "--control", socks["agent-a"], "--json")
        assert json.loads(moved.stdout)["ok"] is True
        assert "web" in palm("vm", "list", "--control", socks["agent-b"]).stdout
        assert "web" not in palm("vm", "list", "--control", socks["agent-a"]).stdout
        palm("vm", "verify", "web", "--control", socks["agent-b"])
        status = subprocess.run([*CONTAINERS, "status"], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert status.returncode == 0 and re.search(r"^agent-b .* running +web ", status.stdout, re.M), status.stdout
    finally:
        down = subprocess.run([*CONTAINERS, "down"], capture_output=True, text=True, timeout=600, cwd=ROOT)
        print(down.stdout, down.stderr)
    assert down.returncode == 0, down.stderr
    assert "nothing left behind" in down.stdout
    assert left_on_host(before) == []
    again = subprocess.run([*CONTAINERS, "down"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert again.returncode == 1 and again.stderr.strip() == "containers: none are up (nothing to remove)"
