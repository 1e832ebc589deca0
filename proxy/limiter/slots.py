"""The limiter's algorithm on one key's state, as plain functions (no I/O, no clock).

The memory backend runs these directly; the Redis backend runs the same steps in Lua
(lua/limiter.lua), and one test suite holds both to the same answers.

Burst: `slots` holds the reserved send times, ascending: every one still inside its hold
(W + pad), so at least the last N that matter. A request at `now` gets `now` while fewer
than N are kept, else `max(now, slots[-N] + W + pad)`. No W-window then holds more than N
(the proof sketch: docs/architecture.md, "The limiter"). A slot whose request was never
sent (its caller hung up while queued) may be given back (`release`); keeping every slot
still in its hold, not only the last N, is what makes that safe: `slots[-N]` stays the
N-th latest of all slots not given back.
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


def trim(state: KeyState, limits: Limits, now: float) -> None:
    """Drop the slots whose hold is over: they can no longer share a window with a new one."""
    hold = limits.window_s + limits.pad_s
    old = bisect.bisect_right(state.slots, now - hold)
    if old:
        del state.slots[:old]


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
    trim(state, limits, now)
    if state.day_count >= limits.daily and not shadow:
        return refusal(state, limits, day, now, "daily", day.ends_in_s)
    slot = next_slot(state.slots, limits, now)
    wait = slot - now
    if wait > max_wait_s and not shadow:
        return refusal(state, limits, day, now, "burst", wait)
    # Shadow mode sends at once, so the slot actually used is `now`.
    used = now if shadow else slot
    bisect.insort(state.slots, used)
    if shadow:
        # Nothing is ever given back in shadow mode, so the last N are all that matter,
        # and a busy key's list must not grow with every request of a window.
        del state.slots[: -limits.burst]
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
        slot=None if shadow else used,
        queue_end_s=state.slots[-1] - now,
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
        queue_end_s=(state.slots[-1] - now) if state.slots else 0.0,
    )


def release(state: KeyState, slot: float) -> bool:
    """Give back a reserved slot whose request was never sent; False if it is not kept
    (its hold is over, or the state was lost): then there is nothing to give back."""
    at = bisect.bisect_left(state.slots, slot)
    if at < len(state.slots) and state.slots[at] == slot:
        del state.slots[at]
        return True
    return False


def observe(
    state: KeyState,
    limits: Limits,
    day: Day,
    now: float,
    counts: UpstreamCounts,
) -> None:
    """Believe the upstream when it says fewer remain than this state thinks.

    The upstream's remaining counts are read as they are, on its own limits and interval:
    `r` left means at most `r` more until its window moves on. When this state would let
    more than `r` go in the window from `now` (N minus the slots sent in the last W), the
    difference becomes slots at `now` (traffic that bypassed the proxy), holding the window
    for W + pad. `pause` (an upstream 429) fills the window at `now`: no slot before
    now + W + pad. The daily count rises to the limit minus the upstream's remaining.
    """
    if counts.pause:
        fill(state, limits, now, now)
    elif counts.burst_remaining is not None:
        trim(state, limits, now)
        first = bisect.bisect_right(state.slots, now - limits.window_s)
        sent = bisect.bisect_right(state.slots, now) - first
        unknown = min(limits.burst, limits.burst - max(0, counts.burst_remaining) - sent)
        add_at(state, now, unknown)
    if counts.daily_remaining is not None:
        state.roll_day(day)
        state.day_count = max(state.day_count, limits.daily - max(0, counts.daily_remaining))


def fill(state: KeyState, limits: Limits, now: float, at: float) -> None:
    """Make the window full at `at` (now or later): no new slot before at + W + pad.

    Slots already reserved from `at` on count, since what is needed is slots[-N] >= at;
    so filling twice at one time adds nothing the second time.
    """
    trim(state, limits, now)
    ahead = len(state.slots) - bisect.bisect_left(state.slots, at)
    add_at(state, at, limits.burst - ahead)


def add_at(state: KeyState, at: float, count: int) -> None:
    """Put `count` slots at `at`, in order."""
    if count > 0:
        where = bisect.bisect_right(state.slots, at)
        state.slots[where:where] = [at] * count
