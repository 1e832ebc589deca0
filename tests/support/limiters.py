"""Limiter backends for tests, each on a clock the test moves by hand.

One test body runs against every backend (memory and Redis), so both are held to the
same answers; the Redis backend is given the test's clock in place of Redis TIME.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

from proxy.harness.redis_server import RedisServer
from proxy.limiter.base import Day, Limiter, Limits
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.pipelined_redis import PipelinedRedis
from proxy.typing import ResourceKey

START = 1_800_000_000.0


@dataclass
class ManualClock:
    """A clock that only moves when told to."""

    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


KEY = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", "loc1")
SMALL = Limits(burst=5, window_s=1.0, pad_s=0.1, daily=1000)
TODAY = Day(id="2027-01-15", ends_in_s=3600.0)


LimiterFactory = Callable[[ManualClock], Limiter]


@asynccontextmanager
async def replay_limiter(
    backend: str, clock: ManualClock, redis_server: Callable[[], RedisServer]
) -> AsyncIterator[Limiter]:
    """A limiter of `backend` ("memory" or "redis") on `clock`, for one property example."""
    if backend == "memory":
        yield MemoryLimiter(clock)
        return
    url = redis_server().url
    client = aioredis.Redis.from_url(url)
    scripts = PipelinedRedis.from_url(url)  # the script's path in the proxy
    try:
        yield RedisLimiter(client, scripts=scripts, clock=clock)
    finally:
        await scripts.aclose()
        await client.aclose()


def max_in_any_window(times: list[float], window_ms: int) -> int:
    """The most of `times` (ms) that any window [t, t + W) holds."""
    ordered = sorted(times)
    return max(
        (sum(1 for other in ordered if start <= other < start + window_ms) for start in ordered),
        default=0,
    )
