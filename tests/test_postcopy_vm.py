"""The model's side of post-copy (proto/PROTOCOL.md 7.9): the source's final metadata at the
switch, the destination's durable map of missing pages, MISSING's metadata under the blob's
digest (7.3), pages filled while the guest runs (and refused whole: replay, rollback,
integrity), a guest access waiting for its page, a restart mid-way, the end of the map."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from palm_net.hypervisor.backend import KIND_NORMAL, KIND_PROTECTED, KIND_ZERO, PAGE_SIZE, PageBatch
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.model_guest import VIEW_CIPHER, VIEW_PROCESS, VmError
from palm_net.hypervisor.model_postcopy import MAP_FILE, MAP_MAGIC, PostcopyPageError
from palm_net.hypervisor.protection import TAG_LEN, ProtectionIntegrityError
from palm_net.hypervisor.vmconfig import load_config
from palm_net.hypervisor.workload import Workload
from palm_net.wire.messages import MAX_DATA_PAGES

from .conftest import KEY

NPAGES = 64
ROUND = 2  # the switch's round: the last round (1) + 1
WAIT = 5.0  # the most any thread is waited for


def read(vm: ModelVM, gfns, round_no: int) -> list[PageBatch]:
    """The page records of ``gfns`` as the source sends them, copied (read_pages reuses its buffer)."""
    gfns = np.asarray(gfns, np.uint64)
    out = np.empty((MAX_DATA_PAGES, PAGE_SIZE), np.uint8)
    batches, i = [], 0
    while i < len(gfns):
        b, i = vm.read_pages(gfns, i, round_no, out)
        batches.append(PageBatch(b.gfns.copy(), bytes(b.kinds), b.vers.copy(), bytes(b.data), bytes(b.tags)))
    return batches


def one(vm: ModelVM, gfns, round_no: int = ROUND) -> PageBatch:
    (b,) = read(vm, gfns, round_no)
    return b


def protected_count(vm: ModelVM, gfns) -> int:
    return int(np.count_nonzero(vm.arrays.owners[np.asarray(gfns, np.uint64)]))


@dataclass
class Switch:
    """A source paused at the switch, and what it sent before."""

    src: ModelVM
    sent: list[PageBatch]  # round 1: every page
    missing: np.ndarray  # what the stop-and-copy would have sent
    vers: np.ndarray  # MISSING's versions (the round for a normal page)
    tags: bytes
    fills: list[PageBatch]  # the missing pages as the source serves them (read before anything touches it)
    digest: str  # the source's memory at the switch


@pytest.fixture
def switch(shm) -> Switch:
    src = ModelVM.create(shm / "src", "vm", NPAGES, KEY, protected_processes=2, protected_pages=16,
                         fill="half", seed=5)
    p0, p1 = src.processes
    src.enable_dirty_log()
    sent = read(src, np.arange(NPAGES), 1)
    # The guest goes on between the last round and the pause: normal pages, one made
    # zero, a zero page made non-zero, and protected pages its processes write (left
    # in their process view, plaintext in memory, until something seals them).
    src.guest_write(3, b"after round one" * 10, 50)
    src.guest_write(5, bytes(PAGE_SIZE))
    src.guest_write(40, b"fresh")
    for g in (7, 8, 9, 20, 33):
        src.guest_write(g, os.urandom(64), 8 * g)
    src.process_write(0, p0.first + 1, b"secret of process 0", 100)
    src.process_write(1, p1.first + 4, b"secret of process 1", 7)
    src.process_write(1, p1.first + 6, b"another", 0)
    src.pause()
    missing = src.collect_dirty()
    src.disable_dirty_log()
    assert src.arrays.views[p0.first + 1] == VIEW_PROCESS
    kinds, vers, tags = src.read_metadata(missing)
    kinds_a = np.frombuffer(kinds, np.uint8)
    assert list(kinds_a) == [KIND_PROTECTED if src.arrays.owners[g] else KIND_NORMAL for g in missing]
    vers = np.where(kinds_a == KIND_NORMAL, ROUND, vers).astype(np.uint64)  # the engine puts the round there
    return Switch(src, sent, missing, vers, tags, read(src, missing, ROUND), src.digest())


def tags_of(sw: Switch, sel: np.ndarray) -> bytes:
    """MISSING's MACs for the missing pages selected by the boolean ``sel``."""
    prot = sw.src.arrays.owners[sw.missing] != 0
    rows = np.frombuffer(sw.tags, np.uint8).reshape(-1, TAG_LEN)
    return rows[(np.cumsum(prot) - 1)[sel & prot]].tobytes()


def incoming(shm: Path, sw: Switch, name: str = "dst") -> ModelVM:
    """An incoming VM as the destination builds it, holding every page of round one."""
    dst = ModelVM.create_incoming(shm / name, "vm", sw.src.vm_id, NPAGES, sw.src.vcpus, KEY, migration=b"m" * 16)
    dst.start_page_digest()
    dst.import_keys(sw.src.export_keys())
    for b in sw.sent:
        dst.write_pages(b)
    return dst


def announce(dst: ModelVM, sw: Switch, vers: np.ndarray | None = None, tags: bytes | None = None) -> None:
    """MISSING in two messages (the split falls among the protected pages)."""
    vers = sw.vers if vers is None else vers
    tags = sw.tags if tags is None else tags
    k = len(sw.missing) - 2
    first = protected_count(dst, sw.missing[:k])
    dst.set_missing(ROUND, sw.missing[:k], vers[:k], tags[: first * TAG_LEN])
    dst.set_missing(ROUND, sw.missing[k:], vers[k:], tags[first * TAG_LEN :])


def pulling(shm: Path, sw: Switch, name: str = "dst") -> ModelVM:
    """The destination after COMMIT: metadata verified, synced, running with pages missing."""
    dst = incoming(shm, sw, name)
    announce(dst, sw)
    dst.import_cpu_state(sw.src.export_cpu_state())
    dst.import_protection(sw.src.export_protection())
    dst.sync()
    dst.activate()
    assert dst.running and dst.missing_count() == len(sw.missing)
    return dst


def pieces(sw: Switch, gfns) -> PageBatch:
    """The records of ``gfns`` (missing pages, of one fill) from the fills read at the switch."""
    want = {int(g) for g in gfns}
    for b in sw.fills:
        keep = np.array([int(g) in want for g in b.gfns])
        if keep.any():
            kinds = np.frombuffer(b.kinds, np.uint8)
            rows = np.frombuffer(b.data, np.uint8).reshape(-1, PAGE_SIZE)
            has_data = kinds != KIND_ZERO
            prot = kinds == KIND_PROTECTED
            trows = np.frombuffer(b.tags, np.uint8).reshape(-1, TAG_LEN)
            return PageBatch(b.gfns[keep].copy(), kinds[keep].tobytes(), b.vers[keep].copy(),
                             rows[keep[has_data]].tobytes(), trows[keep[prot]].tobytes())
    raise AssertionError(f"no fill holds {want}")


def refused(dst: ModelVM, batch: PageBatch, code: str) -> None:
    """``batch`` is refused with ``code`` and changes nothing: memory, metadata, the map."""
    before = dst.memory_bytes(), bytes(dst.meta.map), dst.postcopy_state()
    with pytest.raises(PostcopyPageError) as err:
        dst.fill_missing(batch)
    assert err.value.code == code
    after = dst.memory_bytes(), bytes(dst.meta.map), dst.postcopy_state()
    assert after[:2] == before[:2]
    assert after[2][0] == before[2][0] and all((x == y).all() for x, y in zip(after[2][1:], before[2][1:]))


def same_memory(a: ModelVM, b: ModelVM) -> None:
    """Page by page: unprotected pages byte-equal, protected ones as their process reads them."""
    for g in range(NPAGES):
        owner = int(a.arrays.owners[g])
        if owner:
            assert a.process_read(owner - 1, g) == b.process_read(owner - 1, g), g
        else:
            assert a.os_read(g) == b.os_read(g), g


# --------------------------------------------------------------------------


def test_read_metadata_seals_pages_in_their_process_view_and_read_pages_sends_that_metadata(switch):
    sw = switch
    src, p0 = sw.src, sw.src.processes[0]
    assert src.arrays.views[p0.first + 1] == VIEW_CIPHER  # sealed by read_metadata
    prot = src.arrays.owners[sw.missing] != 0
    assert prot.sum() == 3 and (sw.vers[prot] >= 2).all()  # written since round one: a new version
    got_vers = np.concatenate([b.vers[np.frombuffer(b.kinds, np.uint8) == KIND_PROTECTED] for b in sw.fills])
    assert (got_vers == sw.vers[prot]).all()
    assert b"".join(b.tags for b in sw.fills) == sw.tags
    _, vers_again, tags_again = src.read_metadata(sw.missing)  # nothing moves once sealed
    assert (vers_again[prot] == sw.vers[prot]).all() and tags_again == sw.tags
    with pytest.raises(ValueError):
        src.read_metadata(np.array([5, 3], np.uint64))
    src.resume()
    with pytest.raises(VmError):
        src.read_metadata(sw.missing)


def test_missing_metadata_is_what_the_blob_s_digest_checks(shm, switch):
    sw = switch
    blob = sw.src.export_protection()
    dst = incoming(shm, sw, "ok")
    announce(dst, sw)
    dst.import_protection(blob)  # the table holds exactly the final versions and MACs
    # Without MISSING the table holds the older copies: refused.
    stale = incoming(shm, sw, "stale")
    with pytest.raises(ProtectionIntegrityError):
        stale.import_protection(blob)
    # One announced version or MAC altered: refused.
    prot = np.flatnonzero(sw.src.arrays.owners[sw.missing] != 0)
    vers = sw.vers.copy()
    vers[prot[1]] += 1
    bumped = incoming(shm, sw, "bumped")
    announce(bumped, sw, vers=vers)
    with pytest.raises(ProtectionIntegrityError):
        bumped.import_protection(blob)
    tags = bytearray(sw.tags)
    tags[TAG_LEN + 3] ^= 1
    forged = incoming(shm, sw, "forged")
    announce(forged, sw, tags=bytes(tags))
    with pytest.raises(ProtectionIntegrityError):
        forged.import_protection(blob)


def test_set_missing_refuses_what_does_not_fit(shm, switch):
    sw = switch
    dst = incoming(shm, sw)
    m, v = sw.missing, sw.vers
    n_prot = protected_count(dst, m)
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, m, v, sw.tags[:-1])  # a MAC short
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, m, v, sw.tags + bytes(TAG_LEN))  # one too many
    normal = np.flatnonzero(dst.arrays.owners[m] == 0)[0]
    bad = v.copy()
    bad[normal] = ROUND + 1
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, m, bad, sw.tags)  # a normal page comes with the round
    prot = np.flatnonzero(dst.arrays.owners[m] != 0)[0]
    bad = v.copy()
    bad[prot] = 0
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, m, bad, sw.tags)  # older than the copy received
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, np.array([NPAGES], np.uint64), np.array([ROUND], np.uint64), b"")
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, m[::-1], v[::-1], sw.tags)
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, np.array([-1]), np.array([ROUND]), b"")
    assert dst.postcopy_state() is None and not (dst.dir / MAP_FILE).exists()  # nothing marked
    dst.set_missing(ROUND, m[:2], v[:2], b"")
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, m[1:3], v[1:3], b"")  # a page an earlier message marked
    with pytest.raises(ValueError):
        dst.set_missing(ROUND + 1, m[2:3], np.array([ROUND + 1], np.uint64), b"")  # another round
    assert n_prot and dst.missing_count() == 2


def test_the_map_is_a_file_of_the_vm_and_a_restart_finds_it_as_it_was(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    raw = (dst.dir / MAP_FILE).read_bytes()
    assert raw[:8] == MAP_MAGIC and int.from_bytes(raw[8:16], "little") == ROUND
    assert len(raw) == 64 + NPAGES and sorted(np.flatnonzero(np.frombuffer(raw[64:], np.uint8))) == list(sw.missing)
    rnd, gfns, vers = dst.postcopy_state()
    assert rnd == ROUND and (gfns == sw.missing).all() and (vers == sw.vers).all()
    half = sw.missing[: len(sw.missing) // 2]
    dst.fill_missing(pieces(sw, half))
    # An agent killed mid-fill (kill -9: the shared mappings keep what it wrote): the
    # page's data partly written, its byte still set (claimed by the fill).
    cut = int(sw.missing[-1])
    dst._postcopy.bits[cut] = 2
    dst.arrays.pages[cut, :100] = 0xEE
    before = dst.postcopy_state()
    dst.close()  # the agent restarts
    dst = ModelVM.open(shm / "dst", load_config(shm / "dst"), KEY)
    after = dst.postcopy_state()
    assert after[0] == before[0] and (after[1] == before[1]).all() and (after[2] == before[2]).all()
    assert dst.running and dst.missing_count() == len(sw.missing) - len(half) and cut in after[1]
    dst.fill_missing(pieces(sw, sw.missing[len(half) :]))
    assert dst.postcopy_state() is None and dst.digest() == sw.digest
    same_memory(sw.src, dst)


def test_a_map_planted_as_a_symlink_is_not_followed(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    dst.close()
    elsewhere = shm / "elsewhere"
    os.replace(dst.dir / MAP_FILE, elsewhere)
    os.symlink(elsewhere, dst.dir / MAP_FILE)
    with pytest.raises(VmError):
        ModelVM.open(shm / "dst", load_config(shm / "dst"), KEY)


def test_pages_fill_in_pieces_and_a_guest_access_waits_for_its_page(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    p0 = dst.processes[0]
    faults: list[int] = []
    asked = threading.Semaphore(0)

    def on_fault(gfn: int) -> None:
        assert dst._lock.acquire(timeout=WAIT)  # the caller does not hold the VM lock
        faults.append(gfn)
        dst._lock.release()
        asked.release()

    dst.on_fault = on_fault
    results: dict[str, bytes | BaseException] = {}

    def access(key: str, fn) -> threading.Thread:
        def run() -> None:
            try:
                results[key] = fn()
            except BaseException as exc:
                results[key] = exc
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    normal, secret = 3, p0.first + 1
    t1 = access("os", lambda: dst.os_read(normal))
    t2 = access("process", lambda: dst.process_read(0, secret))
    assert asked.acquire(timeout=WAIT) and asked.acquire(timeout=WAIT)
    assert sorted(faults) == [normal, secret]
    t1.join(0.2)
    assert t1.is_alive() and t2.is_alive() and not results  # waiting: nothing filled yet
    dst.os_read(0)  # a page that is here: no wait, no fault
    assert len(faults) == 2
    # Another piece first: they still wait.
    others = [g for g in sw.missing if g not in (normal, secret)]
    dst.fill_missing(pieces(sw, others[:3]))
    t1.join(0.1)
    assert t1.is_alive() and t2.is_alive()
    dst.fill_missing(pieces(sw, [normal]))
    t1.join(WAIT)
    assert results["os"] == sw.src.os_read(normal) and t2.is_alive()
    dst.fill_missing(pieces(sw, [secret]))
    t2.join(WAIT)
    assert results["process"][100:119] == b"secret of process 0"
    # A guest write to a page already filled neither waits nor asks.
    dst.guest_write(normal, b"x")
    assert len(faults) == 2
    dst.fill_missing(pieces(sw, others[3:]))
    assert dst.missing_count() == 0 and dst.postcopy_state() is None
    dst.guest_write(normal, sw.src.os_read(normal)[:1])  # as it was
    same_memory(sw.src, dst)
    assert dst.digest() == sw.digest
    assert dst.page_digest() == sw.digest  # every page as the migration wrote it
    assert dst.verify().ok


def test_a_refused_batch_is_refused_whole_with_its_code(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    owners = dst.arrays.owners
    normal = [int(g) for g in sw.missing if not owners[g]]
    prot = [int(g) for g in sw.missing if owners[g]]
    dst.fill_missing(pieces(sw, [normal[0]]))
    # replay: a page already filled (alone, or beside a missing one), or twice in a batch
    refused(dst, pieces(sw, [normal[0]]), "replay")
    refused(dst, pieces(sw, [normal[0], normal[1]]), "replay")
    refused(dst, one(sw.src, [normal[0]]), "replay")
    twice = pieces(sw, [normal[1]])
    refused(dst, PageBatch(np.repeat(twice.gfns, 2), twice.kinds * 2, np.repeat(twice.vers, 2),
                           bytes(twice.data) * (2 if twice.kinds != bytes([KIND_ZERO]) else 0), b""), "replay")
    refused(dst, one(sw.src, [0]), "replay")  # never missing
    # rollback: an older round of a normal page, an older version of a protected one
    refused(dst, one(sw.src, [normal[1]], ROUND - 1), "rollback")
    b = pieces(sw, [normal[1], prot[0]])
    b.vers = b.vers.copy()
    b.vers[1] -= 1
    refused(dst, b, "rollback")
    # integrity: ciphertext altered, another MAC, a protected page as a normal one, or a normal one as ciphertext
    b = pieces(sw, [normal[1], prot[0]])
    data = bytearray(b.data)
    data[-1] ^= 1
    refused(dst, PageBatch(b.gfns, b.kinds, b.vers, bytes(data), b.tags), "integrity")
    tags = bytearray(b.tags)
    tags[0] ^= 1
    refused(dst, PageBatch(b.gfns, b.kinds, b.vers, b.data, bytes(tags)), "integrity")
    refused(dst, PageBatch(b.gfns, bytes([b.kinds[0], KIND_NORMAL]), b.vers, b.data, b""), "integrity")
    p = pieces(sw, [prot[0]])
    refused(dst, PageBatch(np.array([normal[2]], np.uint64), p.kinds, np.array([ROUND], np.uint64), p.data, p.tags),
            "integrity")
    # The same ciphertext at another missing protected gfn (its MAC and version) does not open there.
    q = pieces(sw, [prot[1]])
    refused(dst, PageBatch(q.gfns, q.kinds, q.vers, p.data, q.tags), "integrity")
    refused(dst, PageBatch(b.gfns, b.kinds, b.vers, bytes(b.data)[:-1], b.tags), "integrity")  # not whole pages
    # Each refusal left its pages missing: all still arrive.
    for g in sw.missing[1:]:
        dst.fill_missing(pieces(sw, [g]))
    assert dst.missing_count() == 0 and dst.digest() == sw.digest


def test_finish_postcopy_removes_the_map_once_nothing_is_missing(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    with pytest.raises(VmError):
        dst.finish_postcopy()
    assert (dst.dir / MAP_FILE).exists()
    for b in sw.fills:  # the data as the receiver hands it on: records, each of whole pages
        data = bytes(b.data)
        dst.fill_missing(PageBatch(b.gfns, b.kinds, b.vers, [data[i : i + 2 * PAGE_SIZE]
                                                             for i in range(0, len(data), 2 * PAGE_SIZE)], b.tags))
    assert dst.page_digest() == sw.digest
    dst.finish_postcopy()
    assert not (dst.dir / MAP_FILE).exists() and dst.postcopy_state() is None
    dst.finish_postcopy()  # idempotent
    dst.close()
    dst = ModelVM.open(shm / "dst", load_config(shm / "dst"), KEY)
    assert dst.postcopy_state() is None and dst.missing_count() == 0
    dst.finish_postcopy()
    dst.guest_write(3, b"runs as any VM")


def test_scrub_removes_the_map_and_a_waiting_access_gives_up(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            dst.guest_write(int(sw.missing[0]), b"never")
        except BaseException as exc:
            errors.append(exc)

    asked = threading.Event()
    dst.on_fault = lambda gfn: asked.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert asked.wait(WAIT)
    dst.scrub()
    t.join(WAIT)
    assert not t.is_alive() and isinstance(errors[0], VmError)
    assert not (shm / "dst" / MAP_FILE).exists() and not (shm / "dst").exists()


def test_a_paused_vm_s_write_is_refused_not_left_waiting(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    dst.on_fault = lambda gfn: pytest.fail("a paused guest does not fault")
    dst.pause()
    with pytest.raises(VmError):
        dst.guest_write(int(sw.missing[0]), b"x")


def waiting_workload(dst: ModelVM) -> tuple[Workload, threading.Event]:
    """The guest's workload started on a pulling VM, and the event its first fault sets."""
    asked = threading.Event()
    dst.on_fault = lambda gfn: asked.set()
    wl = Workload(dst, "random:20000", seed=1)
    dst.workload = wl
    wl.start()
    return wl, asked


def test_the_workload_runs_with_pages_missing_and_goes_on_as_they_arrive(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    wl, asked = waiting_workload(dst)
    try:
        assert asked.wait(WAIT)  # it touched a missing page and waits for it
        for b in sw.fills:
            dst.fill_missing(b)
        seen = wl.writes
        done = threading.Event()
        for _ in range(int(WAIT / 0.05)):
            if wl.writes > seen + 50:
                done.set()
                break
            done.wait(0.05)
        assert done.is_set()
    finally:
        dst.close()


def test_two_appliers_racing_fill_each_page_once(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    batches = [pieces(sw, [g]) for g in sw.missing]
    taken: list[list[int]] = [[], []]
    start = threading.Barrier(2)

    def apply(me: int) -> None:
        start.wait(WAIT)
        for i, b in enumerate(batches):
            try:
                dst.fill_missing(b)
                taken[me].append(i)
            except PostcopyPageError as exc:
                assert exc.code == "replay"

    threads = [threading.Thread(target=apply, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    assert sorted(taken[0] + taken[1]) == list(range(len(batches)))  # each exactly once
    assert dst.missing_count() == 0 and dst.page_digest() == sw.digest == dst.digest()


def test_a_vm_still_pulling_is_no_operator_s_to_pause_destroy_or_migrate(shm, switch):
    """Its memory is not all here: migrating it on would read pages it does not hold."""
    from typing import cast

    from palm_net.agent.errors import AgentError
    from palm_net.agent.registry import VmRegistry
    from palm_net.hypervisor.qemu import Confinement
    from palm_net.migration.handoff import HandoffStore

    dst = pulling(shm, switch)
    reg = VmRegistry(shm / "mem", shm / "run", KEY, HandoffStore(shm / "r.db"), cast(Confinement, None), None,
                     lambda name: False)
    reg.vms = {"vm": dst}
    with pytest.raises(AgentError, match="still receives"):
        reg.operable("vm")
    dst.fill_missing(pieces(switch, switch.missing))
    assert dst.missing_count() == 0 and reg.operable("vm") is dst


# -- written for the mutation run over post-copy's safety code (docs/MUTATION.md)


def test_the_models_integer_arrays_are_one_dimensional_non_negative_integers():
    from palm_net.hypervisor.model_postcopy import _u64s
    for ok, want in (([0, 3], [0, 3]), (np.array([0, 7], np.int64), [0, 7]), (np.zeros(0, np.int64), []),
                     (np.zeros(0, np.uint64), []), ([], [])):
        got = _u64s(ok, "x")
        assert got.dtype == np.uint64 and got.tolist() == want
    for bad in (np.array([-1, 2]), np.array([1.5]), np.array([[1, 2]]), np.array([[1.0]])):
        with pytest.raises(ValueError):
            _u64s(bad, "x")


def test_set_missing_checks_order_counts_rounds_and_versions(shm, switch):
    sw = switch
    owners = sw.src.arrays.owners
    normal = [int(g) for g in range(NPAGES) if not owners[g]]
    dst = incoming(shm, sw)
    r = np.array([ROUND] * 3, np.uint64)
    for gfns in ([normal[0], normal[0]], [normal[0], normal[2], normal[1]]):  # twice, or not ascending
        with pytest.raises(ValueError):
            dst.set_missing(ROUND, np.array(gfns, np.uint64), r[: len(gfns)], b"")
    with pytest.raises(ValueError):
        dst.set_missing(ROUND, np.array(normal[:3], np.uint64), r[:2], b"")  # a version short
    for rnd in (2**64, 2**64 + ROUND):
        with pytest.raises(ValueError):
            dst.set_missing(rnd, np.array(normal[:1], np.uint64), np.array([rnd % 2**64], np.uint64), b"")
    assert dst.postcopy_state() is None
    dst.set_missing(ROUND, np.array(normal[:3], np.uint64), r, b"")
    with pytest.raises(ValueError):  # a page marked already (its last, not its second)
        dst.set_missing(ROUND, np.array(normal[2:4], np.uint64), r[:2], b"")
    dst.set_missing(ROUND, np.array(normal[5:6], np.uint64), r[:1], b"")
    dst.set_missing(ROUND, np.array(normal[3:5], np.uint64), r[:2], b"")  # below it: two runs (7.9 item 1)
    assert dst.missing_count() == 6
    big = 2**63 + 5  # any u64 round (the wire's are smaller)
    other = incoming(shm, sw, "big")
    other.set_missing(big, np.array(normal[:2], np.uint64), np.array([big, big], np.uint64), b"")
    assert other.postcopy_state()[0] == big


def test_a_protected_page_may_come_at_the_version_already_received(shm, switch):
    """MISSING's version of a protected page only goes up: the copy's own version is not older."""
    sw = switch
    dst = incoming(shm, sw)
    prot = np.flatnonzero(dst.arrays.owners != 0)
    held = dst.arrays.versions[prot]
    assert (held >= 1).all() and (held == 1).any()
    g = np.array([int(prot[held == 1][0])], np.uint64)
    dst.set_missing(ROUND, g, np.array([1], np.uint64), bytes(dst.arrays.tags[g].tobytes()))
    assert dst.missing_count() == 1
    other = incoming(shm, sw, "huge")  # a round past u64 (only protected pages: no normal page's version to differ)
    with pytest.raises(ValueError):
        other.set_missing(2**64, g, np.array([1], np.uint64), bytes(other.arrays.tags[g].tobytes()))
    assert other.postcopy_state() is None


def test_read_metadata_gives_a_normal_page_version_0(switch):
    sw = switch
    kinds, vers, _ = sw.src.read_metadata(sw.missing)
    normal = np.frombuffer(kinds, np.uint8) == KIND_NORMAL
    assert normal.any() and vers.dtype == np.uint64 and (vers[normal] == 0).all()


def test_a_restarted_agent_s_vm_still_waits_for_its_missing_pages_and_ends_its_map(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    dst.close()
    dst = ModelVM.open(shm / "dst", load_config(shm / "dst"), KEY)
    rnd, gfns, vers = dst.postcopy_state()
    assert rnd == ROUND and (gfns == sw.missing).all() and vers.dtype == np.uint64 and (vers == sw.vers).all()
    asked = threading.Event()
    dst.on_fault = lambda gfn: asked.set()
    done: list[bytes] = []
    t = threading.Thread(target=lambda: done.append(dst.os_read(int(sw.missing[0]))), daemon=True)
    t.start()
    assert asked.wait(WAIT) and not done  # waits for the page, as before the restart
    dst.fill_missing(pieces(sw, sw.missing))
    t.join(WAIT)
    assert done and dst.digest() == sw.digest
    dst.finish_postcopy()
    assert not (dst.dir / MAP_FILE).exists()


def test_a_map_of_another_kind_is_not_taken(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    dst.close()
    raw = bytearray((shm / "dst" / MAP_FILE).read_bytes())
    raw[0] ^= 1  # the magic (the page count still fits)
    (shm / "dst" / MAP_FILE).write_bytes(bytes(raw))
    with pytest.raises(VmError):
        ModelVM.open(shm / "dst", load_config(shm / "dst"), KEY)


def test_a_batch_that_disagrees_with_itself_is_refused_whole(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    normal = [int(g) for f in sw.fills for g, k in zip(f.gfns, f.kinds) if k == KIND_NORMAL]  # (not zero)
    b = pieces(sw, normal[:3])
    kinds = np.frombuffer(b.kinds, np.uint8)
    assert (kinds == KIND_NORMAL).all()
    data = bytes(b.data)
    for bad in (PageBatch(b.gfns, b.kinds[:2], b.vers, data, b""),  # a kind short
                PageBatch(b.gfns, b.kinds, b.vers[:2], data, b""),  # a version short
                PageBatch(b.gfns, b.kinds, b.vers, data[: 2 * PAGE_SIZE], b""),  # a page's data short
                PageBatch(b.gfns, b.kinds, b.vers, data, bytes(TAG_LEN)),  # a MAC too many
                PageBatch(np.array([normal[0], NPAGES], np.uint64), b.kinds[:2], b.vers[:2],
                          data[: 2 * PAGE_SIZE], b""),  # outside the VM
                PageBatch(b.gfns, bytes([KIND_NORMAL, 3, KIND_NORMAL]), b.vers, data, b"")):  # no such kind
        refused(dst, bad, "integrity")
    refused(dst, PageBatch(b.gfns[[0, 2, 1]].copy(), b.kinds, b.vers, data, b""), "replay")  # not ascending
    empty = np.zeros(0, np.uint64)
    dst.fill_missing(PageBatch(empty, b"", empty, b"", b""))  # nothing: nothing happens
    dst.fill_missing(b)
    assert dst.missing_count() == len(sw.missing) - 3


def test_a_vm_made_here_has_its_memory_reserved_and_closes_with_a_view_of_its_map_held(shm, switch):
    """Guest memory reserved when made (a write past a full tmpfs would be SIGBUS), and a VM's
    close does not fail on a view of the post-copy map someone still holds."""
    fresh = ModelVM.create(shm / "fresh", "vm", NPAGES, KEY, fill="zero")  # (no page written)
    assert os.stat(fresh.dir / "memory").st_blocks * 512 >= NPAGES * PAGE_SIZE
    fresh.close()
    dst = pulling(shm, switch)
    held = dst._postcopy.bits[:4]
    dst.close()
    assert len(held) == 4


# -- waits begun before a session, and an agent stopping while one waits (issue 26)


def _waiting_for(dst: ModelVM, gfn: int) -> threading.Thread:
    """A guest access to missing page ``gfn`` in a thread, once it waits for it."""
    t = threading.Thread(target=lambda: dst.os_read(gfn), daemon=True)
    t.start()
    for _ in range(int(WAIT / 0.01)):
        if dst.waiting_pages() == [gfn]:
            return t
        threading.Event().wait(0.01)
    raise AssertionError(f"no access waits for {gfn}")


def test_the_vm_knows_which_pages_its_guest_waits_for_whatever_hook_was_set(shm, switch):
    sw = switch
    dst = pulling(shm, sw)
    high = int(sw.missing[-1])
    t = _waiting_for(dst, high)  # no hook set (a restarted agent's, or between sessions)
    assert dst.waiting_pages() == [high]
    dst.fill_missing(pieces(sw, [high]))
    t.join(WAIT)
    assert not t.is_alive() and dst.waiting_pages() == []
    dst.close()


async def test_a_recovery_session_asks_first_for_the_pages_waited_for_before_it_began(shm, switch, pki):
    """A guest access waits for the highest missing page when no session runs (the link
    broke, or the agent restarted): the recovery session's WANTs, then at once a FETCH of
    that page (its vCPU's fault was asked of no session that still runs)."""
    import trio
    import trio.testing
    from nacl.signing import SigningKey

    from palm_net.channel.transport import accept, connect
    from palm_net.migration.destination import DestinationEngine
    from palm_net.migration.handoff import HandoffStore
    from palm_net.migration.runner import DestinationRun
    from palm_net.wire import messages as m
    from palm_net.wire.protocol import Role, SessionProtocol

    sw = switch
    dst = pulling(shm, sw)
    high = int(sw.missing[-1])
    t = _waiting_for(dst, high)
    s1, s2 = trio.testing.memory_stream_pair()
    chans: dict[str, object] = {}
    async with trio.open_nursery() as n:
        async def responder() -> None:
            chans["d"] = await accept(s2, pki.config("dst"))
        n.start_soon(responder)
        src_ch = await connect(s1, pki.config("src"))
    s_proto = SessionProtocol(Role.SOURCE, b"r" * 16, recovery=True)
    d_proto = SessionProtocol(Role.DESTINATION, recovery=True)
    d_proto.receive(s_proto.send(m.Query()))
    s_proto.receive(d_proto.send(m.Outcome("postcopy", b"")))
    rnd, missing, vers = dst.postcopy_state()
    eng, first = DestinationEngine.pulling(d_proto, NPAGES, rnd, missing, vers)

    async def no_vm(*_: object) -> ModelVM:
        raise AssertionError("a recovery opens no VM")

    run = DestinationRun(chans["d"], eng, HandoffStore(shm / "d.db"), SigningKey.generate(), no_vm)
    run.host.vm = dst
    got: list[object] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(run.run, first)
            while not got or not isinstance(got[-1], m.Fetch):
                got.append(s_proto.receive_message((await src_ch.receive()).data).body)
            n.cancel_scope.cancel()
    assert [type(b).__name__ for b in got] == ["Want", "Fetch"] and not got[0].more
    assert [int(g) for g in np.frombuffer(got[1].gfns, "<u8")] == [high]
    assert dst.on_fault is None  # (the run's hook, cleared as it ended)
    dst.fill_missing(pieces(sw, [high]))
    t.join(WAIT)
    assert not t.is_alive()
    dst.close()


def test_an_agent_stopping_while_a_vcpu_waits_for_a_page_stops_at_once_and_keeps_the_map(shm, switch):
    """The registry's close (the agent's stop) with the workload's vCPU waiting for a missing
    page: the vCPU gives up at once (the workload's join would wait 5 s per VM), and the map
    reopened names every page missing as before (the guest asks again)."""
    from types import SimpleNamespace

    from palm_net.agent.registry import VmRegistry
    sw = switch
    dst = pulling(shm, sw)
    wl, asked = waiting_workload(dst)
    assert asked.wait(WAIT) and dst.waiting_pages()  # its vCPU waits for a page
    registry = VmRegistry(shm, shm, b"", SimpleNamespace(), None, None, lambda name: False)
    registry.vms[dst.name] = dst
    closing = threading.Thread(target=registry.close, daemon=True)
    closing.start()
    closing.join(2.0)  # a guard well below the workload's 5 s join, not a measure
    assert not closing.is_alive() and wl._thread is None
    reopened = ModelVM.open(shm / "dst", load_config(shm / "dst"), KEY)
    rnd, gfns, _ = reopened.postcopy_state()
    assert rnd == ROUND and (gfns == sw.missing).all()
    reopened.close()
