"""Cold keys over real HTTP, against the simulator: traffic the proxy never saw (sent
straight to the API) may already fill the upstream's window when the proxy first sees a
key. Its first request goes alone (the probe) and the others wait for its answer, so a
burst through the proxy costs at most one upstream 429 however full the window was; the
probe is shared by every replica on one Redis, and a key idle for a window is probed again.

Counts only: what the simulator admitted and refused, and what callers got back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.limiter.memory import MemoryLimiter
from proxy.server import RunningServer
from proxy.services import SERVICES
from proxy.typing import ResourceKey
from tests.support.bursts import APP_ID, at_once, install, one_by_one, upstream_429s

N, W_MS = 20, 2000

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def upstream_limits(simulator) -> None:
    """The simulator allows N per W, in a sliding window."""
    simulator.state.set_limits({"burst": N, "interval_ms": W_MS, "window": "sliding"})


def settings(**store: str) -> dict[str, Any]:
    """Proxy config overrides: the upstream's own N per W, queue up to 30 s."""
    overrides: dict[str, Any] = {
        "limits": {"burst": {"requests": N, "interval_ms": W_MS}},
        "queue": {"mode": "queue", "max_wait_ms": 30_000},
    }
    if store:
        overrides["store"] = store
    return overrides


async def episode(
    simulator: Any, http: Any, urls: list[str], token: str, resource: str, *, direct: int
) -> tuple[int, dict[tuple[int, str], int]]:
    """`direct` calls straight to the simulator (all admitted), then 30 at once through
    `urls` (split evenly): the upstream 429s the proxied ones met, and their outcomes."""
    assert await one_by_one(http, simulator.url, token, direct) == [200] * direct
    before = upstream_429s(simulator, resource)
    outcomes = await at_once(http, urls, token, 30 // len(urls))
    return upstream_429s(simulator, resource) - before, dict(outcomes)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_bypassed_requests_then_a_burst(
    backend: str, request: pytest.FixtureRequest, simulator, start_proxy, http
) -> None:
    """10 sent straight to the API, then 30 at once through the proxy: every one is
    answered 200 and the upstream refuses at most one."""
    store = (
        {} if backend == "memory" else {"redis_url": request.getfixturevalue("redis_server").url}
    )
    token, resource = install(simulator, f"bypass{backend}")
    proxy = await start_proxy(simulator.url, **settings(**store))
    refused, outcomes = await episode(simulator, http, [proxy.url], token, resource, direct=10)
    print(f"\n[{backend}] 10 direct, 30 at once: {outcomes}; upstream 429s {refused}")
    assert outcomes == {(200, ""): 30}
    assert refused <= 1


async def test_window_already_full(simulator, start_proxy, http) -> None:
    """N sent straight to the API fill its window: the probe alone meets the 429, and the
    30 sent at once through the proxy are all answered 200."""
    token, resource = install(simulator, "fullwindow")
    proxy = await start_proxy(simulator.url, **settings())
    refused, outcomes = await episode(simulator, http, [proxy.url], token, resource, direct=N)
    print(f"\n{N} direct, 30 at once: {outcomes}; upstream 429s {refused}")
    assert outcomes == {(200, ""): 30}
    assert refused <= 1


async def test_two_replicas_share_the_probe(simulator, redis_server, start_proxy, http) -> None:
    """The window full from direct traffic, then 15 at once through each of two proxies on
    one Redis: one probe for both, so at most one upstream 429 in all, and all 200."""
    token, resource = install(simulator, "tworeplicas")
    proxies = [
        await start_proxy(simulator.url, **settings(redis_url=redis_server.url)) for _ in range(2)
    ]
    refused, outcomes = await episode(
        simulator, http, [proxy.url for proxy in proxies], token, resource, direct=N
    )
    print(f"\n{N} direct, 15 at once via each of 2 replicas: {outcomes}; upstream 429s {refused}")
    assert outcomes == {(200, ""): 30}
    assert refused <= 1


async def test_idle_key_is_probed_again(simulator, start_proxy, http) -> None:
    """Once nothing of a key is in the proxy's hold, it is cold again: a second episode of
    a full window from direct traffic, then 30 through the proxy, again costs at most one
    upstream 429."""
    location = "idlekey"
    token, resource = install(simulator, location)
    proxy = await start_proxy(simulator.url, **settings())
    first = await episode(simulator, http, [proxy.url], token, resource, direct=N)
    await until_idle(proxy, simulator, ResourceKey(APP_ID, "location", location), resource)
    second = await episode(simulator, http, [proxy.url], token, resource, direct=N)
    print(f"\nepisodes of {N} direct + 30 at once: (upstream 429s, outcomes) {first}, {second}")
    for refused, outcomes in (first, second):
        assert outcomes == {(200, ""): 30}
        assert refused <= 1


async def until_idle(proxy: RunningServer, simulator: Any, key: ResourceKey, resource: str) -> None:
    """Return once the proxy holds no slot of `key` (its hold is over: the key is cold)
    and the simulator's window of `resource` is empty."""
    services = proxy.runner.app[SERVICES]
    limiter = services.limiter
    assert isinstance(limiter, MemoryLimiter)
    limits = services.admission.limits_for(key)
    state = simulator.state
    while True:
        held = limiter.slots_from_now(key, limits)
        if not held and state.limits.view(resource, state.now()).burst_remaining == N:
            return
        await asyncio.sleep(0.05)
