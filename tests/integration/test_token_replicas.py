"""Tokens across proxy processes sharing one Redis: one refresh for a storm on three
replicas, and what happens when the replica holding the refresh lock is killed."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.leaks import leaked

pytestmark = pytest.mark.slow

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "replicaLoc01"
RESOURCE = f"{APP_ID}:location:{LOCATION}"
ROOMY = {"burst": {"requests": 100_000}}


def shared(redis_server, **more: Any) -> dict[str, Any]:
    """Config overrides for replicas that share `redis_server` for limits and tokens."""
    return {"store": {"redis_url": redis_server.url}, "limits": ROOMY, **more}


async def install(http: aiohttp.ClientSession, proxy_url: str, simulator) -> None:
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy_url, code)


async def managed(http: aiohttp.ClientSession, proxy_url: str, index: int = 0) -> tuple[int, Any]:
    headers = {"X-HoopAI-Location-Id": LOCATION}
    async with http.get(f"{proxy_url}/contacts/?i={index}", headers=headers) as answer:
        return answer.status, await answer.json()


async def test_refresh_storm_on_three_replicas_refreshes_once(
    simulator, spawn_proxy, redis_server, http
) -> None:
    """3 replicas x 300 concurrent requests on an expired token: the upstream sees exactly
    one refresh and no use of a dead refresh token; every request succeeds; no token
    appears in any replica's log."""
    simulator.state.set_limits({"burst": 100_000})
    proxies = [spawn_proxy(simulator.url, **shared(redis_server)) for _ in range(3)]
    await install(http, proxies[0].url, simulator)
    simulator.state.expire_tokens(RESOURCE)
    results = await asyncio.gather(
        *(managed(http, proxy.url, i) for proxy in proxies for i in range(300))
    )
    statuses = [status for status, _ in results]
    stats = simulator.state.stats()
    ok, dead = statuses.count(200), stats["dead_refresh_token_uses"]
    print(
        f"\nstorm, 3 replicas on Redis: {len(statuses)} requests, {ok} ok, "
        f"{stats['refreshes']} refresh, {dead} dead-token uses"
    )
    assert statuses == [200] * 900
    assert stats["refreshes"] == 1
    assert stats["dead_refresh_token_uses"] == 0
    for proxy in proxies:
        proxy.stop()
    logs = [proxy.logs() for proxy in proxies]
    assert leaked(logs, simulator.state.tokens.issued()) == []


async def wait_for_lock(redis_url: str, request: asyncio.Task[Any]) -> None:
    """Until some replica holds a refresh lock, taken for `request`."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        while not await client.keys("hoopai:lock:*"):
            assert not request.done(), "the request ended and nobody took the lock"
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


FAST_LOCK = {
    "upstream": {"timeout_s": 2, "connect_timeout_s": 1},
    "tokens": {"refresh_lock_ttl_s": 4},
}


async def test_lock_holder_killed_before_the_upstream_rotated(
    simulator, spawn_proxy, redis_server, http
) -> None:
    """The replica refreshing is killed (-9) before the upstream processed its refresh:
    the lock expires, another replica refreshes, and its requests succeed."""
    holder, other = (
        spawn_proxy(simulator.url, **shared(redis_server, **FAST_LOCK)) for _ in range(2)
    )
    await install(http, holder.url, simulator)
    simulator.state.expire_tokens(RESOURCE)
    simulator.state.set_faults({"token_accept_delay_ms": 10_000})
    requests_before = simulator.state.stats()["token_requests"]
    doomed = asyncio.create_task(managed(http, holder.url))
    await wait_for_lock(redis_server.url, doomed)
    # Killed only once the simulator holds its refresh in the accept delay: killed earlier,
    # the request could still sit unread and be processed after the delay is lifted.
    while simulator.state.stats()["token_requests"] == requests_before:
        assert not doomed.done(), "the request ended before its refresh reached the upstream"
        await asyncio.sleep(0.02)
    assert holder.process is not None
    holder.process.kill()
    simulator.state.set_faults({"token_accept_delay_ms": 0})
    status, _ = await managed(http, other.url)
    assert status == 200
    stats = simulator.state.stats()
    assert (stats["refreshes"], stats["dead_refresh_token_uses"]) == (1, 0)
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)


async def test_lock_holder_killed_after_the_upstream_rotated_loses_the_install(
    simulator, spawn_proxy, redis_server, http
) -> None:
    """The replica refreshing is killed (-9) after the upstream rotated the token but before
    the new pair was stored: the new pair is lost with the process, the stored refresh token
    is dead, and the next refresh marks the resource for reinstall (401
    reauthorization_required). Nothing can recover this; the README says so."""
    holder, other = (
        spawn_proxy(simulator.url, **shared(redis_server, **FAST_LOCK)) for _ in range(2)
    )
    await install(http, holder.url, simulator)
    simulator.state.expire_tokens(RESOURCE)
    simulator.state.set_faults({"token_latency_ms": 10_000})  # rotates, then answers late
    doomed = asyncio.create_task(managed(http, holder.url))
    await wait_for_lock(redis_server.url, doomed)
    while simulator.state.stats()["refreshes"] < 1:  # until the upstream has rotated
        assert not doomed.done(), "the request ended before the upstream rotated"
        await asyncio.sleep(0.02)
    assert holder.process is not None
    holder.process.kill()
    simulator.state.set_faults({"token_latency_ms": 0})
    status, body = await managed(http, other.url)
    assert status == 401 and body["error"] == "reauthorization_required"
    stats = simulator.state.stats()
    assert (stats["refreshes"], stats["dead_refresh_token_uses"]) == (1, 1)
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
