"""The waiting line: a caller who leaves while queued moves everyone behind it up one
place, and the last place goes back to the limiter."""

from __future__ import annotations

import asyncio

import pytest

from proxy.limiter.base import Decision
from proxy.typing import ResourceKey
from proxy.waiting import WaitingLine

KEY = ResourceKey("app", "location", "loc1")
OTHER = ResourceKey("app", "location", "loc2")


def queued(wait_s: float, slot: float, *, local: bool = False) -> Decision:
    return Decision(True, wait_s, 0.0, "", 0, 0.0, 100, 100.0, slot=slot, local=local)


class GivenBack:
    """The give-back callback, recording what it was given."""

    def __init__(self) -> None:
        self.decisions: list[tuple[ResourceKey, Decision]] = []

    async def __call__(self, key: ResourceKey, decision: Decision) -> None:
        self.decisions.append((key, decision))

    @property
    def slots(self) -> list[float | None]:
        return [decision.slot for _, decision in self.decisions]


async def line_up(
    line: WaitingLine, key: ResourceKey, *decisions: Decision
) -> list[asyncio.Task[Decision]]:
    """Each decision held in its own task, all in the line before this returns."""
    tasks = [asyncio.create_task(line.hold(key, d)) for d in decisions]
    # One turn of the loop runs each new task up to its wait in the line; no time passes.
    await asyncio.sleep(0)
    assert len(line.slots(key, local=decisions[0].local)) == len(decisions)
    return tasks


async def leave(task: asyncio.Task[Decision]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_caller_leaving_moves_those_behind_up_and_frees_the_last_place() -> None:
    """A leaves: B takes A's slot, C takes B's, and C's old slot goes back."""
    given = GivenBack()
    line = WaitingLine(given)
    a, b, c = await line_up(line, KEY, queued(60, slot=1), queued(61, slot=2), queued(62, slot=3))
    await leave(a)
    assert line.slots(KEY) == [1, 2]
    await line.aclose()
    assert given.slots == [3]
    for task in (b, c):
        await leave(task)


async def test_the_moved_up_callers_go_at_the_earlier_times_in_order() -> None:
    """After A leaves, B is woken at A's time with A's slot, then C at B's with B's: C
    does not wait out its own (long) wait."""
    given = GivenBack()
    line = WaitingLine(given)
    a, b, c = await line_up(
        line, KEY, queued(0.05, slot=1), queued(0.1, slot=2), queued(3600, slot=3)
    )
    woken: list[str] = []
    b.add_done_callback(lambda _: woken.append("b"))
    c.add_done_callback(lambda _: woken.append("c"))
    await leave(a)
    assert [(await b).slot, (await c).slot] == [1, 2]
    # Timers fire in time order, and each task's callbacks run as it finishes.
    assert woken == ["b", "c"]
    await line.aclose()
    assert given.slots == [3]


async def test_the_last_caller_leaving_gives_its_own_slot_back() -> None:
    """Nobody behind: the leaver's own slot goes back, the others keep theirs."""
    given = GivenBack()
    line = WaitingLine(given)
    a, b = await line_up(line, KEY, queued(60, slot=1), queued(61, slot=2))
    await leave(b)
    await line.aclose()
    assert line.slots(KEY) == [1] and given.slots == [2]
    await leave(a)


async def test_lines_of_other_keys_and_of_the_local_limiter_do_not_mix() -> None:
    """Only waiters of the same key and the same limiter move up: a slot of another key, or
    of the fallback's local limiter (another clock), is never handed across."""
    given = GivenBack()
    line = WaitingLine(given)
    (a,) = await line_up(line, KEY, queued(60, slot=1))
    (other,) = await line_up(line, OTHER, queued(61, slot=2))
    (local,) = await line_up(line, KEY, queued(62, slot=3, local=True))
    await leave(a)
    await line.aclose()
    assert given.decisions == [(KEY, queued(60, slot=1))]
    assert line.slots(OTHER) == [2] and line.slots(KEY, local=True) == [3]
    for task in (other, local):
        await leave(task)
