"""A protected page on its way out of the source: sealed for the migration where it
lies in the process view, and the blob's digest of every process's versions and MACs
(proto/PROTOCOL.md 7.3), kept block by block as pages are sealed or written."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import numpy as np
import pytest

from palm_net.crypto.noise import CIPHERS
from palm_net.hypervisor.metadigest import MetadataDigest
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.model_guest import VIEW_PROCESS, VmError
from palm_net.hypervisor.protection import ProtectionIntegrityError, open_page, seal_pages
from palm_net.wire.messages import MAX_DATA_PAGES
from tests.conftest import KEY


def _spec_metadata_digest(versions: list[int], tags: bytes) -> bytes:
    """proto 7.3, as written: blocks of 64 pages of u64le(version) || MAC, then their hashes."""
    blocks = b""
    for j in range(0, len(versions), 64):
        records = b"".join(v.to_bytes(8, "little") + tags[16 * g : 16 * g + 16]
                           for g, v in enumerate(versions[j : j + 64], start=j))
        blocks += hashlib.blake2b(records, digest_size=32, person=b"palm-meta-block").digest()
    return hashlib.blake2b(len(versions).to_bytes(8, "little") + blocks, digest_size=32,
                           person=b"palm-page-meta").digest()


def _read_all(vm: ModelVM, gfns: np.ndarray, round_no: int) -> list:
    out = np.empty((MAX_DATA_PAGES, 4096), np.uint8)
    batches, start = [], 0
    while start < len(gfns):
        batch, start = vm.read_pages(gfns, start, round_no, out)
        batches.append((batch, bytes(batch.data)))
    return batches


def test_the_blobs_metadata_digest_is_proto_7_3s_definition(shm):
    # Two processes of 75 pages: a block of 64 and a shorter one each.
    vm = ModelVM.create(shm / "vm", "vm", 512, KEY, protected_processes=2, protected_pages=150, fill="random")
    try:
        vm.enable_dirty_log()
        for p in vm.processes:
            vm.process_write(vm.processes.index(p), p.first + 66, b"in the process view")
        _read_all(vm, np.arange(vm.npages, dtype=np.uint64), 0)
        vm.pause()
        blob = msgpack.unpackb(vm.export_protection())
        a = vm.arrays
        for p, entry in zip(vm.processes, blob["processes"]):
            versions = [int(v) for v in a.versions[p.first : p.first + p.count]]
            assert entry["metadata"] == _spec_metadata_digest(versions, a.tags[p.first : p.first + p.count].tobytes())
    finally:
        vm.close()


def test_the_pause_hashes_only_the_blocks_changed_since_the_pages_were_read(shm):
    """The digest at the pause once cost a pass over every process's versions and MACs
    (1.8 ms per 256 MiB protected, each side); now only what changed since is hashed."""
    vm = ModelVM.create(shm / "vm", "vm", 2048, KEY, protected_processes=2, protected_pages=1024, fill="random")
    try:
        vm.enable_dirty_log()
        _read_all(vm, np.arange(vm.npages, dtype=np.uint64), 0)
        md = vm._meta_digest
        assert md is not None and md.hashed >= 16  # round 0: every block of both processes, once at least
        before = md.hashed
        p0, p1 = vm.processes
        vm.process_write(0, p0.first + 1, b"a")
        vm.process_write(0, p0.first + 2, b"b")  # the same block
        vm.process_write(1, p1.first + 300, b"c")
        vm.pause()
        _read_all(vm, vm.collect_dirty(), 1)  # the last round: the three sealed anew
        vm.export_protection()
        assert md.hashed - before == 2
    finally:
        vm.close()


def test_a_page_in_the_process_view_is_sealed_for_sending_and_stays_in_the_process_view(shm):
    """The reader seals a page the process holds in plaintext straight into what it
    sends, under a version of its own; memory keeps the plaintext (no rewrite, no
    journal, no opening again at the process's next access)."""
    vm = ModelVM.create(shm / "vm", "vm", 256, KEY, protected_processes=1, protected_pages=16, fill="random")
    try:
        p = vm.processes[0]
        gfn = p.first + 5
        vm.process_write(0, gfn, b"the process's secret")
        plain = vm.process_read(0, gfn)
        vm.enable_dirty_log()
        sent = []
        for r in range(2):
            (batch, data), = _read_all(vm, np.array([gfn], np.uint64), r)
            version, tag = int(batch.vers[0]), bytes(batch.tags)
            sent.append(version)
            assert b"the process's secret" not in data
            assert open_page(vm.page_cipher, bytes(vm._keys[0]), vm.vm_id, p.pid, gfn, version, data, tag) == plain
            assert vm.arrays.views[gfn] == VIEW_PROCESS and vm.mem[gfn * 4096 : (gfn + 1) * 4096] == plain
            assert int(vm.arrays.versions[gfn]) == version and bytes(vm.arrays.tags[gfn]) == tag
            assert not len(vm.collect_dirty())  # what was sent is what memory holds
        assert sent[1] == sent[0] + 1  # a version is never used twice for a gfn
        vm.process_write(0, gfn, b"again")
        assert list(vm.collect_dirty()) == [gfn]
    finally:
        vm.close()


@pytest.mark.parametrize("reader", ["pages", "switch"])
def test_a_page_is_not_sealed_again_once_the_final_state_is_exported(shm, reader):
    """After the blob, the peer owns the next version of every page it holds (post-copy
    runs it there while this side serves the rest): a read here must not seal a page
    under that version with this side's plaintext.  A post-copy WANT naming a page the
    switch never announced would otherwise have made exactly that read; and the
    switch's own reading of versions and MACs (proto 7.9) may not seal after it either."""
    vm = ModelVM.create(shm / "vm", "vm", 256, KEY, protected_processes=1, protected_pages=16, fill="random")
    try:
        gfn = vm.processes[0].first + 2
        vm.enable_dirty_log()
        vm.process_write(0, gfn, b"the process's secret")
        vm.pause()
        _read_all(vm, np.array([gfn], np.uint64), 1)  # the last round: sealed for sending
        version = int(vm.arrays.versions[gfn])
        vm.export_protection()
        with pytest.raises(VmError, match="not sealed again"):
            if reader == "pages":
                _read_all(vm, np.array([gfn], np.uint64), 2)
            else:
                vm.read_metadata(np.array([gfn], np.uint64))
        assert int(vm.arrays.versions[gfn]) == version and vm.arrays.views[gfn] == VIEW_PROCESS
    finally:
        vm.close()


def test_a_paused_vms_protected_page_is_not_sealed_for_a_reader(shm):
    """The untrusted view of a page in its process's view is a sealing under a new
    version: on a paused VM, whose versions may be the migration's final state (the
    blob went out), that is the next version the peer seals under.  Refused, nothing
    changed; once running again the read seals as before, and a page already in the
    cipher view reads while paused (nothing to seal)."""
    vm = ModelVM.create(shm / "vm", "vm", 256, KEY, protected_processes=1, protected_pages=16, fill="random")
    try:
        p = vm.processes[0]
        held, sealed = p.first + 2, p.first + 3
        vm.process_write(0, held, b"the process's secret")
        vm.enable_dirty_log()
        vm.pause()
        _read_all(vm, np.array([held], np.uint64), 1)  # the last round: sealed for sending, stays in the process view
        vm.export_protection()
        before = int(vm.arrays.versions[held]), bytes(vm.arrays.tags[held]), vm.memory_bytes()
        with pytest.raises(VmError, match=r"paused: protected page \d+ is not sealed"):
            vm.os_read(held)
        assert (int(vm.arrays.versions[held]), bytes(vm.arrays.tags[held]), vm.memory_bytes()) == before
        assert vm.arrays.views[held] == VIEW_PROCESS
        assert vm.os_read(sealed) == before[2][sealed * 4096 : (sealed + 1) * 4096]  # the cipher view: as it is
        vm.resume_after_migration()
        assert b"the process's secret" not in vm.os_read(held)
        assert int(vm.arrays.versions[held]) == before[0] + 1
    finally:
        vm.close()


def test_an_incoming_vms_protected_page_is_not_sealed_for_a_reader(shm):
    """An incoming VM holds the source's keys and a page not yet arrived at version 0:
    sealing it for a reader would use version 1, which the source sealed with the
    page's own plaintext (the two ciphertexts together give that plaintext away).
    Refused, nothing changed; an arrived page (in the cipher view) reads as it is."""
    src = ModelVM.create(shm / "src", "vm", 256, KEY, protected_processes=1, protected_pages=16, fill="random")
    dst = ModelVM.create_incoming(shm / "dst", "vm", src.vm_id, 256, src.vcpus, KEY, migration=b"m" * 16)
    try:
        p = src.processes[0]
        arrived, waiting = p.first + 1, p.first + 2
        src.enable_dirty_log()
        dst.import_keys(src.export_keys())
        for batch, data in _read_all(src, np.array([arrived], np.uint64), 0):
            dst.write_pages(dataclasses.replace(batch, data=data))
        assert dst.os_read(arrived) == src.memory_bytes()[arrived * 4096 : (arrived + 1) * 4096]
        before = dst.memory_bytes(), bytes(dst.arrays.versions.tobytes())
        with pytest.raises(VmError, match=r"incoming: protected page \d+ is not sealed"):
            dst.os_read(waiting)
        assert (dst.memory_bytes(), bytes(dst.arrays.versions.tobytes())) == before
    finally:
        dst.close()
        src.close()


def test_the_metadata_digest_does_not_depend_on_the_order_of_the_layout(shm):
    rng = np.random.default_rng(7)
    versions = rng.integers(0, 2**40, 400).astype(np.uint64)
    tags = rng.integers(0, 256, (400, 16)).astype(np.uint8)
    layout = [(300, 90), (10, 70), (100, 130)]  # not in gfn order
    md = MetadataDigest(versions, tags, layout)
    md.touch(np.array([15, 120, 389], np.uint64))
    for i, (first, count) in enumerate(layout):
        assert md.digest(i) == _spec_metadata_digest([int(v) for v in versions[first : first + count]],
                                                     tags[first : first + count].tobytes())


def test_a_page_that_fails_to_seal_fails_the_read_and_sends_nothing():
    fns = dataclasses.replace(CIPHERS["AESGCM"], encrypt_c=lambda *args: -1)  # AES-GCM on a CPU without AES-NI
    scratch = np.full((4, 4096 + 16), 0x41, np.uint8)
    with pytest.raises(ProtectionIntegrityError, match="could not be sealed"):
        seal_pages(fns, bytes(32), bytes(16), 1, np.array([5], np.uint64), np.array([3], np.uint64),
                   [np.zeros(4096, np.uint8)], scratch)
    assert not scratch[:1].any()
