"""The VMs an agent hosts: the embedded model or a QEMU process, found by their directory."""

from __future__ import annotations

import json
from pathlib import Path

from palm_net.hypervisor.model import ModelVM, VmError
from palm_net.hypervisor.qemu import QemuVM

AnyVM = ModelVM | QemuVM
BACKENDS = ("model", "qemu")


def open_vm(vm_dir: Path, sealing_key: bytes) -> AnyVM:
    """Reopens a VM after an agent restart (HypervisorError if its files are damaged)."""
    try:
        backend = json.loads((vm_dir / "vm.json").read_text()).get("backend", "model")
    except (OSError, ValueError, AttributeError) as exc:
        raise VmError(f"{vm_dir}: cannot read vm.json ({exc})") from None
    if backend == "qemu":
        return QemuVM.open(vm_dir)
    return ModelVM.open(vm_dir, sealing_key)
