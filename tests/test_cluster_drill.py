"""The `cluster` tier: scripts/drills/cluster.toml for real (five agents and three
etcd members in network namespaces, as root; under a minute on 2 cores).  Outside
the default run: `pytest -m cluster` (.ci/run runs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from palm_net.testing.etcd import MISSING_REASON, find_etcd

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(find_etcd() is None, reason=MISSING_REASON),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"),
                       reason="the cluster drill needs root, ip and iptables (network namespaces)"),
]


def test_cluster_drill():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "drill.py"), str(ROOT / "scripts" / "drills" /
                        "cluster.toml")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = p.stdout
    print(out[-6000:])
    print(p.stderr[-3000:], file=sys.stderr)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "network namespaces, etcd of 3 members" in out
    assert "invariant violations 0" in out
    assert "drain of agent1 done: 6 of 6 VMs moved" in out
    assert "refused by 4 of 4" in out and "revoke agent4: in force on 5 agents after" in out
    assert "record STALE before the heal" in out and "NOT converged" not in out
    assert not [ln for ln in out.splitlines() if "VIOLATION" in ln]
