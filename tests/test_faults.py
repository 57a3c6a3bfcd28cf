"""Exactly one copy under every fault: the fault matrix (issue 21).

Each case migrates a small model VM with a protected process between two
in-process agents and makes the world fail at one named step
(palm_net.faults.STEPS): the step raises (ENOSPC, EIO, a hypervisor error, a
timeout), or the agent is stopped there (its cancel scope: what SIGTERM
does).  A watcher checks all along that the VM never runs on two hosts; the
stopped agent restarts, recovery runs, and at the end the VM runs on exactly
one host, its protected pages verify and its memory digest is unchanged.
Steps on the abort path are reached by a first fault that sends the
migration there.  Crashes (``os._exit`` at a step) need real processes: the
`exit` column below runs agents as processes with PALM_FAULT set.

The default suite runs the two reproductions of issue 21 and a seeded
sample; ``-m faults`` runs the whole matrix and prints its table.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import random
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from palm_net import faults
from palm_net.agent import faultdrill
from palm_net.agent.errors import AgentError
from palm_net.agent.launcher import AgentProcess, provision, remove_all
from palm_net.migration import effects
from palm_net.migration.handoff import MOVES, HandoffState
from palm_net.migration.params import MigrationParams
from palm_net.testing.cluster import LocalCluster
from palm_net.wire.messages import LANE_BLOCK

ROOT = Path(__file__).resolve().parent.parent
IN_PROCESS_KINDS = (*faultdrill.RAISE_KINDS, "cancel")

# Steps a clean migration of a model VM never reaches, and the first fault that
# sends it there (on the abort path, or the stream backend's only).
ABORT_TRIGGER = {"source": ("source.ExportFinalState", "hypervisor"),
                 "destination": ("destination.ImportProtection", "hypervisor")}
QEMU_ABORT_TRIGGER = {"source": ("source.FinishStream", "qmp"), "destination": ("destination.EndStream", "qmp")}
QEMU_KINDS = ("eio", "qmp", "timeout", "sqlite", "cancel")
MODEL_ONLY = {"source.StartPrecopy", "source.SendPages", "source.CollectDirty", "source.SetThrottle", "source.Pause",
              "source.ExportFinalState", "destination.ImportKeys",
              "destination.ApplyPages", "destination.Settle", "destination.ImportCpuState",
              "destination.ImportProtection", "source.ReadMetadata", "source.Serve", "source.store.serve",
              "source.store.serve.done", "destination.MarkMissing", "destination.FinishPulling",
              "destination.store.switch", "destination.store.switch.done", "destination.store.pulled",
              "destination.store.pulled.done"}
ON_ABORT_PATH = {"source.store.abort", "source.store.abort.done", "source.vm.resume",
                 "destination.AbortForever", "destination.store.abort", "destination.store.abort.done",
                 "destination.vm.scrub"}
# Steps a migration reaches only when asked for what they do: the parameters (and the
# guest's workload: the throttle needs a guest that dirties faster than a round sends).
REACHED_WITH = {
    "source.DigestMemory": (MigrationParams(verify_digest=True), "idle"),
    "source.OpenChannels": (MigrationParams(channels=2), "idle"),
    "source.SetThrottle": (MigrationParams(max_rounds=1, downtime_limit=1e-6, downtime_policy="throttle"),
                           "random:5000"),
    # Post-copy's steps (proto 7.9): every page follows the switch, so an idle guest's does too.
    **{s: (MigrationParams(postcopy=True, postcopy_after=0), "idle") for s in (
        "source.ReadMetadata", "source.Serve", "source.store.serve", "source.store.serve.done",
        "destination.MarkMissing", "destination.FinishPulling", "destination.store.switch",
        "destination.store.switch.done", "destination.store.pulled", "destination.store.pulled.done")},
}
# PALM_FAULT_CHANNELS=N runs every case on N channels (proto 7.8), a model VM then N blocks of
# pages, a QEMU guest N streams (its multifd).
CHANNELS = int(os.environ.get("PALM_FAULT_CHANNELS", "1"))
STREAM_ONLY = {"source.StartStream", "source.SendStream", "source.FinishStream", "destination.ListenStream",
               "destination.StreamIn", "destination.EndStream"}


def model_steps() -> list[str]:
    return [s for s in faults.STEPS if s not in STREAM_ONLY]


# --------------------------------------------------------------------------
# The list of fault points cannot go stale


def _literal_points() -> set[str]:
    """Every fault("...") with a literal step in palm_net/."""
    found = set()
    for path in (ROOT / "palm_net").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "fault" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return found


def test_every_step_has_its_fault_point_and_every_point_is_listed():
    listed = set(faults.STEPS)
    literal = _literal_points()
    assert literal <= listed, f"fault points missing from faults.STEPS: {sorted(literal - listed)}"
    # Each durable move of the handoff table has its points before and after (HandoffStore._move_from).
    for side, _, step in MOVES:
        for suffix in ("", ".done"):
            name = f"{side.value}.store.{'open' if _ is None else step.value}{suffix}"
            assert name in listed, f"no fault point for the durable step {name}"
    # Every effect either shell performs has its point (palm_net.migration.hosts, runner):
    # Note only asks for a log line.
    performed = {c.__name__ for c in vars(effects).values()
                 if isinstance(c, type) and issubclass(c, effects.Effect) and c is not effects.Effect}
    assert performed == set(faults.EFFECTS) | set(faults.SOURCE_EFFECTS) | {"Note"}, \
        "an effect without its fault point (faults.EFFECTS, faults.SOURCE_EFFECTS)"
    dynamic = {f"destination.{e}" for e in faults.EFFECTS} | {f"source.{e}" for e in faults.SOURCE_EFFECTS} | {
        f"{side.value}.store.{'open' if before is None else step.value}{sfx}"
        for side, before, step in MOVES for sfx in ("", ".done")}
    assert listed <= literal | dynamic, f"listed steps no code reaches: {sorted(listed - literal - dynamic)}"


def test_an_injector_is_off_by_default_and_the_environment_form_is_checked():
    assert faults._injector is None
    faults.fault("destination.vm.activate")  # nothing happens
    with pytest.raises(ValueError, match="PALM_FAULT"):
        faultdrill.from_environment("no.such.step:exit")
    with pytest.raises(ValueError, match="PALM_FAULT"):
        faultdrill.from_environment("destination.vm.activate:melt")
    assert faultdrill.from_environment("") is None
    try:
        assert faultdrill.from_environment("destination.vm.activate:eio") == "destination.vm.activate:eio"
        with pytest.raises(OSError, match="Input/output"):
            faults.fault("destination.vm.activate")
        faults.fault("destination.vm.activate")  # once only
    finally:
        faults.install(None)


# --------------------------------------------------------------------------
# One case of the matrix, in process


@dataclass
class Case:
    step: str
    kind: str
    fired: list[str] = field(default_factory=list)
    where: str = ""
    seconds: float = 0.0
    note: str = ""
    log: str = ""  # the agents' logs (processes)

    @property
    def victim(self) -> str:
        return "a" if self.step.startswith("source.") else "b"


def _cancel_agent(cluster: LocalCluster, name: str) -> None:
    """The agent's stop, from the trio thread or a worker thread."""
    scope = cluster.members[name].scope
    assert scope is not None
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        trio.from_thread.run_sync(scope.cancel)
    else:
        scope.cancel()


async def run_case(cluster: LocalCluster, case: Case, memory: int = 256 * 4096,
                   content: Path | None = None) -> Case:
    """One case; with ``content`` the VM is a QEMU guest holding it (tests/test_qemu.py)."""
    t0 = time.monotonic()
    a = cluster["a"]
    digest: str | None = ""
    vm_id = b""
    params, workload = REACHED_WITH.get(case.step, (MigrationParams(), "idle"))
    if CHANNELS > 1 and not params.postcopy:  # (a QEMU guest's: its multifd channels; post-copy takes one)
        params, memory = dataclasses.replace(params, channels=CHANNELS), max(memory, CHANNELS * LANE_BLOCK * 4096)
    if content is None:
        name = "vm1"
        vm = a.registry.create_model(name, memory, protected=1, fill="random", seed=5, workload=workload)
        digest = vm.digest() if workload == "idle" else None  # a busy guest's memory changes
    else:
        from tests.test_qemu import new_vm

        qvm = await trio.to_thread.run_sync(new_vm, a, content)
        name, vm_id = qvm.name, qvm.vm_id
    plan = [(case.step, case.kind)]
    if case.step in ON_ABORT_PATH:
        plan.insert(0, (ABORT_TRIGGER if content is None else QEMU_ABORT_TRIGGER)[case.step.split(".")[0]])

    def inject(at: str) -> None:
        if not plan or at != plan[0][0]:
            return
        step, kind = plan.pop(0)
        case.fired.append(step)
        if kind == "cancel":
            _cancel_agent(cluster, "a" if step.startswith("source.") else "b")
            return
        raise faultdrill.raiser(kind)

    two: list[str] = []

    async def watch() -> None:  # never two runnable copies, at any moment
        while True:
            copies = cluster.running_copies(name)
            if len(copies) > 1:
                two.append(",".join(copies))
            await trio.sleep(0.002)

    result: dict[str, object] = {}

    async def migrate() -> None:
        result["r"] = await a.outgoing.migrate(name, cluster.addr("b"), params)

    old = faults.install(inject)
    try:
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch)
            assert a.outgoing.nursery is not None
            a.outgoing.nursery.start_soon(migrate)  # inside the agent: its stop ends it as it would
            with trio.fail_after(30):
                while "r" not in result and cluster.members["a"].agent is a and not _stopped(cluster, "a"):
                    await trio.sleep(0.01)
                if case.kind == "cancel" and case.step in case.fired:  # its stop may still be under way
                    stopped = cluster.members[case.victim].stopped
                    assert stopped is not None
                    await stopped.wait()
                for agent in ("a", "b"):  # a stopped agent restarts (same directory, same port)
                    if _stopped(cluster, agent):
                        await cluster.stop(agent)
                        await cluster.start(agent)
                case.where = await (settle(cluster, digest) if content is None
                                    else settle_qemu(cluster, name, vm_id, content))
            watchers.cancel_scope.cancel()
    finally:
        faults.install(old)
    assert not two, f"{case.step}/{case.kind}: the VM ran on two hosts at once ({two[0]})"
    case.seconds = time.monotonic() - t0
    if not case.fired:
        case.note = "not reached"
    return case


def _stopped(cluster: LocalCluster, name: str) -> bool:
    m = cluster.members[name]
    return m.stopped is not None and m.stopped.is_set()


async def settle(cluster: LocalCluster, digest: str | None, timeout: float = 25) -> str:
    """Waits until the VM runs on exactly one agent and nowhere else holds it (recovery,
    retried activation, aborts done); checks it there: verifies, same digest (if the guest is idle)."""
    deadline = trio.current_time() + timeout
    while True:
        copies = cluster.running_copies("vm1")
        holders = [n for n, m in cluster.members.items() if m.agent is not None and "vm1" in m.agent.vms]
        if len(copies) == 1 and holders == copies:
            break
        if trio.current_time() > deadline:
            states = {n: (m.agent.vms["vm1"].state if m.agent and "vm1" in m.agent.vms else None,
                          dict(m.agent.registry.not_running) if m.agent else None)
                      for n, m in cluster.members.items()}
            raise AssertionError(f"the VM did not settle on exactly one host: {states}")
        await trio.sleep(0.02)
    where = copies[0]
    vm = cluster[where].vms["vm1"]
    report = await trio.to_thread.run_sync(vm.verify)
    assert report.ok and report.checked + report.in_process_view == vm.info.protected_pages, report
    if digest is not None:
        assert await trio.to_thread.run_sync(vm.digest) == digest, "the idle guest's memory changed"
    return where


async def settle_qemu(cluster: LocalCluster, name: str, vm_id: bytes, content: Path, timeout: float = 25) -> str:
    """Exactly one QEMU of the VM on the host, running (asked over QMP) on one agent that
    alone holds the VM; its RAM holds the content."""
    from tests.test_qemu import CONTENT, LOAD_ADDR, qemu_processes, runnable

    deadline = trio.current_time() + timeout
    while True:
        where = runnable(cluster, name)
        holders = [n for n, m in cluster.members.items() if m.agent is not None and name in m.agent.vms]
        procs = qemu_processes(vm_id)
        if len(procs) == 1 and len(where) == 1 and holders == where:
            break
        if trio.current_time() > deadline:
            raise AssertionError(f"the QEMU guest did not settle on exactly one host: running on {where}, "
                                 f"held by {holders}, {len(procs)} QEMU processes")
        await trio.sleep(0.05)
    vm = cluster[where[0]].vms[name]
    assert await trio.to_thread.run_sync(vm.read_ram, LOAD_ADDR, CONTENT) == content.read_bytes()
    return where[0]


@pytest.fixture
async def pair(nursery):
    async with LocalCluster.started(nursery, in_doubt_wait=0.5) as c:
        yield c


# --------------------------------------------------------------------------
# The two reproductions of issue 21


async def test_a_failed_activation_after_commit_keeps_the_vm_committed_then_runs_it(pair):
    """ENOSPC (a full memory file system) as the committed VM is activated: it used
    to be scrubbed on both hosts.  Now it stays committed here, is reported, and runs
    once the retry succeeds; the source scrubbed its copy (exactly one)."""
    seen: list[str] = []

    def full_at_activation(at: str) -> None:
        if at == "destination.vm.activate" and not seen:
            seen.append(at)
            raise faultdrill.raiser("enospc")

    a, b = pair["a"], pair["b"]
    vm = a.registry.create_model("vm1", 256 * 4096, protected=2, fill="random", seed=9)
    digest = vm.digest()
    faults.install(full_at_activation)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(None)
    assert seen and res.ok, res.error
    row = b.store.get(res.mid)
    assert row is not None and row.state == "committed" and a.store.get(res.mid).state == "done"
    assert "vm1" not in a.vms and "vm1" in b.vms  # never scrubbed on the destination
    with trio.fail_after(5):  # DONE reaches the source before the destination's session settles
        while "vm1" not in b.registry.not_running and not b.vms["vm1"].running:
            await trio.sleep(0.01)
    assert "no space left on device" in b.registry.not_running.get("vm1", "") or b.vms["vm1"].running
    assert await settle(pair, digest) == "b"  # the agent's retry ran it
    assert not b.registry.not_running


async def test_committed_not_running_is_reported_and_resumable_by_the_operator(pair):
    from palm_net.agent.control import ControlServer

    fails = [0]

    def qmp_refuses(at: str) -> None:
        if at == "destination.vm.activate" and fails[0] < 3:
            fails[0] += 1
            raise faultdrill.raiser("eio")

    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, protected=1)
    faults.install(qmp_refuses)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
        assert res.ok
        with trio.fail_after(5):  # DONE reaches the source before the destination's session settles
            while "vm1" not in b.registry.not_running:
                await trio.sleep(0.01)
        assert b.registry.not_running["vm1"].startswith("I/O error")
        status = b.status()
        assert "vm1" in status["committed_not_running"]
        shown = ControlServer(b, b.control_path)._summary(b.vms["vm1"])
        assert shown["state"] == "committed-not-running" and "I/O error" in shown["activation_error"]
        row = next(m for m in b.outgoing.migrations() if m["migration_id"] == res.mid.hex())
        assert row["state"] == "committed" and row["not_running"].startswith("I/O error")
        from palm_net.cluster.metrics import AgentMetrics

        scrape = AgentMetrics(b.cluster._snapshot).render().decode()
        assert "palm_vms_committed_not_running 1.0" in scrape
        from palm_net.agent.errors import AgentError

        while fails[0] < 3:  # the operator tries before the disk is back: a clear refusal
            with pytest.raises(AgentError, match="committed here but cannot be activated"):
                b.registry.set_run_state("vm1", True)
    finally:
        faults.install(None)
    b.registry.set_run_state("vm1", True)  # the operator's resume, there
    assert b.vms["vm1"].running and not b.registry.not_running
    assert pair.running_copies("vm1") == ["b"]


async def test_the_destination_stopped_inside_the_commit_window_keeps_the_committed_vm(pair):
    """SIGTERM (the agent's stop) just after COMMITTED became durable used to scrub the
    VM on both hosts.  The commit window is shielded: activation and DONE finish,
    the agent stops, and after its restart the VM runs there, once."""
    case = await run_case(pair, Case("destination.store.commit.done", "cancel"))
    assert case.fired == ["destination.store.commit.done"]
    assert case.where == "b"


async def test_the_commit_window_is_counted_and_sends_done_though_the_agent_stops_inside_it(pair):
    """Inside the commit window the session is counted as committing (what a stopping agent
    waits for), and the window is shielded: the agent's stop, asked as COMMITTED becomes
    durable, lets activation and DONE finish, so the source completes instead of being left
    in doubt (migration/runner.py under mutation, docs/MUTATION.md)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, protected=1, fill="random", seed=5)
    seen: list[int] = []

    def stop_at_commit(at: str) -> None:
        if at == "destination.store.commit.done" and not seen:
            seen.append(b.incoming.committing)
            _cancel_agent(pair, "b")

    old = faults.install(stop_at_commit)
    try:
        with trio.fail_after(30):
            res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert seen == [1]
    assert res.ok and res.runs_on != "in doubt", res
    assert a.store.get(res.mid).state == "done"
    stopped = pair.members["b"].stopped
    assert stopped is not None
    await stopped.wait()
    await pair.stop("b")
    await pair.start("b")
    assert await settle(pair, None) == "b"


async def test_an_abort_the_engine_could_not_record_is_recorded_by_the_runner_with_its_reason(pair):
    """The destination's way out (DestinationRun._fail): when the engine's abort could not be
    recorded (the state database failing once), the runner records it itself, with the
    failure's reason, and scrubs what arrived; the agent's own settling (whose reason is
    "session ended before COMMIT") then finds nothing left (migration/runner.py under
    mutation, docs/MUTATION.md)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, protected=1, fill="random", seed=5)
    plan: list[tuple[str, BaseException]] = [
        ("destination.ImportProtection", faultdrill.raiser("hypervisor")),
        ("destination.store.abort", sqlite3.OperationalError("disk I/O error"))]

    reached: list[str] = []

    def inject(at: str) -> None:
        reached.append(at)
        if plan and at == plan[0][0]:
            raise plan.pop(0)[1]

    old = faults.install(inject)
    try:
        with trio.fail_after(30):
            res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
            while b.incoming.runs or "vm1" in b.vms:  # the destination's session settled
                await trio.sleep(0.01)
    finally:
        faults.install(old)
    assert not plan and not res.ok
    row = b.store.get(res.mid)
    assert row.state == "aborted" and row.error == "hypervisor: injected hypervisor failure", row.error
    # the engine's try (failed), the runner's (scrubbed): none left for the agent's settling
    assert reached.count("destination.store.abort") == 2 and reached.count("destination.vm.scrub") == 1
    assert pair.running_copies("vm1") == ["a"]


async def test_a_destination_stopped_before_ready_records_its_own_abort(pair):
    """The agent's stop before READY: the session's way out (DestinationRun.run's finally)
    is shielded, so the runner itself aborts the migration for good, with the session's
    reason (the connection's end), before the agent's settling would (whose
    reason is "session ended before COMMIT"); the VM stays on the source, once
    (migration/runner.py under mutation, docs/MUTATION.md)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, protected=1, fill="random", seed=5)
    fired: list[str] = []

    def stop_b(at: str) -> None:
        if at == "destination.ImportKeys" and not fired:
            fired.append(at)
            _cancel_agent(pair, "b")

    old = faults.install(stop_b)
    try:
        with trio.fail_after(30):
            res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
            stopped = pair.members["b"].stopped
            assert stopped is not None
            await stopped.wait()
    finally:
        faults.install(old)
    assert fired and not res.ok
    await pair.stop("b")
    b = await pair.start("b")
    row = b.store.get(res.mid)
    assert row.state == "aborted" and row.error == (
        "closed: the session ended before the handoff; the VM stays on the source"), row.error
    assert await settle(pair, None) == "a"


async def test_an_error_right_after_commit_keeps_the_vm_and_runs_it(pair):
    """An error just after COMMITTED became durable (the engine never learns it committed):
    the session is settled from the row, so the VM is kept and activated there, at once,
    with no restart of the agent."""
    case = await run_case(pair, Case("destination.store.commit.done", "eio"))
    assert case.fired == ["destination.store.commit.done"] and case.where == "b"


# --------------------------------------------------------------------------
# The matrix


def all_cases() -> list[tuple[str, str]]:
    return [(s, k) for s in model_steps() for k in IN_PROCESS_KINDS]


SAMPLE = random.Random(int(os.environ.get("PALM_FAULT_SEED", "21"))).sample(all_cases(), 10)


@pytest.mark.parametrize(("step", "kind"), SAMPLE, ids=[f"{s}:{k}" for s, k in SAMPLE])
async def test_fault_matrix_sample(pair, step, kind):
    case = await run_case(pair, Case(step, kind))
    assert case.where in ("a", "b")


@pytest.mark.faults
async def test_fault_matrix_in_process(shm, capsys):
    """Every model step x every in-process kind, one fresh pair of agents each."""
    rows: list[Case] = []
    t0 = time.monotonic()
    only = os.environ.get("PALM_FAULT_ONLY")  # e.g. "destination.vm" to rerun some rows
    for step, kind in all_cases():
        if only and only not in step:
            continue
        rows.append(await _isolated(Case(step, kind)))
    with capsys.disabled():
        print_table(rows, IN_PROCESS_KINDS, time.monotonic() - t0)
    failed = [f"{r.step}:{r.kind}: {r.where}" for r in rows if r.note == "FAIL"]
    assert not failed, "\n".join(failed)
    reached = [r for r in rows if not r.note]
    assert len(reached) >= len(rows) * 3 // 4, "most steps must be reached by a model migration"


async def _isolated(case: Case, content: Path | None = None) -> Case:
    """One case with a fresh pair of agents; a failure is recorded in the case (the
    table shows every failing cell)."""
    try:
        async with trio.open_nursery() as nursery, LocalCluster.started(nursery, in_doubt_wait=0.5) as c:
            await run_case(c, case, content=content)
    except (Exception, BaseExceptionGroup) as exc:
        case.note = "FAIL"
        case.where = _leaf(exc)
    return case


def _leaf(exc: BaseException) -> str:
    """The first exception inside nested groups, as one line."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 600 else f"{text[:200]} ... {text[-400:]}"  # (a log's tail says most)


@pytest.mark.faults
async def test_fault_matrix_qemu(shm, capsys):
    """Every step x the QEMU kinds, with a real QEMU guest (the page backend's own
    steps left out)."""
    from palm_net.hypervisor.qemu import qemu_binary

    if qemu_binary() is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian qemu-system-x86; .ci/run installs it)")
    from tests.test_qemu import CONTENT

    content = shm / "content.bin"
    content.write_bytes(os.urandom(CONTENT))
    rows: list[Case] = []
    t0 = time.monotonic()
    only = os.environ.get("PALM_FAULT_ONLY")
    for step in faults.STEPS:
        if step in MODEL_ONLY or (only and only not in step):
            continue
        for kind in QEMU_KINDS:
            rows.append(await _isolated(Case(step, kind), content))
    with capsys.disabled():
        print_table(rows, QEMU_KINDS, time.monotonic() - t0)
    failed = [f"{r.step}:{r.kind}: {r.where}" for r in rows if r.note == "FAIL"]
    assert not failed, "\n".join(failed)


def print_table(rows: list[Case], kinds: tuple[str, ...], seconds: float) -> None:
    by = {(r.step, r.kind): r for r in rows}
    steps = list(dict.fromkeys(r.step for r in rows))
    width = max(len(s) for s in steps)
    print(f"\nfault matrix: {len(steps)} steps x {len(kinds)} kinds = {len(rows)} cases in {seconds:.0f} s "
          "(cell: the host the one copy runs on at the end; '-': step not reached)")
    print(" " * width + "  " + " ".join(f"{k:>10}" for k in kinds))
    for s in steps:
        cells = []
        for k in kinds:
            r = by.get((s, k))
            cells.append(f"{'-' if r is None or r.note == 'not reached' else 'FAIL' if r.note else r.where:>10}")
        print(f"{s:<{width}}  " + " ".join(cells))


# --------------------------------------------------------------------------
# The process dies at a step (os._exit: no finally, no cleanup): real agents


def _one_copy(agents: dict[str, AgentProcess], vm: str, timeout: float = 40) -> str:
    """Waits until the VM runs on exactly one agent and no other holds it."""
    deadline = time.monotonic() + timeout
    while True:
        states = {n: {v["name"]: v["state"] for v in ag.request("vm.list", timeout=30)}.get(vm)
                  for n, ag in agents.items()}
        running = [n for n, s in states.items() if s == "running"]
        assert len(running) <= 1, f"the VM runs twice: {states}"
        if running and [n for n, s in states.items() if s is not None] == running:
            return running[0]
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}:\n{ag.log_tail(3000)}" for n, ag in agents.items())
            raise AssertionError(f"the VM did not settle on exactly one agent: {states}\n{tails}")
        time.sleep(0.1)


def crash_case(root: Path, step: str, kind: str = "exit") -> Case:
    """Migrates a model VM with a protected process from a to b; the agent of ``step``'s
    side exits there (``stop``: is sent SIGTERM there) after a first fault that leads
    to it on the abort path, is started again, and the VM must end on exactly one
    host, verified, unchanged."""
    case = Case(step, kind)
    t0 = time.monotonic()
    plan = [f"{step}:{kind}"]
    if step in ON_ABORT_PATH:
        trigger, first = ABORT_TRIGGER[step.split(".")[0]]
        plan.insert(0, f"{trigger}:{first}")
    provision(root, ["a", "b"])
    env = {"PALM_FAULT": ",".join(plan)}
    agents = {"a": AgentProcess(root, "a", env=env if case.victim == "a" else None, log_level="debug"),
              "b": AgentProcess(root, "b", env=env if case.victim == "b" else None, log_level="debug")}
    try:
        for ag in agents.values():
            ag.start()
        a, victim = agents["a"], agents[case.victim]
        a.request("vm.create", name="vm1", memory=f"{max(1, CHANNELS)}MiB", protected=1, fill="random", seed=3)
        digest = a.request("vm.digest", name="vm1")["digest"]
        params = REACHED_WITH.get(step, (MigrationParams(), ""))[0]
        how = {"postcopy": True, "postcopy_after": 0} if params.postcopy else {
            "channels": max(CHANNELS, params.channels)}
        t, _ = a.migrate_async("vm1", agents["b"].addr, timeout=60, **how)
        assert victim.proc is not None
        while t.is_alive() and victim.proc.poll() is None:
            time.sleep(0.01)
        try:  # the peer may see the connection close before the dying process is reaped
            rc = victim.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is not None:  # it died (or stopped) at the step: started again, without the fault
            assert rc == (faultdrill.EXIT_CODE if kind == "exit" else 0), \
                f"agent {case.victim} exited with {rc}: {victim.log_tail(800)}"
            case.fired.append(step)
            victim.proc = None
            victim.env = None
            victim.start()
        t.join(60)
        case.where = _one_copy(agents, "vm1")
        case.log = "".join(ag.log_tail(1 << 20) for ag in agents.values())
        ag = agents[case.where]
        assert ag.request("vm.verify", name="vm1")["ok"]
        assert ag.request("vm.digest", name="vm1")["digest"] == digest
    finally:
        remove_all(root, agents.values())
    if not case.fired:
        case.note = "not reached"
    case.seconds = time.monotonic() - t0
    return case


CRASH_SAMPLE = [("destination.store.commit.done", "exit"), ("source.store.hand-off.done", "exit"),
                # issue 21's second reproduction, for real: SIGTERM inside the commit window
                ("destination.store.commit.done", "stop"), ("destination.vm.activate", "stop")]


@pytest.mark.slow
@pytest.mark.parametrize(("step", "kind"), CRASH_SAMPLE)
def test_crash_or_stop_at_a_step_then_restart(shm, step, kind):
    case = crash_case(shm / "c", step, kind)
    assert case.fired == [step] and case.where == ("b" if step.startswith("destination") else "a")
    if kind == "stop":  # it waited for the commit window, and said so
        assert "waiting for commit windows in progress" in case.log


@pytest.mark.faults
def test_fault_matrix_crash(shm, capsys):
    """Every model step x the process dying there."""
    rows: list[Case] = []
    t0 = time.monotonic()
    only = os.environ.get("PALM_FAULT_ONLY")
    for i, step in enumerate(model_steps()):
        if only and only not in step:
            continue
        try:
            rows.append(crash_case(shm / f"c{i}", step))
        except (Exception, BaseExceptionGroup) as exc:
            rows.append(Case(step, "exit", where=_leaf(exc), note="FAIL"))
    with capsys.disabled():
        print_table(rows, ("exit",), time.monotonic() - t0)
    failed = [f"{r.step}: {r.where}" for r in rows if r.note == "FAIL"]
    assert not failed, "\n".join(failed)


def test_each_step_of_the_handoff_table_leads_to_one_state():
    """HandoffStore._move_from sets one target for all the states a step may leave."""
    targets: dict[tuple[object, object], set[object]] = {}
    for (side, _, step), after in MOVES.items():
        targets.setdefault((side, step), set()).add(after)
    assert all(len(t) == 1 for t in targets.values()), targets


# --------------------------------------------------------------------------
# Errors named as they are


def test_storage_errors_are_named_not_called_a_lost_connection():
    import errno as e

    from palm_net.errors import ErrorCode
    from palm_net.migration.runner import session_error

    full = session_error(OSError(e.ENOSPC, "No space left on device", "/dev/shm/palm-0-x/vm1/vm.json"))
    assert full.code is ErrorCode.NO_SPACE and "no space left on device" in full.detail
    assert "/dev/shm" in full.detail  # which file system
    eio = session_error(OSError(e.EIO, "Input/output error", "/var/lib/palm/state.db"))
    assert eio.code is ErrorCode.HYPERVISOR and eio.detail.startswith("I/O error")
    reset = session_error(ConnectionResetError(e.ECONNRESET, "Connection reset by peer"))
    assert reset.code is ErrorCode.CLOSED and "connection lost" in reset.detail


async def test_no_space_at_the_start_of_a_migration_is_one_line_and_leaves_no_sending_row(pair, monkeypatch):
    import errno as e

    a = pair["a"]
    vm = a.registry.create_model("vm1", 64 * 4096, protected=1)

    def full(mid: bytes | None) -> None:
        raise OSError(e.ENOSPC, "No space left on device", str(vm.dir / "vm.json"))

    monkeypatch.setattr(vm, "set_migration", full)
    res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    assert not res.ok and res.runs_on == "source" and vm.running
    assert res.error.startswith("no-space: cannot mark VM 'vm1' as migrating: no space left on device")
    assert "\n" not in res.error
    row = a.store.get(res.mid)
    assert row is not None and row.state == "aborted"  # never left "sending"


def test_the_docs_count_the_fault_points():
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    assert f"`palm_net/faults.py`, {len(faults.STEPS)} of them" in text


# --------------------------------------------------------------------------
# Races at the handoff and the state database failing (what an attacker's review
# of issue 21's change broke; each test asserts the promise, exactly one copy and
# an agent that keeps running, and failed on the reviewed code)


async def _wait(pred, timeout: float = 10.0) -> bool:
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.02)
        return True
    return False


async def test_a_cancel_racing_the_handoff_never_leaves_the_vm_nowhere(pair):
    """`palm migrate --cancel` (OutgoingService.cancel) checks that the row is SENDING and
    cancels the migration's scope; the cancellation is delivered at the task's next
    checkpoint.  If the task was already woken with READY (both runnable in one trio
    batch), it runs check_ready and hand_off (no checkpoint) first: the row is
    HANDED_OFF, then Cancelled hits the send of COMMIT.  migrate_out's BaseException
    path re-raises (HANDED_OFF: in doubt), OutgoingService.migrate's `with lm.cancel`
    swallows it and reports status "cancelled" -- and starts NO recovery task (only
    status == "in-doubt" does).  The destination never got COMMIT: it aborts forever
    and scrubs.  The source's copy stays paused, in doubt, until the agent restarts
    or the operator runs --resolve: the VM runs on no host.

    The interleaving is made deterministic by running the operator's cancel at the
    fault point just before the hand-off UPDATE (the row is still SENDING there).
    Since the operator's cancel is taken between records (runner.Stop), the run
    marks itself past the handoff before that point, and the cancel is refused
    there ("past the handoff point"): the migration completes.  Either way the
    VM must run somewhere."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    said: list[str] = []

    def cancel_at_handoff(at: str) -> None:
        if at == "source.store.hand-off" and not said:
            (mid,) = [lm.mid for lm in a.outgoing.live.values() if lm.result is None]
            try:
                said.append(a.outgoing.cancel(mid.hex()))
            except AgentError as exc:
                said.append(str(exc))

    old = faults.install(cancel_at_handoff)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert said == ["migration is past the handoff point; it cannot be cancelled"]
    assert res.ok and res.runs_on == "destination"
    running = pair.running_copies("vm1")
    src_state = a.store.state_of(res.mid)
    assert running, (f"the VM runs on no host: migrate said {res.status!r} ({res.error}); source row "
                     f"{src_state}, destination row {b.store.state_of(res.mid)}, no recovery task asked")


async def test_a_state_db_read_error_in_the_activation_retry_does_not_crash_the_agent(nursery):
    """A committed-not-running VM is retried by Agent._activations, which calls
    registry.activate in a worker thread.  registry.activate reads the row
    (store.get); a storage error there (sqlite3.OperationalError "disk I/O error": a
    failing disk, exactly the fault class issue 21 is about) is not caught by
    activate_committed (HypervisorError, OSError only) nor by _activations: the task
    dies and takes the agent's serve nursery, hence the whole agent, down
    (agent.py _activations; registry.py activate).  The same holds for the to_scrub
    loop (scrub_handed_over -> state_of) which catches only (HypervisorError, OSError).
    No fault point covers row reads (faults.STEPS has only writes), so the matrix
    cannot see it."""
    fired: list[str] = []
    async with LocalCluster.started(nursery, in_doubt_wait=0.5) as pair:
        a, b = pair["a"], pair["b"]
        a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)

        def full_at_activation(at: str) -> None:
            if at == "destination.vm.activate" and not fired:
                fired.append(at)
                raise faultdrill.raiser("eio")

        real_get = b.store.get

        def flaky_get(mid: bytes):
            if fired and len(fired) == 1 and "vm1" in b.registry.not_running:
                fired.append("get")
                raise sqlite3.OperationalError("disk I/O error")
            return real_get(mid)

        old = faults.install(full_at_activation)
        try:
            res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
        finally:
            faults.install(old)
        assert res.ok, res.error
        assert await _wait(lambda: "vm1" in b.registry.not_running, 5)
        b.store.get = flaky_get  # one read of the row fails, then the disk is fine again
        stopped = pair.members["b"].stopped
        assert stopped is not None
        crashed = await _wait(stopped.is_set, 8)
        b.store.get = real_get
        assert not crashed, "agent b stopped: its activation retry task died on a storage error"
        assert await _wait(lambda: pair.running_copies("vm1") == ["b"], 10)


async def test_a_failed_scrub_during_the_in_doubt_wait_is_retried(pair):
    """Two faults: DONE is lost (the destination's send fails after COMMITTED), so the
    source is in doubt and migrate_out's own loop asks (recover_once); the answer is
    "committed", confirm_and_scrub moves the row to DONE and the scrub of the source's
    copy fails (EIO).  The exception escapes recover_once and migrate_out (it is raised
    inside the `except (PalmError, InDoubt)` clause, so the sibling `except
    BaseException` never sees it) and OutgoingService.migrate (re-raised, no _settle).
    The handed-over copy, protected memory and keys included, stays in the registry,
    paused, never retried (to_scrub is empty) until the agent's next start, and
    `palm migrate` ends in an internal error although the migration completed
    (orchestrate.py migrate_out in-doubt loop; outgoing.py migrate)."""
    a = pair["a"]
    a.registry.create_model("vm1", 64 * 4096, protected=1, fill="random", seed=3)
    fired: list[str] = []

    def inject(at: str) -> None:
        if at == "destination.store.commit.done":
            fired.append(at)
        elif at == "destination.Send" and fired == ["destination.store.commit.done"]:
            fired.append(at)
            raise faultdrill.raiser("eio")  # DONE never leaves
        elif at == "source.vm.scrub" and len(fired) == 2:
            fired.append(at)
            raise faultdrill.raiser("eio")

    old = faults.install(inject)
    outcome: object = None
    try:
        try:
            outcome = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
        except Exception as exc:  # what the control socket would turn into "internal error"
            outcome = exc
    finally:
        faults.install(old)
    assert len(fired) == 3, fired
    await trio.sleep(4)  # the retry loop's first attempts (1 s, 2 s)
    assert "vm1" not in a.vms and not a.registry.dir_of("vm1").exists(), (
        f"migrate ended with {outcome!r}; the handed-over copy is still held on the source "
        f"(state {a.vms['vm1'].state if 'vm1' in a.vms else None}, queued for scrub: {bool(a.registry.to_scrub)})")


async def test_abort_write_and_resume_both_failing_before_the_handoff_are_retried(pair):
    """A migration fails before the handoff (the source's export fails); on a failing
    disk the abort's UPDATE fails too (EIO) and so does the resume (EIO).
    abort_and_resume treats the failed write as moved (the row read back says SENDING:
    "a restart records it"), the resume fails, mark_stopped.  Then nobody retries:
    OutgoingService._settle only queues a resume when the row says ABORTED, and
    registry.activate would refuse anyway (it resumes a source copy only for ABORTED).
    The VM stays paused on the source with its row SENDING, on no host, until the agent
    restarts (handoff.py abort_and_resume; outgoing.py _settle; registry.py activate)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    plan = [("source.ExportFinalState", "hypervisor"), ("source.store.abort", "eio"), ("source.vm.resume", "eio")]
    fired: list[str] = []

    def inject(at: str) -> None:
        if plan and at == plan[0][0]:
            step, kind = plan.pop(0)
            fired.append(step)
            raise faultdrill.raiser(kind)

    old = faults.install(inject)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert not plan, fired
    ok = await _wait(lambda: pair.running_copies("vm1") == ["a"], 6)
    assert ok, (f"migrate said {res.status!r}, runs_on {res.runs_on!r}; the VM runs nowhere: source row "
                f"{a.store.state_of(res.mid)}, source VM {a.vms['vm1'].state}, retried: "
                f"{'vm1' in a.registry.not_running}, destination has it: {'vm1' in b.vms}")


async def test_state_db_read_errors_right_after_commit_keep_the_committed_vm_and_activate_it(pair):
    """COMMITTED is durable; then the state DB fails reads for a moment (EIO as
    sqlite3.OperationalError, for ~0.3 s).  commit_and_activate's read back raises a
    sqlite3 error, which neither DestinationHost.perform (ProtectionIntegrityError,
    HypervisorError, OSError) nor session_error maps (it re-raises), the session's
    _fail and IncomingService._settle both read the row and fail too; _settle raises,
    so the committed VM is neither activated nor put in not_running (never retried,
    never reported) -- and the source, told "committed" by recovery, scrubs its copy.
    Once the disk is fine again the VM still runs nowhere until b restarts
    (handoff.py commit_and_activate; runner.py session_error; incoming.py _settle)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    failing_until = [0.0]
    real_state_of = b.store.state_of

    # state_of is called from worker threads too: trio.current_time() is not available
    # there, so use the monotonic clock trio uses by default.
    import time as _time
    trio_now = _time.monotonic

    def flaky_state_of_any_thread(mid: bytes):
        if trio_now() < failing_until[0]:
            raise sqlite3.OperationalError("disk I/O error")
        return real_state_of(mid)

    def inject_any_thread(at: str) -> None:
        if at == "destination.store.commit.done" and not failing_until[0]:
            failing_until[0] = trio_now() + 0.3

    b.store.state_of = flaky_state_of_any_thread
    old = faults.install(inject_any_thread)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert failing_until[0]
    await trio.sleep(4)  # the disk is fine again; recovery and retries have had time
    b.store.state_of = real_state_of
    assert pair.running_copies("vm1") == ["b"], (
        f"migrate said {res.status!r}; source row {a.store.state_of(res.mid)}, destination row "
        f"{b.store.state_of(res.mid)}, destination VM {b.vms['vm1'].state if 'vm1' in b.vms else None}, "
        f"retried: {'vm1' in b.registry.not_running}; running on {pair.running_copies('vm1')}")



# --------------------------------------------------------------------------
# The fault matrix raises OSError at the store's points; SQLite raises sqlite3 errors.

# (the hand-off points are in the next test: the matrix harness runs migrate inside the
# agent's nursery, where an escaping exception stops the agent, unlike the control socket)
SQLITE_STEPS = [s for s in faults.STEPS if ".store." in s and "hand-off" not in s]


def _sqlite_raiser(kind: str) -> BaseException:
    if kind == "sqlite-io":
        return sqlite3.OperationalError("disk I/O error")
    if kind == "sqlite-full":
        return sqlite3.OperationalError("database or disk is full")
    return _real_raiser(kind)


_real_raiser = faultdrill.raiser


@pytest.mark.parametrize("step", SQLITE_STEPS)
async def test_sqlite_error_at_each_store_point(nursery, monkeypatch, step):
    """What a failing state DB really raises (sqlite3.OperationalError: "disk I/O error",
    "database or disk is full"), at each durable write of the matrix.  The matrix only
    raises OSError/HypervisorError/TimeoutError there (faultdrill.RAISE_KINDS), and
    session_error re-raises what it does not know (runner.py session_error), so a
    sqlite3 error takes other paths.  These cells pass (one copy): kept as coverage."""
    from tests.test_faults import Case, run_case

    monkeypatch.setattr(faultdrill, "raiser", _sqlite_raiser)
    async with LocalCluster.started(nursery, in_doubt_wait=0.5) as c:
        try:
            case = await run_case(c, Case(step, "sqlite-io"))
        except BaseException as exc:
            leaf = exc
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise AssertionError(f"{step}: sqlite3 'disk I/O error' -> {type(leaf).__name__}: "
                                 f"{str(leaf)[:300]}") from None
        assert case.where in ("a", "b")


@pytest.mark.parametrize("step", ["source.store.hand-off", "source.store.hand-off.done"])
async def test_a_sqlite_error_at_the_handoff_as_the_control_socket_runs_it(pair, monkeypatch, step):
    """As `palm migrate` runs it (the control server calls OutgoingService.migrate and
    turns any exception into "internal error"): SQLite fails the HANDED_OFF write with
    sqlite3.OperationalError ("disk I/O error"), before or after the row is durable.
    session_error does not know sqlite3 errors and re-raises; migrate_out re-raises
    from its BaseException path (resuming only if SENDING); OutgoingService.migrate
    re-raises without _settle and without starting recovery.  After the write (.done)
    the row is HANDED_OFF: the source's copy stays paused with nobody asking the
    destination, which, never sent COMMIT, aborts: the VM runs on no host until the
    agent restarts (runner.py session_error; orchestrate.py migrate_out; outgoing.py migrate)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    fired: list[str] = []

    def inject(at: str) -> None:
        if at == step and not fired:
            fired.append(at)
            raise sqlite3.OperationalError("disk I/O error")

    old = faults.install(inject)
    try:
        try:
            res: object = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
        except Exception as exc:  # the control socket: "internal error: OperationalError: disk I/O error"
            res = exc
    finally:
        faults.install(old)
    assert fired
    ok = await _wait(lambda: len(pair.running_copies("vm1")) == 1, 8)
    mids = [r.mid for r in a.store.list()]
    assert ok, (f"migrate ended with {res!r}; the VM runs on no host: source rows "
                f"{[a.store.state_of(m) for m in mids]}, destination rows {[b.store.state_of(m) for m in mids]}")


async def test_a_source_copy_whose_resume_failed_is_resumed_after_a_restart(pair):
    """The source's copy after an abort: resume_after_migration first writes
    migration=None into vm.json (set_migration(None)), then resumes.  If the resume
    fails after that write (EIO on vm.json, a QMP error) the agent keeps the VM in
    not_running, in memory only.  A restart (the operator's, systemd's after a crash
    such as test_a_state_db_read_error_in_the_activation_retry_does_not_crash_the_agent, or a
    crash right between the two writes) finds a paused VM that records no migration:
    registry.load skips it (`mid is None -> continue`), nothing resumes it, the
    destination aborted: the VM runs on no host, with nothing reported
    (model.py/qemu.py resume_after_migration; registry.py load)."""
    a, b = pair["a"], pair["b"]
    vm = a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    fired: list[str] = []

    def inject(at: str) -> None:
        if at == "source.ExportFinalState" and not fired:
            fired.append(at)
            raise faultdrill.raiser("hypervisor")  # the migration fails before the handoff

    def resume_fails() -> None:
        raise faultdrill.raiser("eio")  # after set_migration(None) was written

    vm.resume = resume_fails
    old = faults.install(inject)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert fired and not res.ok
    assert "vm1" in a.registry.not_running and a.vms["vm1"].migration == res.mid  # what a restart resumes from
    await pair.stop("a")  # before the first retry (1 s)
    a = await pair.start("a")
    ok = await _wait(lambda: pair.running_copies("vm1") == ["a"], 6)
    assert ok, (f"after the restart the source's copy is {a.vms['vm1'].state}, records migration "
                f"{a.vms['vm1'].migration}, retried: {'vm1' in a.registry.not_running}; row "
                f"{a.store.state_of(res.mid)}; the destination has it: {'vm1' in b.vms}")


async def test_a_cancel_asked_as_ready_arrives_is_honoured_before_the_handoff(pair):
    """The operator's cancel, asked while the row still says SENDING (here: as READY
    arrives, between two checkpoints of the session task), lands before the durable
    hand-off: the VM runs on the source again, the migration is cancelled, never in
    doubt (runner.py: the checkpoint right before hand_off)."""
    a = pair["a"]
    a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    said: list[str] = []

    def cancel_as_ready_arrives(at: str) -> None:
        live = [lm for lm in a.outgoing.live.values() if lm.result is None]
        if at == "source.receive" and not said and live and live[0].stats.phase == "verify":
            said.append(a.outgoing.cancel(live[0].mid.hex()))

    old = faults.install(cancel_as_ready_arrives)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert said == ["cancelling"]
    assert res.status == "cancelled" and res.runs_on == "source", (res.status, res.error)
    assert a.store.state_of(res.mid) is HandoffState.ABORTED
    assert pair.running_copies("vm1") == ["a"]


@pytest.mark.parametrize("to", ["cipher", "process"])
def test_an_agent_killed_in_the_middle_of_a_view_switch_leaves_the_page_as_it_was(shm, to):
    """A protected page switching views is rewritten in place, then its metadata: an
    agent killed between the two (kill -9; the mappings outlive it) left a page that
    matched neither, and its VM failed verification after the restart (found by the
    container drill).  The switch's undo record puts the page back as it was."""
    from palm_net.hypervisor.model import ModelVM
    from palm_net.hypervisor.vms import open_vm
    from tests.conftest import KEY

    vm = ModelVM.create(shm / "vm", "vm", 64, KEY, protected_processes=1, protected_pages=8, fill="random")
    gfn = vm.processes[0].first + 2
    vm.process_write(0, gfn, b"the process's secret")  # the page in the process view
    if to == "process":
        vm.os_read(gfn)  # back in the cipher view: the switch below goes to the process view
    vm.sync()
    before = vm.memory_bytes()[gfn * 4096 : (gfn + 1) * 4096]
    with vm._lock:  # the switch, torn: its undo record written, the page rewritten, its metadata not
        vm._journal_switch(gfn)
        vm.mem[gfn * 4096 : (gfn + 1) * 4096] = os.urandom(4096)
    vm.close()
    again = open_vm(shm / "vm", KEY)
    try:
        assert again.memory_bytes()[gfn * 4096 : (gfn + 1) * 4096] == before
        report = again.verify()
        assert report.ok and report.checked + report.in_process_view == 8, report
        assert again.process_read(0, gfn).startswith(b"the process's secret")
    finally:
        again.close()
