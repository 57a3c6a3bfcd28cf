"""An incoming VM's memory file, reserved by a helper thread while the migration's
data already arrives (both backends: the model's pages, QEMU's RAM file)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from pathlib import Path

from palm_net.hostfs import UnsafePathError, open_nofollow, reserve
from palm_net.hypervisor.backend import NoRoomError
from palm_net.hypervisor.model_guest import populate


class Reserver:
    """An incoming VM's memory, reserved (fallocate) by a helper thread ahead of its
    data, in ascending chunks, so that the reservation is off the BEGIN path (1 GiB
    of tmpfs takes 0.2 s here); and, where the agent maps it (``base``), populated
    just ahead of where the data is being written, so that the receive path writes
    into memory that is already there (a fresh page costs a fault, a clear and a
    mapping: 0.35-0.5 s per GiB here), while the stretches that stay zero are never
    touched.  A write waits until its pages are reserved, so none lands past a full
    file system (SIGBUS on tmpfs); no room ends the migration.  QEMU writes where
    its stream says, so a QEMU VM waits for all of it before PREPARE; a page QEMU
    writes past a full file system kills it (SIGBUS), which fails the migration
    closed, before PREPARE too.  An incoming QEMU's file is faulted in by a second
    thread beside its reservation (see _fault_in_all)."""

    CHUNK = 32 << 20
    AHEAD = 2 * CHUNK  # populated beyond the highest byte written so far

    def __init__(self, path: Path, base: int | None, size: int, what: str = "the incoming VM's memory",
                 fault_in: bool = False, reserved: bool = False) -> None:
        self._fd = open_nofollow(path, os.O_RDWR)
        self._path = path
        self._base = base  # where the file is mapped (it stays mapped until stop() returns); None: not ours
        self._what = what
        self._fault_in = fault_in and base is None  # see _fault_in_all
        self._size = size
        self._done = size if reserved else 0  # reserved: [0, _done) (``reserved``: all of it already)
        self._populated = 0
        self._wanted = 0  # the highest byte a write waited for (populated ahead of it)
        self._needed = 0  # the highest byte anyone waits to be reserved (reserved first)
        self._error: str | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"reserve-{path.parent.name}", daemon=True)
        # An incoming QEMU's RAM: faulted in beside the reservation, not after it (fallocate
        # of 1 GiB took 0.4 s here, a head start the fault-in needs to stay ahead of QEMU),
        # through a file descriptor of its own (the reservation's closes when it is done).
        # Not before it either: a large guest streamed fast would then be reserved in the pause.
        self._faulter: threading.Thread | None = None
        try:
            if self._fault_in and not self._done:
                fd = os.dup(self._fd)
                self._faulter = threading.Thread(target=self._fault_in_beside, args=(fd,), daemon=True,
                                                 name=f"fault-in-{path.parent.name}")
                try:
                    self._faulter.start()
                except BaseException:
                    os.close(fd)
                    raise
            self._thread.start()
        except BaseException:
            self._stop = True
            os.close(self._fd)
            raise

    def _run(self) -> None:
        if self._faulter is not None:  # the fault-in first where the CPU is short, the reservation beside it
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                    # What a caller waits for is reserved first; then memory is populated
                    # up to just ahead of the writes; else reserved on.
                    target = min(self._done, self._wanted + self.AHEAD)
                    populating = self._base is not None and self._done >= self._needed and \
                        self._populated < target
                    if not populating and self._done >= self._size:
                        if self._populated >= self._size or self._base is None:
                            break
                        self._cond.wait()  # all reserved: populate as the writes move on
                        continue
                    off = self._populated if populating else self._done
                n = min(self.CHUNK, self._size - off)
                if populating:
                    assert self._base is not None
                    populate(self._base + off, n)  # best effort
                else:
                    reserve(self._fd, n, self._what, offset=off)
                with self._cond:
                    if populating:
                        self._populated = off + n
                    else:
                        self._done = off + n
                    self._cond.notify_all()
            if self._fault_in and self._faulter is None:  # reserved when it was made: faulted in now
                self._fault_in_all(self._fd)
        except BaseException as exc:
            with self._cond:
                self._error = str(exc) if isinstance(exc, UnsafePathError) else "reservation failed"
                self._cond.notify_all()
        finally:
            os.close(self._fd)

    def _fault_in_beside(self, fd: int) -> None:
        try:
            self._fault_in_all(fd)
        except (OSError, ValueError, TypeError):
            pass  # best effort: a speed-up only, never the reservation's failure
        finally:
            os.close(fd)

    def _fault_in_all(self, fd: int) -> None:
        """A file the hypervisor maps (QEMU's RAM): every page allocated and cleared now,
        through a mapping of our own that goes again, so that the hypervisor's first
        touch of a page only maps it (fallocate leaves each page to be cleared at its
        first fault: 2 us a page, as slow as the source's scan of its zero pages, so a
        destination QEMU took as long as its source over the end of the first pass and
        the lag was downtime).  From the end down: a first pass ends at the top of
        RAM, where the guest pauses.  Where it still lags as QEMU's stream ends, the
        rest is QEMU's to clear in the pause: 230-450 ms of a 1 GiB guest's downtime
        on a host whose fresh pages are slow (a VM whose freed memory goes back to its
        host), 12-42 ms once it ran beside the reservation.  Best effort; ends at
        stop()."""
        with mmap.mmap(fd, self._size) as mm:
            anchor = ctypes.c_char.from_buffer(mm)
            try:
                base = ctypes.addressof(anchor)
                for off in reversed(range(0, self._size, self.CHUNK)):
                    if self._stop or not populate(base + off, min(self.CHUNK, self._size - off), write=False):
                        return
            finally:
                del anchor

    def start_fault_in(self) -> None:
        """Faults the file in from now on, beside what is left of its reservation (made
        with ``fault_in`` False): for a hypervisor that may leave alone the pages it is
        not sent (QEMU 9.0+ on multifd), known only once the stream's shape is; where it
        reads every page it is sent, as above.  Best effort; not after stop().  (The
        reservation keeps its priority: mostly done by then.)"""
        with self._cond:
            if self._fault_in or self._base is not None or self._faulter is not None or self._stop:
                return  # (``fault_in``: faulted in already, beside or after the reservation)
            try:
                fd = open_nofollow(self._path, os.O_RDWR)
            except (OSError, UnsafePathError):
                return
            faulter = threading.Thread(target=self._fault_in_beside, args=(fd,), daemon=True,
                                       name=f"fault-in-{self._path.parent.name}")
            try:
                faulter.start()
            except RuntimeError:  # no thread to be had: no speed-up either
                os.close(fd)
                return
            self._faulter = faulter

    def wait(self, end: int, writing: bool = True) -> None:
        """Returns once bytes [0, end) are reserved; NoRoomError if they never will be.
        ``writing``: the caller writes up to ``end`` next (populate ahead of it)."""
        with self._cond:
            if end > self._needed or (writing and end > self._wanted):
                self._needed = max(self._needed, end)
                if writing:
                    self._wanted = max(self._wanted, end)
                self._cond.notify_all()
            while self._done < end and self._error is None and not self._stop:
                self._cond.wait()
            if self._done < end:
                raise NoRoomError(self._error or "the reservation was stopped")

    def stop(self, join: bool = True) -> int:
        """Stops reserving; returns how many bytes (from 0) were reserved.  ``join`` False:
        only asks (the thread ends after its chunk, holding nobody up meanwhile)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if join:
            self._thread.join()
            if self._faulter is not None:
                self._faulter.join()
        return self._done
