"""The migration engine: no lost write, every workload, tampering refused, the handoff rules."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from palm_net.agent.errors import AgentError
from palm_net.channel.records import Record
from palm_net.errors import PalmError
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.workload import Workload
from palm_net.migration.handoff import HandoffState, HandoffStore, Peer, check_abort_token
from palm_net.migration.params import MigrationParams
from palm_net.migration.runner import OUTBOX_BUFFER
from palm_net.migration.source import PACING_BURST, Pacer
from palm_net.testing.engines import DestinationDriver, Unit, renumber, source_messages, split_data, units
from palm_net.testing.proxy import DONE, READY, FaultProxy, Rule
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
from palm_net.wire.pages import KIND_PROTECTED, IncomingPages, PageBatch
from palm_net.wire.protocol import Role, SessionProtocol

KEY = bytes(range(32))



# --------------------------------------------------------------------------
# The dirty log: a concurrent writer never loses a write


def _apply(dst: ModelVM, u: Unit) -> None:
    if isinstance(u.body, Pages):
        pages = IncomingPages(u.body)
        for d in u.data:
            pages.add(d)
        for batch in (pages.zero(), pages.take()):
            if batch is not None:
                dst.write_pages(batch)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(rate=st.sampled_from([2_000, 20_000, 100_000]), hot=st.sampled_from([0, 64]),
       rounds=st.integers(1, 4), seed=st.integers(0, 2**16), fill=st.sampled_from(["half", "random", "zero"]))
def test_dirty_log_never_loses_a_write(shm, rate, hot, rounds, seed, fill):
    """Writer and migrator race; at pause the destination equals the source byte for byte."""
    npages = 2048
    d = Path(tempfile.mkdtemp(dir=shm))
    src = ModelVM.create(d / "src", "vm", npages, KEY, fill=fill, seed=seed)
    dst = ModelVM.create_incoming(d / "dst", "vm", src.vm_id, npages, 1, KEY)
    spec = f"hotset:{hot * 4096}:{rate}" if hot else f"random:{rate}"
    wl = Workload(src, spec, seed)
    wl.start()

    def round_done(_: int) -> None:
        seen, deadline = wl.writes, time.monotonic() + 2
        while wl.writes == seen and time.monotonic() < deadline:
            time.sleep(0.001)  # make sure the guest wrote during this round

    try:
        _, msgs = source_messages(src, MigrationParams(max_rounds=rounds, downtime_limit=1e-9), rounds, round_done)
    finally:
        wl.stop()
    for u in units(msgs):
        _apply(dst, u)
    assert wl.writes > 0
    assert src.state == "paused"
    assert src.memory_bytes() == dst.memory_bytes()
    src.close()
    dst.close()


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
    with pytest.raises(PalmError) as info:
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
        # The same round, but one page's version lower than what was applied: a stale copy.
        last = us[pages[-1]]
        vers = IncomingPages(last.body).vers.copy()
        vers[0] = 0
        stale = _alter(last.msg, vers=vers.astype("<u8").tobytes())
        us.insert(pages[-1] + 1, Unit(stale, last.data))
        claim = (claim[0] + len(last.records()), claim[1] + 1)
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
    with pytest.raises(PalmError) as info:
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
    with pytest.raises(PalmError) as info:
        dest.feed(plain_begin)
    assert info.value.code == "plain-refused"
    dest = _destination(shm, HandoffStore(shm / "d2.db"))
    with pytest.raises(PalmError, match="mode-mismatch"):
        dest.feed(plain_begin)


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
    else:
        with pytest.raises(PalmError) as info:
            dest.feed(begin)
        assert info.value.code == code and store.get(mid) is None


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
        dest.engine.on_result(KeysImported(0))


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
    assert "source aborted: cancelled" in dest.engine.error.detail
    src.close()


def test_the_handoff_store_gives_back_every_field_it_was_given(shm):
    store = HandoffStore(shm / "d.db")
    peers = [Peer(f"peer{i}", bytes([i]) * 32, bytes([0x80 + i]) * 32, f"10.0.0.{i}:7400") for i in (1, 2)]
    mids = [bytes([i]) * 16 for i in range(1, 4)]
    before = time.time()
    store.open_incoming(mids[0], "web", b"W" * 16, peers[0])
    store.open_incoming(mids[1], "db", b"D" * 16, peers[1])
    store.open_incoming(mids[2], "db2", b"E" * 16, peers[1])
    store.set_stats(mids[0], {"rounds": 3})
    store.abort_forever(mids[1], None, "integrity: a page failed its check")
    row = store.get(mids[0])
    assert row is not None and (row.mid, row.role, row.vm, row.vm_id, row.peer) == (
        mids[0], Role.DESTINATION, "web", b"W" * 16, peers[0])
    assert (row.state, row.token, row.error, row.stats) == (HandoffState.RECEIVING, None, None, {"rounds": 3})
    assert before <= row.created <= row.updated <= time.time()
    aborted = store.get(mids[1])
    assert aborted is not None and aborted.state is HandoffState.ABORTED and aborted.peer == peers[1]
    assert aborted.error == "integrity: a page failed its check" and aborted.stats is None
    assert [r.mid for r in store.list()] == mids[::-1]  # newest first
    assert [r.mid for r in store.list(limit=2)] == mids[:0:-1]
    assert [r.mid for r in store.list(states=(HandoffState.ABORTED,))] == [mids[1]]
    assert store.list(role=Role.SOURCE) == [] and store.count() == 3
    # the abort token: only for a recorded abort, only to the peer that began it
    signing = SigningKey.generate()
    assert check_abort_token(signing.verify_key.encode(), mids[1],
                             store.abort_token(mids[1], peers[1].static_pub, signing))
    assert store.abort_token(mids[1], peers[0].static_pub, signing) == b""
    assert store.abort_token(mids[0], peers[0].static_pub, signing) == b""
    assert store.abort_token(b"\x07" * 16, peers[0].static_pub, signing) == b""  # never recorded
    # finished rows go after their time to live, the rest stay
    assert store.prune(now=time.time()) == 0
    assert store.prune(now=time.time() + 31 * 86400) == 1 and store.get(mids[1]) is None
    assert store.count() == 2


def test_past_the_handoff_a_source_resumes_only_with_the_token_or_by_the_operator(shm):
    from palm_net.errors import LocalProtocolError
    from palm_net.migration.handoff import make_abort_token

    store = HandoffStore(shm / "s.db")
    dest_key = SigningKey.generate()
    peer = Peer("dst", b"S" * 32, dest_key.verify_key.encode(), "127.0.0.1:1")
    vms = [ModelVM.create(shm / f"vm{i}", f"vm{i}", 16, KEY) for i in range(3)]
    mids = [bytes([i + 1]) * 16 for i in range(3)]
    for mid, vm in zip(mids, vms, strict=True):
        store.open_outgoing(mid, vm, peer)
        vm.pause()
        assert store.hand_off(mid)
    store.open_incoming(b"\x09" * 16, "in", b"I" * 16, peer)
    for mid in (b"\x08" * 16, b"\x09" * 16):  # unknown; incoming
        with pytest.raises(LocalProtocolError):
            store.abort_and_resume(mid, None, "x")
    for token in (None, b"", make_abort_token(SigningKey.generate(), mids[0]), make_abort_token(dest_key, mids[1])):
        with pytest.raises(LocalProtocolError):  # none, empty, another key's, another migration's
            store.abort_and_resume(mids[0], vms[0], "x", token=token)
    assert store.get(mids[0]).state is HandoffState.HANDED_OFF and vms[0].state == "paused"
    token = make_abort_token(dest_key, mids[0])
    assert store.abort_and_resume(mids[0], vms[0], "destination aborted", token=token)
    row = store.get(mids[0])
    assert row.state is HandoffState.ABORTED and row.token == token and row.error == "destination aborted"
    assert vms[0].state == "running"
    assert store.abort_and_resume(mids[1], vms[1], "operator", override=True) and vms[1].state == "running"
    assert store.confirm(mids[2])  # DONE: it never runs here again, whatever is asked
    assert not store.abort_and_resume(mids[2], vms[2], "late", override=True) and vms[2].state == "paused"
    for vm in vms:
        vm.close()


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

    def stream_in(self, data: bytes) -> None:
        assert not self.ended
        self.data += data

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

    d = Path(tempfile.mkdtemp(prefix="palm-fs-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
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
    with pytest.raises(PalmError) as info:
        _stream_session([b"abc", b"defg"], claim=claim, load_ok=load_ok)
    assert info.value.code == code


# --------------------------------------------------------------------------
# Whole migrations between in-process agents over loopback TCP


@pytest.mark.parametrize("workload", ["idle", "random:3000", "hotset:256KiB:5000", "protected:2000",
                                      "random:2000+protected:1000"])
async def test_migration_with_each_workload(cluster, workload):
    a, b = cluster["a"], cluster["b"]
    vm = a.registry.create_model("vm1", 8 << 20, protected=2, workload=workload, seed=7)
    p0 = vm.processes[0]
    secret = b"protected plaintext that never leaves the hypervisor"
    vm.process_write(0, p0.first + 1, secret, 100)
    await trio.sleep(0.2)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True))
    assert res.ok, res.error
    assert res.stats.digest  # both sides digested memory at pause and agreed
    assert "vm1" not in a.vms and cluster.running_copies("vm1") == ["b"]
    moved = b.vms["vm1"]
    report = moved.verify()
    assert report.ok and report.checked + report.in_process_view == moved.info.protected_pages
    # The protected process's view still works on the destination, and the
    # untrusted view of the page is ciphertext, not the secret.  A workload
    # with protected writes may overwrite the secret itself (16-byte stamps
    # at random offsets, about 2% of runs): the digest at pause, protected
    # pages in plaintext, already proved what arrived; so the secret is
    # checked where nothing else writes, and written afresh otherwise.
    if "protected" in workload:
        with trio.fail_after(5):  # the destination starts the workload once its session ends
            while moved.workload is None:
                await trio.sleep(0.01)
        moved.workload.stop()
        moved.process_write(0, p0.first + 1, secret, 100)
    assert secret not in moved.os_read(p0.first + 1)
    assert moved.process_read(0, p0.first + 1)[100:100 + len(secret)] == secret
    assert a.store.get(res.mid).state == "done" and b.store.get(res.mid).state == "committed"


async def test_protected_plaintext_never_on_the_wire(cluster):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 4 << 20, protected=1, fill="zero")
    marker = b"TOP-SECRET-" * 8
    for g in range(vm.processes[0].first, vm.processes[0].first + 16):
        vm.process_write(0, g, marker)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert res.ok
    wire = b"".join(proxy.seen.values())
    assert marker not in wire and b"TOP-SECRET" not in wire
    assert res.stats.protected_pages >= vm.info.protected_pages


async def test_plain_mode_refused_for_protected_vm(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(plain=True))
    assert not res.ok and "plain-refused" in res.error
    assert cluster.running_copies("vm1") == ["a"]


@pytest.mark.parametrize("policy", ["none", "agents:c", "measurements:" + "00" * 32])
async def test_policy_forbidden_destination_refused_before_any_page(cluster, policy):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1, policy=policy)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert not res.ok and res.error.startswith("policy")
    # At most the handshake crossed (preamble, msg1, msg3): not one record.
    assert proxy.log.frames.get((0, "c2s"), 0) <= 3
    assert cluster.running_copies("vm1") == ["a"]


async def test_policy_allowing_the_destination_by_name(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1, policy="agents:b")
    assert (await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())).ok


# --------------------------------------------------------------------------
# Tampering on the wire and failures at each handoff step


async def _via_proxy(cluster, rules, workload="idle", params=None):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 4 << 20, protected=1, workload=workload, fill="random")
    digest = vm.digest() if workload == "idle" else None
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), rules)
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", params or MigrationParams())
    return res, digest, proxy


def _one_copy(cluster, digest):
    copies = cluster.running_copies("vm1")
    assert len(copies) == 1, f"VM runs on {copies}"
    vm = cluster[copies[0]].vms["vm1"]
    if digest is not None:
        assert vm.digest() == digest
    assert vm.verify().ok
    return copies[0]


@pytest.mark.parametrize("rule", [
    Rule("c2s", 6, "flip", bit=900),
    Rule("c2s", 6, "drop"),
    Rule("c2s", 6, "duplicate"),
    Rule("c2s", 7, "replay", replay_of=(0, "c2s", 5)),
    Rule("c2s", 6, "truncate", bit=100),
    Rule("s2c", 1, "flip", bit=3),
], ids=["bitflip", "drop", "duplicate", "replay", "truncate", "flip-accept"])
async def test_tampered_records_fail_closed(cluster, rule):
    res, digest, proxy = await _via_proxy(cluster, [rule])
    assert not res.ok and res.runs_on == "source"
    assert _one_copy(cluster, digest) == "a"
    assert proxy.log.events  # the rule fired
    with trio.fail_after(5):  # the destination scrubs once its session ends
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)


async def test_replay_of_an_earlier_session_is_refused(cluster):
    """Records recorded from one session injected into the next fail authentication."""
    a = cluster["a"]
    a.registry.create_model("vm0", 4 << 20, fill="random")
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port),
                       [Rule("c2s", 5, "replay", connection=1, replay_of=(0, "c2s", 5))])
    await cluster.nursery.start(proxy.serve)
    assert (await a.outgoing.migrate("vm0", f"127.0.0.1:{proxy.port}", MigrationParams())).ok
    a.registry.create_model("vm1", 4 << 20, fill="random")
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert not res.ok and cluster.running_copies("vm1") == ["a"]


@pytest.mark.parametrize(("step", "rule", "where"), [
    ("before READY", Rule("s2c", 0, "cut", match=READY), "a"),
    ("after READY", Rule("s2c", 0, "cut_after", match=READY), "a"),
    ("after COMMIT", Rule("s2c", 0, "cut", match=DONE), "b"),
    ("after DONE", Rule("s2c", 0, "cut_after", match=DONE), "b"),
])
async def test_handoff_failure_at_each_step(cluster, step, rule, where):
    res, digest, proxy = await _via_proxy(cluster, [rule])
    assert proxy.log.events, "the fault was injected"
    assert _one_copy(cluster, digest) == where, step
    if where == "b":
        assert cluster["a"].store.get(res.mid).state == "done"
    else:
        assert cluster["a"].store.get(res.mid).state == "aborted"
        with trio.fail_after(5):  # the destination aborts once it sees its session end
            while (row := cluster["b"].store.get(res.mid)) is not None and row.state != "aborted":
                assert row.state in ("receiving", "prepared"), row.state  # never committed
                await trio.sleep(0.01)


async def test_in_doubt_source_restart_then_recovery(cluster):
    """COMMIT reached the destination, DONE never came back, and the source
    agent restarts while in doubt: it recovers the outcome from the destination."""
    cluster.members["a"].config.in_doubt_wait = 0.01
    res, digest, _ = await _via_proxy(cluster, [Rule("s2c", 0, "cut", match=DONE),
                                                Rule("c2s", 0, "cut", connection=1)])
    assert res.status == "in-doubt" and res.runs_on.startswith("none")
    assert cluster.running_copies("vm1") == ["b"]  # paused on a, running on b: still one copy
    assert cluster["a"].vms["vm1"].state == "paused"
    await cluster.stop("a")
    cluster.members["a"].config.in_doubt_wait = 3.0
    a = await cluster.start("a")
    with trio.fail_after(10):
        while a.store.get(res.mid).state == "handed_off":
            await trio.sleep(0.05)
    assert a.store.get(res.mid).state == "done"
    assert "vm1" not in a.vms
    _one_copy(cluster, digest)


async def test_destination_restart_while_prepared_aborts_and_source_resumes(cluster):
    cluster.members["a"].config.in_doubt_wait = 0.01
    # READY reaches the source, the COMMIT never reaches the destination, whose
    # agent restarts: it aborts on start-up and the source gets a token.
    res, digest, _ = await _via_proxy(cluster, [Rule("c2s", 0, "cut", connection=1),
                                                 Rule("s2c", 2, "cut_after")])
    await cluster.stop("b")
    b = await cluster.start("b")
    assert b.store.get(res.mid).state == "aborted"
    a = cluster["a"]
    if a.store.get(res.mid).state == "handed_off":
        status = await a.outgoing.resolve(res.mid.hex(), override=False, reason="")
        assert status == "aborted"
    assert _one_copy(cluster, digest) == "a"


async def test_abort_token_is_bound_to_the_migration(cluster):
    b = cluster["b"]
    from palm_net.migration.handoff import make_abort_token
    mid = os.urandom(16)
    token = make_abort_token(b.identity.signing, mid)
    assert check_abort_token(b.identity.sign_pub, mid, token)
    assert not check_abort_token(b.identity.sign_pub, os.urandom(16), token)
    assert not check_abort_token(cluster["a"].identity.sign_pub, mid, token)


async def test_operator_override_is_loud(cluster, capsys):
    cluster.members["a"].config.in_doubt_wait = 0.01
    # DONE never comes back and every reconnection is cut: the source stays in doubt.
    res, _, _ = await _via_proxy(cluster, [Rule("s2c", 0, "cut", match=DONE), Rule("c2s", 0, "cut", connection=1),
                                           Rule("c2s", 0, "cut", connection=2), Rule("c2s", 0, "cut", connection=3)])
    a = cluster["a"]
    assert res.status == "in-doubt" and a.store.get(res.mid).state == "handed_off"
    with pytest.raises(AgentError):
        await a.outgoing.resolve("zz", override=True, reason="x")
    assert await a.outgoing.resolve(res.mid.hex(), override=True, reason="test override") == "resumed (override)"
    assert a.vms["vm1"].state == "running"
    captured = capsys.readouterr()
    assert "OPERATOR OVERRIDE" in captured.out + captured.err


# An idle, unprotected, zero-filled 1024-page VM has a fixed record layout,
# so the proxy can aim at each phase (c2s frames 0-2 are the handshake):
# 3 BEGIN, 4 KEYS, 5 PAGES (round 0), 6 ROUND_END, 7 CPU_STATE (stop-and-copy),
# 8 CONTEXT (the protected-context blob), 9 COMPLETE, 10 COMMIT.
PHASES = [
    ("handshake msg3", Rule("c2s", 2, "flip", bit=40), "a"),
    ("handshake msg2", Rule("s2c", 0, "flip", bit=100), "a"),
    ("BEGIN", Rule("c2s", 3, "flip", bit=20), "a"),
    ("round 0 pages", Rule("c2s", 5, "flip", bit=2000), "a"),
    ("round end", Rule("c2s", 6, "drop"), "a"),
    ("stop-and-copy CPU state", Rule("c2s", 7, "flip", bit=30), "a"),
    ("protected-context blob", Rule("c2s", 8, "truncate", bit=20), "a"),
    ("completion record", Rule("c2s", 9, "replay", replay_of=(0, "c2s", 8)), "a"),
    ("COMMIT cut", Rule("c2s", 10, "cut"), "a"),
    ("COMMIT flipped", Rule("c2s", 10, "flip", bit=9), "a"),
]


@pytest.mark.parametrize(("phase", "rule", "where"), PHASES, ids=[p[0] for p in PHASES])
async def test_fault_at_each_phase(cluster, phase, rule, where):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    digest = vm.digest()
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [rule])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert proxy.log.events, f"{phase}: the fault was not injected"
    assert not res.ok or res.extra.get("recovered")
    with trio.fail_after(10):  # in-doubt recovery and destination cleanup settle
        while cluster.running_copies("vm1") != [where] or "vm1" in cluster["b"].vms:
            await trio.sleep(0.05)
    assert cluster["a"].vms["vm1"].digest() == digest


async def test_phase_layout_assumed_above(cluster):
    """Without faults, that VM's session is exactly 11 frames out and 5 back (ROUND_DONE of round 0)."""
    a = cluster["a"]
    a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    assert (await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())).ok
    assert proxy.log.frames[(0, "c2s")] == 11 and proxy.log.frames[(0, "s2c")] == 5


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


@pytest.mark.parametrize("action", ["flip", "drop", "replay"])
async def test_fault_in_a_later_precopy_round(cluster, action):
    """A guest write during round 0 makes a round-1 page record at c2s frame 7
    (tiny downtime limit: no early stop); tampering with it fails closed."""
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    rules = [Rule("c2s", 5, "call", callback=lambda: vm.guest_write(17, b"written during round 0")),
             Rule("c2s", 7, action, bit=4000, replay_of=(0, "c2s", 5))]
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), rules)
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams(downtime_limit=1e-6, max_rounds=3))
    assert all(r.fired for r in rules)
    assert not res.ok and res.runs_on == "source"
    assert len(res.stats.rounds) >= 1 and res.stats.rounds[0].dirty_pages == 1
    with trio.fail_after(5):
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)
    assert cluster.running_copies("vm1") == ["a"]
    assert vm.os_read(17).startswith(b"written during round 0")


async def test_later_round_layout_assumed_above(cluster):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    rule = Rule("c2s", 5, "call", callback=lambda: vm.guest_write(17, b"x"))
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [rule])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams(downtime_limit=1e-6, max_rounds=3))
    assert res.ok and [r.pages for r in res.stats.rounds][:2] == [1024, 1]


async def test_auto_converge_throttles_a_guest_that_dirties_faster_than_the_link(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 2 << 20, workload="random:20000", fill="random")
    params = MigrationParams(bandwidth=8 << 20, auto_converge=True, max_rounds=6, max_factor=20,
                             downtime_limit=0.01)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), params)
    assert res.ok, res.error
    assert res.stats.throttle < 1.0  # the vCPUs were slowed down
    assert cluster.running_copies("vm1") == ["b"]


async def test_bandwidth_cap_is_respected(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, fill="random")
    cap = 8 << 20
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(bandwidth=cap))
    assert res.ok
    r0 = res.stats.rounds[0]
    # The token bucket's bound (test_pacer_never_lets_more_through_than_the_cap): a slow
    # machine only makes the round longer, never the bound looser.
    assert r0.bytes <= cap * (r0.duration + PACING_BURST) + OUTBOX_BUFFER


@given(st.lists(st.tuples(st.integers(1, 4 << 20), st.floats(0, 0.5)), min_size=1, max_size=60),
       st.floats(1 << 16, 1 << 30))
@settings(max_examples=200, deadline=None)
def test_pacer_never_lets_more_through_than_the_cap(sends, cap):
    """Whatever the sizes and the gaps: once the sender waited as told, the bytes since
    the start are at most cap x the time since the start, and the bytes of any stretch
    of sends at most cap x its time plus the burst an idle sender saved up."""
    now = 10.0
    pacer = Pacer(cap, now)
    marks = [(now, 0)]  # (time after each send's wait, bytes so far)
    for size, gap in sends:
        now += gap
        total = marks[-1][1] + size
        now += pacer.sent(size, now)
        marks.append((now, total))
    eps = 1e-6 * cap
    for i, (t0, b0) in enumerate(marks):
        for t1, b1 in marks[i + 1:]:
            assert b1 - b0 <= cap * (t1 - t0 + PACING_BURST) + eps
    assert marks[-1][1] <= cap * (marks[-1][0] - marks[0][0]) + eps


async def test_operator_cancel_before_the_handoff_resumes_the_source(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 16 << 20, fill="random", protected=1)
    results = []

    async def run():
        results.append(await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(bandwidth=4 << 20)))

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(5):
            while not [m for m in a.outgoing.live.values() if m.result is None and m.stats.phase == "round"]:
                await trio.sleep(0.02)
        mid = next(m.mid for m in a.outgoing.live.values() if m.result is None)
        assert a.outgoing.cancel(mid.hex()) == "cancelling"
    res = results[0]
    assert not res.ok and res.status == "cancelled" and res.runs_on == "source"
    assert a.store.get(mid).state == "aborted"
    assert cluster.running_copies("vm1") == ["a"]
    with trio.fail_after(5):
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)
    with pytest.raises(AgentError):
        a.outgoing.cancel(mid.hex())  # nothing in flight any more


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", ".hidden"])
async def test_destination_refuses_vm_names_that_are_not_plain_names(cluster, name):
    """A (certified) source cannot make the destination create files outside its VM directory."""
    from palm_net.channel.handshake import ChannelConfig
    from palm_net.channel.transport import connect
    from palm_net.crypto.identity import AgentIdentity
    from palm_net.wire.protocol import Role, SessionProtocol

    ident = AgentIdentity.generate("evil")
    cert = cluster.authority.issue("evil", ident.static.public, ident.sign_pub, cluster.measurement)
    cfg = ChannelConfig(ident, cert, cluster.authority.public, cluster.measurement,
                        frozenset({cluster.measurement}))
    stream = await trio.open_tcp_stream("127.0.0.1", cluster.members["b"].port)
    ch = await connect(stream, cfg)
    proto = SessionProtocol(Role.SOURCE, os.urandom(16))
    await ch.send(proto.send(Begin(name, bytes(16), 16, 0, 0, 1, False, False, "model", b"")))
    with trio.fail_after(5):
        reply = proto.receive((await ch.receive()).data)
    assert reply.type == "ABORT" and reply.body.code == "malformed"
    await ch.aclose()
    root = cluster.members["b"].config.memory_dir
    assert not (root.parent / "escape").exists() and [p for p in root.iterdir() if p.name != ".lock"] == []
    assert cluster["b"].store.get(proto.mid) is None  # a refused BEGIN writes nothing


# --------------------------------------------------------------------------
# The page checks at their edges (found by mutation testing: each check's
# boundary, and a page that turns to zeros)


@pytest.mark.parametrize(("gfn", "version", "code"), [
    (511, 0, None),  # the last page of the VM, the lowest version: fine
    (512, 0, "malformed"),  # one past the end
    (7, 2**32 - 2, None),  # the highest version a destination keeps
    (7, 2**32 - 1, "malformed"),  # one more
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
    with pytest.raises(PalmError) as info:
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


async def test_the_digest_check_after_done_is_shown_and_counted(cluster):
    """--verify-digest re-reads the source's copy after DONE: the progress says so, and
    the total includes it (issue 25.3: the line froze and the summary left it out)."""
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 8 << 20, fill="random")
    read_afresh = vm.digest

    def slow_digest() -> str:  # as a large guest's would be
        time.sleep(0.5)
        return read_afresh()

    vm.digest = slow_digest
    phases: list[str] = []
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True),
                                   on_progress=lambda st: phases.append(st.phase))
    assert res.ok and "digest-check" in phases
    d = res.as_dict()
    assert d["digest_at_pause"] == "equal" and d["digest_check_ms"] >= 500
    assert d["total_ms"] >= 500  # counted in the total


async def test_the_downtime_is_broken_down_by_phase(cluster):
    """The source's view of the pause, phase by phase (issue 24.1): the phases are in
    order, and they add up to the downtime."""
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, fill="random", protected=1)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res.ok
    d = res.as_dict()
    phases = d["downtime_phases_ms"]
    assert list(phases) == ["stop-and-copy", "finish", "destination-prepare", "hand-off", "commit"]
    assert all(v >= 0 for v in phases.values())
    assert abs(sum(phases.values()) - d["downtime_ms"]) <= 0.1 * len(phases)  # (each rounded to 0.1 ms)
    from palm_net.cli.output import migrate_summary

    line = next(ln for ln in migrate_summary(d).splitlines() if "by phase" in ln)
    assert "stop-and-copy" in line and "commit" in line


async def test_the_json_counts_agree_and_durations_are_in_ms(cluster):
    """--json: "rounds" is the number of round_stats (the paused stop-and-copy round
    among them, marked), every duration in ms; the summary's count matches its table
    (issue 25.9: 5 rounds next to 4 entries, durations in seconds among ms)."""
    from palm_net.cli.output import migrate_summary

    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, fill="random", workload="random:2000")
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res.ok
    d = res.as_dict()
    rs = d["round_stats"]
    assert d["rounds"] == len(rs) >= 2 and rs[-1]["paused"] and not any(x["paused"] for x in rs[:-1])
    assert all("duration" not in x and x["duration_ms"] >= 0 for x in rs)
    text = migrate_summary(d)
    assert f"in {len(rs)} rounds (the last one paused)" in text
    table = text.split("rounds:")[1].splitlines()[2:]  # header and rule off
    assert len([ln for ln in table if ln.strip() and not ln.startswith("WARNING")]) == len(rs)
    assert "paused" in table[len(rs) - 1]
