"""The guest of a model VM: what runs inside it, as the workload drives it.

Guest memory is real memory: a shared mmap of a file in the VM's directory,
so it outlives the agent process (as a VM outlives a crashed management
daemon) and an agent restarted on its state directory finds its VMs again.
Per-page protection metadata lives in a second mapped file.  Protected
processes own pages at the top of memory; each page is in one of two views:
its process's (plaintext, while the process uses it) or the cipher view
(what the guest OS and any reader outside the VMM's trust see: ciphertext
under the process's key, a version and a MAC), as Overshadow's
multi-shadowing has it.

``ModelGuest`` is the guest half of ``palm_net.hypervisor.model.ModelVM``:
memory, processes, the guest's reads and writes and the vCPU state they
advance.  What the hypervisor offers a migration (the ``Backend``) is the
other half, in model.py.  Every guest write path writes the data first and
then marks the page in the dirty log under the lock that ``collect_dirty``
swaps the bitmap with, so a write is never lost to a migration.

After a post-copy switch (proto/PROTOCOL.md 7.9) some pages of a running
incoming VM are still missing (``_missing``, kept by model_postcopy.py): a
guest access to one first asks for it (``on_fault``) and then waits until it
is filled; the hypervisor's own reads and writes never wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import mmap
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from palm_net.crypto.noise import CIPHERS
from palm_net.hostfs import UnsafePathError, create_exclusive, open_nofollow, reserve
from palm_net.hypervisor.backend import PAGE_SIZE, HypervisorError, NoRoomError, VerifyReport
from palm_net.hypervisor.metadigest import MetadataDigest
from palm_net.hypervisor.protection import (
    TAG_LEN,
    ProtectionIntegrityError,
    default_page_cipher,
    open_page,
    open_pages,
    seal_page,
    seal_pages,
)
from palm_net.hypervisor.vmconfig import ConfiguredVM
from palm_net.wire.messages import MAX_DATA_PAGES
from palm_net.wire.pages import Gfns

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_libc = ctypes.CDLL(None, use_errno=True)


def populate(addr: int, length: int, write: bool = True) -> bool:
    """Backs [addr, addr+length) of a shared mapping with mapped pages now
    (MADV_POPULATE_WRITE, or _READ: the pages are allocated and cleared all the
    same, their content untouched), without holding the GIL: mmap.madvise holds
    it for the whole call, tens of ms a chunk, stalling every other thread.
    False where the kernel cannot (before Linux 5.14) or the memory is not there."""
    advice = MADV_POPULATE_WRITE if write else MADV_POPULATE_READ
    return int(_libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice)) == 0


META_MAGIC = b"PALMVM01"
META_HEADER = 8192
# The view switch's undo record (a shared mapping beside the metadata): valid u8,
# the view u8, 6 spare bytes, then gfn u64, version u64, tag, and the page as it was.
JOURNAL_SIZE = 8 + 8 + 8 + TAG_LEN + PAGE_SIZE
CPU_REGS = ("rip", "rsp", "rax", "rbx", "rcx", "rdx", "rflags", "cr3")
VIEW_CIPHER = 0
VIEW_PROCESS = 1
MAX_PROCESSES = 255
THREADS_PER_PROCESS = 2
THREAD_CONTEXT_LEN = 256


FAULT_WAITS_KEPT = 100_000  # post-copy: the last guest waits for a missing page kept (for the figures)


def put_pages(pages: npt.NDArray[np.uint8], gfns: npt.NDArray[np.uint64], parts: list[npt.NDArray[np.uint8]]) -> int:
    """Each part's rows into ``pages`` at the next of ``gfns`` (a run of gfns is one copy, no
    index); returns how many rows there were."""
    at = 0
    for rows in parts:
        g = gfns[at : at + len(rows)]
        at += len(rows)
        if len(g) and int(g[-1]) - int(g[0]) == len(g) - 1:
            pages[int(g[0]) : int(g[0]) + len(g)] = rows
        else:
            pages[g] = rows
    return at

class VmError(HypervisorError):
    """A VM operation is not possible (bad state, bad argument, damaged files)."""


@dataclass(frozen=True)
class ProcessLayout:
    pid: int
    first: int  # first gfn owned
    count: int


def lay_out_processes(npages: int, processes: int, pages: int) -> list[dict[str, int]]:
    """Where ``processes`` protected processes live: they own the top ``pages`` of
    memory, split evenly (VmError for a layout that cannot be)."""
    if processes > MAX_PROCESSES:
        raise VmError(f"at most {MAX_PROCESSES} protected processes")
    if processes and not 0 < pages <= npages // 2 * 2:
        raise VmError("protected memory must be between one page and the VM's memory")
    if processes > pages:
        raise VmError("each protected process needs at least one page")
    procs = []
    first = npages - pages
    for i in range(processes):
        count = pages // processes + (1 if i < pages % processes else 0)
        procs.append({"pid": 1000 + i, "first": first, "count": count})
        first += count
    return procs


def map_file(path: Path, size: int, create: bool, reserve_now: bool = True) -> mmap.mmap:
    """A shared mapping of a 0600 file of exactly ``size`` bytes.  ``create``
    makes a new file (never a planted one) and reserves its space now: a write
    into a mapping past a full tmpfs would be SIGBUS, a crash of the agent.
    (``reserve_now=False``: the caller reserves it before writing, see hypervisor/reserver.py.)"""
    try:
        fd = create_exclusive(path) if create else open_nofollow(path, os.O_RDWR)
    except OSError as exc:
        raise VmError(f"{path}: {exc.strerror}") from None
    try:
        if create and not reserve_now:
            os.ftruncate(fd, size)
        elif create:
            try:
                reserve(fd, size, f"VM file {path.name}")
            except UnsafePathError as exc:
                raise NoRoomError(str(exc)) from None
        elif os.fstat(fd).st_size != size:
            raise VmError(f"{path} has the wrong size")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class _Meta:
    """Per-page metadata arrays over a mapped file (owners, views, versions, tags)."""

    def __init__(self, path: Path, npages: int, create: bool) -> None:
        self.map = map_file(path, META_HEADER + npages * (1 + 1 + 8 + TAG_LEN), create)
        if create:
            self.map[:8] = META_MAGIC
        elif self.map[:8] != META_MAGIC:
            raise VmError(f"{path}: not a palm_net VM metadata file")
        mv = memoryview(self.map)
        o = META_HEADER
        self.owners = mv[o : o + npages]
        o += npages
        self.views = mv[o : o + npages]
        o += npages
        self.versions = mv[o : o + 8 * npages].cast("Q")
        o += 8 * npages
        self.tags = mv[o : o + TAG_LEN * npages]
        self._mv = mv

    def tag(self, gfn: int) -> bytes:
        return bytes(self.tags[gfn * TAG_LEN : (gfn + 1) * TAG_LEN])

    def set_tag(self, gfn: int, tag: bytes) -> None:
        self.tags[gfn * TAG_LEN : (gfn + 1) * TAG_LEN] = tag

    def cpu_state(self) -> bytes:
        (n,) = struct.unpack_from("<I", self.map, 8)
        return bytes(self.map[12 : 12 + n])

    def set_cpu_state(self, data: bytes) -> None:
        if len(data) > META_HEADER - 12:
            raise VmError("CPU state too large")
        struct.pack_into("<I", self.map, 8, len(data))
        self.map[12 : 12 + len(data)] = data

    def close(self) -> None:
        for v in (self.owners, self.views, self.versions, self.tags, self._mv):
            v.release()
        self.map.close()


class _Views:
    """numpy views of guest memory and page metadata (no copies): the page paths
    of the migration work on whole batches of pages at once."""

    def __init__(self, mem: mmap.mmap, meta: _Meta) -> None:
        npages = len(meta.owners)
        self.pages = np.frombuffer(mem, dtype=np.uint8).reshape(npages, PAGE_SIZE)
        self.words = self.pages.view(np.uint64)  # (npages, 512): a page's first word tests "not zero" at once
        self.owners = np.frombuffer(meta.owners, dtype=np.uint8)
        self.views = np.frombuffer(meta.views, dtype=np.uint8)
        self.versions = np.frombuffer(meta.versions, dtype=np.uint64)
        self.tags = np.frombuffer(meta.tags, dtype=np.uint8).reshape(npages, TAG_LEN)


def fill_pseudorandom(mem: mmap.mmap, start: int, end: int, seed: int) -> None:
    """Deterministic random bytes from a seed: an AEAD keystream over zeros (fast)."""
    fns = CIPHERS[default_page_cipher()]
    key = hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=32, person=b"palm-fill").digest()
    chunk = 65536
    zeros = bytes(chunk)
    for i, off in enumerate(range(start, end, chunk)):
        n = min(chunk, end - off)
        mem[off : off + n] = fns.encrypt(key, i, b"", zeros)[:n]


class ModelGuest(ConfiguredVM):
    """The guest of one model VM: memory, protected processes, vCPU state, and the
    reads and writes the guest makes.  Thread-safe for one workload thread plus
    the hypervisor (ModelVM), which shares its lock."""

    def __init__(self, vm_dir: Path, config: dict[str, Any], create: bool, reserve_now: bool) -> None:
        self.dir = vm_dir
        self.config = config
        self.name: str = config["name"]
        self.vm_id = bytes.fromhex(config["vm_id"])
        self.npages: int = config["npages"]
        self.vcpus: int = config["vcpus"]
        self.page_cipher = CIPHERS[config["page_cipher"]]
        self.processes = [ProcessLayout(**p) for p in config["processes"]]
        self.mem = map_file(vm_dir / "memory", self.npages * PAGE_SIZE, create, reserve_now=reserve_now)
        self.resident = False  # all of guest memory backed and mapped (see prefault)
        self.meta = _Meta(vm_dir / "meta", self.npages, create)
        # The block hashes of the processes' versions and MACs (made on first use; a
        # migration's own: see _metadata).
        self._meta_digest: MetadataDigest | None = None
        # A migration's reader may seal a page in its process's view under a new
        # version: from its start until its final state is exported, never after
        # (post-copy serves only what was sealed at the switch; a restart clears it).
        self._reads_seal = False
        journal = vm_dir / "journal"
        self._journal = map_file(journal, JOURNAL_SIZE, create or not journal.exists())
        self._undo_torn_switch()
        self._np: _Views | None = _Views(self.mem, self.meta)
        self._scratch = threading.local()
        self._closing = threading.Event()
        self._prefault: threading.Thread | None = None
        if config["state"] != "incoming":
            self._prefault = threading.Thread(target=self.prefault, name=f"prefault-{self.name}", daemon=True)
            self._prefault.start()
        self._lock = threading.Lock()  # dirty log, view transitions, run state
        self._dirty: bytearray | None = None
        self._unpause = threading.Condition(self._lock)
        # Post-copy: nonzero for a page not yet arrived (a view of the map in
        # model_postcopy.py, None when none is missing); a fill notifies _filled.
        self._missing: npt.NDArray[np.uint8] | None = None
        self._filled = threading.Condition(self._lock)
        self.on_fault: Callable[[int], None] | None = None  # the agent's: asks the source for a missing page
        self._waiting: dict[int, int] = {}  # gfn: guest accesses waiting for it (waiting_pages)
        # Post-copy: how long each guest access to a missing page waited, seconds (the last ones).
        self.fault_waits: deque[float] = deque(maxlen=FAULT_WAITS_KEPT)
        self._keys: list[bytearray] = []
        self._threads: list[list[bytes]] = []
        self.cpu: dict[str, Any] = {"regs": [dict.fromkeys(CPU_REGS, 0) for _ in range(self.vcpus)]}
        self.throttle = 1.0
        self.workload: Any = None  # palm_net.hypervisor.workload.Workload, when one runs

    # -- memory ----------------------------------------------------------

    def prefault(self, chunk: int = 64 << 20) -> None:
        """Backs guest memory with real, mapped pages, as a running guest's is.

        Fresh or newly mapped memory costs a page fault per page on first touch
        (0.3-1.2 s per GiB measured on the reference VM).  Populating it from a
        helper thread takes that work off the migration's path (at creation or
        reopening; an incoming VM's memory is populated ahead of its data, see
        hypervisor/reserver.py).  Best effort: without MADV_POPULATE_WRITE (Linux 5.14) it
        does nothing.
        """
        size = self.npages * PAGE_SIZE
        base = self.arrays.pages.ctypes.data
        for off in range(0, size, chunk):
            if self._closing.is_set() or not populate(base + off, min(chunk, size - off)):
                return
        self.resident = True

    def _fill(self, fill: str, seed: int) -> None:
        size = self.npages * PAGE_SIZE
        if fill == "zero":
            return
        if fill == "random":
            fill_pseudorandom(self.mem, 0, size, seed)
        elif fill == "half":  # first half random, second half zero pages
            fill_pseudorandom(self.mem, 0, (self.npages // 2) * PAGE_SIZE, seed)
        else:
            raise VmError(f"unknown fill {fill!r} (zero, random, half)")

    def _cloak(self) -> None:
        """New protected processes: fresh keys and thread contexts, and every page
        they own sealed from the start (cipher view, version 1)."""
        self._keys = [bytearray(os.urandom(32)) for _ in self.processes]
        self._threads = [[os.urandom(THREAD_CONTEXT_LEN) for _ in range(THREADS_PER_PROCESS)]
                         for _ in self.processes]
        for idx, p in enumerate(self.processes):
            for gfn in range(p.first, p.first + p.count):
                self.meta.owners[gfn] = idx + 1
                self._to_cipher_view_locked(gfn)

    @property
    def arrays(self) -> _Views:
        if self._np is None:
            raise VmError(f"VM {self.name!r} is closed")
        return self._np

    @property
    def protected_pages(self) -> int:
        return sum(p.count for p in self.processes)

    def stop_guest(self) -> None:
        """Stops the workload and the prefault, for good (the VM closes next); a vCPU
        waiting for a missing page (post-copy) gives up first (VmError), so the workload
        stops at once; the map still names the page (reopened, the guest asks again)."""
        self._closing.set()
        with self._lock:
            self._filled.notify_all()
        if self.workload is not None:
            self.workload.stop()
            self.workload = None

    def close(self) -> None:
        """Stops the guest (its workload, the prefault) and unmaps its memory."""
        self.stop_guest()
        if self._prefault is not None and self._prefault is not threading.current_thread():
            self._prefault.join()  # it works on the mapping: done before the mapping goes
        self._np = None  # the arrays are views of the mappings: gone before the mappings
        with contextlib.suppress(Exception):
            self.meta.close()
            self.mem.close()
            self._journal.close()

    def memory_bytes(self) -> bytes:
        """Raw guest memory (tests compare unprotected VMs byte for byte)."""
        with self._lock:
            return self.mem[:]

    # -- guest access (the workload is the guest) ------------------------

    def wait_running(self, timeout: float) -> bool:
        """For vCPU (workload) threads: blocks while paused.  Caller holds no lock."""
        with self._lock:
            return self._unpause.wait_for(lambda: self.state == "running", timeout)

    def _mark_locked(self, gfn: int) -> None:
        if self._dirty is not None:
            self._dirty[gfn] = 1

    def _check_gfn(self, gfn: int) -> None:
        if not 0 <= gfn < self.npages:
            raise VmError(f"gfn {gfn} outside guest memory (0..{self.npages - 1})")

    @contextlib.contextmanager
    def _present(self, gfn: int, running: bool = False) -> Iterator[None]:
        """The VM lock, held with page ``gfn`` in memory: a guest access to a page
        still missing (post-copy) asks for it (``on_fault``, called without the
        lock) and waits until it is filled.  ``running``: a paused VM's write is
        refused at once, as before, not left waiting."""
        self._check_gfn(gfn)
        self._lock.acquire()
        try:
            if running and self.state != "running":
                raise VmError(f"VM {self.name!r} is {self.state}")
            if self._missing is not None and self._missing[gfn]:
                self._fault_locked(gfn)
            yield
        finally:
            self._lock.release()

    def _fault_locked(self, gfn: int) -> None:
        t0 = time.monotonic()
        try:
            self._await_page_locked(gfn)
        finally:
            self.fault_waits.append(time.monotonic() - t0)

    def _await_page_locked(self, gfn: int) -> None:
        # Counted as waiting and the hook read under one hold of the lock: a hook set
        # later learns of this wait from waiting_pages (its session asks again).
        self._waiting[gfn] = self._waiting.get(gfn, 0) + 1
        try:
            hook = self.on_fault
            if hook is not None:
                self._lock.release()  # the hook talks to the agent: never under the VM lock
                try:
                    hook(gfn)
                finally:
                    self._lock.acquire()
            while True:
                if self._closing.is_set():  # before the map: close drops it
                    raise VmError(f"VM {self.name!r} closed while page {gfn} was awaited")
                if self._missing is None or not self._missing[gfn]:
                    return
                self._filled.wait(0.1)  # in slices: a close is noticed
        finally:
            if self._waiting[gfn] == 1:
                del self._waiting[gfn]
            else:
                self._waiting[gfn] -= 1

    def waiting_pages(self) -> list[int]:
        """The missing pages guest accesses wait for now, ascending: those asked of a hook
        since gone (a lost session's, or none: a restart) are asked again by the next."""
        with self._lock:
            return sorted(self._waiting)

    def guest_write(self, gfn: int, data: bytes, offset: int = 0) -> None:
        """A write by the guest OS (untrusted view).  On a protected page it
        writes over the ciphertext, which the page's MAC will expose."""
        self._check_gfn(gfn)
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            raise VmError("write crosses the page")
        with self._present(gfn, running=True):
            if self.state != "running":
                raise VmError(f"VM {self.name!r} is {self.state}")
            if self.meta.owners[gfn]:
                self._to_cipher_view_locked(gfn)
            base = gfn * PAGE_SIZE + offset
            self.mem[base : base + len(data)] = data
            self._mark_locked(gfn)
            self._tick_locked()

    def process_write(self, process: int, gfn: int, data: bytes, offset: int = 0) -> None:
        """A write by protected process ``process`` (index) to a page it owns."""
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            raise VmError("write crosses the page")
        with self._present(gfn, running=True):
            if self.state != "running":
                raise VmError(f"VM {self.name!r} is {self.state}")
            self._to_process_view_locked(process, gfn)
            base = gfn * PAGE_SIZE + offset
            self.mem[base : base + len(data)] = data
            self._mark_locked(gfn)
            self._tick_locked()
            t = self._threads[process]
            t[0] = hashlib.blake2b(t[0] + data, digest_size=THREAD_CONTEXT_LEN // 4).digest() * 4

    def process_read(self, process: int, gfn: int) -> bytes:
        with self._present(gfn):
            self._to_process_view_locked(process, gfn)
            return self.mem[gfn * PAGE_SIZE : (gfn + 1) * PAGE_SIZE]

    def os_read(self, gfn: int) -> bytes:
        """What the guest OS (or any reader outside the VMM's trust) sees.  A protected
        page in its process's view (or never sealed: version 0) is sealed under a new
        version for it, which only a running VM may do: a paused one's versions may
        already be the migration's final state, and the peer seals from there; an
        incoming one's are the source's, which sealed version 1 with other plaintext
        (the same version twice, two plaintexts, one key)."""
        with self._present(gfn):
            if self.meta.owners[gfn]:
                sealed = self.meta.views[gfn] == VIEW_CIPHER and self.meta.versions[gfn]
                if self.state != "running" and not sealed:
                    raise VmError(f"VM {self.name!r} is {self.state}: protected page {gfn} is not sealed, and "
                                  "is sealed for a reader only while the VM runs")
                self._to_cipher_view_locked(gfn)
            return self.mem[gfn * PAGE_SIZE : (gfn + 1) * PAGE_SIZE]

    def _tick_locked(self) -> None:
        regs = self.cpu["regs"][0]
        regs["rip"] = (regs["rip"] + 4) & 0xFFFFFFFFFFFFFFFF
        regs["rax"] = (regs["rax"] + 1) & 0xFFFFFFFFFFFFFFFF

    # -- multi-shadowing -------------------------------------------------

    def _owner_locked(self, gfn: int) -> int:
        self._check_gfn(gfn)
        return self.meta.owners[gfn] - 1

    # A view switch rewrites a page in place and then its metadata: an agent killed
    # between the two (kill -9: the mappings outlive it) would leave a page that
    # matches neither.  So the page and its metadata are first copied to an undo
    # record, marked valid last; the switch ends by clearing the mark; a VM opened
    # with the mark set puts the page back as it was before the switch.

    def _journal_switch(self, gfn: int) -> None:
        j, base = self._journal, gfn * PAGE_SIZE
        j[1] = self.meta.views[gfn]
        struct.pack_into("<QQ", j, 8, gfn, int(self.meta.versions[gfn]))
        j[24 : 24 + TAG_LEN] = self.meta.tag(gfn)
        j[24 + TAG_LEN :] = self.mem[base : base + PAGE_SIZE]
        j[0] = 1

    def _undo_torn_switch(self) -> None:
        j = self._journal
        if j[0] != 1:
            return
        gfn, version = struct.unpack_from("<QQ", j, 8)
        if gfn >= self.npages:
            raise VmError(f"{self.dir / 'journal'}: damaged (page {gfn} outside the VM)")
        base = gfn * PAGE_SIZE
        self.mem[base : base + PAGE_SIZE] = j[24 + TAG_LEN :]
        self.meta.versions[gfn] = version
        self.meta.set_tag(gfn, bytes(j[24 : 24 + TAG_LEN]))
        self.meta.views[gfn] = j[1]
        j[0] = 0

    def _to_process_view_locked(self, process: int, gfn: int) -> None:
        owner = self._owner_locked(gfn)
        if owner != process:
            raise VmError(f"page {gfn} does not belong to protected process {process}")
        if self.meta.views[gfn] == VIEW_PROCESS:
            return
        p = self.processes[owner]
        base = gfn * PAGE_SIZE
        plain = open_page(self.page_cipher, bytes(self._keys[owner]), self.vm_id, p.pid, gfn,
                          self.meta.versions[gfn], self.mem[base : base + PAGE_SIZE], self.meta.tag(gfn))
        self._journal_switch(gfn)
        self.mem[base : base + PAGE_SIZE] = plain
        self.meta.views[gfn] = VIEW_PROCESS
        self._journal[0] = 0

    def _to_cipher_view_locked(self, gfn: int, mark: bool = True) -> None:
        """Re-encrypts a page in the process view under a bumped version.

        Memory and metadata change, so the page is dirty, except for the
        migration reader, which sends exactly this ciphertext right away.
        """
        owner = self.meta.owners[gfn] - 1
        if self.meta.views[gfn] == VIEW_CIPHER and self.meta.versions[gfn]:
            return
        p = self.processes[owner]
        version = self.meta.versions[gfn] + 1
        base = gfn * PAGE_SIZE
        ct, tag = seal_page(self.page_cipher, bytes(self._keys[owner]), self.vm_id, p.pid, gfn, version,
                            self.mem[base : base + PAGE_SIZE])
        self._journal_switch(gfn)
        self.mem[base : base + PAGE_SIZE] = ct
        self.meta.versions[gfn] = version
        self.meta.set_tag(gfn, tag)
        self._touch_metadata(gfn)
        self.meta.views[gfn] = VIEW_CIPHER
        self._journal[0] = 0
        self._journal[24 + TAG_LEN :] = bytes(PAGE_SIZE)  # the plaintext it kept goes as the switch ends
        if mark:
            self._mark_locked(gfn)

    def _refuse_sealing_after_export(self, gfns: Gfns) -> None:
        """VmError if any of ``gfns`` (protected pages about to be sealed for the migration)
        would be sealed once the final state was exported: their versions and MACs were
        final, and the peer may seal at the next."""
        if len(gfns) and not self._reads_seal:
            raise VmError(f"protected page {int(gfns[0])} is unsealed after the migration's final state: it is "
                          "not sealed again")

    def _seal_out_locked(self, gfns: Gfns, out: npt.NDArray[np.uint8], rows: npt.NDArray[np.intp]) -> None:
        """Pages in the process view sealed for the migration reader, each under a
        bumped version, into ``out[rows]``: memory keeps the plaintext and the page
        its process view, the metadata gets the version and MAC that were sent.  A
        switch to the cipher view instead rewrote each page in place through the
        journal, and the process's next access opened it again (17 us a page, in
        the pause for the last round's).  Not marked dirty: what is sent is this."""
        self._refuse_sealing_after_export(gfns)
        a = self.arrays
        owners = a.owners[gfns]
        for owner in np.flatnonzero(np.bincount(owners)):
            sel = np.flatnonzero(owners == owner)
            g = gfns[sel]
            version = a.versions[g] + 1
            a.versions[g] = version  # first: killed halfway, a version is still never used twice
            p = self.processes[int(owner) - 1]
            boxed = seal_pages(self.page_cipher, bytes(self._keys[int(owner) - 1]), self.vm_id, p.pid, g, version,
                               [a.pages[gfn] for gfn in g.tolist()], self._scratch_box())
            out[rows[sel]] = boxed[:, :PAGE_SIZE]
            a.tags[g] = boxed[:, PAGE_SIZE:]
            self._touch_metadata(g)

    def _scratch_box(self) -> npt.NDArray[np.uint8]:
        """A buffer of MAX_DATA_PAGES rows of ciphertext || MAC a thread keeps: a fresh
        MiB a batch would fault in every page of it."""
        scratch: npt.NDArray[np.uint8] | None = getattr(self._scratch, "box", None)
        if scratch is None:
            scratch = self._scratch.box = np.empty((MAX_DATA_PAGES, PAGE_SIZE + TAG_LEN), np.uint8)
        return scratch

    def _metadata(self) -> MetadataDigest:
        """The metadata digest's blocks (hypervisor/metadigest.py), made on first use
        with every block still to hash."""
        md = self._meta_digest
        if md is None:
            a = self.arrays
            md = self._meta_digest = MetadataDigest(a.versions, a.tags, [(p.first, p.count) for p in self.processes])
        return md

    def _touch_metadata(self, gfns: Gfns | int) -> None:
        """After a protected page's version or MAC changed: its block is hashed again."""
        md = self._meta_digest
        if md is not None:
            md.touch(gfns)

    def _open_protected(self, gfns: Gfns, vers: Gfns, rows: npt.NDArray[np.uint8] | list[npt.NDArray[np.uint8]],
                        tags: npt.NDArray[np.uint8], want_plain: bool) -> npt.NDArray[np.uint8] | None:
        """Verifies protected pages (ciphertext rows) against their MACs, a process at
        a time (ProtectionIntegrityError); their plaintexts, in the same order, if asked."""
        owners = self.arrays.owners[gfns]
        plain = np.empty((len(gfns), PAGE_SIZE), np.uint8) if want_plain else None
        for owner in np.flatnonzero(np.bincount(owners)):  # np.unique(owners) without numpy.ma (wire/pages.py)
            sel = np.flatnonzero(owners == owner)
            p = self.processes[int(owner) - 1]
            out = np.empty((len(sel), PAGE_SIZE), np.uint8) if plain is not None else None
            mine = [rows[i] for i in sel] if isinstance(rows, list) else rows[sel]
            scratch = self._scratch_box()
            open_pages(self.page_cipher, bytes(self._keys[int(owner) - 1]), self.vm_id, p.pid, gfns[sel], vers[sel],
                       mine, tags[sel], out, scratch)
            if plain is not None and out is not None:
                plain[sel] = out
        return plain

    def verify(self) -> VerifyReport:
        """Checks every protected page in the cipher view against its MAC (not one
        still missing in post-copy: its ciphertext is not here yet)."""
        checked = plain = 0
        failures: list[str] = []
        with self._lock:
            for idx, p in enumerate(self.processes):
                key = bytes(self._keys[idx])
                for gfn in range(p.first, p.first + p.count):
                    if self._missing is not None and self._missing[gfn]:
                        continue
                    if self.meta.views[gfn] == VIEW_PROCESS:
                        plain += 1
                        continue
                    base = gfn * PAGE_SIZE
                    try:
                        open_page(self.page_cipher, key, self.vm_id, p.pid, gfn, self.meta.versions[gfn],
                                  self.mem[base : base + PAGE_SIZE], self.meta.tag(gfn))
                        checked += 1
                    except ProtectionIntegrityError as exc:
                        failures.append(str(exc))
        return VerifyReport(checked, plain, tuple(failures[:20]))
