"""Batch requests of this process waiting to ask the limiter for a slot, one key at a time.

Interactive requests take the earliest free slot as soon as they arrive. Batch requests
must leave them room, so a batch request never reserves a slot far ahead: only the first
in line for a key asks the limiter (for a slot free now, paced W/N apart; admission.py),
and the others wait here for their turn. The turn goes to callers in proportion to their
`weight` (start-time fair queueing: each request gets a virtual start, the caller's
previous finish or the line's clock if later, and a finish 1/weight later; the lowest
start goes first), so a caller with 200 requests waiting does not make one with 2 wait
behind all of them.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from proxy.typing import ResourceKey


@dataclass(order=True)
class _Turn:
    start: float
    order: int
    ready: asyncio.Future[None] = field(compare=False)


@dataclass
class _KeyLine:
    """One key's line: who waits, the virtual clock, each caller's last finish."""

    waiting: list[_Turn] = field(default_factory=list)
    busy: bool = False  # someone has the turn
    clock: float = 0.0
    finishes: dict[str, float] = field(default_factory=dict)


class BatchLine:
    """Per key, at most one batch request of this process asks the limiter at a time."""

    def __init__(self) -> None:
        self._lines: dict[ResourceKey, _KeyLine] = {}
        self._orders = itertools.count()

    def waiting(self, key: ResourceKey) -> int:
        """Batch requests waiting for their turn on `key` (not the one that has it)."""
        line = self._lines.get(key)
        return 0 if line is None else len(line.waiting)

    @asynccontextmanager
    async def turn(self, key: ResourceKey, caller: str, weight: int) -> AsyncIterator[None]:
        """Wait for this request's turn on `key`, hold it for the block, then pass it on.
        A request cancelled while waiting leaves the line and takes nothing."""
        line = self._lines.setdefault(key, _KeyLine())
        start = max(line.clock, line.finishes.get(caller, 0.0))
        line.finishes[caller] = start + 1 / weight
        if line.busy:
            mine = _Turn(start, next(self._orders), asyncio.get_running_loop().create_future())
            heapq.heappush(line.waiting, mine)
            try:
                await mine.ready
            except asyncio.CancelledError:
                self._leave(key, line, mine)
                raise
        line.busy = True
        line.clock = max(line.clock, start)
        try:
            yield
        finally:
            self._pass_on(key, line)

    def _leave(self, key: ResourceKey, line: _KeyLine, mine: _Turn) -> None:
        if mine.ready.done() and not mine.ready.cancelled():
            # The turn was given just as the caller left: give it to the next one.
            self._pass_on(key, line)
            return
        line.waiting.remove(mine)
        heapq.heapify(line.waiting)

    def _pass_on(self, key: ResourceKey, line: _KeyLine) -> None:
        while line.waiting:
            following = heapq.heappop(line.waiting)
            if not following.ready.done():
                following.ready.set_result(None)
                return
        line.busy = False
        del self._lines[key]  # nobody waits: the line's clock and finishes start afresh
