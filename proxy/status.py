"""What this process knows of each resource it served, for `/status` and `/status.json`.

The limiter's shared state lives in Redis; this board is the local view: the last
decision's remaining counts, requests held right now, the upstream's last five `X-RateLimit-*`
headers, the key's effective limits (configured, or learned from those headers: the
admission sets them), and its daily budget.

The daily budget: today's count is the key's daily limit less the last decision's daily
remaining (the shared count, so every replica's requests are in it). A resource is near
its limit when that count is 80% of the limit or more (Envoy ratelimit's `near_limit`).
The projection for the end of the limit day is the count plus the current rate times the
time left. The rate is an exponentially weighted average of the count's rise with a
five-minute time constant (as a load average is): the last five minutes weigh 63%, the
last fifteen 95%, and a resource gone quiet decays towards zero on its own. Each rise is
spread over the time since the view was last touched, and the average is divided by
`1 - exp(-age/tau)`, so a steady rate reads as itself from the first minute rather than
ramping up from zero; `age` (time since the first decision of the day on this board) counts
as at least a minute, so two requests a millisecond apart are not read as 1,000 a second.
A new limit day, or a count that fell, starts the average afresh. Three floats hold it.
Decisions the fallback makes in process while Redis is down count against this replica's
share, not the day's count: they move the burst figure only.

The board keeps the most recently seen resources only, so 10,000 quiet resources cost a
bounded amount of memory: about 1 KB a resource with the upstream's five headers, so
about 10 MB however many resources callers name. Limits are shared between views that
have equal ones (a few dozen distinct values are kept).

For the dashboard's chart, each view counts its admitted requests per second, by the second
each is due to go (a queued request's slot, not the second it was decided), over the last
five minutes, and the upstream's 429s per second over the last ten; the board counts both
for every resource together too. Counts are kept sparse, one 64-bit number per second that
had any: about 100 bytes for a resource used in a few seconds, 2.4 KB for one used in every
second of the span (and one number more for each second its queue reaches ahead).
"""

from __future__ import annotations

import math
import time
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from proxy.headers import (
    UPSTREAM_BURST_MAX,
    UPSTREAM_BURST_REMAINING,
    UPSTREAM_DAILY_LIMIT,
    UPSTREAM_DAILY_REMAINING,
    UPSTREAM_INTERVAL_MS,
)
from proxy.limiter.base import Decision, Limits
from proxy.metrics import Metrics
from proxy.typing import ResourceKey, ResourceKind

CAPACITY = 10_000
# The upstream's rate-limit headers the board keeps, in the order it shows them.
UPSTREAM_HEADERS = (
    UPSTREAM_BURST_MAX,
    UPSTREAM_BURST_REMAINING,
    UPSTREAM_INTERVAL_MS,
    UPSTREAM_DAILY_LIMIT,
    UPSTREAM_DAILY_REMAINING,
)
# The rate's time constant, and the least age its average is taken over.
RATE_TAU_S = 300.0
RATE_MIN_AGE_S = 60.0
# Distinct Limits values kept to share between views (learned limits are mostly equal).
SHARED_LIMITS = 64
# Seconds of admitted requests kept for the chart, and of the upstream's 429s (longer: one
# should catch the eye for a while after it happened).
CHART_SPAN_S = 300
UPSTREAM_429_SPAN_S = 600
# Per-second counts: `second << 20 | count` in one int64 (a count stops at about a million).
_COUNT_BITS = 20
_COUNT_MAX = (1 << _COUNT_BITS) - 1

# array("q") of `second << _COUNT_BITS | count`, ascending (a string: 3.11 cannot subscript it).
PerSecond: TypeAlias = "array[int]"


def near_limit(used: int, daily: int) -> bool:
    """At or past 80% of the daily limit (integers: 0.8 * daily may not be exact)."""
    return used * 5 >= daily * 4


@dataclass(slots=True)
class ResourceView:
    """The local view of one resource."""

    app: str
    kind: ResourceKind
    id: str
    limits: Limits
    learned: bool = False
    burst_remaining: int = 0
    daily_remaining: int = 0
    waiting: int = 0
    last_seen: float = 0.0
    # Wall time the limit day of the last decision ends; 0: no decision yet.
    day_ends_at: float = 0.0
    # The count's rise per second, averaged (not yet divided by the age's weight), as of
    # last_seen; and when the average started.
    rate: float = 0.0
    rate_since: float = 0.0
    # (name, value) pairs with interned names, not a dict: a view takes half the memory.
    upstream: tuple[tuple[str, str], ...] = ()
    # Admitted requests by the second they are due, and the upstream's 429s (None: none).
    admitted: PerSecond | None = None
    upstream_429: PerSecond | None = None

    def used(self, now: float) -> int | None:
        """Today's count, None when no decision was made this limit day."""
        if now >= self.day_ends_at:
            return None
        return max(0, self.limits.daily - self.daily_remaining)

    def rate_at(self, now: float) -> float:
        """Requests per second now, by the average above."""
        if not self.rate:
            return 0.0
        decayed = self.rate * math.exp(-max(0.0, now - self.last_seen) / RATE_TAU_S)
        age = max(now - self.rate_since, RATE_MIN_AGE_S)
        return decayed / -math.expm1(-age / RATE_TAU_S)


def count_second(counts: PerSecond | None, second: int, oldest: int) -> PerSecond | None:
    """`counts` with one more at `second`, the seconds before `oldest` dropped (a second
    already before it is not counted)."""
    if second < oldest:
        return counts
    if counts is None:
        return array("q", (second << _COUNT_BITS | 1,))
    last = counts[-1]
    if last >> _COUNT_BITS == second:
        # The common case, on every admitted request: the newest second again. The
        # seconds gone by are dropped when a new one comes.
        if last & _COUNT_MAX != _COUNT_MAX:
            counts[-1] = last + 1
        return counts
    index = len(counts)
    # Slots mostly come in order: look from the newest.
    while index and counts[index - 1] >> _COUNT_BITS > second:
        index -= 1
    if index and counts[index - 1] >> _COUNT_BITS == second:
        if counts[index - 1] & _COUNT_MAX != _COUNT_MAX:
            counts[index - 1] += 1
    else:
        counts.insert(index, second << _COUNT_BITS | 1)
    if counts[0] >> _COUNT_BITS < oldest:
        del counts[: bisect_left(counts, oldest << _COUNT_BITS)]
    return counts


def seconds_between(counts: PerSecond | None, first: int, last: int) -> list[list[int]]:
    """[second, count] for each second from `first` to `last` that had any."""
    if counts is None:
        return []
    start = bisect_left(counts, first << _COUNT_BITS)
    stop = bisect_left(counts, (last + 1) << _COUNT_BITS)
    return [[packed >> _COUNT_BITS, packed & _COUNT_MAX] for packed in counts[start:stop]]


def total_between(counts: PerSecond | None, first: int, last: int) -> int:
    """The counts of the seconds from `first` to `last`, summed."""
    return sum(count for _, count in seconds_between(counts, first, last))


def _spread(elapsed_s: float) -> float:
    """The weight of a rise over `elapsed_s` in the average: its share of the time
    constant, per second of the interval (1/tau as the interval shrinks to nothing)."""
    if elapsed_s <= 0:
        return 1 / RATE_TAU_S
    return -math.expm1(-elapsed_s / RATE_TAU_S) / elapsed_s


class StatusBoard:
    """Resource views, most recently seen last, at most `capacity` of them.

    `limits` are the configured ones, every key's until `set_limits` says otherwise. With
    `metrics`, admitted requests near their daily limit are counted, and each scrape reads
    how many resources are near theirs and the highest daily use.
    """

    def __init__(
        self,
        limits: Limits,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.time,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._views: OrderedDict[ResourceKey, ResourceView] = OrderedDict()
        self._capacity = capacity
        self._clock = clock
        self._limits = limits
        self._shared_limits = {limits: limits}
        self._metrics = metrics
        # Every resource's together, those the board has let go included.
        self._admitted: PerSecond | None = None
        self._upstream_429: PerSecond | None = None
        if metrics is not None:
            metrics.watch_daily_use(self.near_limit_resources, self.highest_daily_use)

    def _view(self, key: ResourceKey) -> tuple[ResourceView, float]:
        """The key's view, made the most recent and seen now (its rate decayed to now),
        and the seconds since it was seen before."""
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = ResourceView(key.app, key.kind, key.id, self._limits)
            if len(self._views) > self._capacity:
                self._views.popitem(last=False)
        self._views.move_to_end(key)
        now = self._clock()
        elapsed = max(0.0, now - view.last_seen)
        if view.rate:
            view.rate *= math.exp(-elapsed / RATE_TAU_S)
        view.last_seen = now
        return view, elapsed

    def decided(self, key: ResourceKey, decision: Decision) -> None:
        view, elapsed = self._view(key)
        view.burst_remaining = decision.burst_remaining
        if decision.local:
            # This replica's share, not the day's count: the last shared count stands.
            taken_at = view.used(view.last_seen)
        else:
            taken_at = self._count(view, decision, elapsed)
        taken_near = taken_at is not None and near_limit(taken_at, view.limits.daily)
        if self._metrics is not None and decision.admitted and taken_near:
            self._metrics.daily_near_limit.inc()
        if decision.admitted:
            self._count_admitted(view, decision)

    def _count_admitted(self, view: ResourceView, decision: Decision) -> None:
        """Count an admitted request in the second it is due to go: its slot's, or now
        when no slot was reserved (shadow mode sends at once)."""
        now = view.last_seen
        due = now + decision.wait_s if decision.slot is not None else now
        oldest = int(now) - CHART_SPAN_S + 1
        view.admitted = count_second(view.admitted, int(due), oldest)
        self._admitted = count_second(self._admitted, int(due), oldest)

    def _count(self, view: ResourceView, decision: Decision, elapsed: float) -> int | None:
        """Take the decision's daily figures into the view and its rate; the count its
        request was taken at (as Envoy counts near_limit: the requests taken while the
        count was 80% or more), None when the decision has no limit day left."""
        now = view.last_seen
        before = view.used(now)
        view.daily_remaining = decision.daily_remaining
        view.day_ends_at = now + decision.daily_reset_s
        used = view.used(now)
        if used is None:
            return None
        if before is None or used < before:
            view.rate, view.rate_since = 0.0, now
        else:
            view.rate += (used - before) * _spread(elapsed)
        return used - 1

    def waiting(self, key: ResourceKey, delta: int) -> None:
        view, _ = self._view(key)
        view.waiting += delta

    def answered(
        self, key: ResourceKey, headers: Mapping[str, str], status: int | None = None
    ) -> None:
        """Keep the upstream's rate-limit headers (an answer without any, such as a 401
        given before the upstream counted the request, leaves the last ones), and count
        the answer if it is a 429 (`status` None: not known)."""
        # The five HighLevel sends, looked up by name: scanning every header of every
        # answer for the prefix cost more than the rest of the status board together.
        upstream = tuple(
            (name, value)
            for name in UPSTREAM_HEADERS
            if (value := headers.get(name)) is not None
        )
        view, _ = self._view(key)
        if upstream:
            view.upstream = upstream
        if status == 429:
            second = int(view.last_seen)
            oldest = second - UPSTREAM_429_SPAN_S + 1
            view.upstream_429 = count_second(view.upstream_429, second, oldest)
            self._upstream_429 = count_second(self._upstream_429, second, oldest)

    def set_limits(self, key: ResourceKey, limits: Limits, learned: bool) -> None:
        """The key's effective limits from now on, and whether they were learned from the
        upstream's headers rather than configured. Call it before the first decision made
        with them: today's count stays, so the remaining moves with the daily limit (as
        the limiter's next decision will say)."""
        view, _ = self._view(key)
        if view.used(view.last_seen) is not None:
            view.daily_remaining = max(0, view.daily_remaining + limits.daily - view.limits.daily)
        view.limits = self._shared(limits)
        view.learned = learned

    def use_limits(self, limits: Limits) -> None:
        """New configured limits (a config reload): every view has them from now on, the
        learned ones too (admission forgets those; the next answers teach them again)."""
        self._limits = limits
        self._shared_limits = {limits: limits}
        for view in self._views.values():
            if view.used(view.last_seen) is not None:
                moved = view.daily_remaining + limits.daily - view.limits.daily
                view.daily_remaining = max(0, moved)
            view.limits, view.learned = limits, False

    def _shared(self, limits: Limits) -> Limits:
        shared = self._shared_limits.get(limits)
        if shared is not None:
            return shared
        if len(self._shared_limits) < SHARED_LIMITS:
            self._shared_limits[limits] = limits
        return limits

    def near_limit_resources(self) -> int:
        """Resources on the board whose count today is 80% of their daily limit or more."""
        now = self._clock()
        count = 0
        for view in self._views.values():
            used = view.used(now)
            if used is not None and near_limit(used, view.limits.daily):
                count += 1
        return count

    def highest_daily_use(self) -> float:
        """The highest count today / daily limit on the board (0 with no count today)."""
        now = self._clock()
        highest = 0.0
        for view in self._views.values():
            used = view.used(now)
            if used is not None:
                highest = max(highest, used / view.limits.daily)
        return highest

    def least_daily_remaining(self) -> int:
        """The fewest requests a resource on the board has left today. One with no
        decision this limit day has its whole daily limit left, and so has an empty board
        (the configured limit): a quiet board never reads as an exhausted one."""
        now = self._clock()
        remaining = (
            view.limits.daily if view.used(now) is None else view.daily_remaining
            for view in self._views.values()
        )
        return min(remaining, default=self._limits.daily)

    def snapshot(
        self, token_expiry: Callable[[ResourceKey], float | None]
    ) -> list[dict[str, object]]:
        """Every view as plain data, most recent first, with the cached token expiry."""
        now = self._clock()
        return [_row(view, now, token_expiry(key)) for key, view in reversed(self._views.items())]

    def overall(self) -> dict[str, object]:
        """Every resource together (those the board has let go included), with the time
        the figures are taken at and their spans: what the dashboard's chart starts from."""
        now = self._clock()
        second = int(now)
        return {
            "now": now,
            "chart_span_s": CHART_SPAN_S,
            "upstream_429_span_s": UPSTREAM_429_SPAN_S,
            "admitted_per_s": seconds_between(
                self._admitted, second - CHART_SPAN_S + 1, second
            ),
            "upstream_429s": total_between(
                self._upstream_429, second - UPSTREAM_429_SPAN_S + 1, second
            ),
        }


def _row(view: ResourceView, now: float, token_expires_at: float | None) -> dict[str, object]:
    used = view.used(now)
    second = int(now)
    projected = rate_per_min = None
    if used is not None:
        rate = view.rate_at(now)
        projected = round(used + rate * (view.day_ends_at - now))
        rate_per_min = round(rate * 60, 2)
    limits = view.limits
    return {
        "app": view.app,
        "kind": view.kind,
        "id": view.id,
        "burst_remaining": view.burst_remaining,
        "daily_remaining": view.daily_remaining,
        "waiting": view.waiting,
        "last_seen": view.last_seen,
        "upstream": dict(view.upstream),
        "token_expires_at": token_expires_at,
        "limits": {
            "burst": limits.burst,
            "window_s": limits.window_s,
            "daily": limits.daily,
            "learned": view.learned,
        },
        "daily_used": used,
        "daily_projected": projected,
        "daily_rate_per_min": rate_per_min,
        "near_daily_limit": used is not None and near_limit(used, limits.daily),
        # [second, count] for the seconds of the chart's span that had any (not yet due: not
        # shown), and the upstream's 429s over their span.
        "admitted_per_s": seconds_between(view.admitted, second - CHART_SPAN_S + 1, second),
        "upstream_429s": total_between(
            view.upstream_429, second - UPSTREAM_429_SPAN_S + 1, second
        ),
    }
