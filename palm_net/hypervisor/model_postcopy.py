"""Post-copy in the model (proto/PROTOCOL.md 7.9), and the recording of pages into
the page digest a migration keeps (7.4), which post-copy does past activation.

The destination's map of the pages still missing is a file in the VM's
directory (``postcopy``), mapped shared: a header (magic, the switch's round,
the VM's page count) and one byte a page, nonzero while the page is missing.
Like guest memory it outlives an agent killed with -9, so a restarted agent
finds its pulling VM with the map as it was; ``sync`` (PREPARE) flushes it to
disk.  A page arriving is written into memory first and only then cleared in
the map: a set byte never hides a page the guest has already changed, and a
page whose byte is still set after a crash is simply fetched again.

``PostcopyVM`` is the part of ``ModelVM`` (model.py) that sets, fills and
reports the map (the destination) and reads the final metadata of the pages
it names (the source, at the switch).  The guest's side, waiting for a
missing page, is ``ModelGuest._present`` (model_guest.py).
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import operator
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from palm_net.hostfs import fsync_dir
from palm_net.hypervisor.backend import KIND_NORMAL, KIND_PROTECTED, KIND_ZERO, PAGE_SIZE, PageBatch
from palm_net.hypervisor.model_guest import VIEW_CIPHER, VIEW_PROCESS, ModelGuest, VmError, map_file, put_pages
from palm_net.hypervisor.pagedigest import PageDigest, hash_pages
from palm_net.hypervisor.protection import TAG_LEN, ProtectionIntegrityError
from palm_net.wire.pages import Gfns, protected_spans

MAP_FILE = "postcopy"
MAP_MAGIC = b"PALMPC01"
MAP_HEADER = 64  # magic, round u64le, pages u64le, spare
_HEADER = struct.Struct("<8sQQ")
_MISSING = 1
_FILLING = 2  # claimed by a fill in progress: still missing to the guest and to a restart


class PostcopyPageError(VmError):
    """A page arriving in post-copy is refused (``code``: "replay", "rollback" or
    "integrity", the wire's error codes of proto 7.9 item 4)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _u64s(values: Any, what: str) -> Gfns:
    """A one-dimensional array of integers in u64 range as uint64 (ValueError otherwise)."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "ui"):
        raise ValueError(f"{what}: not a list of integers")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise ValueError(f"{what}: negative")
    return arr.astype(np.uint64, copy=False)


def _ascending(gfns: Gfns, npages: int, what: str) -> None:
    if len(gfns) and (int(gfns[-1]) >= npages or bool((gfns[1:] <= gfns[:-1]).any())):
        raise ValueError(f"{what}: gfns not ascending, or outside the VM")


class PostcopyMap:
    """The durable map of missing pages (see the module's text).  Its users hold the VM lock."""

    def __init__(self, mm: mmap.mmap, path: Path, npages: int) -> None:
        self._mm = mm
        self.path = path
        magic, self.round, pages = _HEADER.unpack_from(mm, 0)
        if magic != MAP_MAGIC or pages != npages:
            mm.close()
            raise VmError(f"{path}: not the post-copy map of this VM")
        self.bits: npt.NDArray[np.uint8] = np.frombuffer(mm, np.uint8, count=npages, offset=MAP_HEADER)
        set_ = np.flatnonzero(self.bits)
        self.bits[set_] = _MISSING  # a fill a crash cut short (claimed) is simply fetched again
        self.count = len(set_)  # pages missing

    @classmethod
    def create(cls, vm_dir: Path, npages: int, round_no: int) -> PostcopyMap:
        """A new map, all present: written under a temporary name and renamed into place,
        so that a crash never leaves a map without its header."""
        tmp = vm_dir / f".{MAP_FILE}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a crash's leftover (unlink never follows a symlink)
        mm = map_file(tmp, MAP_HEADER + npages, create=True)  # O_EXCL|O_NOFOLLOW, space reserved
        _HEADER.pack_into(mm, 0, MAP_MAGIC, round_no, npages)
        mm.flush()
        os.replace(tmp, vm_dir / MAP_FILE)
        fsync_dir(vm_dir)
        return cls(mm, vm_dir / MAP_FILE, npages)

    @classmethod
    def open(cls, vm_dir: Path, npages: int) -> PostcopyMap | None:
        path = vm_dir / MAP_FILE
        if not os.path.lexists(path):
            return None
        return cls(map_file(path, MAP_HEADER + npages, create=False), path, npages)  # never through a symlink

    def mark(self, gfns: Gfns) -> None:
        self.count += int(np.count_nonzero(self.bits[gfns] == 0))
        self.bits[gfns] = _MISSING

    def clear(self, gfns: Gfns) -> None:
        self.count -= int(np.count_nonzero(self.bits[gfns]))
        self.bits[gfns] = 0

    def sync(self) -> None:
        self._mm.flush()  # msync(MS_SYNC): on disk, not only in the shared mapping

    def close(self) -> None:
        del self.bits  # the view goes before its mapping (else BufferError)
        self._mm.close()

    def remove(self) -> None:
        self.close()
        os.unlink(self.path)
        fsync_dir(self.path.parent)


class PostcopyVM(ModelGuest):
    """The post-copy part of ModelVM (model.py), and the recording of pages into the
    migration's page digest (``_pages_digest``: ModelVM's start_page_digest makes it)."""

    _written: npt.NDArray[np.uint8] | None  # ModelVM's: an incoming VM's pages that hold data

    def __init__(self, vm_dir: Path, config: dict[str, Any], create: bool, reserve_now: bool) -> None:
        super().__init__(vm_dir, config, create, reserve_now)
        self._pages_digest: PageDigest | None = None  # kept as pages are sent or written (a migration's)
        self._postcopy: PostcopyMap | None = None
        if not create:
            try:
                self._postcopy = PostcopyMap.open(vm_dir, self.npages)
            except BaseException:
                ModelGuest.close(self)  # (ModelVM's close needs what its __init__ has not made yet)
                raise
            if self._postcopy is not None:
                self._missing = self._postcopy.bits

    def settle(self) -> None:
        """Returns once guest memory is all reserved (ModelVM: an incoming VM's, reserved
        behind its data); here it was reserved when made."""

    # -- the memory digest, kept page by page during a migration (proto 7.4)

    def _record_pages(self, gfns: Gfns, kinds: npt.NDArray[np.uint8], vers: Gfns,
                      data: npt.NDArray[np.uint8] | list[npt.NDArray[np.uint8]], tags: bytes,
                      plain: npt.NDArray[np.uint8] | None = None) -> None:
        """The hashes of a batch's pages as the guest sees them: zero, data, or a
        protected page's plaintext (``plain``, or opened here from the ciphertext)."""
        pd = self._pages_digest
        assert pd is not None
        pd.record_zero(gfns[kinds == KIND_ZERO])
        has_data = kinds != KIND_ZERO
        dg, dk = gfns[has_data], kinds[has_data]
        rows = data if isinstance(data, list) else list(data.reshape(-1, PAGE_SIZE)[: len(dg)])
        prot = np.flatnonzero(dk == KIND_PROTECTED)
        if len(prot):
            opened = plain if plain is not None else self._open_protected(
                dg[prot], vers[has_data][prot], np.stack([rows[i] for i in prot]),
                np.frombuffer(tags, np.uint8).reshape(-1, TAG_LEN), True)
            assert opened is not None
            for j, i in enumerate(prot):
                rows[i] = opened[j]
        if len(dg):
            pd.record(dg, hash_pages(rows))
        pd.refresh()

    # -- the source, at the switch

    def read_metadata(self, gfns: Gfns) -> tuple[bytes, Gfns, bytes]:
        """For ascending ``gfns`` of a paused VM: kinds (1 normal, 2 protected), versions
        (a protected page's; 0 for a normal one) and the protected pages' MACs in order.
        A protected page in its process's view is sealed first, as read_pages does, so
        the version and MAC are final and read_pages later sends exactly them."""
        if self.state == "running":
            raise VmError("page metadata is only read from a paused VM")
        gfns = _u64s(gfns, "read_metadata")
        _ascending(gfns, self.npages, "read_metadata")
        a = self.arrays
        kinds = np.full(len(gfns), KIND_NORMAL, np.uint8)
        vers = np.zeros(len(gfns), np.uint64)
        spans, pg = protected_spans(gfns, self.protected_ranges())
        with self._lock:
            due = pg[(a.views[pg] == VIEW_PROCESS) | (a.versions[pg] == 0)]
            self._refuse_sealing_after_export(due)
            for gfn in due:
                self._to_cipher_view_locked(int(gfn))
            for lo, hi in spans:
                kinds[lo:hi] = KIND_PROTECTED
                vers[lo:hi] = a.versions[gfns[lo:hi]]
            tags = a.tags[pg].tobytes()
        return kinds.tobytes(), vers, tags

    def protected_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted((p.first, p.count) for p in self.processes))

    # -- the destination

    def set_missing(self, round_no: int, gfns: Gfns, vers: Gfns, tags: bytes) -> None:
        """One MISSING message or more: ``gfns`` (ascending, none marked by an earlier
        call) are marked missing, and each protected one's version and MAC (``tags``, in order)
        take the place of those of any older copy received, so that import_protection
        checks the blob's metadata digest over them.  ValueError for input that does not
        fit (the engine checked it already)."""
        if self.state != "incoming":
            raise VmError("pages are only marked missing in an incoming VM")
        round_no = operator.index(round_no)
        gfns, vers = _u64s(gfns, "MISSING"), _u64s(vers, "MISSING versions")
        if not 0 <= round_no < 2**64 or len(vers) != len(gfns):
            raise ValueError("MISSING: a round or a version count that does not fit")
        _ascending(gfns, self.npages, "MISSING")
        if not len(gfns):
            return
        a = self.arrays
        spans, pg = protected_spans(gfns, self.protected_ranges())
        protected = np.zeros(len(gfns), np.bool_)
        for lo, hi in spans:
            protected[lo:hi] = True
        pv = vers[protected]
        if len(tags) != TAG_LEN * len(pg):
            raise ValueError(f"MISSING: {len(tags)} bytes of MACs for {len(pg)} protected pages")
        if bool((vers[~protected] != round_no).any()):
            raise ValueError("MISSING: a normal page's version is not the round")
        with self._lock:
            # A protected page's version only goes up (the source's never goes back).
            if bool((pv < np.maximum(a.versions[pg], 1)).any()):
                raise ValueError("MISSING: a protected page's version is older than the copy received")
            pc = self._postcopy
            if pc is not None and (pc.round != round_no or bool(pc.bits[gfns].any())):
                raise ValueError("MISSING: another round, or a page marked missing already")
            if pc is None:
                pc = self._postcopy = PostcopyMap.create(self.dir, self.npages, round_no)
                self._missing = pc.bits
            a.versions[pg] = pv
            a.tags[pg] = np.frombuffer(tags, np.uint8).reshape(-1, TAG_LEN)
            a.views[pg] = VIEW_CIPHER
            self._touch_metadata(pg)
            pc.mark(gfns)

    def postcopy_state(self) -> tuple[int, Gfns, Gfns] | None:
        """None if no page is missing; else (the switch's round, the missing gfns
        ascending, the version each must come with)."""
        with self._lock:
            pc = self._postcopy
            if pc is None or not pc.count:
                return None
            gfns = np.flatnonzero(pc.bits).astype(np.uint64)
            a = self.arrays
            vers = np.where(a.owners[gfns] != 0, a.versions[gfns], pc.round).astype(np.uint64)
            return pc.round, gfns, vers

    def missing_count(self) -> int:
        with self._lock:
            return self._postcopy.count if self._postcopy is not None else 0

    def finish_postcopy(self) -> None:
        """Removes the map once no page is missing (after the durable COMMITTED); idempotent."""
        with self._lock:
            pc = self._postcopy
            if pc is None:
                return
            if pc.count:
                raise VmError(f"{pc.count} pages of VM {self.name!r} are still missing")
            self._missing = None
            self._postcopy = None
            pc.remove()

    def _sync_postcopy(self) -> None:
        with self._lock:  # (finish_postcopy may be dropping it)
            if self._postcopy is not None:
                self._postcopy.sync()

    def _close_postcopy(self) -> None:
        """Drops the map's mapping (the file stays: a reopened VM finds it)."""
        with self._lock:
            pc, self._postcopy, self._missing = self._postcopy, None, None
        if pc is not None:
            with contextlib.suppress(BufferError, ValueError):
                pc.close()

    def fill_missing(self, batch: PageBatch) -> None:
        """Pages arriving in post-copy, refused whole unless each is missing (else
        "replay"), comes with the version MISSING named ("rollback"), is of a kind that
        fits its gfn and, protected, carries the MAC MISSING named and opens under it
        ("integrity").  Each page is written, then recorded in the page digest, then
        cleared in the map, and a guest access waiting for it goes on."""
        gfns = _u64s(batch.gfns, "PAGES")
        kinds = np.frombuffer(batch.kinds, np.uint8)
        try:
            parts = [np.frombuffer(d, np.uint8).reshape(-1, PAGE_SIZE)
                     for d in (batch.data if isinstance(batch.data, list) else [batch.data])]
        except ValueError:
            raise PostcopyPageError("integrity", "page data is not a whole number of pages") from None
        rows = [row for part in parts for row in part]
        protected = kinds == KIND_PROTECTED
        if (len(kinds) != len(gfns) or len(batch.vers) != len(gfns) or len(rows) != int(np.count_nonzero(kinds))
                or len(batch.tags) != TAG_LEN * int(np.count_nonzero(protected))
                or (len(gfns) and int(gfns.max()) >= self.npages)):
            raise PostcopyPageError("integrity", "page records disagree with their counts, or lie outside the VM")
        if not len(gfns):
            return
        self.settle()  # (all reserved at PREPARE: returns at once)
        vers = _u64s(batch.vers, "PAGES versions")
        stored = self._claim(gfns, kinds, vers)
        try:
            plain = self._check_protected(gfns, kinds, vers, rows, batch.tags, stored)
            self._write_filled(gfns, kinds, parts)
            if self._pages_digest is not None:
                self._record_pages(gfns, kinds, vers, rows, batch.tags, plain)
        except BaseException:
            with self._lock:  # refused (or failed): missing again, nothing of it counted
                if self._missing is not None:
                    self._missing[gfns] = _MISSING
            raise
        with self._lock:  # written first, cleared last: a set byte never hides a changed page
            if self._postcopy is not None:
                self._postcopy.clear(gfns)
            self._filled.notify_all()

    def _claim(self, gfns: Gfns, kinds: npt.NDArray[np.uint8], vers: Gfns) -> bytes:
        """Checks a batch against the map (replay, rollback, kinds) and claims its pages
        (still missing to everyone, but no second fill takes them); the MACs MISSING named."""
        with self._lock:
            pc, a = self._postcopy, self.arrays
            twice = len(gfns) > 1 and not bool((gfns[1:] > gfns[:-1]).all())  # (PAGES' gfns ascend; no np.unique)
            if pc is None or not bool((pc.bits[gfns] == _MISSING).all()) or twice:
                raise PostcopyPageError("replay", "a page arrived that is not missing")
            owned = a.owners[gfns] != 0
            expected = np.where(owned, a.versions[gfns], pc.round)
            if bool((vers != expected).any()):
                raise PostcopyPageError("rollback", "a page arrived with another version than MISSING named")
            if bool((owned != (kinds == KIND_PROTECTED)).any()) or bool((kinds > KIND_PROTECTED).any()):
                raise PostcopyPageError("integrity", "protected pages travel as ciphertext, and only they do")
            pc.bits[gfns] = _FILLING
            return bytes(a.tags[gfns[owned]].tobytes())

    def _check_protected(self, gfns: Gfns, kinds: npt.NDArray[np.uint8], vers: Gfns,
                         rows: list[npt.NDArray[np.uint8]], tags: bytes,
                         stored: bytes) -> npt.NDArray[np.uint8] | None:
        """The batch's protected pages carry the MACs MISSING named and open under them
        (outside the VM lock: the guest runs meanwhile); their plaintext if a digest is kept."""
        protected = kinds == KIND_PROTECTED
        if not protected.any():
            return None
        if not hmac.compare_digest(tags, stored):
            raise PostcopyPageError("integrity", "a protected page arrived with another MAC than MISSING named")
        prow = (np.cumsum(kinds != KIND_ZERO) - 1)[protected]  # each protected page's row among the data pages
        try:
            return self._open_protected(gfns[protected], vers[protected], [rows[i] for i in prow],
                                        np.frombuffer(stored, np.uint8).reshape(-1, TAG_LEN),  # MISSING's
                                        self._pages_digest is not None)
        except ProtectionIntegrityError as exc:
            raise PostcopyPageError("integrity", str(exc)) from None

    def _write_filled(self, gfns: Gfns, kinds: npt.NDArray[np.uint8], parts: list[npt.NDArray[np.uint8]]) -> None:
        """The pages into guest memory: a protected page as ciphertext (cipher view, as
        write_pages leaves it), a zero page as zeros (over any older copy)."""
        a = self.arrays
        has_data = kinds != KIND_ZERO
        dg, zg = gfns[has_data], gfns[~has_data]
        with self._lock:
            put_pages(a.pages, dg, parts)
            a.pages[zg] = 0
            a.views[gfns[kinds == KIND_PROTECTED]] = VIEW_CIPHER
            if self._written is not None:
                self._written[dg] = 1
                self._written[zg] = 0
