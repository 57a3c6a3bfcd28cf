"""The shipped systemd unit: hardened, valid, and in step with the agent's defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from palm_net.agent import paths
from palm_net.cli import _load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "palm-agent.service"
CONFIG = ROOT / "deploy" / "agent.toml"


def service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():  # repeated keys accumulate, as systemd reads them
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m[1], []).append(m[2])
    return out


def test_unit_is_hardened():
    s = service()
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "StateDirectoryMode": "0700", "RuntimeDirectoryMode": "0700",
                       "UMask": "0077", "DevicePolicy": "closed", "RestrictSUIDSGID": "yes",
                       "KillMode": "process", "RuntimeDirectoryPreserve": "yes",
                       "ReadOnlyPaths": "/etc/palm"}.items():  # the agent only reads its configuration
        assert s.get(key) == [value], key
    caps = set(s["CapabilityBoundingSet"][0].split())
    assert caps <= {"CAP_SETUID", "CAP_SETGID", "CAP_SYS_CHROOT", "CAP_KILL"}, caps
    assert s["DeviceAllow"] == ["/dev/kvm rw"]


def test_unit_paths_are_the_agent_defaults_and_its_config_is_valid(monkeypatch):
    s = service()
    monkeypatch.setattr("os.geteuid", lambda: 0)  # the service runs as root
    assert Path("/var/lib") / s["StateDirectory"][0] == paths.default_state_dir()
    assert Path("/run") / s["RuntimeDirectory"][0] == paths.runtime_base()
    config_arg = re.search(r"--config (\S+)", s["ExecStart"][0])
    assert config_arg and Path(config_arg[1]) == Path("/etc") / s["ConfigurationDirectory"][0] / CONFIG.name
    conf = _load_config(str(CONFIG))  # the agent's own loader: unknown keys are refused
    assert Path(conf["control"]).parent == paths.runtime_base()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian systemd)")
def test_systemd_accepts_the_unit_and_rates_it_ok(tmp_path):
    # ExecStart must name an existing executable for `verify`: point it at this venv's palm.
    palm = shutil.which("palm") or "/bin/true"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/palm", palm))
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    warnings = [ln for ln in (v.stdout + v.stderr).splitlines() if UNIT.name in ln]
    assert v.returncode == 0 and not warnings, warnings
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                         text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    assert float(m[1]) <= 3.5, sec.stdout  # systemd calls up to 3.9 "OK"; 10 is a service with no protection
