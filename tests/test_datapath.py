"""The data path of protocol version 2: data records, the bulk buffers that are
opened and sealed in place, incoming memory reserved ahead of the data, and the
memory digest kept page by page (proto/PROTOCOL.md 6, 7.1, 7.4)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import trio
import trio.testing

from palm_net.channel.records import RecordReceiver, RecordSender
from palm_net.channel.transport import Inbox, Outbox, SecureChannel, _Buffers
from palm_net.crypto.noise import CIPHERS, CipherState
from palm_net.errors import ErrorCode, LocalProtocolError, MigrationFailure, RemoteProtocolError
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.qemu import read_stream
from palm_net.migration import orchestrate
from palm_net.migration.handoff import HandoffStore
from palm_net.migration.params import MigrationParams, MigrationStats
from palm_net.testing.engines import DestinationDriver, source_messages, units
from palm_net.wire import messages
from palm_net.wire.messages import DATA_RECORD, MAX_BULK, Accept, Begin, Pages, Stream
from palm_net.wire.pages import IncomingPages
from palm_net.wire.protocol import Data, Role, SessionProtocol
from tests.conftest import data_bytes

KEY = bytes(range(32))



# --------------------------------------------------------------------------
# Data records in the session protocol


def _streaming() -> tuple[SessionProtocol, SessionProtocol]:
    mid = os.urandom(16)
    src, dst = SessionProtocol(Role.SOURCE, mid), SessionProtocol(Role.DESTINATION)
    dst.receive(src.send(Begin("v", bytes(16), 64, 0, 0, 1, False, False, "qemu", b"spec")))
    src.receive(dst.send(Accept()))
    return src, dst


@pytest.mark.parametrize("length", [1, DATA_RECORD - 1, DATA_RECORD, DATA_RECORD + 1, MAX_BULK])
def test_a_message_s_bulk_travels_in_data_records_of_61440_bytes(length):
    src, dst = _streaming()
    data = os.urandom(length)
    header = src.send(Stream(length))
    parts = src.send_data(data)
    assert [len(p) for p in parts] == [min(DATA_RECORD, length - i) for i in range(0, length, DATA_RECORD)]
    assert dst.receive(header).type == "STREAM" and dst.data_due
    got = [dst.receive(bytes(p)) for p in parts]
    assert all(isinstance(d, Data) for d in got) and [d.last for d in got] == [False] * (len(parts) - 1) + [True]
    assert b"".join(bytes(d.data) for d in got) == data and not dst.data_due


def test_data_records_must_have_their_exact_size_and_come_before_any_message():
    src, dst = _streaming()
    dst.receive(src.send(Stream(DATA_RECORD + 10)))
    with pytest.raises(RemoteProtocolError) as info:
        dst.receive(os.urandom(DATA_RECORD - 1))  # short
    assert info.value.code == "malformed"
    # The sender may not put a message before the data it announced, nor more data.
    src2, _ = _streaming()
    src2.send(Stream(10))
    with pytest.raises(LocalProtocolError):
        src2.send(Stream(10))
    with pytest.raises(LocalProtocolError):
        src2.send_data(b"x" * 11)
    # A message where data is due is taken as data: a wrong size, refused.
    src3, dst3 = _streaming()
    dst3.receive(src3.send(Stream(100)))
    with pytest.raises(RemoteProtocolError) as info:
        dst3.receive(messages.encode(messages.Message(src3.mid or b"", 2, Stream(5))))
    assert info.value.code == "malformed"


def test_a_bulk_announcement_is_bounded_before_anything_is_allocated():
    with pytest.raises(LocalProtocolError) as info:
        Stream(MAX_BULK + 1)
    assert info.value.code is ErrorCode.MALFORMED
    with pytest.raises(LocalProtocolError) as info:  # 257 data pages
        Pages(0, bytes(8 * 257), b"\x01" * 257, bytes(8 * 257), b"")
    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize(("gfns", "kinds", "vers", "why"), [
    ([3, 2], b"\x00\x00", 2, "ascending"),
    ([2, 2], b"\x00\x00", 2, "ascending"),  # a page twice in one message
    ([1, 3, 2], b"\x00\x00\x00", 3, "ascending"),  # each after the one before, not only after the first
    ([2, 3, 4], b"\x00\x00", 2, "disagree"),
    ([2, 3], b"\x00\x00", 3, "disagree"),
    ([2, 3], b"\x00\x03", 2, "kind"),
])
def test_pages_arrays_agree_and_gfns_ascend(gfns, kinds, vers, why):
    with pytest.raises(RemoteProtocolError, match=why) as info:
        IncomingPages(Pages(0, np.array(gfns, "<u8").tobytes(), kinds, bytes(8 * vers), b""))
    assert info.value.code is ErrorCode.MALFORMED
    assert len(IncomingPages(Pages(0, np.array([2, 3], "<u8").tobytes(), b"\x00\x00", bytes(16), b""))) == 2


# --------------------------------------------------------------------------
# Sealed into buffers, opened in place


def _pair(plain: bool = False) -> tuple[RecordSender, RecordReceiver]:
    k = os.urandom(32)
    return RecordSender(CipherState(CIPHERS["AESGCM"], k), plain=plain), \
        RecordReceiver(CipherState(CIPHERS["AESGCM"], k), plain=plain)


@pytest.mark.parametrize("plain", [False, True])
def test_seal_into_and_open_in_place_agree_with_the_one_record_path(plain):
    tx, rx = _pair(plain)
    ref_tx, ref_rx = _pair(plain)
    ref_tx.cs.k = tx.cs.k
    ref_rx.cs.k = rx.cs.k
    msgs = [(os.urandom(n), plain and n > 100) for n in (1, 17, 4096, DATA_RECORD, 65519)]
    buf = bytearray(sum(RecordSender.frame_size(len(m), plain) for m, _ in msgs))
    pos = 0
    for m, clear in msgs:
        pos += tx.seal_into(m, memoryview(buf)[pos:], clear)
    assert bytes(buf[:pos]) == b"".join(ref_tx.seal(m, clear) for m, clear in msgs)
    assert rx.whole_frames(buf, pos) == pos and rx.whole_frames(buf, pos - 1) < pos
    opened = rx.open_in_place(memoryview(buf)[:pos])
    assert [bytes(r.data) for r in opened] == [m for m, _ in msgs]
    assert [r.authenticated for r in opened] == [not clear for _, clear in msgs]
    assert (rx.count, rx.transcript) == (tx.count, tx.transcript)


def test_open_in_place_fails_closed_on_a_flipped_bit():
    tx, rx = _pair()
    buf = bytearray(2 * RecordSender.frame_size(100, False))
    pos = tx.seal_into(b"a" * 100, memoryview(buf))
    pos += tx.seal_into(b"b" * 100, memoryview(buf)[pos:])
    buf[pos - 3] ^= 1
    with pytest.raises(RemoteProtocolError) as info:
        rx.open_in_place(memoryview(buf)[:pos])
    assert info.value.code == "bad-record" and rx.failed


async def test_a_buffer_still_viewed_is_never_reused():
    pool = _Buffers(1, 1024)
    buf = await pool.get()
    view = memoryview(buf)[:10]  # a record still held somewhere
    pool.put(buf)
    again = await pool.get()
    assert again is not buf  # a fresh one: buf stays as its holder sees it
    view.release()
    pool.put(again)
    assert await pool.get() is again


async def _channels() -> tuple[SecureChannel, SecureChannel]:
    """Two channels over an in-memory stream pair, with matching record layers."""
    from palm_net.channel.handshake import HandshakeResult

    a_stream, b_stream = trio.testing.memory_stream_pair()
    tx, rx = _pair()
    tx2, rx2 = _pair()

    def result(sender: RecordSender, receiver: RecordReceiver) -> HandshakeResult:
        r = object.__new__(HandshakeResult)
        object.__setattr__(r, "sender", sender)
        object.__setattr__(r, "receiver", receiver)
        return r

    return SecureChannel(a_stream, result(tx, rx2)), SecureChannel(b_stream, result(tx2, rx))


async def test_outbox_and_inbox_carry_records_in_order_across_buffers():
    """Records of every size, sealed a batch per buffer on one side, read into
    buffers of the smallest allowed size on the other (records span buffers)."""
    a, b = await _channels()
    msgs = [os.urandom(n) for n in [65519, 1, DATA_RECORD, 300, 65519] * 12]
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        outbox = Outbox(a, 4 * 70000, buffers=2)
        nursery.start_soon(outbox.run)
        inbox = Inbox(b, size=2 * (65536 + 8), buffers=2)
        send, recv = trio.open_memory_channel[tuple[bytearray, int]](0)
        nursery.start_soon(inbox.run, send)

        async def consume() -> None:
            async for buf, end in recv:
                recs = await inbox.open(buf, end)
                got.extend(bytes(r.data) for r in recs)
                recs.clear()
                inbox.release(buf)
                if len(got) == len(msgs):
                    nursery.cancel_scope.cancel()

        nursery.start_soon(consume)
        for i in range(0, len(msgs), 3):
            await outbox.put([(m, False) for m in msgs[i : i + 3]])
        outbox.close()
    assert got == msgs


async def test_a_received_record_carries_its_index_and_the_transcript_before_it():
    """``receive`` gives each record its place in the session and the transcript before it (what COMPLETE binds)."""
    a, b = await _channels()
    before = []
    for data in (b"one", b"two", b"three"):
        before.append(a.sent)
        await a.send(data)
    for i, (count, transcript) in enumerate(before):
        rec = await b.receive()
        assert (rec.index, rec.transcript_before) == (count, transcript) == (i, transcript)
    assert before[0][1] == bytes(32) != before[1][1] != before[2][1]


async def test_an_inbox_passes_on_every_record_before_the_peer_s_close_then_keeps_the_close():
    """The peer's close ends the Inbox after the records sent before it (a last ABORT), and is kept in ``closed``."""
    a, b = await _channels()
    with pytest.raises(ValueError):
        Inbox(b, size=2 * (65536 + 8) - 1)  # a buffer holds two largest frames at least
    await a.send(b"a record")
    await a.send(b"the last words")
    await a.stream.aclose()
    inbox = Inbox(b, size=2 * (65536 + 8), buffers=2)
    send, recv = trio.open_memory_channel[tuple[bytearray, int]](0)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.run, send)
        async for buf, end in recv:
            got.extend(bytes(r.data) for r in await inbox.open(buf, end))
            inbox.release(buf)
    assert got == [b"a record", b"the last words"]
    assert inbox.closed is not None and inbox.closed.code is ErrorCode.CLOSED


async def test_an_outbox_seals_a_batch_larger_than_its_buffers_into_one_of_its_own_and_reports_each_send():
    """A batch of exactly a buffer's size takes a pooled buffer, a larger one its own; ``on_sent`` hears every send."""
    a, b = await _channels()
    size = RecordSender.frame_size(1000, False)  # one 1000-byte record fills a buffer
    sent: list[int] = []

    async def on_sent(n: int) -> None:
        sent.append(n)

    batches = [[os.urandom(1000)], [os.urandom(1000), os.urandom(1000)]] * 3
    async with trio.open_nursery() as nursery:
        outbox = Outbox(a, size, buffers=2, on_sent=on_sent)
        nursery.start_soon(outbox.run)
        sizes = [await outbox.put([(m, False) for m in batch]) for batch in batches]
        outbox.close()
    assert sizes == [size, 2 * size] * 3 and sent == sizes
    assert [(await b.receive()).data for _ in range(9)] == [m for batch in batches for m in batch]


async def test_the_buffers_one_outbox_sealed_into_serve_the_next():
    """A round's Outbox gives its buffers back once all is sent, and the next round's
    takes them: the stop-and-copy seals into memory already touched (fresh buffers
    cost a page fault a page there: 13 of 18 ms for 530 scattered pages)."""
    a, b = await _channels()
    size = RecordSender.frame_size(1000, False)
    spares: list[bytearray] = []
    seen: list[set[int]] = []
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            outbox = Outbox(a, size, buffers=2, spares=spares)
            assert not spares  # taken
            nursery.start_soon(outbox.run)
            for _ in range(3):
                await outbox.put([(os.urandom(1000), False)])
            outbox.close()
        seen.append({id(buf) for buf in spares})
        assert len(spares) == 2
    assert seen[0] == seen[1]
    assert len([(await b.receive()).data for _ in range(6)]) == 6


async def test_a_migration_reads_its_pages_into_the_same_buffers_every_round(cluster, monkeypatch):
    from palm_net.migration import runner

    made = []
    empty = np.empty

    def counting(shape, *args, **kwargs):  # type: ignore[no-untyped-def]
        if shape == (runner.PER_HOP * runner.MAX_DATA_PAGES, 4096):
            made.append(shape)
        return empty(shape, *args, **kwargs)

    monkeypatch.setattr(runner.np, "empty", counting)
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, workload="random:3000", seed=4)
    await trio.sleep(0.2)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res.ok, res.error
    assert len(res.stats.rounds) >= 2  # round 0 and the stop-and-copy at least
    assert len(made) == runner.READ_AHEAD + 1


async def test_a_sessions_socket_queues_are_bounded_where_the_link_keeps_its_rate(monkeypatch):
    """What the kernel queues between two agents when a hypervisor pauses its guest is
    drained inside the downtime (docs/QEMU.md: a QEMU guest's median 26 -> 14 ms): unsent
    bytes are bounded on every session, the receive window only where the round trip
    lets it still carry LINK_RATE; on a long one the kernel's autotuning stays."""
    from palm_net.channel import transport

    if not hasattr(socket, "TCP_INFO"):
        pytest.skip("TCP_INFO is Linux's")
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
    server = await listener.accept()
    for _ in range(3):  # round trips: the kernel's estimate
        await client.send_all(b"x")
        await server.receive_some(1)
        await server.send_all(b"y")
        await client.receive_some(1)
    autotuned = client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    transport.bound_queues(server)
    assert server.socket.getsockopt(socket.IPPROTO_TCP, transport.TCP_NOTSENT_LOWAT) == transport.NOTSENT_LOWAT
    window = min(transport.RECEIVE_QUEUE, transport._rmem_max())
    assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * window  # (the kernel's double)
    monkeypatch.setattr(transport, "LINK_RATE", 1e15)  # no round trip short enough
    transport.bound_queues(client)
    assert client.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == autotuned
    assert client.socket.getsockopt(socket.IPPROTO_TCP, transport.TCP_NOTSENT_LOWAT) == transport.NOTSENT_LOWAT
    for s in (client, server, listener):
        await s.aclose()


# --------------------------------------------------------------------------
# Incoming memory: reserved ahead of the data, no write past a full disk


def test_incoming_memory_is_reserved_before_it_is_written_and_a_failed_reservation_ends_the_migration(
        shm, monkeypatch):
    from palm_net import hostfs
    from palm_net.hypervisor import reserver

    real = hostfs.reserve

    def reserve(fd: int, size: int, what: str, offset: int = 0) -> None:
        if offset >= 32 << 20:  # the file system is full from 32 MiB on
            raise hostfs.UnsafePathError(f"no room for {what}: the file system is full")
        real(fd, size, what, offset)

    monkeypatch.setattr(reserver, "reserve", reserve)
    src = ModelVM.create(shm / "src", "vm", 16384, KEY, fill="random", seed=3)  # 64 MiB
    store = HandoffStore(shm / "d.db")
    dest = DestinationDriver(store, lambda mid, b: ModelVM.create_incoming(shm / "dst", b.vm, b.vm_id, b.pages,
                                                                           b.vcpus, KEY, migration=mid))
    _, msgs = source_messages(src, MigrationParams(max_rounds=1))
    with pytest.raises(MigrationFailure) as info:
        for m in msgs:
            dest.feed(m)
    assert info.value.code == "no-space"
    dest.fail(info.value)
    assert not (shm / "dst").exists()  # scrubbed, what was reserved only
    src.close()


def test_a_hypervisors_ram_file_is_reserved_and_faulted_in_beside_its_writer_its_content_untouched(shm):
    """QEMU's RAM file (the agent does not write it): reserved, then every page faulted in
    from the top down, while the writer writes; what it wrote before and meanwhile stays,
    and all of the file is allocated once the reservation is waited for."""
    import mmap

    from palm_net.hypervisor.reserver import Reserver

    size, page = 96 << 20, 4096
    path = shm / "guest.ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as ram:
            ram[5 * page : 5 * page + 8] = b"written!"
            helper = Reserver(path, None, size, "the guest's memory", fault_in=True)
            ram[size - page : size - page + 8] = b"top page"  # meanwhile
            helper.wait(size, writing=False)
            assert os.fstat(fd).st_blocks * 512 >= size
            helper.stop()
            assert ram[5 * page : 5 * page + 8] == b"written!"
            assert ram[size - page : size - page + 8] == b"top page"
            assert ram[6 * page : 7 * page] == bytes(page)
    finally:
        os.close(fd)


def _incoming_ram(shm, size: int, fault_in: bool = True, name: str = "guest.ram"):
    """A RAM file of ``size`` bytes, not yet allocated, and a Reserver reserving it (and
    faulting it in) as an incoming QEMU's (the caller stops it)."""
    from palm_net.hypervisor.reserver import Reserver

    path = shm / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    return fd, Reserver(path, None, size, "the guest's memory", fault_in=fault_in)


def _allocated(fd: int, size: int) -> bool:
    return os.fstat(fd).st_blocks * 512 >= size


def test_an_incoming_qemus_ram_is_faulted_in_from_the_top_beside_its_reservation(shm, monkeypatch):
    """The fault-in has to stay ahead of QEMU's writes, so it does not wait behind a
    reservation of the whole file (0.4 s a GiB on a slow host): it runs beside it, from
    the top down, while the reservation goes on from the bottom at a lower priority (the
    fault-in's head start is what keeps it ahead); both end at stop()."""
    import threading

    from palm_net.hypervisor import reserver

    faulted: list[int] = []
    reserving, go = threading.Event(), threading.Event()
    real_populate, real_reserve = reserver.populate, reserver.reserve

    def populate(addr: int, length: int, write: bool = True) -> bool:
        faulted.append(length)
        return real_populate(addr, length, write)

    def reserve(fd: int, size: int, what: str, offset: int = 0) -> None:
        reserving.set()
        go.wait(10)  # the reservation held at its first chunk
        real_reserve(fd, size, what, offset)

    monkeypatch.setattr(reserver, "populate", populate)
    monkeypatch.setattr(reserver, "reserve", reserve)
    size = 3 * reserver.Reserver.CHUNK
    fd, helper = _incoming_ram(shm, size)
    try:
        assert reserving.wait(10)
        deadline = time.monotonic() + 10
        while len(faulted) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(faulted) == 3  # all of it faulted in while the reservation waited
        assert os.getpriority(os.PRIO_PROCESS, helper._thread.native_id or 0) >= 10  # where CPU is short: the fault-in
        go.set()
        helper.wait(size, writing=False)
        assert _allocated(fd, size)
        helper.stop()
        assert helper._faulter is not None and not helper._faulter.is_alive()
    finally:
        go.set()
        os.close(fd)


def test_the_reservation_does_not_wait_behind_the_fault_in(shm, monkeypatch):
    """PREPARE waits for the reservation, not for the fault-in: with the fault-in held at
    its first chunk, the whole file is reserved all the same (on a large guest streamed
    fast, a reservation behind the fault-in would be seconds of downtime)."""
    import threading

    from palm_net.hypervisor import reserver

    held, go = threading.Event(), threading.Event()

    def populate(addr: int, length: int, write: bool = True) -> bool:
        held.set()
        return go.wait(10)

    monkeypatch.setattr(reserver, "populate", populate)
    size = 3 * reserver.Reserver.CHUNK
    fd, helper = _incoming_ram(shm, size)
    try:
        assert held.wait(10)
        t0 = time.monotonic()
        helper.wait(size, writing=False)  # while the fault-in is still held
        assert time.monotonic() - t0 < 5 and not go.is_set() and _allocated(fd, size)
        go.set()
        helper.stop()
    finally:
        go.set()
        os.close(fd)


def test_a_fault_in_put_off_starts_when_asked_and_never_after_stop(shm):
    """An incoming RAM file whose QEMU may leave alone the pages it is not sent (9.0+ on
    multifd) is reserved but not faulted in until the stream's shape is known: asked
    then (one channel: QEMU reads every page it is sent), all of it is faulted in;
    once stopped, a late ask starts nothing."""
    from palm_net.hypervisor.reserver import Reserver

    size = 2 * Reserver.CHUNK
    fd, helper = _incoming_ram(shm, size, fault_in=False)
    try:
        helper.wait(size, writing=False)
        assert _allocated(fd, size) and data_bytes(fd) == 0 and helper._faulter is None
        helper.start_fault_in()
        assert helper._faulter is not None
        helper._faulter.join(30)
        assert data_bytes(fd) == size
        helper.stop()
    finally:
        os.close(fd)
    fd, late = _incoming_ram(shm, size, fault_in=False, name="late.ram")
    try:
        late.stop()
        late.start_fault_in()
        assert late._faulter is None and data_bytes(fd) == 0
    finally:
        os.close(fd)


def test_a_fault_in_that_fails_leaves_the_reservation_whole(shm, monkeypatch):
    """The fault-in is a speed-up only: its failure (no address space for its mapping,
    say) must not fail a reservation that has room."""
    import mmap as mmap_module

    from palm_net.hypervisor import reserver

    def no_mapping(*args: object, **kwargs: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap_module, "mmap", no_mapping)
    size = 2 * reserver.Reserver.CHUNK
    fd, helper = _incoming_ram(shm, size)
    try:
        helper.wait(size, writing=False)  # no NoRoomError
        assert _allocated(fd, size)
        helper.stop()
    finally:
        os.close(fd)


def test_a_reservation_stopped_midway_ends_its_thread_and_fails_a_wait_rather_than_hanging(shm, monkeypatch):
    """Stopped (the VM scrubbed, or the agent closing) while a chunk is being reserved: a
    wait for the rest fails at once, and the helper thread ends after that chunk."""
    import threading

    from palm_net.hypervisor import reserver
    from palm_net.hypervisor.backend import NoRoomError

    started, go = threading.Event(), threading.Event()

    def reserve(fd: int, size: int, what: str, offset: int = 0) -> None:
        started.set()
        go.wait(10)

    monkeypatch.setattr(reserver, "reserve", reserve)
    path = shm / "guest.ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 256 << 20)
    os.close(fd)
    helper = reserver.Reserver(path, None, 256 << 20, "the guest's memory", fault_in=True)
    assert started.wait(10)
    stopper = threading.Thread(target=helper.stop)
    stopper.start()
    with pytest.raises(NoRoomError, match="stopped"):
        helper.wait(256 << 20, writing=False)
    go.set()
    stopper.join(10)
    assert not stopper.is_alive() and not helper._thread.is_alive()


def test_an_incoming_qemus_ram_is_reserved_beside_its_stream_only_where_the_file_system_allocates_natively(
        shm, monkeypatch):
    """Elsewhere glibc imitates fallocate by writing zero bytes, which would race QEMU's
    own writes: there the file is reserved whole before QEMU starts, as before, and its
    helper only faults it in."""
    from palm_net.hypervisor import qemu
    from palm_net.hypervisor.qemu import Confinement, QemuVM

    def make(name: str) -> QemuVM:
        config = {"backend": "qemu", "name": name, "vm_id": os.urandom(16).hex(), "memory_mib": 64, "vcpus": 1,
                  "machine": "pc", "accel": "tcg", "args": [], "local_args": [], "state": "incoming",
                  "policy": "any", "migration": None, "pid": None}
        return QemuVM._new(shm / name, shm / "run", Confinement(uids=None, allow_unconfined=True), config,
                           reserve_now=False)

    (shm / "run").mkdir(mode=0o700)
    native = make("native")  # tmpfs allocates natively: the file is sparse, its helper reserves it
    assert not native._ram_reserved and os.stat(native.dir / "guest.ram").st_blocks * 512 < 64 << 20
    monkeypatch.setattr(qemu, "reserves_natively", lambda fd: False)
    imitated = make("imitated")
    assert imitated._ram_reserved and os.stat(imitated.dir / "guest.ram").st_blocks * 512 >= 64 << 20


# --------------------------------------------------------------------------
# The memory digest, page by page (proto 7.4)


def _migrate_digest(shm: Path, sneak: bool = False) -> tuple[ModelVM, ModelVM]:
    """A protected VM migrated with the digest kept page by page; ``sneak``: the
    guest writes a page behind the dirty log's back during round 0."""
    src = ModelVM.create(shm / "src", "vm", 2048, KEY, protected_processes=2, protected_pages=256,
                         fill="half", seed=9)
    src.process_write(0, src.processes[0].first + 3, b"in the process view at the pause")  # plaintext in memory

    def between(r: int) -> None:
        if sneak and r == 0:
            src.arrays.pages[5, :8] = np.frombuffer(b"missed!!", np.uint8)

    _, msgs = source_messages(src, MigrationParams(max_rounds=3, downtime_limit=1e-9, verify_digest=True), 2,
                              between)
    dest = DestinationDriver(HandoffStore(shm / "d.db"), lambda mid, b: ModelVM.create_incoming(
        shm / "dst", b.vm, b.vm_id, b.pages, b.vcpus, KEY, migration=mid))
    for m in msgs:
        dest.feed(m)
    assert isinstance(dest.vm, ModelVM)
    return src, dest.vm


def test_the_digest_kept_page_by_page_is_the_digest_of_memory(shm):
    src, dst = _migrate_digest(shm)
    # The destination's, kept as it wrote, and the source's, kept as it sent:
    # both equal the digest of the memory they describe, read afresh.
    assert dst.page_digest() == dst.digest() == src.page_digest() == src.digest()


def test_a_write_the_dirty_log_missed_is_found_after_the_handoff(shm):
    src, dst = _migrate_digest(shm, sneak=True)
    # READY's digest matches what was sent (the destination holds exactly that) ...
    assert dst.page_digest() == src.page_digest()
    # ... and the check after DONE finds the source's memory at the pause is not it.
    stats = MigrationStats(digest=src.page_digest())
    trio.run(orchestrate._check_digest_at_pause, src, stats, os.urandom(16))
    assert stats.digest_at_pause == "differs" and stats.digest_check is not None
    stats = MigrationStats(digest=src.digest())
    trio.run(orchestrate._check_digest_at_pause, src, stats, os.urandom(16))
    assert stats.digest_at_pause == "equal"


async def test_verify_digest_end_to_end_checks_memory_at_the_pause(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, protected=2, workload="random:2000+protected:500", seed=4)
    await trio.sleep(0.2)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True))
    assert res.ok, res.error
    assert res.stats.digest and res.stats.digest_at_pause == "equal"
    d = res.as_dict()
    assert d["digest_at_pause"] == "equal" and d["digest_check_ms"] is not None


def test_units_group_data_records_with_their_message(shm):
    src = ModelVM.create(shm / "s", "vm", 600, KEY, fill="random", seed=1)
    _, msgs = source_messages(src, MigrationParams(max_rounds=1))
    us = units(msgs)
    pages = [u for u in us if isinstance(u.body, Pages)]
    assert sum(len(u.data) for u in us) + len(us) == len(msgs)
    assert all(sum(map(len, u.data)) == u.body.bulk for u in pages)
    src.close()


def test_the_agent_can_say_what_backs_guest_memory(tmp_path):
    from palm_net.hostfs import memory_backing

    shm = Path("/dev/shm")
    if shm.is_dir():
        assert memory_backing(shm).startswith(("tmpfs", "unknown"))
    assert memory_backing(tmp_path)  # whatever it is, one short line


def test_the_stream_is_read_as_it_comes_not_held_to_fill_a_buffer():
    """A QEMU stream read takes what QEMU has written and returns: it does not wait
    for more to fill its buffer.  (It did, on a socket with a timeout: the last
    megabyte of a stream, zero-page markers that come slowly, was held back and
    arrived after the guest's pause, 50-100 ms of downtime on a 1 GiB guest.)
    With the wait, the first read here ends in the socket's timeout."""
    ours, qemu = socket.socketpair()
    with ours, qemu:
        ours.settimeout(1.0)
        out = memoryview(bytearray(1 << 20))
        qemu.sendall(b"x" * 100)
        assert read_stream(ours, out) == (100, False)
        qemu.sendall(b"y" * 10)
        qemu.shutdown(socket.SHUT_WR)  # QEMU closed its end: the stream ended
        assert read_stream(ours, out) == (10, True)
        assert bytes(out[:10]) == b"y" * 10
        assert read_stream(ours, out) == (0, True)


# --------------------------------------------------------------------------
# The destination's runner: page batches written beside, requests in order
# (palm_net.migration.runner.DestinationRun._process and its _Applier)


@pytest.mark.parametrize("channels", [1, 2])
async def test_each_request_of_the_destination_waits_until_the_pages_before_it_are_written(cluster, monkeypatch,
                                                                                          channels):
    """Guards the applier's drain and count: keys, settling, CPU state, READY wait for the pages before them
    (with 2 channels: the pages of every channel)."""
    import threading
    import time

    from palm_net import faults
    from palm_net.migration import runner
    from palm_net.migration.hosts import DestinationHost

    lock, unwritten, seen = threading.Lock(), [0], []  # batches handed to the applier, not yet written
    submit, bulk = runner._Applier.submit, DestinationHost.bulk

    async def counted_submit(self, effects, bufs, release=None):
        if effects:
            with lock:
                unwritten[0] += 1
        await submit(self, effects, bufs, release)

    def slow_bulk(self, effects):
        time.sleep(0.002)  # a disk a little slower than the session task: no request may overtake it
        bulk(self, effects)
        with lock:
            unwritten[0] -= 1

    def watch(at: str) -> None:
        if at.startswith("destination.") and at not in ("destination.receive", "destination.ApplyPages"):
            with lock:
                seen.append((at, unwritten[0]))

    monkeypatch.setattr(runner._Applier, "submit", counted_submit)
    monkeypatch.setattr(DestinationHost, "bulk", slow_bulk)
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1, fill="random", seed=5, workload="random:2000")
    old = faults.install(watch)
    try:
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(max_rounds=3, channels=channels))
    finally:
        faults.install(old)
    assert res.ok, res.error
    steps = {at for at, _ in seen}
    assert {"destination.ImportKeys", "destination.Settle", "destination.ImportCpuState",
            "destination.ImportProtection", "destination.Prepare", "destination.Send"} <= steps, steps
    assert [s for s in seen if s[1]] == []


async def test_a_worker_thread_on_a_quiet_stream_returns_when_its_nursery_is_cancelled():
    """A thread cannot be cancelled: one reading a stream that says nothing (a quiet QEMU
    multifd channel) held its nursery, and the failure path behind it, for the stream's
    timeout.  runner.unblock_on_cancel shuts the streams down (not closed: the thread
    still uses the descriptor), so the read returns at once."""
    from palm_net.migration.runner import shut_down, unblock_on_cancel

    ours, qemu = socket.socketpair()
    ours.settimeout(15)  # past the test's own deadline (without the fix: fails after this)
    returned = []

    def read() -> None:
        returned.append(read_stream(ours, memoryview(bytearray(64))))

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(unblock_on_cancel, trio.CancelScope(), lambda: shut_down([ours]))
                nursery.start_soon(trio.to_thread.run_sync, read)
                await trio.sleep(0.2)  # the thread waits in recv by now (if not, it returns all the same)
                nursery.cancel_scope.cancel()
        assert returned == [(0, True)]  # the stream's end, seen by the thread
    finally:
        ours.close()
        qemu.close()


async def test_an_operators_cancel_ends_the_hypervisors_streams_at_once():
    """A cancel while a QEMU guest's streams are carried: a pump waiting on a quiet one
    (a multifd stream between QEMU's syncs) held the cancel past its grace, and the
    destination saw the session cut instead of ABORT.  The stop shuts them down."""
    from palm_net.migration.runner import SourceRun

    ours, qemu = socket.socketpair()
    ours.settimeout(15)  # (without the fix: the read returns after this, past the test's deadline)
    run = object.__new__(SourceRun)  # (its stop's part only)
    run._woken, run._streams, run._relays = trio.Event(), [ours], []
    returned = []
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, lambda: returned.append(read_stream(ours, memoryview(
                    bytearray(64)))))
                await trio.sleep(0.2)  # the thread waits in recv by now (if not, it returns all the same)
                run._wake_for_stop()
        assert returned == [(0, True)] and run._woken.is_set()
    finally:
        ours.close()
        qemu.close()


async def test_a_failed_stream_unblocks_the_readers_of_the_others():
    """SourceRun._send_stream: one of the hypervisor's streams fails (its channel's send
    failed) while another is quiet: the reader of the quiet one, a worker thread, returns
    at once (its stream shut down), not after the stream's timeout."""
    from palm_net.migration import runner

    pairs = [socket.socketpair() for _ in range(2)]
    streams = [ours for ours, _ in pairs]
    for s in streams:
        s.settimeout(15)  # past the test's own deadline: without the shut-down, the read waits this long
    returned = []
    reading = trio.Event()

    async def send_one(conn: socket.socket, channel: int, ch: object) -> None:
        if channel:
            await reading.wait()  # (the other's thread starts before this fails)
            raise LocalProtocolError(ErrorCode.CLOSED, "channel 1's session failed")
        reading.set()
        returned.append(await trio.to_thread.run_sync(read_stream, conn, memoryview(bytearray(64))))

    run = object.__new__(runner.SourceRun)  # (the streams' part only: no session)
    run.ch, run.data_channels, run._streams = SimpleNamespace(stream=None), [SimpleNamespace(stream=None)], streams
    run._send_one_stream = send_one
    try:
        with trio.fail_after(10):
            with pytest.raises(BaseExceptionGroup):
                await run._send_stream()
        assert returned == [(0, True)] and run._streams == []  # the quiet one's end seen; both closed
    finally:
        for ours, qemu in pairs:
            ours.close()
            qemu.close()


def test_the_dirty_log_is_cleared_in_place_as_it_is_collected(shm):
    """collect_dirty names each page written since the last collection, once: the log is
    cleared where it lies (no fresh log in the pause), and a write after it is seen next time."""
    vm = ModelVM.create(shm / "vm", "vm", 64, KEY)
    try:
        vm.enable_dirty_log()
        log = vm._dirty
        for gfn in (3, 40, 3):
            vm.guest_write(gfn, b"x")
        assert list(vm.collect_dirty()) == [3, 40]
        assert not len(vm.collect_dirty())
        vm.guest_write(7, b"y")
        assert list(vm.collect_dirty()) == [7]
        assert vm._dirty is log
    finally:
        vm.close()


def test_scattered_zero_page_candidates_are_scanned_a_few_at_a_time():
    """_zero_pages on a dirty set (gfns not contiguous): right about each page, a page whose
    first word alone is zero included, without gathering all 2048 candidates at once (8 MiB)."""
    import tracemalloc

    from palm_net.hypervisor.model import _zero_pages

    words = np.zeros((4096, 512), np.uint64)  # 16 MiB of pages, all zero but these
    words[10, 0] = 1  # its first word
    words[20, 511] = 1  # its last word: the first word is zero
    gfns = np.arange(0, 4096, 2, dtype=np.uint64)  # 2048 scattered gfns
    tracemalloc.start()
    try:
        zero = _zero_pages(words, gfns, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not zero[5] and not zero[10] and int(np.count_nonzero(~zero)) == 2
    assert peak < 1 << 20, peak
