"""What the proxy does while the shared limiter (Redis) is unreachable, and on its return.

`on_redis_error: local` decides in process with this replica's share of the limits
(`1/expected_replicas`), so the replicas together stay within the upstream's limits;
`reject` answers 503 `limiter_unavailable`. Either way Redis is tried again after a short
pause, and the proxy goes back to it by itself. The switch each way is logged once.

A blip must not overshoot the upstream, so both hand-overs are pessimistic:
- **Going local.** Redis took no decision after the first call that failed was sent (it
  would have answered that call), but slots it gave before are still being sent, queued
  on every replica. So a key's local window starts full at that moment, or, for a key
  that was busy when this replica last decided for it (window full, or a queue), a
  window past the end of the queue it saw then, never past the longest wait
  (`QueueEnds`); the first local send comes a window (W + pad) later. A local request
  waits at most that long (`local_wait_s`), so local sends end that long after the return.
- **Going back.** Redis knows nothing of the local sends and may have restarted empty;
  the other replicas keep deciding locally until their own next probe, at most
  `RECOVERY_SKEW_S` later, and send what they queued for one more window. So before a
  key's first decision after the return (`_resume_in_redis`), its window in Redis is
  filled at the failure (or the end of a possible queue) as it was locally, this
  replica's local slots are written there, and until the others are surely done with
  local sends, decisions in Redis, every replica's, leave the others' share of every
  window free (a per-key marker the script honours). Whatever is decided in Redis then,
  and whatever the others still send locally, no window holds more than the limit.

The guarantee assumes that between this replica's last decision for a key and the
failure, the other replicas did not fill the key's window if it had room, and added at
most one window (N) of slots if it was busy (docs/architecture.md, "Fallback").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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
# How often an idle replica checks that Redis answers, so that every replica knows of an
# outage (and tells Redis of it on the way back), not only those with traffic during it.
HEALTH_EVERY_S = 0.5


class SharedLimiter(Limiter, Protocol):
    """A limiter every replica shares (RedisLimiter), with the fill the hand-overs need."""

    async def fill_until(self, key: ResourceKey, limits: Limits, day: Day, in_s: float) -> None:
        """Make the key's window full `in_s` from now: no slot before then + W + pad."""
        ...

    async def ping(self) -> None:
        """Raise LimiterUnavailable unless the shared limiter answers now."""
        ...

    async def resume(
        self,
        key: ResourceKey,
        limits: Limits,
        own_in_s: tuple[float, ...],
        others: int,
        for_s: float,
    ) -> None:
        """Add the slots this replica took while Redis was away (seconds from now), and
        for `for_s` leave `others` slots of every window free (RedisLimiter.resume)."""
        ...


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a request asked of `acquire`, beside the key and its limits."""

    max_wait_s: float
    shadow: bool
    probe_s: float
    headroom: int
    reserve: int


class QueueEnds:
    """Where the shared queue of each busy key ended when this replica last decided for
    it: a key whose window was full, or that had requests queued."""

    def __init__(self, max_keys: int, max_queue_s: float) -> None:
        self._max_keys = max_keys
        self._max_queue_s = max_queue_s
        # key -> its latest slot then, on this replica's clock; in the order seen.
        self._busy: OrderedDict[ResourceKey, float] = OrderedDict()

    def saw(self, key: ResourceKey, now: float, decision: Decision) -> None:
        if decision.queue_end_s <= 0 and decision.burst_remaining > 0:
            self._busy.pop(key, None)
            return
        self._busy[key] = now + max(0.0, decision.queue_end_s)
        self._busy.move_to_end(key)
        while len(self._busy) > self._max_keys:
            self._busy.popitem(last=False)

    def latest_slot(self, key: ResourceKey, failed_at: float, hold_s: float) -> float:
        """The latest slot Redis may hold for `key`, had it failed at `failed_at`.

        A key with room in its window when last seen: `failed_at` (no queue formed since).
        A busy key: the end of its queue then, plus one window for the slots the other
        replicas may have added since (a window holds N), never past the longest wait.
        """
        end = self._busy.get(key)
        if end is None:
            return failed_at
        return min(failed_at + self._max_queue_s, max(failed_at, end) + hold_s)


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
        self._resumed: set[ResourceKey] = set()  # keys Redis was told of the outage
        self._probe: tuple[ResourceKey, asyncio.Event] | None = None  # the key being probed

    @property
    def degraded(self) -> bool:
        return self._down_until is not None

    async def acquire(
        self,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        max_wait_s: float,
        *,
        shadow: bool = False,
        probe_s: float = 0.0,
        headroom: int = 0,
        reserve: int = 0,
    ) -> Decision:
        asked = _Asked(max_wait_s, shadow, probe_s, headroom, reserve)
        # Requests for the key a probe is deciding wait for it: a local slot taken meanwhile
        # would be missing from what the probe writes to Redis before its decision there.
        while (probe := self._probe) is not None and probe[0] == key:
            await probe[1].wait()
        if not self._skip_shared():
            probing = self.degraded
            if probing:
                self._probe = (key, asyncio.Event())
            try:
                return await self._acquire_shared(key, limits, day, asked)
            except LimiterUnavailable:
                pass
            finally:
                if probing and self._probe is not None:
                    self._probe[1].set()
                    self._probe = None
        if self._share is None:
            raise LimiterUnavailable(
                "The shared rate limiter (Redis) is unavailable and store.on_redis_error is "
                "'reject'; retry shortly"
            )
        share = limits.scaled(self._share)
        return await self._acquire_locally(key, share, day, asked)

    async def _acquire_shared(
        self, key: ResourceKey, limits: Limits, day: Day, asked: _Asked
    ) -> Decision:
        asked_at = self._clock()
        try:
            await self._resume_in_redis(key, limits, day)
            decision = await self._shared.acquire(
                key,
                limits,
                day,
                asked.max_wait_s,
                shadow=asked.shadow,
                probe_s=asked.probe_s,
                headroom=asked.headroom,
                reserve=asked.reserve,
            )
        except LimiterUnavailable as exc:
            self._went_down(exc, asked_at)
            raise
        self._came_back()
        self._ends.saw(key, self._clock(), decision)
        return decision

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

    async def anchor(
        self, key: ResourceKey, limits: Limits, decision: Decision, late_by_s: float
    ) -> None:
        """To whichever limiter reserved the slot, as `release`."""
        if decision.local:
            await self._local.anchor(key, limits.scaled(self._share or 1), decision, late_by_s)
        elif not self.degraded:
            try:
                await self._shared.anchor(key, limits, decision, late_by_s)
            except LimiterUnavailable as exc:
                self._went_down(exc)

    async def learn(self, key: ResourceKey, limits: Limits, *, forget: bool = False) -> None:
        """To Redis when it answers; while it is down, this replica's own view decides."""
        if not self.degraded:
            try:
                await self._shared.learn(key, limits, forget=forget)
            except LimiterUnavailable as exc:
                self._went_down(exc)

    async def close(self) -> None:
        await self._shared.close()
        await self._local.close()

    async def watch(self, every_s: float = HEALTH_EVERY_S) -> None:
        """Check Redis every `every_s` while it is in use (a background task): a replica
        without traffic during an outage must still know of it when its traffic comes
        back, or it would decide in Redis as if the others had sent nothing locally."""
        while True:
            await asyncio.sleep(every_s)
            await self.check()

    async def check(self) -> None:
        """One health check: while Redis is in use, note an outage if it does not answer.
        While down, requests probe their way back instead (`_skip_shared`)."""
        if self.degraded:
            return
        asked_at = self._clock()
        try:
            await self._shared.ping()
        except LimiterUnavailable as exc:
            self._went_down(exc, asked_at)

    async def _acquire_locally(
        self, key: ResourceKey, share: Limits, day: Day, asked: _Asked
    ) -> Decision:
        """A local decision, waiting at most a window, on a window that starts with what
        this replica knew of the shared one (see the module docstring). No cold-key probe:
        the window starts full anyway."""
        if key not in self._seeded:
            _remember(self._seeded, key, self._max_keys)
            await self._start_local_window(key, share, day)
        wait_s = min(asked.max_wait_s, local_wait_s(share))
        decision = await self._local.acquire(
            key,
            share,
            day,
            wait_s,
            shadow=asked.shadow,
            headroom=asked.headroom,
            reserve=asked.reserve,
        )
        return dataclasses.replace(decision, local=True)

    async def _start_local_window(self, key: ResourceKey, share: Limits, day: Day) -> None:
        failed_at = self._down_since if self._down_since is not None else self._clock()
        start = self._ends.latest_slot(key, failed_at, share.window_s + share.pad_s)
        await self._local.fill_until(key, share, day, start - self._clock())

    async def _resume_in_redis(self, key: ResourceKey, limits: Limits, day: Day) -> None:
        """After an outage, before the key's first decision in Redis: what Redis must know
        of the outage (see the module docstring). A probe while degraded does this first,
        so a probe that succeeds has resumed its key before deciding."""
        now = self._clock()
        back = now if self.degraded else self._back_at
        if back is None or key in self._resumed or self._down_since is None:
            return
        # A restarted Redis lost the slots taken before the failure (and any queue).
        hold = limits.window_s + limits.pad_s
        latest = self._ends.latest_slot(key, self._down_since, hold)
        if latest + hold > now:
            await self._shared.fill_until(key, limits, day, latest - now)
        # The others may decide locally until their next probe, and send for one more hold.
        local_until = back + self._recovery_skew_s + local_wait_s(limits)
        replicas = self._share or 1
        others = limits.scaled(replicas).burst * (replicas - 1) if self._share else 0
        own = self._local.slots_from_now(key, limits.scaled(replicas)) if self._share else ()
        if own or (others and local_until > now):
            await self._shared.resume(key, limits, own, others, local_until - now)
        _remember(self._resumed, key, self._max_keys)

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

    def _went_down(self, exc: LimiterUnavailable, asked_at: float | None = None) -> None:
        """`asked_at`: when the failed call was sent. Redis took no decision after it (it
        would have answered ours), so a window full from then covers every shared slot."""
        now = self._clock()
        if self._down_until is None:
            action = (
                f"deciding locally with 1/{self._share} of the limits"
                if self._share is not None
                else "refusing requests with 503"
            )
            log.warning("shared limiter unavailable (%s): %s", exc.message, action)
            self._down_since, self._back_at = now if asked_at is None else asked_at, None
            self._seeded.clear()
            self._resumed.clear()
        self._down_until = now + self._retry_after_s

    def _came_back(self) -> None:
        if self._down_until is not None:
            log.warning("shared limiter reachable again: deciding in Redis")
            self._down_until = None
            self._back_at = self._clock()


def local_wait_s(limits: Limits) -> float:
    """The longest a local decision may wait: one window and its pad, so the local sends
    of a replica end that long after it goes back to Redis."""
    return limits.window_s + limits.pad_s


def _remember(keys: set[ResourceKey], key: ResourceKey, max_keys: int) -> None:
    """Add `key`, starting afresh past `max_keys`: forgetting only repeats a fill or a
    write of slots, which can only count more, so the set's bound costs no safety."""
    if len(keys) >= max_keys:
        keys.clear()
    keys.add(key)
