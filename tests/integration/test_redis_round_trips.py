"""Round trips to Redis per request: the limiter's script calls share writes under load,
and the proxy's /metrics says how many of each there were."""

from __future__ import annotations

import asyncio
import re

import aiohttp

from proxy.admin import create_admin_app
from proxy.harness.tokens import bearer
from proxy.server import RunningServer, bind_socket, start_server

CONCURRENT = 200


async def script_counts(http: aiohttp.ClientSession, proxy: RunningServer) -> tuple[int, int]:
    """(script calls, writes that carried them) from the proxy's /metrics, over HTTP."""
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )
    try:
        async with http.get(f"{admin.url}/metrics") as answer:
            text = await answer.text()
    finally:
        await admin.stop()

    def value(name: str) -> int:
        found = re.search(rf"^{name}_total (\S+)$", text, re.MULTILINE)
        assert found is not None, f"{name}_total is not in /metrics"
        return int(float(found.group(1)))

    return value("hoopai_proxy_redis_script_calls"), value("hoopai_proxy_redis_script_writes")


async def test_concurrent_decisions_share_writes_and_one_caller_makes_one_each(
    simulator, start_proxy, redis_server, http
) -> None:
    """One caller at a time: every request's decision is a call of its own, one write each
    (at most one round trip per request). Then 200 at once, each for its own location:
    200 more decisions, carried by fewer writes than calls."""
    proxy = await start_proxy(simulator.url, store={"redis_url": redis_server.url})

    async def send(location: str) -> int:
        async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer(location)) as answer:
            await answer.read()
            return answer.status

    # Warm keys: no cold-key probe (whose counts are written at once) in what is counted.
    for location in ("one", "two", "three"):
        assert await send(location) == 200
    calls_before, writes_before = await script_counts(http, proxy)
    for _ in range(5):
        for location in ("one", "two", "three"):
            assert await send(location) == 200
    calls, writes = await script_counts(http, proxy)
    assert calls - calls_before == 15
    assert writes - writes_before == 15

    statuses = await asyncio.gather(*(send(f"many{i}") for i in range(CONCURRENT)))
    assert statuses == [200] * CONCURRENT
    calls_after, writes_after = await script_counts(http, proxy)
    # Each cold location's probe also writes its answer's counts at once.
    assert calls_after - calls >= CONCURRENT
    assert writes_after - writes < calls_after - calls
