"""Small trio helpers shared by the shells."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import trio


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from _leaves(e)
    else:
        yield exc


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first exception of a nursery's group, nested groups included, that is not
    a cancellation (None: there is none)."""
    return next((e for e in _leaves(group) if not isinstance(e, trio.Cancelled)), None)


@contextlib.contextmanager
def single_error() -> Iterator[None]:
    """Re-raises the first meaningful exception of a nursery's group on its own."""
    try:
        yield
    except BaseExceptionGroup as group:
        first = first_error(group)
        if first is None:
            raise
        raise first from first.__cause__


class ConflictDetector:
    """Detects two tasks using one resource at once (after trio's own, which is
    private): ``with detector:`` raises trio.BusyResourceError instead of
    letting them interleave."""

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *_: object) -> None:
        self._held = False


class Changes:
    """Tasks waiting until a condition on shared state holds, woken by whoever changes
    that state (``changed``), instead of polling it on a timer."""

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()

    def changed(self) -> None:
        self._lot.unpark_all()

    async def until(self, done: Callable[[], bool]) -> None:
        """Returns once ``done()`` is true; it is checked at once and after each change.
        (No checkpoint between the check and the wait: no change is missed.)"""
        while not done():
            await self._lot.park()
