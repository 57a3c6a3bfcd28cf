"""The host side of the threat model: other local users are untrusted, operators make mistakes.

No local user may plant, redirect or read what an agent and its QEMUs use;
one agent per state directory; every QEMU confined (docs/SECURITY.md).
Tests that need root (another uid to attack with, QEMU's -runas) skip
elsewhere; CI runs as root.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import trio

from palm_net.agent.agent import Agent
from palm_net.agent.errors import AgentError
from palm_net.hostfs import UnsafePathError, ensure_dir, verify_dir, write_atomic
from palm_net.hypervisor.qemu import QemuError, QemuSpec, QemuVM, qemu_binary, split_args
from palm_net.migration.params import MigrationParams
from palm_net.testing import scratch
from palm_net.testing.cluster import LocalCluster

NOBODY = 65534
ROOT = Path(__file__).resolve().parent.parent  # the checkout
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: attacks come from another uid")
needs_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed "
                                "(Debian package qemu-system-x86; .ci/run installs it)")


# --------------------------------------------------------------------------
# hostfs: what a directory must be before the agent uses it


def test_a_directory_of_another_user_a_wide_mode_or_a_symlink_is_refused(shm):
    ok = ensure_dir(shm / "mine")
    assert verify_dir(ok) == ok and (os.stat(ok).st_mode & 0o777) == 0o700
    wide = shm / "wide"
    wide.mkdir(mode=0o755)
    os.chmod(wide, 0o755)
    with pytest.raises(UnsafePathError, match="mode 0755; it must be 0700"):
        ensure_dir(wide)
    link = shm / "link"
    link.symlink_to(ok)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        ensure_dir(link)
    open_parent = shm / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)  # writable by all, not sticky: anyone could swap what is below
    with pytest.raises(UnsafePathError, match="writable by other users"):
        ensure_dir(open_parent / "below")
    if os.geteuid() == 0:
        theirs = shm / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
            ensure_dir(theirs)
        with pytest.raises(UnsafePathError, match=f"belongs to uid {NOBODY}"):
            ensure_dir(theirs / "below")  # an ancestor another user owns


def test_atomic_writes_never_follow_or_reuse_a_planted_name(shm):
    d = ensure_dir(shm / "d")
    victim = shm / "victim"
    victim.write_text("untouched")
    for planted in ("vm.json.tmp", ".vm.json.tmp", "hv.key.tmp"):
        (d / planted).symlink_to(victim)
    write_atomic(d / "vm.json", b"{}")
    assert victim.read_text() == "untouched" and (d / "vm.json").read_bytes() == b"{}"
    assert oct(os.stat(d / "vm.json").st_mode & 0o777) == oct(0o600)
    (d / "vm.json").unlink()
    (d / "vm.json").symlink_to(victim)  # the final name: replaced, never written through
    write_atomic(d / "vm.json", b"[]")
    assert victim.read_text() == "untouched" and not (d / "vm.json").is_symlink()


# --------------------------------------------------------------------------
# The agent refuses what is not its own, and shares no directory


async def test_agent_refuses_unsafe_directories_with_one_line(nursery):
    c = LocalCluster(("a",))
    cfg = c.members["a"].config
    try:
        wide = c.root / "wide-mem"
        wide.mkdir()
        os.chmod(wide, 0o755)
        cfg.memory_dir = wide
        with pytest.raises(AgentError, match=r"memory directory .* has mode 0755"):
            Agent(cfg)
        cfg.memory_dir = c.root / "a-mem"
        real = ensure_dir(c.root / "real-run")
        (c.root / "link-run").symlink_to(real)
        cfg.run_dir = c.root / "link-run"
        with pytest.raises(AgentError, match=r"run directory .* is a symlink") as exc:
            Agent(cfg)
        assert "\n" not in str(exc.value)
        cfg.run_dir = c.root / "a-run"
        os.chmod(c.members["a"].dir, 0o750)
        with pytest.raises(AgentError, match=r"state directory .* mode 0750"):
            Agent(cfg)
        os.chmod(c.members["a"].dir, 0o700)
        agent = Agent(cfg)  # and the refusals held nothing: the directory is free again
        agent.close()
    finally:
        c.cleanup()


async def test_one_agent_per_state_directory_and_per_memory_directory(nursery):
    c = LocalCluster(("a", "b"))
    c.nursery = nursery
    try:
        await c.start("a")
        with pytest.raises(AgentError, match=r"state directory .* is in use by another agent \(pid \d+\)"):
            Agent(c.members["a"].config)  # another port and control socket, the same directory
        shared = c.members["b"].config
        shared.memory_dir = c.members["a"].config.memory_dir
        with pytest.raises(AgentError, match=r"memory directory .* is in use by another agent"):
            Agent(shared)
        await c.stop("a")
        await c.start("a")  # the lock dies with its holder
    finally:
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


async def test_default_memory_directory_is_unpredictable_and_recorded(nursery):
    c = LocalCluster(("a",))
    c.nursery = nursery
    cfg = c.members["a"].config
    cfg.memory_dir = None
    made: Path | None = None
    try:
        a = await c.start("a")
        made = a.memory_dir
        assert made.parent == Path("/dev/shm") and made.name.startswith(f"palm-{os.geteuid()}-")
        assert len(made.name) > len(f"palm-{os.geteuid()}-") + 8
        a.registry.create_model("keep", 1 << 20)
        await c.stop("a")
        a = await c.start("a")
        assert a.memory_dir == made and "keep" in a.vms  # a restart finds its VMs again
        a.registry.destroy("keep")
        await c.stop("a")
        assert not made.exists()  # a clean stop with no VM left removes it: nothing stays behind
        # While it was gone (a reboot empties /dev/shm), someone planted the recorded
        # name as a symlink to their directory: not adopted, and no reason to stay
        # down either: a fresh directory, recorded anew.
        decoy = scratch.mkdtemp()
        made.symlink_to(decoy)
        again = (await c.start("a")).memory_dir
        assert again != made and again.parent == Path("/dev/shm") and not again.is_symlink()
        assert list(decoy.iterdir()) == []
        await c.stop("a")
        made.unlink()
        shutil.rmtree(decoy)
        made = again
    finally:
        for name in list(c.members):
            await c.stop(name)
        if made is not None and made.exists():
            shutil.rmtree(made, ignore_errors=True)
        c.cleanup()


# --------------------------------------------------------------------------
# An unprivileged local user attacks whatever it can see


ATTACKER = r"""
import json, os, socket, sys
targets = json.loads(sys.argv[1])
won = []
def attempt(what, fn):
    try:
        fn()
        won.append(what)
    except OSError:
        pass
for d in targets["dirs"]:
    attempt(f"list {d}", lambda: os.listdir(d))
    attempt(f"create in {d}", lambda: open(os.path.join(d, "planted"), "x").close())
    attempt(f"mkdir in {d}", lambda: os.mkdir(os.path.join(d, "planted.d")))
    attempt(f"symlink in {d}", lambda: os.symlink("/etc/passwd", os.path.join(d, "vm.json.tmp")))
    attempt(f"rename {d}", lambda: os.rename(d, d + ".moved"))
for f in targets["files"]:
    attempt(f"read {f}", lambda: open(f, "rb").read(1))
    attempt(f"write {f}", lambda: open(f, "r+b").close())
for s in targets["sockets"]:
    def connect(s=s):
        c = socket.socket(socket.AF_UNIX)
        try:
            c.connect(s)
        finally:
            c.close()
    attempt(f"connect {s}", connect)
# Plant what a predictable name would have given before: the old defaults.
for name in targets["plant"]:
    attempt(f"plant {name}", lambda: os.makedirs(name, mode=0o777, exist_ok=True))
print(json.dumps(won))
"""


def runs_as(uid: int, python: str) -> bool:
    """Whether `uid` can start `python` and import what the attacker imports."""
    try:
        p = subprocess.run([python, "-I", "-c", "import json, os, socket, sys"], capture_output=True,
                           user=uid, group=uid, extra_groups=[], timeout=30, cwd="/")
    except OSError:
        return False
    return p.returncode == 0


@functools.cache
def attacker_python(uid: int = NOBODY) -> str | None:
    """A python3 that `uid` can run, outside the checkout (the attacker needs only the
    standard library). Never sys.executable: the venv's python lives in the checkout,
    which that user cannot enter when it is cloned into a 0700 directory (issue 28)."""
    dirs = ("/usr/bin", "/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep))
    found = (shutil.which("python3", path=d) for d in dirs if d)
    for python in dict.fromkeys(f for f in found if f):
        real = Path(python).resolve()
        if not real.is_relative_to(ROOT) and not real.is_relative_to(Path(sys.prefix).resolve()) \
                and runs_as(uid, python):
            return python
    return None


def attack_as(uid: int, targets: dict[str, list[str]]) -> list[str]:
    python = attacker_python(uid)
    if python is None:
        pytest.skip(f"no python3 outside the checkout that uid {uid} can run (the attacker needs one)")
    p = subprocess.run([python, "-I", "-c", ATTACKER, json.dumps(targets)], capture_output=True, text=True,
                       user=uid, group=uid, extra_groups=[], timeout=60, cwd="/")
    assert p.returncode == 0, p.stderr
    return list(json.loads(p.stdout))


@root_only
def test_the_attacker_runs_wherever_the_checkout_lives():
    """CI's checkout is world-traversable; a root user's clone in a 0700 home is not. The
    attacker's interpreter must not be in either, and uid 65534 must be able to run it:
    on a host with a system python3 (CI's) this fails rather than letting the attack skip."""
    python = attacker_python()
    if python is None:
        assert not any(runs_as(NOBODY, p) for p in ("/usr/bin/python3", "/usr/local/bin/python3")), \
            "uid 65534 can run a system python3, but attacker_python() did not find it"
        pytest.skip(f"no python3 outside the checkout that uid {NOBODY} can run")
    real = Path(python).resolve()
    assert not real.is_relative_to(ROOT) and not real.is_relative_to(Path(sys.prefix).resolve()), real
    for d in real.parents:  # every directory on the way: traversable by all, not only by its owner
        assert os.stat(d).st_mode & 0o001, f"{d} is not traversable by other users"
    assert os.stat(real).st_mode & 0o001, f"{real} is not executable by other users"
    assert attack_as(NOBODY, {"dirs": [], "files": [], "sockets": [], "plant": []}) == []


def observable(agent: Agent) -> dict[str, list[str]]:
    """Every directory, file and socket the agent and its QEMUs use, as a local user could learn them
    (from /proc/PID/cmdline, the /dev/shm listing, or guessing)."""
    roots = [agent.cfg.state_dir, agent.memory_dir, agent.run_dir, agent.control_path.parent]
    dirs, files, sockets = [], [], [str(agent.control_path)]
    for r in roots:
        dirs.append(str(r))
        for p in r.rglob("*"):
            if p.is_symlink():
                continue
            if p.is_dir():
                dirs.append(str(p))
            elif p.is_socket():
                sockets.append(str(p))
            else:
                files.append(str(p))
    return {"dirs": dirs, "files": files, "sockets": sockets, "plant": []}


@root_only
@needs_qemu
async def test_an_unprivileged_user_can_neither_plant_redirect_nor_read(nursery, tmp_path):
    c = LocalCluster(("a", "b"))
    c.nursery = nursery
    c.members["a"].config.memory_dir = None  # the default: a fresh directory in /dev/shm
    # Before the agents run: what the old defaults named, pre-created by the user.
    state_tag = uuid.uuid4().hex[:12]
    planted = [f"/tmp/palm-q-{state_tag}", f"/dev/shm/palm-{state_tag}"]
    assert attack_as(NOBODY, {"dirs": [], "files": [], "sockets": [], "plant": planted}) == \
        [f"plant {p}" for p in planted]
    made = None
    try:
        a, b = await c.start("a"), await c.start("b")
        made = a.memory_dir
        content = a.registry.images_dir / "content.bin"
        content.write_bytes(os.urandom(1 << 20))
        q = a.registry.create_qemu("q" + uuid.uuid4().hex[:8], 64 << 20,
                             ["-device", f"loader,file={content},addr=0x1000000,force-raw=on"])
        a.registry.create_model("m1", 4 << 20, protected=1)
        # While they run, with a migration in flight: everything visible is attacked.
        won: list[str] = []

        async def attack_midway() -> None:
            await trio.sleep(0.05)
            for agent in (a, b):
                won.extend(await trio.to_thread.run_sync(attack_as, NOBODY, observable(agent)))

        async with trio.open_nursery() as n:
            n.start_soon(attack_midway)
            res = await a.outgoing.migrate(q.name, c.addr("b"), MigrationParams(bandwidth=64 << 20))
        assert res.ok, res.error
        won.extend(attack_as(NOBODY, observable(a)) + attack_as(NOBODY, observable(b)))
        assert won == [], won
        # And nothing the agents use belongs to that user.
        for agent in (a, b):
            for r in (agent.cfg.state_dir, agent.memory_dir, agent.run_dir):
                for p in (r, *r.rglob("*")):
                    assert p.lstat().st_uid == 0, p
        assert str(made) not in planted and not any(str(a.run_dir).startswith(p) for p in planted)
    finally:
        for name in list(c.members):
            await c.stop(name)
        for p in planted:
            shutil.rmtree(p, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        c.cleanup()


# --------------------------------------------------------------------------
# QEMU: confined, and told nothing from the wire that names a host file


def test_device_properties_that_name_host_files_are_refused():
    for bad in ("virtio-rng-pci,romfile=hv.key", "edu,romfile=/var/lib/palm/identity.key",
                "virtio-rng-pci,rng=rng0", "i6300esb,romfile=x", "pvpanic,chardev=c0"):
        with pytest.raises(QemuError, match="allowed"):
            split_args(["-device", bad])
        with pytest.raises(QemuError, match="allowed"):
            QemuSpec.decode(QemuSpec(64, 1, "pc", "tcg", ("-device", bad)).encode())
    with pytest.raises(QemuError, match="allowed"):
        split_args(["-rtc", "base=utc,file=/etc/shadow"])
    assert split_args(["-device", "virtio-rng-pci,max-bytes=1024,period=1000,id=rng", "-rtc", "base=utc"])[0]


@needs_qemu
async def test_a_peer_cannot_make_the_destination_qemu_open_a_host_file(cluster, capsys):
    """The shown attack: -device virtio-rng-pci,romfile=hv.key in BEGIN's spec."""
    from palm_net.testing.hostile import HostilePeer

    b = cluster["b"]
    spec = QemuSpec(64, 1, "pc", "tcg", ("-device", "virtio-rng-pci,romfile=hv.key")).encode()
    evil = HostilePeer(cluster.authority, cluster.measurement)
    ch, _, reply = await evil.try_begin(cluster.members["b"].port, name="evil", pages=16384, backend="qemu",
                                        spec=spec)
    await ch.aclose()
    assert reply.type == "ABORT" and reply.body.code == "backend"
    assert "evil" not in b.vms and not (b.memory_dir / "evil").exists()
    logged = capsys.readouterr()
    assert "romfile" in logged.out + logged.err  # the detail is in our log, not on the wire


def qemu_process(pid: int) -> dict[str, str]:
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    return {"uid": status["Uid"].split()[0], "gid": status["Gid"].split()[0], "seccomp": status["Seccomp"].strip(),
            "root": os.readlink(f"/proc/{pid}/root"), "cwd": os.readlink(f"/proc/{pid}/cwd"),
            "environ": Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")}


@root_only
@needs_qemu
async def test_every_qemu_is_confined(cluster):
    """Source and destination QEMUs: their own uid, seccomp, an empty root, nothing of the agent's."""
    a = cluster["a"]
    vm = a.registry.create_qemu("q" + uuid.uuid4().hex[:8], 64 << 20, ["-cpu", "qemu64"])
    res = await a.outgoing.migrate(vm.name, cluster.addr("b"), MigrationParams())
    assert res.ok, res.error
    moved = cluster["b"].vms[vm.name]
    other = cluster["b"].registry.create_qemu("q" + uuid.uuid4().hex[:8], 64 << 20, [])
    uids = set()
    for q in (moved, other):
        assert isinstance(q, QemuVM) and q.pid is not None
        with trio.fail_after(10):
            while qemu_process(q.pid)["uid"] == "0":  # QEMU drops root just before the guest starts
                await trio.sleep(0.02)
        p = qemu_process(q.pid)
        assert p["uid"] not in ("0", str(os.geteuid())) and p["gid"] == p["uid"]
        assert p["seccomp"] == "2"  # a filter is installed
        assert p["root"] == p["cwd"] == str(q.run_dir / "root")  # chrooted there, and in it
        assert os.listdir(q.run_dir / "root") == []
        assert "PALM" not in p["environ"] and "HOME" not in p["environ"]
        uids.add(p["uid"])
    assert len(uids) == 2  # one uid per VM: one QEMU cannot signal or trace another
    cmd = Path(f"/proc/{moved.pid}/cmdline").read_bytes().split(b"\0")
    sandbox = cmd[cmd.index(b"-sandbox") + 1].decode()
    for deny in ("obsolete=deny", "spawn=deny", "resourcecontrol=deny"):
        assert deny in sandbox
    assert b"-incoming" in cmd and not any(b"unix:" in w and b"incoming" in w for w in cmd)
    # Every local user reads a command line: it names neither the VM nor where its memory is.
    for q in (moved, other):
        words = Path(f"/proc/{q.pid}/cmdline").read_bytes()
        assert q.name.encode() not in words and str(q.dir).encode() not in words
        assert str(cluster["b"].memory_dir).encode() not in words


def test_qemu_loader_files_come_only_from_the_images_directory(shm):
    """QEMU opens a loader file as root before it drops privileges: any host file
    (the agent's own hv.key was tried) would land in guest RAM and the stream.  The
    agent opens only regular files of its images directory and QEMU gets the descriptor."""
    from palm_net.hostfs import ensure_dir
    from palm_net.hypervisor.qemu import QemuError, open_loader_files

    images = ensure_dir(shm / "images", "images directory")
    (images / "ok.bin").write_bytes(b"x" * 4096)
    secret = shm / "hv.key"
    secret.write_bytes(os.urandom(32))
    os.chmod(secret, 0o600)
    (images / "link.bin").symlink_to(secret)
    os.mkdir(images / "sub", 0o700)
    args = ["loader,file={},addr=0x1000000,force-raw=on"]

    def loader(path: str, where: Path | None = images) -> tuple[list[str], list[int]]:
        return open_loader_files([args[0].format(path)], where)

    for bad, why in ((str(secret), "not in the images directory"), ("link.bin", "Too many levels"),
                     (str(images / "link.bin"), "Too many levels"), ("sub", "not a regular file"),
                     (str(images / ".." / "hv.key"), "not in the images directory"),
                     (str(images / "sub" / ".." / ".." / "hv.key"), "not in the images directory"),
                     ("..", "not in the images directory"), ("missing.bin", "No such file")):
        with pytest.raises(QemuError, match=why):
            loader(bad)
    with pytest.raises(QemuError, match="needs the agent's --images-dir"):
        loader(str(images / "ok.bin"), None)
    for named in ("ok.bin", str(images / "ok.bin")):
        out, fds = loader(named)
        try:
            assert out == [f"loader,file=/proc/self/fd/{fds[0]},addr=0x1000000,force-raw=on"]
            assert os.fstat(fds[0]).st_ino == os.stat(images / "ok.bin").st_ino
        finally:
            for fd in fds:
                os.close(fd)
    assert open_loader_files(["loader,data=0x1,data-len=1,addr=0x1000"], None) == (
        ["loader,data=0x1,data-len=1,addr=0x1000"], [])  # no file: nothing to open


def _as_nobody(fn) -> str:
    """Runs ``fn`` in a forked child as uid/gid 65534 (modules already imported: no need
    to reach the checkout) and returns what it returned, or the exception as a line."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = str(fn())
        except BaseException as exc:  # reported to the parent
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode()[:60000])
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return data.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_an_unprivileged_user_gets_one_line_not_a_traceback(shm):
    """Control commands against a root agent's socket, and palm's own files of root's:
    one line naming the problem and exit 1 (issue 25: PermissionError tracebacks)."""
    import contextlib
    import io

    from palm_net.agent.client import control_request
    from palm_net.cli import main

    private = shm / "run"
    private.mkdir(mode=0o700)
    sock = str(private / "control.sock")
    out = _as_nobody(lambda: control_request(sock, "status", {}))
    assert out == f"ControlError: cannot reach the agent at {sock}: permission denied (it runs as root: use sudo)"

    def cli(*argv: str) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(list(argv))
        return f"{rc} {err.getvalue()}"

    # The same commands once as root first: what they import lazily is loaded before the
    # fork (uid 65534 may not reach this interpreter's library).
    cli("status", "--control", str(shm / "none.sock"))
    cli("keygen", "--dir", str(shm / "agent"), "--name", "x")
    out = _as_nobody(lambda: cli("status", "--control", sock))
    assert out.startswith("1 palm: ") and "permission denied" in out and "Traceback" not in out
    assert out.count("\n") == 1
    out = _as_nobody(lambda: cli("keygen", "--dir", str(private / "agent"), "--name", "x"))
    assert out.startswith("1 palm: permission denied") and "Traceback" not in out, out


def test_qemu_never_starts_unconfined_unless_the_operator_said_so(shm):
    """An agent that is not root (the container image's uid 10001) cannot give QEMU its
    own uid and an empty root: QEMU guests are refused, made or arriving, with one line
    (issue 22.4); --qemu-unconfined accepts the risk explicitly."""
    from palm_net.hypervisor.qemu import Confinement, QemuError, QemuSpec, QemuVM

    jail = Confinement(None)
    assert "--qemu-unconfined" in (jail.refusal or "")
    run = shm / "run"
    run.mkdir(mode=0o700)
    with pytest.raises(QemuError, match="QEMU guests are refused: this agent does not run as root"):
        QemuVM.create(shm / "q1", run, "q1", 64, confine=jail)
    with pytest.raises(QemuError, match="QEMU guests are refused"):
        QemuVM.create_incoming(shm / "q2", run, "q2", b"i" * 16, QemuSpec(64, 1, "pc", "tcg"), confine=jail)
    assert not (shm / "q1").exists() and not (shm / "q2").exists() and not list(run.iterdir())
    assert Confinement(None, allow_unconfined=True).refusal is None
    assert Confinement((2000000, 100)).refusal is None


# Red-team review of the security fixes, F6 (low): a symlink of another user on the way to a
# directory passed the checks (they looked at the resolved path), and could be retargeted later.


@root_only
def test_a_symlink_of_another_user_on_the_way_is_refused():
    tag = os.urandom(4).hex()
    good = scratch.mkdtemp("palm-good-")
    link = Path("/tmp") / f"palm-evil-{tag}"
    try:
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "ln", "-s", str(good), str(link)], check=True)
        with pytest.raises(UnsafePathError, match="symlink of uid 65534"):
            ensure_dir(link / "mem")
        assert not (good / "mem").exists()
        own = Path("/tmp") / f"palm-own-{tag}"
        own.symlink_to(good)  # the agent's own (or root's) symlink is fine, and resolved once
        try:
            assert ensure_dir(own / "mem") == good.resolve() / "mem"
        finally:
            own.unlink()
    finally:
        subprocess.run(["rm", "-rf", str(good), str(link)], check=False)


# --------------------------------------------------------------------------
# The memory directory after a reboot (found by the review of issue 21's change)


async def test_a_memory_dir_planted_after_a_reboot_does_not_keep_the_agent_from_starting(nursery):
    """Any local user reads the memory directory's "unpredictable" name from a QEMU
    guest's command line (/proc/PID/cmdline: mem-path=/dev/shm/palm-0-XXXX/NAME/ram).
    After a reboot (tmpfs emptied) they create that directory.  Agent._memory_dir sees it
    is not the agent's and makes a new one (as designed), but vmindex.check_start then
    finds the index's VMs recorded in a directory that exists and refuses to start
    ("not in the memory directory now in force ... --adopt-vms"): the boot check that
    lets a rebooted host start applies only when the old directory is missing
    (vmindex.py check_start).  Neither suggested flag helps: --memory-dir OLD is
    refused (not ours), --adopt-vms moves the planter's directories into ours."""
    import os
    import shutil
    from pathlib import Path

    from palm_net.agent import vmindex
    from palm_net.agent.agent import Agent

    c = LocalCluster(("a",))
    c.nursery = nursery
    cfg = c.members["a"].config
    cfg.memory_dir = None  # the default: a directory made in /dev/shm
    made: list[Path] = []
    before = set(Path("/dev/shm").glob("palm-0-*"))
    try:
        a = await c.start("a")
        a.registry.create_model("vm1", 16 * 4096, fill="random")
        old = a.memory_dir
        await c.stop("a")
        # the reboot: tmpfs emptied, a new boot id
        shutil.rmtree(old)
        idx = vmindex.read_index(cfg.state_dir)
        assert idx is not None and "vm1" in idx.vms
        import json
        raw = json.loads((cfg.state_dir / vmindex.INDEX_FILE).read_text())
        raw["boot"] = "an-earlier-boot"
        (cfg.state_dir / vmindex.INDEX_FILE).write_text(json.dumps(raw))
        # the local user (nobody) plants the name they read from /proc/PID/cmdline
        old.mkdir()
        os.chown(old, 65534, 65534)
        made.append(old)
        try:
            agent = Agent(cfg)
        except Exception as exc:
            raise AssertionError(f"the agent refuses to start after a reboot because a local user planted "
                                 f"{old}: {exc}") from None
        made.append(agent.memory_dir)
        agent.close()
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)
        for p in set(Path("/dev/shm").glob("palm-0-*")) - before:
            shutil.rmtree(p, ignore_errors=True)
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()



# --------------------------------------------------------------------------
# QEMU loader files (issue 22.5): "QEMU loads no host file by path"


async def test_a_second_file_property_is_refused(nursery):
    """split_args checks a loader's properties by name only (LOADER_PROPS), with no
    value check and no duplicate check; open_loader_files replaces only the FIRST
    `file=` with /proc/self/fd/N.  QEMU's option parser lets the LAST duplicate win,
    and QEMU opens the loader file as root before it drops privileges (the very reason
    for the images directory).  So `-device loader,file=IMG,addr=A,file=/any/host/file`
    loads any host file (/etc/shadow, the agent's hv.key, ...) into the guest's RAM,
    from where the guest reads it and a migration carries it anywhere
    (qemu.py split_args, open_loader_files)."""
    import os

    from palm_net.hypervisor.qemu import qemu_binary

    if qemu_binary() is None:
        pytest.skip("no QEMU")
    async with LocalCluster.started(nursery, names=("a",)) as c:
        a = c["a"]
        images = a.registry.images_dir
        assert images is not None
        (images / "img.bin").write_bytes(b"\0" * 4096)
        secret = os.urandom(64)
        host_file = c.root / "host-secret.key"  # outside the images directory, root's 0600
        host_file.write_bytes(secret)
        host_file.chmod(0o600)
        with pytest.raises(Exception, match="images directory"):  # the guard, as documented
            a.registry.create_qemu("q-direct", 64 << 20, ["-device", f"loader,file={host_file},addr=0x1000000"])
        from palm_net.agent.errors import AgentError

        with pytest.raises(AgentError, match="property 'file' given twice"):  # (QEMU would take the last)
            a.registry.create_qemu(
                "q-dup", 64 << 20,
                ["-device", f"loader,file=img.bin,addr=0x1000000,force-raw=on,file={host_file}", "-cpu", "qemu64"])


# --------------------------------------------------------------------------
# The index of VMs (issue 21.4)


async def test_a_vanished_memory_dir_is_refused_every_time(nursery):
    """--memory-dir DIR whose directory vanished: the first start refuses, naming the VMs
    (as tested in tests/test_vmindex.py).  But Agent._memory_dir calls ensure_dir (which
    makes DIR anew) BEFORE check_start, and a refused start leaves it made; the next
    start (systemd's Restart=on-failure, or the operator trying again) finds DIR
    existing and equal to the index's (`idx.memory_dir == memory_dir and not fresh`),
    starts with no VMs and rewrites the index without them: the record of the VMs is
    lost, and the refusal bought nothing (agent.py _memory_dir; vmindex.py check_start)."""
    import shutil

    from palm_net.agent.agent import Agent
    from palm_net.agent.errors import AgentError

    c = LocalCluster(("a",))
    c.nursery = nursery
    try:
        a = await c.start("a")
        a.registry.create_model("vm1", 16 * 4096, fill="random")
        old = a.memory_dir
        await c.stop("a")
        shutil.rmtree(old)  # the memory directory vanished (unmounted, deleted)
        cfg = c.members["a"].config
        with pytest.raises(AgentError, match="missing"):
            Agent(cfg)
        try:
            again = Agent(cfg)  # the same start, a second time
        except AgentError:
            return  # refused again: as intended
        names = list(again.registry.vms)
        again.close()
        raise AssertionError(f"the second start of the same agent was accepted without the VMs (vms={names})")
    finally:
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


# --------------------------------------------------------------------------
# QEMU's multifd streams meet the source agent at a socket in QEMU's root


class _Connects:
    """Stands in for QMP: ``migrate`` connects the given streams (first bytes each) to the
    agent's socket from this process, as QEMU would from its own."""

    def __init__(self, run_dir: Path, firsts: list[bytes]) -> None:
        self.run_dir, self.firsts, self.conns = run_dir, firsts, []

    def execute(self, command: str, **args: object) -> object:
        import socket

        if command == "query-migrate":  # (asked while the source waits for a stream)
            return {"status": "active"}
        assert command == "migrate" and args["uri"] == "unix:m/out"
        for first in self.firsts:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(self.run_dir / "root" / "m" / "out"))
            c.sendall(first)
            self.conns.append(c)


def _root_is_closed_again(vm: QemuVM) -> None:
    """Once the streams are connected QEMU's root is empty and closed to its uid again."""
    root = vm.run_dir / "root"
    assert list(root.iterdir()) == [] and stat.S_IMODE(root.stat().st_mode) == 0o500
    assert (root.stat().st_uid, root.stat().st_gid) == (os.geteuid(), os.getegid())


def _source_vm(tmp_path: Path, pid: int) -> QemuVM:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    (run_dir / "root").mkdir(mode=0o500)
    vm = object.__new__(QemuVM)  # (its migration's part only: no QEMU is started)
    vm.run_dir, vm.config, vm._reserver = run_dir, {"uid": None, "pid": pid}, None
    return vm


MAIN, MULTIFD = b"QEVM\x00\x00\x00\x03", bytes.fromhex("1122334400000001")


def test_the_source_takes_qemus_streams_main_first_whatever_their_order(tmp_path):
    import socket

    from palm_net.hypervisor.qemu import read_stream

    vm = _source_vm(tmp_path, os.getpid())
    q = _Connects(vm.run_dir, [MULTIFD + b"a", MAIN, MULTIFD + b"b"])
    conns = vm._accept_streams(q, 3)
    try:
        for c in q.conns:
            c.shutdown(socket.SHUT_WR)
        got = []
        for c in conns:  # each whole, its first bytes too (read to tell it apart)
            out = memoryview(bytearray(64))
            n, _ = read_stream(c, out)
            got.append(bytes(out[:n]))
        assert got == [MAIN, MULTIFD + b"a", MULTIFD + b"b"]
        _root_is_closed_again(vm)
    finally:
        for c in conns + q.conns:
            c.close()


@pytest.mark.parametrize(("pid", "firsts", "says"), [
    (1, [MAIN, MULTIFD], "leads to process .*, not its QEMU"),  # another process got there (SO_PEERCRED)
    (None, [MAIN, b"HTTP/1.1"], "neither its main one nor multifd"),
    (None, [MULTIFD, MULTIFD], "no main migration stream"),
    # a second main stream is not taken for a multifd one (its bytes would reach the
    # destination QEMU's multifd stream of that channel)
    (None, [MAIN, MAIN, MULTIFD], "neither its main one nor multifd"),
], ids=["another process", "another protocol", "no main stream", "two main streams"])
def test_the_source_refuses_a_stream_not_from_its_qemu_or_not_qemus(tmp_path, pid, firsts, says):
    vm = _source_vm(tmp_path, os.getpid() if pid is None else pid)
    q = _Connects(vm.run_dir, firsts)
    try:
        with pytest.raises(QemuError, match=says) as refused:
            vm._accept_streams(q, len(firsts))
        _root_is_closed_again(vm)
        # Each connection QEMU made is closed at once, not left to the garbage collector
        # (the error's traceback keeps the agent's ends alive): QEMU sees its streams end.
        for c in q.conns:
            c.settimeout(5)  # a bound, not a wait: the end is there already or never
            try:
                assert c.recv(64) == b""
            except ConnectionResetError:  # (closed with QEMU's first bytes unread)
                pass
        assert refused.value is not None
    finally:
        for c in q.conns:
            c.close()


class _Listens:
    """Stands in for QMP at the destination: ``migrate-incoming`` leaves at m/in what
    ``make_in`` makes there (QEMU's listening socket, or what a subverted QEMU plants)."""

    def __init__(self, make_in) -> None:
        self.make_in, self.commands = make_in, []

    def execute(self, command: str, **args: object) -> None:
        self.commands.append(command)
        if command == "migrate-incoming":
            assert args["uri"] == "unix:m/in"
            self.make_in()


def test_the_destination_sends_its_streams_only_to_its_qemu(tmp_path):
    """m/ belongs to the VM's uid: a QEMU taken over by the stream it parses could put a
    symlink there to another socket of the host (the agent's own control socket, outside
    its root). The agent checks whom it reached (SO_PEERCRED) before it sends a byte."""
    import socket

    victim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # the host's socket the link points to
    victim.bind(str(tmp_path / "control.sock"))
    victim.listen(8)
    vm = _source_vm(tmp_path, 1)  # its QEMU: another process than the one listening
    vm.qmp, vm._incoming, vm._tail = _Listens(lambda: os.symlink(tmp_path / "control.sock",
                                                                 vm.run_dir / "root" / "m" / "in")), [], None
    try:
        with pytest.raises(QemuError, match="leads to process"):
            vm.listen_stream(3)
        victim.settimeout(1)
        got, _ = victim.accept()  # the one connection made, closed before anything was sent
        got.settimeout(1)
        assert got.recv(16) == b""
        got.close()
    finally:
        vm._close_incoming()
        victim.close()
    # The same with QEMU's own socket there (its process: here, this one): every stream connected.
    (tmp_path / "2").mkdir()
    vm = _source_vm(tmp_path / "2", os.getpid())
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen() -> None:
        qemu.bind(str(vm.run_dir / "root" / "m" / "in"))
        qemu.listen(8)

    vm.qmp, vm._incoming, vm._tail = _Listens(listen), [], None
    try:
        vm.listen_stream(3)
        assert len(vm._incoming) == 3 and vm.qmp.commands[-1] == "migrate-incoming"
        _root_is_closed_again(vm)  # (QEMU took the streams before it parsed a byte of them)
    finally:
        vm._close_incoming()
        qemu.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user for a moment")
def test_an_unconfined_agent_opens_and_closes_its_multifd_directory_too():
    """An agent that is not root (QEMU unconfined: it keeps the agent's uid) owns the empty
    root it may not write either: the multifd directory is made all the same (it was
    refused once: EACCES), and the root is closed again after."""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chown(base, 65534, 65534)
    vm = None
    os.setegid(65534)
    os.seteuid(65534)
    try:
        run_dir = base / "run"
        run_dir.mkdir(mode=0o700)
        (run_dir / "root").mkdir(mode=0o500)
        vm = object.__new__(QemuVM)
        vm.run_dir, vm.config = run_dir, {"uid": None, "pid": os.getpid()}
        with vm._channels_dir() as where:
            Path(where, "probe").write_bytes(b"")
        _root_is_closed_again(vm)
    finally:
        os.seteuid(0)
        os.setegid(0)
        shutil.rmtree(base, ignore_errors=True)


def test_the_source_stops_waiting_for_streams_once_qemus_migration_failed(tmp_path):
    """QEMU that fails before it opens all its streams opens no more: the source asks it
    while it waits (it waited out the stream's timeout, 30 s, its failure path behind it)."""
    import time

    class Fails(_Connects):
        def execute(self, command: str, **args: object):
            if command == "query-migrate":
                return {"status": "failed", "error-desc": "injected: connection refused"}
            return super().execute(command, **args)

    vm = _source_vm(tmp_path, os.getpid())
    q = Fails(vm.run_dir, [MAIN])  # one stream of two
    t0 = time.monotonic()
    try:
        with pytest.raises(QemuError, match="QEMU migration failed: injected"):
            vm._accept_streams(q, 2)
        assert time.monotonic() - t0 < 10
        _root_is_closed_again(vm)
    finally:
        for c in q.conns:
            c.close()


def test_the_source_takes_qemus_streams_past_a_socket_an_earlier_agent_left(tmp_path):
    """An agent stopped while it waited for QEMU's connections leaves its socket in m/ (the
    VM and its run directory outlive the agent): the next migration on channels binds
    its own socket all the same, and leaves none behind."""
    import socket

    vm = _source_vm(tmp_path, os.getpid())
    (vm.run_dir / "root" / "m").mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(vm.run_dir / "root" / "m" / "out"))
    stale.close()
    q = _Connects(vm.run_dir, [MAIN, MULTIFD])
    conns = vm._accept_streams(q, 2)
    try:
        assert [c.head for c in conns] == [MAIN[:4], MULTIFD[:4]]  # (read to tell them apart)
        _root_is_closed_again(vm)
    finally:
        for c in conns + q.conns:
            c.close()


@pytest.mark.parametrize("firsts", [[b"", MULTIFD], [MAIN]], ids=["a stream that says nothing", "too few streams"])
def test_the_source_gives_up_on_qemus_streams_within_the_stream_timeout(tmp_path, monkeypatch, firsts):
    """A connection of QEMU's that says nothing, or fewer connections than channels: the
    source stops waiting after STREAM_TIMEOUT (a worker thread cannot be cancelled:
    without it the migration's failure path would wait for ever)."""
    import threading

    from palm_net.hypervisor import qemu

    monkeypatch.setattr(qemu, "STREAM_TIMEOUT", 0.2)
    vm = _source_vm(tmp_path, os.getpid())
    q = _Connects(vm.run_dir, firsts)
    raised: list[BaseException] = []

    def accept() -> None:
        try:
            vm._accept_streams(q, 2)
        except BaseException as exc:  # (what ended it, for the test)
            raised.append(exc)

    waiter = threading.Thread(target=accept, daemon=True)
    waiter.start()
    try:
        waiter.join(20)  # a bound: 0.2 s is what it takes
        assert not waiter.is_alive(), "still waiting for QEMU's streams"
        assert len(raised) == 1 and isinstance(raised[0], QemuError), raised
    finally:
        for c in q.conns:
            c.close()


def test_the_source_binds_no_socket_for_qemus_streams_in_a_run_directory_others_may_enter(tmp_path):
    """The socket QEMU's streams come to is in QEMU's root, in the VM's run directory: one
    that others may enter (mode, owner, a symlink) is refused before anything listens."""
    vm = _source_vm(tmp_path, os.getpid())
    vm.run_dir.chmod(0o755)
    q = _Connects(vm.run_dir, [MAIN, MULTIFD])
    with pytest.raises(UnsafePathError, match="QEMU run directory"):
        vm._accept_streams(q, 2)
    assert q.conns == [] and not (vm.run_dir / "root" / "m" / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to the VM's uid (root only)")
def test_the_directory_of_qemus_streams_is_the_vm_uids_alone(tmp_path):
    """While QEMU connects its streams its root stays root's, its group the VM's uid with
    execute only (the uid passes, never reads or writes there); m/ in it is the VM's
    uid's own, mode 0700. Then the root is closed again."""
    import stat as st

    vm = _source_vm(tmp_path, os.getpid())
    vm.config["uid"] = uid = 2_000_000_123
    seen = []

    class Looks(_Connects):
        def execute(self, command: str, **args: object) -> object:
            if command == "migrate":  # (as QEMU connects)
                seen.append((os.lstat(vm.run_dir / "root"), os.lstat(vm.run_dir / "root" / "m")))
            return super().execute(command, **args)

    q = Looks(vm.run_dir, [MAIN, MULTIFD])
    conns = vm._accept_streams(q, 2)
    try:
        ((root, m),) = seen
        assert (root.st_uid, root.st_gid, st.S_IMODE(root.st_mode)) == (0, uid, 0o510)
        assert (m.st_uid, m.st_gid, st.S_IMODE(m.st_mode)) == (uid, uid, 0o700)
        _root_is_closed_again(vm)
    finally:
        for c in conns + q.conns:
            c.close()


def test_the_source_binds_no_socket_where_a_symlink_in_qemus_root_points(tmp_path):
    """m/ found a symlink (to a directory QEMU's uid may reach): the link goes, never
    followed, and nothing listens or is removed where it points."""
    vm = _source_vm(tmp_path, os.getpid())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"")
    (vm.run_dir / "root" / "m").symlink_to(elsewhere)
    q = _Connects(vm.run_dir, [MAIN, MULTIFD])
    conns = vm._accept_streams(q, 2)
    try:
        assert [p.name for p in elsewhere.iterdir()] == ["keep"]
        _root_is_closed_again(vm)
    finally:
        for c in conns + q.conns:
            c.close()


# --------------------------------------------------------------------------
# The destination's ends of QEMU's streams (one socket a channel)


def _destination_vm(channels: int) -> tuple[QemuVM, list]:
    """A destination QemuVM's stream part (no QEMU): its ends of ``channels`` streams and
    the ends its QEMU would read."""
    import socket

    from palm_net.hypervisor.qemu import StreamTail

    vm = object.__new__(QemuVM)
    vm._incoming, theirs = [], []
    for _ in range(channels):
        ours, qemu = socket.socketpair()
        qemu.settimeout(10)  # a bound, for bytes that never come
        vm._incoming.append(ours)
        theirs.append(qemu)
    vm._tail = StreamTail()
    vm._reserver = None  # (its RAM file is not under test)
    return vm, theirs


def test_each_channels_bytes_reach_its_own_qemu_stream_and_only_the_main_ones_its_tail():
    vm, theirs = _destination_vm(2)
    try:
        vm.stream_in(b"QEVM main", 0)
        vm.stream_in(b"\x11\x22\x33\x44 multifd", 1)
        assert [q.recv(64) for q in theirs] == [b"QEVM main", b"\x11\x22\x33\x44 multifd"]
        assert vm._tail.bytes() == b"QEVM main"  # the CPU state is at the main stream's end
        with pytest.raises(QemuError, match="no incoming migration"):
            vm.stream_in(b"x", 2)  # a channel QEMU does not listen for
    finally:
        for c in vm._incoming + theirs:
            c.close()


def test_a_writer_blocked_on_a_qemu_that_stopped_reading_returns_when_interrupted():
    """The destination's writer of a stream QEMU stopped reading (a worker thread, in
    sendall) returns at once on interrupt_stream, not after the stream's timeout."""
    import socket
    import threading

    vm, theirs = _destination_vm(2)
    for c in vm._incoming:
        c.settimeout(60)  # past the test's bound: without the interrupt, the writer waits this long
    theirs[1].settimeout(20)  # a bound, for a writer that never writes there
    raised: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(1 << 12):  # 4 GiB: more than any socket buffer holds
                vm.stream_in(bytes(1 << 20), 1)
        except QemuError as exc:
            raised.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert theirs[1].recv(1, socket.MSG_PEEK)  # (blocks until the writer has begun)
        vm.interrupt_stream()
        writer.join(20)  # a bound: it returns at once
        assert not writer.is_alive() and len(raised) == 1
    finally:
        for c in vm._incoming + theirs:  # (the writer returns whatever happened above)
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        writer.join(70)
        for c in vm._incoming + theirs:
            c.close()


class _LoadedAs:
    """Stands in for QMP after the stream's end: QEMU says how its load went."""

    def __init__(self, status: str) -> None:
        self.status = status

    def wait_event(self, match, timeout):
        ev = {"event": "MIGRATION", "data": {"status": self.status}}
        assert match(ev)
        return ev

    def execute(self, command: str, **args: object) -> dict:
        assert command == "query-status"
        return {"status": "paused"}


def test_a_stream_its_qemu_failed_to_load_is_refused(tmp_path):
    """QEMU read every stream but failed to load them (a device state it refused): the
    migration fails there, never READY with a VM that did not load."""
    vm, theirs = _destination_vm(2)
    vm.qmp, vm.dir, vm.name = _LoadedAs("failed"), tmp_path, "q"
    try:
        with pytest.raises(QemuError, match="refused the stream"):
            vm.end_stream()
        assert vm._incoming == []  # every stream closed
    finally:
        for c in theirs:
            c.close()


@pytest.mark.parametrize(("version", "drop"), [
    ((0, 0), ["-runas", "2000000007:2000000007", "-chroot", "{root}"]),  # unknown: refused by a QEMU without them
    ((7, 2), ["-runas", "2000000007:2000000007", "-chroot", "{root}"]),
    ((9, 0), ["-runas", "2000000007:2000000007", "-run-with", "chroot={root}"]),  # -chroot gone in 9.0
    ((10, 0), ["-run-with", "user=2000000007:2000000007,chroot={root}"]),  # -runas gone in 10.0
], ids=["unknown", "7.2", "9.0", "10.0"])
def test_qemu_is_told_to_drop_root_into_its_empty_root_as_its_version_spells_it(tmp_path, monkeypatch, version, drop):
    """A QEMU that did not understand its confinement options would not start (10.0:
    "-runas: invalid option"; 9.0: no -chroot), and one that ignored them would run as
    root: each version gets its own spelling of the same uid and chroot."""
    from palm_net.hypervisor import qemu
    from palm_net.hypervisor.qemu import QemuVM

    monkeypatch.setattr(qemu, "qemu_version", lambda: version)
    monkeypatch.setattr(qemu, "qemu_binary", lambda: "/usr/bin/qemu-system-x86_64")
    config = {"backend": "qemu", "name": "q", "vm_id": "ab" * 16, "memory_mib": 64, "vcpus": 1, "machine": "pc",
              "accel": "tcg", "args": [], "local_args": [], "state": "incoming", "policy": "any",
              "migration": None, "pid": None, "uid": 2000000007, "run_dir": str(tmp_path / "run")}
    vm = QemuVM(tmp_path / "vm", config)
    cmd = vm._command(incoming=True, local=[], ram_fd=7)
    root = str(tmp_path / "run" / "root")
    at = cmd.index(drop[0])
    assert cmd[at : at + len(drop)] == [w.format(root=root) for w in drop]
    assert not {"-runas", "-run-with", "-chroot"} & set(cmd[at + len(drop):])
    assert cmd[cmd.index("-sandbox") + 1].endswith("elevateprivileges=allow")  # (it must setuid itself)


def test_qemus_version_is_read_from_its_own_banner_and_asked_again_of_a_new_binary(tmp_path, monkeypatch):
    """What the command line and the migration's options depend on; (0, 0), not
    remembered, where it cannot be read (an unknown QEMU is taken for the oldest);
    the same file is asked once, an upgrade in place again."""
    import subprocess

    from palm_net.hypervisor import qemu
    from palm_net.hypervisor.qemu import _binary_version, parse_qemu_version

    assert parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n") == (10, 0)
    assert parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)") == (7, 2)
    assert parse_qemu_version("Copyright (c) 2003-2025 version 9.9") == (0, 0)
    asked: list[str] = []
    says = ["garbage", "QEMU emulator version 9.2.0", "QEMU emulator version 10.1.0"]

    def run(args, **kwargs):
        asked.append(args[0])
        return subprocess.CompletedProcess(args, 0, says[len(asked) - 1], "")

    monkeypatch.setattr(qemu.subprocess, "run", run)
    binary = tmp_path / "qemu-system-x86_64"
    binary.write_text("")
    assert _binary_version(str(binary)) == (0, 0)  # unreadable: asked again next time
    assert _binary_version(str(binary)) == (9, 2) == _binary_version(str(binary))
    assert len(asked) == 2
    os.utime(binary, ns=(0, 1))  # replaced in place
    assert _binary_version(str(binary)) == (10, 1) and len(asked) == 3
    assert _binary_version(str(tmp_path / "missing")) == (0, 0) and len(asked) == 3
