"""Guest workloads that dirty memory while the VM migrates.

A workload runs in its own thread (a vCPU), so dirtying is truly concurrent
with the migration.  The sequence of writes is fixed by the seed; the timing
is wall-clock pacing at the requested rate.  Specs (joined with '+'):

    idle                        nothing
    random:RATE                 uniform random page writes, RATE pages/s
    hotset:SIZE:RATE            writes to the first SIZE of memory (e.g. 64MiB)
    protected:RATE              protected processes write their own pages
"""

from __future__ import annotations

import random
import threading
import time

from palm_net.hypervisor.backend import PAGE_SIZE
from palm_net.hypervisor.model_guest import ModelGuest, VmError
from palm_net.hypervisor.vmspec import Part, WorkloadError, parse_workload

TICK = 0.002




class Workload:
    """Runs a spec against a VM in a daemon thread until stopped."""

    def __init__(self, vm: ModelGuest, spec: str, seed: int = 0) -> None:
        self.vm = vm
        self.spec = spec
        self.parts = parse_workload(spec)
        self.rng = random.Random(seed)
        self.writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        unprotected = vm.npages - vm.protected_pages
        for p in self.parts:
            if p.kind == "protected" and not vm.processes:
                raise WorkloadError("workload 'protected' needs a VM with protected processes")
            if p.kind in ("random", "hotset") and unprotected < 1:
                raise WorkloadError("workload needs unprotected memory")

    @property
    def idle(self) -> bool:
        return not self.parts

    def start(self) -> None:
        if self.idle or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"vcpu-{self.vm.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None

    def _one_write(self, part: Part) -> None:
        vm, rng = self.vm, self.rng
        stamp = (self.writes & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") + rng.randbytes(8)
        offset = rng.randrange(0, PAGE_SIZE - len(stamp))
        unprotected = vm.npages - vm.protected_pages
        if part.kind == "protected":
            idx = rng.randrange(len(vm.processes))
            p = vm.processes[idx]
            vm.process_write(idx, p.first + rng.randrange(p.count), stamp, offset)
        elif part.kind == "hotset":
            vm.guest_write(rng.randrange(min(part.pages, unprotected)), stamp, offset)
        else:
            vm.guest_write(rng.randrange(unprotected), stamp, offset)
        self.writes += 1

    def _run(self) -> None:
        start = time.monotonic()
        done = [0.0] * len(self.parts)
        while not self._stop.is_set():
            if not self.vm.wait_running(0.05):
                start = time.monotonic()  # no catch-up burst after a pause
                done = [0.0] * len(self.parts)
                continue
            elapsed = time.monotonic() - start
            for i, part in enumerate(self.parts):
                due = part.rate * self.vm.throttle * elapsed - done[i]
                n = int(due)
                for _ in range(min(n, 100_000)):
                    try:
                        self._one_write(part)
                    except VmError:
                        break  # paused under us: the next loop waits
                done[i] += n
            time.sleep(TICK)  # pacing only; pause/resume use the VM's condition
