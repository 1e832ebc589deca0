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
from proxy.limiter.fallback import FallbackLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.metrics import Metrics
from proxy.redis_client import open_redis
from proxy.status import StatusBoard
from tests.support.limiters import KEY, SMALL, TODAY, ManualClock


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_client = open_redis(StoreConfig(redis_url=redis_server.url))
    yield redis_client
    await redis_client.aclose()


async def test_local_share_while_down_then_back_to_redis(
    redis_server: RedisServer, client, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: decisions use 1/expected_replicas of the burst, logged once; Redis back:
    decisions are shared again, logged once."""
    caplog.set_level(logging.WARNING, logger="proxy.limiter.fallback")
    retry_clock = ManualClock()
    limiter = FallbackLimiter(RedisLimiter(client), local_share=5, clock=retry_clock)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).burst_remaining == 4  # shared: 5
    redis_server.stop(kill=True)
    local = [await limiter.acquire(KEY, SMALL, TODAY, 0) for _ in range(3)]
    assert [d.admitted for d in local] == [True, False, False]  # 5 // 5 = 1 per window
    assert limiter.degraded
    redis_server.start()
    retry_clock.advance(1.5)
    back = await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert back.admitted and not limiter.degraded
    messages = [record.getMessage() for record in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


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
