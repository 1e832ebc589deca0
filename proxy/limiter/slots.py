"""The limiter's algorithm on one key's state, as plain functions (no I/O, no clock).

The memory backend runs these directly; the Redis backend runs the same steps in Lua
(lua/limiter.lua), and one test suite holds both to the same answers.

Burst: `slots` holds, for every request still inside its hold, the latest time it can
have reached the upstream's counter (its "arrival bound"), ascending. A request sent at
`s` with the pad `p` in force is bound by `s + p`: the upstream counts a request when it
arrives, and the pad is how late after the send that can be (docs/architecture.md,
"The limiter"). A new request gets `now` while fewer than N are kept, else
`max(now, slots[-N] + W)`, and is kept as `slot + pad`; its hold is over once
`bound + W <= now`. No W-window at the upstream's counter then holds more than N, as long
as every request arrives within its pad of its send: whatever window (t - W, t] one
takes, a request arriving in it has a bound above t - W, and any N + 1 such bounds would
contradict the spacing. With one pad for all, bounds are sends plus a constant, and this
is the send-time rule "slots[-N] + W + pad" as before. An answer that comes back later
than its bound moves the bound to when it came back (`anchor`): the request surely
arrived before its answer.

A slot whose request was never sent (its caller hung up while queued) may be given back
(`release`); keeping every bound still in its hold, not only the last N, is what makes
that safe: `slots[-N]` stays the N-th latest of all bounds not given back.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

from proxy.limiter.base import Day, Decision, Limits, Probe, UpstreamCounts
from proxy.typing import LimitedBy


@dataclass(slots=True)
class KeyState:
    """One key's state: arrival bounds of the requests in their hold (ascending), today's
    count, until when a probe of a cold key holds the others back, and the key's window
    as last decided (keys may have learned limits of their own)."""

    slots: list[float] = field(default_factory=list)
    day_id: str = ""
    day_count: int = 0
    probe_until: float = 0.0
    window_s: float = 0.0

    def roll_day(self, day: Day) -> None:
        if self.day_id != day.id:
            self.day_id, self.day_count = day.id, 0


def trim(state: KeyState, limits: Limits, now: float) -> None:
    """Drop the bounds whose hold is over: they can no longer share a window with a new one."""
    old = bisect.bisect_right(state.slots, now - limits.window_s)
    if old:
        del state.slots[:old]


def next_slot(slots: list[float], limits: Limits, now: float) -> float:
    """The earliest time a new request may be sent."""
    if len(slots) < limits.burst:
        return now
    return max(now, slots[-limits.burst] + limits.window_s)


def burst_view(slots: list[float], limits: Limits, now: float) -> tuple[int, float]:
    """(requests that could go at `now`, seconds until the next reserved slot frees)."""
    window = limits.window_s
    blocking = [bound for bound in slots[-limits.burst :] if bound + window > now]
    remaining = limits.burst - len(blocking)
    reset = (blocking[0] + window - now) if blocking else 0.0
    return max(0, remaining), max(0.0, reset)


def decide(
    state: KeyState,
    limits: Limits,
    day: Day,
    now: float,
    max_wait_s: float,
    *,
    shadow: bool,
    probe_s: float = 0.0,
    headroom: int = 0,
    reserve: int = 0,
) -> Decision:
    """Reserve a slot (or refuse), updating `state`. See the module docstring.

    `probe_s` > 0 probes cold keys: the first request to a key with nothing in its hold
    goes alone (`Decision.probe == "this"`), and until its answer clears the probe
    (`end_probe`), or `probe_s` passes, the others are told to ask again
    (`probe == "other"`): traffic the proxy never saw may fill the window, and that
    answer's counts say so. `headroom` > 0 decides as if the limit were that many
    fewer, and `reserve` refuses once only that many requests of the day remain (batch
    requests leave those to interactive ones).
    """
    state.roll_day(day)
    trim(state, limits, now)
    if state.day_count >= limits.daily - reserve and not shadow:
        return refusal(state, limits, day, now, "daily", day.ends_in_s)
    probe: Probe = ""
    if probe_s > 0 and not shadow:
        if state.probe_until > now:
            return refusal(state, limits, day, now, "burst", state.probe_until - now, "other")
        if not state.slots:
            probe, state.probe_until = "this", now + probe_s
    slot = next_slot(state.slots, _less(limits, headroom) if headroom else limits, now)
    wait = slot - now
    if wait > max_wait_s and not shadow:
        state.probe_until = 0.0 if probe else state.probe_until
        return refusal(state, limits, day, now, "burst", wait)
    # Shadow mode sends at once, so the slot actually used is `now`.
    used = (now if shadow else slot) + limits.pad_s
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
        queue_end_s=state.slots[-1] - limits.pad_s - now,
        probe=probe,
        pad_s=limits.pad_s,
        limits=limits,
    )


def _less(limits: Limits, headroom: int) -> Limits:
    return dataclasses.replace(limits, burst=max(1, limits.burst - headroom))


def end_probe(state: KeyState) -> None:
    """The probe's answer is known (and applied): the others may go."""
    state.probe_until = 0.0


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
    probe: Probe = "",
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
        queue_end_s=(state.slots[-1] - limits.pad_s - now) if state.slots else 0.0,
        probe=probe,
    )


def release(state: KeyState, slot: float) -> bool:
    """Give back a reserved slot (its bound, as Decision.slot says it) whose request was
    never sent; False if it is not kept (its hold is over, or the state was lost)."""
    at = bisect.bisect_left(state.slots, slot)
    if at < len(state.slots) and state.slots[at] == slot:
        del state.slots[at]
        return True
    return False


def anchor(state: KeyState, limits: Limits, now: float, bound: float, answered_at: float) -> None:
    """Move a request's bound to when its answer came back, when that is later: it may
    have reached the counter that late (its pad was too short). A bound whose hold is
    already over is added again if the answer's is not."""
    if answered_at <= bound:
        return
    if release(state, bound) or answered_at + limits.window_s > now:
        bisect.insort(state.slots, answered_at)


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
    difference becomes slots sent at `now` (traffic that bypassed the proxy), holding the
    window for W + pad. `pause` (an upstream 429) fills the window at `now`: no slot
    before now + W + pad. The daily count rises to the limit minus the upstream's remaining.
    """
    if counts.pause:
        fill(state, limits, now, now)
    elif counts.burst_remaining is not None:
        trim(state, limits, now)
        # Ours that may be in the upstream's window now: sent by now (bound at most
        # now + pad) and not surely arrived before now - W (bound after it).
        pad = limits.pad_s
        first = bisect.bisect_right(state.slots, now - limits.window_s)
        sent = bisect.bisect_right(state.slots, now + pad) - first
        unknown = min(limits.burst, limits.burst - max(0, counts.burst_remaining) - sent)
        add_at(state, now + pad, unknown)
    if counts.daily_remaining is not None:
        state.roll_day(day)
        state.day_count = max(state.day_count, limits.daily - max(0, counts.daily_remaining))


def fill(state: KeyState, limits: Limits, now: float, at: float) -> None:
    """Make the window full at `at` (now or later): no new slot before at + W + pad.

    Bounds from `at + pad` on count, since what is needed is slots[-N] >= at + pad; so
    filling twice at one time adds nothing the second time.
    """
    trim(state, limits, now)
    bound = at + limits.pad_s
    ahead = len(state.slots) - bisect.bisect_left(state.slots, bound)
    add_at(state, bound, limits.burst - ahead)


def add_at(state: KeyState, at: float, count: int) -> None:
    """Put `count` slots at `at`, in order."""
    if count > 0:
        where = bisect.bisect_right(state.slots, at)
        state.slots[where:where] = [at] * count
