"""Per-key state stays bounded when callers name ever new resources (issue 7, finding 4).

A key whose burst window is empty keeps only its daily count, in a compact form; a
process tracks at most `limits.max_tracked_keys` keys and refuses new ones past it (503
`too_many_keys`, one warning line), but never forgets a key with slots in its window; the
Redis limiter's pending upstream corrections are bounded too. Time moves on clocks the
tests hold (Redis is handed the test's clock in place of TIME).
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.errors import TooManyKeys
from proxy.harness.redis_server import RedisServer
from proxy.harness.tokens import SIM_CLIENT_ID, bearer
from proxy.http_errors import status_and_code
from proxy.limiter.base import Day, UpstreamCounts
from proxy.limiter.fallback import FallbackLimiter
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.typing import ResourceKey
from tests.support.limiters import SMALL, TODAY, ManualClock

APP = SIM_CLIENT_ID.split("-", 1)[0]
COUNT = 20_000
HOLD = SMALL.window_s + SMALL.pad_s
TOMORROW = Day(id="2027-01-16", ends_in_s=86_400.0)
CAP_WARNING = "limits.max_tracked_keys"


def key(index: int) -> ResourceKey:
    return ResourceKey(APP, "location", f"boundedLoc{index:06d}")


def traced() -> int:
    return tracemalloc.get_traced_memory()[0]


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_client = aioredis.Redis.from_url(redis_server.url)
    yield redis_client
    await redis_client.aclose()


async def test_idle_keys_shrink_to_their_daily_count() -> None:
    """20,000 keys whose windows have passed hold no full state once later requests have
    swept them, each still knows its daily count (at the limit: still refused), and an idle
    key costs under 150 bytes."""
    clock = ManualClock()
    limits = replace(SMALL, daily=2)
    gc.collect()
    tracemalloc.start()
    try:
        limiter = MemoryLimiter(clock)
        before = traced()
        for index in range(COUNT):
            for _ in range(2):
                assert (await limiter.acquire(key(index), limits, TODAY, 30)).admitted
        live = traced() - before
        clock.advance(HOLD + 0.001)
        for index in range(COUNT):
            decision = await limiter.acquire(key(index), limits, TODAY, 30)
            assert (decision.admitted, decision.limited_by) == (False, "daily")
        idle = traced() - before
    finally:
        tracemalloc.stop()
    print(f"\nbytes per key: {live / COUNT:.0f} live (2 slots), {idle / COUNT:.0f} idle")
    assert limiter.active_keys <= 1
    assert idle / COUNT < 150


async def test_a_new_day_forgets_yesterdays_counts() -> None:
    """Daily counts are dropped when the limit day ends, and the keys start afresh."""
    clock = ManualClock()
    limiter = MemoryLimiter(clock)
    for index in range(COUNT):
        await limiter.acquire(key(index), SMALL, TODAY, 30)
    clock.advance(HOLD + 0.001)
    assert limiter.tracked_keys == COUNT
    decision = await limiter.acquire(key(0), SMALL, TOMORROW, 30)
    assert decision.daily_remaining == SMALL.daily - 1
    assert limiter.tracked_keys == 1


async def test_new_key_past_the_cap_is_refused_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With 100 keys busy, the 101st and every later new key is refused TooManyKeys; 1,000
    refusals write one warning, and the next only after a minute. Known keys still decide."""
    caplog.set_level(logging.WARNING, logger="proxy.limiter.memory")
    clock = ManualClock()
    limiter = MemoryLimiter(clock, max_keys=100)
    for index in range(100):
        assert (await limiter.acquire(key(index), SMALL, TODAY, 30)).admitted
    for index in range(100, 1100):
        with pytest.raises(TooManyKeys) as raised:
            await limiter.acquire(key(index), SMALL, TODAY, 30)
    assert status_and_code(raised.value) == (503, "too_many_keys")
    assert "100" in raised.value.message and CAP_WARNING in raised.value.message
    assert int(raised.value.headers["Retry-After"]) >= 1
    assert (await limiter.acquire(key(7), SMALL, TODAY, 30)).admitted
    warnings = [r.getMessage() for r in caplog.records if CAP_WARNING in r.getMessage()]
    assert len(warnings) == 1
    clock.advance(61)
    with pytest.raises(TooManyKeys):
        await limiter.acquire(key(5000), SMALL, TODAY, 30)
    warnings = [r.getMessage() for r in caplog.records if CAP_WARNING in r.getMessage()]
    assert len(warnings) == 2 and "1000" in warnings[1]


async def test_a_key_with_slots_in_its_window_is_never_evicted() -> None:
    """Keys that filled their burst keep every slot while new keys knock at the cap: each
    is still refused at once, queued a window later, and no window ever holds more than N.
    When the day ends, the counts go and new keys are admitted again."""
    clock = ManualClock()
    limiter = MemoryLimiter(clock, max_keys=100)
    sent: dict[int, list[float]] = {index: [] for index in range(100)}
    for index in range(100):
        for _ in range(SMALL.burst):
            decision = await limiter.acquire(key(index), SMALL, TODAY, 0)
            assert decision.admitted
            sent[index].append(clock.now + decision.wait_s)
    for index in range(100, 5100):
        with pytest.raises(TooManyKeys):
            await limiter.acquire(key(index), SMALL, TODAY, 0)
    clock.advance(0.5)
    for index in range(100):
        refused = await limiter.acquire(key(index), SMALL, TODAY, 0)
        assert (refused.admitted, refused.limited_by) == (False, "burst")
        queued = await limiter.acquire(key(index), SMALL, TODAY, 30)
        assert queued.wait_s == pytest.approx(HOLD - 0.5)
        sent[index].append(clock.now + queued.wait_s)
    for slots in sent.values():
        assert max(
            sum(1 for s in slots if start <= s < start + SMALL.window_s) for start in slots
        ) <= (SMALL.burst)
    with pytest.raises(TooManyKeys):
        await limiter.acquire(key(6000), SMALL, TODAY, 0)
    clock.advance(HOLD + 1)
    assert (await limiter.acquire(key(6000), SMALL, TOMORROW, 0)).admitted


async def test_fallback_local_limiter_is_capped_too(redis_server: RedisServer, client) -> None:
    """While Redis is down the local share tracks at most max_keys keys as well."""
    clock = ManualClock()
    limiter = FallbackLimiter(RedisLimiter(client), local_share=1, clock=clock, max_keys=10)
    redis_server.stop(kill=True)
    for index in range(10):
        # Tracked, though refused for now: a local window starts full at the failure.
        decision = await limiter.acquire(key(index), SMALL, TODAY, 0)
        assert decision.local and decision.limited_by == "burst"
    assert limiter.degraded
    with pytest.raises(TooManyKeys):
        await limiter.acquire(key(10), SMALL, TODAY, 0)


async def test_redis_pending_corrections_expire_after_a_window(client) -> None:
    """Upstream counts for 20,000 keys never asked again are dropped once a window old; a
    recent one is still applied with its key's next decision."""
    clock = ManualClock()
    limiter = RedisLimiter(client, clock=clock)
    for index in range(COUNT):
        await limiter.observe(key(index), SMALL, TODAY, UpstreamCounts(daily_remaining=10))
        clock.advance(0.01)
    assert 0 < limiter.pending_corrections < 2 * HOLD / 0.01
    decision = await limiter.acquire(key(COUNT - 1), SMALL, TODAY, 0)
    assert decision.daily_remaining == 9


async def test_redis_pending_corrections_are_capped_oldest_first(client) -> None:
    """At one instant, 20,000 keys' counts keep only the newest max_keys of them."""
    clock = ManualClock()
    limiter = RedisLimiter(client, clock=clock, max_keys=1000)
    for index in range(COUNT):
        await limiter.observe(key(index), SMALL, TODAY, UpstreamCounts(daily_remaining=10))
    assert limiter.pending_corrections == 1000
    assert (await limiter.acquire(key(COUNT - 1), SMALL, TODAY, 0)).daily_remaining == 9
    oldest = await limiter.acquire(key(0), SMALL, TODAY, 0)
    assert oldest.daily_remaining == SMALL.daily - 1


async def test_proxy_answers_503_too_many_keys_past_the_cap(
    simulator, start_proxy, http: aiohttp.ClientSession
) -> None:
    """Over HTTP: with limits.max_tracked_keys 3, a fourth location gets the JSON 503."""
    proxy = await start_proxy(simulator.url, limits={"max_tracked_keys": 3})
    statuses = []
    for index in range(3):
        async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer(f"capLoc{index}")) as r:
            statuses.append(r.status)
    assert statuses == [200, 200, 200]
    async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer("capLoc3")) as response:
        body = await response.json()
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
    assert body["statusCode"] == 503 and body["error"] == "too_many_keys"
    assert CAP_WARNING in body["message"]
    async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer("capLoc0")) as response:
        assert response.status == 200


async def test_shadow_mode_sends_past_the_cap(
    simulator, start_proxy, http: aiohttp.ClientSession
) -> None:
    """Shadow mode never refuses: a new location past the cap is sent, undecided."""
    proxy = await start_proxy(simulator.url, limits={"max_tracked_keys": 1, "mode": "shadow"})
    for location in ("shadowLoc0", "shadowLoc1"):
        async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer(location)) as response:
            assert response.status == 200
