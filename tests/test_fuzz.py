"""hypothesis state machines: the handshake and the migration protocol under random faults.

The migration machine runs the real source and destination engines over the
real record layer, with a wire the test controls: messages are delivered,
dropped, duplicated, swapped, bit-flipped or truncated in random
interleavings with guest writes and destination restarts.  The model it is
checked against is small: the destination may only ever become READY if it
received exactly the records the source sent, in order, and then its memory
equals the source's at pause; after any fault on a delivered record it must
end aborted, with its incoming VM scrubbed.
"""

from __future__ import annotations

import os
import shutil

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from palm_net.channel.handshake import AttestedHandshake
from palm_net.channel.records import RecordReceiver, RecordSender
from palm_net.channel.transport import Record
from palm_net.crypto.noise import AESGCM, CipherState
from palm_net.errors import ErrorCode, PalmError, RemoteProtocolError
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.qemu import HOST_OPTIONS, OWN_OPTIONS, QemuError, QemuSpec, split_args
from palm_net.migration.effects import Send, Transcript
from palm_net.migration.handoff import HandoffState, HandoffStore
from palm_net.migration.params import MigrationParams
from palm_net.migration.source import SourceEngine
from palm_net.testing import scratch
from palm_net.testing.engines import DestinationDriver, source_stream
from palm_net.wire.messages import Begin
from tests.conftest import FUZZ_COUNTS, Pki

KEY = bytes(range(32))


# --------------------------------------------------------------------------
# handshake


class HandshakeMachine(RuleBasedStateMachine):
    """Two handshake drivers; flights may be tampered, dropped or duplicated."""

    def __init__(self) -> None:
        super().__init__()
        pki = Pki()
        self.init = AttestedHandshake(pki.config("src"), True)
        self.resp = AttestedHandshake(pki.config("dst"), False, purpose=None)
        self.to_resp = [self.init.initiate()]
        self.to_init: list[bytes] = []
        self.failed: set[str] = set()
        FUZZ_COUNTS["handshake"] += 1

    def _deliver(self, side: str, data: bytes) -> None:
        target = self.resp if side == "resp" else self.init
        if side in self.failed or target.complete:
            return  # after completion bytes belong to the record layer, not the handshake
        try:
            out = target.receive_data(data)
        except PalmError:
            self.failed.add(side)
            return
        if out:
            (self.to_init if side == "resp" else self.to_resp).append(out)

    @precondition(lambda self: self.to_resp)
    @rule()
    def deliver_to_responder(self) -> None:
        self._deliver("resp", self.to_resp.pop(0))

    @precondition(lambda self: self.to_init)
    @rule()
    def deliver_to_initiator(self) -> None:
        self._deliver("init", self.to_init.pop(0))

    @precondition(lambda self: self.to_resp or self.to_init)
    @rule(data=st.data(), kind=st.sampled_from(["flip", "drop", "duplicate", "truncate"]))
    def tamper(self, data, kind) -> None:
        q = self.to_resp if self.to_resp else self.to_init
        msg = q[0]
        if not msg and kind in ("flip", "truncate"):
            kind = "drop"
        if kind == "flip":
            pos = data.draw(st.integers(0, len(msg) - 1))
            q[0] = msg[:pos] + bytes([msg[pos] ^ (1 << data.draw(st.integers(0, 7)))]) + msg[pos + 1 :]
        elif kind == "drop":
            q.pop(0)
        elif kind == "duplicate":
            q.insert(0, msg)
        else:
            q[0] = msg[: data.draw(st.integers(0, len(msg) - 1))]

    @rule()
    def observe(self) -> None:
        """Always possible: lets a run end in any state (even with nothing in flight)."""
        assert len(self.failed) <= 2

    @invariant()
    def never_disagree(self) -> None:
        """Whatever was tampered with: if both sides complete, they agree on the
        transcript and keys (a flipped byte can never be accepted silently)."""
        a, b = self.init.result, self.resp.result
        if a and b:
            assert a.handshake_hash == b.handshake_hash
            assert a.sender.cs.k == b.receiver.cs.k and a.receiver.cs.k == b.sender.cs.k
        for side in self.failed:
            assert (self.init if side == "init" else self.resp).result is None


TestHandshakeMachine = HandshakeMachine.TestCase
TestHandshakeMachine.settings = settings(max_examples=60, stateful_step_count=12, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# migration protocol


class MigrationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = scratch.mkdtemp("palm-fuzz-")
        FUZZ_COUNTS["migration"] += 1

    @initialize(protected=st.booleans(), seed=st.integers(0, 1000))
    def setup(self, protected, seed) -> None:
        self.src = ModelVM.create(self.dir / "src", "vm", 256, KEY, protected_processes=1 if protected else 0,
                                  protected_pages=32 if protected else 0, seed=seed, fill="random")
        self.store = HandoffStore(self.dir / "dst.db")
        self.eng = SourceEngine(os.urandom(16), self.src.info, MigrationParams(max_rounds=3, downtime_limit=1e-9))
        self.tx = RecordSender(CipherState(AESGCM, KEY))
        self.rx = RecordReceiver(CipherState(AESGCM, KEY))
        self.dest = self._new_destination()
        self.plan = self._messages()
        self.wire: list[bytes] = []
        self.sent = 0  # records the source emitted
        self.dead = False  # destination session over (error or restart)
        self.digest_at_pause: str | None = None

    def _new_destination(self) -> DestinationDriver:
        d = self.dir

        def make_vm(mid: bytes, b: Begin) -> ModelVM:
            return ModelVM.create_incoming(d / f"dst-{os.urandom(4).hex()}", b.vm, b.vm_id, b.pages, b.vcpus, KEY)

        return DestinationDriver(self.store, make_vm)

    def _messages(self):
        yield from source_stream(self.src, self.eng, 3)
        self.digest_at_pause = self.src.digest()
        effects = self.eng.on_result(Transcript(self.tx.count, self.tx.transcript), 1.0)
        yield next(e.data for e in effects if isinstance(e, Send))  # COMPLETE

    def teardown(self) -> None:
        with_suppressed = (self.src, getattr(self.dest, "vm", None))
        for vm in with_suppressed:
            if vm is not None:
                vm.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @precondition(lambda self: self.plan is not None)
    @rule()
    def emit(self) -> None:
        msg = next(self.plan, None)
        if msg is None:
            self.plan = None
            return
        self.wire.append(self.tx.seal(msg))
        self.sent += 1

    @precondition(lambda self: self.plan is not None and self.src.state == "running")
    @rule(gfn=st.integers(0, 200), data=st.binary(min_size=1, max_size=16))
    def guest_write(self, gfn, data) -> None:
        self.src.guest_write(gfn, data)

    @precondition(lambda self: self.wire and not self.dead)
    @rule()
    def deliver(self) -> None:
        rec = self.wire.pop(0)
        before, count = self.rx.transcript, self.rx.count
        try:
            self.rx.receive_data(rec)
            pt = self.rx.next_record()
            if pt is None:
                return  # a truncated frame waits for bytes that never come
            self.dest.perform(self.dest.engine.on_record(Record(pt, count, before)))
        except PalmError as exc:
            self.dest.fail(exc)
            self.dead = True

    @precondition(lambda self: self.wire)
    @rule(kind=st.sampled_from(["drop", "duplicate", "swap", "flip", "truncate"]), data=st.data())
    def fault(self, kind, data) -> None:
        w = self.wire
        if not w[0] and kind in ("flip", "truncate"):
            kind = "drop"
        if kind == "drop":
            w.pop(0)
        elif kind == "duplicate":
            w.insert(0, w[0])
        elif kind == "swap" and len(w) > 1:
            w[0], w[1] = w[1], w[0]
        elif kind == "flip":
            pos = data.draw(st.integers(0, len(w[0]) - 1))
            w[0] = w[0][:pos] + bytes([w[0][pos] ^ 0x40]) + w[0][pos + 1 :]
        elif kind == "truncate":
            w[0] = w[0][: data.draw(st.integers(0, len(w[0]) - 1))]

    @precondition(lambda self: not self.dead)
    @rule()
    def restart_destination(self) -> None:
        # An agent restart aborts whatever was receiving (proto 7.5); the session is gone.
        self.dest.fail(RemoteProtocolError(ErrorCode.CLOSED, "restart"))
        self.dead = True

    @rule()
    def observe(self) -> None:
        """Always possible: a run may end in any state."""
        assert self.sent >= self.rx.count or self.dead

    @precondition(lambda self: not self.dead and self.dest.engine.outcome is None)
    @rule()
    def finish_without_faults(self) -> None:
        """Runs the rest of the stream untouched (faults before it still count)."""
        while self.plan is not None:
            self.emit()
        while self.wire and not self.dead:
            self.deliver()
        if self.dest.engine.outcome == "prepared":
            FUZZ_COUNTS["migration-ready"] += 1

    @invariant()
    def ready_only_for_an_exact_stream(self) -> None:
        if self.dest.engine.outcome == "prepared":
            # exactly the records the source sent, in order, each once
            assert self.rx.count == self.sent and self.rx.transcript == self.tx.transcript
            assert self.digest_at_pause is not None  # COMPLETE was the last record sent
            assert self.dest.vm is not None and self.dest.vm.digest() == self.digest_at_pause
            assert self.store.get(self.dest.engine.mid).state is HandoffState.PREPARED
        if self.dead:
            assert self.dest.engine.outcome == "aborted"
            assert self.dest.vm is None  # scrubbed


TestMigrationMachine = MigrationMachine.TestCase
TestMigrationMachine.settings = settings(max_examples=40, stateful_step_count=60, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.filter_too_much])


# --------------------------------------------------------------------------
# the hypervisor's parsers of wire blobs (keys, CPU state, protected context)

import msgpack  # noqa: E402
from hypothesis import given  # noqa: E402

from palm_net.hypervisor.model import VmError  # noqa: E402
from palm_net.hypervisor.protection import ProtectionIntegrityError  # noqa: E402

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
        ["v", "cipher", "processes", "pid", "first", "count", "key", "threads", "metadata", "cpu", "regs",
         "rip", "workload", "seed", "policy"]), c, max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=_values, which=st.sampled_from(["keys", "cpu", "context"]))
def test_fuzz_blob_parsers_only_refuse_cleanly(blob, which):
    FUZZ_COUNTS["blob-parsers"] += 1
    d = scratch.mkdtemp("palm-fz-")
    try:
        vm = ModelVM.create_incoming(d / "vm", "vm", bytes(16), 64, 1, KEY)
        data = msgpack.packb(blob)
        try:
            {"keys": vm.import_keys, "cpu": vm.import_cpu_state, "context": vm.import_protection}[which](data)
        except (VmError, ProtectionIntegrityError):
            pass
        vm.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


_spec_values = st.fixed_dictionaries({
    "memory_mib": st.one_of(st.integers(-2, 2**21), st.text(max_size=3)),
    "vcpus": st.one_of(st.integers(-1, 100), st.none()),
    "machine": st.sampled_from(["pc", "q35", "virt", ""]),
    "accel": st.sampled_from(["kvm", "tcg", "hvf", 1]),
    "args": st.lists(st.one_of(st.sampled_from(["-device", "-cpu", "-rtc", "-drive", "-chardev", "-m",
                                                "loader,file=/x", "virtio-rng-pci", "edu", "qemu64", "a/b",
                                                "virtio-serial-pci,chardev=c"]), st.text(max_size=20)),
                     max_size=40),
}, optional={"extra": _values})


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(_spec_values, _values), raw=st.booleans(), data=st.binary(max_size=64))
def test_fuzz_qemu_spec_parser_only_refuses_cleanly(spec, raw, data):
    """A QEMU spec from the wire decides what the destination starts: anything
    it accepts must re-encode to itself and name only migratable arguments."""
    FUZZ_COUNTS["blob-parsers"] += 1
    blob = data if raw else msgpack.packb(spec)
    try:
        parsed = QemuSpec.decode(blob)
    except QemuError:
        return
    assert QemuSpec.decode(parsed.encode()) == parsed
    wire, local = split_args(list(parsed.args))
    assert wire == list(parsed.args) and not local
    assert all(a not in OWN_OPTIONS | HOST_OPTIONS for a in parsed.args)
