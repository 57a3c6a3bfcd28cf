"""The deployment files: one volume per agent, and the authority's private key in no agent container.

Issue 11: one compromised agent must not control the cluster.  Read from
scripts/compose.yaml and the Dockerfile the agent runs with: each agent
service mounts its own state volume and, read-only, a volume holding only
the authority's public key; only the one-shot provisioning step mounts the
volume where `palm ca init` puts ca.key.  (scripts/drill --containers checks
the same on the running containers.)
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "scripts" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool
    kind: str  # volume, bind, tmpfs


def mounts(service: dict, named: set[str]) -> list[Mount]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) == 1:  # anonymous volume
                out.append(Mount("", parts[0], False, "volume"))
                continue
            src, dst, opts = parts[0], parts[1], (parts[2].split(",") if len(parts) > 2 else [])
            kind = "volume" if src in named else "bind"
            out.append(Mount(src, dst, "ro" in opts, kind))
        else:
            out.append(Mount(v.get("source", ""), v["target"], bool(v.get("read_only")), v.get("type", "volume")))
    return out


def under(path: str, mount: Mount) -> bool:
    return path == mount.target or path.startswith(mount.target.rstrip("/") + "/")


def script(service: dict) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        v = service.get(key) or []
        parts += [v] if isinstance(v, str) else list(v)
    return " ".join(parts).replace("$$", "$")


def image_entrypoint() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert m, "Dockerfile has no exec-form ENTRYPOINT"
    return list(json.loads(m.group(1)))


def image_healthcheck() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK\s.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    assert m, "Dockerfile has no exec-form HEALTHCHECK"
    return ["CMD", *json.loads(m.group(1))]


class Deployment:
    def __init__(self, text: str) -> None:
        doc = yaml.safe_load(text)
        self.services: dict[str, dict] = doc["services"]
        self.named = set(doc.get("volumes") or {})
        found = [(name, m.group(1)) for name, s in self.services.items()
                 if (m := re.search(r"\bpalm ca init\b.*?--dir[ =](\S+)", script(s)))]
        assert len(found) == 1, f"expected one service that runs `palm ca init --dir`, found {found}"
        self.init, ca_dir = found[0]
        where = [m for m in self.mounts(self.init) if under(ca_dir, m)]
        assert where and where[-1].kind == "volume", f"ca.key ({ca_dir}) is not in a named volume"
        self.authority = where[-1].source
        self.agents = [n for n in self.services if n != self.init]

    def mounts(self, name: str) -> list[Mount]:
        return mounts(self.services[name], self.named)

    def entrypoint(self, name: str) -> list[str]:
        ep = self.services[name].get("entrypoint")
        return shlex.split(ep) if isinstance(ep, str) else list(ep or image_entrypoint())


def problems(dep: Deployment) -> list[str]:
    out = []
    rw_owner: dict[str, list[str]] = {}
    for a in dep.agents:
        svc = dep.services[a]
        ms = dep.mounts(a)
        for key in ("volumes_from", "privileged", "pid", "ipc"):
            if svc.get(key):
                out.append(f"{a}: {key} shares more than its own volume")
        for m in ms:
            if m.kind != "volume" or not m.source:
                out.append(f"{a}: {m.kind} mount at {m.target} ({m.source or 'anonymous'})")
            if m.source == dep.authority:
                out.append(f"{a}: mounts {m.source}, the volume holding ca.key")
            if not m.read_only:
                rw_owner.setdefault(m.source, []).append(a)
        writable = [m for m in ms if not m.read_only]
        if len(writable) != 1:
            out.append(f"{a}: {len(writable)} writable mounts, not exactly its own state volume")
        # The agent's state, control socket and VM memory live in its own volume; its ca.pub in a read-only one.
        args = dep.entrypoint(a)
        for flag in ("--dir", "--control", "--memory-dir"):
            path = args[args.index(flag) + 1] if flag in args else ""
            if not any(under(path, m) for m in writable):
                out.append(f"{a}: {flag} {path or '(unset)'} is not in its own volume")
        health = svc.get("healthcheck", {}).get("test") or image_healthcheck()
        control = args[args.index("--control") + 1] if "--control" in args else ""
        if "--control" not in health or health[health.index("--control") + 1] != control:
            out.append(f"{a}: the healthcheck {health} does not ask the agent's control socket {control}")
        ca = args[args.index("--ca") + 1] if "--ca" in args else ""
        public = [m for m in ms if m.read_only and under(ca, m)]
        if not public:
            out.append(f"{a}: --ca {ca or '(unset)'} is not on a read-only volume")
    for vol, users in rw_owner.items():
        if len(users) > 1:
            out.append(f"volume {vol} is writable by {', '.join(users)}")
    # What the provisioning step puts into a volume that agents mount read-only: public material only.
    shared_ro = {m.source for a in dep.agents for m in dep.mounts(a) if m.read_only}
    init_script = script(dep.services[dep.init])
    for m in dep.mounts(dep.init):
        if m.source in shared_ro:
            written = set(re.findall(re.escape(m.target.rstrip("/")) + r"/(\S+)", init_script))
            if written != {"ca.pub"}:
                out.append(f"read-only volume {m.source} gets {sorted(written)} from {dep.init}, not ca.pub alone")
    return out


def test_compose_gives_each_agent_only_its_own_volume_and_the_public_key():
    dep = Deployment(COMPOSE.read_text())
    assert len(dep.agents) >= 2
    assert problems(dep) == []


def test_only_the_provisioning_step_reaches_ca_key():
    dep = Deployment(COMPOSE.read_text())
    reach = [s for s in dep.services if any(m.source == dep.authority for m in dep.mounts(s))]
    assert reach == [dep.init]
    assert dep.services[dep.init].get("restart", "no") == "no", "the provisioning step must be one-shot"


SHARED_PKI = """
services:
  authority-init:
    command: ["sh", "-c", "palm ca init --dir /pki/ca && palm keygen --dir /pki/agent-a/state --name agent-a"]
    volumes: [pki:/pki]
  agent-a:
    volumes: [pki:/pki]
    entrypoint: ["palm", "agent", "--dir", "/pki/agent-a/state", "--control", "/pki/agent-a/control.sock",
                 "--ca", "/pki/ca/ca.pub", "--memory-dir", "/dev/shm/palm"]
  agent-b:
    volumes: [pki:/pki]
    entrypoint: ["palm", "agent", "--dir", "/pki/agent-b/state", "--control", "/pki/agent-b/control.sock",
                 "--ca", "/pki/ca/ca.pub", "--memory-dir", "/dev/shm/palm"]
volumes:
  pki: {}
"""


@pytest.mark.parametrize("variant", ["shared pki volume", "public volume writable", "ca.key beside ca.pub",
                                     "bind mount", "agents share a state volume"])
def test_the_checks_refuse_unsafe_layouts(variant):
    """The layout before issue 11 (one `pki` volume everywhere) and smaller mistakes are each caught."""
    if variant == "shared pki volume":
        text = SHARED_PKI
    else:
        doc = yaml.safe_load(COMPOSE.read_text())
        svc = doc["services"]
        init = next(n for n, s in svc.items() if "ca init" in script(s))
        agents = [n for n in svc if n != init]
        if variant == "public volume writable":
            svc[agents[0]]["volumes"] = [v.replace(":ro", "") for v in svc[agents[0]]["volumes"]]
        elif variant == "ca.key beside ca.pub":
            svc[init]["command"] = [script(svc[init]) + " && cp /authority/ca.key /public/ca.key"]
        elif variant == "bind mount":
            svc[agents[1]]["volumes"] = [*svc[agents[1]]["volumes"], "/srv/pki:/pki:ro"]
        else:
            svc[agents[1]]["volumes"] = svc[agents[0]]["volumes"]
        text = yaml.safe_dump(doc)
    assert problems(Deployment(text)), variant
