"""What every hosted VM keeps in its directory's vm.json: run state, policy, migration id."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
        tmp = self.dir / "vm.json.tmp"
        tmp.write_text(json.dumps(self.config))
        os.replace(tmp, self.dir / "vm.json")
