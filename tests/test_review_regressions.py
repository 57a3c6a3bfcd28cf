"""Regressions of an independent red-team review of the security fixes (each
was a working proof of concept against the code before its fix)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio

from palm_net.cli import _fmt_table, safe
from palm_net.hostfs import UnsafePathError, ensure_dir
from palm_net.hypervisor.vmspec import WorkloadError, check_workload, parse_workload, validate_policy
from palm_net.migration import destination, handoff
from palm_net.migration.handoff import HandoffState, Peer
from palm_net.migration.params import MigrationParams
from palm_net.testing.hostile import HostilePeer
from palm_net.units import parse_size
from palm_net.wire.messages import Abort, RoundEnd
from palm_net.wire.protocol import Role

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the attacker is another uid")


def port(cluster, name: str = "b") -> int:
    return cluster.members[name].port


# F8 (high): a peer's CPU state named a workload whose size overflowed; the
# destination agent died after COMMIT, and again at every restart.


def test_sizes_and_workloads_that_overflow_are_refused_as_bad_input():
    with pytest.raises(ValueError, match="too large"):
        parse_size("9" * 400)
    for bad in ("hotset:" + "9" * 400 + ":5", "random:inf", "random:nan", "random:1e400"):
        with pytest.raises(WorkloadError):
            parse_workload(bad)
    for bad in ("idle+\x1b]0;pwned\x07", "x" * 300, 7):
        with pytest.raises(ValueError):
            check_workload(bad)
    with pytest.raises(ValueError):
        validate_policy("agents:b,\x1b[2J")


async def test_a_hostile_cpu_state_cannot_kill_the_destination(cluster):
    a, b = cluster["a"], cluster["b"]
    vm = a.registry.create_model("w", 4 << 20)
    vm.config["workload"] = "hotset:" + "9" * 400 + ":5"  # what a hostile source's CPU_STATE carries
    res = await a.outgoing.migrate("w", cluster.addr("b"), MigrationParams())
    assert not res.ok and res.error.startswith("hypervisor:") and res.runs_on == "source"
    assert b.status()["agent"] == "b" and "w" not in b.vms  # alive, and nothing of it kept
    vm.config["workload"] = "idle"
    assert (await a.outgoing.migrate("w", cluster.addr("b"), MigrationParams())).ok


async def test_a_vm_whose_workload_cannot_run_is_idle_not_fatal(cluster):
    a = cluster["a"]
    vm = a.registry.create_model("v", 4 << 20)
    if vm.workload is not None:
        vm.workload.stop()
        vm.workload = None
    vm.config["workload"] = "hotset:" + "9" * 400 + ":5"  # e.g. a vm.json from an older version
    a.registry.start_workload(vm)  # logged, not raised
    assert vm.workload is None and vm.running


# F2 (medium): the same migration id BEGUN in two sessions at once left a
# "phantom" VM that blocked its name until a restart.


async def test_the_same_id_in_two_sessions_leaves_no_phantom(cluster):
    b = cluster["b"]
    evil = HostilePeer(cluster.authority, cluster.measurement)
    mid = os.urandom(16)
    codes: dict[str, str] = {}

    async def one(name: str) -> None:
        ch, _, reply = await evil.try_begin(port(cluster), mid=mid, name=name, pages=(256 << 20) // 4096)
        codes[name] = reply.type if reply.type == "ACCEPT" else reply.body.code
        await trio.sleep(0.2)
        await ch.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(one, "decoy")
        n.start_soon(one, "web")
    assert sorted(codes.values()) in (["ACCEPT", "replay"], ["replay", "replay"]), codes
    with trio.fail_after(10):
        while b.incoming.admission.sessions or b.vms:
            await trio.sleep(0.02)
    assert b.registry.name_free("web") and b.registry.name_free("decoy")
    a = cluster["a"]
    a.registry.create_model("web", 4 << 20)
    assert (await a.outgoing.migrate("web", cluster.addr("b"), MigrationParams())).ok


# F4 (low-medium): peer text inside the CPU state reached the operator's terminal.


def test_the_terminal_never_gets_an_escape_sequence():
    evil = "idle+\x1b]0;pwned\x07\x1b[2J\nFAKE"
    assert "\x1b" not in safe(evil) and "\n" not in safe(evil) and "FAKE" in safe(evil)
    table = _fmt_table([["NAME", "WORKLOAD"], ["w", evil]])
    assert "\x1b" not in table and table.count("\n") == 1


# F3 (low-medium): finished rows were never pruned, and not bounded per peer.


async def test_rows_are_pruned_and_bounded_per_peer(cluster, monkeypatch):
    monkeypatch.setattr(handoff, "MAX_ABORTED_PER_PEER", 5)
    b = cluster["b"]
    b.incoming.sessions.rate = b.incoming.sessions.burst = 1000.0
    evil = HostilePeer(cluster.authority, cluster.measurement)
    for i in range(8):
        with trio.fail_after(10):  # one at a time: the last one's place is given back first
            while b.incoming.admission.sessions:
                await trio.sleep(0.01)
        ch, proto, reply = await evil.try_begin(port(cluster), name=f"junk{i}")
        assert reply.type == "ACCEPT"
        await ch.send(proto.send(Abort("x", "x", b"")))  # admitted, then aborted: a row each
        await ch.aclose()
    with trio.fail_after(10):
        while b.incoming.admission.sessions:
            await trio.sleep(0.02)
    assert len(b.store.list(role=Role.DESTINATION, states=(HandoffState.ABORTED,))) == 8
    b.store.prune()
    assert len(b.store.list(role=Role.DESTINATION, states=(HandoffState.ABORTED,))) == 5
    b.store._db.execute("UPDATE migrations SET updated = updated - 31*86400")
    assert b.store.prune() == 5 and b.store.count() == 0
    # A committed row is never pruned: an in-doubt source may ask for years.
    b.store._open(os.urandom(16), Role.DESTINATION, "kept", bytes(16), Peer("p", bytes(32), bytes(32)))
    (row,) = b.store.list()
    assert b.store._move(row.mid, Role.DESTINATION, handoff.Step.PREPARE)
    assert b.store._move(row.mid, Role.DESTINATION, handoff.Step.COMMIT)
    b.store._db.execute("UPDATE migrations SET updated = updated - 3650*86400")
    b.store.prune()
    assert b.store.get(row.mid) is not None


# F6 (low): a symlink of another user on the way to a directory passed the
# checks (they looked at the resolved path), and could be retargeted later.


@root_only
def test_a_symlink_of_another_user_on_the_way_is_refused():
    tag = os.urandom(4).hex()
    good = Path(tempfile.mkdtemp(prefix="palm-good-", dir="/dev/shm"))
    link = Path("/tmp") / f"palm-evil-{tag}"
    try:
        subprocess.run([*NOBODY, "ln", "-s", str(good), str(link)], check=True)
        with pytest.raises(UnsafePathError, match="symlink of uid 65534"):
            ensure_dir(link / "mem")
        assert not (good / "mem").exists()
        own = Path("/tmp") / f"palm-own-{tag}"
        own.symlink_to(good)  # the agent's own (or root's) symlink is fine, and resolved once
        try:
            assert ensure_dir(own / "mem") == good.resolve() / "mem"
        finally:
            own.unlink()
    finally:
        subprocess.run(["rm", "-rf", str(good), str(link)], check=False)


# F7 (low): one peer could hold all incoming memory for 42 minutes with no-op
# records: now a per-peer share, and a deadline that needs data to move.


async def test_no_data_no_slot(cluster, monkeypatch):
    monkeypatch.setattr(destination, "SESSION_BASE", 1.0)
    b = cluster["b"]
    evil = HostilePeer(cluster.authority, cluster.measurement)
    ch, proto, reply = await evil.try_begin(port(cluster), name="hog", pages=(64 << 20) // 4096)
    assert reply.type == "ACCEPT" and b.incoming.admission.sessions == 1
    # KEYS would be the next message; ROUND_ENDs keep the session "busy" but move no data.
    with trio.fail_after(10):
        while b.incoming.admission.sessions:
            try:
                await ch.send(proto.send(RoundEnd(0, 0, 0)))
            except Exception:
                break
            await trio.sleep(0.2)
    assert b.incoming.admission.sessions == 0 and "hog" not in b.vms


async def test_one_peer_cannot_take_all_incoming_memory(cluster):
    b = cluster["b"]
    share = b.incoming.admission.max_memory_per_peer
    assert share == b.incoming.admission.max_memory // 2
    evil = HostilePeer(cluster.authority, cluster.measurement)
    ch, _, reply = await evil.try_begin(port(cluster), name="hog", pages=(share + (1 << 20)) // 4096)
    await ch.aclose()
    assert reply.type == "ABORT" and reply.body.code == "busy"
