"""The embedded hypervisor model: a VM with Overshadow-style protected processes,
as the migration engine sees it (``Backend``).

``ModelVM`` is what the hypervisor offers a migration: pages read through
the untrusted view and written into an incoming VM, the dirty log, process
keys, CPU state and the protected-context blob, run state, the memory
digest, scrubbing and activation; and the VM's life on disk (create, open,
sync).  The guest it runs (memory, processes, the guest's own reads and
writes) is ``ModelGuest`` (model_guest.py), which it extends; post-copy's
map of missing pages (and the recording of pages into a migration's page
digest) is ``PostcopyVM`` (model_postcopy.py), between the two.

Process keys and thread contexts are sealed with the host's hypervisor key
(a stand-in for a TPM-sealed secret) and never leave the hypervisor except
inside the protected-context blob, which the engine only sends over an
attested session.

Dirty logging is a software log: every write path of the model writes the
data first and then marks the page under the log's lock, and
``collect_dirty`` reads and clears the bitmap under the same lock, so a write is
either seen by the collect or marked after it, for the next: no write is lost.  (The
kernel's userfaultfd write-protect + PAGEMAP_SCAN dirty log is not used:
the model's writers are its own code, so the software log sees every write.)
"""

from __future__ import annotations

import contextlib
import hmac
import os
import shutil
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from nacl.secret import SecretBox

from palm_net.crypto.noise import CIPHERS
from palm_net.hostfs import read_nofollow, write_atomic
from palm_net.hypervisor.backend import (
    KIND_NORMAL,
    KIND_PROTECTED,
    KIND_ZERO,
    PAGE_SIZE,
    PageBatch,
    VmInfo,
)
from palm_net.hypervisor.model_guest import (
    CPU_REGS,
    MAX_PROCESSES,
    THREAD_CONTEXT_LEN,
    VIEW_CIPHER,
    VIEW_PROCESS,
    ProcessLayout,
    VmError,
    lay_out_processes,
    put_pages,
)
from palm_net.hypervisor.model_postcopy import PostcopyPageError as PostcopyPageError  # (re-exported)
from palm_net.hypervisor.model_postcopy import PostcopyVM
from palm_net.hypervisor.pagedigest import PageDigest, hash_pages
from palm_net.hypervisor.protection import TAG_LEN, ProtectionIntegrityError, default_page_cipher
from palm_net.hypervisor.reserver import Reserver
from palm_net.hypervisor.vmspec import check_workload, validate_policy
from palm_net.wire.messages import MAX_PAGES_PER_MESSAGE
from palm_net.wire.pages import Gfns, RoundGfns

BLOB_VERSION = 2  # 2: the metadata digest by blocks (proto 7.3)


def _u(value: Any, limit: int) -> int:
    """A non-negative int below limit, or ValueError (wire input)."""
    if type(value) is not int or not 0 <= value < limit:
        raise ValueError("not an integer in range")
    return value


def _bin(value: Any, max_len: int) -> bytes:
    """Bytes of at most max_len, or ValueError (wire input)."""
    if type(value) is not bytes or len(value) > max_len:
        raise ValueError("not a byte string of the right size")
    return value


ZERO_SCAN = 64  # scattered candidate pages gathered at once by _zero_pages (256 KiB)


def _zero_pages(words: npt.NDArray[np.uint64], gfns: Gfns, lo: int | None) -> npt.NDArray[np.bool_]:
    """Which of ``gfns`` are zero pages.  The first word rules out most pages at
    once; the rest are scanned whole, in place where the gfns are contiguous
    (``lo``: the first of them), since a zero page is the common case there."""
    n = len(gfns)
    zero: npt.NDArray[np.bool_] = (words[lo : lo + n, 0] if lo is not None else words[gfns, 0]) == 0
    maybe = np.flatnonzero(zero)
    if not maybe.size:
        return zero
    if lo is None:  # gathered (a copy), a few pages at a time: 2048 at once took 8 MiB a reader thread
        for at in range(0, len(maybe), ZERO_SCAN):
            part = maybe[at : at + ZERO_SCAN]
            zero[part] = words[gfns[part]].max(axis=1) == 0
        return zero
    # Runs of candidates, each scanned as one slice of guest memory (no copy).
    breaks = np.flatnonzero(np.diff(maybe) != 1) + 1
    for run in np.split(maybe, breaks):
        s, e = int(run[0]), int(run[-1]) + 1
        zero[s:e] = words[lo + s : lo + e].max(axis=1) == 0  # (max: no cast to bool, as any() does)
    return zero


def _parse_layout(blob: bytes, what: str) -> tuple[dict[str, Any], list[ProcessLayout], list[bytes]]:
    """A key or protected-context blob from the wire: the object, its layouts and keys (VmError if malformed)."""
    try:
        obj = msgpack.unpackb(blob, max_bin_len=1 << 30, max_array_len=MAX_PROCESSES * 8, max_map_len=16,
                              max_str_len=64)
        if obj["v"] != BLOB_VERSION or obj["cipher"] not in CIPHERS or len(obj["processes"]) > MAX_PROCESSES:
            raise ValueError
        # From the wire: exact types before use (bytes(n) of an int would allocate n bytes).
        layouts = [ProcessLayout(_u(p["pid"], 2**32), _u(p["first"], 2**40), _u(p["count"], 2**40))
                   for p in obj["processes"]]
        keys = [_bin(p["key"], 32) for p in obj["processes"]]
        if any(len(k) != 32 for k in keys) or any(p.count < 1 for p in layouts):
            raise ValueError
    except Exception:
        raise VmError(f"{what} is malformed") from None
    return obj, layouts, keys


class ModelVM(PostcopyVM):
    """One VM of the model, as the hypervisor offers it to a migration: its guest
    (ModelGuest) plus the Backend (post-copy's part in PostcopyVM).  Thread-safe for
    one workload thread plus the engine."""

    def __init__(self, vm_dir: Path, config: dict[str, Any], sealing_key: bytes, create: bool) -> None:
        self._box = SecretBox(sealing_key)  # before any file is made: a bad key makes none
        incoming = config["state"] == "incoming"
        super().__init__(vm_dir, config, create, reserve_now=not (create and incoming))
        # Incoming VMs start as holes (zero, unallocated): a zero page record
        # for a page never written costs nothing, as in QEMU's destination.
        self._written = np.zeros(self.npages, np.uint8) if incoming else None
        self._reserver = Reserver(vm_dir / "memory", self.arrays.pages.ctypes.data, self.npages * PAGE_SIZE) \
            if create and incoming else None
        if not create:
            self._load_secrets()
            cpu = self.meta.cpu_state()
            if cpu:
                self.cpu = msgpack.unpackb(cpu)

    def __repr__(self) -> str:
        return f"ModelVM({self.name!r}, {self.npages} pages, state={self.state})"

    backend = "model"

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def create(
        cls,
        vm_dir: Path,
        name: str,
        npages: int,
        sealing_key: bytes,
        *,
        protected_processes: int = 0,
        protected_pages: int = 0,
        vcpus: int = 1,
        fill: str = "half",
        seed: int = 0,
        page_cipher: str | None = None,
        policy: str = "any",
        workload: str = "idle",
        state: str = "running",
        postcopy: bool = True,
    ) -> ModelVM:
        if npages < 1:
            raise VmError("a VM needs at least one page")
        procs = lay_out_processes(npages, protected_processes, protected_pages)
        vm_dir.mkdir(mode=0o700)
        config = {
            "name": name, "vm_id": os.urandom(16).hex(), "npages": npages, "vcpus": vcpus,
            "page_cipher": page_cipher or default_page_cipher(), "processes": procs, "state": state,
            "policy": policy, "workload": workload, "seed": seed, "postcopy": postcopy,
        }
        vm = cls(vm_dir, config, sealing_key, create=True)
        vm._fill(fill, seed)
        vm._cloak()
        vm.sync()
        return vm

    @classmethod
    def create_incoming(cls, vm_dir: Path, name: str, vm_id: bytes, npages: int, vcpus: int,
                        sealing_key: bytes, migration: bytes | None = None) -> ModelVM:
        """An empty, paused VM that receives a migration; not runnable until activated."""
        vm_dir.mkdir(mode=0o700)
        config = {"name": name, "vm_id": vm_id.hex(), "npages": npages, "vcpus": vcpus,
                  "page_cipher": default_page_cipher(), "processes": [], "state": "incoming",
                  "policy": "any", "workload": "idle", "seed": 0,
                  "migration": migration.hex() if migration else None}
        vm = cls(vm_dir, config, sealing_key, create=True)
        vm._save_config()
        return vm

    @classmethod
    def open(cls, vm_dir: Path, config: dict[str, Any], sealing_key: bytes) -> ModelVM:
        """A VM again after an agent restart (``config``: its vm.json, palm_net.hypervisor.vmconfig)."""
        try:
            return cls(vm_dir, config, sealing_key, create=False)
        except (KeyError, TypeError, ValueError) as exc:
            raise VmError(f"{vm_dir}: damaged vm.json ({type(exc).__name__})") from None

    def _load_secrets(self) -> None:
        path = self.dir / "secrets"
        if not path.exists():
            return
        try:
            obj = msgpack.unpackb(self._box.decrypt(read_nofollow(path, 16 << 20)))
        except Exception:
            raise VmError(f"{path}: cannot unseal (wrong host key or damaged file)") from None
        self._keys = [bytearray(k) for k in obj["keys"]]
        self._threads = [list(t) for t in obj["threads"]]

    def sync(self) -> None:
        """Makes the VM's state durable: CPU state, sealed secrets, vm.json (fsync'd);
        an incoming VM's memory all reserved (it may run next).

        Guest memory and page metadata are shared mappings: every process that
        opens the files sees every write at once, an agent killed with -9
        included.  They are not msync'ed: like a real guest's RAM they need not
        outlive the host, and an msync walks every resident page (a pause that
        grew with the guest's populated memory: 26-56 ms for a random-filled
        idle guest against 5-9 ms zero-filled)."""
        if self._reserver is not None:
            self._reserver.wait(self.npages * PAGE_SIZE, writing=False)
        self.meta.set_cpu_state(msgpack.packb(self.cpu))
        blob = msgpack.packb({"keys": [bytes(k) for k in self._keys], "threads": self._threads})
        write_atomic(self.dir / "secrets", self._box.encrypt(blob))
        self._save_config()
        self._sync_postcopy()
        if self.state == "incoming":
            self._stage_activation()

    def close(self) -> None:
        self.stop_guest()  # a vCPU waiting for a missing page gives up before the map goes
        if self._reserver is not None:  # it populates the mapping: stopped before the mapping goes
            self._reserver.stop()
            self._reserver = None
        self._close_postcopy()
        super().close()

    def scrub(self) -> None:
        """Destroys memory and keys (and a post-copy map): after a handoff, or a failed incoming VM."""
        self.stop_guest()
        for k in self._keys:
            k[:] = bytes(len(k))
        self._keys = []
        self._threads = []
        self._pages_digest = None  # (16 bytes a page)
        self._meta_digest = None
        end = len(self.mem)
        if self._reserver is not None:  # an incoming VM: only what was reserved holds anything
            end = self._reserver.stop()
            self._reserver = None
        with contextlib.suppress(Exception):
            self.arrays.pages.reshape(-1)[:end] = 0
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- info ------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What `palm vm show` adds for this backend."""
        out = {"workload": self.config.get("workload", "idle"), "resident": self.resident,
               "writes": self.workload.writes if self.workload is not None else 0}
        waits = sorted(self.fault_waits)
        if waits:  # post-copy: its guest's accesses to missing pages, and how long they waited
            out["postcopy_faults"] = {"count": len(waits), "median_ms": round(waits[len(waits) // 2] * 1000, 3),
                                      "p99_ms": round(waits[min(len(waits) - 1, len(waits) * 99 // 100)] * 1000, 3)}
        return out

    def migration_spec(self) -> bytes:
        """BEGIN's spec: none for a page backend (proto 6)."""
        return b""

    @property
    def info(self) -> VmInfo:
        return VmInfo(self.name, self.vm_id, self.npages, self.vcpus, self.protected_pages, len(self.processes))

    # -- run state -------------------------------------------------------

    def pause(self) -> None:
        with self._lock:  # waits out a write in progress: none follows
            if self.state not in ("running", "paused"):
                raise VmError(f"cannot pause a VM in state {self.state}")
            self.config["state"] = "paused"
        self.sync()

    def mark_stopped(self) -> None:
        with self._lock:  # the workload waits on this state
            super().mark_stopped()

    def resume(self) -> None:
        with self._lock:
            if self.state not in ("paused", "running"):
                raise VmError(f"cannot resume a VM in state {self.state}")
            self.config["state"] = "running"
            self._unpause.notify_all()
        self._save_config()

    def set_throttle(self, fraction: float) -> None:
        self.throttle = max(0.01, min(1.0, fraction))

    def resume_after_migration(self) -> None:
        """The source again owns the VM (failure before the handoff point, or
        the destination's abort token): stop logging and throttling, and run."""
        self.disable_dirty_log()
        self.set_throttle(1.0)
        self._pages_digest = None  # (that migration's)
        self._reads_seal = False
        if self.state == "paused":
            self.resume()
        self.set_migration(None)  # last: a failure before leaves the record a restart resumes from

    # -- dirty log -------------------------------------------------------

    def enable_dirty_log(self) -> None:
        with self._lock:
            self._dirty = bytearray(self.npages)
            self._meta_digest = None  # a migration's own, hashed afresh as it goes
            self._reads_seal = True

    def disable_dirty_log(self) -> None:
        with self._lock:
            self._dirty = None

    def collect_dirty(self) -> Gfns:
        # Cleared in place, not swapped for a fresh log: a fresh 1 MiB (a 4 GiB guest's)
        # costs its page faults, 0.7-1.2 ms here, inside the pause's last round.
        with self._lock:
            if self._dirty is None:
                raise VmError("dirty logging is not enabled")
            log = np.frombuffer(self._dirty, dtype=np.uint8)
            dirty = np.flatnonzero(log)
            log[dirty] = 0
        return dirty.astype(np.uint64)

    # -- the engine's source side ---------------------------------------

    def read_pages(self, gfns: RoundGfns, start: int, round_no: int,
                   out: npt.NDArray[np.uint8]) -> tuple[PageBatch, int]:
        """The page records of gfns[start:...] through the untrusted view: at most
        MAX_PAGES_PER_MESSAGE pages, of which at most ``len(out)`` carry data (copied
        into ``out``, pages of 4096 bytes, or a view of guest memory for a run of
        normal pages); and the index of the first gfn not included.  Whole batches
        at once (numpy), no loop per page but for protected pages still in their
        process's view."""
        a = self.arrays
        cand = gfns[start : start + MAX_PAGES_PER_MESSAGE]
        if len(cand) == 0:
            return PageBatch(cand, b"", cand, b"", b""), start
        lo = int(cand[0])
        contiguous = int(cand[-1]) - lo == len(cand) - 1
        protected = a.owners[cand] != 0 if self.processes else np.zeros(len(cand), np.bool_)
        zero = _zero_pages(a.words, cand, lo if contiguous else None) & ~protected
        # As many entries as fit: all, or up to the one whose data would not.
        has_data = ~zero
        n = min(len(cand), int(np.searchsorted(np.cumsum(has_data), len(out), side="right")))
        cand, zero, protected, has_data = cand[:n], zero[:n], protected[:n], has_data[:n]
        kinds = np.where(protected, KIND_PROTECTED, np.where(zero, KIND_ZERO, KIND_NORMAL)).astype(np.uint8)
        dg = cand[has_data]
        data = out[: len(dg)]
        vers = np.full(n, round_no, dtype=np.uint64)
        tags = b""
        # A racing guest write to a normal page is harmless: it marks the page
        # dirty after its data, and the next round sends it again.
        if not protected.any():
            if len(dg) and int(dg[-1]) - int(dg[0]) == len(dg) - 1:
                # A run of normal pages (never a protected one, whose plaintext
                # may appear in memory): sealed straight from guest memory, no copy.
                data = a.pages[int(dg[0]) : int(dg[0]) + len(dg)]
            else:
                np.take(a.pages, dg.astype(np.intp), axis=0, out=data)
        else:
            pos = np.cumsum(has_data) - 1  # each data page's row in ``data``
            normal = has_data & ~protected
            data[pos[normal]] = a.pages[cand[normal]]
            pg = cand[protected]
            with self._lock:  # ciphertext, version and tag must match: taken under the lock
                plain = a.views[pg] == VIEW_PROCESS
                for gfn in pg[~plain & (a.versions[pg] == 0)]:  # never sealed yet
                    self._to_cipher_view_locked(int(gfn), mark=False)
                rows = pos[protected]
                data[rows[~plain]] = a.pages[pg[~plain]]
                self._seal_out_locked(pg[plain], data, rows[plain])
                vers[protected] = a.versions[pg]
                tags = a.tags[pg].tobytes()
            self._metadata().refresh()  # what this batch sealed, and the guest's switches: hashed before the pause
        if self._pages_digest is not None:
            self._record_pages(cand, kinds, vers, data, tags)
        return PageBatch(cand, kinds.tobytes(), vers, data.reshape(-1).data, tags), start + n

    # -- the memory digest, kept page by page during a migration (proto 7.4)

    def start_page_digest(self) -> None:
        """From now on, the hash of each page as it is sent (read_pages) or written
        (write_pages, fill_missing): the digest of the last copy of every page, at no pass over memory."""
        self._pages_digest = PageDigest(self.npages)

    def page_digest(self) -> str:
        """The digest of the pages as sent or written since start_page_digest (else of memory)."""
        return self._pages_digest.digest() if self._pages_digest is not None else self.digest()

    @property
    def postcopy_allowed(self) -> bool:
        """May this VM migrate by post-copy (proto 7.9)?  Its creator's choice (``--no-postcopy``)."""
        return self.config.get("postcopy", True) is not False

    def export_cpu_state(self) -> bytes:
        if self.state == "running":
            raise VmError("CPU state is only exported from a paused VM")
        out: bytes = msgpack.packb({"v": 1, "cpu": self.cpu, "workload": self.config.get("workload", "idle"),
                                    "seed": self.config.get("seed", 0), "policy": self.policy,
                                    "postcopy": self.postcopy_allowed})
        return out

    def _layout(self) -> list[dict[str, Any]]:
        return [{"pid": p.pid, "first": p.first, "count": p.count, "key": bytes(self._keys[i])}
                for i, p in enumerate(self.processes)]

    def _metadata_digest(self, process: int) -> bytes:
        """The digest of a process's per-page versions and MACs (proto 7.3): the final
        metadata, committed to in the blob instead of sent again.  Kept block by block
        as pages are sealed or written: here only the blocks changed since."""
        return self._metadata().digest(process)

    def export_keys(self) -> bytes:
        """Process keys and layout, sent at the start of streaming so the
        destination can verify each protected page as it arrives."""
        out: bytes = msgpack.packb({"v": BLOB_VERSION, "cipher": self.page_cipher.name.value,
                                    "processes": self._layout()})
        return out

    def export_protection(self) -> bytes:
        """The protected-context blob (proto/PROTOCOL.md 7.3).  Only from a paused VM."""
        if self.state == "running":
            raise VmError("the protected-context blob is only exported from a paused VM")
        with self._lock:
            self._reads_seal = False  # the versions and MACs below are final
            out: bytes = msgpack.packb({
                "v": BLOB_VERSION,
                "cipher": self.page_cipher.name.value,
                "processes": [{**lay, "threads": self._threads[i],
                               "metadata": self._metadata_digest(i)}
                              for i, lay in enumerate(self._layout())],
            })
        return out

    # -- the engine's destination side ----------------------------------

    def import_keys(self, blob: bytes) -> None:
        """Installs process keys and layout before protected pages arrive."""
        if self.state != "incoming" or self._keys:
            raise VmError("keys are imported once, into an incoming VM")
        obj, layouts, keys = _parse_layout(blob, "key blob")
        end = 0
        for p in sorted(layouts, key=lambda p: p.first):
            if p.first < end or p.first + p.count > self.npages:
                raise VmError("protected process layout overlaps or exceeds guest memory")
            end = p.first + p.count
        with self._lock:
            for idx, p in enumerate(layouts):
                self.meta.owners[p.first : p.first + p.count] = bytes([idx + 1]) * p.count
            self.processes = layouts
            self._meta_digest = None  # over this layout
            self.page_cipher = CIPHERS[obj["cipher"]]
            self._keys = [bytearray(k) for k in keys]
            self._threads = [[] for _ in layouts]
            self.config["processes"] = [p.__dict__ for p in layouts]
            self.config["page_cipher"] = obj["cipher"]

    def write_pages(self, batch: PageBatch) -> None:
        """Applies page records to an incoming VM, whole batches at once.  A
        protected page is verified against its MAC as it arrives; any other page
        on a protected gfn, or ciphertext on an unprotected one, is refused."""
        if self.state != "incoming":
            raise VmError("pages are only written into an incoming VM")
        a, written = self.arrays, self._written
        assert written is not None
        gfns = batch.gfns
        kinds = np.frombuffer(batch.kinds, dtype=np.uint8)
        protected = kinds == KIND_PROTECTED
        owners = a.owners[gfns] if self.processes else np.zeros(len(gfns), np.uint8)
        if ((owners != 0) != protected).any():
            gfn = int(gfns[np.argmax((owners != 0) != protected)])
            raise ProtectionIntegrityError(f"page {gfn}: protected pages travel as ciphertext, and only they do")
        has_data = kinds != KIND_ZERO
        parts = [np.frombuffer(d, dtype=np.uint8).reshape(-1, PAGE_SIZE)
                 for d in (batch.data if isinstance(batch.data, list) else [batch.data])]
        plain = None
        if protected.any():
            arrived = [row for part in parts for row in part]  # views: each data page where it arrived
            pos = np.cumsum(has_data) - 1
            pg, prow, pver = gfns[protected], pos[protected], batch.vers[protected]
            tags = np.frombuffer(batch.tags, dtype=np.uint8).reshape(-1, TAG_LEN)
            plain = self._open_protected(pg, pver, [arrived[i] for i in prow], tags, self._pages_digest is not None)
            a.versions[pg] = pver
            a.tags[pg] = tags
            a.views[pg] = VIEW_CIPHER
            self._touch_metadata(pg)
            self._metadata().refresh()  # a batch's few blocks now, not all of them in the pause
        # Zero pages: a page never written is a hole, already zero (its memory was
        # reserved, not touched); one written before is zeroed again.
        zg = gfns[~has_data]
        again = zg[written[zg] != 0]
        dg = gfns[has_data]
        if self._reserver is not None and (again.size or dg.size):
            self._reserver.wait((int(max(again.max(initial=0), dg.max(initial=0))) + 1) * PAGE_SIZE)
        if again.size:
            a.pages[again] = 0
            written[again] = 0
        if put_pages(a.pages, dg, parts) != len(dg):
            raise ProtectionIntegrityError("page data disagrees with the page count")
        written[dg] = 1
        if self._pages_digest is not None:
            self._record_pages(gfns, kinds, batch.vers, [row for rows in parts for row in rows], batch.tags, plain)

    def settle(self) -> None:
        if self._reserver is not None:
            self._reserver.wait(self.npages * PAGE_SIZE, writing=False)

    def import_cpu_state(self, state: bytes) -> None:
        try:
            obj = msgpack.unpackb(state, max_str_len=4096, max_bin_len=4096, max_array_len=256, max_map_len=64)
            cpu = obj["cpu"]
            regs = cpu["regs"]
            if (obj["v"] != 1 or len(regs) != self.vcpus or set(cpu) != {"regs"}
                    or not all(isinstance(r, dict) and set(r) == set(CPU_REGS) for r in regs)):
                raise ValueError
            for r in regs:
                for name in CPU_REGS:
                    _u(r[name], 2**64)
            # They end up in vm.json, the operator's terminal and the workload's parser.
            workload = check_workload(obj.get("workload", "idle"))
            policy = validate_policy(obj.get("policy", "any"))
            seed = _u(obj.get("seed", 0), 2**63)
            postcopy = obj.get("postcopy", True)
            if type(postcopy) is not bool:
                raise ValueError
        except Exception:
            raise VmError("CPU state is malformed") from None
        self.cpu = cpu
        self.config.update(workload=workload, seed=seed, policy=policy, postcopy=postcopy)

    def import_protection(self, blob: bytes) -> None:
        """Installs the final protected context.  Every protected page must
        hold the ciphertext that was verified on arrival with exactly the
        final version and MAC; keys and layout must equal the early ones."""
        if self.state != "incoming":
            raise VmError("protection metadata is only imported into an incoming VM")
        obj, layouts, keys = _parse_layout(blob, "protected-context blob")
        if layouts != self.processes or len(keys) != len(self._keys) or not all(
                hmac.compare_digest(k, bytes(mine)) for k, mine in zip(keys, self._keys)):
            raise ProtectionIntegrityError("protected-context blob disagrees with the keys sent at the start")
        threads: list[list[bytes]] = []
        for i, (p, entry) in enumerate(zip(layouts, obj["processes"])):
            try:
                digest = _bin(entry["metadata"], 32)
                if not isinstance(entry["threads"], list):
                    raise ValueError
                thr = [_bin(x, 4 * THREAD_CONTEXT_LEN) for x in entry["threads"]]
            except Exception:
                raise VmError("protected-context blob is malformed") from None
            if len(digest) != 32 or len(thr) > 64:
                raise VmError("protected-context blob is malformed")
            # The versions and MACs verified on arrival must be exactly the final ones.
            if not hmac.compare_digest(self._metadata_digest(i), digest):
                raise ProtectionIntegrityError(f"protected pages of process {p.pid} do not hold the final versions "
                                     "the source sealed")
            threads.append(thr)
        self._threads = threads

    def activate(self) -> None:
        """Runs a committed incoming VM: everything it needs was written and reserved at
        PREPARE (sync), so this only flips what is in place.  Pages still missing
        (post-copy) arrive while it runs; a guest access to one waits for it."""
        if self.state != "incoming":
            raise VmError(f"only an incoming VM can be activated (state {self.state})")
        if self._reserver is not None:  # all reserved (sync waited): the guest's own writes map the rest
            self._reserver.stop()
            self._reserver = None
        if not self.missing_count():  # post-copy's is PULLED's: kept while pages arrive
            self._pages_digest = None  # READY's, done with (16 bytes a page)
        self._flip_activation()

    # -- digest ------------------------------------------------------------

    def digest(self) -> str:
        """The memory digest (proto 7.4) of memory as the guest sees it now,
        protected pages in plaintext: every page hashed afresh.  (A protected page
        still missing in post-copy is hashed as it lies: it cannot be opened yet.)"""
        pd = PageDigest(self.npages)
        step = 1024
        with self._lock:
            a = self.arrays
            for lo in range(0, self.npages, step):
                gfns = np.arange(lo, min(lo + step, self.npages), dtype=np.uint64)
                rows = a.pages[lo : lo + len(gfns)]
                prot = (a.owners[lo : lo + len(gfns)] != 0) & (a.views[lo : lo + len(gfns)] == VIEW_CIPHER)
                if self._missing is not None:
                    prot &= self._missing[lo : lo + len(gfns)] == 0
                if not prot.any():
                    pd.record(gfns, hash_pages(rows))
                    continue
                pi = np.flatnonzero(prot)
                opened = self._open_protected(gfns[pi], a.versions[gfns[pi]], rows[pi], a.tags[gfns[pi]], True)
                assert opened is not None
                plain: list[Any] = list(rows)
                for j, i in enumerate(pi):
                    plain[i] = opened[j]
                pd.record(gfns, hash_pages(plain))
        return pd.digest()
