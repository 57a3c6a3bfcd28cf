"""Review of issue 21's change (branch review-21): reproductions of what still breaks.

Each test asserts the promise (exactly one copy, an agent that keeps running) and
FAILS on the reviewed code; the docstring says what happens and why.
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


async def test_cancel_accepted_before_the_handoff_lands_after_it_leaves_the_vm_nowhere(pair):
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
