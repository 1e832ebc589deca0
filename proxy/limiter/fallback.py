"""What the proxy does while the shared limiter (Redis) is unreachable, and on its return.

`on_redis_error: local` decides in process with this replica's share of the limits
(`1/expected_replicas`), so the replicas together stay within the upstream's limits;
`reject` answers 503 `limiter_unavailable`. Either way Redis is tried again after a short
pause, and the proxy goes back to it by itself. The switch each way is logged once.

A blip must not overshoot the upstream, so both hand-overs are pessimistic:
- **Going local.** Slots reserved in Redis before it failed are still being sent (queued
  requests on every replica). A key whose shared queue was not empty when this replica
  last decided for it may by now be queued as far as any request may wait
  (`queue.max_wait_ms`) beyond the failure; a key seen without a queue is taken to have
  none. Its local window starts full at that point, so the first local send comes a
  window after the last reserved one. Local decisions never queue: a slot that is not
  free now is refused with Retry-After, so no local send is pending when Redis returns.
- **Going back.** Redis knows nothing of the local sends, and may have restarted empty.
  The other replicas keep deciding locally until their own next probe, at most
  `RECOVERY_SKEW_S` later. So each key's first decision after the return first fills
  its window at max(return + RECOVERY_SKEW_S, the queue's projected end): no shared slot
  comes before every local send and every reservation Redis may have lost is a window old.

The price is a pause of about `RECOVERY_SKEW_S` + W after each outage (longer for keys
that were queued), in return for no upstream 429s. The guarantee assumes that a key this
replica saw without a queue did not start queueing at other replicas in the moments
before the failure (docs/architecture.md, "Fallback").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from proxy.errors import LimiterUnavailable
from proxy.limiter.base import DEFAULT_MAX_KEYS, Day, Decision, Limiter, Limits, UpstreamCounts
from proxy.limiter.memory import MemoryLimiter
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

RETRY_SHARED_AFTER_S = 1.0
# How much later than this replica another one may still be deciding locally: it probes
# once every RETRY_SHARED_AFTER_S, and a probe that started just before Redis came back
# fails only after two bounded attempts (redis_client: 0.5 s timeouts, one retry).
RECOVERY_SKEW_S = RETRY_SHARED_AFTER_S + 1.5


class SharedLimiter(Limiter, Protocol):
    """A limiter every replica shares (RedisLimiter), with the fill the hand-overs need."""

    async def fill_until(self, key: ResourceKey, limits: Limits, day: Day, in_s: float) -> None:
        """Make the key's window full `in_s` from now: no slot before then + W + pad."""
        ...


class QueueEnds:
    """Which keys had a shared queue when this replica last decided for them."""

    def __init__(self, max_keys: int, max_queue_s: float) -> None:
        self._max_keys = max_keys
        self._max_queue_s = max_queue_s
        # In the order seen; only keys whose latest slot lay ahead (a queue) are kept.
        self._queued: OrderedDict[ResourceKey, None] = OrderedDict()

    def saw(self, key: ResourceKey, queue_end_s: float) -> None:
        if queue_end_s <= 0:
            self._queued.pop(key, None)
            return
        self._queued[key] = None
        self._queued.move_to_end(key)
        while len(self._queued) > self._max_keys:
            self._queued.popitem(last=False)

    def latest_slot(self, key: ResourceKey, failed_at: float) -> float:
        """The latest slot Redis may hold for `key`, had it failed at `failed_at`: as far
        as any request may wait beyond it for a key seen queued, else `failed_at`."""
        return failed_at + (self._max_queue_s if key in self._queued else 0.0)


class FallbackLimiter:
    """Uses `shared` while it answers; otherwise a local share, or refusal."""

    def __init__(
        self,
        shared: SharedLimiter,
        *,
        local_share: int | None,
        clock: Callable[[], float] = time.monotonic,
        retry_after_s: float = RETRY_SHARED_AFTER_S,
        recovery_skew_s: float = RECOVERY_SKEW_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        max_queue_s: float = 0.0,
    ) -> None:
        """`local_share` is expected_replicas for `local`, or None for `reject`; `max_keys`
        caps the keys the local limiter tracks (limits.max_tracked_keys); `max_queue_s` is
        the longest any request may wait for a slot (queue.max_wait_ms)."""
        if local_share is not None and local_share < 1:
            raise ValueError("local_share must be at least 1")
        self._shared = shared
        self._local = MemoryLimiter(clock, max_keys=max_keys)
        self._share = local_share
        self._clock = clock
        self._retry_after_s = retry_after_s
        self._recovery_skew_s = recovery_skew_s
        self._max_keys = max_keys
        self._ends = QueueEnds(max_keys, max_queue_s)
        self._down_until: float | None = None
        self._down_since: float | None = None  # the outage in progress, or the last one
        self._back_at: float | None = None  # when Redis last came back
        self._seeded: set[ResourceKey] = set()  # keys whose local window was filled
        self._floored: set[ResourceKey] = set()  # keys filled in Redis since it came back

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    async def acquire(
        self, key: ResourceKey, limits: Limits, day: Day, max_wait_s: float, *, shadow: bool = False
    ) -> Decision:
        if not self._skip_shared():
            try:
                await self._floor_after_outage(key, limits, day)
                decision = await self._shared.acquire(key, limits, day, max_wait_s, shadow=shadow)
            except LimiterUnavailable as exc:
                self._went_down(exc)
            else:
                self._came_back()
                self._ends.saw(key, decision.queue_end_s)
                return decision
        if self._share is None:
            raise LimiterUnavailable(
                "The shared rate limiter (Redis) is unavailable and store.on_redis_error is "
                "'reject'; retry shortly"
            )
        return await self._acquire_locally(key, limits.scaled(self._share), day, shadow)

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

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()

    async def _acquire_locally(
        self, key: ResourceKey, share: Limits, day: Day, shadow: bool
    ) -> Decision:
        """A local decision that never queues (see the module docstring), on a window that
        starts full at the end of the shared queue this replica last saw for the key."""
        if key not in self._seeded:
            _remember(self._seeded, key, self._max_keys)
            start = self._ends.latest_slot(key, self._down_since or self._clock())
            await self._local.fill_until(key, share, day, start - self._clock())
        decision = await self._local.acquire(key, share, day, 0.0, shadow=shadow)
        return dataclasses.replace(decision, local=True)

    async def _floor_after_outage(self, key: ResourceKey, limits: Limits, day: Day) -> None:
        """After an outage, fill the key's window in Redis before its first decision
        there (see the module docstring). A probe while degraded does this first, so a
        probe that succeeds has floored its key before deciding."""
        now = self._clock()
        back = now if self.degraded else self._back_at
        if back is None or key in self._floored or self._down_since is None:
            return
        until = max(back + self._recovery_skew_s, self._ends.latest_slot(key, self._down_since))
        if until + limits.window_s + limits.pad_s <= now:
            return  # long past: nothing from the outage can share a window with `now`
        await self._shared.fill_until(key, limits, day, until - now)
        _remember(self._floored, key, self._max_keys)

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
        now = self._clock()
        if self._down_until is None:
            action = (
                f"deciding locally with 1/{self._share} of the limits"
                if self._share is not None
                else "refusing requests with 503"
            )
            log.warning("shared limiter unavailable (%s): %s", exc.message, action)
            self._down_since, self._back_at = now, None
            self._seeded.clear()
            self._floored.clear()
        self._down_until = now + self._retry_after_s

    def _came_back(self) -> None:
        if self._down_until is not None:
            log.warning("shared limiter reachable again: deciding in Redis")
            self._down_until = None
            self._back_at = self._clock()


def _remember(keys: set[ResourceKey], key: ResourceKey, max_keys: int) -> None:
    """Add `key`, starting afresh past `max_keys`: forgetting only repeats a fill, and a
    fill at the same time adds nothing, so the set's bound costs no safety."""
    if len(keys) >= max_keys:
        keys.clear()
    keys.add(key)
