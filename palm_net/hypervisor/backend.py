"""What the migration engine needs from a hypervisor, and nothing more.

The engine talks to a VM only through this interface, so a real hypervisor
can be plugged in beside the embedded model (palm_net.hypervisor.model).
Page reads go through the *untrusted view*: a protected page is only ever
handed out as ciphertext plus its (public) version.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from palm_net.wire.messages import PAGE_SIZE
from palm_net.wire.pages import KIND_NORMAL, KIND_PROTECTED, KIND_ZERO, Gfns, PageBatch, RoundGfns

if TYPE_CHECKING:  # the engines import this module and no I/O (only the stream backend hands out a socket)
    import socket

__all__ = ["DIGEST_PERSON", "KIND_NORMAL", "KIND_PROTECTED", "KIND_ZERO", "PAGE_SIZE", "Backend", "HostedVM",
           "HypervisorError", "NoRoomError", "PageBatch", "StreamBackend", "VerifyReport", "VmInfo",
           "describe_error"]

DIGEST_PERSON = b"palm-vm-digest"  # BLAKE2b personalisation of every VM memory digest


class HypervisorError(Exception):
    """A VM cannot be created, driven or migrated by its hypervisor (one-line message)."""


class NoRoomError(HypervisorError):
    """The host has no room for a VM's memory (its file system is full)."""


def describe_error(exc: BaseException) -> str:
    """One line naming what failed, as it is: an OSError by its errno and the file
    it was about (ENOSPC: no space on that file system; EIO: an I/O error), a
    hypervisor error by its message.  Never the exception's class name alone."""
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else None
        if exc.errno == errno.ENOSPC:
            fs = _mount_point(where) if where else None
            return ("no space left on device" + (f" writing {where}" if where else "")
                    + (f" (file system at {fs})" if fs else ""))
        if exc.errno == errno.EIO:
            return "I/O error" + (f" on {where}" if where else "")
        why = (exc.strerror or os.strerror(exc.errno)) if exc.errno else (str(exc) or type(exc).__name__)
        return f"{why}" + (f": {where}" if where else "")
    if not str(exc) and isinstance(exc.__cause__, OSError):  # trio's BrokenResourceError: its socket's error
        return describe_error(exc.__cause__)
    if not str(exc) and type(exc).__name__ in ("BrokenResourceError", "ClosedResourceError"):
        return "the connection broke" if type(exc).__name__ == "BrokenResourceError" else "the connection was closed"
    return str(exc) or type(exc).__name__


def _mount_point(path: str | bytes | int) -> str | None:
    """The mount point of the file system holding ``path`` (for a message only)."""
    if not isinstance(path, str):
        return None
    p = os.path.abspath(path)
    while not os.path.ismount(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


@dataclass(frozen=True)
class VerifyReport:
    checked: int  # protected pages whose MAC verified
    in_process_view: int  # plaintext pages held for their process (nothing to verify)
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class VmInfo:
    name: str
    vm_id: bytes
    npages: int
    vcpus: int
    protected_pages: int
    processes: int


class HostedVM(Protocol):
    """What every backend offers the handoff: run state, digest, the end of a copy."""

    backend: str  # "model" (a page backend) or "qemu" (a stream backend)

    @property
    def info(self) -> VmInfo: ...

    @property
    def policy(self) -> str: ...

    def migration_spec(self) -> bytes:
        """What BEGIN's spec carries for this backend (empty for a page backend)."""
        ...

    @property
    def channels_wanted(self) -> int:
        """The fewest channels this VM migrates on best, where the operator names none
        (the host's own default may be more: migration.params.default_channels)."""
        ...

    @property
    def migration(self) -> bytes | None:
        """The migration this VM is part of (as source or incoming), if any."""
        ...

    def set_migration(self, mid: bytes | None) -> None: ...

    def resume_after_migration(self) -> None:
        """The source owns the VM again (before the handoff point, or by an abort token): run it."""
        ...

    @property
    def running(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def verify(self) -> VerifyReport: ...

    def digest(self) -> str:
        """The memory digest (hex) of memory as the guest sees it now (protected pages
        in plaintext; proto 7.4 and 7.7)."""
        ...

    def start_page_digest(self) -> None:
        """A migration's digest from now on: kept as pages are sent or written, where
        the backend can (a page backend); else nothing to do."""
        ...

    def page_digest(self) -> str:
        """The digest the migration kept (start_page_digest), or ``digest()``."""
        ...

    def sync(self) -> None:
        """Makes the VM's state durable (before a handoff step is persisted)."""
        ...

    def activate(self) -> None:
        """Makes a verified incoming VM runnable and runs it."""
        ...

    def mark_stopped(self) -> None:
        """A resume failed: the VM says paused until it runs again (nothing is written)."""
        ...

    def scrub(self) -> None:
        """Destroys the VM's memory and keys (after handoff, or a failed incoming VM)."""
        ...


class StreamBackend(HostedVM, Protocol):
    """A hypervisor that migrates by its own byte stream (QEMU); palm_net carries it."""

    paused_at: float | None  # monotonic time the guest stopped for the last copy

    def start_stream(self, downtime_limit: float, bandwidth: float | None, auto_converge: bool,
                     channels: int = 1) -> list[socket.socket]:
        """Starts the hypervisor's migration on ``channels`` streams; each is read from its
        socket of those returned, the main stream's first."""
        ...

    def finish_stream(self, digest: bool = False) -> dict[str, Any]:
        """After the stream ended: the hypervisor completed (its guest paused); its figures
        (the keys of palm_net.hypervisor.qemu.migration_figures).  ``digest``: a digest
        of its memory follows (what it leaves out is part of the figures)."""
        ...

    def listen_stream(self, channels: int) -> None:
        """The incoming hypervisor listens for ``channels`` streams (the main one first)."""
        ...

    def stream_in(self, data: bytes | bytearray | memoryview, channel: int = 0) -> None: ...

    def interrupt_stream(self) -> None:
        """The session ended: a thread blocked in ``stream_in`` returns at once (an error)."""
        ...

    def end_stream(self) -> None:
        """Waits until the incoming hypervisor loaded the whole stream (paused)."""
        ...


class Backend(HostedVM, Protocol):
    """One VM of a page backend (the model) as the engine sees it."""

    # -- source side
    def enable_dirty_log(self) -> None: ...

    def disable_dirty_log(self) -> None: ...

    def collect_dirty(self) -> Gfns:
        """Returns the gfns written since the last call and clears the log."""
        ...

    def read_pages(self, gfns: RoundGfns, start: int, round_no: int, out: Any) -> tuple[PageBatch, int]:
        """Reads gfns[start:...] through the untrusted view: at most MAX_PAGES_PER_MESSAGE
        pages, of which at most ``len(out)`` carry data (written into ``out``, a
        numpy array of pages, which the batch's data views).

        Returns the batch and the index of the first gfn not included.
        """
        ...

    def export_cpu_state(self) -> bytes: ...

    def export_keys(self) -> bytes:
        """Process keys and page layout, for verifying protected pages on arrival."""
        ...

    def protected_ranges(self) -> tuple[tuple[int, int], ...]:
        """The gfns each protected process owns, (first, count), ascending (the layout,
        without its keys: which pages a paused VM's metadata must come from)."""
        ...

    def export_protection(self) -> bytes:
        """The protected-context blob: keys, per-page metadata, thread contexts."""
        ...

    def set_throttle(self, fraction: float) -> None:
        """Auto-converge: let the vCPUs run only this fraction of the time (1.0 = full)."""
        ...

    # -- destination side
    def write_pages(self, batch: PageBatch) -> None: ...

    def settle(self) -> None:
        """Returns once the incoming VM's memory is all reserved (NoRoomError if it cannot be)."""
        ...

    def import_keys(self, blob: bytes) -> None: ...

    def import_cpu_state(self, state: bytes) -> None: ...

    def import_protection(self, blob: bytes) -> None: ...

    # -- post-copy (proto 7.9)
    on_fault: Callable[[int], None] | None  # the agent's: a guest access waits for this missing gfn

    def read_metadata(self, gfns: Gfns) -> tuple[bytes, Gfns, bytes]:
        """Source, paused at the switch: for ascending ``gfns``, kinds (one byte each: 1
        normal, 2 protected), versions (a protected page's; 0 for a normal one) and the
        protected pages' 16-byte MACs in order, final (read_pages later sends exactly them)."""
        ...

    def set_missing(self, round_no: int, gfns: Gfns, vers: Gfns, tags: bytes) -> None:
        """Destination, one MISSING message: marks ``gfns`` missing in the VM's durable map
        and takes each protected page's version and MAC as its final metadata (ValueError
        for input that does not fit)."""
        ...

    def postcopy_state(self) -> tuple[int, Gfns, Gfns] | None:
        """None if no page is missing; else (the switch's round, the missing gfns ascending,
        the version each must come with).  As it was after the VM is reopened."""
        ...

    def fill_missing(self, batch: PageBatch) -> None:
        """Pages arriving in post-copy, taken whole or refused whole (PostcopyPageError of
        the model: code "replay", "rollback" or "integrity"); a guest access waiting for
        one goes on."""
        ...

    def missing_count(self) -> int: ...

    def waiting_pages(self) -> list[int]:
        """The missing gfns guest accesses wait for now (each asked of ``on_fault`` when it
        began, whatever hook was set then), ascending."""
        ...

    def finish_postcopy(self) -> None:
        """Removes the map once no page is missing (after the durable COMMITTED); idempotent."""
        ...

