"""Post-copy (proto 7.9) between two in-process agents over loopback TCP: a guest that
writes faster than pre-copy converges, the link cut and the destination agent stopped
at 10%, 50% and 90% of the serving phase, each followed by recovery: one copy, every
page verified, the memory the migration wrote equal to the source's at the switch."""

from __future__ import annotations

import pytest
import trio

from palm_net.agent.errors import AgentError
from palm_net.migration import postcopy
from palm_net.migration.params import MigrationParams
from palm_net.testing.proxy import FaultProxy, Rule, sealed

RUNNING = sealed("RUNNING", {"timings": bytes(8)})
HOT = "random:50000"  # pages a second: the 8 MiB guest's whole memory every 40 ms
POSTCOPY = MigrationParams(postcopy=True, postcopy_after=2, verify_digest=True)


def _one_copy(cluster, where: str) -> None:
    assert cluster.running_copies("vm1") == [where]
    vm = cluster[where].vms["vm1"]
    assert vm.verify().ok and vm.postcopy_state() is None


async def _settled(cluster, mid: bytes, seconds: float = 20) -> None:
    with trio.fail_after(seconds):
        while (cluster["a"].store.state_of(mid) != "done" or cluster["b"].store.state_of(mid) != "committed"
               or "vm1" in cluster["a"].vms):
            await trio.sleep(0.02)


async def test_a_guest_pre_copy_cannot_converge_on_migrates_by_post_copy(cluster):
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, protected=2, workload=HOT, seed=3, fill="random")
    await trio.sleep(0.2)
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), POSTCOPY)
    assert res.ok, res.error
    st = res.stats
    assert st.stop_reason == "postcopy" and st.postcopy_pages and st.served_pages == st.postcopy_pages
    assert st.digest_at_pause == "equal"  # what the migration wrote there = this copy at the switch
    assert res.as_dict()["digest_verified"]
    _one_copy(cluster, "b")
    assert a.store.state_of(res.mid) == "done" and cluster["b"].store.state_of(res.mid) == "committed"
    assert st.fetched_pages > 0  # the destination's guest touched pages before they came, and asked
    with trio.fail_after(5):  # the guest runs on at the destination
        while cluster["b"].vms["vm1"].workload is None or cluster["b"].vms["vm1"].workload.writes < 100:
            await trio.sleep(0.02)



async def until_pulled(agent, name: str, at: float) -> None:
    """Returns once ``agent``'s post-copy VM ``name`` runs and has taken ``at`` of the pages
    it missed at first (polled: the pages arrive in the agent's own tasks)."""
    total = 0
    with trio.fail_after(20):
        while True:
            vm = agent.vms.get(name)
            state = vm.postcopy_state() if vm is not None and vm.state == "running" else None
            if state is not None:
                total = total or len(state[1])
                if len(state[1]) <= (1 - at) * total:
                    return
            await trio.sleep(0.002)

@pytest.mark.parametrize("at", [pytest.param(0.1, marks=pytest.mark.faults), 0.5,
                                pytest.param(0.9, marks=pytest.mark.faults)])  # (10%, 90%: the fault tier)
async def test_the_link_cut_while_serving_is_recovered(cluster, at, monkeypatch):
    """The link cut after ``at`` of the serving phase's records: the source stays SERVING,
    the destination PULLING with its VM running; recovery serves the rest."""
    cluster.members["a"].config.in_doubt_wait = 30.0
    monkeypatch.setattr(postcopy, "SERVE_BULK", postcopy.SERVE_SLICE)  # served in small steps: the cut lands
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, protected=2, workload=HOT, seed=4, fill="random")
    await trio.sleep(0.2)
    serving = {"on": False, "frames": 0, "cut": 0}

    def after(_: int, frame: bytes) -> bool:
        if serving["on"]:
            serving["frames"] += 1
        return serving["on"] and serving["frames"] >= serving["cut"]

    def running() -> None:  # the switch: the cut falls at ``at`` of the records of what it left
        serving["on"] = True
        state = cluster["b"].vms["vm1"].postcopy_state()
        serving["cut"] = max(1, int(at * len(state[1]) / 64 * 6))  # 64 pages: a PAGES and 5 data records


    proxy = FaultProxy(("127.0.0.1", cluster.members["b"].port),
                       [Rule("s2c", 0, "call", match=RUNNING, callback=running),
                        Rule("c2s", 0, "cut", match=after)])
    await cluster.nursery.start(proxy.serve)
    res = await a.outgoing.migrate("vm1", f"127.0.0.1:{proxy.port}",
                                   MigrationParams(postcopy=True, postcopy_after=2, bandwidth=16 << 20))
    assert proxy.cut_event.is_set() and res.stats.stop_reason == "postcopy"
    await _settled(cluster, res.mid)
    _one_copy(cluster, "b")


@pytest.mark.parametrize("at", [pytest.param(0.1, marks=pytest.mark.faults), 0.5,
                                pytest.param(0.9, marks=pytest.mark.faults)])  # (10%, 90%: the fault tier)
async def test_the_destination_agent_stopped_while_serving_is_recovered(cluster, at, monkeypatch):
    """The destination agent stopped once ``at`` of the missing pages arrived, then started
    again: its VM runs on (PULLING, reopened from disk), the source reconnects and serves
    what is still missing."""
    cluster.members["a"].config.in_doubt_wait = 0.5
    monkeypatch.setattr(postcopy, "SERVE_BULK", postcopy.SERVE_SLICE)  # served in small steps: the stop lands
    a = cluster["a"]
    a.registry.create_model("vm1", 8 << 20, protected=2, workload=HOT, seed=5, fill="random")
    await trio.sleep(0.2)
    params = MigrationParams(postcopy=True, postcopy_after=2, bandwidth=16 << 20)
    res = None

    async def migrate() -> None:
        nonlocal res
        res = await a.outgoing.migrate("vm1", cluster.addr("b"), params)

    async with trio.open_nursery() as n:
        n.start_soon(migrate)
        await until_pulled(cluster["b"], "vm1", at)
        await cluster.stop("b")
        b = await cluster.start("b")
        vm = b.vms["vm1"]
        if vm.missing_count():  # (recovery may already be done) a VM still pulling is no operator's to move
            with pytest.raises(AgentError, match="still receives"):
                b.registry.operable("vm1")
    assert res is not None
    await _settled(cluster, res.mid, 30)
    _one_copy(cluster, "b")


async def test_a_vm_created_without_post_copy_is_refused_it_here_and_after_a_migration(cluster):
    a, b = cluster["a"], cluster["b"]
    a.registry.create_model("vm1", 1 << 20, protected=1, postcopy=False)
    with pytest.raises(AgentError, match="--no-postcopy"):
        await a.outgoing.migrate("vm1", cluster.addr("b"), POSTCOPY)
    assert cluster.running_copies("vm1") == ["a"]
    res = await a.outgoing.migrate("vm1", cluster.addr("b"), MigrationParams())  # pre-copy: fine
    assert res.ok and not b.vms["vm1"].postcopy_allowed  # (CPU_STATE carried the choice)
    with pytest.raises(AgentError, match="--no-postcopy"):
        await b.outgoing.migrate("vm1", cluster.addr("a"), POSTCOPY)


async def test_an_override_never_resumes_a_serving_copy(cluster):
    """`palm migrate --resolve ID --override` on a post-copy migration being served: refused
    (the VM ran on the destination; this copy only holds pages it still needs)."""
    import os

    from palm_net.migration.handoff import Peer
    from palm_net.wire.protocol import Role
    a = cluster["a"]
    mid = os.urandom(16)
    a.store._open(mid, Role.SOURCE, "vmx", bytes(16), Peer("b", bytes(32), bytes(32), "127.0.0.1:9"))
    assert a.store.hand_off(mid) and a.store.serve(mid)
    with pytest.raises(AgentError, match="no override"):
        await a.outgoing.resolve(mid.hex(), override=True, reason="operator")
    assert a.store.state_of(mid) == "serving"
