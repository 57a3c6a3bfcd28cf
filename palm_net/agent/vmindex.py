"""The VMs an agent hosts, as its state directory remembers them.

An agent must never lose sight of its VMs: restarted with another
``--memory-dir``, or after its memory directory vanished, it would start
with "no VMs" while its QEMU guests kept running unmanaged.  The registry
keeps ``DIR/vms.json`` (the memory directory, the boot, each VM's backend,
QEMU pid and QMP socket) up to date; at start the agent compares it with
the memory directory now in force and refuses, naming the VMs, where they
are and the flag that finds them, or with ``--adopt-vms`` moves them into
the new directory (a model VM; a QEMU guest still running cannot move).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from palm_net.agent.errors import AgentError
from palm_net.hostfs import UnsafePathError, read_nofollow, write_atomic
from palm_net.hypervisor.qemu import live_processes
from palm_net.hypervisor.vms import AnyVM

log = structlog.get_logger("palm.agent")

INDEX_FILE = "vms.json"


def boot_id() -> str:
    """This boot of the host (a reboot empties tmpfs: the VMs of an earlier boot are gone)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class VmIndex:
    memory_dir: Path
    boot: str
    vms: dict[str, dict[str, Any]]


def read_index(state_dir: Path) -> VmIndex | None:
    try:
        raw = json.loads(read_nofollow(state_dir / INDEX_FILE, 1 << 20))
        return VmIndex(Path(raw["memory_dir"]), str(raw.get("boot", "")), dict(raw["vms"]))
    except FileNotFoundError:
        return None
    except (OSError, UnsafePathError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(f"{state_dir / INDEX_FILE}: unreadable ({exc}); remove it to start afresh") from None


def write_index(state_dir: Path, memory_dir: Path, vms: Iterable[AnyVM]) -> None:
    """Best effort: the index only guards the next start (a full disk is logged, not fatal)."""
    entries = {}
    for vm in vms:
        e: dict[str, Any] = {"backend": vm.backend, "vm_id": vm.vm_id.hex()}
        if vm.backend == "qemu":
            e.update(pid=vm.config.get("pid"), qmp=str(getattr(vm, "qmp_path", "")))
        entries[vm.name] = e
    body = {"memory_dir": str(memory_dir), "boot": boot_id(), "vms": entries}
    try:
        write_atomic(state_dir / INDEX_FILE, json.dumps(body).encode())
    except OSError as exc:
        log.warning("the index of VMs could not be written", file=str(state_dir / INDEX_FILE),
                    error=exc.strerror or str(exc))


def _running_qemu(name: str, entry: dict[str, Any]) -> int | None:
    """The pid of the VM's QEMU if it still runs (its recorded pid, or any QEMU named by its identity)."""
    if entry.get("backend") != "qemu" or not isinstance(entry.get("vm_id"), str):
        return None
    try:
        pids = live_processes(bytes.fromhex(entry["vm_id"]))
    except ValueError:
        return None
    pid = entry.get("pid")
    return pid if pid in pids else (pids[0] if pids else None)


def describe(name: str, entry: dict[str, Any]) -> str:
    pid = _running_qemu(name, entry)
    if entry.get("backend") == "qemu":
        return f"{name} (QEMU, " + (f"pid {pid} running, QMP {entry.get('qmp')})" if pid else "not running)")
    return name


def _ours(path: Path) -> bool:
    """A real directory of this agent's uid (not a name someone planted meanwhile)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def check_start(state_dir: Path, memory_dir: Path | None, adopt: bool) -> list[str]:
    """Before the agent makes or takes its memory directory (``memory_dir``: the one
    now in force, None: a new one is about to be made): refuses (AgentError, one line)
    if the state records VMs elsewhere, or in a directory that is gone or not this
    agent's; with ``adopt`` returns the VMs to move in (adopt_vms), or goes on
    without the gone ones.  After a reboot the VMs of the earlier boot are gone."""
    idx = read_index(state_dir)
    if idx is None or not idx.vms:
        return []
    names = ", ".join(describe(n, e) for n, e in sorted(idx.vms.items()))
    old = idx.memory_dir
    if idx.boot and idx.boot != boot_id():  # tmpfs emptied: whatever stands at that name now is not theirs
        log.warning("the host restarted since this agent's last run: the VMs it hosted are gone", vms=names,
                    memory_dir=str(old))
        return []
    if not _ours(old):  # gone (deleted, or a name someone planted)
        if not adopt:
            raise AgentError(f"the state in {state_dir} records VMs {names} in {old}, which is missing: restore "
                             f"it and start with --memory-dir {old}, or start with --adopt-vms to go on without "
                             "them")
        log.error("starting without VMs whose memory directory is missing (--adopt-vms)", vms=names,
                  memory_dir=str(old))
        return []
    if memory_dir == old:
        return []
    if not adopt:
        raise AgentError(f"the state in {state_dir} records VMs {names} in {old}, not in the memory directory now "
                         f"in force ({memory_dir or 'a new one'}): start with --memory-dir {old}, or with "
                         "--adopt-vms to move them here")
    for name, entry in sorted(idx.vms.items()):
        if _running_qemu(name, entry) is not None:
            raise AgentError(f"VM {describe(name, entry)} cannot move while its QEMU runs: start with "
                             f"--memory-dir {old}")
    return sorted(idx.vms)


def adopt_vms(state_dir: Path, names: list[str], memory_dir: Path) -> list[str]:
    """Moves the VMs check_start named from the recorded memory directory into ``memory_dir``."""
    idx = read_index(state_dir)
    if idx is None or not names:
        return []
    old, moved = idx.memory_dir, []
    for name in names:
        src = old / name
        if not src.is_dir() or src.is_symlink():
            log.error("VM recorded but not found in its memory directory", vm=name, memory_dir=str(old))
            continue
        try:
            os.rename(src, memory_dir / name)
        except OSError as exc:
            raise AgentError(f"cannot move VM {name} from {old} to {memory_dir}: {exc.strerror or exc} "
                             f"(start with --memory-dir {old})") from None
        moved.append(name)
    log.warning("VMs adopted into the memory directory now in force", vms=moved, from_dir=str(old),
                memory_dir=str(memory_dir))
    return moved
