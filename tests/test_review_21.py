"""An attacker's review of issue 21's change: what broke it, kept as regression tests.

Each test asserts the promise (exactly one copy, an agent that keeps running, no
host file through QEMU) and failed on the reviewed code; each docstring says what
happened then and why (the fixes: a checkpoint before the hand-off and recovery of
every handed-off row however the migration ended, SQLite's errors named and
retried, the retry loop that survives them, a resume that clears its record last,
duplicate QEMU properties refused, the index of VMs checked before the memory
directory is made and against the boot).
"""

from __future__ import annotations

import sqlite3

import pytest
import trio

from palm_net import faults
from palm_net.agent import faultdrill
from palm_net.migration.handoff import HandoffState
from palm_net.migration.params import MigrationParams
from palm_net.testing.cluster import LocalCluster


@pytest.fixture
async def pair(nursery):
    async with LocalCluster.started(nursery, in_doubt_wait=0.5) as c:
        yield c


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
    fault point just before the hand-off UPDATE (the row is still SENDING there)."""
    a, b = pair["a"], pair["b"]
    a.registry.create_model("vm1", 64 * 4096, fill="random", seed=3)
    said: list[str] = []

    def cancel_at_handoff(at: str) -> None:
        if at == "source.store.hand-off" and not said:
            (mid,) = [lm.mid for lm in a.outgoing.live.values() if lm.result is None]
            said.append(a.outgoing.cancel(mid.hex()))  # the row says SENDING: accepted

    old = faults.install(cancel_at_handoff)
    try:
        res = await a.outgoing.migrate("vm1", pair.addr("b"), MigrationParams())
    finally:
        faults.install(old)
    assert said == ["cancelling"]
    # Let the destination notice the closed session and abort; give recovery time.
    await _wait(lambda: b.store.state_of(res.mid) is HandoffState.ABORTED, 10)
    await trio.sleep(3)
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


async def test_a_memory_dir_planted_after_a_reboot_does_not_keep_the_agent_from_starting(nursery):
    """Any local user reads the memory directory's "unpredictable" name from a QEMU
    guest's command line (/proc/PID/cmdline: mem-path=/dev/shm/palm-0-XXXX/NAME/ram).
    After a reboot (tmpfs emptied) they create that directory.  Agent._memory_dir sees it
    is not the agent's and makes a new one (as designed), but vmindex.check_start then
    finds the index's VMs recorded in a directory that exists and refuses to start
    ("not in the memory directory now in force ... --adopt-vms"): the boot check that
    lets a rebooted host start applies only when the old directory is missing
    (vmindex.py check_start).  Neither suggested flag helps: --memory-dir OLD is
    refused (not ours), --adopt-vms moves the planter's directories into ours."""
    import os
    import shutil
    from pathlib import Path

    from palm_net.agent import vmindex
    from palm_net.agent.agent import Agent

    c = LocalCluster(("a",))
    c.nursery = nursery
    cfg = c.members["a"].config
    cfg.memory_dir = None  # the default: a directory made in /dev/shm
    made: list[Path] = []
    before = set(Path("/dev/shm").glob("palm-0-*"))
    try:
        a = await c.start("a")
        a.registry.create_model("vm1", 16 * 4096, fill="random")
        old = a.memory_dir
        await c.stop("a")
        # the reboot: tmpfs emptied, a new boot id
        shutil.rmtree(old)
        idx = vmindex.read_index(cfg.state_dir)
        assert idx is not None and "vm1" in idx.vms
        import json
        raw = json.loads((cfg.state_dir / vmindex.INDEX_FILE).read_text())
        raw["boot"] = "an-earlier-boot"
        (cfg.state_dir / vmindex.INDEX_FILE).write_text(json.dumps(raw))
        # the local user (nobody) plants the name they read from /proc/PID/cmdline
        old.mkdir()
        os.chown(old, 65534, 65534)
        made.append(old)
        try:
            agent = Agent(cfg)
        except Exception as exc:
            raise AssertionError(f"the agent refuses to start after a reboot because a local user planted "
                                 f"{old}: {exc}") from None
        made.append(agent.memory_dir)
        agent.close()
    finally:
        for p in made:
            shutil.rmtree(p, ignore_errors=True)
        for p in set(Path("/dev/shm").glob("palm-0-*")) - before:
            shutil.rmtree(p, ignore_errors=True)
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


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


# --------------------------------------------------------------------------
# QEMU loader files (issue 22.5): "QEMU loads no host file by path"


async def test_a_second_file_property_is_refused(nursery):
    """split_args checks a loader's properties by name only (LOADER_PROPS), with no
    value check and no duplicate check; open_loader_files replaces only the FIRST
    `file=` with /proc/self/fd/N.  QEMU's option parser lets the LAST duplicate win,
    and QEMU opens the loader file as root before it drops privileges (the very reason
    for the images directory).  So `-device loader,file=IMG,addr=A,file=/any/host/file`
    loads any host file (/etc/shadow, the agent's hv.key, ...) into the guest's RAM,
    from where the guest reads it and a migration carries it anywhere
    (qemu.py split_args, open_loader_files)."""
    import os

    from palm_net.hypervisor.qemu import qemu_binary

    if qemu_binary() is None:
        pytest.skip("no QEMU")
    async with LocalCluster.started(nursery, names=("a",)) as c:
        a = c["a"]
        images = a.registry.images_dir
        assert images is not None
        (images / "img.bin").write_bytes(b"\0" * 4096)
        secret = os.urandom(64)
        host_file = c.root / "host-secret.key"  # outside the images directory, root's 0600
        host_file.write_bytes(secret)
        host_file.chmod(0o600)
        with pytest.raises(Exception, match="images directory"):  # the guard, as documented
            a.registry.create_qemu("q-direct", 64 << 20, ["-device", f"loader,file={host_file},addr=0x1000000"])
        from palm_net.agent.errors import AgentError

        with pytest.raises(AgentError, match="property 'file' given twice"):  # (QEMU would take the last)
            a.registry.create_qemu(
                "q-dup", 64 << 20,
                ["-device", f"loader,file=img.bin,addr=0x1000000,force-raw=on,file={host_file}", "-cpu", "qemu64"])


# --------------------------------------------------------------------------
# The index of VMs (issue 21.4)


async def test_a_vanished_memory_dir_is_refused_every_time(nursery):
    """--memory-dir DIR whose directory vanished: the first start refuses, naming the VMs
    (as tested in tests/test_vmindex.py).  But Agent._memory_dir calls ensure_dir (which
    makes DIR anew) BEFORE check_start, and a refused start leaves it made; the next
    start (systemd's Restart=on-failure, or the operator trying again) finds DIR
    existing and equal to the index's (`idx.memory_dir == memory_dir and not fresh`),
    starts with no VMs and rewrites the index without them: the record of the VMs is
    lost, and the refusal bought nothing (agent.py _memory_dir; vmindex.py check_start)."""
    import shutil

    from palm_net.agent.agent import Agent
    from palm_net.agent.errors import AgentError

    c = LocalCluster(("a",))
    c.nursery = nursery
    try:
        a = await c.start("a")
        a.registry.create_model("vm1", 16 * 4096, fill="random")
        old = a.memory_dir
        await c.stop("a")
        shutil.rmtree(old)  # the memory directory vanished (unmounted, deleted)
        cfg = c.members["a"].config
        with pytest.raises(AgentError, match="missing"):
            Agent(cfg)
        try:
            again = Agent(cfg)  # the same start, a second time
        except AgentError:
            return  # refused again: as intended
        names = list(again.registry.vms)
        again.close()
        raise AssertionError(f"the second start of the same agent was accepted without the VMs (vms={names})")
    finally:
        for name in list(c.members):
            await c.stop(name)
        c.cleanup()


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
