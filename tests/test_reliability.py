"""Agents as real processes: kill -9 at each phase, floods, huge claims, concurrent load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from palm_net.agent.launcher import AgentProcess, provision, remove_all
from palm_net.channel.handshake import Purpose, TransportMode, encode_preamble
from palm_net.hypervisor.qemu import qemu_binary
from palm_net.testing import scratch
from palm_net.testing.proxy import DONE, READY, ProxyThread, Rule

pytestmark = pytest.mark.slow
FLOODER = "127.0.0.2"  # floods come from another loopback address than the honest agents


class Pair:
    def __init__(self, extra_b: list[str] | None = None) -> None:
        self.root = scratch.mkdtemp("palm-rel-")
        provision(self.root, ["a", "b"])
        self.a = AgentProcess(self.root, "a", log_level="debug").start()
        self.b = AgentProcess(self.root, "b", extra=extra_b or [], log_level="debug").start()

    def names(self, ag: AgentProcess) -> dict[str, str]:
        return {v["name"]: v["state"] for v in ag.request("vm.list", timeout=30)}

    def one_copy(self, vm: str, timeout: float = 30) -> str:
        """Waits until the in-doubt dust settles, then: the VM runs on exactly one agent."""
        deadline = time.monotonic() + timeout
        while True:
            a, b = self.names(self.a), self.names(self.b)
            running = [n for n, s in (("a", a.get(vm)), ("b", b.get(vm))) if s == "running"]
            present = [n for n, s in (("a", a.get(vm)), ("b", b.get(vm))) if s is not None]
            if len(running) == 1 and present == running:
                return running[0]
            assert len(running) <= 1, f"VM runs twice: {a} {b}"
            if time.monotonic() > deadline:
                raise AssertionError(f"VM not settled on exactly one agent: a={a} b={b}")
            time.sleep(0.2)

    def close(self) -> None:
        remove_all(self.root, (self.a, self.b))


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def _migrate_async(src: AgentProcess, name: str, to: str, **args) -> tuple[threading.Thread, dict]:
    return src.migrate_async(name, to, timeout=120, **args)


def _wait_for(pred, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# Each case: which frame the proxy holds back, which agent is killed -9
# meanwhile, and where the VM must end up (READY and DONE picked by their length).
HOLD = 3.0
KILL_CASES = [
    ("source, round 0", "a", None, "a"),
    ("destination, round 0", "b", None, "a"),
    ("source, destination verifying (before READY)", "a", Rule("s2c", 0, "delay", match=READY, seconds=HOLD), "a"),
    ("destination, prepared (READY held)", "b", Rule("s2c", 0, "delay", match=READY, seconds=HOLD), "a"),
    ("source, handed off (DONE held)", "a", Rule("s2c", 0, "delay", match=DONE, seconds=HOLD), "b"),
    ("destination, committed (DONE held)", "b", Rule("s2c", 0, "delay", match=DONE, seconds=HOLD), "b"),
]


def kill_during_migration(p: Pair, name: str, rule: Rule | None, victim: str, slow: str) -> str:
    """Migrates a to b through the proxy, kill -9s the victim while the rule
    holds its frame (or, without a rule, a second into a ``slow``-capped
    transfer), restarts it, and returns where the VM settles."""
    with ProxyThread(("127.0.0.1", p.b.port), [rule] if rule else []) as proxy:
        args = {} if rule else {"bandwidth": slow}
        t, _ = _migrate_async(p.a, name, f"127.0.0.1:{proxy.port}", **args)
        if rule:
            _wait_for(lambda: rule.fired, what=f"the proxy to hold frame {rule.frame}")
            time.sleep(0.3)
        else:
            time.sleep(1.0)
        agent = p.a if victim == "a" else p.b
        agent.stop(signal.SIGKILL)
        agent.start()
        t.join(60)
        return p.one_copy(name)


def fresh(rule: Rule | None) -> Rule | None:
    """A Rule remembers that it fired: each test needs its own copy of a shared case."""
    return dataclasses.replace(rule, fired=False) if rule else None


@pytest.mark.parametrize(("case", "victim", "rule", "where"), KILL_CASES, ids=[c[0] for c in KILL_CASES])
def test_kill9_at_each_phase_then_restart(pair, case, victim, rule, where):
    rule = fresh(rule)
    p = pair
    p.a.request("vm.create", name="vm1", memory="32MiB", protected=1, fill="random")
    digest = p.a.request("vm.digest", name="vm1")["digest"]
    # round 0 takes ~3 s at 8 MiB/s
    assert kill_during_migration(p, "vm1", rule, victim, "8MiB/s") == where, case
    ag = p.a if where == "a" else p.b
    assert ag.request("vm.digest", name="vm1")["digest"] == digest
    assert ag.request("vm.verify", name="vm1")["ok"]
    logs = p.a.log_tail(200000) + p.b.log_tail(200000)
    assert "migration" in logs


@pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed (Debian qemu-system-x86)")
@pytest.mark.parametrize(("case", "victim", "rule", "where"), KILL_CASES, ids=[c[0] for c in KILL_CASES])
def test_kill9_of_an_agent_with_a_qemu_vm_then_restart(pair, case, victim, rule, where, tmp_path):
    """The same cases with a real QEMU guest: afterwards exactly one QEMU of
    the VM exists on the host, it runs (asked over QMP), and it holds the content."""
    from tests.test_qemu import CONTENT, LOAD_ADDR, qemu_processes

    rule = fresh(rule)
    p = pair
    content = p.a.images_dir / "content.bin"  # the agent loads only files of its images directory
    content.write_bytes(os.urandom(CONTENT))
    name = "q" + uuid.uuid4().hex[:10]
    p.a.request("vm.create", name=name, memory="64MiB", backend="qemu",
                qemu_args=["-device", f"loader,file={content},addr={LOAD_ADDR:#x},force-raw=on"])
    vm_id = bytes.fromhex(p.a.request("vm.show", name=name)["vm_id"])  # QEMU's command line names only this
    # the 9 MB stream takes ~2 s at 4 MiB/s
    assert kill_during_migration(p, name, rule, victim, "4MiB/s") == where, case
    ag = p.a if where == "a" else p.b
    _wait_for(lambda: len(qemu_processes(vm_id)) == 1, what="exactly one QEMU of the VM")
    show = ag.request("vm.show", name=name)
    assert show["qemu_status"] == "running" and qemu_processes(vm_id) == [show["pid"]]
    assert ag.request("vm.verify", name=name)["ok"]
    r = ag.request("vm.digest", name=name, range=f"{LOAD_ADDR:#x}:{CONTENT}")
    assert r["digest"] == hashlib.blake2b(content.read_bytes(), digest_size=32, person=b"palm-vm-digest").hexdigest()


def test_flood_of_half_open_handshakes_and_huge_claims_do_not_starve(pair):
    p = pair
    p.a.request("vm.create", name="vm1", memory="16MiB", protected=1)
    socks = []
    for i in range(300):  # more than the pending-handshake limit
        s = socket.create_connection(("127.0.0.1", p.b.port), source_address=(f"127.0.1.{i % 200 + 1}", 0))
        if i % 3 == 0:
            s.sendall(struct.pack(">I", 0xFFFFFFF0))  # a huge length claim
        elif i % 3 == 1:
            pre = encode_preamble(Purpose.MIGRATION, TransportMode.SECURE, "Noise_XX_25519_AESGCM_BLAKE2b")
            s.sendall(struct.pack(">I", len(pre)) + pre)  # then silence: half open
        socks.append(s)
    try:
        r = p.a.request("migrate", name="vm1", to=p.b.addr, timeout=60)
        assert r["ok"], r["error"]
        assert p.b.request("status")["agent"] == "b"
    finally:
        for s in socks:
            s.close()
    p.one_copy("vm1")


def test_huge_counts_in_begin_are_refused(pair):
    """A peer claiming a guest far beyond the destination's reservation gets ABORT, not an allocation."""
    p = pair
    from palm_net.wire.messages import MAX_GUEST_PAGES
    assert MAX_GUEST_PAGES * 4096 > 16 << 30  # the 16 GiB default reservation is the real bound
    p.a.request("vm.create", name="big", memory="64MiB")
    p.b.stop()
    p.b.extra = ["--max-incoming-memory", "32MiB"]
    p.b.start()
    r = p.a.request("migrate", name="big", to=p.b.addr)
    assert not r["ok"] and ("too-large" in r["error"] or "busy" in r["error"]) and r["runs_on"] == "source"


def test_eight_concurrent_migrations_into_one_destination_under_a_flood():
    p = Pair(extra_b=["--max-incoming", "8", "--max-incoming-per-peer", "8"])
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                # From another address than the agents' (the per-address limit is its own test).
                s = socket.create_connection(("127.0.0.1", p.b.port), timeout=1, source_address=(FLOODER, 0))
                s.sendall(b"\x00\x00\x00\x10" + b"garbage-garbage!")
                s.close()
            except OSError:
                pass
            time.sleep(0.002)

    peak = [0]

    def sample() -> None:
        while not stop.is_set():
            try:
                st = {k: int(v.split()[0]) for k, _, v in
                      (ln.partition(":") for ln in open(f"/proc/{p.b.pid()}/status")) if k in ("VmRSS", "RssShmem")}
                peak[0] = max(peak[0], (st["VmRSS"] - st["RssShmem"]) * 1024)
            except (OSError, KeyError):
                pass
            time.sleep(0.02)

    try:
        for i in range(8):
            p.a.request("vm.create", name=f"vm{i}", memory="16MiB", protected=1, fill="random",
                        workload="random:500")
        threads = [threading.Thread(target=flood, daemon=True), threading.Thread(target=sample, daemon=True)]
        for t in threads:
            t.start()
        runs = [_migrate_async(p.a, f"vm{i}", p.b.addr) for i in range(8)]
        for t, _ in runs:
            t.join(120)
        stop.set()
        results = [out.get("result") or {"ok": False, "error": out.get("error")} for _, out in runs]
        relevant = [ln for ln in p.b.log_tail(10**7).splitlines() if "handshake refused" not in ln]
        assert all(r["ok"] for r in results), ([(r.get("error"), r.get("phase")) for r in results],
                                               relevant[-40:])
        assert sorted(p.names(p.b)) == [f"vm{i}" for i in range(8)]
        assert p.names(p.a) == {}
        # Bounded: the destination's own memory (guest memory excluded) stays small.
        assert peak[0] < 256 << 20, f"destination used {peak[0] >> 20} MiB beyond guest memory"
        print(json.dumps({"destination_peak_rss_beyond_guest_mib": peak[0] >> 20}))
    finally:
        stop.set()
        p.close()


def test_restart_acts_on_the_migration_not_on_the_vm_name(pair):
    """Regression (found by the soak drill): a destination that once committed
    this VM, then saw it leave, then is killed while receiving it again, must
    not activate the new incoming copy on restart."""
    p = pair
    p.a.request("vm.create", name="vm1", memory="32MiB", protected=1, fill="random")
    assert p.a.request("migrate", name="vm1", to=p.b.addr)["ok"]
    assert p.b.request("migrate", name="vm1", to=p.a.addr)["ok"]
    t, _ = _migrate_async(p.a, "vm1", p.b.addr, bandwidth="8MiB/s")
    time.sleep(1.0)
    p.b.stop(signal.SIGKILL)
    p.b.start()
    t.join(60)
    assert p.one_copy("vm1") == "a"


def test_an_agents_start_up_objects_are_out_of_the_collectors_way():
    """A full collection walked the agent's 40,000 start-up objects with the GIL held
    (22 ms, once inside a destination's pause); frozen once it serves, it walks none
    of them, and a cycle that was garbage before is collected, not kept for good."""
    code = ("import gc, weakref\n"
            "import palm_net.agent.agent\n"
            "from palm_net.agent.limits import freeze_heap\n"
            "class Cycle: pass\n"
            "c = Cycle(); c.me = c; gone = weakref.ref(c); del c\n"
            "freeze_heap()\n"
            "left = len(gc.get_objects())\n"
            "print(gone() is None, left < 100, gc.get_freeze_count() > 10000)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr
