"""The in-process limiter: the embedded default, and the fallback when Redis is down.

One dict of key states guarded by the event loop (each decision runs without awaiting,
so it is atomic in this process). Idle keys are swept so that 10,000 resources that went
quiet do not stay in memory forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.limiter import slots
from proxy.limiter.base import Day, Decision, LimitKey, Limits, UpstreamCounts

SWEEP_EVERY = 10_000


class MemoryLimiter:
    """The limiter algorithm over a dict, on this process's clock."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._states: dict[LimitKey, slots.KeyState] = {}
        self._decisions = 0

    async def acquire(
        self, key: LimitKey, limits: Limits, day: Day, max_wait_s: float, *, shadow: bool = False
    ) -> Decision:
        now = self._clock()
        self._maybe_sweep(now, limits, day)
        state = self._states.setdefault(key, slots.KeyState())
        return slots.decide(state, limits, day, now, max_wait_s, shadow=shadow)

    async def observe(
        self,
        key: LimitKey,
        limits: Limits,
        day: Day,
        counts: UpstreamCounts,
    ) -> None:
        state = self._states.setdefault(key, slots.KeyState())
        slots.observe(state, limits, day, self._clock(), counts)

    async def close(self) -> None:
        self._states.clear()

    @property
    def active_keys(self) -> int:
        return len(self._states)

    def _maybe_sweep(self, now: float, limits: Limits, day: Day) -> None:
        """Every SWEEP_EVERY decisions, drop keys that hold nothing worth keeping.

        A key holds nothing when no slot of it is in the last window and it has no count
        for today (a key with a count must keep it, or its daily limit would reset).
        """
        self._decisions += 1
        if self._decisions % SWEEP_EVERY:
            return
        hold = limits.window_s + limits.pad_s
        idle = [
            key
            for key, state in self._states.items()
            if (not state.slots or state.slots[-1] + hold < now)
            and (state.day_id != day.id or state.day_count == 0)
        ]
        for key in idle:
            del self._states[key]
