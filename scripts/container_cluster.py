"""The agents of scripts/compose.yaml as Podman containers, for `scripts/drill --containers`.

Podman runs from a private store: CONTAINERS_CONF and CONTAINERS_STORAGE_CONF
point at a fresh directory (graphroot, runroot, tmp dir, CNI network configs,
file locks), so nothing of the host's own Podman is touched.  The base image
is made here from Debian packages (mmdebstrap, with the mirrors apt is
configured with) and the project's Dockerfile is built on it; compose starts
the authority-init step and then the agents on their own network; each agent
is healthy when `podman healthcheck run` says so (nothing else runs health
checks without systemd).  The drill reaches an agent's control socket through
its volume on the host and migrates between containers by service name.

Podman and the CNI plugins also write outside that store (the blob-info cache
in /var/lib/containers, CNI leases and dnsname files, network namespaces,
runc state, iptables chains, the bridge).  `HostState` records those before
the run; `close` removes every container, volume, network and image it made,
then whatever of those host traces the run added, and reports anything left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from palm_net.agent.client import ControlError  # noqa: E402
from palm_net.agent.launcher import AgentProcess  # noqa: E402

COMPOSE_FILE = ROOT / "scripts" / "compose.yaml"
AUTHORITY_INIT = "authority-init"  # the one-shot provisioning service; every other service is an agent
AGENT_HOME = "/var/lib/palm"  # the agent's own volume (Dockerfile)
CONTROL = "run/control.sock"  # the control socket, relative to AGENT_HOME
PORT = 7400
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_PACKAGES = "python3,python3-venv,ca-certificates"

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]

[network]
network_backend = "cni"
network_config_dir = "{dir}/cni"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{dir}/tmp"
lock_type = "file"
"""
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{dir}/storage"
runroot = "{dir}/run"
"""

TAG_PREFIX = "palm-ctr-"  # names every container, volume, network, image and directory of a run
BLOB_CACHE = "/var/lib/containers/cache/blob-info-cache-v1.boltdb"  # containers/image, for root
# Host paths that Podman, runc and the CNI plugins write to outside the store (the second list is walked;
# the host's own Podman store in /var/lib/containers/storage is not looked at).
HOST_DIRS = ("/var/lib/containers", "/run/containers")
HOST_TREES = ("/var/lib/containers/cache", "/run/containers/cni", "/var/lib/cni", "/run/cni", "/run/runc",
              "/run/netns")


class ContainerError(Exception):
    pass


KEPT_STATE = "kept.json"  # in the store of a run `scripts/containers up` left running


def find_kept() -> Path | None:
    """The state file of the cluster `scripts/containers up` left running on this host, if any."""
    return next(iter(sorted(Path("/var/tmp").glob(f"{TAG_PREFIX}*/{KEPT_STATE}"))), None)


# --------------------------------------------------------------------------
# prerequisites


def cni_plugin_dirs() -> list[Path]:
    return [Path(p) for p in ("/usr/lib/cni", "/usr/libexec/cni", "/usr/local/lib/cni", "/opt/cni/bin")]


def debian_mirrors() -> list[str]:
    """`deb URI SUITE main` for this host's release, its updates and security, from /etc/apt/sources.list*."""
    codename = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                codename = line.split("=", 1)[1].strip().strip('"')
    if not codename:
        return []
    wanted = {codename, f"{codename}-updates", f"{codename}-security", f"{codename}/updates"}
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
             *sorted((apt / "sources.list.d").glob("*.sources"))]
    entries: list[tuple[str, str]] = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        entries += parse_sources(text, deb822=f.suffix == ".sources")
    lines = []
    for uri, suite in entries:
        line = f"deb {uri} {suite} main"
        if suite in wanted and line not in lines:
            lines.append(line)
    return lines


def parse_sources(text: str, deb822: bool) -> list[tuple[str, str]]:
    """(URI, suite) of each enabled `deb` source with the main component, one-line or deb822 format."""
    return _deb822_entries(text) if deb822 else _one_line_entries(text)


def _one_line_entries(text: str) -> list[tuple[str, str]]:
    out = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) >= 3 and words[0] == "deb":
            if words[1].startswith("["):  # options: deb [signed-by=...] URI SUITE ...
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = ["deb", *words[1:]]
            if len(words) >= 4 and "main" in words[3:]:
                out.append((words[1], words[2]))
    return out


def _deb822_entries(text: str) -> list[tuple[str, str]]:
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0].isspace() and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if ("deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no"
                or "main" not in fields.get("components", "").split()):
            continue
        out += [(uri, suite) for uri in fields.get("uris", "").split() for suite in fields.get("suites", "").split()]
    return out


def missing() -> str | None:
    """Why the container harness cannot run here, or None."""
    if sys.platform != "linux":
        return "containers need Linux"
    if os.geteuid() != 0:
        return "needs root (rootful Podman: a private store, the CNI bridge and its iptables chains)"
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap"),
                          ("iptables-save", "iptables")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install {package})"
    if not any((d / "dnsname").exists() for d in cni_plugin_dirs()):
        return "CNI dnsname plugin not found (Debian: apt-get install golang-github-containernetworking-plugin-dnsname)"
    try:
        import podman_compose  # noqa: F401
    except ImportError:
        return f"podman-compose not installed for {sys.executable} (pip install podman-compose)"
    if not debian_mirrors():
        return "no Debian mirror for this host's release in /etc/apt/sources.list* (the base image is made from it)"
    with tempfile.TemporaryDirectory(prefix="palm-podman-probe-", dir="/var/tmp") as d:
        env = private_env(Path(d))
        p = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        if p.returncode != 0:
            lines = p.stderr.strip().splitlines() or ["no output"]
            return f"podman does not work here: {lines[-1]}"
    return None


def private_env(d: Path) -> dict[str, str]:
    """The environment that makes podman (and podman-compose's podman) use the store in d."""
    try:
        import resource

        nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20)
    except (ImportError, ValueError):
        nofile = 20000
    (d / "containers.conf").write_text(CONTAINERS_CONF.format(dir=d, nofile=nofile))
    (d / "storage.conf").write_text(STORAGE_CONF.format(dir=d))
    return {**os.environ, "CONTAINERS_CONF": str(d / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(d / "storage.conf"), "TMPDIR": str(d / "tmp")}


# --------------------------------------------------------------------------
# host traces


@dataclass
class Ours:
    """What marks a trace on the host as this run's: its tag (in every name it chose) and what Podman
    named for it: container ids (runc state, CNI results), network namespaces, bridges, addresses."""

    tag: str
    ids: set[str] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    bridges: set[str] = field(default_factory=set)
    ips: set[str] = field(default_factory=set)

    def path(self, p: str) -> bool:
        if self.tag in p or p in self.netns or p == BLOB_CACHE or any(i in p for i in self.ids):
            return True
        with contextlib.suppress(OSError):  # e.g. the state.json of a runc container of an interrupted build
            if os.path.isfile(p) and os.path.getsize(p) < 1 << 20:
                return self.tag.encode() in Path(p).read_bytes()
        return False

    def rule(self, line: str) -> bool:
        padded = f" {line} "
        return (self.tag in line or any(f" {b} " in padded for b in self.bridges)
                or any(f" {ip}/32 " in padded for ip in self.ips))

    def link(self, name: str) -> bool:
        with contextlib.suppress(OSError):
            if os.path.basename(os.readlink(f"/sys/class/net/{name}/master")) in self.bridges:
                return True
        return name in self.bridges


@dataclass(frozen=True)
class HostState:
    """What Podman, runc and CNI leave on the host outside the store: files, links, iptables, processes."""

    paths: frozenset[str]
    links: frozenset[str]
    rules: tuple[tuple[str, str], ...]  # (table, iptables-save line) for CNI chains and rules
    processes: frozenset[tuple[int, str]]  # (pid, command) of processes naming the tag

    @classmethod
    def load(cls, d: dict[str, Any]) -> HostState:
        return cls(frozenset(d["paths"]), frozenset(d["links"]), tuple((t, r) for t, r in d["rules"]),
                   frozenset((int(p), c) for p, c in d["processes"]))

    @classmethod
    def take(cls, tag: str) -> HostState:
        paths = {p for p in HOST_DIRS + HOST_TREES if os.path.lexists(p)}
        for top in HOST_TREES:
            for dirpath, dirs, files in os.walk(top):
                paths.update(os.path.join(dirpath, n) for n in dirs + files)
        paths = {p for p in paths if not p.startswith("/run/netns/") or os.path.basename(p).startswith("netns-")}
        links = {n for n in os.listdir("/sys/class/net") if n.startswith(("cni-", "veth"))}
        return cls(frozenset(paths), frozenset(links), tuple(iptables_cni()), frozenset(processes_naming(tag)))

    def added_since(self, before: HostState, ours: Ours | None = None) -> list[str]:
        """What is here and was not before: all of it, or only what is this run's (ours)."""
        def mine_path(p: str) -> bool:
            return ours is None or ours.path(p) or (os.path.isdir(p) and not os.listdir(p))

        new_rules = list((Counter(self.rules) - Counter(before.rules)).elements())
        out = [f"file {p}" for p in sorted(self.paths - before.paths) if mine_path(p)]
        out += [f"link {n}" for n in sorted(self.links - before.links) if ours is None or ours.link(n)]
        if ours is not None and not all(ours.rule(r) or scaffolding(t, r, new_rules) for t, r in new_rules):
            new_rules = [(t, r) for t, r in new_rules if ours.rule(r)]  # someone else uses CNI meanwhile
        out += [f"iptables -t {t} {r}" for (t, r) in sorted(new_rules)]
        out += [f"process {pid} {cmd[:80]}" for pid, cmd in sorted(self.processes - before.processes)]
        return out


def iptables_cni() -> list[tuple[str, str]]:
    """The CNI plugins' chains and rules (iptables-save lines), per table."""
    p = subprocess.run(["iptables-save"], capture_output=True, text=True, timeout=30, check=False)
    out, table = [], ""
    for line in p.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith((":CNI-", "-A")) and ("CNI-" in line or "cni-podman" in line):
            out.append((table, line.split(" [", 1)[0] if line.startswith(":") else line))
    return out


def scaffolding(table: str, line: str, new: list[tuple[str, str]]) -> bool:
    """A new chain, or a jump into one (FORWARD -> CNI-FORWARD -> CNI-ADMIN): what the CNI firewall plugin
    sets up on first use and never removes."""
    chains = {r[1:].split()[0] for t, r in new if t == table and r.startswith(":")}
    if line.startswith(":"):
        return True
    return " -j " in line and line.rsplit(" -j ", 1)[1].split()[0] in chains and "/32" not in line


def processes_naming(tag: str) -> set[tuple[int, str]]:
    out = set()
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if tag in cmd and int(pid) != me:
            out.add((int(pid), cmd))
    return out


def mounts_under(prefix: str) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix.rstrip("/") + "/"):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)


def remove_store_and_restore(store: Path, before: HostState, ours: Ours) -> list[str]:
    """The end of a run: its private store unmounted and removed, the host as it was;
    what could not be removed, in words."""
    for mnt in mounts_under(str(store)):
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    shutil.rmtree(store, ignore_errors=True)
    left = [f"store {store}"] if store.exists() else []
    restore_host(before, ours)
    return left + HostState.take(ours.tag).added_since(before, ours)


def restore_host(before: HostState, ours: Ours) -> None:
    """Undoes what this run added to the host, and only that: its processes, iptables rules (and the CNI
    chains it created, once nobody else's rules are in them), its bridge, its files and the empty
    directories it created."""
    now = HostState.take(ours.tag)
    for pid, _ in now.processes - before.processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    new = list((Counter(now.rules) - Counter(before.rules)).elements())
    rules = [(t, r) for t, r in new if r.startswith("-A")]
    for table, line in rules:  # rules first: they jump to the chains
        if ours.rule(line):
            subprocess.run(["iptables", "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True, check=False)
    rest = [(t, r) for t, r in rules if not ours.rule(r)]
    if all(scaffolding(t, r, new) for t, r in rest):
        for table, line in rest:
            subprocess.run(["iptables", "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True, check=False)
        chains = [(t, r[1:].split()[0]) for t, r in new if r.startswith(":")]
        for flag in ("-F", "-X"):
            for table, chain in chains:
                subprocess.run(["iptables", "-t", table, flag, chain], capture_output=True, check=False)
    for name in now.links - before.links:
        if name in ours.bridges:
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    mounted = set(mounts_under("/"))
    for path in sorted(now.paths - before.paths, key=len, reverse=True):  # deepest first
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                if not os.listdir(path):  # a directory it created; never one someone filled meanwhile
                    if path in mounted:  # /run/netns is bound on itself
                        subprocess.run(["umount", path], capture_output=True, check=False)
                    os.rmdir(path)
            elif ours.path(path):
                if path in mounted:  # a network namespace
                    subprocess.run(["umount", path], capture_output=True, check=False)
                os.unlink(path)


# --------------------------------------------------------------------------
# the cluster


class ContainerAgent(AgentProcess):
    """One agent container: requests go to its control socket through its volume on the host."""

    def __init__(self, cluster: ContainerCluster, service: str) -> None:
        super().__init__(cluster.root, service, host=service, port=PORT)
        self.cluster = cluster
        self.container = ""  # set once compose has created it

    def start(self, timeout: float = 90) -> ContainerAgent:
        self.cluster.podman("start", self.container)
        self.wait_healthy(timeout)
        self.cluster.record()
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            health = self.cluster.podman("healthcheck", "run", self.container, check=False)
            if health.returncode == 0:
                return
            state = self.cluster.podman("inspect", "--format", "{{.State.Status}}", self.container, check=False)
            if state.stdout.strip() not in ("running", "created", "configured", "initialized"):
                raise ContainerError(f"{self.container} is {state.stdout.strip() or 'gone'}: {self.log_tail(400)}")
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.container} not healthy within {timeout:g} s: {self.log_tail(400)}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        self.cluster.podman("kill", "--signal", signal.Signals(sig).name.removeprefix("SIG"), self.container,
                            check=False)
        rc = self.cluster.podman("wait", self.container, check=False, timeout=timeout + 10).stdout.strip()
        return int(rc) if rc.lstrip("-").isdigit() else None

    def log_tail(self, n: int = 2000) -> str:
        p = self.cluster.podman("logs", "--tail", "20", self.container, check=False)
        return (p.stdout + p.stderr)[-n:]


class ContainerCluster:
    """scripts/compose.yaml under Podman, from nothing to nothing."""

    kind = "containers on a Podman network"

    def __init__(self, n: int, root: Path, compose_file: Path = COMPOSE_FILE, kept: dict[str, Any] | None = None
                 ) -> None:
        """A new run; or, with kept (a kept cluster's state, see kept_state), the run `scripts/containers up`
        left running, to look at or to close."""
        import yaml

        self.root = root
        self.compose_file = compose_file
        services = yaml.safe_load(compose_file.read_text())["services"]
        names = sorted(s for s in services if s != AUTHORITY_INIT)
        if n != len(names):
            raise ContainerError(f"{compose_file.name} has {len(names)} agents ({', '.join(names)}), not {n}")
        self.lock = host_lock()
        if kept is None and (other := find_kept()) is not None:
            os.close(self.lock)
            raise ContainerError(f"the agents of `scripts/containers up` are running (store {other.parent}): "
                                 f"`scripts/containers down` first")
        self.tag = kept["tag"] if kept else f"{TAG_PREFIX}{os.getpid()}"
        self.base, self.image = f"localhost/{self.tag}-base", f"localhost/{self.tag}"
        if kept:
            self.store = Path(kept["store"])
        else:
            self.store = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/var/tmp"))
            (self.store / "tmp").mkdir()
        self.env = {**private_env(self.store), "PALM_IMAGE": self.image}
        self.log: TextIO = open(root / "containers.log", "a")
        self.before = HostState.load(kept["before"]) if kept else HostState.take(self.tag)
        self.ours = Ours(self.tag)
        self.agents = [ContainerAgent(self, s) for s in names]
        for ag in self.agents:
            if kept:
                ag.container, ag.control = kept["agents"][ag.name]
        self.timings: dict[str, float] = {}

    def kept_state(self) -> dict[str, Any]:
        """What a later process needs to find this run again (written to KEPT_STATE in the store)."""
        b = self.before
        return {"tag": self.tag, "store": str(self.store), "root": str(self.root),
                "before": {"paths": sorted(b.paths), "links": sorted(b.links), "rules": list(b.rules),
                           "processes": sorted(b.processes)},
                "agents": {ag.name: [ag.container, ag.control] for ag in self.agents}}

    def keep(self) -> Path:
        """Leaves the run's containers running for a later process (`scripts/containers down`)."""
        path = self.store / KEPT_STATE
        path.write_text(json.dumps(self.kept_state()))
        self.log.close()
        os.close(self.lock)
        return path

    # -- commands

    def run(self, cmd: Sequence[str], timeout: float = 120, check: bool = True, stdin: Any = None,
            capture: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs a command of the harness in its own session (a terminal's Ctrl-C reaches the drill alone);
        on Ctrl-C or an error it is asked to stop (SIGTERM), not killed."""
        print(f"$ {shlex.join(cmd)}", file=self.log, flush=True)
        with subprocess.Popen(list(cmd), env=self.env, stdin=stdin, text=True, start_new_session=True,
                              stdout=subprocess.PIPE if capture else self.log, stderr=subprocess.PIPE) as p:
            try:
                out, err = p.communicate(timeout=timeout)
            except BaseException:
                terminate(p)
                raise
        self.log.write((out or "") + err)
        self.log.flush()
        res = subprocess.CompletedProcess(list(cmd), p.returncode, out or "", err)
        if check and p.returncode != 0:
            lines = [ln for ln in err.strip().splitlines() if "level=error msg=\"unable to get systemd" not in ln]
            raise ContainerError(f"{shlex.join(cmd[:3])} failed ({p.returncode}): "
                                 f"{(lines or ['no output'])[-1][:300]}")
        return res

    def podman(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], timeout=timeout, check=check)

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "podman_compose", "-p", self.tag, "-f", str(self.compose_file),
                         *args], timeout=300, check=check)

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[what] = time.monotonic() - t0
        print(f"containers: {what} in {self.timings[what]:.1f} s", flush=True)

    # -- lifecycle

    def start(self) -> None:
        with self.timed("base image from Debian packages (mmdebstrap | podman import)"):
            self.make_base()
        with self.timed("image built from Dockerfile (podman build)"):
            build = ["podman", "build", "--format", "docker", "--network", "host", "--build-arg",
                     f"BASE={self.base}", "-t", self.image]
            if HOST_CA_BUNDLE.exists():  # pip in the build trusts what the host trusts (an intercepting proxy)
                build += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
            self.run([*build, str(ROOT)], timeout=1800, capture=False)
        with self.timed("authority-init provisioned the volumes (podman-compose up)"):
            # podman-compose -d does not wait for depends_on conditions: wait for the init step here.
            self.compose("up", "-d", "--no-build", AUTHORITY_INIT)
            init = self.containers()[AUTHORITY_INIT]
            rc = self.podman("wait", init, timeout=120).stdout.strip()
            if rc != "0":
                logs = self.podman("logs", init, check=False)
                raise ContainerError(f"{AUTHORITY_INIT} exited {rc}: {(logs.stdout + logs.stderr)[-400:]}")
        with self.timed(f"{len(self.agents)} agents started and healthy (podman healthcheck run)"):
            self.compose("up", "-d", "--no-build", "--no-deps", *(ag.name for ag in self.agents))
            names = self.containers()
            for ag in self.agents:
                ag.container = names[ag.name]
                ag.control = str(Path(self.own_volume(ag)) / CONTROL)
            for ag in self.agents:
                ag.wait_healthy(90)
        self.record()
        problems = self.isolation()
        if problems:
            raise ContainerError("volume isolation: " + "; ".join(problems))
        print(f"containers: each agent mounts its own volume and the public ca.pub (read-only) only; "
              f"network {self.tag}_palm", flush=True)
        print(f"containers: {self.qemu_refused()}", flush=True)

    def qemu_refused(self) -> str:
        """Issue 22.4 at run time: an agent that is not root in its container refuses to start
        a QEMU guest (QEMU would run with the agent's uid, the host's / and its keys)."""
        ag = self.agents[0]
        try:
            vm = ag.request("vm.create", timeout=60, name="qemu-probe", memory="64M", backend="qemu")
        except ControlError as exc:
            if "--qemu-unconfined" not in str(exc):
                raise ContainerError(f"{ag.name}: a QEMU guest refused for another reason: {exc}") from None
            return f"{ag.name} refuses a QEMU guest unconfined: {str(exc)[:80]}..."
        raise ContainerError(f"{ag.name} started a QEMU guest unconfined in its container: {vm}")

    def make_base(self) -> None:
        """A Debian base with python3 made by mmdebstrap and imported, like the slim official image."""
        codename = debian_mirrors()[0].split()[2]
        cmd = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", codename, "-", *debian_mirrors()]
        print(f"$ {shlex.join(cmd)} | podman import - {self.base}", file=self.log, flush=True)
        # Its own session: on a signal mmdebstrap sends SIGHUP to its whole process group.
        with subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=self.log,
                              start_new_session=True) as mm:
            try:
                self.run(["podman", "import", "-", self.base], stdin=mm.stdout, timeout=900)
                rc = mm.wait(60)
            except BaseException:
                if mm.stdout is not None:
                    mm.stdout.close()  # the reader is gone: mmdebstrap must not block writing to the pipe
                terminate(mm)  # on SIGTERM mmdebstrap finishes its current stage, unmounts and removes its chroot
                raise
        if rc != 0:
            raise ContainerError(f"mmdebstrap failed ({rc}); see {self.log.name}")

    def record(self) -> None:
        """Notes what Podman named on the host for this run (see Ours); a restart brings new names."""
        with contextlib.suppress(ContainerError, subprocess.TimeoutExpired, ValueError):
            ids = self.podman("ps", "-a", "-q", "--no-trunc", timeout=60).stdout.split()
            for c in json.loads(self.podman("inspect", "--format", "json", *ids).stdout) if ids else []:
                self.ours.ids.add(c["Id"])
                net = c.get("NetworkSettings") or {}
                if net.get("SandboxKey"):
                    self.ours.netns.add(net["SandboxKey"])
                self.ours.ips.update(n["IPAddress"] for n in (net.get("Networks") or {}).values() if n.get("IPAddress"))
            nets = [n for n in self.podman("network", "ls", "--format", "{{.Name}}", timeout=60).stdout.split()
                    if n != "podman"]
            for n in json.loads(self.podman("network", "inspect", *nets).stdout) if nets else []:
                if n.get("network_interface"):
                    self.ours.bridges.add(n["network_interface"])

    def containers(self) -> dict[str, str]:
        """Service name -> container name, by compose's labels."""
        ps = self.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={self.tag}", "--format", "json")
        return {c["Labels"]["com.docker.compose.service"]: c["Names"][0] for c in json.loads(ps.stdout or "[]")}

    def mounts(self, ag: ContainerAgent) -> list[dict[str, Any]]:
        info = json.loads(self.podman("inspect", "--format", "json", ag.container).stdout)
        return list(info[0]["Mounts"])

    def own_volume(self, ag: ContainerAgent) -> str:
        for m in self.mounts(ag):
            if m["Destination"] == AGENT_HOME:
                return str(m["Source"])
        raise ContainerError(f"{ag.container} has no volume at {AGENT_HOME}")

    def isolation(self) -> list[str]:
        """Issue 11 at run time: an agent reaches its own volume and the public key only."""
        problems, owners = [], Counter[str]()
        for ag in self.agents:
            for m in self.mounts(ag):
                src = Path(m["Source"])
                if m["Type"] != "volume":
                    problems.append(f"{ag.name}: {m['Type']} mount {m['Destination']}")
                    continue
                files = {p.name for p in src.rglob("*")}
                if "ca.key" in files:
                    problems.append(f"{ag.name}: ca.key reachable through {m['Destination']}")
                if m["RW"]:
                    owners[m["Name"]] += 1
                    if m["Destination"] != AGENT_HOME:
                        problems.append(f"{ag.name}: writable volume at {m['Destination']}")
                elif files != {"ca.pub"}:
                    problems.append(f"{ag.name}: read-only {m['Destination']} holds {sorted(files)}, not ca.pub alone")
        problems += [f"volume {v} writable by {k} agents" for v, k in owners.items() if k != 1]
        return problems

    def close(self) -> list[str]:
        """Removes everything the run made; returns what is left (nothing, unless something failed)."""
        old = [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
        try:
            return self._close()
        finally:
            for s, h in zip((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), old):
                signal.signal(s, h)
            self.log.close()
            os.close(self.lock)

    def _close(self) -> list[str]:
        t0 = time.monotonic()
        left = []
        self.record()
        with contextlib.suppress(ContainerError, subprocess.TimeoutExpired):
            self.compose("down", "-v", "-t", "1", check=False)
        # Everything in the private store is this run's: sweep what compose did not remove.
        for args in (["rm", "--all", "--force", "--volumes", "--time", "1"], ["volume", "rm", "--all", "--force"],
                     ["network", "prune", "--force"], ["rmi", "--all", "--force"]):
            with contextlib.suppress(ContainerError, subprocess.TimeoutExpired):
                self.podman(*args, check=False, timeout=120)
        for what, args in (("container", ["ps", "-a", "--format", "{{.Names}}"]),
                           ("image", ["images", "-a", "--format", "{{.ID}}"]),
                           ("volume", ["volume", "ls", "--format", "{{.Name}}"]),
                           ("network", ["network", "ls", "--format", "{{.Name}}"])):
            try:
                names = self.podman(*args, check=False, timeout=60).stdout.split()
            except subprocess.TimeoutExpired:
                names = ["(podman did not answer)"]
            left += [f"{what} {n}" for n in names if not (what == "network" and n == "podman")]
        # A build interrupted mid-step can leave its runc container behind (/run/runc): delete it by its bundle.
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
            runc = subprocess.run(["runc", "list", "--format", "json"], capture_output=True, text=True, timeout=30,
                                  check=False)
            for c in json.loads(runc.stdout or "null") or []:
                if self.tag in c.get("bundle", ""):
                    self.run(["runc", "delete", "--force", c["id"]], check=False, timeout=60)
        left += remove_store_and_restore(self.store, self.before, self.ours)
        print(f"containers: removed containers, volumes, network, images and the private store in "
              f"{time.monotonic() - t0:.1f} s; " + (f"LEFT BEHIND: {'; '.join(left)}" if left else
                                                      "nothing left behind"), flush=True)
        return left


def host_lock() -> int:
    """One container drill at a time on a host: runs would share CNI state, subnets and iptables chains.

    The lock is an flock on /var/tmp itself (where the stores live), so it leaves no file behind."""
    fd = os.open("/var/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("containers: waiting for another container drill on this host", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def terminate(p: subprocess.Popen[Any], grace: float = 60) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
