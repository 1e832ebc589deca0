"""Admission's own timing: the pad is measured from the slot, not from when admission
returned, and a cold key's probe that gets no answer lets the others go on every replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from multidict import CIMultiDict

from proxy.admission import Admission, limits_from
from proxy.config import BurstConfig, LimitsConfig, QueueConfig
from proxy.harness.redis_server import RedisServer
from proxy.limiter.base import Limiter
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.metrics import Metrics
from proxy.status import StatusBoard
from tests.support.limiters import KEY

# 1 per 0.2 s, a 50 ms pad floor, a ceiling well above the stall below.
LIMITS = LimitsConfig(burst=BurstConfig(requests=1, interval_ms=200, pad_ms=50, max_pad_ms=2000))
# The second request's slot is 0.25 s after the first (W + pad); the stall outlasts it by
# at least 0.35 s (time.sleep sleeps at least that long).
STALL_S = 0.6
LATE_S = STALL_S - 0.25


def admission(limiter: Limiter) -> Admission:
    board = StatusBoard(limits_from(LIMITS))
    return Admission(limiter, LIMITS, QueueConfig(), metrics=Metrics(), board=board)


async def test_the_pad_counts_a_stall_between_the_slot_and_the_send() -> None:
    """A queued request whose process stalls past its slot is sent late: the time from
    its slot to the answer includes the stall, so the pad learns it and the request's
    bound moves to its answer (the next request waits W after that, not after the
    bound it was given)."""
    limiter = MemoryLimiter()
    gate = admission(limiter)
    first = await gate.admit(KEY, 5.0)
    await gate.observe(KEY, 200, CIMultiDict(), first)
    queued = asyncio.create_task(gate.admit(KEY, 5.0))
    await asyncio.sleep(0)  # the second request is decided and held for its slot
    # The whole process stalls (a busy machine) past that slot: deliberately blocking.
    time.sleep(STALL_S)  # noqa: ASYNC251
    second = await queued
    await gate.observe(KEY, 200, CIMultiDict(), second)
    assert gate.pad.pad_s >= LATE_S
    third = await limiter.acquire(KEY, gate.limits_for(KEY), gate.today(), 5.0)
    # W after the second's answer (now), not W after its bound (long past: no wait).
    assert third.wait_s >= 0.2 - 0.05


@pytest.fixture
async def shared(tmp_path) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter]]:
    server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(server.url)
    try:
        yield RedisLimiter(client), RedisLimiter(client)
    finally:
        await client.aclose()
        server.stop()


async def test_a_probe_that_got_no_answer_lets_every_replica_go(shared) -> None:
    """Replica A's first request to a cold key is its probe; its send fails. Settling it
    ends the probe in Redis too: replica B decides at once, not told to wait for it."""
    a_limiter, b_limiter = shared
    a, b = admission(a_limiter), admission(b_limiter)
    probe = await a.admit(KEY, 5.0)
    assert probe.probe == "this"
    told = await b_limiter.acquire(KEY, b.limits_for(KEY), b.today(), 5.0, probe_s=1.0)
    assert told.probe == "other" and not told.admitted
    await a.settle(KEY, probe)  # the send failed: no answer, no counts
    after = await b_limiter.acquire(KEY, b.limits_for(KEY), b.today(), 5.0, probe_s=1.0)
    assert after.admitted and after.probe == ""
