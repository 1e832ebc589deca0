"""Limits through one proxy over real HTTP, against the simulator: queue, reject, headers,
upstream sync, resends after an upstream 429, shadow mode, and callers that hang up."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import aiohttp
import pytest

from proxy.server import RunningServer
from proxy.services import SERVICES
from tests.conftest import SIM_CLIENT_ID
from tests.support.bursts import decisions

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "limitLoc01"
RESOURCE = f"{APP_ID}:location:{LOCATION}"
N, W_MS, PAD_MS = 20, 1000, 50
# For tests that refuse within a window, never wait one out: a window longer than any run,
# so "still in the window" never depends on how fast the machine is.
HOUR_MS = 3_600_000
FIVE = (
    "X-RateLimit-Limit-Daily",
    "X-RateLimit-Daily-Remaining",
    "X-RateLimit-Interval-Milliseconds",
    "X-RateLimit-Max",
    "X-RateLimit-Remaining",
)


def small_limits(
    mode: str = "queue", max_wait_ms: int = 30_000, window_ms: int = W_MS, pad_ms: int = PAD_MS
) -> dict[str, Any]:
    """Proxy config overrides: N per window (W unless told) with pad, and the queue mode."""
    return {
        "limits": {"burst": {"requests": N, "interval_ms": window_ms, "pad_ms": pad_ms}},
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


def held_now(proxy: RunningServer) -> int:
    """Requests the proxy is holding for a slot right now."""
    registry = proxy.runner.app[SERVICES].metrics.registry
    return int(registry.get_sample_value("hoopai_proxy_requests_waiting") or 0)


async def until_decided(proxy: RunningServer, count: int, request: asyncio.Task[Any]) -> None:
    """Return once the proxy has decided `count` requests, the last of them `request`.

    The decision and the start of any hold happen in one step, so once this returns the
    proxy's metrics say whether `request` is held.
    """
    while sum(decisions(proxy).values()) < count:
        assert not request.done(), f"request {count - 1} ended undecided: {request.result()}"
        await asyncio.sleep(0.001)


async def test_reject_mode_admits_exactly_n_of_5n(simulator, start_proxy, http, token) -> None:
    """5N concurrent requests with queue.mode reject: exactly N reach the upstream."""
    proxy = await start_proxy(simulator.url, **small_limits(mode="reject", window_ms=HOUR_MS))
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
    proxy = await start_proxy(simulator.url, **small_limits(mode="reject", window_ms=HOUR_MS))
    await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(N)))
    status, headers, body = await call(http, proxy.url, token)
    assert status == 429
    assert body["statusCode"] == 429 and body["error"] == "rate_limited"
    assert LOCATION in body["message"] and "X-HoopAI-Max-Wait-Ms" in body["message"]
    # Whole seconds, at least one, and no later than a window from now.
    assert 1 <= int(headers["Retry-After"]) <= math.ceil((HOUR_MS + PAD_MS) / 1000)
    assert {name: headers[name] for name in FIVE} == {
        "X-RateLimit-Limit-Daily": "200000",
        "X-RateLimit-Daily-Remaining": str(200000 - N),
        "X-RateLimit-Interval-Milliseconds": str(HOUR_MS),
        "X-RateLimit-Max": str(N),
        "X-RateLimit-Remaining": "0",
    }
    assert headers["RateLimit-Policy"] == f'"burst";q={N};w=3600, "daily";q=200000;w=86400'
    assert headers["RateLimit"].startswith('"burst";r=0;t=')


async def test_queue_serves_5n_in_arrival_order_over_five_windows(
    simulator, start_proxy, http, token
) -> None:
    """5N queued requests all succeed, window by window in arrival order, never more than
    N in any window at the upstream."""
    # The subject is order, not jitter: a pad far above any delay between a slot and the
    # simulator's count of it (this event loop runs both), even on a loaded machine.
    proxy = await start_proxy(simulator.url, **small_limits(pad_ms=250))
    sent_at: list[float] = []
    answered_at: dict[int, float] = {}

    async def timed(index: int) -> tuple[int, dict[str, str], Any]:
        result = await call(http, proxy.url, token, index)
        answered_at[index] = time.monotonic()
        return result

    tasks = []
    for index in range(5 * N):
        sent_at.append(time.monotonic())
        tasks.append(asyncio.create_task(timed(index)))
        # A definite arrival order: request i + 1 leaves once the proxy has decided request i.
        await until_decided(proxy, index + 1, tasks[-1])
    results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * (5 * N)
    assert decisions(proxy) == {"sent": N, "queued": 4 * N}
    # Request i is held to window i // N: answered no sooner than that many windows after
    # the first request of its column was sent (W, not W + pad: the slot is reckoned on the
    # wall clock, the hold on the monotonic one)...
    early = [
        index
        for index in range(N, 5 * N)
        if answered_at[index] - sent_at[index % N] < (index // N) * W_MS / 1000
    ]
    assert early == []
    # ...and windows are served in arrival order: each answer comes before the answer to
    # the request N places after it, which was held a whole window longer.
    overtaken = [index for index in range(N, 5 * N) if answered_at[index] < answered_at[index - N]]
    assert overtaken == []
    stats = simulator.state.stats()
    assert stats["rate_limited"] == 0
    assert stats["per_resource"][RESOURCE]["requests"] == 5 * N
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
    assert int(headers["X-HoopAI-Queue-Ms"]) >= 0
    assert decisions(proxy) == {"sent": 1}  # not held: the slot was free
    assert headers["RateLimit"].startswith(f'"burst";r={N - 1};')


async def test_max_wait_header_only_lowers_the_wait(simulator, start_proxy, http, token) -> None:
    """X-HoopAI-Max-Wait-Ms: 0 refuses at once; a larger value than config is capped;
    a malformed one is a 400 that says what to send."""
    proxy = await start_proxy(simulator.url, **small_limits(max_wait_ms=200, window_ms=HOUR_MS))
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
    # The resend was held for the pause after the 429, and the header says so: it is the
    # time held (never the upstream's), at least the hold the limiter asked for.
    assert decisions(proxy) == {"sent": 1, "queued": 1}
    hold_s = proxy.runner.app[SERVICES].metrics.registry.get_sample_value(
        "hoopai_proxy_queue_seconds_sum"
    )
    assert hold_s is not None and hold_s > 0
    assert int(headers["X-HoopAI-Queue-Ms"]) >= hold_s * 1000 - 1
    stats = simulator.state.stats()
    assert stats["rate_limited"] == 1
    assert stats["per_resource"][RESOURCE]["requests"] == 2  # the resend took a slot too


async def test_upstream_429_is_returned_when_the_deadline_is_too_short(
    simulator, start_proxy, http, token
) -> None:
    """If the pause outlasts the caller's max wait, the upstream's own 429 comes back."""
    proxy = await start_proxy(simulator.url, **small_limits(window_ms=HOUR_MS))
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
    # N an hour: enforce would hold the second N for about an hour (they may wait two),
    # and refuse the third N, which may not wait at all.
    proxy = await start_proxy(
        simulator.url,
        limits={"mode": "shadow", "burst": {"requests": N, "interval_ms": HOUR_MS}},
        queue={"mode": "queue", "max_wait_ms": 2 * HOUR_MS},
    )
    no_wait = {"X-HoopAI-Max-Wait-Ms": "0"}
    tasks, held = [], []
    for index in range(3 * N):
        headers = no_wait if index >= 2 * N else {}
        tasks.append(asyncio.create_task(call(http, proxy.url, token, index, **headers)))
        await until_decided(proxy, index + 1, tasks[-1])
        held.append(held_now(proxy))  # enforce would be holding the second N by now
    assert held == [0] * (3 * N)
    results = await asyncio.gather(*tasks)
    assert decisions(proxy) == {"sent": N, "shadow_would_queue": N, "shadow_would_refuse": N}
    assert all(body.get("error") != "rate_limited" for _, _, body in results)
    verdicts = [headers.get("X-HoopAI-Shadow-Decision", "") for _, headers, _ in results]
    assert verdicts[:N] == [""] * N
    assert all(v.startswith("queue; wait_ms=") for v in verdicts[N : 2 * N]), verdicts
    assert all(v.startswith("reject; limit=burst") for v in verdicts[2 * N :]), verdicts
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == 3 * N


async def test_caller_hanging_up_while_queued_sends_nothing(
    simulator, start_proxy, http, token
) -> None:
    """A queued request whose caller disconnects is never sent upstream."""
    # Only the proxy's limit applies: an upstream 429 (a late arrival seen in the previous
    # window) would make the proxy send a request twice and muddle the counts below.
    simulator.state.set_limits({"burst": 100_000})
    proxy = await start_proxy(simulator.url, **small_limits())
    await asyncio.gather(*(call(http, proxy.url, token, i) for i in range(N)))
    waiting = asyncio.create_task(call(http, proxy.url, token, 999))
    await until_decided(proxy, N + 1, waiting)
    assert held_now(proxy) == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # The next request's slot is no earlier than the abandoned one's: by the time it has
    # been answered, the abandoned one, had the proxy kept it, would have been let go too.
    assert (await call(http, proxy.url, token, 1000))[0] == 200
    assert decisions(proxy) == {"sent": N, "queued": 2}
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == N + 1


async def test_unresolvable_request_is_400_with_advice(simulator, start_proxy, http) -> None:
    """No header, token, query, path or body id: 400 saying which header to send."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}/contacts/") as response:
        body = await response.json()
    assert response.status == 400
    assert body["error"] == "resource_unresolved"
    assert "X-HoopAI-Location-Id" in body["message"]
    assert simulator.state.stats()["requests"] == 0
