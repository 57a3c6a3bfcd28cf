"""What every hosted VM keeps in its directory's vm.json: run state, policy, migration id."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from palm_net.hostfs import UnsafePathError, fsync_dir, read_nofollow, verify_dir, write_atomic
from palm_net.hypervisor.backend import HypervisorError

CONFIG_FILE = "vm.json"
STAGED_FILE = "vm.json.committed"  # an incoming VM's vm.json once it runs, written at PREPARE


class ConfiguredVM:
    """The vm.json half of a VM, shared by the model and QEMU backends."""

    dir: Path
    config: dict[str, Any]

    @property
    def state(self) -> str:
        return str(self.config["state"])

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def channels_wanted(self) -> int:
        return 1

    @property
    def policy(self) -> str:
        return str(self.config.get("policy", "any"))

    @property
    def migration(self) -> bytes | None:
        """The migration this VM is part of (as source or incoming), if any."""
        mid = self.config.get("migration")
        return bytes.fromhex(mid) if mid else None

    def mark_stopped(self) -> None:
        """A resume or activation failed: the VM is not known to run, so it says paused
        (in memory) until one succeeds; the agent's retry then resumes it."""
        if self.state == "running":
            self.config = dict(self.config, state="paused")

    def set_migration(self, mid: bytes | None) -> None:
        """Records the migration this VM is part of; as it was if it cannot be written."""
        old = self.config.get("migration")
        self.config["migration"] = mid.hex() if mid else None
        try:
            self._save_config()
        except BaseException:
            self.config["migration"] = old
            raise

    def _save_config(self) -> None:
        write_atomic(self.dir / CONFIG_FILE, json.dumps(self.config).encode())

    # An incoming VM's activation must not fail for lack of space (its row is
    # COMMITTED by then): the vm.json it will have once running is written
    # beside the current one before PREPARED, and activation renames it over
    # (a rename allocates nothing).  Until then the VM says "incoming" on disk,
    # and a restart activates it from its COMMITTED row.

    def _stage_activation(self) -> None:
        """Before PREPARED: the running vm.json, written and synced beside the current one."""
        running = dict(self.config, state="running", migration=None)
        write_atomic(self.dir / STAGED_FILE, json.dumps(running).encode())

    def _flip_activation(self) -> None:
        """The VM runs: the staged vm.json becomes the VM's (in memory at once; on disk
        by a rename; OSError if the file system refuses even that: the VM still runs,
        and the row's COMMITTED activates it again after a restart)."""
        self.config = dict(self.config, state="running", migration=None)
        os.replace(self.dir / STAGED_FILE, self.dir / CONFIG_FILE)
        fsync_dir(self.dir)


def load_config(vm_dir: Path) -> dict[str, Any]:
    """A VM directory's vm.json: the directory must be ours (0700) and the file
    a regular file (palm_net.hostfs); HypervisorError otherwise."""
    try:
        verify_dir(vm_dir, "VM directory")
        config = json.loads(read_nofollow(vm_dir / CONFIG_FILE))
    except (OSError, ValueError, UnsafePathError) as exc:
        raise HypervisorError(f"{vm_dir}: cannot read {CONFIG_FILE} ({exc})") from None
    if not isinstance(config, dict):
        raise HypervisorError(f"{vm_dir}: {CONFIG_FILE} is not an object")
    return config
