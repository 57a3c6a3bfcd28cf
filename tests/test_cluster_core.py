"""The cluster's sans-IO cores, without etcd: the records read from etcd (bounded,
validated), the VM-record convergence rules, the peer gate, placement and the
drain plan."""

from __future__ import annotations

import json

import pytest

from palm_net.channel.handshake import PeerInfo, Purpose
from palm_net.cluster.converge import CONFLICT_LIMIT, Converger, Fact, FactKind, Read, Remove, Write
from palm_net.cluster.gate import Lists, PeerGate
from palm_net.cluster.model import (
    MAX_VALUE,
    AgentRecord,
    DrainOptions,
    DrainRequest,
    DrainStatus,
    DrainVm,
    Keys,
    RecordError,
    VmRecord,
)
from palm_net.cluster.placement import Candidate, DrainPlan, Movable, completion_timeout, place
from palm_net.errors import ErrorCode

MiB = 1 << 20
VID = "aa" * 16
MID = "bb" * 16


def agent_record(**kw) -> AgentRecord:
    base = dict(name="a", addr="10.0.0.1:7400", measurement="cd" * 32, static_pub="ef" * 32,
                roles=("source", "destination"), capacity=1 << 30, free=1 << 29, vms=2, version="0.1.0",
                started=1.7e9)
    return AgentRecord(**{**base, **kw})


# ------------------------------------------------------------------ records


def test_records_round_trip():
    a = agent_record(lists_revision=7, in_doubt=1)
    assert AgentRecord.decode(a.encode()) == a
    v = VmRecord(VID, "web", "a", MID, 8 * MiB, "qemu", "agents:b,c", "paused")
    assert VmRecord.decode(v.encode()) == v
    st = DrainStatus("01" * 8, "a", "running", 1.0, 2.0, {"web": DrainVm("moved", "b", 1, "", 5, 8 * MiB, 3.0, 1.0)})
    assert DrainStatus.decode(st.encode()) == st
    r = DrainRequest("01" * 8, 1.0, "op", DrainOptions(3, 1, 10.0, 5.0, 2))
    assert DrainRequest.parse(r.to_dict()) == r


@pytest.mark.parametrize("mutate, why", [
    (lambda d: d.update(name="../etc"), "name"),
    (lambda d: d.update(name="a\x1b[31m"), "name"),
    (lambda d: d.update(addr="no-port"), "HOST:PORT"),
    (lambda d: d.update(measurement="zz" * 32), "hex"),
    (lambda d: d.update(measurement="AB" * 32), "lower-case"),
    (lambda d: d.update(free=-1), "integer"),
    (lambda d: d.update(free=True), "integer"),
    (lambda d: d.update(started=float("nan")), "number"),
    (lambda d: d.update(roles=["root"]), "role"),
    (lambda d: d.update(version="x" * 65), "printable"),
    (lambda d: d.update(migrating=[{}] * 65), "list"),
    (lambda d: d.update(v=2), "version 1"),
    (lambda d: d.pop("addr"), "addr"),
])
def test_agent_records_from_etcd_are_checked(mutate, why):
    d = json.loads(agent_record().encode())
    mutate(d)
    with pytest.raises(RecordError, match=why):
        AgentRecord.decode(json.dumps(d).encode())


def test_values_are_bounded_and_json_only():
    with pytest.raises(RecordError, match="over the limit"):
        VmRecord.decode(b" " * (MAX_VALUE + 1))
    for bad in (b"\xff", b"[]", b"1", b'{"v": 1' + b"[" * 5000):
        with pytest.raises(RecordError):
            VmRecord.decode(bad)
    with pytest.raises(RecordError, match="state"):
        VmRecord.decode(VmRecord(VID, "web", "a").encode().replace(b'"running"', b'"on fire"'))
    with pytest.raises(RecordError, match="max_cluster"):
        DrainRequest.parse({"id": "01" * 8, "at": 1, "options": {"max_cluster": 0}})


def test_keys_take_names_only():
    k = Keys("/palm/")
    assert k.agent("a-1") == b"/palm/agents/a-1" and k.vm(VID) == b"/palm/vms/" + VID.encode()
    for bad in ("..", "a/b", "", ".x"):
        with pytest.raises(ValueError):
            k.agent(bad)
    with pytest.raises(RecordError):
        k.vm("x")
    for bad in ("palm/", "/palm", "/pa lm/", "//", "/a//b/"):
        with pytest.raises(ValueError):
            Keys(bad)
    assert Keys.tail(k.agents, b"/palm/agents/b") == "b"
    with pytest.raises(RecordError):
        Keys.tail(k.agents, b"/palm/agents/../x")


# ------------------------------------------------------------------ convergence


def hosts(agent: str = "a", **kw) -> Fact:
    return Fact(FactKind.HOSTS, VID, VmRecord(VID, "web", agent, **kw))


def read(agent: str | None, rev: int = 5, **kw) -> dict[str, Read]:
    return {VID: Read(VID, VmRecord(VID, "web", agent, **kw) if agent else None, rev if agent else 0)}


@pytest.mark.parametrize("fact, record, expect", [
    # the host: creates, keeps, corrects, takes over
    (hosts(), None, Write(VmRecord(VID, "web", "a"), 0, "")),
    (hosts(), "a", None),
    (hosts(state="paused"), "a", Write(VmRecord(VID, "web", "a", state="paused"), 5, "")),
    (hosts(migration=MID), "b", Write(VmRecord(VID, "web", "a", MID), 5, "")),
    # it left: the source points the record at the destination, only if the record names the source
    (Fact(FactKind.GONE_TO, VID, to="b", migration=MID), "a", Write(VmRecord(VID, "web", "b", MID), 5, "")),
    (Fact(FactKind.GONE_TO, VID, to="b", migration=MID), "c", None),
    (Fact(FactKind.GONE_TO, VID, to="b", migration=MID), None, None),
    # the handoff has not decided: nothing
    (Fact(FactKind.IN_DOUBT, VID), "a", None),
    (Fact(FactKind.IN_DOUBT, VID), "b", None),
    (Fact(FactKind.ARRIVING, VID), "b", None),
    (Fact(FactKind.ARRIVING, VID), None, None),
    # not here, nothing known: delete only a record that names this agent
    (None, "a", Remove(VID, 5, "")),
    (None, "b", None),
])
def test_convergence_rules(fact, record, expect):
    conv = Converger("a")
    facts = {VID: fact} if fact is not None else {}
    got = conv.plan(facts, read(record), now=0.0)
    if expect is None:
        assert got == []
    else:
        assert len(got) == 1 and type(got[0]) is type(expect) and got[0].expect == expect.expect
        if isinstance(expect, Write):
            assert got[0].record == expect.record


def test_the_host_keeps_the_migration_id_it_does_not_know():
    conv = Converger("a")
    assert conv.plan({VID: hosts()}, read("a", migration=MID), 0.0) == []


def test_an_unreadable_record_is_replaced_by_the_host_only():
    bad = {VID: Read(VID, None, 9, invalid=True)}
    assert Converger("a").plan({VID: hosts()}, bad, 0.0)[0].expect == 9
    assert Converger("b").plan({}, bad, 0.0) == []


def test_arrivals_from_the_recorded_agent_are_commits_not_conflicts():
    """A VM going back and forth: each arrival replaces the record of the agent it came from."""
    conv = Converger("a")
    for t in range(10):
        fact = Fact(FactKind.HOSTS, VID, VmRecord(VID, "web", "a", f"{t:032x}"), came_from="b")
        acts = conv.plan({VID: fact}, read("b", migration=f"{t + 100:032x}"), now=float(t))
        assert len(acts) == 1 and acts[0].record.migration == f"{t:032x}"
    assert conv.conflicts == set()


def test_two_hosts_of_one_vm_stop_fighting_and_report_it():
    """Only after an operator override forked a VM can two agents both host it."""
    conv = Converger("a")
    writes = 0
    for t in range(10):
        acts = conv.plan({VID: hosts()}, read("b"), now=float(t))
        writes += len(acts)
    assert writes == CONFLICT_LIMIT and conv.conflicts == {VID}
    conv.plan({VID: hosts()}, read("a"), now=11.0)  # the other copy went away: calm again
    assert conv.conflicts == set()


def test_records_that_named_us_are_read_again():
    conv = Converger("a")
    conv.plan({}, read("a"), 0.0)
    assert conv.wanted({}) == [VID]
    conv.done(Remove(VID, 5, ""), ok=True)
    assert conv.wanted({}) == []


# ------------------------------------------------------------------ the gate


def peer(name: str = "b", m: bytes = b"\x01" * 32, static: bytes = b"s" * 32) -> PeerInfo:
    return PeerInfo(name, static, b"k" * 32, m)


def test_gate_refuses_revoked_and_not_allowed_migrations_only():
    changed = []
    gate = PeerGate(frozenset({b"\x01" * 32}), on_change=[lambda: changed.append(1)])
    assert gate.check(peer(), Purpose.MIGRATION) is None
    assert gate.update(Lists(frozenset({"b"}), None, 3))
    assert gate.check(peer(), Purpose.MIGRATION).code is ErrorCode.REVOKED
    assert gate.check(peer(), Purpose.RECOVERY) is None  # settles what is past READY
    assert gate.check(peer("c"), Purpose.MIGRATION) is None
    assert not gate.update(Lists(frozenset({"b"}), None, 4)) and changed == [1]
    gate.update(Lists(frozenset(), frozenset({b"\x02" * 32}), 5))
    assert gate.check(peer(), Purpose.MIGRATION).code is ErrorCode.MEASUREMENT_NOT_ALLOWED
    assert gate.check(peer(m=b"\x02" * 32), Purpose.MIGRATION) is None
    assert gate.handshake_allowlist == {b"\x01" * 32, b"\x02" * 32}


def test_a_revoked_key_is_refused_whatever_name_it_claims():
    gate = PeerGate(frozenset({b"\x01" * 32}))
    gate.update(Lists(frozenset({"b"}), None, 3, 0.0, frozenset({b"s" * 32})))
    assert gate.check(peer("b", static=b"t" * 32), Purpose.MIGRATION).code is ErrorCode.REVOKED
    assert gate.check(peer("renamed"), Purpose.MIGRATION).code is ErrorCode.REVOKED
    assert gate.check(peer("c", static=b"t" * 32), Purpose.MIGRATION) is None



def test_an_empty_cluster_allowlist_allows_no_migration_and_no_cluster_list_leaves_the_agent_s_own():
    """``allowed`` and ``handshake_allowlist`` are properties (mutmut leaves them alone; their
    changes were made by hand): a signed allowlist of no measurements is a list, not its absence."""
    gate = PeerGate(frozenset({b"\x01" * 32}))
    assert gate.allowed == gate.handshake_allowlist == {b"\x01" * 32}  # no cluster list: the agent's own
    gate.update(Lists(frozenset(), frozenset(), 2))
    assert gate.check(peer(), Purpose.MIGRATION).code is ErrorCode.MEASUREMENT_NOT_ALLOWED
    assert gate.handshake_allowlist == {b"\x01" * 32}  # the handshake completes; the gate refuses

# ------------------------------------------------------------------ placement


def cand(name: str, free: int, **kw) -> Candidate:
    return Candidate(name, f"{name}:7400", b"\x01" * 32, free, **kw)


def test_placement_spreads_by_free_memory_and_obeys_policy_and_marks():
    vm = Movable("web", 100 * MiB, "any")
    cs = [cand("b", 300 * MiB), cand("c", 500 * MiB), cand("d", 900 * MiB, draining=True),
          cand("e", 900 * MiB, revoked=True), cand("f", 900 * MiB, allowed=False), cand("g", 900 * MiB,
                                                                                    destination=False)]
    assert place(vm, cs, {}).name == "c"
    assert place(vm, cs, {"c": 450 * MiB}).name == "b"  # what is already on its way counts
    assert place(Movable("web", 100 * MiB, "agents:b"), cs, {}).name == "b"
    assert place(Movable("web", 100 * MiB, "measurements:" + "01" * 32), cs, {}).name == "c"
    assert "policy" in place(Movable("web", 100 * MiB, "none"), cs, {})
    why = place(Movable("big", 600 * MiB, "any"), cs, {})
    assert isinstance(why, str) and "not enough free memory" in why and "draining" in why
    assert place(vm, cs, {}, avoid=frozenset({"c"})).name == "b"
    assert place(vm, [cand("c", 500 * MiB)], {}, avoid=frozenset({"c"})).name == "c"  # no other: try again
    assert place(vm, [], {}) == "no other agent is alive"


def test_drain_plan_limits_retries_timeouts_and_resume():
    opts = DrainOptions(max_cluster=5, max_source=2, per_gib=150.0, progress_timeout=10.0, attempts=2)
    plan = DrainPlan("01" * 8, "a", opts, 0.0)
    here = [Movable(f"v{i}", (i + 1) * 10 * MiB, "any") for i in range(4)] + [Movable("p", MiB, "none"),
                                                                              Movable("d", MiB, "any", in_doubt=True)]
    plan.refresh(here)
    cs = [cand("b", 1 << 30), cand("c", 1 << 30)]
    picks = plan.next(here, cs, room=5)
    assert [n for n, _ in picks] == ["v3", "v2"]  # the largest first, at most max_source
    for n, c in picks:
        plan.began(n, c.name, 0.0)
    assert plan.next(here, cs, room=5) == [] and plan.max_parallel == 2
    plan.progress("v3", 1000, 5.0)
    assert plan.overdue(12.0) == [("v2", "no progress for 10 s")]
    assert plan.overdue(13.0) == []  # asked once
    assert completion_timeout(40 * MiB, opts) == 60.0 and completion_timeout(4 << 30, opts) == 600.0
    assert [n for n, _ in plan.overdue(61.0)] == ["v3"]
    plan.finished("v2", ok=False, error="cancelled")
    assert plan.vms["v2"].state == "waiting" and plan.avoid["v2"] == {picks[1][1].name}
    plan.finished("v3", ok=True, total_ms=5.0, downtime_ms=1.0)
    here = [v for v in here if v.name != "v3"]
    plan.refresh(here)
    plan.next(here, cs, room=1)
    assert plan.vms["d"].state == "waiting" and "in doubt" in plan.vms["d"].error  # the handoff decides first
    status = plan.status(70.0)
    assert status.vms["v3"].state == "moved" and status.state == "running"
    # interrupted here; the agent restarts and resumes the same drain
    again = DrainPlan.resume(plan.id, "a", opts, 100.0, DrainStatus.decode(status.encode()))
    assert again.vms["v3"].state == "moved" and again.vms["v2"].attempts == 1 and again.started == 0.0
    here = [v if v.name != "d" else Movable("d", MiB, "any") for v in here]  # recovered: runs here again
    again.refresh(here)
    while not again.settled:
        for n, c in again.next(here, cs, room=2):
            again.began(n, c.name, 200.0)
        for n in list(again.flying):
            again.finished(n, ok=n != "v2", error="broken")
        here = [v for v in here if v.name not in {k for k, x in again.vms.items() if x.state == "moved"}]
        again.refresh(here)
    st = again.status(300.0)
    assert st.vms["v2"].state == "failed" and st.vms["v2"].attempts == 2 and st.state == "incomplete"
    # a VM that left by a committed migration the plan did not see end (its agent restarted)
    # counts as moved; one that is simply gone does not
    last = DrainPlan.resume(plan.id, "a", opts, 400.0, st)
    last.vms["x"] = DrainVm("waiting", memory=MiB)
    last.vms["y"] = DrainVm("waiting", memory=MiB)
    last.refresh([], left={"x": "c"})
    assert (last.vms["x"].state, last.vms["x"].to, last.vms["y"].state) == ("moved", "c", "gone")
    assert st.vms["v0"].state == st.vms["v1"].state == "moved" and st.vms["p"].state == "unplaceable"


def test_the_drain_line_is_redrawn_within_the_terminal(monkeypatch, capsys):
    """On an 80-column terminal the drain's progress line is redrawn in place: never
    wider than the terminal (a wrapped line scrolled a new line every second)."""
    from types import SimpleNamespace

    from palm_net.cli.cluster import DrainView

    monkeypatch.setenv("COLUMNS", "80")
    view = DrainView("host-with-a-rather-long-name-a", live=True, quiet=False)
    counts = {"moved": 12, "migrating": 2, "waiting": 123, "failed": 0, "unplaceable": 0}
    st = SimpleNamespace(vms={}, counts=lambda: counts)
    for _ in range(3):
        view(st)
    view.done()
    err = capsys.readouterr().err
    assert "\n" not in err
    assert all(len(seg) <= 79 for seg in err.split("\r")), [len(s) for s in err.split("\r")]
