"""The limiter's algorithm on one key's state, as plain functions (no I/O, no clock).

The memory backend runs these directly; the Redis backend runs the same steps in Lua
(lua/limiter.lua), on the same representation, and one test suite holds both to the
same answers.

Burst: the state keeps, for every request still inside its hold, the latest time it can
have reached the upstream's counter (its "arrival bound"). A request sent at `s` with the
pad `p` in force is bound by `s + p`: the upstream counts a request when it arrives, and
the pad is how late after the send that can be (docs/architecture.md, "The limiter"). A
new request gets `now` while fewer than N are kept, else `max(now, N-th latest + W)`, and
is kept as `slot + pad`; its hold is over once `bound + W <= now`. No W-window at the
upstream's counter then holds more than N, as long as every request arrives within its
pad of its send: whatever window (t - W, t] one takes, a request arriving in it has a
bound above t - W, and any N + 1 such bounds would contradict the spacing. With one pad
for all, bounds are sends plus a constant, and this is the send-time rule
"N-th latest + W + pad". An answer that comes back later than its bound moves the bound
to when it came back (`anchor`): the request surely arrived before its answer.

A slot whose request was never sent (its caller hung up while queued) may be given back
(`release`); keeping every bound still in its hold, not only the last N, is what makes
that safe: the N-th latest stays the N-th latest of all bounds not given back.

Two kinds of entries, so that no step costs more than O(G log N) in Redis:

- `slots`, the singles: the proxy's own requests, one bound each, ascending (a sorted
  ZSET in Redis), each named by its bound for `release` and `anchor`.
- `groups`, at most GROUPS of them: entries nobody will name, the traffic the upstream's
  counts reveal (`observe`) and the fill of an upstream 429 (`fill`), as (bound, count,
  since) with distinct bounds: `count` entries at `bound`. Adding a group at the bound of
  one adds to it; adding one more than GROUPS merges two neighbours into one at the later
  bound with the summed count (capped at N).

Merging is safe because it only ever moves entries later and never drops one: the state
after a merge holds, for every d, a d-th latest entry at least as late as before, so
every later slot is at least as late and the spacing argument above still holds; the
cap drops only entries past the N-th, which no decision reads (a decision reads at most
the N-th latest, and a group of N already fills a window). The pair merged is the one
whose merged group spans least, from the earliest bound it holds (`since`) to its bound:
merging always the two earliest would let one group absorb every revealed request while
reveals keep coming, its bound moving forward and its count stuck at N, a full window
held for ever. With the narrowest pair groups stay narrow (reveals coming in time order,
none spanned more than a quarter of W + pad in simulation), and an entry is held at most
its group's span past its own bound.

The d-th latest over both (`latest`): walking the groups from the latest, with `passed`
the entries of the groups already passed and `s` the singles later than the group's
bound, the answer is a single while `s + passed >= d`, this group's bound once its count
reaches d, and otherwise the walk goes on; past every group it is the (d - passed)-th
latest single. One count of singles per group: O(G log N) (lua/limiter.lua finds the same
group by a binary search, in at most four counts).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from dataclasses import dataclass, field

from proxy.limiter.base import Day, Decision, Limits, Probe, UpstreamCounts
from proxy.typing import LimitedBy

# Groups kept at most: each decision counts singles once per group (lua/limiter.lua).
GROUPS = 8


@dataclass(frozen=True, slots=True)
class Group:
    """`count` entries whose arrival bound is `bound`; `since` is the earliest bound merged
    into it (what its entries were before they were moved later)."""

    bound: float
    count: int
    since: float


@dataclass(slots=True)
class KeyState:
    """One key's state: the arrival bounds of its own requests in their hold (ascending),
    the groups of entries the upstream revealed (ascending by bound, at most GROUPS),
    today's count, until when a probe of a cold key holds the others back, and the key's
    window as last decided (keys may have learned limits of their own)."""

    slots: list[float] = field(default_factory=list)
    # A tuple, rebuilt on change: most keys never have a group, and () costs nothing.
    groups: tuple[Group, ...] = ()
    day_id: str = ""
    day_count: int = 0
    probe_until: float = 0.0
    window_s: float = 0.0

    def roll_day(self, day: Day) -> None:
        if self.day_id != day.id:
            self.day_id, self.day_count = day.id, 0


def trim(state: KeyState, limits: Limits, now: float) -> None:
    """Drop the bounds whose hold is over: they can no longer share a window with a new one."""
    cut = now - limits.window_s
    old = bisect.bisect_right(state.slots, cut)
    if old:
        del state.slots[:old]
    if state.groups and state.groups[0].bound <= cut:
        state.groups = tuple(group for group in state.groups if group.bound > cut)


def held(state: KeyState) -> int:
    """How many entries are kept, singles and groups."""
    return len(state.slots) + sum(group.count for group in state.groups)


def latest(state: KeyState, d: int) -> float | None:
    """The d-th latest entry's bound (d >= 1), None when fewer than d are kept."""
    singles = state.slots
    passed = 0
    for group in reversed(state.groups):
        later = len(singles) - bisect.bisect_right(singles, group.bound)
        if later + passed >= d:
            return singles[passed - d]
        if later + passed + group.count >= d:
            return group.bound
        passed += group.count
    return singles[passed - d] if len(singles) >= d - passed else None


def last_bound(state: KeyState) -> float | None:
    """The latest bound kept, None when nothing is."""
    ends = state.slots[-1:]
    if state.groups:
        ends = [*ends, state.groups[-1].bound]
    return max(ends, default=None)


def entries(state: KeyState) -> list[float]:
    """Every entry's bound, a group's once per entry, ascending."""
    bounds = list(state.slots)
    for group in state.groups:
        bounds += [group.bound] * group.count
    return sorted(bounds)


def next_slot(state: KeyState, limits: Limits, now: float) -> float:
    """The earliest time a new request may be sent."""
    nth = latest(state, limits.burst)
    return now if nth is None else max(now, nth + limits.window_s)


def burst_view(state: KeyState, limits: Limits, now: float) -> tuple[int, float]:
    """(requests that could go at `now`, seconds until the next reserved slot frees).

    Called after `trim`, so every entry kept blocks; the first to free among the N
    latest is the N-th latest, or the earliest when fewer are kept."""
    count = held(state)
    if not count:
        return limits.burst, 0.0
    first = latest(state, min(count, limits.burst))
    assert first is not None  # min(count, N) <= count entries are kept
    return max(0, limits.burst - count), max(0.0, first + limits.window_s - now)


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
        if not state.slots and not state.groups:
            probe, state.probe_until = "this", now + probe_s
    slot = next_slot(state, _less(limits, headroom) if headroom else limits, now)
    wait = slot - now
    if wait > max_wait_s and not shadow:
        state.probe_until = 0.0 if probe else state.probe_until
        return refusal(state, limits, day, now, "burst", wait)
    # Shadow mode sends at once, so the slot actually used is `now`.
    used = (now if shadow else slot) + limits.pad_s
    bisect.insort(state.slots, used)
    if shadow:
        # Nothing is ever given back in shadow mode, so the last N singles are all that
        # matter (no d-th latest with d <= N reads past them), and a busy key's list must
        # not grow with every request of a window.
        del state.slots[: -limits.burst]
    state.day_count += 1
    remaining, reset = burst_view(state, limits, now)
    last = last_bound(state)
    assert last is not None  # `used` was just kept
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
        queue_end_s=last - limits.pad_s - now,
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
    remaining, reset = burst_view(state, limits, now)
    last = last_bound(state)
    return Decision(
        admitted=False,
        wait_s=0.0,
        retry_after_s=retry_after,
        limited_by=limited_by,
        burst_remaining=remaining,
        burst_reset_s=reset,
        daily_remaining=max(0, limits.daily - state.day_count),
        daily_reset_s=day.ends_in_s,
        queue_end_s=0.0 if last is None else last - limits.pad_s - now,
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
) -> int:
    """Believe the upstream when it says fewer remain than this state thinks; returns how
    many entries it added.

    The upstream's remaining counts are read as they are, on its own limits and interval:
    `r` left means at most `r` more until its window moves on. When this state would let
    more than `r` go in the window from `now` (N minus the entries sent in the last W),
    the difference becomes one group at `now` + pad (traffic that bypassed the proxy),
    holding the window for W + pad. `pause` (an upstream 429) fills the window at `now`:
    no slot before now + W + pad. The daily count rises to the limit minus the upstream's
    remaining.
    """
    added = 0
    if counts.pause:
        added = fill(state, limits, now, now)
    elif counts.burst_remaining is not None:
        trim(state, limits, now)
        # Ours that may be in the upstream's window now: sent by now (bound at most
        # now + pad) and not surely arrived before now - W (bound after it).
        low, high = now - limits.window_s, now + limits.pad_s
        sent = bisect.bisect_right(state.slots, high) - bisect.bisect_right(state.slots, low)
        sent += sum(group.count for group in state.groups if low < group.bound <= high)
        unknown = min(limits.burst, limits.burst - max(0, counts.burst_remaining) - sent)
        added = add_group(state, limits, high, unknown)
    if counts.daily_remaining is not None:
        state.roll_day(day)
        state.day_count = max(state.day_count, limits.daily - max(0, counts.daily_remaining))
    return added


def fill(state: KeyState, limits: Limits, now: float, at: float) -> int:
    """Make the window full at `at` (now or later): no new slot before at + W + pad.
    Returns how many entries it added.

    Entries from `at + pad` on count, since what is needed is an N-th latest at or after
    `at + pad`; so filling twice at one time adds nothing the second time.
    """
    trim(state, limits, now)
    bound = at + limits.pad_s
    ahead = len(state.slots) - bisect.bisect_left(state.slots, bound)
    ahead += sum(group.count for group in state.groups if group.bound >= bound)
    return add_group(state, limits, bound, limits.burst - ahead)


def add_group(state: KeyState, limits: Limits, bound: float, count: int) -> int:
    """Put `count` entries at `bound`, as a group (see the module docstring); returns
    `count`, or 0 when it is not positive."""
    if count <= 0:
        return 0
    cap = limits.burst
    groups = list(state.groups)
    bounds = [group.bound for group in groups]
    at = bisect.bisect_left(bounds, bound)
    if at < len(groups) and bounds[at] == bound:
        old = groups[at]
        groups[at] = dataclasses.replace(old, count=min(cap, old.count + count))
    else:
        groups.insert(at, Group(bound, min(cap, count), bound))
        if len(groups) > GROUPS:
            _merge_narrowest(groups, cap)
    state.groups = tuple(groups)
    return count


def _merge_narrowest(groups: list[Group], cap: int) -> None:
    """Merge the neighbours whose merged group spans least (the earlier pair on a tie)
    into one at the later bound: its entries move later, none is lost."""
    spans = [
        later.bound - min(earlier.since, later.since)
        for earlier, later in itertools.pairwise(groups)
    ]
    i = spans.index(min(spans))
    earlier, later = groups[i], groups[i + 1]
    groups[i : i + 2] = [
        Group(later.bound, min(cap, earlier.count + later.count), min(earlier.since, later.since))
    ]
