"""Scratch directories for tests and drills, on tmpfs where guest memory lives.

Every scratch directory of a process lies under one directory named after the
process (``/dev/shm/palm-scratch-PID``), so what a killed run leaves behind (a
test process killed by a timeout, a mutation run, a CI job cancelled) is found
and removed by the next run: ``sweep()`` removes the directories of processes
that no longer exist.  Guest memory is large: before this, killed runs had
left 18 GB in /dev/shm on one machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "palm-scratch-"


def base() -> Path:
    """Where scratch directories go: /dev/shm when there is one, else the temp directory."""
    shm = Path("/dev/shm")  # noqa: S108 (a directory of our own is made inside it, 0700)
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def root() -> Path:
    """This process's directory of scratch directories (made 0700 on first use)."""
    d = base() / f"{PREFIX}{os.getpid()}"
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.geteuid():
            raise RuntimeError(f"{d} exists and is not this user's directory") from None
    return d


def mkdtemp(prefix: str = "palm-") -> Path:
    """A fresh private scratch directory (0700) under this process's root."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root()))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def sweep() -> list[Path]:
    """Removes the scratch roots of processes that are gone; returns them."""
    gone = []
    for d in base().glob(f"{PREFIX}*"):
        suffix = d.name[len(PREFIX):]
        if not suffix.isdigit() or d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.geteuid():
            continue
        if int(suffix) != os.getpid() and not alive(int(suffix)):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def remove_own() -> None:
    """This process's scratch root, at its end."""
    d = base() / f"{PREFIX}{os.getpid()}"
    if d.is_dir() and not d.is_symlink():
        shutil.rmtree(d, ignore_errors=True)
