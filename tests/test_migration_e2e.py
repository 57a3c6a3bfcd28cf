"""Whole migrations between two in-process agents over loopback TCP (the `cluster` fixture): every
workload, policies, tampering on the wire through the fault proxy, failures at each handoff step,
recovery, the operator's cancel and override, and what a migration reports."""

from __future__ import annotations

import itertools
import os
import time

import pytest
import trio

from palm_net.agent.errors import AgentError
from palm_net.migration.params import MigrationParams, MigrationStats
from palm_net.migration.runner import OUTBOX_BUFFER
from palm_net.migration.source import PACING_BURST
from palm_net.testing.proxy import DONE, READY, FaultProxy, Rule
from palm_net.wire.messages import (
    Begin,
)
from palm_net.wire.protocol import Role, SessionProtocol

# --------------------------------------------------------------------------
# Whole migrations between in-process agents over loopback TCP


@pytest.mark.parametrize("workload", ["idle", "random:3000", "hotset:256KiB:5000", "protected:2000",
                                      "random:2000+protected:1000"])
async def test_migration_with_each_workload(cluster, workload):
    a, b = cluster["a"], cluster["b"]
    vm = a.registry.create_model("vm1", 8 << 20, protected=2, workload=workload, seed=7)
    p0 = vm.processes[0]
    secret = b"protected plaintext that never leaves the hypervisor"
    vm.process_write(0, p0.first + 1, secret, 100)
    await trio.sleep(0.2)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True))
    assert res.ok, res.error
    assert res.stats.digest  # both sides digested memory at pause and agreed
    assert "vm1" not in a.vms and cluster.running_copies("vm1") == ["b"]
    moved = b.vms["vm1"]
    report = moved.verify()
    assert report.ok and report.checked + report.in_process_view == moved.info.protected_pages
    # The protected process's view still works on the destination, and the
    # untrusted view of the page is ciphertext, not the secret.  A workload
    # with protected writes may overwrite the secret itself (16-byte stamps
    # at random offsets, about 2% of runs): the digest at pause, protected
    # pages in plaintext, already proved what arrived; so the secret is
    # checked where nothing else writes, and written afresh otherwise.
    if "protected" in workload:
        with trio.fail_after(5):  # the destination starts the workload once its session ends
            while moved.workload is None:
                await trio.sleep(0.01)
        moved.workload.stop()
        moved.process_write(0, p0.first + 1, secret, 100)
    assert secret not in moved.os_read(p0.first + 1)
    assert moved.process_read(0, p0.first + 1)[100:100 + len(secret)] == secret
    assert a.store.get(res.mid).state == "done" and b.store.get(res.mid).state == "committed"


async def test_protected_plaintext_never_on_the_wire(cluster):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 4 << 20, protected=1, fill="zero")
    marker = b"TOP-SECRET-" * 8
    for g in range(vm.processes[0].first, vm.processes[0].first + 16):
        vm.process_write(0, g, marker)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert res.ok
    wire = b"".join(proxy.seen.values())
    assert marker not in wire and b"TOP-SECRET" not in wire
    assert res.stats.protected_pages >= vm.info.protected_pages


async def test_plain_mode_refused_for_protected_vm(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(plain=True))
    assert not res.ok and "plain-refused" in res.error
    assert cluster.running_copies("vm1") == ["a"]


@pytest.mark.parametrize("policy", ["none", "agents:c", "measurements:" + "00" * 32])
async def test_policy_forbidden_destination_refused_before_any_page(cluster, policy):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1, policy=policy)
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert not res.ok and res.error.startswith("policy")
    # At most the handshake crossed (preamble, msg1, msg3): not one record.
    assert proxy.log.frames.get((0, "c2s"), 0) <= 3
    assert cluster.running_copies("vm1") == ["a"]


async def test_policy_allowing_the_destination_by_name(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, protected=1, policy="agents:b")
    assert (await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())).ok


# --------------------------------------------------------------------------
# Tampering on the wire and failures at each handoff step


async def _via_proxy(cluster, rules, workload="idle", params=None):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 4 << 20, protected=1, workload=workload, fill="random")
    digest = vm.digest() if workload == "idle" else None
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), rules)
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", params or MigrationParams())
    return res, digest, proxy


def _one_copy(cluster, digest):
    copies = cluster.running_copies("vm1")
    assert len(copies) == 1, f"VM runs on {copies}"
    vm = cluster[copies[0]].vms["vm1"]
    if digest is not None:
        assert vm.digest() == digest
    assert vm.verify().ok
    return copies[0]


@pytest.mark.parametrize("rule", [
    Rule("c2s", 6, "flip", bit=900),
    Rule("c2s", 6, "drop"),
    Rule("c2s", 6, "duplicate"),
    Rule("c2s", 7, "replay", replay_of=(0, "c2s", 5)),
    Rule("c2s", 6, "truncate", bit=100),
    Rule("s2c", 1, "flip", bit=3),
], ids=["bitflip", "drop", "duplicate", "replay", "truncate", "flip-accept"])
async def test_tampered_records_fail_closed(cluster, rule):
    res, digest, proxy = await _via_proxy(cluster, [rule])
    assert not res.ok and res.runs_on == "source"
    assert _one_copy(cluster, digest) == "a"
    assert proxy.log.events  # the rule fired
    with trio.fail_after(5):  # the destination scrubs once its session ends
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)


async def test_replay_of_an_earlier_session_is_refused(cluster):
    """Records recorded from one session injected into the next fail authentication."""
    a = cluster["a"]
    a.registry.create_model("vm0", 4 << 20, fill="random")
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port),
                       [Rule("c2s", 5, "replay", connection=1, replay_of=(0, "c2s", 5))])
    await cluster.nursery.start(proxy.serve)
    assert (await a.outgoing.migrate("vm0", f"127.0.0.1:{proxy.port}", MigrationParams())).ok
    a.registry.create_model("vm1", 4 << 20, fill="random")
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert not res.ok and cluster.running_copies("vm1") == ["a"]


@pytest.mark.parametrize(("step", "rule", "where"), [
    ("before READY", Rule("s2c", 0, "cut", match=READY), "a"),
    ("after READY", Rule("s2c", 0, "cut_after", match=READY), "a"),
    ("after COMMIT", Rule("s2c", 0, "cut", match=DONE), "b"),
    ("after DONE", Rule("s2c", 0, "cut_after", match=DONE), "b"),
])
async def test_handoff_failure_at_each_step(cluster, step, rule, where):
    res, digest, proxy = await _via_proxy(cluster, [rule])
    assert proxy.log.events, "the fault was injected"
    assert _one_copy(cluster, digest) == where, step
    if where == "b":
        assert cluster["a"].store.get(res.mid).state == "done"
    else:
        assert cluster["a"].store.get(res.mid).state == "aborted"
        with trio.fail_after(5):  # the destination aborts once it sees its session end
            while (row := cluster["b"].store.get(res.mid)) is not None and row.state != "aborted":
                assert row.state in ("receiving", "prepared"), row.state  # never committed
                await trio.sleep(0.01)


async def test_in_doubt_source_restart_then_recovery(cluster):
    """COMMIT reached the destination, DONE never came back, and the source
    agent restarts while in doubt: it recovers the outcome from the destination."""
    cluster.members["a"].config.in_doubt_wait = 0.01
    res, digest, _ = await _via_proxy(cluster, [Rule("s2c", 0, "cut", match=DONE),
                                                Rule("c2s", 0, "cut", connection=1)])
    assert res.status == "in-doubt" and res.runs_on.startswith("none")
    assert cluster.running_copies("vm1") == ["b"]  # paused on a, running on b: still one copy
    assert cluster["a"].vms["vm1"].state == "paused"
    await cluster.stop("a")
    cluster.members["a"].config.in_doubt_wait = 3.0
    a = await cluster.start("a")
    with trio.fail_after(10):
        while a.store.get(res.mid).state == "handed_off":
            await trio.sleep(0.05)
    assert a.store.get(res.mid).state == "done"
    assert "vm1" not in a.vms
    _one_copy(cluster, digest)


async def test_destination_restart_while_prepared_aborts_and_source_resumes(cluster):
    cluster.members["a"].config.in_doubt_wait = 0.01
    # READY reaches the source, the COMMIT never reaches the destination, whose
    # agent restarts: it aborts on start-up and the source gets a token.
    res, digest, _ = await _via_proxy(cluster, [Rule("c2s", 0, "cut", connection=1),
                                                 Rule("s2c", 2, "cut_after")])
    await cluster.stop("b")
    b = await cluster.start("b")
    assert b.store.get(res.mid).state == "aborted"
    a = cluster["a"]
    if a.store.get(res.mid).state == "handed_off":
        status = await a.outgoing.resolve(res.mid.hex(), override=False, reason="")
        assert status == "aborted"
    assert _one_copy(cluster, digest) == "a"


async def test_operator_override_is_loud(cluster, capsys):
    cluster.members["a"].config.in_doubt_wait = 0.01
    # DONE never comes back and every reconnection is cut: the source stays in doubt.
    res, _, _ = await _via_proxy(cluster, [Rule("s2c", 0, "cut", match=DONE), Rule("c2s", 0, "cut", connection=1),
                                           Rule("c2s", 0, "cut", connection=2), Rule("c2s", 0, "cut", connection=3)])
    a = cluster["a"]
    assert res.status == "in-doubt" and a.store.get(res.mid).state == "handed_off"
    with pytest.raises(AgentError):
        await a.outgoing.resolve("zz", override=True, reason="x")
    assert await a.outgoing.resolve(res.mid.hex(), override=True, reason="test override") == "resumed (override)"
    assert a.vms["vm1"].state == "running"
    captured = capsys.readouterr()
    assert "OPERATOR OVERRIDE" in captured.out + captured.err


# An idle, unprotected, zero-filled 1024-page VM has a fixed record layout,
# so the proxy can aim at each phase (c2s frames 0-2 are the handshake):
# 3 BEGIN, 4 KEYS, 5 PAGES (round 0), 6 ROUND_END, 7 CPU_STATE (stop-and-copy),
# 8 CONTEXT (the protected-context blob), 9 COMPLETE, 10 COMMIT.
PHASES = [
    ("handshake msg3", Rule("c2s", 2, "flip", bit=40), "a"),
    ("handshake msg2", Rule("s2c", 0, "flip", bit=100), "a"),
    ("BEGIN", Rule("c2s", 3, "flip", bit=20), "a"),
    ("round 0 pages", Rule("c2s", 5, "flip", bit=2000), "a"),
    ("round end", Rule("c2s", 6, "drop"), "a"),
    ("stop-and-copy CPU state", Rule("c2s", 7, "flip", bit=30), "a"),
    ("protected-context blob", Rule("c2s", 8, "truncate", bit=20), "a"),
    ("completion record", Rule("c2s", 9, "replay", replay_of=(0, "c2s", 8)), "a"),
    ("COMMIT cut", Rule("c2s", 10, "cut"), "a"),
    ("COMMIT flipped", Rule("c2s", 10, "flip", bit=9), "a"),
]


@pytest.mark.parametrize(("phase", "rule", "where"), PHASES, ids=[p[0] for p in PHASES])
async def test_fault_at_each_phase(cluster, phase, rule, where):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    digest = vm.digest()
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [rule])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())
    assert proxy.log.events, f"{phase}: the fault was not injected"
    assert not res.ok or res.extra.get("recovered")
    with trio.fail_after(10):  # in-doubt recovery and destination cleanup settle
        while cluster.running_copies("vm1") != [where] or "vm1" in cluster["b"].vms:
            await trio.sleep(0.05)
    assert cluster["a"].vms["vm1"].digest() == digest


async def test_phase_layout_assumed_above(cluster):
    """Without faults, that VM's session is exactly 11 frames out and 5 back (ROUND_DONE of round 0)."""
    a = cluster["a"]
    a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port))
    await cluster.nursery.start(proxy.serve)
    assert (await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams())).ok
    assert proxy.log.frames[(0, "c2s")] == 11 and proxy.log.frames[(0, "s2c")] == 5


@pytest.mark.parametrize("action", ["flip", "drop", "replay"])
async def test_fault_in_a_later_precopy_round(cluster, action):
    """A guest write during round 0 makes a round-1 page record at c2s frame 7
    (tiny downtime limit: no early stop); tampering with it fails closed."""
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    rules = [Rule("c2s", 5, "call", callback=lambda: vm.guest_write(17, b"written during round 0")),
             Rule("c2s", 7, action, bit=4000, replay_of=(0, "c2s", 5))]
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), rules)
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams(downtime_limit=1e-6, max_rounds=3))
    assert all(r.fired for r in rules)
    assert not res.ok and res.runs_on == "source"
    assert len(res.stats.rounds) >= 1 and res.stats.rounds[0].dirty_pages == 1
    with trio.fail_after(5):
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)
    assert cluster.running_copies("vm1") == ["a"]
    assert vm.os_read(17).startswith(b"written during round 0")


async def test_later_round_layout_assumed_above(cluster):
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 1024 * 4096, fill="zero")
    rule = Rule("c2s", 5, "call", callback=lambda: vm.guest_write(17, b"x"))
    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port), [rule])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams(downtime_limit=1e-6, max_rounds=3))
    assert res.ok and [r.pages for r in res.stats.rounds][:2] == [1024, 1]


async def test_auto_converge_throttles_a_guest_that_dirties_faster_than_the_link(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 2 << 20, workload="random:20000", fill="random")
    params = MigrationParams(bandwidth=8 << 20, auto_converge=True, max_rounds=6, max_factor=20,
                             downtime_limit=0.01)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), params)
    assert res.ok, res.error
    assert res.stats.throttle < 1.0  # the vCPUs were slowed down
    assert cluster.running_copies("vm1") == ["b"]


async def test_bandwidth_cap_is_respected(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 4 << 20, fill="random")
    cap = 8 << 20
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(bandwidth=cap))
    assert res.ok
    r0 = res.stats.rounds[0]
    # The token bucket's bound (test_pacer_never_lets_more_through_than_the_cap): a slow
    # machine only makes the round longer, never the bound looser.
    assert r0.bytes <= cap * (r0.duration + PACING_BURST) + OUTBOX_BUFFER


async def test_operator_cancel_before_the_handoff_resumes_the_source(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 16 << 20, fill="random", protected=1)
    results = []

    async def run():
        results.append(await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(bandwidth=4 << 20)))

    async with trio.open_nursery() as n:
        n.start_soon(run)
        with trio.fail_after(5):
            while not [m for m in a.outgoing.live.values() if m.result is None and m.stats.phase == "round"]:
                await trio.sleep(0.02)
        mid = next(m.mid for m in a.outgoing.live.values() if m.result is None)
        assert a.outgoing.cancel(mid.hex()) == "cancelling"
    res = results[0]
    assert not res.ok and res.status == "cancelled" and res.runs_on == "source"
    assert a.store.get(mid).state == "aborted"
    assert cluster.running_copies("vm1") == ["a"]
    with trio.fail_after(5):
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)
    with pytest.raises(AgentError):
        a.outgoing.cancel(mid.hex())  # nothing in flight any more
    # The cancel is taken between records, and the destination told (ABORT): its row says
    # what happened, not an error of its own (issue 25).
    (row,) = [m for m in cluster["b"].outgoing.migrations() if m["migration_id"] == mid.hex()]
    assert row["state"] == "aborted" and row["error"] == "cancelled at the source; the VM stays there"
    assert res.error == "cancelled by the operator"


@pytest.mark.parametrize("name", ["../escape", "..", "a/b", ".hidden"])
async def test_destination_refuses_vm_names_that_are_not_plain_names(cluster, name):
    """A (certified) source cannot make the destination create files outside its VM directory."""
    from palm_net.channel.handshake import ChannelConfig
    from palm_net.channel.transport import connect
    from palm_net.crypto.identity import AgentIdentity

    ident = AgentIdentity.generate("evil")
    cert = cluster.authority.issue("evil", ident.static.public, ident.sign_pub, cluster.measurement)
    cfg = ChannelConfig(ident, cert, cluster.authority.public, cluster.measurement,
                        frozenset({cluster.measurement}))
    stream = await trio.open_tcp_stream("127.0.0.1", cluster.members["b"].port)
    ch = await connect(stream, cfg)
    proto = SessionProtocol(Role.SOURCE, os.urandom(16))
    await ch.send(proto.send(Begin(name, bytes(16), 16, 0, 0, 1, False, False, "model", b"")))
    with trio.fail_after(5):
        reply = proto.receive((await ch.receive()).data)
    assert reply.type == "ABORT" and reply.body.code == "malformed"
    await ch.aclose()
    root = cluster.members["b"].config.memory_dir
    assert not (root.parent / "escape").exists() and [p for p in root.iterdir() if p.name != ".lock"] == []
    assert cluster["b"].store.get(proto.mid) is None  # a refused BEGIN writes nothing


async def test_the_digest_check_after_done_is_shown_and_counted(cluster):
    """--verify-digest re-reads the source's copy after DONE: the progress says so, and
    the total includes it (issue 25.3: the line froze and the summary left it out)."""
    a = cluster["a"]
    vm = a.registry.create_model("vm1", 8 << 20, fill="random")
    read_afresh = vm.digest

    def slow_digest() -> str:  # as a large guest's would be
        time.sleep(0.5)
        return read_afresh()

    vm.digest = slow_digest
    phases: list[str] = []
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True),
                                   on_progress=lambda st: phases.append(st.phase))
    assert res.ok and "digest-check" in phases
    d = res.as_dict()
    assert d["digest_at_pause"] == "equal" and d["digest_check_ms"] >= 500
    assert d["total_ms"] >= 500  # counted in the total


async def test_the_downtime_is_broken_down_by_phase(cluster):
    """The source's view of the pause, phase by phase (issue 24.1): the phases are in
    order, and they add up to the downtime."""
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, fill="random", protected=1)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res.ok
    d = res.as_dict()
    phases = d["downtime_phases_ms"]
    assert list(phases) == ["stop-and-copy", "finish", "destination-prepare", "hand-off", "commit"]
    assert all(v >= 0 for v in phases.values())
    assert abs(sum(phases.values()) - d["downtime_ms"]) <= 0.1 * len(phases)  # (each rounded to 0.1 ms)
    from palm_net.cli.output import migrate_summary

    line = next(ln for ln in migrate_summary(d).splitlines() if "by phase" in ln)
    assert "stop-and-copy" in line and "commit" in line


async def test_the_json_counts_agree_and_durations_are_in_ms(cluster):
    """--json: "rounds" is the number of round_stats (the paused stop-and-copy round
    among them, marked), every duration in ms; the summary's count matches its table
    (issue 25.9: 5 rounds next to 4 entries, durations in seconds among ms)."""
    from palm_net.cli.output import migrate_summary

    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, fill="random", workload="random:2000")
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())
    assert res.ok
    d = res.as_dict()
    rs = d["round_stats"]
    assert d["rounds"] == len(rs) >= 2 and rs[-1]["paused"] and not any(x["paused"] for x in rs[:-1])
    assert all("duration" not in x and x["duration_ms"] >= 0 for x in rs)
    text = migrate_summary(d)
    assert f"in {len(rs)} rounds (the last one paused)" in text
    table = text.split("rounds:")[1].splitlines()[2:]  # header and rule off
    # (the table ends at a blank line or a WARNING, which may wrap over lines of its own under load)
    rows = list(itertools.takewhile(lambda ln: ln.strip() and not ln.startswith("WARNING"), table))
    assert len(rows) == len(rs)
    assert "paused" in table[len(rs) - 1]


@pytest.mark.parametrize("at", ["round done", "under a bandwidth cap"])
async def test_a_cancel_between_messages_reaches_the_destination_as_abort(cluster, at):
    """A cancel asked where the engine has queued a message behind a note (ROUND_END
    after "round done"), or under a tight bandwidth cap (sealed pieces waiting for
    the pacer): what the engine made goes out first, the ABORT is the next record
    the destination expects, and it is read as a cancel, not as a replay."""
    a = cluster["a"]
    a.registry.create_model("vm1", 32 << 20, fill="random", protected=1)
    said: list[str] = []

    def progress(stats: MigrationStats) -> None:
        if not said and (stats.rounds if at == "round done" else stats.transferred > (2 << 20)):
            (mid,) = [lm.mid for lm in a.outgoing.live.values() if lm.result is None]
            said.append(a.outgoing.cancel(mid.hex()))

    bandwidth = 8 << 20 if at == "round done" else 1 << 20
    with trio.fail_after(30):
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(bandwidth=bandwidth),
                                       on_progress=progress)
    assert said == ["cancelling"] and res.status == "cancelled" and res.runs_on == "source"
    with trio.fail_after(5):
        while "vm1" in cluster["b"].vms:
            await trio.sleep(0.02)
    (row,) = [m for m in cluster["b"].outgoing.migrations() if m["migration_id"] == res.mid.hex()]
    assert row["state"] == "aborted" and row["error"] == "cancelled at the source; the VM stays there"
    assert cluster.running_copies("vm1") == ["a"]


async def test_a_cancel_while_the_source_waits_for_the_destination_wakes_it_and_sends_abort(cluster):
    """Guards the Stop's wake: a cancel asked while the run waits (for ROUND_DONE) is taken at once, with ABORT."""
    import threading

    from palm_net import faults

    a, b = cluster["a"], cluster["b"]
    a.registry.create_model("vm1", 1 << 20, fill="random")
    held, release = threading.Event(), threading.Event()

    def hold(at: str) -> None:  # the destination settles round 0 only once the test says so
        if at == "destination.Settle" and not held.is_set():
            held.set()
            release.wait(30)

    old = faults.install(hold)
    try:
        async with trio.open_nursery() as n:
            results = []

            async def run() -> None:
                results.append(await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams()))

            n.start_soon(run)
            with trio.fail_after(10):
                while not held.is_set():
                    await trio.sleep(0.01)
            (lm,) = [m for m in a.outgoing.live.values() if m.result is None]
            lm.stop.grace = 0.2  # not woken, the run would be cut with no ABORT sent
            assert a.outgoing.cancel(lm.mid.hex()) == "cancelling"
            with trio.fail_after(10):
                while not results:
                    await trio.sleep(0.01)
            release.set()
    finally:
        release.set()
        faults.install(old)
    (res,) = results
    assert res.status == "cancelled" and res.runs_on == "source"
    with trio.fail_after(5):
        while "vm1" in b.vms:
            await trio.sleep(0.02)
    row = b.store.get(res.mid)
    assert row.state == "aborted" and row.error == "cancelled at the source; the VM stays there", row.error
    assert cluster.running_copies("vm1") == ["a"]


async def test_a_finished_migration_keeps_neither_its_run_nor_its_vm(cluster):
    """The agent keeps its last finished migrations for `palm migrations`; each kept the
    operator's Stop, whose wake-up was bound to the run, which held the source VM and
    its page digest (16 bytes a page): 4 MiB per GiB with --verify-digest, 50 times over.
    Now the run lets go when it ends, and a VM drops its digest once its migration is over
    (scrubbed, activated, or resumed after a failure)."""
    import gc

    from palm_net.hypervisor.model import ModelVM
    from palm_net.migration.runner import SourceRun

    a = cluster["a"]
    vm = a.registry.create_model("vm1", 8 << 20, fill="random")
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams(verify_digest=True))
    assert res.ok and [lm.result for lm in a.outgoing.live.values()] == [res]
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, SourceRun)] == []
    assert vm._pages_digest is None and vm.state != "running"
    assert [o for o in gc.get_objects() if isinstance(o, ModelVM) and o._pages_digest is not None] == []
    back = cluster["b"]  # and a migration that fails: the source runs on, without the digest
    proxy = FaultProxy(("127.0.0.1", cluster.members["a"].port), [Rule("s2c", 2, "cut")])  # READY cut
    await cluster.nursery.start(proxy.serve)
    res = await back.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}", MigrationParams(verify_digest=True))
    assert not res.ok and back.vms["vm1"].running and back.vms["vm1"]._pages_digest is None
