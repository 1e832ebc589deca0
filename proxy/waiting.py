"""The requests this process holds until their slots, and what a caller who leaves gives back.

A queued request sleeps until its reserved slot. If its caller hangs up first, the slot
was never used: the requests queued behind it in this process each move up one place
(each takes the slot of the one before it), and the last place is given back to the
limiter, so the next request to arrive, here or at another replica, can have it. Impatient
callers then cost nothing: without this, every abandoned slot stayed spent and the callers
who stayed waited behind requests that were never sent.

Moving up never puts two sends in one slot and never adds a slot, so the limiter's
guarantee (no window of W holds more than N) is unchanged; the give-back itself is safe
because the limiter keeps every slot still inside its hold (limiter/slots.py).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from proxy.limiter.base import Decision
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

GiveBack = Callable[[ResourceKey, Decision], Coroutine[Any, Any, None]]


@dataclass(eq=False)
class _Waiter:
    """One held request: its decision (whose slot may move earlier) and its wake-up."""

    decision: Decision
    wake_at: float  # on the loop's clock
    order: int  # ties in wake_at keep arrival order
    woken: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = None

    @property
    def place(self) -> tuple[float, int]:
        return (self.wake_at, self.order)


class WaitingLine:
    """Holds admitted requests until their slots; gives abandoned slots back."""

    def __init__(self, give_back: GiveBack) -> None:
        self._give_back = give_back
        # The waiters of each key (and limiter: shared or local), in slot order.
        self._lines: dict[tuple[ResourceKey, bool], list[_Waiter]] = {}
        self._orders = itertools.count()
        self._giving_back: set[asyncio.Task[None]] = set()

    async def hold(self, key: ResourceKey, decision: Decision) -> Decision:
        """Sleep until the decision's slot, or an earlier one freed meanwhile; return the
        decision with the slot used. Cancelled (the caller left): the slot is passed on."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            decision, loop.time() + decision.wait_s, next(self._orders), loop.create_future()
        )
        line = self._lines.setdefault((key, decision.local), [])
        bisect.insort(line, waiter, key=lambda w: w.place)
        self._schedule(key, waiter)
        try:
            await waiter.woken
        except asyncio.CancelledError:
            self._leave(key, waiter)
            raise
        return waiter.decision

    def slots(self, key: ResourceKey, *, local: bool = False) -> list[float | None]:
        """The slots held for `key` in this process, earliest first (for tests and status)."""
        line = self._lines.get((key, local))
        return [] if line is None else [w.decision.slot for w in line]

    async def aclose(self) -> None:
        """Wait for the give-backs already started (each is one limiter call)."""
        if self._giving_back:
            await asyncio.gather(*self._giving_back, return_exceptions=True)

    def _schedule(self, key: ResourceKey, waiter: _Waiter) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        loop = asyncio.get_running_loop()
        waiter.timer = loop.call_at(waiter.wake_at, self._wake, key, waiter)

    def _wake(self, key: ResourceKey, waiter: _Waiter) -> None:
        self._remove(key, waiter)
        if not waiter.woken.done():
            waiter.woken.set_result(None)

    def _leave(self, key: ResourceKey, waiter: _Waiter) -> None:
        """The caller of `waiter` left before sending: everyone behind it in this process
        moves up one place, and the last place goes back to the limiter."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        line = self._lines.get((key, waiter.decision.local))
        freed = waiter.decision
        if line is not None and waiter in line:
            behind = line[line.index(waiter) + 1 :]
            self._remove(key, waiter)
            freed = self._move_up(key, waiter, behind)
        self._start_give_back(key, freed)

    def _move_up(self, key: ResourceKey, left: _Waiter, behind: list[_Waiter]) -> Decision:
        """Each of `behind` takes the place of the one before it; returns the decision
        whose place is left free (the last one's, or `left`'s own)."""
        places = [(w.decision, w.wake_at, w.order) for w in (left, *behind)]
        freed = (behind[-1] if behind else left).decision
        for waiter, (place, wake_at, order) in zip(behind, places, strict=False):
            # The place's slot comes with its pad and its time on this clock.
            waiter.decision = dataclasses.replace(
                waiter.decision, slot=place.slot, pad_s=place.pad_s, due_at=place.due_at
            )
            waiter.wake_at, waiter.order = wake_at, order
            self._schedule(key, waiter)
        return freed

    def _remove(self, key: ResourceKey, waiter: _Waiter) -> None:
        line_key = (key, waiter.decision.local)
        line = self._lines.get(line_key)
        if line is None or waiter not in line:
            return
        line.remove(waiter)
        if not line:
            del self._lines[line_key]

    def _start_give_back(self, key: ResourceKey, decision: Decision) -> None:
        if decision.slot is None:
            return
        task = asyncio.get_running_loop().create_task(self._give_back(key, decision))
        self._giving_back.add(task)
        task.add_done_callback(self._given_back)

    def _given_back(self, task: asyncio.Task[None]) -> None:
        self._giving_back.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The slot stays spent: the safe side. Nothing the caller can be told (gone).
            log.info("a slot could not be given back: %s", type(exc).__name__)
