"""The shared limiter's fallback: a local share or a refusal while Redis is down, and the
way back once it answers again. Against a real redis-server that is killed and restarted."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.admission import Admission
from proxy.config import LimitsConfig, QueueConfig, StoreConfig
from proxy.errors import LimiterUnavailable
from proxy.harness.redis_server import RedisServer
from proxy.http_errors import status_and_code
from proxy.limiter.fallback import RECOVERY_SKEW_S, FallbackLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.metrics import Metrics
from proxy.redis_client import open_redis
from proxy.status import StatusBoard
from proxy.typing import ResourceKey
from tests.support.limiters import KEY, SMALL, TODAY, ManualClock


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_client = open_redis(StoreConfig(redis_url=redis_server.url))
    yield redis_client
    await redis_client.aclose()


async def test_local_share_while_down_then_back_to_redis(
    redis_server: RedisServer, client, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: the local window starts full at the failure, then allows
    1/expected_replicas of the burst, logged once; Redis back: decisions are shared again,
    logged once, after a fill that outlasts the other replicas' local sends."""
    caplog.set_level(logging.WARNING, logger="proxy.limiter.fallback")
    clock = ManualClock()
    limiter = FallbackLimiter(RedisLimiter(client), local_share=5, clock=clock)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).burst_remaining == 4  # shared: 5
    redis_server.stop(kill=True)
    first = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert not first.admitted and first.retry_after_s == pytest.approx(1.1)
    assert limiter.degraded
    clock.advance(1.1001)
    local = [await limiter.acquire(KEY, SMALL, TODAY, 30) for _ in range(2)]
    assert [d.admitted for d in local] == [True, False]  # 5 // 5 = 1 per window
    assert local[0].local and local[1].retry_after_s > 0  # refused, never queued
    redis_server.start()
    clock.advance(1.5)
    back = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert back.admitted and not limiter.degraded and not back.local
    # Other replicas may decide locally for RECOVERY_SKEW_S more: nothing shared before
    # that plus a window.
    assert back.wait_s == pytest.approx(RECOVERY_SKEW_S + 1.1, abs=0.1)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


async def test_a_key_seen_queued_waits_out_the_longest_queue_before_local_sends(
    redis_server: RedisServer, client
) -> None:
    """Requests queued in Redis before it failed are still sent on every replica: a key
    this replica saw queued gets no local slot until the longest wait plus a window."""
    clock = ManualClock()
    limiter = FallbackLimiter(RedisLimiter(client), local_share=1, clock=clock, max_queue_s=5)
    decisions = [await limiter.acquire(KEY, SMALL, TODAY, 30) for _ in range(6)]
    assert decisions[-1].wait_s > 0  # the shared queue is not empty
    other = ResourceKey(KEY.app, "location", "never-queued")
    await limiter.acquire(other, SMALL, TODAY, 30)
    redis_server.stop(kill=True)
    queued_key = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert not queued_key.admitted and queued_key.retry_after_s == pytest.approx(5 + 1.1)
    unqueued_key = await limiter.acquire(other, SMALL, TODAY, 30)
    assert not unqueued_key.admitted and unqueued_key.retry_after_s == pytest.approx(1.1)
    clock.advance(5 + 1.1001)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).admitted


async def test_the_fill_after_an_outage_holds_every_replica(
    redis_server: RedisServer, client
) -> None:
    """The replica that comes back first fills the key's window in Redis, so a replica
    that never noticed the outage cannot decide into the others' local sends either; and
    Redis restarted empty has lost its queue, which the fill also covers."""
    clock = ManualClock()
    first = FallbackLimiter(RedisLimiter(client), local_share=2, clock=clock)
    untouched = FallbackLimiter(RedisLimiter(client), local_share=2, clock=clock)
    await first.acquire(KEY, SMALL, TODAY, 0)
    redis_server.stop(kill=True)
    await first.acquire(KEY, SMALL, TODAY, 0)
    assert first.degraded
    redis_server.start()
    clock.advance(1.5)
    assert (await first.acquire(KEY, SMALL, TODAY, 30)).admitted and not first.degraded
    held = await untouched.acquire(KEY, SMALL, TODAY, 30)
    assert held.wait_s == pytest.approx(RECOVERY_SKEW_S + 1.1, abs=0.1)
    refused = await untouched.acquire(KEY, SMALL, TODAY, 0)
    assert not refused.admitted


async def test_reject_while_down(redis_server: RedisServer, client) -> None:
    """With on_redis_error reject, a dead Redis is a 503 limiter_unavailable."""
    limiter = FallbackLimiter(RedisLimiter(client), local_share=None)
    redis_server.stop(kill=True)
    with pytest.raises(LimiterUnavailable) as raised:
        await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert status_and_code(raised.value) == (503, "limiter_unavailable")
    assert "on_redis_error" in raised.value.message


async def test_shadow_mode_sends_even_when_it_cannot_decide(
    redis_server: RedisServer, client
) -> None:
    """Shadow mode with on_redis_error reject and Redis down: admitted, never a 503."""
    limiter = FallbackLimiter(RedisLimiter(client), local_share=None)
    admission = Admission(
        limiter,
        LimitsConfig(mode="shadow"),
        QueueConfig(),
        metrics=Metrics(),
        board=StatusBoard(),
    )
    redis_server.stop(kill=True)
    decision = await admission.admit(KEY, 0)
    assert decision.admitted and decision.wait_s == 0
