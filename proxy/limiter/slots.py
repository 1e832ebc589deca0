"""The limiter's algorithm on one key's state, as plain functions (no I/O, no clock).

The memory backend runs these directly; the Redis backend runs the same steps in Lua
(lua/limiter.lua), and one test suite holds both to the same answers.

Burst: `slots` holds the last N reserved send times, ascending. A request at `now` gets
`now` while fewer than N are kept, else `max(now, slots[-N] + W + pad)`. Every slot is
then at least W after the slot N places before it, so any W-window holds at most N
(the proof sketch: docs/architecture.md, "The limiter").
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from proxy.limiter.base import Day, Decision, Limits, UpstreamCounts
from proxy.typing import LimitedBy


@dataclass(slots=True)
class KeyState:
    """One key's state: reserved slot times (ascending) and today's count."""

    slots: list[float] = field(default_factory=list)
    day_id: str = ""
    day_count: int = 0

    def roll_day(self, day: Day) -> None:
        if self.day_id != day.id:
            self.day_id, self.day_count = day.id, 0


def next_slot(slots: list[float], limits: Limits, now: float) -> float:
    """The earliest time a new request may be sent."""
    if len(slots) < limits.burst:
        return now
    return max(now, slots[-limits.burst] + limits.window_s + limits.pad_s)


def burst_view(slots: list[float], limits: Limits, now: float) -> tuple[int, float]:
    """(requests that could go at `now`, seconds until the next reserved slot frees)."""
    hold = limits.window_s + limits.pad_s
    blocking = [slot for slot in slots[-limits.burst :] if slot + hold > now]
    remaining = limits.burst - len(blocking)
    reset = (blocking[0] + hold - now) if blocking else 0.0
    return max(0, remaining), max(0.0, reset)


def decide(
    state: KeyState, limits: Limits, day: Day, now: float, max_wait_s: float, *, shadow: bool
) -> Decision:
    """Reserve a slot (or refuse), updating `state`. See the module docstring."""
    state.roll_day(day)
    if state.day_count >= limits.daily and not shadow:
        return refusal(state, limits, day, now, "daily", day.ends_in_s)
    slot = next_slot(state.slots, limits, now)
    wait = slot - now
    if wait > max_wait_s and not shadow:
        return refusal(state, limits, day, now, "burst", wait)
    # Shadow mode sends at once, so the slot actually used is `now`.
    record(state, limits, now if shadow else slot)
    state.day_count += 1
    remaining, reset = burst_view(state.slots, limits, now)
    return Decision(
        admitted=True,
        wait_s=wait,
        retry_after_s=0.0,
        limited_by=_would_limit(state, limits, wait, max_wait_s) if shadow else "",
        burst_remaining=remaining,
        burst_reset_s=reset,
        daily_remaining=max(0, limits.daily - state.day_count),
        daily_reset_s=day.ends_in_s,
    )


def _would_limit(state: KeyState, limits: Limits, wait: float, max_wait_s: float) -> LimitedBy:
    if state.day_count > limits.daily:
        return "daily"
    return "burst" if wait > max_wait_s else ""


def refusal(
    state: KeyState,
    limits: Limits,
    day: Day,
    now: float,
    limited_by: LimitedBy,
    retry_after: float,
) -> Decision:
    remaining, reset = burst_view(state.slots, limits, now)
    return Decision(
        admitted=False,
        wait_s=0.0,
        retry_after_s=retry_after,
        limited_by=limited_by,
        burst_remaining=remaining,
        burst_reset_s=reset,
        daily_remaining=max(0, limits.daily - state.day_count),
        daily_reset_s=day.ends_in_s,
    )


def record(state: KeyState, limits: Limits, slot: float) -> None:
    """Keep `slot`, in order, and drop what is older than the last N."""
    bisect.insort(state.slots, slot)
    del state.slots[: -limits.burst]


def observe(
    state: KeyState,
    limits: Limits,
    day: Day,
    now: float,
    counts: UpstreamCounts,
) -> None:
    """Believe the upstream when it says fewer remain than this state thinks.

    Requests the upstream counted that this state does not know of (traffic that bypassed
    the proxy) become slots at `now`, so they hold the window for W from now. `pause` (an
    upstream 429) fills the window at `now`: no slot before now + W + pad.
    """
    burst_remaining = 0 if counts.pause else counts.burst_remaining
    daily_remaining = counts.daily_remaining
    if burst_remaining is not None:
        sent = sum(1 for slot in state.slots if now - limits.window_s < slot <= now)
        counted = limits.burst if counts.pause else (limits.burst - max(0, burst_remaining)) - sent
        unknown = min(limits.burst, counted)
        if unknown > 0:
            state.slots.extend([now] * unknown)
            state.slots.sort()
            del state.slots[: -limits.burst]
    if daily_remaining is not None:
        state.roll_day(day)
        state.day_count = max(state.day_count, limits.daily - max(0, daily_remaining))
