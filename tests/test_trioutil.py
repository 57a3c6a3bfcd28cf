"""palm_net.trioutil: Changes, the wait for shared state that the operator's abandon
uses (an incoming migration's sessions settled, an outgoing one's copy no longer read)."""

import trio
import trio.testing

from palm_net.trioutil import Changes


async def test_a_wait_on_changes_returns_at_the_change_that_makes_it_true_and_no_sooner():
    changes, state, woke = Changes(), {"n": 0}, []

    async def waiter() -> None:
        await changes.until(lambda: state["n"] >= 2)
        woke.append(state["n"])

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            state["n"] = 1
            changes.changed()
            await trio.testing.wait_all_tasks_blocked()
            assert woke == []  # woken, checked, waiting again
            state["n"] = 2
            changes.changed()
    assert woke == [2]


async def test_a_true_condition_returns_at_once_and_only_a_change_announced_wakes_a_waiter():
    changes, state, woke = Changes(), {"done": True}, []
    with trio.fail_after(1):
        await changes.until(lambda: state["done"])
    state["done"] = False

    async def waiter() -> None:
        await changes.until(lambda: state["done"])
        woke.append(True)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            state["done"] = True  # not announced: no timer polls it
            await trio.sleep(0.05)
            assert woke == []
            changes.changed()
    assert woke == [True]
