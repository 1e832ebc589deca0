"""Limits learned from the upstream's headers (`limits.learn`), over real HTTP, against the
simulator: a key whose `X-RateLimit-Max` / `-Interval-Milliseconds` differ from the config
is decided on the upstream's numbers (only stricter ones with `down`, either way with
`up`, never with `off`), every replica on one Redis decides with what one of them learned,
`/status.json` shows it, and each change is logged once.

Counts only: what the simulator admitted and refused, and the proxy's decisions.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.support.bursts import (
    admitted,
    at_once,
    decisions,
    install,
    one_by_one,
    read_status,
    resource_row,
    status_json,
    upstream_429s,
)

W_MS = 2000
# For tests that count one window's admissions: a window longer than any run, so "still in
# the window" never depends on how fast the machine is.
HOUR_MS = 3_600_000
FOLLOW = "follow the upstream"
LEARNED_HERE = "(the upstream states)"
LEARNED_ELSEWHERE = "(another replica learned)"
CONFIGURED_AGAIN = "are the configured ones again"

pytestmark = pytest.mark.slow


def limits(burst: int, interval_ms: int, learn: str = "down", **store: Any) -> dict[str, Any]:
    """Proxy config overrides: `burst` per `interval_ms`, `learn`, queue up to 30 s."""
    overrides: dict[str, Any] = {
        "limits": {"learn": learn, "burst": {"requests": burst, "interval_ms": interval_ms}},
        "queue": {"mode": "queue", "max_wait_ms": 30_000},
    }
    if store:
        overrides["store"] = store
    return overrides


def store_for(backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """`store` settings: none (the in-process limiter) or a fresh redis-server."""
    if backend == "memory":
        return {}
    return {"redis_url": request.getfixturevalue("redis_server").url}


def lines(caplog: pytest.LogCaptureFixture, *parts: str) -> list[str]:
    """The captured log messages that contain every one of `parts`."""
    return [
        record.getMessage()
        for record in caplog.records
        if all(part in record.getMessage() for part in parts)
    ]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_stricter_upstream_limits_are_followed(
    backend: str, request: pytest.FixtureRequest, simulator, start_proxy, http, caplog
) -> None:
    """Upstream 10 per 2 s, proxy configured 20 per 2 s (learn: down): from the probe's
    answer on, the proxy holds 10 a window, so 30 concurrent are all answered 200 with no
    upstream 429; /status.json shows 10 per 2 s learned, and the change is logged once."""
    caplog.set_level(logging.INFO, logger="proxy.learned_limits")
    simulator.state.set_limits({"burst": 10, "interval_ms": W_MS, "window": "sliding"})
    token, resource = install(simulator, f"down{backend}")
    proxy = await start_proxy(simulator.url, **limits(20, W_MS, **store_for(backend, request)))
    outcomes = await at_once(http, [proxy.url], token, 30)
    status, _ = await read_status(http, proxy)
    row = resource_row(status, f"down{backend}")
    print(
        f"\n[{backend}] learn down, upstream 10/2 s, configured 20/2 s, 30 at once: "
        f"{dict(outcomes)}; upstream 429s {upstream_429s(simulator, resource)}; decisions "
        f"{decisions(proxy)}; status limits {row['limits']}"
    )
    assert outcomes == {(200, ""): 30}
    assert upstream_429s(simulator, resource) == 0
    assert admitted(simulator, resource) == 30
    # The probe and the 9 its answer left go at once; the rest queue, 10 a window.
    assert decisions(proxy) == {"sent": 10, "queued": 20}
    assert row["limits"] == {"burst": 10, "window_s": 2.0, "daily": 200_000, "learned": True}
    assert row["upstream"]["X-RateLimit-Max"] == "10"
    assert len(lines(caplog, FOLLOW, LEARNED_HERE)) == 1
    assert lines(caplog, CONFIGURED_AGAIN) == []


async def test_learn_off_sends_what_the_config_allows(simulator, start_proxy, http) -> None:
    """The same traffic with `learn: off`: the proxy keeps its 20 per 2 s and the upstream
    refuses what is over its 10 (the proxy resends those: all still end 200)."""
    simulator.state.set_limits({"burst": 10, "interval_ms": W_MS, "window": "sliding"})
    token, resource = install(simulator, "learnoff")
    proxy = await start_proxy(simulator.url, **limits(20, W_MS, learn="off"))
    outcomes = await at_once(http, [proxy.url], token, 30)
    row = resource_row(await status_json(http, proxy), "learnoff")
    refused = upstream_429s(simulator, resource)
    print(
        f"\nlearn off, upstream 10/2 s, configured 20/2 s, 30 at once: {dict(outcomes)}; "
        f"upstream 429s {refused} (learn: down has 0); decisions {decisions(proxy)}"
    )
    # The first window is held to the upstream's 10 by its Remaining count; the second
    # goes out at the configured 20, and the upstream refuses about half of it.
    assert refused > 0
    assert outcomes == {(200, ""): 30}
    assert row["limits"] == {"burst": 20, "window_s": 2.0, "daily": 200_000, "learned": False}


async def test_learn_up_follows_looser_upstream_limits(simulator, start_proxy, http) -> None:
    """Upstream 20 per hour, proxy configured 10 per hour: with `learn: up` 40 concurrent
    get 20 admissions in the window; with `down` (the control) only the configured 10."""
    simulator.state.set_limits({"burst": 20, "interval_ms": HOUR_MS, "window": "sliding"})
    up_token, up_resource = install(simulator, "learnup")
    down_token, down_resource = install(simulator, "learnupcontrol")
    up = await start_proxy(simulator.url, **limits(10, HOUR_MS, learn="up"))
    down = await start_proxy(simulator.url, **limits(10, HOUR_MS, learn="down"))
    up_outcomes = await at_once(http, [up.url], up_token, 40)
    down_outcomes = await at_once(http, [down.url], down_token, 40)
    row = resource_row(await status_json(http, up), "learnup")
    print(
        f"\nupstream 20/h, configured 10/h, 40 at once: learn up {dict(up_outcomes)}, "
        f"learn down {dict(down_outcomes)}; status limits (up) {row['limits']}"
    )
    # The rest would wait an hour, longer than they may: refused by the proxy, not sent.
    assert up_outcomes == {(200, ""): 20, (429, "rate_limited"): 20}
    assert down_outcomes == {(200, ""): 10, (429, "rate_limited"): 30}
    assert admitted(simulator, up_resource) == 20 and admitted(simulator, down_resource) == 10
    assert upstream_429s(simulator, up_resource) == upstream_429s(simulator, down_resource) == 0
    assert row["limits"] == {"burst": 20, "window_s": 3600.0, "daily": 200_000, "learned": True}


async def test_limits_one_replica_learned_decide_for_another(
    simulator, redis_server, start_proxy, http, caplog
) -> None:
    """Proxies A and B on one Redis; upstream 10 per hour, both configured 20 per hour. A
    learns 10 from one answer; B's first requests (15 at once) are decided on them: 9 sent
    (A's request took the 10th), 6 refused, none refused upstream. A logged the change
    once, B once that it adopted it."""
    caplog.set_level(logging.INFO, logger="proxy.learned_limits")
    simulator.state.set_limits({"burst": 10, "interval_ms": HOUR_MS, "window": "sliding"})
    token, resource = install(simulator, "twoproxies")
    settings = limits(20, HOUR_MS, redis_url=redis_server.url)
    proxy_a = await start_proxy(simulator.url, **settings)
    proxy_b = await start_proxy(simulator.url, **settings)

    assert await one_by_one(http, proxy_a.url, token, 1) == [200]
    assert len(lines(caplog, FOLLOW, LEARNED_HERE)) == 1
    outcomes = await at_once(http, [proxy_b.url], token, 15)
    row_b = resource_row(await status_json(http, proxy_b), "twoproxies")
    print(
        f"\nA learned 10/h from one answer; 15 at once via B: {dict(outcomes)}; B's "
        f"decisions {decisions(proxy_b)}; upstream 429s {upstream_429s(simulator, resource)}"
    )
    assert decisions(proxy_b) == {"sent": 9, "refused_burst": 6}
    assert outcomes == {(200, ""): 9, (429, "rate_limited"): 6}
    assert upstream_429s(simulator, resource) == 0
    assert row_b["limits"] == {"burst": 10, "window_s": 3600.0, "daily": 200_000, "learned": True}
    assert len(lines(caplog, FOLLOW, LEARNED_HERE)) == 1
    assert len(lines(caplog, FOLLOW, LEARNED_ELSEWHERE)) == 1
    assert lines(caplog, CONFIGURED_AGAIN) == []


async def test_each_change_is_logged_once(simulator, start_proxy, http, caplog) -> None:
    """Answers that state the same limits log nothing new; each change of the upstream's
    limits (set through the simulator's control endpoint) is one line, and limits equal to
    the configuration again are one line saying so."""
    caplog.set_level(logging.INFO, logger="proxy.learned_limits")
    token, _ = install(simulator, "logonce")
    proxy = await start_proxy(simulator.url, **limits(20, HOUR_MS))

    async def upstream_allows(burst: int) -> None:
        async with http.post(
            f"{simulator.url}/_sim/limits", json={"burst": burst, "interval_ms": HOUR_MS}
        ) as answer:
            assert answer.status == 200

    await upstream_allows(100)
    assert await one_by_one(http, proxy.url, token, 3) == [200] * 3
    await upstream_allows(15)
    assert await one_by_one(http, proxy.url, token, 3) == [200] * 3
    after_first = lines(caplog, FOLLOW)
    await upstream_allows(12)
    assert await one_by_one(http, proxy.url, token, 3) == [200] * 3
    after_second = lines(caplog, FOLLOW)
    await upstream_allows(20)
    # 9 sent of the learned 12: 3 more fit, and their answers state the configured 20.
    assert await one_by_one(http, proxy.url, token, 3) == [200] * 3
    row = resource_row(await status_json(http, proxy), "logonce")
    print(f"\nlog lines: {lines(caplog, 'limits for')}")
    # 100 per hour is looser than configured (learn: down keeps 20): nothing to log.
    assert len(after_first) == 1 and "15 per 3600 s" in after_first[0]
    assert len(after_second) == 2 and "12 per 3600 s" in after_second[1]
    assert len(lines(caplog, FOLLOW)) == 2
    assert len(lines(caplog, CONFIGURED_AGAIN)) == 1
    assert row["limits"]["learned"] is False


async def test_a_change_under_load_is_logged_once(
    simulator, redis_server, start_proxy, http, caplog
) -> None:
    """The upstream lowers a learned limit (50 per hour to 40) while 30 requests are under
    way through a proxy on Redis: the change is logged once, and no decision made before it
    reached Redis reads as another replica's learning."""
    caplog.set_level(logging.INFO, logger="proxy.learned_limits")
    simulator.state.set_limits({"burst": 50, "interval_ms": HOUR_MS, "window": "sliding"})
    token, resource = install(simulator, "underload")
    proxy = await start_proxy(simulator.url, **limits(100, HOUR_MS, redis_url=redis_server.url))
    assert await one_by_one(http, proxy.url, token, 1) == [200]
    simulator.state.set_limits({"burst": 40})
    outcomes = await at_once(http, [proxy.url], token, 30)
    row = resource_row(await status_json(http, proxy), "underload")
    print(f"\n30 at once after the upstream went 50 -> 40 per hour: {dict(outcomes)}")
    print("\n".join(lines(caplog, "limits for")))
    assert outcomes == {(200, ""): 30}
    assert upstream_429s(simulator, resource) == 0
    follow = lines(caplog, FOLLOW)
    assert len(follow) == 2 and "50 per 3600 s" in follow[0] and "40 per 3600 s" in follow[1]
    assert lines(caplog, LEARNED_ELSEWHERE) == []
    assert row["limits"] == {"burst": 40, "window_s": 3600.0, "daily": 200_000, "learned": True}


async def test_redis_down_share_is_not_learned(
    simulator, redis_server, start_proxy, http, caplog
) -> None:
    """While Redis is down a replica decides on its share of the limits (1/2 here): that
    share is not taken for limits another replica learned (which would halve it again at
    each decision and refuse requests): every request is answered 200, nothing is logged,
    and /status.json shows the configured limits."""
    caplog.set_level(logging.INFO, logger="proxy.learned_limits")
    token, _ = install(simulator, "redisdown")
    store = {"redis_url": redis_server.url, "on_redis_error": "local", "expected_replicas": 2}
    proxy = await start_proxy(
        simulator.url,
        limits={"burst": {"requests": 10, "interval_ms": 1000}},
        queue={"mode": "queue", "max_wait_ms": 30_000},
        store=store,
    )
    assert await one_by_one(http, proxy.url, token, 2) == [200] * 2
    redis_server.stop(kill=True)
    assert await one_by_one(http, proxy.url, token, 4) == [200] * 4
    outcomes = await at_once(http, [proxy.url], token, 4)
    row = resource_row(await status_json(http, proxy), "redisdown")
    print(f"\nRedis down, 4 one by one and 4 at once: {dict(outcomes)}; {row['limits']}")
    assert outcomes == {(200, ""): 4}
    assert lines(caplog, "limits for") == []
    assert row["limits"] == {"burst": 10, "window_s": 1.0, "daily": 200_000, "learned": False}
