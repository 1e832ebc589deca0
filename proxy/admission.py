"""Admission: hold a request until its slot, or refuse it, before it goes upstream.

The limiter decides; this module applies the config to it (the numbers, the queue mode,
shadow mode, the caller's `X-HoopAI-Max-Wait-Ms`), sleeps the wait, turns a refusal into
a 429 (worded by `limit_answers`), records each decision in the metrics and the status
board, and hands the upstream's counts back to the limiter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from multidict import CIMultiDictProxy

from proxy.config import LimitsConfig, QueueConfig
from proxy.errors import BadRequest, LimiterUnavailable, RateLimited, TooManyKeys
from proxy.headers import (
    UPSTREAM_BURST_REMAINING,
    UPSTREAM_DAILY_REMAINING,
    Headers,
    upstream_remaining,
)
from proxy.limit_answers import MAX_WAIT_HEADER, LimitAnswers, shadow_verdict
from proxy.limiter.base import Day, Decision, Limiter, Limits, UpstreamCounts
from proxy.limiter.days import day_at
from proxy.metrics import Metrics
from proxy.status import StatusBoard
from proxy.typing import ResourceKey
from proxy.waiting import WaitingLine

log = logging.getLogger(__name__)


def limits_from(config: LimitsConfig) -> Limits:
    return Limits(
        burst=config.burst.requests,
        window_s=config.burst.interval_ms / 1000,
        pad_s=config.burst.pad_ms / 1000,
        daily=config.daily.requests,
    )


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
        metrics: Metrics,
        board: StatusBoard,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._board = board
        self.limits = limits_from(limits)
        self.shadow = limits.mode == "shadow"
        self.answers = LimitAnswers(self.limits, shadow=self.shadow)
        self._zone = limits.daily.zone
        self._max_wait_s = 0.0 if queue.mode == "reject" else queue.max_wait_ms / 1000
        self._wall_clock = wall_clock
        self.line = WaitingLine(self._give_back)

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

    async def admit(self, key: ResourceKey, max_wait_s: float) -> Decision:
        """Wait for `key`'s next slot and return the decision, or raise RateLimited."""
        try:
            decision = await self._limiter.acquire(
                key, self.limits, self.today(), max_wait_s, shadow=self.shadow
            )
        except LimiterUnavailable:
            if not self.shadow:
                raise
            # Shadow mode never holds or refuses, not even when it cannot decide.
            log.warning("shadow: limiter unavailable, %s sent undecided", key.tag)
            self._metrics.decisions.labels("undecided").inc()
            return self._undecided()
        except TooManyKeys:
            # The limiter has logged the cap (once a minute, not once a request).
            if not self.shadow:
                self._metrics.decisions.labels("refused_too_many_keys").inc()
                raise
            self._metrics.decisions.labels("undecided").inc()
            return self._undecided()
        self._board.decided(key, decision)
        self._metrics.decisions.labels(_outcome(decision, self.shadow)).inc()
        if not decision.admitted:
            raise RateLimited(
                self.answers.refusal_message(key, decision, max_wait_s),
                headers=self.answers.refusal_headers(decision),
            )
        if self.shadow:
            if decision.limited_by or decision.wait_s > 0:
                log.info(
                    "shadow: %s would be held or refused: %s", key.tag, shadow_verdict(decision)
                )
            return decision
        held_s = 0.0
        if decision.wait_s > 0:
            began = time.monotonic()
            decision = await self._hold(key, decision)
            # Not decision.wait_s: a caller ahead who left may have moved this one up.
            held_s = time.monotonic() - began
        self._metrics.queue_seconds.observe(held_s)
        return decision

    async def aclose(self) -> None:
        await self.line.aclose()

    async def _hold(self, key: ResourceKey, decision: Decision) -> Decision:
        """Wait in line for the slot (it may move earlier when a caller ahead leaves); if
        this caller leaves, nothing is sent and the slot is passed on."""
        self._metrics.waiting.inc()
        self._board.waiting(key, +1)
        try:
            return await self.line.hold(key, decision)
        finally:
            self._metrics.waiting.dec()
            self._board.waiting(key, -1)

    async def _give_back(self, key: ResourceKey, decision: Decision) -> None:
        await self._limiter.release(key, self.limits, decision)
        self._metrics.slots_given_back.inc()

    async def observe(
        self, key: ResourceKey, status: int, headers: Headers, decision: Decision
    ) -> None:
        """Tell the limiter what the upstream's answer says of the key's limits.

        `decision` is what the limiter said when this request was admitted. The upstream
        saying fewer remain than that means traffic the limiter never saw (it bypassed the
        proxy): every replica must know at once. Otherwise the counts may ride along with
        the key's next decision, which costs no extra round trip.
        """
        # As the upstream said them, on its own limits and interval: `r` left means at most
        # `r` more until its window moves on, whatever our own numbers are.
        burst = upstream_remaining(headers, UPSTREAM_BURST_REMAINING)
        daily = upstream_remaining(headers, UPSTREAM_DAILY_REMAINING)
        self._board.answered(key, headers)
        if status == 429:
            # Not processed upstream: the whole window is taken, for every replica, now.
            counts = UpstreamCounts(0, daily, pause=True)
            await self._limiter.observe(key, self.limits, self.today(), counts)
        elif burst is not None or daily is not None:
            # Requests admitted just after this one may reach the upstream first; only a
            # shortfall beyond that reordering is news worth a round trip now.
            slack = max(2, self.limits.burst // 20)
            surprising = (burst is not None and burst < decision.burst_remaining - slack) or (
                daily is not None and daily < decision.daily_remaining - slack
            )
            counts = UpstreamCounts(burst, daily, at_once=surprising)
            await self._limiter.observe(key, self.limits, self.today(), counts)

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
