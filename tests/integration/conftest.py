"""Fixtures the limiter tests share: a limiter of each backend on a clock the test moves
by hand, and the event loop and redis-server the property tests replay their examples on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from proxy.harness.redis_server import RedisServer
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.pipelined_redis import PipelinedRedis
from tests.support.limiters import LimiterFactory


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[LimiterFactory]:
    """A factory for a limiter of each backend on a given clock."""
    if request.param == "memory":
        yield MemoryLimiter
        return
    server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(server.url)
    # The script runs on the pipelined client, as in the proxy.
    scripts = PipelinedRedis.from_url(server.url)
    try:
        yield lambda clock: RedisLimiter(client, scripts=scripts, clock=clock)
    finally:
        await scripts.aclose()
        await client.aclose()
        server.stop()


@pytest.fixture
def event_loop_for_hypothesis() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop of its own for hypothesis examples (they run outside pytest's loop)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def property_redis(tmp_path_factory) -> Iterator[Callable[[], RedisServer]]:
    """A redis-server for one module's property examples, started when first asked for."""
    servers: list[RedisServer] = []

    def server() -> RedisServer:
        if not servers:
            servers.append(RedisServer(tmp_path_factory.mktemp("redis-property")).start())
        return servers[0]

    yield server
    for started in servers:
        started.stop()
