"""What every hosted VM keeps in its directory's vm.json: run state, policy, migration id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from palm_net.hostfs import UnsafePathError, read_nofollow, verify_dir, write_atomic
from palm_net.hypervisor.backend import HypervisorError

CONFIG_FILE = "vm.json"


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
    def policy(self) -> str:
        return str(self.config.get("policy", "any"))

    @property
    def migration(self) -> bytes | None:
        """The migration this VM is part of (as source or incoming), if any."""
        mid = self.config.get("migration")
        return bytes.fromhex(mid) if mid else None

    def set_migration(self, mid: bytes | None) -> None:
        self.config["migration"] = mid.hex() if mid else None
        self._save_config()

    def _save_config(self) -> None:
        write_atomic(self.dir / CONFIG_FILE, json.dumps(self.config).encode())


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
