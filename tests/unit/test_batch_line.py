"""The batch line: one request per key asks at a time, turns weighted by caller."""

from __future__ import annotations

import asyncio

from proxy.batch_line import BatchLine
from proxy.typing import ResourceKey

KEY = ResourceKey("app", "location", "loc1")


async def _take_turns(line: BatchLine, requests: list[tuple[str, int]]) -> list[str]:
    """Queue every request behind a holder, then release: the order turns were given."""
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with line.turn(KEY, "holder", 1):
            await release.wait()

    async def one(caller: str, weight: int) -> None:
        async with line.turn(KEY, caller, weight):
            order.append(caller)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(one(caller, weight)) for caller, weight in requests]
    await asyncio.sleep(0)
    assert line.waiting(KEY) == len(requests)
    release.set()
    await asyncio.gather(first, *tasks)
    return order


async def test_a_caller_with_many_waiting_does_not_make_another_wait_behind_all() -> None:
    line = BatchLine()
    order = await _take_turns(line, [("busy", 1)] * 6 + [("light", 1)] * 2)
    assert order.index("light") <= 1
    assert order[:4].count("light") == 2


async def test_turns_follow_the_weights() -> None:
    line = BatchLine()
    order = await _take_turns(line, [("heavy", 3)] * 12 + [("light", 1)] * 12)
    assert order[:16].count("heavy") == 12  # 3 to 1 while both wait
    assert order[:8].count("heavy") == 6


async def test_a_request_that_leaves_the_line_takes_nothing() -> None:
    line = BatchLine()
    release = asyncio.Event()
    entered: list[str] = []

    async def holder() -> None:
        async with line.turn(KEY, "a", 1):
            await release.wait()

    async def one(name: str) -> None:
        async with line.turn(KEY, name, 1):
            entered.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    leaving = asyncio.create_task(one("leaving"))
    staying = asyncio.create_task(one("staying"))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, staying)
    assert entered == ["staying"] and line.waiting(KEY) == 0
