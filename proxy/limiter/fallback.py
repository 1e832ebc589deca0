"""What the proxy does while the shared limiter (Redis) is unreachable.

`on_redis_error: local` decides in process with this replica's share of the limits
(`1/expected_replicas`), so the replicas together stay within the upstream's limits;
`reject` answers 503 `limiter_unavailable`. Either way Redis is tried again after a short
pause, and the proxy goes back to it by itself. The switch each way is logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from proxy.errors import LimiterUnavailable
from proxy.limiter.base import DEFAULT_MAX_KEYS, Day, Decision, Limiter, Limits, UpstreamCounts
from proxy.limiter.memory import MemoryLimiter
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

RETRY_SHARED_AFTER_S = 1.0


class FallbackLimiter:
    """Uses `shared` while it answers; otherwise a local share, or refusal."""

    def __init__(
        self,
        shared: Limiter,
        *,
        local_share: int | None,
        clock: Callable[[], float] = time.monotonic,
        retry_after_s: float = RETRY_SHARED_AFTER_S,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        """`local_share` is expected_replicas for `local`, or None for `reject`; `max_keys`
        caps the keys the local limiter tracks (limits.max_tracked_keys)."""
        if local_share is not None and local_share < 1:
            raise ValueError("local_share must be at least 1")
        self._shared = shared
        self._local = MemoryLimiter(max_keys=max_keys)
        self._share = local_share
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._down_until: float | None = None

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    async def acquire(
        self, key: ResourceKey, limits: Limits, day: Day, max_wait_s: float, *, shadow: bool = False
    ) -> Decision:
        if not self._skip_shared():
            try:
                decision = await self._shared.acquire(key, limits, day, max_wait_s, shadow=shadow)
            except LimiterUnavailable as exc:
                self._went_down(exc)
            else:
                self._came_back()
                return decision
        if self._share is None:
            raise LimiterUnavailable(
                "The shared rate limiter (Redis) is unavailable and store.on_redis_error is "
                "'reject'; retry shortly"
            )
        decision = await self._local.acquire(
            key, limits.scaled(self._share), day, max_wait_s, shadow=shadow
        )
        return dataclasses.replace(decision, local=True)

    async def release(self, key: ResourceKey, limits: Limits, decision: Decision) -> None:
        """To whichever limiter reserved the slot; a shared one while Redis is down stays
        spent (the safe side)."""
        if decision.local:
            await self._local.release(key, limits.scaled(self._share or 1), decision)
        elif not self.degraded:
            try:
                await self._shared.release(key, limits, decision)
            except LimiterUnavailable as exc:
                self._went_down(exc)

    async def observe(
        self,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        counts: UpstreamCounts,
    ) -> None:
        # Only decisions probe a Redis that was down: an observation may not even reach
        # Redis (it can ride along with the next decision), so it must not use the probe.
        if not self.degraded:
            try:
                await self._shared.observe(key, limits, day, counts)
                return
            except LimiterUnavailable as exc:
                self._went_down(exc)
        if self._share is not None:
            await self._local.observe(key, limits.scaled(self._share), day, counts)

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()

    def _skip_shared(self) -> bool:
        """While down, try the shared limiter again only every `retry_after_s`, and with
        one request: the others keep deciding locally until that probe has answered."""
        if self._down_until is None:
            return False
        now = self._clock()
        if now < self._down_until:
            return True
        self._down_until = now + self._retry_after_s  # this caller probes; others wait
        return False

    def _went_down(self, exc: LimiterUnavailable) -> None:
        if self._down_until is None:
            action = (
                f"deciding locally with 1/{self._share} of the limits"
                if self._share is not None
                else "refusing requests with 503"
            )
            log.warning("shared limiter unavailable (%s): %s", exc.message, action)
        self._down_until = self._clock() + self._retry_after_s

    def _came_back(self) -> None:
        if self._down_until is not None:
            log.warning("shared limiter reachable again: deciding in Redis")
            self._down_until = None
