"""Limits through one proxy over real HTTP, against the simulator: queue, reject, headers,
upstream sync, resends after an upstream 429, shadow mode, and callers that hang up."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import SIM_CLIENT_ID

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "limitLoc01"
RESOURCE = f"{APP_ID}:location:{LOCATION}"
N, W_MS, PAD_MS = 20, 1000, 50
FIVE = (
    "X-RateLimit-Limit-Daily",
    "X-RateLimit-Daily-Remaining",
    "X-RateLimit-Interval-Milliseconds",
    "X-RateLimit-Max",
    "X-RateLimit-Remaining",
)


def small_limits(mode: str = "queue", max_wait_ms: int = 30_000, **limits: Any) -> dict[str, Any]:
    """Proxy config overrides: N per W with pad, and the queue mode."""
    return {
        "limits": {"burst": {"requests": N, "interval_ms": W_MS, "pad_ms": PAD_MS}, **limits},
        "queue": {"mode": mode, "max_wait_ms": max_wait_ms},
    }


@pytest.fixture
def token(simulator) -> str:
    """A location access token from the simulator; the simulator allows N per W."""
    simulator.state.set_limits({"burst": N, "interval_ms": W_MS, "window": "sliding"})
    return str(simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"])


async def call(
    http: aiohttp.ClientSession, url: str, token: str, index: int = 0, **headers: str
) -> tuple[int, dict[str, str], Any]:
    """One GET through the proxy with the caller's own token; (status, headers, json)."""
    sent = {"Authorization": f"Bearer {token}", **headers}
    async with http.get(f"{url}/contacts/?i={index}", headers=sent) as response:
        return response.status, dict(response.headers), json.loads(await response.read())


async def test_reject_mode_admits_exactly_n_of_5n(simulator, start_proxy, http, token) -> None:
    """5N concurrent requests with queue.mode reject: exactly N reach the upstream."""
    proxy = await start_proxy(simulator.url, **small_limits(mode="reject"))
    results = await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(5 * N)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == N
    assert statuses.count(429) == 4 * N
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == N
    assert simulator.state.stats()["rate_limited"] == 0


async def test_proxy_429_has_retry_after_five_headers_and_json(
    simulator, start_proxy, http, token
) -> None:
    """A 429 made by the proxy tells the caller when to retry, in the upstream's format."""
    proxy = await start_proxy(simulator.url, **small_limits(mode="reject"))
    await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(N)))
    status, headers, body = await call(http, proxy.url, token)
    assert status == 429
    assert body["statusCode"] == 429 and body["error"] == "rate_limited"
    assert LOCATION in body["message"] and "X-HoopAI-Max-Wait-Ms" in body["message"]
    assert 1 <= int(headers["Retry-After"]) <= 2
    assert {name: headers[name] for name in FIVE} == {
        "X-RateLimit-Limit-Daily": "200000",
        "X-RateLimit-Daily-Remaining": str(200000 - N),
        "X-RateLimit-Interval-Milliseconds": str(W_MS),
        "X-RateLimit-Max": str(N),
        "X-RateLimit-Remaining": "0",
    }
    assert headers["RateLimit-Policy"] == f'"burst";q={N};w=1, "daily";q=200000;w=86400'
    assert headers["RateLimit"].startswith('"burst";r=0;t=')


async def test_queue_serves_5n_in_arrival_order_over_five_windows(
    simulator, start_proxy, http, token
) -> None:
    """5N queued requests all succeed, window by window in arrival order, never more than
    N in any window at the upstream."""
    proxy = await start_proxy(simulator.url, **small_limits())
    tasks = []
    for index in range(5 * N):
        tasks.append(asyncio.create_task(call(http, proxy.url, token, index)))
        await asyncio.sleep(0.001)  # a definite arrival order
    results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * (5 * N)
    hold_ms = W_MS + PAD_MS
    windows = [round(int(headers["X-HoopAI-Queue-Ms"]) / hold_ms) for _, headers, _ in results]
    assert windows == [index // N for index in range(5 * N)]
    stats = simulator.state.stats()
    assert stats["rate_limited"] == 0
    assert stats["per_resource"][RESOURCE]["max_in_window"] <= N


async def test_real_limits_100_per_10s(simulator, start_proxy, http, token) -> None:
    """At the real numbers (100 per 10 s): 500 concurrent with reject admit exactly 100."""
    simulator.state.set_limits({"burst": 100, "interval_ms": 10_000})
    proxy = await start_proxy(simulator.url, queue={"mode": "reject"})
    results = await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(500)))
    assert [status for status, _, _ in results].count(200) == 100
    assert simulator.state.stats()["rate_limited"] == 0
    assert results[-1][1]["X-RateLimit-Max"] == "100"


async def test_forwarded_answer_mirrors_upstream_headers_and_adds_proxy_view(
    simulator, start_proxy, http, token
) -> None:
    """Upstream X-RateLimit-* reach the caller verbatim, plus Queue-Ms and RateLimit fields."""
    proxy = await start_proxy(simulator.url, **small_limits())
    status, headers, _ = await call(http, proxy.url, token)
    assert status == 200
    assert headers["X-RateLimit-Max"] == str(N)
    assert headers["X-RateLimit-Remaining"] == str(N - 1)
    assert headers["X-RateLimit-Interval-Milliseconds"] == str(W_MS)
    assert int(headers["X-HoopAI-Queue-Ms"]) < W_MS / 2
    assert headers["RateLimit"].startswith(f'"burst";r={N - 1};')


async def test_max_wait_header_only_lowers_the_wait(simulator, start_proxy, http, token) -> None:
    """X-HoopAI-Max-Wait-Ms: 0 refuses at once; a larger value than config is capped;
    a malformed one is a 400 that says what to send."""
    proxy = await start_proxy(simulator.url, **small_limits(max_wait_ms=200))
    await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(N)))
    assert (await call(http, proxy.url, token, **{"X-HoopAI-Max-Wait-Ms": "0"}))[0] == 429
    capped = await call(http, proxy.url, token, **{"X-HoopAI-Max-Wait-Ms": "60000"})
    assert capped[0] == 429 and capped[2]["error"] == "rate_limited"
    bad = await call(http, proxy.url, token, **{"X-HoopAI-Max-Wait-Ms": "soon"})
    assert bad[0] == 400 and "milliseconds" in bad[2]["message"]


async def test_bypass_traffic_slows_the_proxy_down(simulator, start_proxy, http, token) -> None:
    """Requests sent straight to the upstream count: the proxy holds back accordingly."""
    proxy = await start_proxy(simulator.url, **small_limits())
    direct = {"Authorization": f"Bearer {token}", "Version": "2021-07-28"}
    for index in range(N - 2):
        async with http.get(f"{simulator.url}/contacts/?direct={index}", headers=direct) as r:
            assert r.status == 200
    assert (await call(http, proxy.url, token))[0] == 200  # learns: 1 remains upstream
    results = await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(N)))
    assert [status for status, _, _ in results] == [200] * N
    assert simulator.state.stats()["rate_limited"] == 0
    assert simulator.state.stats()["per_resource"][RESOURCE]["max_in_window"] <= N


async def test_upstream_429_is_resent_after_the_pause(simulator, start_proxy, http, token) -> None:
    """An upstream 429 pauses the key for a window; the request is sent again and succeeds."""
    proxy = await start_proxy(simulator.url, **small_limits())
    simulator.state.set_faults({"force_429": 1})
    status, headers, body = await call(http, proxy.url, token)
    assert status == 200 and body["path"] == "/contacts/"
    # Held a whole window after the 429 before the resend went out.
    assert int(headers["X-HoopAI-Queue-Ms"]) >= W_MS
    stats = simulator.state.stats()
    assert stats["rate_limited"] == 1
    assert stats["per_resource"][RESOURCE]["requests"] == 2  # the resend took a slot too


async def test_upstream_429_is_returned_when_the_deadline_is_too_short(
    simulator, start_proxy, http, token
) -> None:
    """If the pause outlasts the caller's max wait, the upstream's own 429 comes back."""
    proxy = await start_proxy(simulator.url, **small_limits())
    simulator.state.set_faults({"force_429": 1})
    status, headers, body = await call(http, proxy.url, token, **{"X-HoopAI-Max-Wait-Ms": "100"})
    assert status == 429
    assert body.get("error") != "rate_limited"  # the simulator's body, relayed
    assert headers["X-RateLimit-Remaining"] is not None
    # The pause holds for the next caller too: refused by the proxy, not sent.
    before = simulator.state.stats()["requests"]
    refused = await call(http, proxy.url, token, **{"X-HoopAI-Max-Wait-Ms": "0"})
    assert refused[0] == 429 and refused[2]["error"] == "rate_limited"
    assert simulator.state.stats()["requests"] == before


async def test_shadow_mode_reports_but_never_holds(simulator, start_proxy, http, token) -> None:
    """In shadow mode every request goes at once; answers say what enforce would do."""
    proxy_limits = {"burst": {"requests": N, "interval_ms": W_MS, "pad_ms": PAD_MS}}
    proxy = await start_proxy(
        simulator.url,
        limits={"mode": "shadow", **proxy_limits},
        queue={"mode": "queue", "max_wait_ms": 500},
    )
    results = await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(3 * N)))
    # Held for no slot: far less than the W a queued request would wait.
    assert all(int(headers["X-HoopAI-Queue-Ms"]) < W_MS / 2 for _, headers, _ in results)
    assert all(body.get("error") != "rate_limited" for _, _, body in results)
    verdicts = [headers.get("X-HoopAI-Shadow-Decision", "") for _, headers, _ in results]
    assert sum(v.startswith("reject; limit=burst") for v in verdicts) == 2 * N
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == 3 * N


async def test_caller_hanging_up_while_queued_sends_nothing(
    simulator, start_proxy, http, token
) -> None:
    """A queued request whose caller disconnects is never sent upstream."""
    proxy = await start_proxy(simulator.url, **small_limits())
    await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(N)))
    waiting = asyncio.create_task(call(http, proxy.url, token, 999))
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep((W_MS + PAD_MS) / 1000 + 0.3)
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == N


async def test_unresolvable_request_is_400_with_advice(simulator, start_proxy, http) -> None:
    """No header, token, query, path or body id: 400 saying which header to send."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}/contacts/") as response:
        body = await response.json()
    assert response.status == 400
    assert body["error"] == "resource_unresolved"
    assert "X-HoopAI-Location-Id" in body["message"]
    assert simulator.state.stats()["requests"] == 0
