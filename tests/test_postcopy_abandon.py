"""The operator's way out of post-copy once a host is lost (proto/PROTOCOL.md 7.5's abandon
step, 7.9 item 7; palm_net.agent.abandon): `palm migrate --resolve ID --abandon --reason WHY`
declares the VM lost from the durable row (serving at the source, pulling at the
destination), ends what reads the local copy and scrubs it; refused in every other state
and without a reason; finished by a restart if a crash cuts it short."""

from __future__ import annotations

import os
import time

import pytest
import trio

from palm_net.agent.errors import AgentError
from palm_net.cli import main
from palm_net.migration import postcopy
from palm_net.migration.handoff import HandoffState, HandoffStore, Peer, Step
from palm_net.migration.params import MigrationParams
from palm_net.wire.protocol import Role

from .test_postcopy_e2e import until_pulled

HOT = "random:50000"
PEER = Peer("elsewhere", bytes(32), bytes(32), "127.0.0.1:9")
SOURCE, DESTINATION = Role.SOURCE, Role.DESTINATION


def _row(store: HandoffStore, side: Role, vm: str, vm_id: bytes, *steps: Step) -> bytes:
    """A row of ``side`` moved by ``steps`` from its opening (no session: the store only)."""
    mid = os.urandom(16)
    store._open(mid, side, vm, vm_id, PEER)
    for step in steps:
        assert store._move(mid, side, step), step
    return mid


async def _palm(*argv: str) -> int:
    """The real `palm` command, in a worker thread (the agents run on this one)."""
    return await trio.to_thread.run_sync(main, list(argv))


async def _pulling(cluster, name: str = "vm1", at: float = 0.3) -> bytes:
    """A post-copy migration of ``name`` from a to b, run as the agent runs it (in its own
    nursery), until the destination has taken ``at`` of its missing pages; its id."""
    a, b = cluster["a"], cluster["b"]
    a.registry.create_model(name, 8 << 20, protected=2, workload=HOT, seed=7, fill="random")
    await trio.sleep(0.2)
    params = MigrationParams(postcopy=True, postcopy_after=2, bandwidth=16 << 20)
    a.outgoing.nursery.start_soon(a.outgoing.migrate, name, cluster.addr("b"), params)
    await until_pulled(b, name, at)
    (row,) = b.store.list(role=DESTINATION, states=(HandoffState.PULLING,))
    return row.mid


async def _until(pred, seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not pred():
            await trio.sleep(0.02)


# --------------------------------------------------------------------------
# End to end: in-process agents, the real migration, the real command


async def test_the_source_lost_mid_serving_then_the_destination_abandons(cluster, monkeypatch, capsys):
    """The source agent stopped for good while it serves: the destination's VM runs on with
    pages missing, PULLING, no operator's.  Its operator abandons it: the VM is scrubbed and
    gone from `palm vm list`, the row says abandoned (with the reason), nothing pulls or is
    retried.  The source coming back after all asks and is told `unknown` (no token: its copy
    never runs); abandoned there too, its copy goes and its recovery stops."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", postcopy.SERVE_SLICE)  # served in small steps: the stop lands
    b = cluster["b"]
    mid = await _pulling(cluster)
    await cluster.stop("a")  # lost (for now)
    vm = b.vms["vm1"]
    assert vm.missing_count() and b.store.state_of(mid) is HandoffState.PULLING
    with pytest.raises(AgentError, match="still receives"):
        b.registry.operable("vm1")  # (the way out is the abandon, not vm destroy)
    sock = str(b.control_path)
    assert await _palm("migrate", "--resolve", "vm1", "--abandon", "--reason", "host a burned down",
                       "--control", sock) == 0
    out = capsys.readouterr()
    assert f"ABANDONED migration {mid.hex()}: VM vm1 is lost" in out.err and "pages still missing" in out.err
    assert out.out.strip() == f"migration {mid.hex()}: abandoned"
    row = b.store.get(mid)
    assert row.state is HandoffState.ABANDONED and "host a burned down" in row.error
    assert "vm1" not in b.vms and not vm.dir.exists() and vm.workload is None
    assert await _palm("vm", "list", "--control", sock) == 0 and "vm1" not in capsys.readouterr().out
    assert not b.incoming._pulling and not b.incoming._live and not b.registry.not_running
    assert not b.registry.to_scrub
    assert await _palm("migrate", "--resolve", mid.hex(), "--abandon", "--reason", "again",
                       "--control", sock) == 1  # final: once
    assert "was abandoned already" in capsys.readouterr().err
    # The source comes back: it asks, is answered "unknown", and stays serving (its copy never runs).
    a = await cluster.start("a")
    await _until(lambda: mid in a.outgoing._recovering)
    await trio.sleep(1.0)
    assert a.store.state_of(mid) is HandoffState.SERVING and a.vms["vm1"].state != "running"
    assert cluster.running_copies("vm1") == []
    res = await a.abandon(mid.hex(), "b abandoned it: no longer needed")
    assert (res["status"], res["role"], res["scrubbed"]) == ("abandoned", "source", True)
    assert "vm1" not in a.vms and a.store.state_of(mid) is HandoffState.ABANDONED
    await _until(lambda: mid not in a.outgoing._recovering and not a.outgoing._readers)
    assert mid not in a.outgoing.in_doubt()


async def test_the_destination_lost_mid_serving_then_the_source_abandons(cluster, monkeypatch):
    """The destination agent stopped for good while the source serves: the source stays
    SERVING, asking.  Its operator abandons it while migrate_out still waits in doubt: that
    wait ends (its result says abandoned), its copy is scrubbed, its recovery stops."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", postcopy.SERVE_SLICE)
    a = cluster["a"]
    cluster.members["a"].config.in_doubt_wait = 30.0  # migrate_out still live when the abandon comes
    mid = await _pulling(cluster)
    await cluster.stop("b")
    await _until(lambda: a.store.state_of(mid) is HandoffState.SERVING)
    lm = a.outgoing.live[mid]
    assert lm.result is None  # (its session, or its in-doubt wait)
    vm = a.vms["vm1"]
    with pytest.raises(AgentError, match="reason"):
        await a.abandon(mid.hex(), "  ")
    assert a.store.state_of(mid) is HandoffState.SERVING and vm.dir.exists()
    res = await a.abandon(mid.hex(), "host b lost")
    assert (res["status"], res["scrubbed"], res["vm"]) == ("abandoned", True, "vm1")
    assert "the VM on b can never have them" in res["lost"]
    assert lm.result is not None and not lm.result.ok and "abandoned by the operator" in lm.result.error
    assert lm.result.runs_on.startswith("none")
    assert "vm1" not in a.vms and not vm.dir.exists() and a.store.state_of(mid) is HandoffState.ABANDONED
    await _until(lambda: mid not in a.outgoing._recovering and not a.outgoing._readers)
    assert not a.outgoing.in_doubt() and not a.registry.to_scrub
    assert [m["state"] for m in a.outgoing.migrations() if m["migration_id"] == mid.hex()] == ["abandoned"]


async def test_a_source_abandoned_while_it_still_serves_stops_serving_before_its_scrub(cluster, monkeypatch):
    """Not a loss but a partition the operator took for one: the destination still pulls when
    the source's operator abandons.  The serving session ends before the copy is scrubbed (no
    page is read from a copy being scrubbed); the destination keeps its VM, PULLING with pages
    missing, until its own operator abandons it too.  No copy runs anywhere then."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", postcopy.SERVE_SLICE)
    a, b = cluster["a"], cluster["b"]
    mid = await _pulling(cluster, at=0.1)
    lm = a.outgoing.live[mid]
    assert lm.result is None and a.store.state_of(mid) is HandoffState.SERVING  # serving now
    vm, scrubbing, late, abandoning = a.vms["vm1"], [], [], []
    read, scrub = vm.read_pages, vm.scrub

    def reading(*args, **kw):  # (a worker thread)
        if abandoning and len(abandoning) == 1:
            abandoning.append(True)
            time.sleep(0.3)  # a read still under way as the abandon comes: its scrub must wait for it
        if scrubbing:
            late.append(args[0])
        return read(*args, **kw)

    def scrubbed() -> None:
        scrubbing.append(True)
        scrub()

    vm.read_pages, vm.scrub = reading, scrubbed
    abandoning.append(True)
    await trio.sleep(0.1)  # (the next read begins, and is held)
    res = await a.abandon(mid.hex(), "host b unreachable (it was not lost after all)")
    assert lm.result is not None and "abandoned by the operator" in lm.result.error  # ended first
    assert scrubbing and not late, "a page was read from the copy once its scrub had begun"
    assert res["scrubbed"] and "vm1" not in a.vms
    await _until(lambda: not b.incoming._live)  # its session ended (the source closed it)
    assert b.store.state_of(mid) is HandoffState.PULLING and b.vms["vm1"].missing_count()
    assert (await b.abandon(mid.hex(), "its source abandoned it"))["status"] == "abandoned"
    assert cluster.running_copies("vm1") == [] and "vm1" not in b.vms
    assert not late


async def test_a_destination_abandoned_while_its_session_still_pulls_ends_it_before_its_scrub(cluster, monkeypatch):
    """The destination's operator abandons while its session still pulls from a source that
    serves: the session is ended, and settled from its row, before the VM is scrubbed (the
    abandon waits for it, woken as it settles: no timer)."""
    monkeypatch.setattr(postcopy, "SERVE_BULK", postcopy.SERVE_SLICE)
    b = cluster["b"]
    mid = await _pulling(cluster, at=0.1)
    assert b.incoming._live and b.store.state_of(mid) is HandoffState.PULLING  # its session pulls now
    vm, live_at_scrub = b.vms["vm1"], []
    scrub = vm.scrub

    def scrubbed() -> None:
        live_at_scrub.append(len(b.incoming._live))
        scrub()

    vm.scrub = scrubbed
    with trio.fail_after(30):
        res = await b.abandon(mid.hex(), "host a unreachable")
    assert (res["status"], res["role"], res["scrubbed"]) == ("abandoned", "destination", True)
    assert live_at_scrub == [0], "the VM was scrubbed while its session still ran"
    assert "vm1" not in b.vms and b.store.state_of(mid) is HandoffState.ABANDONED
    assert cluster.running_copies("vm1") == []


# --------------------------------------------------------------------------
# Refused: every other state, no reason, the CLI's one-line errors


async def test_abandon_is_refused_in_every_other_state_and_without_a_reason(cluster):
    a = cluster["a"]
    st = a.store
    cases = {
        "sending": _row(st, SOURCE, "x", b"1", ),
        "handed_off": _row(st, SOURCE, "x", b"2", Step.HAND_OFF),
        "done": _row(st, SOURCE, "x", b"3", Step.HAND_OFF, Step.CONFIRM),
        "aborted (source)": _row(st, SOURCE, "x", b"4", Step.ABORT),
        "receiving": _row(st, DESTINATION, "x", b"5"),
        "prepared": _row(st, DESTINATION, "x", b"6", Step.PREPARE),
        "committed": _row(st, DESTINATION, "x", b"7", Step.PREPARE, Step.COMMIT),
        "aborted (destination)": _row(st, DESTINATION, "x", b"8", Step.ABORT),
        "committed (pulled)": _row(st, DESTINATION, "x", b"9", Step.PREPARE, Step.SWITCH, Step.PULLED),
    }
    hints = {"sending": "palm migrate --cancel", "handed_off": "palm migrate --resolve ID asks",
             "done": "runs on its destination", "committed": "with every page", "receiving": "still arriving"}
    for what, mid in cases.items():
        before = st.get(mid)
        with pytest.raises(AgentError) as info:
            await a.abandon(mid.hex(), "the other host is lost")
        msg = str(info.value)
        assert f"is {before.state.value} at this {before.role.value}" in msg and "only a post-copy" in msg, what
        assert what not in hints or hints[what] in msg, (what, msg)
        assert "\n" not in msg and st.get(mid) == before, what  # nothing changed
    serving = _row(st, SOURCE, "x", b"s", Step.HAND_OFF, Step.SERVE)
    for reason in ("", "   "):
        with pytest.raises(AgentError, match="--abandon needs --reason"):
            await a.abandon(serving.hex(), reason)
    with pytest.raises(AgentError, match="no migration with id"):
        await a.abandon(os.urandom(16).hex(), "x")
    with pytest.raises(AgentError, match="bad migration id"):
        await a.abandon("zz", "x")
    assert st.state_of(serving) is HandoffState.SERVING
    res = await a.abandon(serving.hex(), "x")  # the VM is not here (its memory went with a reboot): the row only
    assert (res["status"], res["scrubbed"]) == ("abandoned", False) and "was no longer here" in res["lost"]


async def test_the_cli_says_each_mistake_in_one_line(cluster, capsys):
    a = cluster["a"]
    sock = str(a.control_path)
    handed = _row(a.store, SOURCE, "web", b"w", Step.HAND_OFF)

    async def err(*argv: str) -> tuple[int, str]:
        code = await _palm("migrate", *argv, "--control", sock)
        err = capsys.readouterr().err  # (the in-process agents log there too: their lines are timestamped)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln[:4].isdigit()]
        assert len(lines) == 1 and lines[0].startswith("palm: "), lines
        return code, lines[0]

    code, line = await err("--abandon", "--reason", "x")
    assert code == 2 and "--abandon goes with --resolve ID" in line
    code, line = await err("--resolve", handed.hex(), "--abandon")
    assert code == 2 and "--abandon needs --reason" in line
    code, line = await err("--resolve", handed.hex(), "--abandon", "--override", "--reason", "x")
    assert code == 2 and "exclude each other" in line
    code, line = await err("--resolve", handed.hex()[:10], "--abandon", "--reason", "x")
    assert code == 1 and "is handed_off at this source" in line and "--override" in line
    code, line = await err("--resolve", "nosuchvm", "--abandon", "--reason", "x")
    assert code == 1 and "no post-copy migration serving or pulling here matches 'nosuchvm'" in line
    assert a.store.state_of(handed) is HandoffState.HANDED_OFF


# --------------------------------------------------------------------------
# The store, restarts, and a VM that misses nothing


def test_the_store_moves_to_abandoned_only_from_serving_or_pulling_and_keeps_the_row(shm):
    store = HandoffStore(shm / "s.db")
    serving = _row(store, SOURCE, "x", b"1", Step.HAND_OFF, Step.SERVE)
    pulling = _row(store, DESTINATION, "y", b"2", Step.PREPARE, Step.SWITCH)
    handed = _row(store, SOURCE, "z", b"3", Step.HAND_OFF)
    prepared = _row(store, DESTINATION, "w", b"4", Step.PREPARE)
    assert not store.abandon(handed, SOURCE, "x") and not store.abandon(prepared, DESTINATION, "x")
    assert not store.abandon(serving, DESTINATION, "x")  # (a move of the row's own side only)
    assert store.abandon(serving, SOURCE, "OPERATOR ABANDON: lost") and store.abandon(pulling, DESTINATION, "lost")
    assert store.get(serving).error == "OPERATOR ABANDON: lost"
    assert not store.abandon(serving, SOURCE, "again")  # final
    assert not store.scrub_abandoned(handed, object())  # not abandoned: nothing scrubbed
    assert store.prune(now=time.time() + 365 * 86400) == 0  # kept forever (a query must never get a token)
    assert store.state_of(serving) is store.state_of(pulling) is HandoffState.ABANDONED


async def test_a_restart_finishes_an_abandon_a_crash_cut_short(cluster):
    """The row says abandoned, the copy is still there (the agent died between the two): the
    next start scrubs it, on either side; a VM a later migration brought back is kept."""
    a, b = cluster["a"], cluster["b"]
    src = a.registry.create_model("s1", 1 << 20)
    mid = os.urandom(16)
    a.store.open_outgoing(mid, src, PEER)
    src.pause()
    assert a.store.hand_off(mid) and a.store.serve(mid) and a.store.abandon(mid, SOURCE, "lost")
    gone = b.registry.create_model("d1", 1 << 20)
    _row(b.store, DESTINATION, "d1", gone.vm_id, Step.PREPARE, Step.SWITCH, Step.ABANDON)
    back = b.registry.create_model("d2", 1 << 20)
    _row(b.store, DESTINATION, "d2", back.vm_id, Step.PREPARE, Step.SWITCH, Step.ABANDON)
    await trio.sleep(0.01)
    _row(b.store, DESTINATION, "d2", back.vm_id, Step.PREPARE, Step.COMMIT)  # it came back later
    for name in ("a", "b"):
        await cluster.stop(name)
        await cluster.start(name)
    assert "s1" not in cluster["a"].vms and not src.dir.exists()
    assert "d1" not in cluster["b"].vms and not gone.dir.exists()
    assert cluster["b"].vms["d2"].state == "running"


async def test_a_pulling_vm_that_misses_no_page_is_committed_not_lost(cluster):
    """Nothing needs the source any more (every page is here, COMMITTED not yet written):
    the abandon takes the destination's own pulled step instead, and says nothing is lost."""
    b = cluster["b"]
    vm = b.registry.create_model("whole", 1 << 20)
    mid = _row(b.store, DESTINATION, "whole", vm.vm_id, Step.PREPARE, Step.SWITCH)
    res = await b.abandon(mid.hex(), "the source host is lost")
    assert res["status"] == "committed" and res["lost"].startswith("nothing")
    assert b.store.state_of(mid) is HandoffState.COMMITTED and b.vms["whole"].state == "running"
