"""deploy/palm-agent.service under a real systemd (issue 25): systemd as PID 1 in a Podman container.

The image is made as the container drill makes its base, without a registry:
mmdebstrap writes a Debian root with systemd and python3 from the mirrors apt
uses, `podman import` takes it, and `podman build` (no network) adds a venv
with palm_net and its dependencies from wheels made on the host, the `palm`
entry point at /usr/local/bin/palm (the unit's ExecStart) and the shipped
deploy/ files.  Podman runs from a private store (scripts/container_cluster.py)
and the container has no network: the two agents talk over its loopback.

In the container, as the unit's header says: the unit and agent.toml
installed as shipped, `palm keygen`, an authority (`palm ca init`, `palm ca
issue`), `systemctl enable --now palm-agent`; a second agent beside it
(`systemd-run`, by hand: its own state directory, port and socket).  The
tests stop the unit in the middle of a migration each way and check the
one-copy rule after `systemctl start`, restart it, and rate the live unit
with `systemd-analyze security`.  Everything made is removed at the end and
the host is checked for traces, as the container drill does.

The `containers` tier (Podman as root): `pytest -m containers
tests/test_systemd_unit.py`, run by .ci/run.  It skips, saying why, where
Podman or mmdebstrap is missing or systemd cannot boot as PID 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from container_cluster import (  # noqa: E402
    TAG_PREFIX,
    HostState,
    Ours,
    debian_mirrors,
    host_lock,
    private_env,
    remove_store_and_restore,
    terminate,
)

pytestmark = pytest.mark.containers

PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates"
UNIT = "palm-agent.service"
A_SOCK = "/run/palm/control.sock"  # deploy/agent.toml's control
B_SOCK = "/run/palm-b/control.sock"
A_ADDR, B_ADDR = "127.0.0.1:7400", "127.0.0.1:7401"
CONTAINERFILE = """\
FROM {base}
COPY wheels /tmp/wheels
COPY palm-agent.service agent.toml /opt/palm/deploy/
RUN python3 -m venv /opt/palm/venv \\
    && /opt/palm/venv/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \\
        --find-links /tmp/wheels palm_net \\
    && ln -s /opt/palm/venv/bin/palm /usr/local/bin/palm \\
    && rm -rf /tmp/wheels
"""
# As the unit's header says (deploy/palm-agent.service), the authority in /root/ca of the same machine.
INSTALL = """\
set -e
install -m 0644 /opt/palm/deploy/palm-agent.service /etc/systemd/system/
install -d -m 0700 /etc/palm && install -m 0600 /opt/palm/deploy/agent.toml /etc/palm/
palm keygen --name "$(hostname -s)"
palm ca init --dir /root/ca
palm ca issue --ca /root/ca --agent /var/lib/palm
install -m 0644 /root/ca/ca.pub /etc/palm/ca.pub
systemctl daemon-reload && systemctl enable --now palm-agent
"""
# The second agent, by hand beside the unit: its own state directory, port, socket and runtime directory.
SECOND = f"""\
set -e
install -d -m 0700 /root/b
palm keygen --dir /root/b --name host-b
palm ca issue --ca /root/ca --agent /root/b
systemd-run --unit palm-b --collect /usr/local/bin/palm --log-format json agent --dir /root/b \
    --listen {B_ADDR} --control {B_SOCK} --run-dir /run/palm-b --ca /etc/palm/ca.pub
"""


class SystemdUnavailable(Exception):
    """systemd did not boot as PID 1 in the container (the test skips with this text)."""


def why_not() -> str | None:
    if sys.platform != "linux":
        return "containers need Linux"
    if os.geteuid() != 0:
        return "needs root (rootful Podman with systemd as the container's PID 1)"
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian: apt-get install {package})"
    if not debian_mirrors():
        return "no Debian mirror for this host's release in /etc/apt/sources.list* (the image is made from it)"
    return None


class SystemdContainer:
    """One container with systemd as PID 1, from a private Podman store, from nothing to nothing."""

    def __init__(self) -> None:
        self.lock = host_lock()  # one container run at a time on a host (the container drill's lock)
        self.tag = f"{TAG_PREFIX}systemd-{os.getpid()}"
        self.base, self.image, self.name = f"localhost/{self.tag}-base", f"localhost/{self.tag}", self.tag
        self.before = HostState.take(self.tag)
        self.ours = Ours(self.tag)
        self.store = Path(tempfile.mkdtemp(prefix=f"{self.tag}-", dir="/var/tmp"))
        (self.store / "tmp").mkdir()
        self.env = private_env(self.store)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.timings[what] = time.monotonic() - t0
        print(f"systemd: {what} in {self.timings[what]:.1f} s", flush=True)

    def run(self, cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in its own session; on Ctrl-C, a timeout or an error it is asked to stop (SIGTERM: mmdebstrap
        then unmounts and removes its chroot), as the container drill does."""
        with subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                terminate(proc)
                raise
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:6])} failed ({p.returncode}): {(p.stdout + p.stderr)[-1500:]}")
        return p

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["podman", *args], timeout=timeout, check=check)

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, "sh", "-c", script, timeout=timeout, check=check)

    def palm(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, "palm", *args, timeout=timeout, check=check)

    def palm_json(self, *args: str) -> Any:
        return json.loads(self.palm(*args, "--json").stdout)

    # -- the image

    def build(self) -> None:
        with self.timed("base image from Debian packages (mmdebstrap | podman import)"):
            mirrors = debian_mirrors()
            rootfs = self.store / "rootfs.tar"
            self.run(["mmdebstrap", "--variant=minbase", f"--include={PACKAGES}", mirrors[0].split()[2], str(rootfs),
                      *mirrors], timeout=900)
            self.podman("import", str(rootfs), self.base, timeout=300)
            rootfs.unlink()
        with self.timed("wheels of palm_net and its dependencies for the image's Python (pip wheel, download)"):
            ctx = self.store / "ctx"
            wheels = ctx / "wheels"
            wheels.mkdir(parents=True)
            src = self.store / "src"  # a copy: pip builds in the tree it is given (build/, *.egg-info)
            src.mkdir()
            for name in ("setup.cfg", "pyproject.toml", "README.md"):
                shutil.copy(ROOT / name, src / name)
            shutil.copytree(ROOT / "palm_net", src / "palm_net", ignore=shutil.ignore_patterns("__pycache__"))
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
            self.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(src)], timeout=300)
            probe = ("import platform, sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}', "
                     "platform.libc_ver()[1], platform.machine())")
            pyver, libc, machine = self.podman("run", "--rm", "--network", "none", self.base, "python3", "-c",
                                               probe).stdout.split()
            glibc_minor = int(libc.split(".")[1])
            platforms = [f"manylinux_2_{m}_{machine}" for m in range(glibc_minor, 16, -1)]
            platforms += [f"manylinux2014_{machine}", f"manylinux2010_{machine}", f"manylinux1_{machine}"]
            (palm_wheel,) = wheels.glob("palm_net-*.whl")
            self.run([*pip, "download", "--only-binary=:all:", "--python-version", pyver, "--implementation", "cp",
                      *(f"--platform={p}" for p in platforms), "-d", str(wheels), str(palm_wheel)], timeout=600)
            for f in ("palm-agent.service", "agent.toml"):
                shutil.copy(ROOT / "deploy" / f, ctx / f)
            (ctx / "Containerfile").write_text(CONTAINERFILE.format(base=self.base))
        with self.timed("image with palm_net and the deploy/ files (podman build, no network)"):
            self.podman("build", "--network", "none", "-t", self.image, "-f", str(ctx / "Containerfile"), str(ctx),
                        timeout=600)

    # -- the container

    def boot(self) -> str:
        """Starts the container with systemd as PID 1; returns `systemctl is-system-running`."""
        with self.timed("container booted with systemd as PID 1 (podman run --systemd=always /sbin/init)"):
            # CAP_SYS_ADMIN lets systemd build the unit's mount and UTS namespaces, as on a host; without it
            # systemd skips them ("assuming containerized execution", at debug level) and ProtectSystem=,
            # PrivateTmp=, ProtectHome=, ReadOnlyPaths= would run untested.
            p = self.podman("run", "-d", "--name", self.name, "--hostname", "host-a", "--systemd=always",
                            "--cap-add", "SYS_ADMIN", "--network", "none", "--shm-size", "2g", self.image,
                            "/sbin/init", check=False)
            self.record()
            if p.returncode != 0:
                raise SystemdUnavailable(f"podman run --systemd=always failed: {p.stderr.strip()[-600:]}")
            deadline = time.monotonic() + 120
            while True:  # until systemd listens on its private socket (`Failed to connect to bus` before)
                st = self.podman("exec", self.name, "systemctl", "is-system-running", "--wait", timeout=120,
                                 check=False)
                state = st.stdout.strip()
                if state in ("running", "degraded"):
                    break
                up = self.podman("inspect", "--format", "{{.State.Status}}", self.name, check=False).stdout.strip()
                if up != "running" or time.monotonic() > deadline or state:
                    logs = self.podman("logs", self.name, check=False)
                    raise SystemdUnavailable(
                        f"the container is {up or 'gone'}, systemd is {state or st.stderr.strip()[-300:]!r}: "
                        f"{(logs.stdout + logs.stderr)[-600:]}")
                time.sleep(0.3)
            if state == "degraded":
                print(self.sh("systemctl list-units --failed --no-pager", check=False).stdout, flush=True)
            comm = self.sh("cat /proc/1/comm").stdout.strip()
            if comm != "systemd":
                raise SystemdUnavailable(f"PID 1 in the container is {comm!r}, not systemd")
            return state

    def record(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.ours.ids.update(self.podman("ps", "-a", "-q", "--no-trunc", timeout=60).stdout.split())

    def close(self) -> list[str]:
        """Removes the container, the images and the private store; returns what is left on the host."""
        left: list[str] = []
        try:
            self.record()
            for args in (["rm", "--all", "--force", "--time", "1"], ["rmi", "--all", "--force"]):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.podman(*args, check=False, timeout=120)
            for what, args in (("container", ["ps", "-a", "--format", "{{.Names}}"]),
                               ("image", ["images", "-a", "--format", "{{.ID}}"])):
                try:
                    left += [f"{what} {n}" for n in self.podman(*args, check=False, timeout=60).stdout.split()]
                except subprocess.TimeoutExpired:
                    left.append(f"{what}s: podman did not answer")
            left += remove_store_and_restore(self.store, self.before, self.ours)
        finally:
            os.close(self.lock)
        return left


# --------------------------------------------------------------------------
# the agents in the container


def wait_answers(c: SystemdContainer, sock: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = c.palm("status", "--control", sock, "--json", check=False)
        if p.returncode == 0:
            return dict(json.loads(p.stdout))
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer on {sock} within {timeout:g} s: {p.stderr[-500:]}\n{journal(c)}")
        time.sleep(0.3)


def journal(c: SystemdContainer, unit: str = UNIT, lines: int = 30) -> str:
    return c.sh(f"journalctl -u {unit} --no-pager -n {lines}", check=False).stdout


def systemctl(c: SystemdContainer, *args: str, check: bool = True) -> str:
    return c.podman("exec", c.name, "systemctl", *args, check=check, timeout=90).stdout.strip()


def main_pid(c: SystemdContainer) -> int:
    return int(systemctl(c, "show", "-p", "MainPID", "--value", UNIT))


def copies(c: SystemdContainer, vm: str) -> list[tuple[str, str, str]]:
    """(agent, state, vm_id) of every copy of the VM on the two agents."""
    out = []
    for agent, sock in (("host-a", A_SOCK), ("host-b", B_SOCK)):
        out += [(agent, v["state"], v["vm_id"]) for v in c.palm_json("vm", "list", "--control", sock)
                if v["name"] == vm]
    return out


def stop_unit_mid_migration(c: SystemdContainer, vm: str, source_sock: str, to: str) -> dict[str, Any]:
    """Migrates vm (capped at 16 MiB/s: 256 MiB take about 16 s) and, once the source has sent 8 MiB of it,
    stops the unit (`systemctl stop`), whichever side it is; returns `palm migrate --json`'s answer."""
    cmd = ["podman", "exec", c.name, "palm", "migrate", vm, "--to", to, "--bandwidth", "16MiB/s",
           "--control", source_sock, "--json"]
    with subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as mig:
        try:
            deadline = time.monotonic() + 60
            while True:
                rows = [r for r in c.palm_json("migrations", "--control", source_sock)
                        if r["vm"] == vm and r["role"] == "source" and r["in_flight"]]
                if rows and (rows[0].get("stats") or {}).get("transferred", 0) > 8 << 20:
                    break
                assert mig.poll() is None, f"the migration ended before the stop: {mig.communicate()}"
                assert time.monotonic() < deadline, "the migration did not get under way"
                time.sleep(0.2)
            t0 = time.monotonic()
            systemctl(c, "stop", UNIT)
            print(f"systemd: `systemctl stop {UNIT}` {rows[0]['stats']['transferred'] >> 20} MiB into "
                  f"migration {rows[0]['migration_id'][:8]} took {time.monotonic() - t0:.1f} s", flush=True)
            out, err = mig.communicate(timeout=90)
        finally:
            if mig.poll() is None:
                mig.kill()
    assert systemctl(c, "is-active", UNIT, check=False) == "inactive", journal(c)
    assert mig.returncode != 0, out
    print(f"systemd: palm migrate said: {err.strip()[-300:]}", flush=True)
    return dict(json.loads(out)) if out.strip().startswith("{") else {"error": err.strip()}


def assert_one_running_copy(c: SystemdContainer, vm: str, vm_id: str) -> str:
    """The one-copy rule: exactly one copy of the VM on the two agents, running, with its identity; its
    protected pages verify.  Returns the agent that has it."""
    found = copies(c, vm)
    print(f"systemd: copies of {vm}: {found}", flush=True)
    assert len(found) == 1, found
    agent, state, got_id = found[0]
    assert state == "running" and got_id == vm_id, found
    sock = A_SOCK if agent == "host-a" else B_SOCK
    assert c.palm("vm", "verify", vm, "--control", sock).returncode == 0
    return agent


# --------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def box() -> Iterator[SystemdContainer]:
    why = why_not()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    c = SystemdContainer()
    skip = ""
    try:
        c.build()
        try:
            state = c.boot()
        except SystemdUnavailable as exc:
            skip = f"systemd cannot run as PID 1 in a Podman container here: {exc}"
        else:
            print(f"systemd: the system is {state}", flush=True)
            with c.timed("unit installed as shipped, keys and certificate, `systemctl enable --now palm-agent`"):
                c.sh(INSTALL)
                wait_answers(c, A_SOCK)
            with c.timed("the second agent started beside it (systemd-run)"):
                c.sh(SECOND)
                wait_answers(c, B_SOCK)
            yield c
    finally:
        left = c.close()
        print(f"systemd: the whole module took {time.monotonic() - t0:.1f} s; "
              + (f"LEFT BEHIND: {'; '.join(left)}" if left else "nothing left behind"), flush=True)
    if skip:
        pytest.skip(skip)
    assert left == [], left


def test_enable_now_runs_the_agent_confined_and_it_answers_on_its_control_socket(box):
    c = box
    assert systemctl(c, "is-enabled", UNIT) == "enabled"
    assert systemctl(c, "is-active", UNIT) == "active", journal(c)
    status = wait_answers(c, A_SOCK)
    assert status["agent"] == "host-a" and status["listen_port"] == 7400 and status["accepting"], status
    assert "agent host-a" in c.palm("status", "--control", A_SOCK).stdout
    # The unit's confinement is in force on the live process, not only written down.
    pid = main_pid(c)
    proc = dict(ln.split(":\t", 1) for ln in c.sh(f"cat /proc/{pid}/status").stdout.splitlines() if ":\t" in ln)
    caps = {5: "CAP_KILL", 6: "CAP_SETGID", 7: "CAP_SETUID", 18: "CAP_SYS_CHROOT"}
    assert int(proc["CapBnd"], 16) == sum(1 << bit for bit in caps), proc["CapBnd"]
    assert proc["NoNewPrivs"].strip() == "1" and proc["Seccomp"].strip() == "2", proc
    assert c.sh(f"stat -c '%a %U' /var/lib/palm /run/palm {A_SOCK}").stdout.split() == [
        "700", "root", "700", "root", "600", "root"]
    # Its own mount and UTS namespaces: / and /etc/palm read-only, its directories and /dev/shm writable,
    # no /home or /root, a /tmp of its own.
    ns = c.sh(f"readlink /proc/1/ns/mnt /proc/{pid}/ns/mnt /proc/1/ns/uts /proc/{pid}/ns/uts").stdout.split()
    assert ns[0] != ns[1] and ns[2] != ns[3], ns
    mounts = {}
    for line in c.sh(f"cat /proc/{pid}/mountinfo").stdout.splitlines():
        f = line.split()
        mounts[f[4]] = set(f[5].split(","))  # the last mount on a path wins, as the path resolves
    for path, mode in {"/": "ro", "/etc/palm": "ro", "/usr": "ro", "/var/lib/palm": "rw", "/run/palm": "rw",
                       "/dev/shm": "rw", "/home": "ro", "/root": "ro"}.items():
        if path != "/usr" or path in mounts:
            assert mode in mounts.get(path, set()), (path, mounts.get(path))
    inside = f"nsenter -t {pid} -m"
    probe = c.sh(f"touch /tmp/palm-probe && {inside} sh -c 'test -e /tmp/palm-probe; echo tmp $?; "
                 f"touch /etc/palm/x 2>&1; touch /usr/local/bin/x 2>&1; ls -A /root /home | wc -l'").stdout
    assert "tmp 1" in probe and probe.count("Read-only file system") == 2 and probe.split()[-1] == "3", probe
    exe = c.sh(f"cat /proc/{pid}/cmdline | tr '\\0' ' '").stdout
    assert "/usr/local/bin/palm --log-format json agent --config /etc/palm/agent.toml" in exe, exe
    log = journal(c, lines=200)
    assert '"event": "agent started"' in log and "Traceback" not in log, log
    assert "ignoring namespace setup" not in log and "prohibited" not in log, log  # every option applied


def test_stop_during_an_outgoing_migration_then_start_leaves_one_copy(box):
    """The unit's agent is the source: `systemctl stop` 8 MiB into the migration; after `systemctl start`
    it recovers the VM from its state and the VM has exactly one running copy."""
    c = box
    c.palm("vm", "create", "out1", "--memory", "256MiB", "--protected", "2", "--workload", "random:1000",
           "--control", A_SOCK)
    (vm,) = [v for v in c.palm_json("vm", "list", "--control", A_SOCK) if v["name"] == "out1"]
    answer = stop_unit_mid_migration(c, "out1", A_SOCK, B_ADDR)
    assert answer.get("ok") is not True, answer
    # Stopped: the destination keeps no copy of a migration that never committed.
    assert [v for v in c.palm_json("vm", "list", "--control", B_SOCK) if v["name"] == "out1"] == []
    t0 = time.monotonic()
    systemctl(c, "start", UNIT)
    wait_answers(c, A_SOCK)
    print(f"systemd: `systemctl start` until the agent answers: {time.monotonic() - t0:.1f} s", flush=True)
    assert assert_one_running_copy(c, "out1", vm["vm_id"]) == "host-a"
    rows = [r for r in c.palm_json("migrations", "--control", B_SOCK) if r["vm"] == "out1"]
    assert rows and all(r["state"] == "aborted" for r in rows), rows
    c.palm("vm", "destroy", "out1", "--control", A_SOCK)


def test_stop_during_an_incoming_migration_then_start_leaves_one_copy(box):
    """The unit's agent is the destination: `systemctl stop` mid-stream; the VM runs on at the source, and
    after `systemctl start` the unit's agent has no copy of it."""
    c = box
    c.palm("vm", "create", "in1", "--memory", "256MiB", "--protected", "2", "--workload", "random:1000",
           "--control", B_SOCK)
    (vm,) = [v for v in c.palm_json("vm", "list", "--control", B_SOCK) if v["name"] == "in1"]
    answer = stop_unit_mid_migration(c, "in1", B_SOCK, A_ADDR)
    assert answer.get("ok") is False and answer.get("runs_on") == "source", answer
    systemctl(c, "start", UNIT)
    wait_answers(c, A_SOCK)
    assert assert_one_running_copy(c, "in1", vm["vm_id"]) == "host-b"
    rows = [r for r in c.palm_json("migrations", "--control", A_SOCK) if r["vm"] == "in1"]
    assert rows and all(r["role"] == "destination" and r["state"] == "aborted" for r in rows), rows
    c.palm("vm", "destroy", "in1", "--control", B_SOCK)


def test_restart_brings_the_agent_back_with_its_vms_and_it_migrates(box):
    c = box
    c.palm("vm", "create", "keep", "--memory", "64MiB", "--protected", "1", "--control", A_SOCK)
    (vm,) = [v for v in c.palm_json("vm", "list", "--control", A_SOCK) if v["name"] == "keep"]
    before = main_pid(c)
    t0 = time.monotonic()
    systemctl(c, "restart", UNIT)
    wait_answers(c, A_SOCK)
    print(f"systemd: `systemctl restart` until the agent answers: {time.monotonic() - t0:.1f} s", flush=True)
    assert systemctl(c, "is-active", UNIT) == "active"
    after = main_pid(c)
    assert after not in (0, before), (before, after)
    assert assert_one_running_copy(c, "keep", vm["vm_id"]) == "host-a"
    # The restarted agent migrates, both ways.
    moved = json.loads(c.palm("migrate", "keep", "--to", B_ADDR, "--control", A_SOCK, "--json").stdout)
    assert moved["ok"] is True, moved
    assert assert_one_running_copy(c, "keep", vm["vm_id"]) == "host-b"
    back = json.loads(c.palm("migrate", "keep", "--to", A_ADDR, "--control", B_SOCK, "--json").stdout)
    assert back["ok"] is True, back
    assert assert_one_running_copy(c, "keep", vm["vm_id"]) == "host-a"
    c.palm("vm", "destroy", "keep", "--control", A_SOCK)
    log = journal(c, lines=400)
    assert "Traceback" not in log and not re.search(r"palm-agent\.service: (Main process exited|Failed)", log), log


def test_systemd_analyze_security_rates_the_live_unit(box):
    """The exposure score of the running unit (systemd reads its own loaded unit) and the offline one the
    default suite checks (tests/test_service_unit.py) are the same figure."""
    c = box
    live = c.sh(f"systemd-analyze security --no-pager {UNIT}", check=False)
    offline = c.sh(f"systemd-analyze security --no-pager --offline=true /etc/systemd/system/{UNIT}", check=False)
    scores = []
    for p in (live, offline):
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", p.stdout + p.stderr)
        assert m, p.stdout + p.stderr
        scores.append((float(m[1]), m[2]))
    print(live.stdout, flush=True)
    print(f"systemd: systemd-analyze security {UNIT}: {scores[0][0]} {scores[0][1]} (live), "
          f"{scores[1][0]} {scores[1][1]} (--offline=true)", flush=True)
    assert scores[0] == scores[1], scores
    assert scores[0][0] <= 3.5 and scores[0][1] == "OK", scores  # systemd's "OK" is up to 3.9
