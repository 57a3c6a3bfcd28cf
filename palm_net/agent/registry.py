"""The VMs an agent hosts: the one owner of which VM a name means here.

Every VM lives in a directory of the agent's memory directory (the embedded
model's memory, or a QEMU process's RAM file and config).  The registry
creates, finds, guards and forgets them; names are reserved while an
incoming VM is being made, so two sessions (or a session and the operator)
never get the same name.  It runs on the agent's trio thread; the slow
parts of creating a VM (starting QEMU, reserving memory) run in a worker
thread on paths the registry reserved first.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog
import trio

from palm_net.agent.errors import AgentError
from palm_net.agent.vmindex import describe, read_index, write_index
from palm_net.crypto.identity import validate_name
from palm_net.hypervisor.backend import PAGE_SIZE, HypervisorError, describe_error
from palm_net.hypervisor.model import ModelVM
from palm_net.hypervisor.qemu import Confinement, QemuSpec, QemuVM
from palm_net.hypervisor.vms import AnyVM, open_vm
from palm_net.hypervisor.vmspec import check_workload, validate_policy
from palm_net.hypervisor.workload import Workload
from palm_net.migration.handoff import (
    Activation,
    HandoffState,
    HandoffStore,
    MigrationRow,
    activate_committed,
    may_run,
    may_scrub,
)
from palm_net.wire.protocol import Role

log = structlog.get_logger("palm.agent")


class VmRegistry:
    def __init__(self, memory_dir: Path, run_dir: Path, sealing_key: bytes, store: HandoffStore,
                 confinement: Confinement, qemu_accel: str | None,
                 migrating: Callable[[str], bool], state_dir: Path | None = None,
                 images_dir: Path | None = None) -> None:
        self.memory_dir = memory_dir
        self.images_dir = images_dir  # the only files a QEMU guest's -device loader may load
        self.state_dir = state_dir  # where the index of VMs is kept (palm_net.agent.vmindex), if anywhere
        self.run_dir = run_dir
        self.sealing_key = sealing_key
        self.store = store
        self.confinement = confinement
        self.qemu_accel = qemu_accel
        self.migrating = migrating  # the outgoing service: is this VM migrating now?
        self.vms: dict[str, AnyVM] = {}
        self._reserved: set[str] = set()  # names of incoming VMs being made
        # Committed here (their rows say so) but not running: activation failed; retried
        # by the agent, reported everywhere, resumable by the operator, never scrubbed.
        self.not_running: dict[str, str] = {}
        # Handed-over copies (their rows DONE) whose scrub failed: no longer ours to run or
        # show, their memory goes at the next attempt (retried like activations).
        self.to_scrub: dict[bytes, AnyVM] = {}
        self.retry_wanted = trio.Event()  # set when a VM joins not_running or to_scrub
        self.changed: Callable[[], None] = lambda: None  # told when a VM comes, goes or changes state

    def __iter__(self) -> Iterator[AnyVM]:
        return iter(list(self.vms.values()))

    def __len__(self) -> int:
        return len(self.vms)

    def dir_of(self, name: str) -> Path:
        return self.memory_dir / name

    def get(self, name: str) -> AnyVM:
        vm = self.vms.get(name)
        if vm is None:
            raise AgentError(f"unknown VM {name!r}")
        return vm

    def of(self, row: MigrationRow) -> AnyVM | None:
        """The VM a migration is about: the one with its identity that records
        that migration, never merely one with its name (names are reused)."""
        vm = self.vms.get(row.vm)
        if vm is not None and vm.vm_id == row.vm_id and vm.migration == row.mid:
            return vm
        return None

    def forget(self, vm: AnyVM) -> None:
        if self.vms.get(vm.name) is vm:
            del self.vms[vm.name]
            self.not_running.pop(vm.name, None)
            self._write_index()
            self.changed()

    def _write_index(self) -> None:
        if self.state_dir is not None:
            write_index(self.state_dir, self.memory_dir, self.vms.values())

    # -- committed VMs whose activation failed

    def activation_failed(self, vm: AnyVM, error: str) -> None:
        """A VM this agent owns by its row does not run (committed here, or the source's
        again after an abort): kept, reported loudly, retried."""
        self.not_running[vm.name] = error
        log.error("VM is this agent's but does not run: retried (palm vm resume to try now)",
                  vm=vm.name, state=vm.state, error=error)
        self.retry_wanted.set()
        self.changed()

    def scrub_failed(self, vm: AnyVM, mid: bytes) -> None:
        """A handed-over copy (row DONE) still holds memory: forgotten here (it never runs
        again), its scrub retried."""
        log.error("the handed-over copy could not be scrubbed yet: retried", vm=vm.name, migration=mid.hex())
        self.forget(vm)
        self.to_scrub[mid] = vm
        self.retry_wanted.set()

    def activate(self, vm: AnyVM, why: str = "settled late") -> Activation:
        """One attempt to run a VM this agent holds, as its row allows: committed here
        (activation), or the source's after an abort (resume); an incoming VM never
        committed is discarded (``why``, recorded with its abort).  Blocking: a worker
        thread, or the start-up."""
        mid = vm.migration
        row = self.store.get(mid) if mid is not None else None
        if vm.state == "incoming":
            if row is None or not may_run(Role.DESTINATION, row.state):
                self.store.abort_forever(mid if row is not None else None, vm, why)
                return Activation(False, False, None if not vm.dir.exists() else "not committed, not discarded")
            return activate_committed(vm)
        if row is not None and (row.role is not Role.SOURCE or not may_run(Role.SOURCE, row.state)):
            return Activation(False, False, f"its migration is {row.state}: not this agent's to run")
        try:
            vm.resume_after_migration()
        except (HypervisorError, OSError) as exc:
            return Activation(True, vm.running, describe_error(exc))
        return Activation(True, vm.running, None if vm.running else "not running after resume")

    def activated(self, vm: AnyVM, act: Activation) -> None:
        """The result of an attempt (the trio thread)."""
        if act.running:
            self.not_running.pop(vm.name, None)
            log.info("VM runs again", vm=vm.name)
            self.start_workload(vm)
        elif not act.committed and act.error is None:  # an incoming VM never committed: discarded
            self.forget(vm)
            log.warning("incoming VM discarded: its migration was not committed", vm=vm.name)
        elif act.error is not None:
            self.not_running[vm.name] = act.error

    def name_free(self, name: str) -> bool:
        return name not in self.vms and name not in self._reserved and not self.dir_of(name).exists()

    # -- names: reserved first, then the VM is made on the reserved path

    def reserve(self, name: str, vm_id: bytes | None = None) -> None:
        """Takes ``name`` (a plain name: no "..", no "/") for a VM about to be made;
        AgentError if it is taken (or, with ``vm_id``, if that VM is hosted here)."""
        validate_name(name)
        if not self.name_free(name):
            raise AgentError(f"a VM named {name!r} already exists")
        if vm_id is not None and any(v.vm_id == vm_id for v in self.vms.values()):
            raise AgentError("a VM with this identity is hosted here already")
        self._reserved.add(name)

    def add(self, vm: AnyVM) -> None:
        """The VM made on a reserved name becomes ours."""
        self._reserved.discard(vm.name)
        self.vms[vm.name] = vm
        self._write_index()
        self.changed()

    def unreserve(self, name: str) -> None:
        """A reservation given up: nothing was made, or what was made is gone."""
        self._reserved.discard(name)
        shutil.rmtree(self.dir_of(name), ignore_errors=True)

    # -- what the operator makes

    def _check_new(self, name: str, policy: str) -> None:
        try:
            validate_policy(policy)
            self.reserve(name)
        except ValueError as exc:
            raise AgentError(str(exc)) from None

    def create_model(self, name: str, memory: int, protected: int = 0, protected_memory: int | None = None,
                     workload: str = "idle", seed: int = 0, policy: str = "any", fill: str = "half",
                     vcpus: int = 1, postcopy: bool = True) -> ModelVM:
        try:
            check_workload(workload)
        except ValueError as exc:
            raise AgentError(str(exc)) from None
        if memory < PAGE_SIZE or memory % PAGE_SIZE:
            raise AgentError("memory must be a positive multiple of 4 KiB")
        self._check_new(name, policy)
        npages = memory // PAGE_SIZE
        prot_pages = 0
        if protected:
            pm = protected_memory if protected_memory is not None else memory // 4
            prot_pages = max(protected, pm // PAGE_SIZE)
        try:
            vm = ModelVM.create(self.dir_of(name), name, npages, self.sealing_key, protected_processes=protected,
                                protected_pages=prot_pages, vcpus=vcpus, fill=fill, seed=seed, policy=policy,
                                workload=workload, postcopy=postcopy)
        except HypervisorError as exc:
            self.unreserve(name)
            raise AgentError(str(exc)) from None
        self.add(vm)
        self.start_workload(vm)
        log.info("VM created", vm=name, pages=npages, protected_pages=prot_pages, workload=workload)
        return vm

    def create_qemu(self, name: str, memory: int, args: list[str], vcpus: int = 1, policy: str = "any") -> QemuVM:
        """A VM that is a QEMU process owned by this agent (KVM if usable, else TCG)."""
        if memory < (1 << 20) or memory % (1 << 20):
            raise AgentError("QEMU memory must be a positive multiple of 1 MiB")
        self._check_new(name, policy)
        try:
            vm = QemuVM.create(self.dir_of(name), self.run_dir, name, memory >> 20, vcpus=vcpus, args=args,
                               policy=policy, accel=self.qemu_accel, confine=self.confinement,
                               images_dir=self.images_dir)
        except HypervisorError as exc:
            self.unreserve(name)
            raise AgentError(str(exc)) from None
        self.add(vm)
        log.info("VM created", vm=name, backend="qemu", memory_mib=memory >> 20, accel=vm.spec.accel, pid=vm.pid)
        return vm

    def make_incoming(self, name: str, vm_id: bytes, mid: bytes, pages: int, vcpus: int, backend: str,
                      spec: bytes) -> AnyVM:
        """Worker thread: the VM an admitted BEGIN asked for, on the name reserved for it
        (HypervisorError if it cannot be made; the caller gives the name back)."""
        if backend == "qemu":
            qspec = QemuSpec.decode(spec)
            if qspec.memory_mib * (1 << 20) != pages * PAGE_SIZE:
                raise HypervisorError("QEMU spec's memory disagrees with BEGIN's page count")
            return QemuVM.create_incoming(self.dir_of(name), self.run_dir, name, vm_id, qspec, migration=mid,
                                          confine=self.confinement)
        return ModelVM.create_incoming(self.dir_of(name), name, vm_id, pages, vcpus, self.sealing_key,
                                       migration=mid)

    # -- what the operator may do to a VM

    def operable(self, name: str) -> AnyVM:
        """The VM, if the operator may pause, resume, destroy or migrate it now: not
        while it migrates or arrives, and never while its handoff is in doubt (only
        the destination's word, or a loud override, may decide where it runs)."""
        vm = self.get(name)
        if self.migrating(name):
            raise AgentError(f"VM {name!r} is migrating")
        mid = vm.migration
        row = self.store.get(mid) if mid else None
        if mid is not None and row is not None and row.role is Role.SOURCE and row.state is HandoffState.HANDED_OFF:
            raise AgentError(f"VM {name!r} was handed off by migration {mid.hex()} and its outcome is in doubt: "
                             f"use palm migrate --resolve {mid.hex()} [--override]")
        if mid is not None and row is not None and row.role is Role.SOURCE and row.state is HandoffState.SERVING:
            raise AgentError(f"VM {name!r} runs on {row.peer.name} since migration {mid.hex()} (post-copy), which "
                             "still needs pages only this copy holds: it never runs here again, and goes once "
                             "they are all served")
        if mid is not None and row is not None and row.role is Role.SOURCE and not may_run(Role.SOURCE, row.state):
            raise AgentError(f"VM {name!r} was handed over to {row.peer.name} by migration {mid.hex()}: this copy "
                             "never runs again (it is scrubbed at the agent's next start)")
        if vm.state == "incoming":
            raise AgentError(f"VM {name!r} is arriving by a migration; it is the destination's only after COMMIT")
        if isinstance(vm, ModelVM) and (vm.missing_count() or any(
                r.vm_id == vm.vm_id for r in self.store.list(role=Role.DESTINATION, states=(HandoffState.PULLING,)))):
            raise AgentError(f"VM {name!r} runs here but still receives pages by post-copy (its migration is not "
                             "committed yet): it can be paused, destroyed or migrated once they are all in")
        return vm

    def set_run_state(self, name: str, run: bool) -> AnyVM:
        if run and name in self.not_running:  # committed here, activation failed: try again now
            vm = self.get(name)
            act = self.activate(vm)
            self.activated(vm, act)
            if not act.running:
                raise AgentError(f"VM {name!r} is committed here but cannot be activated: {act.error}")
            return vm
        vm = self.operable(name)
        if vm.state not in ("running", "paused"):
            raise AgentError(f"VM {name!r} is {vm.state}")
        (vm.resume if run else vm.pause)()
        log.info("VM resumed" if run else "VM paused", vm=name)
        self.changed()
        return vm

    def destroy(self, name: str) -> None:
        vm = self.operable(name)
        vm.scrub()
        self.forget(vm)
        log.info("VM destroyed", vm=name)

    # -- workloads (the model's stand-in for a guest's own code)

    def start_workload(self, vm: AnyVM) -> None:
        """Never fails: a VM whose workload cannot run is simply idle (logged).  Called
        whenever a VM runs here (again): after COMMIT, after a migration out failed."""
        self.changed()
        if not isinstance(vm, ModelVM) or vm.workload is not None:
            return  # a QEMU guest runs its own code
        spec = str(vm.config.get("workload", "idle"))
        try:
            wl = Workload(vm, spec, int(vm.config.get("seed", 0)))
        except Exception as exc:
            log.error("workload not started, VM idle", vm=vm.name, error=f"{type(exc).__name__}: {exc}"[:200])
            return
        vm.workload = wl
        wl.start()

    # -- restart

    def load(self) -> None:
        """Reopens the VMs of the memory directory and applies the handoff rules to
        whatever was in flight.  A VM records the id of the migration it is part
        of, so a restart acts on exactly that migration (a VM name, or even the VM,
        may have come and gone many times before)."""
        for vm_dir in sorted(p for p in self.memory_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            try:
                opened = open_vm(vm_dir, self.sealing_key)
            except HypervisorError as exc:
                log.error("cannot reopen VM, left in place", dir=str(vm_dir), error=str(exc))
                continue
            self.vms[opened.name] = opened
        idx = read_index(self.state_dir) if self.state_dir is not None else None
        if idx is not None and idx.memory_dir == self.memory_dir:
            for name, entry in sorted(idx.vms.items()):
                if name not in self.vms:  # its directory is gone (deleted, or never made durable)
                    log.error("VM recorded by this agent not found in its memory directory", vm=describe(name, entry),
                              memory_dir=str(self.memory_dir))
        store = self.store
        for name, vm in list(self.vms.items()):
            mid = vm.migration
            row = store.get(mid) if mid else None
            bound = log.bind(migration=mid.hex() if mid else None, vm=name, phase="restart")
            if vm.state == "incoming":
                # Committed: it runs (the agent died between the commit and activation, or
                # activation failed); else discarded, and never activated later.
                act = self.activate(vm, "agent restarted")
                if act.running:
                    bound.info("committed migration activated after restart")
                elif act.committed:  # e.g. its QEMU died with us: kept, reported, retried; never scrubbed
                    self.activation_failed(vm, act.error or "activation failed")
                elif not vm.dir.exists():
                    self.forget(vm)
                    bound.warning("incoming migration aborted by restart")
                continue
            if mid is None or row is None or row.role is not Role.SOURCE:
                continue
            if row.state is HandoffState.SENDING:
                store.abort_and_resume(mid, vm, "agent restarted before handoff")
                bound.warning("outgoing migration aborted by restart, VM resumed")
            elif row.state is HandoffState.ABORTED:
                act = self.activate(vm)  # the resume was missing (or failed)
                if not act.running:
                    self.activation_failed(vm, act.error or "did not resume")
            elif may_scrub(Role.SOURCE, row.state):  # done (or abandoned by the operator): only the scrub was missing
                try:
                    if store.scrub_handed_over(mid, vm):
                        self.forget(vm)
                except (HypervisorError, OSError):
                    self.scrub_failed(vm, mid)
            # handed_off: stays paused, in doubt; the outgoing service asks the destination
        for row in store.list(role=Role.DESTINATION, states=(HandoffState.RECEIVING, HandoffState.PREPARED),
                              limit=1 << 30):
            store.abort_forever(row.mid, None, "agent restarted")
        self._scrub_abandoned()
        for vm in self:
            if vm.running:
                self.start_workload(vm)
        self._write_index()

    def _scrub_abandoned(self) -> None:
        """A pulling VM the operator abandoned here whose scrub a stop or crash cut short
        (its row ABANDONED, the VM still here: activated, it records no migration, so it is
        found by its identity, and only if no later migration brought that VM here again)."""
        store = self.store
        rows = store.list(role=Role.DESTINATION, states=(HandoffState.ABANDONED,), limit=1 << 30)
        for row in rows:
            vm = self.vms.get(row.vm)
            if vm is None or vm.vm_id != row.vm_id or any(
                    r.vm_id == row.vm_id and r.created > row.created
                    for r in store.list(role=Role.DESTINATION, limit=1 << 30)):
                continue
            try:
                if store.scrub_abandoned(row.mid, vm):
                    self.forget(vm)
                    log.warning("abandoned VM scrubbed at restart", vm=vm.name, migration=row.mid.hex())
            except (HypervisorError, OSError):
                self.scrub_failed(vm, row.mid)

    def close(self) -> None:
        for vm in self:
            try:
                if isinstance(vm, ModelVM):  # (a QEMU guest has no workload of ours)
                    vm.stop_guest()  # not its workload alone: a vCPU waiting for a page would hold it 5 s
                if vm.dir.exists():
                    vm.sync()
                vm.close()
            except Exception as exc:
                log.error("VM not closed cleanly", vm=vm.name, error=str(exc)[:200])
