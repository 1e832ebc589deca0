"""Batch requests of this process waiting to ask the limiter for a slot, one key at a time.

Interactive requests take the earliest free slot as soon as they arrive. Batch requests
must leave them room, so a batch request never reserves a slot far ahead: only the first
in line for a key asks the limiter (for a slot free now, paced W/N apart; admission.py),
and the others wait here for their turn. The turn goes to callers in proportion to their
`weight` (start-time fair queueing: each request gets a virtual start, the caller's
previous finish or the line's clock if later, and a finish 1/weight later; the lowest
start goes first), so a caller with 200 requests waiting does not make one with 2 wait
behind all of them.

The holder may have the turn pass on only some time after it (admission spaces batch slots
W/N apart: slots taken in a bunch would end their holds in a bunch too, and the one slot
left to interactive requests would come back once a window instead of all through it). A
request waits for its turn no longer than it may wait at all; past that it leaves the line
and goes on without the turn.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
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


@dataclass
class Turn:
    """What the block of `BatchLine.turn` gets: whether it holds the key's turn (False: its
    wait ran out first), and how long after the block the turn passes on (the holder sets it)."""

    held: bool
    pass_on_after_s: float = 0.0


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
    async def turn(
        self, key: ResourceKey, caller: str, weight: int, wait_s: float = math.inf
    ) -> AsyncIterator[Turn]:
        """Wait for this request's turn on `key`, hold it for the block, then pass it on
        (`Turn.pass_on_after_s` after the block). If `wait_s` passes first, the request
        leaves the line and the block runs without the turn. A request cancelled while
        waiting leaves the line and takes nothing."""
        line = self._lines.setdefault(key, _KeyLine())
        if line.busy and wait_s <= 0:
            yield Turn(held=False)
            return
        start = max(line.clock, line.finishes.get(caller, 0.0))
        line.finishes[caller] = start + 1 / weight
        if line.busy:
            mine = _Turn(start, next(self._orders), asyncio.get_running_loop().create_future())
            if not await self._wait(key, line, mine, wait_s):
                yield Turn(held=False)
                return
        line.busy = True
        line.clock = max(line.clock, start)
        turn = Turn(held=True)
        try:
            yield turn
        finally:
            if turn.pass_on_after_s > 0:
                asyncio.get_running_loop().call_later(
                    turn.pass_on_after_s, self._pass_on, key, line
                )
            else:
                self._pass_on(key, line)

    async def _wait(self, key: ResourceKey, line: _KeyLine, mine: _Turn, wait_s: float) -> bool:
        """Wait in line for the turn: True once given, False if `wait_s` passed first."""
        heapq.heappush(line.waiting, mine)
        try:
            async with asyncio.timeout(None if math.isinf(wait_s) else wait_s):
                await mine.ready
        except TimeoutError:
            self._leave(key, line, mine)
            return False
        except asyncio.CancelledError:
            self._leave(key, line, mine)
            raise
        return True

    def _leave(self, key: ResourceKey, line: _KeyLine, mine: _Turn) -> None:
        if mine.ready.done() and not mine.ready.cancelled():
            # The turn was given just as the caller left: give it to the next one.
            self._pass_on(key, line)
            return
        # Not there if a turn passed on meanwhile skipped it (its wait was already over).
        if mine in line.waiting:
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
