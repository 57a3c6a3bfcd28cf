"""The destination engine on its own, fed record by record (palm_net.testing.engines.DestinationDriver):
an intact stream, each of proto 7's checks tripped on its own, a stream backend's destination, and the
destination's runner answering the first record."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from palm_net.channel.records import Record
from palm_net.errors import ErrorCode, MigrationFailure, RemoteProtocolError
from palm_net.hypervisor.backend import HypervisorError
from palm_net.hypervisor.model import ModelVM
from palm_net.migration.applied import Applied
from palm_net.migration.effects import Aborted, AbortForever, CommitAndActivate, Prepare
from palm_net.migration.handoff import HandoffState, HandoffStore, Peer, check_abort_token
from palm_net.migration.hosts import DestinationHost
from palm_net.migration.params import MigrationParams
from palm_net.testing import scratch
from palm_net.testing.engines import DestinationDriver, Unit, renumber, source_messages, split_data, units
from palm_net.wire import messages
from palm_net.wire.messages import (
    MAX_BLOB,
    Abort,
    Begin,
    Commit,
    Complete,
    Context,
    Keys,
    Message,
    Pages,
    RoundEnd,
    Stream,
    StreamEnd,
)
from palm_net.wire.pages import KIND_NORMAL, KIND_PROTECTED, KIND_ZERO, IncomingPages, PageBatch
from palm_net.wire.protocol import Role, SessionProtocol
from tests.conftest import KEY

# --------------------------------------------------------------------------
# Destination checks, driven message by message (each defence on its own)


def _destination(shm: Path, store: HandoffStore, plain: bool = False) -> DestinationDriver:
    def make_vm(mid: bytes, b: Begin) -> ModelVM:
        return ModelVM.create_incoming(shm / "dst", b.vm, b.vm_id, b.pages, b.vcpus, KEY, migration=mid)

    return DestinationDriver(store, make_vm, plain)


def _source_messages(shm: Path, protected: bool = True) -> tuple[ModelVM, list[bytes]]:
    vm = ModelVM.create(shm / "src", "vm", 512, KEY, protected_processes=1 if protected else 0,
                        protected_pages=128 if protected else 0, seed=5, fill="random")
    _, msgs = source_messages(vm, MigrationParams(max_rounds=2, downtime_limit=1e-9), 1,
                              lambda _: vm.guest_write(3, b"dirty"))  # round 1 has work
    return vm, msgs


def _count(msgs: list[bytes]) -> tuple[int, int]:
    """(records, PAGES messages): what COMPLETE counts."""
    return len(msgs), sum(isinstance(u.body, Pages) for u in units(msgs))


def _feed(dest: DestinationDriver, msgs: list[bytes], claim: tuple[int, int] | None = None,
          transcript: bytes = b"T" * 32) -> list[bytes]:
    """Feeds the messages, then COMPLETE with the counts the source claims (default: true ones)."""
    records, page_records = claim or _count(msgs)
    replies = []
    for m in msgs:
        replies += dest.feed(m)
    complete = messages.encode(Message(messages.decode(msgs[0]).mid, len(units(msgs)),
                                       Complete(records, page_records, transcript)))
    return replies + dest.feed(complete)


def _types(replies: list[bytes]) -> list[str]:
    return [messages.decode(r).type for r in replies]


def test_destination_accepts_an_intact_stream(shm):
    store = HandoffStore(shm / "d.db")
    vm, msgs = _source_messages(shm)
    dest = _destination(shm, store)
    replies = _feed(dest, msgs)
    rounds = sum(isinstance(u.body, RoundEnd) for u in units(msgs))
    assert rounds and _types(replies) == ["ACCEPT"] + ["ROUND_DONE"] * rounds + ["READY"]
    assert dest.engine.outcome == "prepared" and store.get(dest.engine.mid).state is HandoffState.PREPARED
    assert dest.vm is not None and dest.vm.digest() == vm.digest() and not dest.vm.running
    # COMMIT: durable first, then the VM runs here, then DONE
    commit = messages.encode(Message(dest.engine.mid, len(units(msgs)) + 1, Commit()))
    assert _types(dest.feed(commit)) == ["DONE"]
    assert dest.engine.outcome == "committed" and store.get(dest.engine.mid).state is HandoffState.COMMITTED
    assert dest.vm.running


def test_a_protected_context_in_several_chunks_is_put_back_together(shm):
    src = ModelVM.create(shm / "src", "vm", 1024, KEY, protected_processes=128, protected_pages=512, seed=3,
                         fill="random")
    _, msgs = source_messages(src, MigrationParams(max_rounds=1, downtime_limit=1e-9))
    chunks = [u.body for u in units(msgs) if isinstance(u.body, Context)]
    assert len(chunks) >= 2 and [c.index for c in chunks] == list(range(chunks[0].total))
    dest = _destination(shm, HandoffStore(shm / "d.db"))
    assert _types(_feed(dest, msgs))[-1] == "READY"
    assert dest.vm is not None and dest.vm.digest() == src.digest()
    src.close()


def test_a_handoff_message_that_came_in_the_clear_is_refused(shm):
    _, msgs = _source_messages(shm)
    dest = _destination(shm, HandoffStore(shm / "d.db"), plain=False)
    with pytest.raises(RemoteProtocolError) as info:
        dest.feed(msgs[0], authenticated=False)  # BEGIN, unsealed
    assert info.value.code == "unauthenticated"
    assert dest.vm is None


def _alter(msg: Message, **fields: object) -> Message:
    return Message(msg.mid, msg.seq, type(msg.body)(**{**msg.body.fields(), **fields}))


@pytest.mark.parametrize(("tamper", "code"), [
    ("drop", "incomplete"),
    ("duplicate", "incomplete"),
    ("replay-earlier-round", "rollback"),
    ("older-version-of-a-page", "rollback"),
    ("alter-protected-ciphertext", "integrity"),
    ("alter-context", "integrity"),
    ("missing-context-chunk", "out-of-state"),
    ("transcript-differs", "incomplete"),
    ("record-count-differs", "incomplete"),
    ("page-never-sent", "incomplete"),
    ("context-chunk-index-skipped", "sequence"),
    ("context-chunk-past-its-total", "sequence"),
    ("context-larger-than-the-vm-can-need", "oversize"),
    ("context-one-byte-over-the-limit", "oversize"),
    ("context-exactly-at-the-limit", "incomplete"),  # admitted by size; refused later, at COMPLETE
])
def test_destination_refuses_ready_on_tampering(shm, tamper, code):
    """Each of PALM's completeness and freshness checks, tripped on its own."""
    store = HandoffStore(shm / "d.db")
    _, msgs = _source_messages(shm)
    claim = _count(msgs)  # what the source sent and will claim in COMPLETE
    us = units(msgs)
    pages = [i for i, u in enumerate(us) if isinstance(u.body, Pages)]
    transcript = b"T" * 32
    if tamper == "drop":
        del us[pages[1]]
    elif tamper == "duplicate":
        us.insert(pages[1], us[pages[1]])
    elif tamper == "replay-earlier-round":
        us.insert(pages[-1] + 1, us[pages[0]])  # a round-0 message after the stop-and-copy round
    elif tamper == "older-version-of-a-page":
        # The same round, but a protected page's version lower than what was applied: a stale
        # copy (a zero or normal page's version is its round: only a protected one can be older).
        i = next(i for i in pages if KIND_PROTECTED in us[i].body.kinds)
        u = us[i]
        vers = IncomingPages(u.body).vers.copy()
        at = u.body.kinds.index(KIND_PROTECTED)
        assert vers[at] >= 1
        vers[at] -= 1
        us.insert(i + 1, Unit(_alter(u.msg, vers=vers.astype("<u8").tobytes()), u.data))
        claim = (claim[0] + len(u.records()), claim[1] + 1)
    elif tamper == "alter-protected-ciphertext":
        u = next(us[i] for i in pages if KIND_PROTECTED in us[i].body.kinds)
        data_kinds = bytes(k for k in u.body.kinds if k)
        at = data_kinds.index(KIND_PROTECTED) * 4096 + 100  # a byte of the first protected page
        data = bytearray(b"".join(u.data))
        data[at] ^= 0x80
        us[us.index(u)] = Unit(u.msg, split_data(bytes(data)))
    elif tamper == "alter-context":
        i = next(i for i, u in enumerate(us) if isinstance(u.body, Context))
        blob = bytearray(us[i].body.data)
        blob[-1] ^= 0x80  # the last MAC tag
        us[i] = Unit(_alter(us[i].msg, data=bytes(blob)), [])
    elif tamper in ("context-one-byte-over-the-limit", "context-exactly-at-the-limit"):
        # 128 protected pages, 1 process (_source_messages): 28 * 128 + 2048 + 65536 bytes at most
        size = 28 * 128 + 2048 + 65536 + (tamper == "context-one-byte-over-the-limit")
        i = next(i for i, u in enumerate(us) if isinstance(u.body, Context))
        us = [u for u in us if not isinstance(u.body, Context)]
        chunks = [bytes(MAX_BLOB), bytes(size - MAX_BLOB)]
        us[i:i] = [Unit(Message(us[0].msg.mid, 0, Context(k, 2, c)), []) for k, c in enumerate(chunks)]
    elif tamper == "context-larger-than-the-vm-can-need":
        # two whole chunks: more than 28 bytes a protected page + 2 KiB a process + 64 KiB
        i = next(i for i, u in enumerate(us) if isinstance(u.body, Context))
        us = [u for u in us if not isinstance(u.body, Context)]
        us[i:i] = [Unit(Message(us[0].msg.mid, 0, Context(k, 2, bytes(MAX_BLOB))), []) for k in (0, 1)]
    elif tamper.startswith("context-"):
        i = next(i for i, u in enumerate(us) if isinstance(u.body, Context))
        c = us[i].body
        change = {"context-chunk-index-skipped": {"index": c.index + 1},
                  "context-chunk-past-its-total": {"total": c.index}}[tamper]
        us[i] = Unit(_alter(us[i].msg, **change), [])
    elif tamper == "missing-context-chunk":
        us = [u for u in us if not isinstance(u.body, Context)]
    elif tamper == "transcript-differs":
        transcript = b"X" * 32
    elif tamper == "record-count-differs":
        claim = (claim[0] + 1, claim[1])
    elif tamper == "page-never-sent":
        # gfn 0 never arrives, and the counts agree with what was sent: only the
        # every-page-received check can tell.
        first = us[pages[0]]
        p = IncomingPages(first.body)
        k = first.body.kinds
        data = b"".join(first.data)[4096 if k[0] else 0:]
        rest = PageBatch(p.gfns[1:], k[1:], p.vers[1:], data, first.body.tags[16 if k[0] == KIND_PROTECTED else 0:])
        us[pages[0]] = Unit(Message(first.msg.mid, first.msg.seq, rest.message(first.body.round)), split_data(data))
        claim = (claim[0] - len(first.data) + len(us[pages[0]].data), claim[1])
    msgs = renumber(us)
    dest = _destination(shm, store)
    # the peer broke a rule (order, counts, versions: a remote error); a page that fails its MAC is
    # found by the hypervisor as it installs it (the migration fails)
    expected = MigrationFailure if code == "integrity" else RemoteProtocolError
    with pytest.raises(expected) as info:
        _feed(dest, msgs, claim, transcript)
    assert info.value.code == code
    abort = dest.fail(info.value)
    assert dest.engine.outcome == "aborted"
    assert store.get(dest.engine.mid).state is HandoffState.ABORTED
    assert not (shm / "dst").exists()  # everything received was scrubbed
    assert _types(abort) == ["ABORT"] and messages.decode(abort[0]).body.token  # recorded aborted: a token


def test_destination_refuses_plain_for_protected_and_mode_mismatch(shm):
    store = HandoffStore(shm / "d.db")
    _, msgs = _source_messages(shm)
    begin = messages.decode(msgs[0])
    plain_begin = messages.encode(_alter(begin, plain=True))
    dest = _destination(shm, store, plain=True)
    with pytest.raises(MigrationFailure) as info:
        dest.feed(plain_begin)
    assert info.value.code == "plain-refused"
    dest = _destination(shm, HandoffStore(shm / "d2.db"))
    with pytest.raises(RemoteProtocolError, match="mode-mismatch") as info:
        dest.feed(plain_begin)
    assert info.value.code is ErrorCode.MODE_MISMATCH


@pytest.mark.parametrize(("pages", "protected", "processes", "code"), [
    (0, 0, 0, "too-large"), (1, 0, 0, None), (64, 0, 0, None), (65, 0, 0, "too-large"),
    (64, 64, 1, None), (64, 65, 1, "malformed"), (64, 1, 1, None), (64, 1, 2, "malformed"),
])
def test_begin_sizes_are_bounded_by_the_agent_s_limit_and_each_other(shm, pages, protected, processes, code):
    mid = os.urandom(16)
    begin = messages.encode(Message(mid, 0, Begin("vm", bytes(16), pages, protected, processes, 1, False, False,
                                                  "model", b"")))
    store = HandoffStore(shm / "d.db")
    dest = DestinationDriver(store, lambda m, b: ModelVM.create_incoming(shm / "dst", b.vm, b.vm_id, b.pages,
                                                                         b.vcpus, KEY, migration=m), max_pages=64)
    if code is None:
        assert _types(dest.feed(begin)) == ["ACCEPT"] and store.get(mid).state is HandoffState.RECEIVING
    else:  # beyond this agent's limit: refused; inconsistent counts: the peer's error
        with pytest.raises(MigrationFailure if code == "too-large" else RemoteProtocolError) as info:
            dest.feed(begin)
        assert info.value.code == code and store.get(mid) is None
        if code == "too-large":  # the sizes, said
            assert info.value.detail.endswith("exceeds this agent's limit of 256.0 KiB"), info.value.detail


def test_the_destination_engine_takes_only_the_result_it_asked_for(shm):
    from palm_net.errors import LocalProtocolError
    from palm_net.migration.effects import KeysImported, Opened

    dest = _destination(shm, HandoffStore(shm / "d.db"))
    with pytest.raises(LocalProtocolError):  # nothing asked yet
        dest.engine.on_result(Opened(0))
    _, msgs = _source_messages(shm)
    effects = dest.engine.on_record(Record(msgs[0], 0, b"T" * 32))  # BEGIN: it asks for the VM to be opened
    assert effects and dest.engine._awaiting is Opened
    with pytest.raises(LocalProtocolError):
        dest.engine.on_result(KeysImported(()))


def test_the_session_deadline_grows_with_the_data_received_up_to_eight_times_the_vm(shm):
    from palm_net.migration.destination import BEGIN_TIMEOUT, DEADLINE_PER_GIB, MAX_RESEND, SESSION_BASE

    dest = _destination(shm, HandoffStore(shm / "d.db"))
    eng = dest.engine
    assert eng.deadline(10.0) == 10.0 + BEGIN_TIMEOUT  # BEGIN soon
    _, msgs = _source_messages(shm)  # a 512-page VM
    us = units(msgs)
    pages = [i for i, u in enumerate(us) if isinstance(u.body, Pages)]
    first = us[: pages[1] + 1]  # BEGIN, KEYS and round 0's first two PAGES messages
    for u in first:
        for r in u.records():
            dest.feed(r)
    received = sum(len(IncomingPages(u.body)) for u in first if isinstance(u.body, Pages)) * 4096
    assert received and eng.progress == received  # zero pages count whole
    assert eng.deadline(10.0) == pytest.approx(10.0 + SESSION_BASE + DEADLINE_PER_GIB * received / 2**30)
    eng.progress = 1 << 40  # a peer resending for ever earns no more time than MAX_RESEND times the VM
    assert eng.deadline(0.0) == pytest.approx(SESSION_BASE + DEADLINE_PER_GIB * MAX_RESEND * 512 * 4096 / 2**30)


def test_a_source_abort_ends_the_migration_for_good_and_scrubs(shm):
    store = HandoffStore(shm / "d.db")
    src, msgs = _source_messages(shm)
    dest = _destination(shm, store)
    first = units(msgs)[:3]  # BEGIN, KEYS and round 0's first pages
    for u in first:
        for r in u.records():
            dest.feed(r)
    mid = dest.engine.mid
    assert dest.vm is not None and store.get(mid).state is HandoffState.RECEIVING
    abort = messages.encode(Message(mid, len(first), Abort("cancelled", "migration cancelled", b"")))
    assert dest.feed(abort) == []  # nothing to answer: the source has gone its way
    assert dest.engine.outcome == "aborted" and dest.vm is None and not (shm / "dst").exists()
    assert store.get(mid).state is HandoffState.ABORTED
    assert dest.engine.error is not None and dest.engine.error.code == "cancelled"
    assert dest.engine.error.detail == "cancelled at the source; the VM stays there"
    src.close()


# --------------------------------------------------------------------------
# A stream backend's destination, with a stand-in hypervisor (no QEMU needed)


class FakeStream:
    """Records the stream it is fed; ``load_ok`` decides what its 'QEMU' makes of it."""

    backend = "qemu"

    def __init__(self, info, load_ok: bool = True) -> None:
        self.info, self.load_ok = info, load_ok
        self.data = bytearray()
        self.ended = self.active = self.scrubbed = False
        self.running = False
        self.paused_at = None
        self.listening = 0  # the streams it listens for (listen_stream)
        self.streams: dict[int, bytearray] = {}

    def listen_stream(self, channels: int) -> None:
        assert not self.listening
        self.listening = channels
        self.streams = {c: bytearray() for c in range(channels)}
        self.data = self.streams[0]

    def interrupt_stream(self) -> None:
        pass

    def stream_in(self, data: bytes, channel: int = 0) -> None:
        assert not self.ended and channel < self.listening
        self.streams[channel] += data

    def end_stream(self) -> None:
        from palm_net.hypervisor.qemu import QemuError
        self.ended = True
        if not self.load_ok:
            raise QemuError("destination QEMU refused the stream")

    def sync(self) -> None:
        pass

    def digest(self) -> str:
        return bytes(32).hex()

    def activate(self) -> None:
        self.active = self.running = True

    def scrub(self) -> None:
        self.scrubbed = True


def _stream_session(chunks: list[bytes], claim: int | None = None, load_ok: bool = True):
    from palm_net.hypervisor.backend import VmInfo

    d = scratch.mkdtemp("palm-fs-")
    fake = FakeStream(VmInfo("q", bytes(16), 256, 1, 0, 0), load_ok)
    dest = DestinationDriver(HandoffStore(d / "d.db"), lambda mid, begin: fake)
    src = SessionProtocol(Role.SOURCE, os.urandom(16))
    msgs = [src.send(Begin("q", bytes(16), 256, 0, 0, 1, False, False, "qemu", b"spec"))]
    replies = dest.feed(msgs[0])
    src.receive(replies[0])  # ACCEPT
    for c in chunks:
        msgs += [src.send(Stream(len(c))), *map(bytes, src.send_data(c))]
    msgs.append(src.send(StreamEnd(sum(map(len, chunks)) if claim is None else claim)))
    msgs.append(src.send(Complete(len(msgs), len(chunks), b"T" * 32)))  # records, STREAM messages
    try:
        for m in msgs[1:]:
            replies += dest.feed(m)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return dest, fake, replies


def test_stream_destination_feeds_the_hypervisor_in_order_and_says_ready_once_loaded():
    chunks = [os.urandom(n) for n in (65263, 17, 4096)]
    dest, fake, replies = _stream_session(chunks)
    assert bytes(fake.data) == b"".join(chunks) and fake.ended
    assert _types(replies) == ["ACCEPT", "READY"] and dest.engine.outcome == "prepared"
    assert dest.engine.progress == sum(map(len, chunks))  # what the session deadline grows with


@pytest.mark.parametrize(("claim", "load_ok", "code"), [(10, True, "incomplete"), (None, False, "hypervisor")],
                         ids=["byte count differs", "hypervisor refuses the stream"])
def test_stream_destination_refuses_ready(claim, load_ok, code):
    with pytest.raises(RemoteProtocolError if code == "incomplete" else MigrationFailure) as info:
        _stream_session([b"abc", b"defg"], claim=claim, load_ok=load_ok)
    assert info.value.code == code


# --------------------------------------------------------------------------
# The destination's runner (palm_net.migration.runner.DestinationRun) on memory streams


async def test_first_record_arriving_with_the_last_handshake_message_is_answered(shm):
    """Regression (found by the load test): BEGIN coalesced with msg3 in one
    read sits in the record buffer; the destination must answer it without
    waiting for more bytes (the source sends nothing until ACCEPT)."""
    import trio.testing

    from palm_net.channel.handshake import AttestedHandshake
    from palm_net.channel.transport import SecureChannel
    from palm_net.migration.destination import DestinationEngine
    from palm_net.migration.runner import DestinationRun
    from tests.conftest import Pki

    pki = Pki()
    init = AttestedHandshake(pki.config("src"), True)
    resp = AttestedHandshake(pki.config("dst"), False)
    resp.receive_data(init.receive_data(resp.receive_data(init.initiate())))  # msg1, msg2, msg3
    src_proto = SessionProtocol(Role.SOURCE, os.urandom(16))
    begin = init.result.sender.seal(src_proto.send(Begin("vm", bytes(16), 16, 0, 0, 1, False, False, "model", b"")))
    ours, theirs = trio.testing.memory_stream_pair()
    channel = SecureChannel(theirs, resp.result, leftover=begin)

    async def open_vm(mid: bytes, b: Begin, peer) -> ModelVM:
        return ModelVM.create_incoming(shm / "in", b.vm, b.vm_id, b.pages, b.vcpus, KEY)

    store = HandoffStore(shm / "d.db")
    run = DestinationRun(channel, DestinationEngine(False, 1 << 20), store, SigningKey.generate(), open_vm)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run.run)
        rx = init.result.receiver
        with trio.fail_after(3):
            while (rec := rx.next_record()) is None:
                rx.receive_data(await ours.receive_some(65536))
        assert src_proto.receive(rec).type == "ACCEPT"
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# The page checks at their edges (found by mutation testing: each check's
# boundary, and a page that turns to zeros)


@pytest.mark.parametrize(("gfn", "version", "code"), [
    (511, 0, None),  # the last page of the VM, the lowest version: fine
    (512, 0, "malformed"),  # one past the end
    (7, 2**32 - 2, "malformed"),  # below the bound, but a zero page's version is its round (0)
    (7, 2**32 - 1, "malformed"),  # the bound
])
def test_a_page_just_outside_the_vm_or_its_versions_is_refused(shm, gfn, version, code):
    _, msgs = _source_messages(shm, protected=False)  # a VM of 512 pages
    us = units(msgs)
    begin, keys = us[0], next(u for u in us if isinstance(u.body, Keys))
    page = PageBatch(np.array([gfn], np.uint64), b"\x00", np.array([version], np.uint64), b"")  # a zero page
    forged = Unit(Message(begin.msg.mid, 0, page.message(0)), [])
    dest = _destination(shm, HandoffStore(shm / "d.db"))
    records = renumber([begin, keys, forged])
    for m in records[:-1]:
        dest.feed(m)
    if code is None:
        dest.feed(records[-1])
        return
    with pytest.raises(RemoteProtocolError) as info:
        dest.feed(records[-1])
    assert info.value.code == code


def test_a_page_that_turns_to_zeros_is_zero_at_the_destination(shm):
    """Round 0 sends a page with data; the guest then clears it: the zero-page
    record of round 1 must clear it at the destination too."""
    src = ModelVM.create(shm / "src", "vm", 64, KEY, fill="random", seed=2)

    def clear(_: int) -> None:
        src.guest_write(9, bytes(4096))

    _, msgs = source_messages(src, MigrationParams(max_rounds=2, downtime_limit=1e-9), 1, clear)
    dest = _destination(shm, HandoffStore(shm / "d.db"))  # the engine applies what arrives
    assert _types(_feed(dest, msgs))[-1] == "READY"
    dst = dest.vm
    assert isinstance(dst, ModelVM) and dst.memory_bytes()[9 * 4096 : 10 * 4096] == bytes(4096)
    assert src.memory_bytes() == dst.memory_bytes()


# --------------------------------------------------------------------------
# The destination's host (palm_net.migration.hosts.DestinationHost): what each request does
# to the store and the VM, and its result whole (the mutation run of issue 27 part 2)


def test_the_destination_host_aborts_only_what_its_session_opened(shm):
    store, signing = HandoffStore(shm / "dst.db"), SigningKey.generate()
    src = Peer("src", os.urandom(32), os.urandom(32))
    host = DestinationHost(store, signing, src)
    # A refused BEGIN (nothing of this session's to abort) naming another session's id,
    # in flight or aborted already: that migration is left as it is, no token handed out.
    in_flight, aborted = os.urandom(16), os.urandom(16)
    store.open_incoming(in_flight, "vm0", b"O" * 16, src)
    store.open_incoming(aborted, "vm1", b"A" * 16, src)
    assert store.abort_forever(aborted, None, "earlier")
    for mid in (in_flight, aborted):
        assert host.perform(AbortForever("replay: refused", recorded=False), mid) == Aborted(b"")
    assert store.state_of(in_flight) is HandoffState.RECEIVING
    # Its own: aborted for good with its reason, what arrived scrubbed, the token for its source.
    mid = os.urandom(16)
    store.open_incoming(mid, "vm2", b"V" * 16, src)
    host.vm = vm = ModelVM.create_incoming(shm / "in", "vm2", b"V" * 16, 16, 1, KEY, migration=mid)
    result = host.perform(AbortForever("integrity: a page failed its check", recorded=True), mid)
    assert result.aborted and check_abort_token(signing.verify_key.encode(), mid, result.token)
    assert store.get(mid).error == "integrity: a page failed its check"
    assert host.vm is None and not vm.dir.exists()


def test_the_destination_host_s_prepare_and_commit_results_are_whole(shm, monkeypatch):
    store, signing = HandoffStore(shm / "dst.db"), SigningKey.generate()
    host = DestinationHost(store, signing, Peer("src", os.urandom(32), os.urandom(32)))
    for activates in (True, False):
        mid = os.urandom(16)
        store.open_incoming(mid, f"vm-{activates}", b"V" * 16, host.peer)
        host.vm = vm = ModelVM.create_incoming(shm / f"in-{activates}", f"vm-{activates}", b"V" * 16, 16, 1, KEY,
                                               migration=mid)
        prepared = host.perform(Prepare(digest=False), mid)
        assert prepared.persisted and prepared.digest == b"" and 0 <= prepared.took < 60
        if not activates:
            monkeypatch.setattr(vm, "activate", _activation_fails)
        committed = host.perform(CommitAndActivate(), mid)
        assert store.state_of(mid) is HandoffState.COMMITTED
        assert (committed.committed, committed.running) == (True, activates)
        assert committed.error == (None if activates else "the VM would not start")
        assert 0 <= committed.activating <= committed.took < 60
        # An abort after the commit: the row decides, the VM stays (this agent's now).
        assert host.perform(AbortForever("late", recorded=True), mid) == Aborted(b"", aborted=False)
        assert host.vm is vm and store.state_of(mid) is HandoffState.COMMITTED
        vm.close()


def _activation_fails() -> None:
    raise HypervisorError("the VM would not start")


# --------------------------------------------------------------------------
# The engine's abort is its own session's (the mutation run of destination.py, issue 27)


def _begin_one(shm: Path, store: HandoffStore, mid: bytes, where: str) -> tuple[DestinationDriver, list[bytes]]:
    """A destination fed BEGIN for ``mid``, a VM of one page, and its answer (raises if it refuses)."""
    dest = DestinationDriver(store, lambda m, b: ModelVM.create_incoming(shm / where, b.vm, b.vm_id, b.pages,
                                                                         b.vcpus, KEY, migration=m))
    begin = messages.encode(Message(mid, 0, Begin("vm", bytes(16), 1, 0, 0, 1, False, False, "model", b"")))
    return dest, dest.feed(begin)


def test_a_begin_refused_for_a_used_id_aborts_nothing_of_that_migration(shm):
    """Guards fail's `recorded` (npages > 0): a replayed id's refusal never aborts the migration it names."""
    store = HandoffStore(shm / "d.db")
    in_flight = os.urandom(16)
    store.open_incoming(in_flight, "vm0", b"O" * 16, Peer("src", b"S" * 32, b"K" * 32))
    dest = DestinationDriver(store, lambda m, b: ModelVM.create_incoming(shm / "replayed", b.vm, b.vm_id, b.pages,
                                                                         b.vcpus, KEY, migration=m))
    with pytest.raises(MigrationFailure) as info:
        dest.feed(messages.encode(Message(in_flight, 0, Begin("vm", bytes(16), 1, 0, 0, 1, False, False, "model",
                                                              b""))))
    assert info.value.code == "replay"
    (abort,) = dest.fail(info.value)
    assert messages.decode(abort).body.token == b""  # nothing of this session's recorded: no promise
    assert store.state_of(in_flight) is HandoffState.RECEIVING


def test_a_one_page_vm_s_abort_is_recorded_with_its_reason_either_way(shm):
    """Guards fail's and _on_abort's AbortForever (recorded for a VM of one page, its reason in the row), and the
    outcome before READY."""
    store = HandoffStore(shm / "d.db")
    mid = os.urandom(16)
    dest, accepted = _begin_one(shm, store, mid, "a")
    assert _types(accepted) == ["ACCEPT"] and dest.engine.outcome is None  # before READY (what recheck reads)
    assert dest.feed(messages.encode(Message(mid, 1, Abort("cancelled", "migration cancelled", b"")))) == []
    assert store.get(mid).error == "cancelled at the source; the VM stays there"
    assert store.state_of(mid) is HandoffState.ABORTED and dest.vm is None
    mid = os.urandom(16)
    dest, _ = _begin_one(shm, store, mid, "b")
    (abort,) = dest.fail(RemoteProtocolError(ErrorCode.MALFORMED, "a bad record"))
    assert store.get(mid).error == "malformed: a bad record" and store.state_of(mid) is HandoffState.ABORTED
    assert check_abort_token(dest.host.signing.verify_key.encode(), mid, messages.decode(abort).body.token)


def test_a_protected_page_at_the_highest_version_still_refuses_an_older_copy_of_itself():
    """Guards Applied's version + 1 in its 4-byte table: the highest version (2**32 - 2) is kept, not wrapped to 0."""
    applied = Applied(64)
    applied.set_layout([(40, 8), (8, 16)])
    slots = applied.slots(np.array([7, 8, 23, 24, 40, 47, 48], np.uint64))
    assert slots.tolist() == [-1, 0, 15, -1, 16, 23, -1]
    top = np.array([2**32 - 2], np.uint64)
    applied.apply(slots[4:5], top, np.array([40], np.uint64))
    assert applied.version(16) == 2**32 - 2
    prot = np.ones(1, np.bool_)
    applied.take(np.array([40], np.uint64), top, prot, 9)  # the same version again: a resend
    applied.take(np.array([47], np.uint64), np.zeros(1, np.uint64), prot, 9)  # another page: none yet
    with pytest.raises(RemoteProtocolError) as info:
        applied.take(np.array([40], np.uint64), np.zeros(1, np.uint64), prot, 9)
    assert info.value.code is ErrorCode.ROLLBACK and applied.version(16) == 2**32 - 2


@pytest.mark.parametrize("kind", ["zero", "normal"])
def test_a_zero_or_normal_page_whose_version_is_not_its_round_is_refused(shm, kind):
    """proto 6: a zero or normal page carries its round as its version; the destination keeps
    no version for it, so one that claims another is refused, not taken."""
    _, msgs = _source_messages(shm, protected=False)
    us = units(msgs)
    begin, keys = us[0], next(u for u in us if isinstance(u.body, Keys))
    data = bytes(4096) if kind == "normal" else b""
    page = PageBatch(np.array([7], np.uint64), bytes([KIND_NORMAL if kind == "normal" else KIND_ZERO]),
                     np.array([1], np.uint64), data)
    records = renumber([begin, keys, Unit(Message(begin.msg.mid, 0, page.message(0)), split_data(data))])
    dest = _destination(shm, HandoffStore(shm / "d.db"))
    dest.feed(records[0])
    dest.feed(records[1])
    with pytest.raises(RemoteProtocolError) as info:
        dest.feed(records[2])
    assert info.value.code == "malformed" and "version is not its round" in str(info.value)


@pytest.mark.parametrize("where", ["plaintext-on-a-protected-gfn", "ciphertext-on-an-unprotected-gfn",
                                   "ciphertext-in-a-vm-without-protected-processes"])
def test_the_destination_refuses_a_page_of_the_wrong_kind_for_its_gfn_before_the_hypervisor_sees_it(shm, where):
    """Applied's slots and KEYS' layout: a protected gfn comes as ciphertext, and only it does
    (refused by the engine, with ``integrity``, before any of the message is written)."""
    _, msgs = _source_messages(shm, protected=where != "ciphertext-in-a-vm-without-protected-processes")
    us = units(msgs)
    plaintext = where == "plaintext-on-a-protected-gfn"
    first = next(u for u in us if isinstance(u.body, Pages) and (KIND_PROTECTED in u.body.kinds) == plaintext)
    kinds = np.frombuffer(first.body.kinds, np.uint8)
    prot = int(np.argmax((kinds == KIND_PROTECTED) == plaintext))
    gfns = IncomingPages(first.body).gfns
    kind = KIND_ZERO if plaintext else KIND_PROTECTED
    tags = bytes(16) if kind == KIND_PROTECTED else b""
    data = bytes(4096) if kind == KIND_PROTECTED else b""
    # A version no round could have (a protected version, or none of this message's round 0):
    # the page's kind is refused first, with ``integrity``, not its version.
    page = PageBatch(gfns[prot : prot + 1], bytes([kind]), np.array([7], np.uint64), data, tags)
    forged = Unit(Message(first.msg.mid, 0, page.message(0)), split_data(data))
    records = renumber([*us[: us.index(first)], forged])
    at = len(records) - len(forged.records())  # the forged PAGES message: refused as it comes, before its data
    dest = _destination(shm, HandoffStore(shm / "d.db"))
    for m in records[:at]:
        dest.feed(m)
    with pytest.raises(RemoteProtocolError) as info:
        dest.feed(records[at])
    assert info.value.code == "integrity" and f"page {gfns[prot]}" in str(info.value)


def test_a_protected_page_short_of_its_final_version_is_refused_by_the_blob_s_digest(shm):
    """A protected page written again after round 0 travels again with a higher version.
    Its last copy taken out, with the counts the source claims made to agree: every gfn
    still arrived, each copy opens under its MAC, so only the blob's digest of the
    final versions and MACs (proto 7.3) can tell that memory is not the final state."""
    vm = ModelVM.create(shm / "src", "vm", 512, KEY, protected_processes=1, protected_pages=128, seed=5,
                        fill="random")
    gfn = vm.processes[0].first + 70  # in the process's second block of 64

    def between(r: int) -> None:
        if r == 0:
            vm.process_write(0, gfn, b"written again")

    _, msgs = source_messages(vm, MigrationParams(max_rounds=2, downtime_limit=1e-9), 1, between)
    us = units(msgs)
    last = max(i for i, u in enumerate(us) if isinstance(u.body, Pages) and gfn in IncomingPages(u.body).gfns)
    assert last > min(i for i, u in enumerate(us) if isinstance(u.body, Pages))  # sent twice
    u = us[last]
    p = IncomingPages(u.body)
    keep = p.gfns != gfn
    if keep.any():  # the message without it
        kinds = np.frombuffer(u.body.kinds, np.uint8)
        rows = np.frombuffer(b"".join(u.data), np.uint8).reshape(-1, 4096)
        data_at, prot_at = np.cumsum(kinds != 0) - 1, np.cumsum(kinds == KIND_PROTECTED) - 1
        tags = np.frombuffer(u.body.tags, np.uint8).reshape(-1, 16)
        data = rows[data_at[keep & (kinds != 0)]].tobytes()
        rest = PageBatch(p.gfns[keep], kinds[keep].tobytes(), p.vers[keep], data,
                         tags[prot_at[keep & (kinds == KIND_PROTECTED)]].tobytes())
        us[last] = Unit(Message(u.msg.mid, u.msg.seq, rest.message(u.body.round)), split_data(data) if data else [])
    else:  # it was all the message held
        del us[last]
    msgs = renumber(us)
    dest = _destination(shm, HandoffStore(shm / "d.db"))
    with pytest.raises(MigrationFailure) as info:
        _feed(dest, msgs)
    assert info.value.code == "integrity"
    assert "final versions" in str(info.value)
    vm.close()
