"""The `scale` tier: scripts/cluster_scale.py with 200 simulated agents in 2 processes
(the real cluster member each, a real 3-member etcd on loopback); about 10 s on 2 cores.
Every agent must enforce the signed revocation and the figures must be printed.
Outside the default run: `pytest -m scale` (.ci/run runs it); the 1000-agent figures in
docs/CLUSTER.md come from the script's default run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from palm_net.testing.etcd import MISSING_REASON, find_etcd

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.scale, pytest.mark.skipif(find_etcd() is None, reason=MISSING_REASON)]


def test_cluster_scale_200_agents():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "cluster_scale.py"), "--agents", "200",
                        "--processes", "2", "--idle", "2", "--repeat", "3", "--timeout", "150"],
                       capture_output=True, text=True, timeout=200, cwd=ROOT)
    out = p.stdout
    print(out)
    print(p.stderr[-2000:], file=sys.stderr)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "200 simulated agents in 2 processes, a 3-member etcd on loopback" in out
    m = re.search(r"revocation enforced by (\d+) of 200 agents: median ([\d.]+) ms, p99 ([\d.]+) ms, "
                  r"worst ([\d.]+) ms after the write returned", out)
    assert m and m.group(1) == "200", out
    assert float(m.group(2)) <= float(m.group(3)) <= float(m.group(4))
    assert "`palm cluster revoke` saw 200 acknowledgements (0 missing)" in out
    assert re.search(r"drain plan of 20 VMs among 199 candidates: reading and verifying the records [\d.]+ ms", out)
    assert re.search(r"real drain, .*: done in [\d.]+ s \(20 moved\)", out)
    assert re.search(r"etcd m0 [\d.]+ s CPU \d+ MiB", out)
