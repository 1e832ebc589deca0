"""Admission: hold a request until its slot, or refuse it, before it goes upstream.

The limiter decides; this module applies the config to it (the numbers, the queue mode,
shadow mode, the caller's `X-HoopAI-Max-Wait-Ms`), sleeps the wait, turns a refusal into
a 429 with the upstream's headers, and hands the upstream's counts back to the limiter.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping

from multidict import CIMultiDictProxy

from proxy.config import LimitsConfig, QueueConfig
from proxy.errors import BadRequest, LimiterUnavailable, RateLimited, TooManyKeys
from proxy.headers import (
    UPSTREAM_BURST_MAX,
    UPSTREAM_BURST_REMAINING,
    UPSTREAM_DAILY_LIMIT,
    UPSTREAM_DAILY_REMAINING,
    Headers,
    rate_limit_fields,
    rate_limit_policy,
    upstream_remaining,
    upstream_style_headers,
)
from proxy.limiter.base import Day, Decision, Limiter, LimitKey, Limits, UpstreamCounts
from proxy.limiter.days import day_at
from proxy.metrics import Metrics
from proxy.status import StatusBoard

log = logging.getLogger(__name__)

MAX_WAIT_HEADER = "X-HoopAI-Max-Wait-Ms"
SHADOW_HEADER = "X-HoopAI-Shadow-Decision"


def shadow_verdict(decision: Decision) -> str:
    """What enforce mode would have done, e.g. `queue; wait_ms=1100; limit=burst`."""
    wait_ms = round(decision.wait_s * 1000)
    if decision.limited_by:
        return f"reject; limit={decision.limited_by}; wait_ms={wait_ms}"
    return f"queue; wait_ms={wait_ms}"


def limits_from(config: LimitsConfig) -> Limits:
    return Limits(
        burst=config.burst.requests,
        window_s=config.burst.interval_ms / 1000,
        pad_s=config.burst.pad_ms / 1000,
        daily=config.daily.requests,
    )


def _on_our_scale(headers: Headers, remaining: str, limit: str, ours: int) -> int | None:
    """The upstream's remaining count restated against our own limit.

    What matters is how many the upstream has counted (its limit minus its remaining);
    our limit may differ from its (a sandbox configured at 25, or a test at 100,000), so
    that count is taken off ours. None when the answer carries no count.
    """
    left = upstream_remaining(headers, remaining)
    if left is None:
        return None
    upstream_limit = upstream_remaining(headers, limit)
    used = (upstream_limit if upstream_limit is not None else ours) - left
    return max(0, ours - used)


def _outcome(decision: Decision, shadow: bool) -> str:
    """The metrics label of a decision."""
    if shadow:
        if decision.limited_by:
            return "shadow_would_refuse"
        return "shadow_would_queue" if decision.wait_s > 0 else "sent"
    if not decision.admitted:
        return f"refused_{decision.limited_by}"
    return "queued" if decision.wait_s > 0 else "sent"


class Admission:
    """The limiter applied to one proxy's config."""

    def __init__(
        self,
        limiter: Limiter,
        limits: LimitsConfig,
        queue: QueueConfig,
        *,
        metrics: Metrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics or Metrics()
        self.board = StatusBoard(clock=wall_clock)
        self.limits = limits_from(limits)
        self.shadow = limits.mode == "shadow"
        self._zone = limits.daily.zone
        self._max_wait_s = 0.0 if queue.mode == "reject" else queue.max_wait_ms / 1000
        self._wall_clock = wall_clock
        self.policy = rate_limit_policy(self.limits)

    def today(self) -> Day:
        return day_at(self._wall_clock(), self._zone)

    def max_wait_for(self, headers: CIMultiDictProxy[str]) -> float:
        """The longest this request may be held: config's, lowered by the caller's header."""
        asked = headers.get(MAX_WAIT_HEADER)
        if asked is None:
            return self._max_wait_s
        asked = asked.strip()
        if not (asked.isascii() and asked.isdigit()):
            raise BadRequest(
                f"{MAX_WAIT_HEADER} must be a whole number of milliseconds (0 = never wait), "
                f"got {asked[:40]!r}"
            )
        if len(asked) > 9:  # longer than a week in milliseconds: the config's cap anyway
            return self._max_wait_s
        return min(self._max_wait_s, int(asked) / 1000)

    async def admit(self, key: LimitKey, max_wait_s: float) -> Decision:
        """Wait for `key`'s next slot and return the decision, or raise RateLimited."""
        try:
            decision = await self.limiter.acquire(
                key, self.limits, self.today(), max_wait_s, shadow=self.shadow
            )
        except LimiterUnavailable:
            if not self.shadow:
                raise
            # Shadow mode never holds or refuses, not even when it cannot decide.
            log.warning("shadow: limiter unavailable, %s sent undecided", key.tag)
            self.metrics.decisions.labels("undecided").inc()
            return self._undecided()
        except TooManyKeys:
            # The limiter has logged the cap (once a minute, not once a request).
            if not self.shadow:
                self.metrics.decisions.labels("refused_too_many_keys").inc()
                raise
            self.metrics.decisions.labels("undecided").inc()
            return self._undecided()
        self.board.decided(key, decision)
        self.metrics.decisions.labels(_outcome(decision, self.shadow)).inc()
        if not decision.admitted:
            raise RateLimited(
                self._refusal_message(key, decision, max_wait_s),
                headers=self.refusal_headers(decision),
            )
        if self.shadow:
            if decision.limited_by or decision.wait_s > 0:
                log.info(
                    "shadow: %s would be held or refused: %s", key.tag, shadow_verdict(decision)
                )
            return decision
        if decision.wait_s > 0:
            await self._hold(key, decision.wait_s)
        self.metrics.queue_seconds.observe(decision.wait_s)
        return decision

    async def _hold(self, key: LimitKey, wait_s: float) -> None:
        """Sleep until the slot; cancelled here if the caller goes away (nothing is sent)."""
        self.metrics.waiting.inc()
        self.board.waiting(key, +1)
        try:
            await asyncio.sleep(wait_s)
        finally:
            self.metrics.waiting.dec()
            self.board.waiting(key, -1)

    async def observe(
        self, key: LimitKey, status: int, headers: Headers, decision: Decision
    ) -> None:
        """Tell the limiter what the upstream's answer says of the key's limits.

        `decision` is what the limiter said when this request was admitted. The upstream
        saying fewer remain than that means traffic the limiter never saw (it bypassed the
        proxy): every replica must know at once. Otherwise the counts may ride along with
        the key's next decision, which costs no extra round trip.
        """
        burst = _on_our_scale(
            headers, UPSTREAM_BURST_REMAINING, UPSTREAM_BURST_MAX, self.limits.burst
        )
        daily = _on_our_scale(
            headers, UPSTREAM_DAILY_REMAINING, UPSTREAM_DAILY_LIMIT, self.limits.daily
        )
        self.board.answered(key, headers)
        if status == 429:
            # Not processed upstream: the whole window is taken, for every replica, now.
            counts = UpstreamCounts(0, daily, pause=True)
            await self.limiter.observe(key, self.limits, self.today(), counts)
        elif burst is not None or daily is not None:
            # Requests admitted just after this one may reach the upstream first; only a
            # shortfall beyond that reordering is news worth a round trip now.
            slack = max(2, self.limits.burst // 20)
            surprising = (burst is not None and burst < decision.burst_remaining - slack) or (
                daily is not None and daily < decision.daily_remaining - slack
            )
            counts = UpstreamCounts(burst, daily, at_once=surprising)
            await self.limiter.observe(key, self.limits, self.today(), counts)

    def _undecided(self) -> Decision:
        day = self.today()
        return Decision(
            admitted=True,
            wait_s=0.0,
            retry_after_s=0.0,
            limited_by="",
            burst_remaining=self.limits.burst,
            burst_reset_s=0.0,
            daily_remaining=self.limits.daily,
            daily_reset_s=day.ends_in_s,
        )

    def answer_headers(self, decision: Decision, queued_s: float) -> Mapping[str, str]:
        """Headers added to every forwarded answer: the proxy's view and the time held."""
        headers = {
            "X-HoopAI-Queue-Ms": str(round(queued_s * 1000)),
            "RateLimit-Policy": self.policy,
            "RateLimit": rate_limit_fields(decision),
        }
        if self.shadow and (decision.limited_by or decision.wait_s > 0):
            headers[SHADOW_HEADER] = shadow_verdict(decision)
        return headers

    def refusal_headers(self, decision: Decision) -> dict[str, str]:
        return {
            "Retry-After": str(max(1, math.ceil(decision.retry_after_s))),
            **upstream_style_headers(self.limits, decision),
            "RateLimit-Policy": self.policy,
            "RateLimit": rate_limit_fields(decision),
        }

    def _refusal_message(self, key: LimitKey, decision: Decision, max_wait_s: float) -> str:
        resource = f"{key.kind} {key.id}"
        if decision.limited_by == "daily":
            return (
                f"Daily limit of {self.limits.daily} requests reached for {resource}; "
                f"it resets in {math.ceil(decision.retry_after_s)} s"
            )
        return (
            f"Rate limit of {self.limits.burst} requests per {self.limits.window_s:g} s "
            f"reached for {resource}: the next slot is in {decision.retry_after_s:.1f} s, "
            f"longer than this request may wait ({round(max_wait_s * 1000)} ms). Retry after "
            f"{max(1, math.ceil(decision.retry_after_s))} s, or allow a longer wait with "
            f"{MAX_WAIT_HEADER}"
        )
