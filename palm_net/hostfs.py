"""Paths on the host that no other local user can plant, redirect or read.

Other local users are untrusted (docs/SECURITY.md).  Every file and socket
of the agent lives in a directory that the agent made itself (``mkdir``
fails if anything, a symlink included, is already there) or verified:

- owned by the agent's uid, mode 0700, not a symlink;
- every ancestor owned by root or the agent and not writable by anyone
  else, unless it is a sticky directory owned by root such as /tmp or
  /dev/shm (there others may add names but never rename or remove ours).

Files inside are created with O_EXCL|O_NOFOLLOW under a temporary name and
renamed into place, and fsync'd where durability matters.  A directory that
fails a check is refused with a one-line error saying why; nothing is
"repaired" behind the operator's back.

This module imports nothing from palm_net: every layer may use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import stat
from pathlib import Path

from palm_net.units import format_bytes

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
LOCK_FILE = ".lock"


class UnsafePathError(Exception):
    """A path fails the ownership/mode checks, or is held by another agent (one line)."""


def _uid() -> int:
    return os.geteuid()


def check_ancestors(path: Path) -> None:
    """Every directory from ``path`` up to / is owned by root or us and writable
    by nobody else (sticky root-owned directories excepted), both as written
    (a symlink on the way must be root's or ours: another user could retarget
    it later) and resolved."""
    uid = _uid()
    given = Path(os.path.abspath(path))
    for anc in (given, *given.parents):
        try:
            st = os.lstat(anc)
        except OSError as exc:
            raise UnsafePathError(f"{path}: cannot check {anc} ({exc.strerror})") from None
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, uid):
            raise UnsafePathError(f"{path}: {anc} is a symlink of uid {st.st_uid}, who could point it elsewhere")
    real = Path(os.path.realpath(path))
    for anc in (real, *real.parents):
        try:
            st = os.stat(anc)
        except OSError as exc:
            raise UnsafePathError(f"{path}: cannot check {anc} ({exc.strerror})") from None
        if st.st_uid not in (0, uid):
            raise UnsafePathError(f"{path}: {anc} belongs to uid {st.st_uid}, who could replace what is below it")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
            raise UnsafePathError(f"{path}: {anc} is writable by other users (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}), who could replace what is below it")


CONTROL_DIR = "control socket directory"  # the `what` of the control socket's directory


def verify_dir(path: Path, what: str = "directory") -> Path:
    """Refuses ``path`` unless it is a real directory of ours, mode 0700, in safe
    ancestors; returns its real path (use that from then on)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafePathError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{what} {path} is a symlink; give the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a directory")
    if st.st_uid != _uid():
        raise UnsafePathError(f"{what} {path} belongs to uid {st.st_uid}, not to this agent's uid {_uid()}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        fix = ("give the socket a 0700 directory of its own: mkdir -m 700 DIR, then --control DIR/control.sock"
               if what == CONTROL_DIR else f"chmod 700 {path}")  # not chmod on a working directory
        raise UnsafePathError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 ({fix})")
    check_ancestors(path.parent)
    return Path(os.path.realpath(path))


def ensure_dir(path: Path, what: str = "directory") -> Path:
    """Makes ``path`` (and missing parents) mode 0700, or verifies what is there."""
    path = Path(os.path.abspath(path))
    try:
        os.lstat(path)
    except FileNotFoundError:
        if not path.parent.exists():
            ensure_dir(path.parent, what)
        check_ancestors(path.parent)  # before making anything below them
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # someone was faster: verify whatever is there now
        except OSError as exc:
            raise UnsafePathError(f"cannot create {what} {path}: {exc.strerror}") from None
    return verify_dir(path, what)


def make_private_dir(parent: Path, prefix: str) -> Path:
    """A new directory with an unpredictable name, made by us alone (exclusive mkdir)."""
    check_ancestors(parent)
    for _ in range(16):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise UnsafePathError(f"cannot create a directory in {parent}: {exc.strerror}") from None
        return verify_dir(path)
    raise UnsafePathError(f"cannot create a fresh directory in {parent}")


def open_nofollow(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that never follows a symlink at the last component."""
    return os.open(path, flags | NOFOLLOW, mode)


def create_exclusive(path: Path, mode: int = 0o600) -> int:
    """A new file that was not there before (no planted file, no symlink); returns a RDWR fd."""
    return open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """Replaces ``path`` with ``data``: a fresh temporary file (O_EXCL, O_NOFOLLOW),
    fsync'd, renamed over ``path``; with ``durable`` the directory is fsync'd too."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = create_exclusive(tmp, mode)
    try:
        try:
            os.fchmod(fd, mode)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def read_nofollow(path: Path, limit: int = 1 << 20) -> bytes:
    """A regular file's content (at most ``limit`` bytes), never through a symlink."""
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise UnsafePathError(f"{path} is larger than {limit} bytes")
        out = bytearray()
        while len(out) <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(out)
            out += chunk
        raise UnsafePathError(f"{path} is larger than {limit} bytes")
    finally:
        os.close(fd)


def read_private_file(path: Path, what: str, limit: int) -> bytes:
    """A secret's file (a key, a password): a regular file, never through a symlink,
    of this user and readable by nobody else, at most ``limit`` bytes.  UnsafePathError
    in one line that says which and how to fix it (``what`` names the file's kind)."""
    try:
        fd = open_nofollow(path, os.O_RDONLY)
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: {'is a symlink' if exc.errno == errno.ELOOP else exc.strerror}") \
            from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise UnsafePathError(f"{what} {path} belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):  # anyone else who reads it holds the secret
            raise UnsafePathError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must be readable "
                                  f"by its owner only, not by group/other (chmod 600 {path})")
        if st.st_size > limit:
            raise UnsafePathError(f"{what} {path} is over {limit} bytes")
        return os.read(fd, limit + 1)
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def reserve(fd: int, size: int, what: str, offset: int = 0) -> None:
    """Allocates ``size`` bytes of a file (from ``offset``) now, so that a later write
    into its mapping cannot fail (on tmpfs a write past the free space is SIGBUS)."""
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            try:
                st = os.fstatvfs(fd)
                free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            except OSError:
                raise UnsafePathError(f"no room for {what} ({format_bytes(size)}): the file system is full") from None
            if size > free:
                raise UnsafePathError(f"no room for {what}: {format_bytes(size)} does not fit in its file system "
                                      f"({format_bytes(free)} free of {format_bytes(total)})") from None
            raise UnsafePathError(f"no room for {what} ({format_bytes(size)}): the file system is full "
                                  f"({format_bytes(free)} free of {format_bytes(total)})") from None
        raise


def reserves_natively(fd: int) -> bool:
    """Whether the file system allocates a file's space itself (fallocate(2)): only then
    may a reservation run while another process writes the file.  Elsewhere glibc's
    posix_fallocate imitates it, writing a zero byte into each block that reads as zero,
    which wipes a byte written meanwhile."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(1))) == 0


def memory_backing(path: Path) -> str:
    """What backs files in ``path``, in a few words, for the agent's start-up line:
    the file system of its mount and, for tmpfs, the page size its files get
    (``huge=`` mount option; docs/DATAPATH.md says why it matters)."""
    best: tuple[int, str, str] = (-1, "unknown", "")
    real = str(path.resolve())
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                point = left.split()[4]
                fstype, _, options = [*right.split(), "", "", ""][:3]
                if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > best[0]:
                    best = (len(point), fstype, options)
    except OSError:
        return "unknown"
    _, fstype, options = best
    if fstype == "hugetlbfs":
        return "hugetlbfs (huge pages)"
    if fstype != "tmpfs":
        return fstype
    huge = next((o.split("=", 1)[1] for o in options.split(",") if o.startswith("huge=")), "never")
    pages = "" if huge in ("always", "within_size") else " (4 KiB pages: see docs/DATAPATH.md)"
    return f"tmpfs, huge={huge}{pages}"


class DirLock:
    """An exclusive lock on a directory for the lifetime of this process
    (flock on DIR/.lock; the kernel drops it when the process dies)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        fd = open_nofollow(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UnsafePathError(f"{what} {path} is in use by another agent (pid {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
