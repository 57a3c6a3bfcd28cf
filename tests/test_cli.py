"""End to end through the real `palm` command: authority, two agent processes, migrations, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from palm_net.agent.launcher import AgentProcess, free_port, remove_all
from palm_net.testing import scratch

pytestmark = pytest.mark.slow
PALM = [sys.executable, "-m", "palm_net.cli"]


def palm(*args, check=True, timeout=120):
    p = subprocess.run([*PALM, *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"palm {' '.join(args)} failed ({p.returncode}): {p.stderr} {p.stdout}")
    return p


def one_line_error(p, *words):
    assert p.returncode != 0, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


class Cluster:
    """Two agents as processes; identities and certificates made with the CLI itself."""

    def __init__(self):
        self.root = scratch.mkdtemp("palm-cli-")
        self.agents = {}
        palm("ca", "init", "--dir", str(self.root / "ca"))
        for name in ("a", "b"):
            palm("keygen", "--dir", str(self.root / name), "--name", f"host-{name}")
            palm("ca", "issue", "--ca", str(self.root / "ca"), "--agent", str(self.root / name))
            self.agents[name] = AgentProcess(self.root, name, log_level="debug")

    @property
    def ports(self):
        return {n: ag.port for n, ag in self.agents.items()}

    def sock(self, name):
        return self.agents[name].control

    def start(self, name, *extra):
        ag = self.agents[name]
        ag.extra = list(extra)
        return ag.start()

    def stop(self, name, sig=signal.SIGTERM):
        return self.agents[name].stop(sig)

    def log(self, name):
        return self.agents[name].log_path.read_text()

    def close(self):
        remove_all(self.root, self.agents.values())


def two_agents():
    """Agents a and b started, stopped and removed after the caller is done."""
    c = Cluster()
    try:
        c.start("a")
        c.start("b")
        yield c
    finally:
        c.close()


@pytest.fixture
def cluster():
    yield from two_agents()


def vm_names(c, name):
    return [v["name"] for v in json.loads(palm("vm", "list", "--control", c.sock(name), "--json").stdout)]


def test_migrate_end_to_end(cluster):
    c = cluster
    palm("vm", "create", "vm1", "--control", c.sock("a"), "--memory", "32MiB", "--protected", "2", "--seed", "3")
    before = json.loads(palm("vm", "digest", "vm1", "--control", c.sock("a"), "--json").stdout)["digest"]
    p = palm("migrate", "vm1", "--control", c.sock("a"), "--to", f"127.0.0.1:{c.ports['b']}", "--json")
    r = json.loads(p.stdout)
    assert r["ok"] and r["status"] == "completed" and r["vm"] == "vm1" and r["rounds"] >= 2
    for k in ("migration_id", "total_ms", "downtime_ms", "bytes", "zero_pages", "protected_pages"):
        assert k in r
    assert r["protected_pages"] >= 2048 and r["zero_pages"] > 0
    after = json.loads(palm("vm", "digest", "vm1", "--control", c.sock("b"), "--json").stdout)["digest"]
    assert after == before
    assert vm_names(c, "a") == [] and vm_names(c, "b") == ["vm1"]
    v = json.loads(palm("vm", "verify", "vm1", "--control", c.sock("b"), "--json").stdout)
    assert v["ok"] and v["checked"] == 2048
    ms = json.loads(palm("migrations", "--control", c.sock("a"), "--json").stdout)
    assert ms[0]["migration_id"] == r["migration_id"] and ms[0]["state"] == "done"
    # and back again, text mode
    p = palm("migrate", "vm1", "--control", c.sock("b"), "--to", f"127.0.0.1:{c.ports['a']}")
    assert "migrated vm1 to host-a" in p.stdout
    assert json.loads(palm("vm", "digest", "vm1", "--control", c.sock("a"), "--json").stdout)["digest"] == before


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_qemu_vm_through_the_cli(cluster, tmp_path):
    c = cluster
    content = c.agents["a"].images_dir / "content.bin"  # the agent loads only files of its images directory
    content.write_bytes(os.urandom(1 << 20))
    p = palm("vm", "create", "qvm", "--control", c.sock("a"), "--backend", "qemu", "--memory", "64MiB",
             "--qemu-arg=-device", f"--qemu-arg=loader,file={content},addr=0x1000000,force-raw=on",
             "--qemu-arg=-cpu", "--qemu-arg=qemu64,-kvmclock")  # see docs/QEMU.md on kvmclock and digests
    assert "created: QEMU" in p.stdout
    show = json.loads(palm("vm", "show", "qvm", "--control", c.sock("a"), "--json").stdout)
    assert show["backend"] == "qemu" and show["qemu_status"] == "running" and show["accel"] in ("kvm", "tcg")
    rng = ["--range", "0x1000000:1MiB"]
    before = json.loads(palm("vm", "digest", "qvm", "--control", c.sock("a"), "--json", *rng).stdout)["digest"]
    r = json.loads(palm("migrate", "qvm", "--control", c.sock("a"), "--to", f"127.0.0.1:{c.ports['b']}",
                        "--json", "--verify-digest").stdout)
    assert r["ok"] and r["digest_verified"] and r["hypervisor"]["rounds"] >= 1, r
    assert "BACKEND" in palm("vm", "list", "--control", c.sock("b")).stdout
    assert json.loads(palm("vm", "digest", "qvm", "--control", c.sock("b"), "--json", *rng).stdout)["digest"] \
        == before
    assert vm_names(c, "a") == []
    # bad input: one line each, nothing created
    one_line_error(palm("vm", "create", "q2", "--control", c.sock("a"), "--backend", "qemu", "--memory", "64MiB",
                        "--qemu-arg=-drive", "--qemu-arg=file=/etc/shadow", check=False), "host resource")
    one_line_error(palm("vm", "create", "q2", "--control", c.sock("a"), "--backend", "qemu", "--memory", "64MiB",
                        "--qemu-arg=-device", "--qemu-arg=virtio-serial-pci", check=False), "cannot migrate")
    one_line_error(palm("vm", "create", "q2", "--control", c.sock("a"), "--memory", "64MiB",
                        "--qemu-arg=-device", check=False), "needs --backend qemu")
    one_line_error(palm("vm", "create", "q2", "--control", c.sock("a"), "--backend", "qemu", "--memory", "64MiB",
                        "--protected", "1", check=False), "no protected processes")
    one_line_error(palm("vm", "digest", "qvm", "--control", c.sock("b"), "--range", "0x1000000:1TiB",
                        check=False), "outside")
    assert vm_names(c, "a") == []
    palm("vm", "destroy", "qvm", "--control", c.sock("b"))
    assert vm_names(c, "b") == []


def test_logs_carry_no_key_material(cluster):
    c = cluster
    palm("vm", "create", "vm1", "--control", c.sock("a"), "--memory", "16MiB", "--protected", "1",
         "--workload", "random:1000+protected:500")
    assert json.loads(palm("migrate", "vm1", "--control", c.sock("a"), "--to", f"127.0.0.1:{c.ports['b']}",
                           "--json", "--verify-digest").stdout)["ok"]
    import msgpack

    from palm_net.hypervisor.vms import open_vm
    secrets = []
    for name in ("a", "b"):
        ident = msgpack.unpackb((c.root / name / "identity.key").read_bytes())
        secrets += [ident["x25519"], ident["ed25519"], (c.root / name / "hv.key").read_bytes()]
    secrets.append(msgpack.unpackb((c.root / "ca" / "ca.key").read_bytes())["ed25519"])
    vm = open_vm(c.root / "b-mem" / "vm1", (c.root / "b" / "hv.key").read_bytes())
    secrets += [bytes(k) for k in vm._keys]
    vm.close()
    logs = c.log("a") + c.log("b")
    assert "migration completed" in logs and '"migration":' in logs and '"phase":' in logs
    for s in secrets:
        for form in (s.hex(), s.hex()[:16], repr(s)[2:30]):
            assert form not in logs


def test_bad_inputs_are_one_line_errors(cluster, tmp_path):
    c = cluster
    one_line_error(palm("vm", "show", "nope", "--control", c.sock("a"), check=False), "unknown VM")
    one_line_error(palm("vm", "list", "--control", str(tmp_path / "none.sock"), check=False), "no agent at")
    one_line_error(palm("vm", "create", "x", "--control", c.sock("a"), "--memory", "12XB", check=False),
                   "malformed size")
    one_line_error(palm("migrate", "x", "--control", c.sock("a"), "--to", "127.0.0.1:1", "--bandwidth", "fast",
                        check=False), "malformed rate")
    palm("vm", "create", "vm1", "--control", c.sock("a"), "--memory", "8MiB")
    one_line_error(palm("vm", "create", "vm1", "--control", c.sock("a"), "--memory", "8MiB", check=False),
                   "already exists")
    # destination not reachable
    p = palm("migrate", "vm1", "--control", c.sock("a"), "--to", f"127.0.0.1:{free_port()}", check=False)
    one_line_error(p, "unreachable", "VM runs on: source")
    assert vm_names(c, "a") == ["vm1"]
    # a second agent on a running agent's state directory (another port and control socket)
    one_line_error(palm("agent", "--dir", str(c.root / "a"), "--listen", "127.0.0.1:0",
                        "--control", str(c.root / "x.sock"), "--ca", str(c.root / "ca" / "ca.pub"), check=False),
                   "state directory", "in use by another agent", f"pid {c.agents['a'].pid()}")
    palm("keygen", "--dir", str(c.root / "c"), "--name", "host-c")
    palm("ca", "issue", "--ca", str(c.root / "ca"), "--agent", str(c.root / "c"))
    # port in use
    one_line_error(palm("agent", "--dir", str(c.root / "c"), "--listen", f"127.0.0.1:{c.ports['b']}",
                        "--memory-dir", str(c.root / "c-mem"),  # not the default: it outlives the test
                        "--control", str(c.root / "x.sock"), "--ca", str(c.root / "ca" / "ca.pub"), check=False),
                   "cannot listen")
    # too-open key file
    key = c.root / "c" / "identity.key"
    os.chmod(key, 0o644)
    one_line_error(palm("agent", "--dir", str(c.root / "c"), "--listen", "127.0.0.1:0", "--control",
                        str(c.root / "y.sock"), "--memory-dir", str(c.root / "c-mem"),
                        "--ca", str(c.root / "ca" / "ca.pub"), check=False),
                   "group/other")
    os.chmod(key, 0o600)
    one_line_error(palm("vm", "create", "v2", "--control", c.sock("a"), "--memory", "8MiB", "--workload", "bogus",
                        check=False), "bad workload")
    one_line_error(palm("agent", "--dir", str(tmp_path / "nodir"), "--listen", "127.0.0.1:0", "--control",
                        str(c.root / "z.sock"), "--ca", str(c.root / "ca" / "ca.pub"), check=False), "does not exist")


def test_refused_peers(tmp_path):
    """A destination whose certificate comes from another authority, or whose
    measurement is not allowed, never receives the VM."""
    c = Cluster()
    try:
        palm("ca", "init", "--dir", str(c.root / "rogue"))
        palm("ca", "issue", "--ca", str(c.root / "rogue"), "--agent", str(c.root / "b"))
        # b trusts the rogue authority (its certificate comes from it); a trusts the real one
        c.start("a")
        shutil.copy(c.root / "rogue" / "ca.pub", c.root / "ca" / "rogue.pub")
        c.agents["b"].extra = ["--ca", str(c.root / "ca" / "rogue.pub")]  # the later --ca wins
        c.agents["b"].start()
        palm("vm", "create", "vm1", "--control", c.sock("a"), "--memory", "8MiB", "--protected", "1")
        p = palm("migrate", "vm1", "--control", c.sock("a"), "--to", f"127.0.0.1:{c.ports['b']}", "--json",
                 check=False)
        r = json.loads(p.stdout)
        assert p.returncode == 1 and not r["ok"] and "unknown-authority" in r["error"] and r["runs_on"] == "source"
        c.stop("b")
        # now b has a proper certificate, but a allows only another measurement
        palm("ca", "issue", "--ca", str(c.root / "ca"), "--agent", str(c.root / "b"))
        c.start("b")
        c.stop("a")
        c.start("a", "--allow-measurement", "ab" * 32)
        p = palm("migrate", "vm1", "--control", c.sock("a"), "--to", f"127.0.0.1:{c.ports['b']}", "--json",
                 check=False)
        r = json.loads(p.stdout)
        assert not r["ok"] and "measurement-not-allowed" in r["error"]
        assert vm_names(c, "a") == ["vm1"] and vm_names(c, "b") == []
    finally:
        c.close()


@pytest.mark.parametrize("victim", ["a", "b"])
def test_agent_shutdown_during_migration_keeps_one_copy(cluster, victim):
    c = cluster
    palm("vm", "create", "vm1", "--control", c.sock("a"), "--memory", "64MiB", "--protected", "1",
         "--fill", "random")
    digest = json.loads(palm("vm", "digest", "vm1", "--control", c.sock("a"), "--json").stdout)["digest"]
    mig = subprocess.Popen([*PALM, "migrate", "vm1", "--control", c.sock("a"), "--to",
                            f"127.0.0.1:{c.ports['b']}", "--bandwidth", "16MiB/s", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # in round 0
    assert c.stop(victim) == 0
    out, _ = mig.communicate(timeout=60)
    c.start(victim)
    on_a, on_b = vm_names(c, "a"), vm_names(c, "b")
    assert on_a == ["vm1"] and on_b == [], (out, on_a, on_b)
    show = json.loads(palm("vm", "show", "vm1", "--control", c.sock("a"), "--json").stdout)
    assert show["state"] == "running"
    assert json.loads(palm("vm", "digest", "vm1", "--control", c.sock("a"), "--json").stdout)["digest"] == digest


def test_demo_json():
    p = palm("demo", "--json", "--memory", "64MiB", timeout=120)
    r = json.loads(p.stdout)
    assert r["ok"] and r["digest_equal"] and r["vm_on_destination"] and not r["vm_on_source"]
    assert r["verify"]["ok"] and r["migration"]["protected_pages"] > 0


def test_help_and_usage():
    p = palm("--help")
    assert "demo" in p.stdout and "migrate" in p.stdout
    p = palm("migrate", "--control", "/nonexistent.sock", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert palm("bogus", check=False).returncode == 2


def test_to_an_address_that_does_not_speak_palm_says_so(cluster):
    """--to at an HTTP or SSH port used to say "oversize: frame length 1397966893 ...";
    --to http://... blamed name resolution (issue 25.4)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def ssh_like() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
            conn.recv(4096)
            conn.close()

    threading.Thread(target=ssh_like, daemon=True).start()
    c = cluster
    palm("vm", "create", "v1", "--control", c.sock("a"), "--memory", "4MiB")
    p = palm("migrate", "v1", "--control", c.sock("a"), "--to", f"127.0.0.1:{srv.getsockname()[1]}", check=False)
    assert p.returncode == 1 and "does not speak palm" in p.stderr and "SSH-2.0" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = palm("migrate", "v1", "--control", c.sock("a"), "--to", "http://127.0.0.1:7400/", check=False)
    assert p.returncode != 0 and "use HOST:PORT (no scheme, no path)" in p.stderr, p.stderr
    srv.close()
