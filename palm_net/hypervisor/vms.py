"""The VMs an agent hosts: the embedded model or a QEMU process, found by their directory."""

from __future__ import annotations

from pathlib import Path

from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.qemu import QemuVM
from palm_net.hypervisor.vmconfig import load_config

AnyVM = ModelVM | QemuVM


def open_vm(vm_dir: Path, sealing_key: bytes) -> AnyVM:
    """Reopens a VM after an agent restart (HypervisorError if its files are damaged or not ours)."""
    config = load_config(vm_dir)
    if config.get("backend") == "qemu":
        return QemuVM.open(vm_dir, config)
    return ModelVM.open(vm_dir, config, sealing_key)
