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
from proxy.typing import ResourceKey
from tests.support.limiters import KEY, SMALL, TODAY, ManualClock


# Redis decides on the test's clock too (in place of TIME), so every wait is exact.
@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    redis_client = open_redis(StoreConfig(redis_url=redis_server.url))
    yield redis_client
    await redis_client.aclose()


async def test_local_share_while_down_then_back_to_redis(
    redis_server: RedisServer, client, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: decisions use 1/expected_replicas of the burst, counting this replica's
    own shared slots, and wait at most a window; logged once. Redis back: the local slots
    are written there first, and the others' share stays free; logged once."""
    caplog.set_level(logging.WARNING, logger="proxy.limiter.fallback")
    clock = ManualClock()
    limiter = FallbackLimiter(RedisLimiter(client, clock=clock), local_share=5, clock=clock)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).burst_remaining == 4  # shared: 5
    redis_server.stop(kill=True)
    local = [await limiter.acquire(KEY, SMALL, TODAY, 30) for _ in range(2)]
    # 5 // 5 = 1 per window, and the shared slot taken just before is this replica's.
    assert local[0].admitted and local[0].local and local[0].wait_s == pytest.approx(1.1)
    assert not local[1].admitted and local[1].retry_after_s == pytest.approx(2.2)
    assert limiter.degraded
    redis_server.start()
    clock.advance(1.5)
    back = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert back.admitted and not limiter.degraded and not back.local
    # Redis restarted empty, yet knows of the local slot (0.4 s ago): a hold after it.
    assert back.wait_s == pytest.approx(0.7)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1
    assert sum("reachable again" in m for m in messages) == 1


async def test_a_busy_key_waits_out_its_queue_and_a_window_more_before_local_sends(
    redis_server: RedisServer, client
) -> None:
    """Requests queued in Redis before it failed are still sent on every replica: a key
    this replica saw queued (to 1.1 s) gets no local slot before the end of that queue,
    plus a window the others may have added since, plus the hold; never past the longest
    wait. A key it never saw starts full at the failure."""
    clock = ManualClock()
    limiter = FallbackLimiter(
        RedisLimiter(client, clock=clock), local_share=1, clock=clock, max_queue_s=30
    )
    decisions = [await limiter.acquire(KEY, SMALL, TODAY, 30) for _ in range(6)]
    assert decisions[-1].wait_s == pytest.approx(1.1)  # a queue to 1.1 s
    redis_server.stop(kill=True)
    queued_key = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert not queued_key.admitted and queued_key.retry_after_s == pytest.approx(3.3)
    unseen = await limiter.acquire(ResourceKey(KEY.app, "location", "unseen"), SMALL, TODAY, 30)
    assert unseen.admitted and unseen.wait_s == pytest.approx(1.1)  # a hold after
    short = FallbackLimiter(
        RedisLimiter(client, clock=clock), local_share=1, clock=clock, max_queue_s=0.5
    )
    redis_server.start()
    for _ in range(6):
        await short.acquire(KEY, SMALL, TODAY, 30)
    redis_server.stop(kill=True)
    capped = await short.acquire(KEY, SMALL, TODAY, 30)
    assert capped.retry_after_s == pytest.approx(0.5 + 1.1)


async def test_after_an_outage_every_replica_leaves_the_others_their_share(
    redis_server: RedisServer, client
) -> None:
    """The replica back first fills the key's window in the restarted (empty) Redis at the
    failure, writes its local slots and marks the key: until the others are surely back,
    decisions in Redis, even those of a replica that never saw the outage, leave the
    others' local share (2 of 5) of every window free."""
    clock = ManualClock()
    first = FallbackLimiter(
        RedisLimiter(client, clock=clock), local_share=2, clock=clock, retry_after_s=0.1
    )
    untouched = FallbackLimiter(RedisLimiter(client, clock=clock), local_share=2, clock=clock)
    await first.acquire(KEY, SMALL, TODAY, 0)
    redis_server.stop(kill=True)
    assert (await first.acquire(KEY, SMALL, TODAY, 0)).local  # refused: full at the failure
    redis_server.start()
    clock.advance(0.2)
    back = await first.acquire(KEY, SMALL, TODAY, 30)
    assert not first.degraded and back.wait_s == pytest.approx(0.9)
    waits = [(await untouched.acquire(KEY, SMALL, TODAY, 30)).wait_s for _ in range(3)]
    # Three per window while others may still send locally, not five.
    assert waits == pytest.approx([0.9, 0.9, 2.0])


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
        board=StatusBoard(SMALL),
    )
    redis_server.stop(kill=True)
    decision = await admission.admit(KEY, 0)
    assert decision.admitted and decision.wait_s == 0


async def test_an_idle_replica_notices_an_outage_and_tells_redis_on_the_way_back(
    redis_server: RedisServer, client
) -> None:
    """The health check finds Redis gone without any request, so a replica with no
    traffic during the outage still fills the key's window in the restarted Redis before
    its first decision there, instead of deciding into the others' local sends."""
    clock = ManualClock()
    idle = FallbackLimiter(
        RedisLimiter(client, clock=clock), local_share=2, clock=clock, retry_after_s=0.1
    )
    await idle.acquire(KEY, SMALL, TODAY, 0)
    redis_server.stop(kill=True)
    await idle.check()  # the health check alone, no request
    assert idle.degraded
    redis_server.start()
    clock.advance(0.2)
    back = await idle.acquire(KEY, SMALL, TODAY, 30)
    assert not idle.degraded and not back.local
    assert back.wait_s == pytest.approx(0.9)  # a hold after the failure, not at once
