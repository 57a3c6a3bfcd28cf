"""Real VMs: QEMU guests migrated agent to agent, QEMU's stream inside the attested session.

Every test starts its own QEMU processes (Debian's qemu-system-x86; KVM when
/dev/kvm is usable, TCG otherwise) and skips when QEMU is not installed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import trio

from palm_net import faults
from palm_net.agent.client import control_request
from palm_net.crypto.identity import CERT_FILE, AgentIdentity, Authority
from palm_net.hypervisor.backend import HypervisorError
from palm_net.hypervisor.qemu import (
    GUEST_RAM,
    STREAM_TIMEOUT,
    QemuError,
    QemuSpec,
    QemuVM,
    qemu_binary,
    qemu_version,
    split_args,
)
from palm_net.hypervisor.qemu import live_processes as qemu_processes
from palm_net.migration.params import MigrationParams, default_channels
from palm_net.testing.cluster import LocalCluster
from palm_net.testing.proxy import FaultProxy, Rule
from tests.conftest import data_bytes, raw_message

pytestmark = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 not installed "
                                "(Debian package qemu-system-x86; .ci/run installs it)")

MEM = 64 << 20
LOAD_ADDR = 0x1000000  # 16 MiB: above what the BIOS touches
CONTENT = 8 << 20


@pytest.fixture(scope="module")
def content(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qemu") / "content.bin"
    path.write_bytes(os.urandom(CONTENT))
    return path


def new_vm(agent, content: Path) -> QemuVM:
    name = "q" + uuid.uuid4().hex[:10]  # unique: QEMU processes are counted by name across xdist workers
    content = image(agent.registry.images_dir, content)
    # Without kvmclock: under KVM the destination's kernel rewrites the guest's
    # pvclock page when it loads the clock, so a guest using kvmclock never has
    # a bit-equal RAM digest on both sides (see docs/QEMU.md).
    return agent.registry.create_qemu(name, MEM, ["-device", f"loader,file={content},addr={LOAD_ADDR:#x},force-raw=on",
                                            "-cpu", "qemu64,-kvmclock"])


def image(images_dir: Path, content: Path) -> Path:
    """``content`` copied into an agent's images directory (the only files its loader may load)."""
    dst = images_dir / content.name
    if not dst.exists():
        shutil.copyfile(content, dst)
    return dst


def runnable(cluster, name: str) -> list[str]:
    """Agents whose copy of the VM is a running QEMU (asked over QMP, not our records)."""
    out = []
    for m in cluster.members.values():
        vm = m.agent.vms.get(name) if m.agent else None
        if not isinstance(vm, QemuVM) or vm.state != "running":
            continue
        try:
            if vm.qemu_status() == "running":
                out.append(m.name)
        except HypervisorError:  # being torn down right now: not runnable
            pass
    return out


async def settle_one_copy(cluster, name: str, where: str, content: Path) -> None:
    """Exactly one QEMU of the VM exists on the host, it runs, on ``where``, and holds the content."""
    other = "b" if where == "a" else "a"
    with trio.fail_after(20):  # in-doubt recovery and the other side's clean-up settle
        while True:
            copies = [m.agent.vms[name] for m in cluster.members.values() if m.agent and name in m.agent.vms]
            alive = qemu_processes(copies[0].vm_id) if copies else []  # every copy has the VM's identity
            if len(alive) == 1 and runnable(cluster, name) == [where] and name not in cluster[other].vms:
                break
            await trio.sleep(0.05)
    vm = cluster[where].vms[name]
    assert vm.read_ram(LOAD_ADDR, CONTENT) == content.read_bytes()


# --------------------------------------------------------------------------
# A whole migration


async def test_qemu_vm_migrates_with_equal_memory(cluster, content):
    a, b = cluster["a"], cluster["b"]
    vm = new_vm(a, content)
    src_pid = vm.pid
    assert vm.read_ram(LOAD_ADDR, CONTENT) == content.read_bytes()
    await trio.sleep(0.5)  # let the guest (its BIOS) run and write its RAM before the copy
    res = await a.outgoing.migrate(vm.name, cluster.addr("b"), MigrationParams(verify_digest=True))
    assert res.ok, res.error
    d = res.as_dict()
    # Both agents digested all guest RAM (its RAM file) while paused, and COMMIT
    # went only because the digests were equal.
    assert d["digest_verified"] and len(d["digest"]) == 64
    hv = d["hypervisor"]
    assert hv["status"] == "completed" and hv["rounds"] >= 1 and d["rounds"] == hv["rounds"]
    assert hv["stream_bytes"] > CONTENT and d["bytes"] > hv["stream_bytes"]
    assert d["downtime_ms"] > 0 and d["downtime_ms"] >= hv["downtime_ms"] >= 0  # ours runs until DONE (QEMU: whole ms)
    phases = d["downtime_phases_ms"]  # where the pause went, as the source saw it
    assert list(phases) == ["stop-and-copy", "finish", "destination-prepare", "hand-off", "commit"]
    assert abs(sum(phases.values()) - d["downtime_ms"]) <= 0.5
    dest = d["destination_phases_ms"]  # the destination's own account: its QEMU loading the end, PREPARE, ...
    assert list(dest) == ["load", "prepare", "commit", "activate"] and dest["load"] > 0 and dest["activate"] > 0
    assert dest["load"] + dest["prepare"] <= phases["destination-prepare"] + 1  # inside it, as both clocks see it
    moved = b.vms[vm.name]
    assert isinstance(moved, QemuVM) and moved.state == "running" and moved.qemu_status() == "running"
    assert moved.read_ram(LOAD_ADDR, CONTENT) == content.read_bytes()
    assert vm.name not in a.vms and qemu_processes(vm.vm_id) == [moved.pid] and src_pid != moved.pid
    # And back again, by the same rules.
    res = await b.outgoing.migrate(vm.name, cluster.addr("a"), MigrationParams())
    assert res.ok, res.error
    assert res.as_dict()["channels"] == 1
    await settle_one_copy(cluster, vm.name, "a", content)


@pytest.mark.parametrize("channels", [2, 4])
async def test_qemu_vm_migrates_on_more_channels(cluster, content, channels, monkeypatch):
    """QEMU's multifd (proto 7.8): its main stream on the migration's session and each
    multifd channel on a DATA session; digests equal, one copy, the content there;
    asked through the control API, as `palm migrate --channels N` asks.  Each session's
    socket queues are bounded on both sides (what they hold when QEMU pauses is downtime)."""
    from palm_net.migration import runner

    bounded: list[object] = []
    real = runner.bound_queues
    monkeypatch.setattr(runner, "bound_queues", lambda stream: (bounded.append(stream), real(stream)))
    a, b = cluster["a"], cluster["b"]
    vm = new_vm(a, content)
    await trio.sleep(0.5)  # the guest's BIOS writes its RAM first
    d = await trio.to_thread.run_sync(lambda: control_request(
        str(cluster.members["a"].config.control), "migrate",
        {"name": vm.name, "to": cluster.addr("b"), "channels": channels, "verify_digest": True}, timeout=120))
    assert d["ok"], d
    assert d["channels"] == channels and d["digest_verified"]
    assert len(bounded) == len(set(map(id, bounded))) == 2 * channels  # each session, at each end
    hv = d["hypervisor"]
    assert hv["status"] == "completed" and hv["stream_bytes"] > CONTENT
    moved = b.vms[vm.name]
    assert isinstance(moved, QemuVM) and moved.qemu_status() == "running"
    assert moved.read_ram(LOAD_ADDR, CONTENT) == content.read_bytes()
    assert vm.name not in a.vms and qemu_processes(vm.vm_id) == [moved.pid]
    # Back on one channel: the destination QEMU listens as the source says.
    res = await b.outgoing.migrate(vm.name, cluster.addr("a"), MigrationParams())
    assert res.ok, res.error
    await settle_one_copy(cluster, vm.name, "a", content)


@pytest.mark.skipif(qemu_version() < (9, 0), reason="QEMU before 9.0 reads every zero page it is sent, on "
                    "multifd too (bookworm-backports has 10.0; .ci/run installs it)")
async def test_a_qemu_guest_migrates_on_two_channels_by_default_and_its_unwritten_pages_stay_untouched(cluster,
                                                                                                        content):
    """Named no channels, a QEMU guest goes on its main stream and one multifd stream: QEMU
    9.0+ then leaves alone, at the destination, every zero page it is not sent data for,
    and so does the RAM file's helper (it faults pages in only where QEMU would read them
    all).  A 64 MiB guest that wrote its BIOS and 8 MiB arrives with far less than 64 MiB
    of its RAM file cleared; faulted in, all of it would be."""
    a, b = cluster["a"], cluster["b"]
    vm = new_vm(a, content)
    await trio.sleep(0.5)  # the guest's BIOS writes its RAM first
    d = await trio.to_thread.run_sync(lambda: control_request(
        str(cluster.members["a"].config.control), "migrate", {"name": vm.name, "to": cluster.addr("b")},
        timeout=120))
    assert d["ok"], d
    assert d["channels"] == default_channels(2)
    moved = b.vms[vm.name]
    assert isinstance(moved, QemuVM) and moved.qemu_status() == "running"
    assert moved.read_ram(LOAD_ADDR, CONTENT) == content.read_bytes()
    fd = os.open(moved.dir / GUEST_RAM, os.O_RDONLY)
    try:
        assert CONTENT <= data_bytes(fd) < MEM // 2
    finally:
        os.close(fd)


async def test_stream_never_carries_the_content_in_clear(cluster, content):
    """QEMU's stream holds guest memory in plaintext; on the wire it is sealed."""
    a = cluster["a"]
    vm = new_vm(a, content)
    needle = content.read_bytes()[4096 * 100 : 4096 * 100 + 64]
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    assert (await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams())).ok
    wire = b"".join(f for (c, d, _), f in proxy.seen.items() if d == "c2s")
    assert len(wire) > CONTENT and needle not in wire


# --------------------------------------------------------------------------
# A cut connection and a bit flip at each phase: exactly one runnable QEMU


def frame_len(mtype: str, seq: int, body: dict) -> int:
    """A record's length on the wire: u32 prefix + message + AEAD tag."""
    return 4 + len(raw_message(mtype, bytes(16), seq, body)) + 16


# c2s frames 0-2 are the handshake, 3 BEGIN (seq 0), then STREAM messages each
# with its data records, STREAM_END, COMPLETE, COMMIT; the last three are found
# by their exact length (for any size of the sequence number and counts they
# may carry) at their index (a data record of that very length would be hit
# instead: the same phase, and just as fatal).
SEQS = (1, 200, 70000)  # one of each msgpack integer size a sequence number may take here


def _lengths(mtype: str, bodies: list[dict]) -> set[int]:
    return {frame_len(mtype, seq, body) for seq in SEQS for body in bodies}


def is_stream_end(i: int, f: bytes) -> bool:
    return i > 4 and len(f) in _lengths("STREAM_END", [{"bytes": 1 << 24}])


def is_complete(i: int, f: bytes) -> bool:
    return i > 5 and len(f) in _lengths("COMPLETE", [{"records": i - 3, "page_records": n, "transcript": bytes(32)}
                                                     for n in SEQS])


def is_commit(i: int, f: bytes) -> bool:
    return i > 6 and len(f) in _lengths("COMMIT", [{}])


def c2s(action: str, frame: int = 0, match=None, bit: int = 20) -> Rule:
    return Rule("c2s", frame, action, bit=bit, match=match)


QPHASES = [
    ("handshake msg3 flip", Rule("c2s", 2, "flip", bit=40), "a"),
    ("handshake msg2 flip", Rule("s2c", 0, "flip", bit=100), "a"),
    ("BEGIN flip", c2s("flip", 3), "a"),
    ("BEGIN cut", c2s("cut", 3), "a"),
    ("ACCEPT flip", Rule("s2c", 1, "flip", bit=30), "a"),
    ("ACCEPT cut", Rule("s2c", 1, "cut"), "a"),
    ("first stream record flip", c2s("flip", 4, bit=5000), "a"),
    ("mid-stream flip", c2s("flip", 40, bit=9000), "a"),
    ("mid-stream cut", c2s("cut", 40), "a"),
    ("stream end flip", c2s("flip", match=is_stream_end), "a"),
    ("stream end cut", c2s("cut", match=is_stream_end), "a"),
    ("completion flip", c2s("flip", match=is_complete), "a"),
    ("completion cut", c2s("cut", match=is_complete), "a"),
    ("READY flip", Rule("s2c", 2, "flip", bit=30), "a"),
    ("READY cut", Rule("s2c", 2, "cut"), "a"),
    ("COMMIT flip", c2s("flip", match=is_commit, bit=9), "a"),
    ("COMMIT cut", c2s("cut", match=is_commit), "a"),
    ("DONE flip", Rule("s2c", 3, "flip", bit=30), "b"),
    ("DONE cut", Rule("s2c", 3, "cut"), "b"),
]


@pytest.mark.parametrize(("phase", "rule", "where"), QPHASES, ids=[p[0] for p in QPHASES])
async def test_qemu_fault_at_each_phase(cluster, content, phase, rule, where):
    a = cluster["a"]
    vm = new_vm(a, content)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [rule])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams())
    assert proxy.log.events, f"{phase}: the fault was not injected"
    assert not res.ok or res.extra.get("recovered") or where == "b"
    await settle_one_copy(cluster, vm.name, where, content)


async def test_qemu_phase_layout_assumed_above(cluster, content):
    """Without faults: the end of the stream, COMPLETE and COMMIT are where the predicates look."""
    a = cluster["a"]
    vm = new_vm(a, content)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    assert (await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams())).ok
    n = proxy.log.frames[(0, "c2s")]
    frames = [proxy.seen[(0, "c2s", i)] for i in range(n)]
    assert n > 44 and proxy.log.frames[(0, "s2c")] == 4
    assert is_commit(n - 1, frames[-1]) and is_complete(n - 2, frames[-2]) and is_stream_end(n - 3, frames[-3])
    assert not any(is_stream_end(i, frames[i]) for i in range(4, n - 3))


async def test_cancel_mid_stream_resumes_the_source(cluster, content):
    """An operator cancel while QEMU streams: QEMU's migration is cancelled,
    the guest runs on at the source, the destination's QEMU is quit."""
    a = cluster["a"]
    vm = new_vm(a, content)

    def cancel() -> None:
        (mid,) = [lm.mid for lm in a.outgoing.live.values() if lm.result is None]
        a.outgoing.cancel(mid.hex())

    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [Rule("c2s", 20, "call", callback=cancel)])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams())
    assert res.status == "cancelled" and res.runs_on == "source"
    await settle_one_copy(cluster, vm.name, "a", content)


@pytest.mark.parametrize("channels", [1, 3])
async def test_a_cancel_mid_stream_reaches_the_destination_as_abort(cluster, content, channels):
    """An operator's cancel while QEMU streams, on one channel or on QEMU's multifd (whose
    streams go quiet whenever QEMU syncs them: a pump waiting on a quiet stream held the
    cancel past its grace, and the destination saw the session cut): the streams end at
    once, ABORT reaches the destination, the guest runs on at the source."""
    a, b = cluster["a"], cluster["b"]
    vm = new_vm(a, content)
    mids = []

    def cancel() -> None:
        (mid,) = [lm.mid for lm in a.outgoing.live.values() if lm.result is None]
        mids.append(mid)
        a.outgoing.cancel(mid.hex())

    # On multifd the main stream may carry fewer than 20 records in all: the cancel falls
    # in a data session's (the bulk), well before the handoff.
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port),
                       [Rule("c2s", 20, "call", callback=cancel, connection=0 if channels == 1 else 1)])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams(channels=channels))
    assert res.status == "cancelled" and res.runs_on == "source"
    with trio.fail_after(10):
        while (row := b.store.get(mids[0])) is None or row.state != "aborted":
            await trio.sleep(0.05)
    assert row.error == "cancelled at the source; the VM stays there", row.error
    await settle_one_copy(cluster, vm.name, "a", content)


# --------------------------------------------------------------------------
# An unauthorised destination receives nothing


@pytest.mark.parametrize("why", ["self-made authority", "measurement not allowed"])
async def test_unauthorised_destination_receives_nothing(nursery, content, why):
    c = LocalCluster(("a", "b"))
    c.nursery = nursery
    b = c.members["b"]
    ident = AgentIdentity.load(b.dir)
    if why == "self-made authority":
        rogue = Authority.generate()
        rogue.save(c.root / "rogue")
        cert = rogue.issue("b", ident.static.public, ident.sign_pub, c.measurement)
        b.config.ca_pub = c.root / "rogue" / "ca.pub"
    else:
        cert = c.authority.issue("b", ident.static.public, ident.sign_pub, bytes(32))
    (b.dir / CERT_FILE).write_bytes(cert.encode())
    try:
        a = await c.start("a")
        await c.start("b")
        vm = new_vm(a, content)
        proxy = FaultProxy(("127.0.0.1", b.port))
        await nursery.start(proxy.serve)
        res = await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams())
        assert not res.ok and res.phase == "handshake" and res.runs_on == "source"
        # Nothing beyond the first two handshake frames left the source: no
        # record, so no BEGIN and no byte of QEMU's stream.
        assert proxy.log.frames[(0, "c2s")] <= 2
        assert c["b"].vms == {} and c["b"].store.list() == []
        assert qemu_processes(vm.vm_id) == [vm.pid] and vm.qemu_status() == "running"
    finally:
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


# --------------------------------------------------------------------------
# What a destination accepts from the wire


def test_qemu_arguments_that_cannot_migrate_are_refused():
    wire, local = split_args(["-device", "virtio-rng-pci", "-device", "loader,file=/x,addr=0x1000",
                              "-cpu", "qemu64"])
    assert wire == ["-device", "virtio-rng-pci", "-cpu", "qemu64"] and local[0] == "-device"
    with pytest.raises(QemuError, match="host resource"):
        split_args(["-netdev", "user,id=n0"])
    with pytest.raises(QemuError, match="set by palm_net"):
        split_args(["-smp", "4"])
    for bad in (["-drive", "file=/etc/shadow"], ["-chardev", "file,id=x,path=/tmp/x"], ["-m", "1G"],
                ["-device", "virtio-serial,chardev=x"], ["-cpu", "a/b"], ["-device"]):
        with pytest.raises(QemuError):
            split_args(bad)
    spec = QemuSpec(64, 1, "pc", "tcg", ("-device", "loader,file=/etc/shadow"))
    with pytest.raises(QemuError, match="source-only"):
        QemuSpec.decode(spec.encode())
    ok = QemuSpec(64, 2, "pc", "kvm", ("-cpu", "qemu64"))
    assert QemuSpec.decode(ok.encode()) == ok


async def test_destination_refuses_a_spec_that_disagrees_with_begin(cluster):
    """BEGIN's page count reserves memory; a spec asking QEMU for more is refused."""
    from palm_net.testing.hostile import HostilePeer

    b = cluster["b"]
    evil = HostilePeer(cluster.authority, cluster.measurement)
    ch, _, reply = await evil.try_begin(cluster.members["b"].port, name="big", pages=16, backend="qemu",
                                        spec=QemuSpec(4096, 1, "pc", "tcg").encode())
    await ch.aclose()
    assert reply.type == "ABORT" and reply.body.code == "backend"
    assert "big" not in b.vms and b.incoming.admission.sessions == 0


# --------------------------------------------------------------------------
# --verify-digest on a guest with the defaults (KVM, SeaBIOS, kvmclock)


async def test_default_guest_digest_leaves_out_exactly_the_kvmclock_areas(cluster, monkeypatch):
    """A guest started with the defaults uses kvmclock under KVM; the destination's
    kernel rewrites its pvclock structures when QEMU loads the CPU state.  Both
    agents find those structures in the stream's CPU state and leave exactly
    them out: the check passes, and RAM is byte-equal everywhere else.  Each side
    looks for them only when a digest needs them: a migration without
    --verify-digest searches the stream's end on neither side (4-5 ms of the
    pause on the source, 3-7 on the destination)."""
    from palm_net.hypervisor.qemu import StreamTail

    a, b = cluster["a"], cluster["b"]
    seen: list[tuple[str, bytes, list[tuple[int, int, str]]]] = []
    digest = QemuVM.digest
    searches: list[int] = []
    clock_areas = StreamTail.clock_areas

    def spy(self, ranges=None):
        out = digest(self, ranges)
        if ranges is None:  # the migration's digests, both sides, while paused
            seen.append((self.dir.parent.name, (self.dir / "guest.ram").read_bytes(), list(self.digest_excluded)))
        return out

    def counted(self):
        searches.append(1)
        return clock_areas(self)

    monkeypatch.setattr(QemuVM, "digest", spy)
    monkeypatch.setattr(StreamTail, "clock_areas", counted)
    vm = a.registry.create_qemu("q" + uuid.uuid4().hex[:10], MEM, [])  # no -cpu: kvmclock as QEMU defaults it
    await trio.sleep(1.5)  # SeaBIOS turns kvmclock on after about half a second
    res = await a.outgoing.migrate(vm.name, cluster.addr("b"), MigrationParams(verify_digest=True))
    assert res.ok, res.error
    d = res.as_dict()
    assert d["digest_verified"]
    (src, src_ram, src_excl), (dst, dst_ram, dst_excl) = sorted(seen, key=lambda x: x[0] != a.memory_dir.name)
    assert src == a.memory_dir.name and dst == b.memory_dir.name
    assert src_excl == dst_excl and len(src_ram) == len(dst_ram) == MEM
    diff = [i for i in range(0, MEM, 4096) if src_ram[i : i + 4096] != dst_ram[i : i + 4096]]
    holes = [(addr, addr + size) for addr, size, _ in src_excl]  # below 3.5 GiB: the RAM file's offsets
    for page in diff:
        for i in range(page, page + 4096):
            if src_ram[i] != dst_ram[i]:
                assert any(lo <= i < hi for lo, hi in holes), f"byte {i:#x} differs outside {src_excl}"
    if vm.spec.accel == "kvm":
        assert any("kvmclock of vCPU 0" in w for _, _, w in src_excl), src_excl
        assert d["hypervisor"]["digest_excluded"] == [f"{w} {x:#x}+{n}" for x, n, w in src_excl]
    else:  # TCG has no kvmclock: nothing left out, RAM equal
        assert src_excl == [] and diff == []
    assert len(searches) == 2  # one a side
    back = await b.outgoing.migrate(vm.name, cluster.addr("a"), MigrationParams())
    assert back.ok, back.error
    assert len(searches) == 2  # no search without a digest


def test_kvmclock_areas_refuse_what_is_not_qemus_layout():
    """The parser trusts the stream's end only if every section lies exactly where QEMU's
    own description of it says (header, subsections, footer, then EOF)."""
    import json

    from palm_net.hypervisor.qemu import kvmclock_areas

    assert kvmclock_areas(b"") is None
    assert kvmclock_areas(b"\x00\x06\x00\x00\x00\x02{}") is None  # no devices
    cpu = {"name": "cpu", "instance_id": 0, "version": 12,
           "fields": [{"name": "env.regs", "array_len": 2, "type": "uint64", "size": 8},
                      {"name": "env.system_time_msr", "type": "uint64", "size": 8},
                      {"name": "env.wall_clock_msr", "type": "uint64", "size": 8}],
           "subsections": [{"vmsd_name": "cpu/tsc_khz", "version": 1,
                            "fields": [{"name": "env.tsc_khz", "type": "int64", "size": 8}]}]}
    desc = json.dumps({"page_size": 4096, "devices": [cpu]}).encode()
    section = (b"\x04\x00\x00\x00\x03\x03cpu\x00\x00\x00\x00\x00\x00\x00\x0c" + bytes(16)
               + (0xE8C21).to_bytes(8, "big") + (0x9000).to_bytes(8, "big")
               + b"\x05\x0bcpu/tsc_khz\x00\x00\x00\x01" + bytes(8) + b"\x7e\x00\x00\x00\x03")
    tail = b"RAM..." + section + b"\x00\x06" + len(desc).to_bytes(4, "big") + desc
    assert kvmclock_areas(tail) == [(0x9000, 12, "kvmclock wall clock"), (0xE8C20, 32, "kvmclock of vCPU 0")]
    assert kvmclock_areas(tail.replace(b"\x0c" + bytes(16), b"\x0b" + bytes(16))) is None  # another version
    assert kvmclock_areas(tail.replace(b"\x7e", b"\x7f")) is None  # no footer where it must be
    assert kvmclock_areas(tail[:-1]) is None  # the description cut short
    off = (0xE8C20).to_bytes(8, "big")  # the enable bit clear: the guest does not use it
    assert kvmclock_areas(tail.replace((0xE8C21).to_bytes(8, "big"), off)) == [(0x9000, 12, "kvmclock wall clock")]


# --------------------------------------------------------------------------
# More channels (QEMU's multifd over DATA sessions): every failure fails closed


async def test_a_destination_qemu_that_cannot_listen_for_its_channels_leaves_the_vm_on_the_source(cluster, content):
    """The destination fails as its QEMU would listen for the multifd streams: the source,
    waiting for its own QEMU's connections, is told at once and resumes (no wait for
    a stream timeout)."""
    a = cluster["a"]
    vm = new_vm(a, content)

    def inject(step: str) -> None:
        if step == "destination.ListenStream":
            raise QemuError("injected: QEMU refused migrate-incoming")

    old = faults.install(inject)
    try:
        t0 = trio.current_time()
        res = await a.outgoing.migrate(vm.name, cluster.addr("b"), MigrationParams(channels=3))
        took = trio.current_time() - t0
    finally:
        faults.install(old)
    assert not res.ok and res.error is not None and "hypervisor" in res.error
    assert took < STREAM_TIMEOUT / 2, took
    await settle_one_copy(cluster, vm.name, "a", content)


async def test_an_incoming_qemu_whose_memory_cannot_be_reserved_leaves_the_vm_on_the_source(
        cluster, content, monkeypatch):
    """The destination's RAM file is reserved beside the stream (not before ACCEPT): a file
    system that fills meanwhile fails the migration before PREPARE, named as no room,
    the VM runs on the source only and nothing is left at the destination."""
    from palm_net import hostfs
    from palm_net.hypervisor import reserver

    real, refused = hostfs.reserve, []

    def reserve(fd: int, size: int, what: str, offset: int = 0) -> None:
        if what == "the guest's memory" and offset >= MEM // 2:
            refused.append(offset)
            raise hostfs.UnsafePathError(f"no room for {what}: the file system is full")
        real(fd, size, what, offset)

    monkeypatch.setattr(reserver, "reserve", reserve)
    a = cluster["a"]
    vm = new_vm(a, content)
    res = await a.outgoing.migrate(vm.name, cluster.addr("b"), MigrationParams())
    assert refused, "the destination reserved nothing past half the guest's memory"
    assert not res.ok and res.error is not None and res.error.startswith("no-space"), res.error
    await settle_one_copy(cluster, vm.name, "a", content)
    assert not cluster["b"].registry.dir_of(vm.name).exists()


def test_an_incoming_qemu_that_does_not_start_leaves_no_helper_reserving_its_memory(tmp_path):
    """A destination QEMU that fails to start (a machine type a peer's BEGIN named and this
    QEMU does not know): its RAM file's helper is stopped with it, not left reserving and
    faulting in a deleted file."""
    import threading

    from palm_net.hypervisor.qemu import Confinement

    (tmp_path / "run").mkdir(mode=0o700)
    spec = QemuSpec(memory_mib=512, vcpus=1, machine="no-such-machine", accel="tcg")
    with pytest.raises(QemuError):
        QemuVM.create_incoming(tmp_path / "vm", tmp_path / "run", "vm", os.urandom(16), spec,
                               confine=Confinement(uids=None, allow_unconfined=True))
    assert not (tmp_path / "vm").exists()
    assert not [t for t in threading.enumerate() if t.name == "reserve-vm"]


@pytest.mark.parametrize("action", ["flip", "cut"])
async def test_a_data_session_tampered_or_cut_mid_stream_fails_closed(cluster, content, action):
    """A multifd channel's DATA session (connection 1 through the proxy) altered or cut
    after its first STREAM records: the migration fails, the VM runs on the source only."""
    a = cluster["a"]
    vm = new_vm(a, content)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [Rule("c2s", 12, action, connection=1, bit=7000)])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate(vm.name, f"127.0.0.1:{proxy.port}", MigrationParams(channels=2))
    assert proxy.log.events, "the fault was not injected"
    assert not res.ok
    await settle_one_copy(cluster, vm.name, "a", content)


def test_an_incoming_qemu_deaf_to_qmp_is_scrubbed_at_once(tmp_path):
    """An incoming QEMU never ran: nothing of it is kept, so it is killed at once. One whose
    multifd load was cut may wait in QEMU's multifd sync for good, deaf to QMP (here: stopped),
    and its scrub waited for QMP's quit, then for the process, before it killed it."""
    import signal
    import time

    run_parent = tmp_path / "run"
    run_parent.mkdir(mode=0o700)
    vm = QemuVM.create_incoming(tmp_path / "vm", run_parent, "deaf", os.urandom(16), QemuSpec(64, 1, "pc", "tcg"))
    pid = vm.pid
    assert pid is not None and qemu_processes(vm.vm_id) == [pid]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    vm.scrub()
    assert time.monotonic() - t0 < 4 and qemu_processes(vm.vm_id) == []
