"""The admin listener: Prometheus metrics, the status page and its JSON, the admin token,
and that none of them shows a token."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from proxy.admin import create_admin_app
from proxy.metrics import Metrics
from proxy.server import bind_socket, start_server
from proxy.services import SERVICES
from tests.conftest import SIM_CLIENT_ID
from tests.support.bursts import install, one_by_one, resource_row, status_json, upstream_429s
from tests.support.leaks import leaked

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "adminLoc01"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    sample = re.escape(name + (f"{{{selector}}}" if selector else ""))
    found = re.search(rf"^{sample} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def until_waiting(metrics: Metrics, burst: asyncio.Future[list[int]]) -> None:
    """Return once a request is held for a slot (the gauge says so)."""
    while not metrics.registry.get_sample_value("hoopai_proxy_requests_waiting"):
        assert not burst.done(), "the burst finished before any request was seen waiting"
        await asyncio.sleep(0.005)


async def start_admin(proxy):
    return await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )


async def test_metrics_and_status_describe_the_traffic(simulator, start_proxy, http) -> None:
    """After installs, queued, refused and refreshed requests, /metrics counts them and
    /status.json shows the resource, with every admitted request (sent, queued and resent)
    in its per-second counts and in the total; no token appears in either or in /status
    (the dashboard's page, which holds no data)."""
    simulator.state.set_limits({"burst": 100_000})
    proxy = await start_proxy(
        simulator.url,
        limits={"burst": {"requests": 5, "interval_ms": 1000, "pad_ms": 0}},
        queue={"max_wait_ms": 5000},
        tokens={"accept_unsolicited_installs": True},  # the callback below has no state
    )
    admin = await start_admin(proxy)
    try:
        code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
        async with http.get(f"{proxy.url}/_proxy/oauth/callback?code={code}") as answer:
            assert answer.status == 200
        simulator.state.expire_tokens()  # the first request finds the token refused

        async def call(index: int, max_wait_ms: str = "5000") -> int:
            headers = {"X-HoopAI-Location-Id": LOCATION, "X-HoopAI-Max-Wait-Ms": max_wait_ms}
            async with http.get(f"{proxy.url}/contacts/?i={index}", headers=headers) as answer:
                return answer.status

        # 8 at once: 5 go, meet Invalid JWT, one refresh, resends and the rest queue.
        burst = asyncio.gather(*(call(i) for i in range(8)))
        # While any request waits for its slot, the next slot is in the future, so a
        # request that may not wait is refused: a definite order, not a race with the window.
        await until_waiting(proxy.runner.app[SERVICES].metrics, burst)
        refused = await call(99, max_wait_ms="0")
        statuses = await burst
        async with http.get(f"{admin.url}/metrics") as answer:
            assert answer.status == 200
            text = await answer.text()
        async with http.get(f"{admin.url}/status.json") as answer:
            status = await answer.json()
        async with http.get(f"{admin.url}/status") as answer:
            page = await answer.text()
    finally:
        await admin.stop()
    assert (statuses, refused) == ([200] * 8, 429)
    decisions = {
        outcome: metric(text, "hoopai_proxy_limiter_decisions_total", outcome=outcome)
        for outcome in ("sent", "queued", "refused_burst")
    }
    assert decisions["sent"] == 5 and decisions["refused_burst"] == 1
    # The other three queued, and each Invalid JWT resend (five, or up to eight if the
    # refresh had not landed when the three were sent) queued again.
    assert 3 + 5 <= decisions["queued"] <= 3 + 8
    assert metric(text, "hoopai_proxy_answers_total", status="200") == 8 + 1  # + callback
    assert metric(text, "hoopai_proxy_answers_total", status="429") == 1
    upstream_401 = metric(text, "hoopai_proxy_upstream_answers_total", status="401")
    assert upstream_401 == decisions["queued"] - 3
    assert metric(text, "hoopai_proxy_token_refreshes_total", outcome="ok") == 1
    assert metric(text, "hoopai_proxy_resends_total", reason="invalid_jwt") >= 1
    assert metric(text, "hoopai_proxy_requests_waiting") == 0
    [view] = status["resources"]
    assert (view["app"], view["kind"], view["id"]) == (APP_ID, "location", LOCATION)
    assert view["waiting"] == 0 and view["token_expires_at"] is not None
    assert "X-RateLimit-Remaining" in view["upstream"]
    admitted = decisions["sent"] + decisions["queued"]
    assert sum(count for _, count in view["admitted_per_s"]) == admitted
    assert sum(count for _, count in status["admitted_per_s"]) == admitted
    assert view["upstream_429s"] == 0 and status["upstream_429s"] == 0
    assert 'src="status/dashboard.js"' in page and LOCATION not in page
    assert leaked([text, str(status), page], simulator.state.tokens.issued()) == []


async def test_admin_token_is_required_when_set(simulator, start_proxy, http) -> None:
    """With admin.token set, admin requests without the bearer get 401, with it 200; only
    the dashboard's static page and files (no data in them) are served without it."""
    proxy = await start_proxy(simulator.url, admin={"host": "127.0.0.1", "token": "s3cret-adm1n"})
    admin = await start_admin(proxy)
    try:
        async with http.get(f"{admin.url}/metrics") as answer:
            assert answer.status == 401
        wrong = {"Authorization": "Bearer nope"}
        async with http.get(f"{admin.url}/status.json", headers=wrong) as answer:
            assert answer.status == 401
        right = {"Authorization": "Bearer s3cret-adm1n"}
        async with http.get(f"{admin.url}/metrics", headers=right) as answer:
            assert answer.status == 200
        async with http.get(f"{admin.url}/status.json", headers=right) as answer:
            assert answer.status == 200
        for path in ("/status", "/status/dashboard.js", "/status/dashboard.css"):
            async with http.get(f"{admin.url}{path}") as answer:
                assert answer.status == 200, path
                assert "script-src 'self'" in answer.headers["Content-Security-Policy"]
                assert "s3cret-adm1n" not in await answer.text()
    finally:
        await admin.stop()


async def test_serve_runs_the_admin_listener(simulator, spawn_proxy) -> None:
    """`hoopai-proxy serve` starts the admin listener on admin.host:admin.port."""
    proxy = spawn_proxy(simulator.url)
    assert proxy.admin_url
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.admin_url}/metrics") as answer:
        assert answer.status == 200
        assert metric(await answer.text(), "hoopai_proxy_limiter_degraded") == 0


@pytest.mark.slow
async def test_status_counts_the_upstreams_429s(simulator, start_proxy, http) -> None:
    """Requests that bypassed the proxy filled the upstream's window, so the proxy's
    request meets a 429 (and is resent once the window allows: 200). /status.json counts
    the 429s for the resource and in total, as many as the simulator refused."""
    simulator.state.set_limits({"burst": 3, "interval_ms": 1000, "window": "sliding"})
    token, resource = install(simulator, "admin429Loc")
    proxy = await start_proxy(
        simulator.url,
        limits={"burst": {"requests": 3, "interval_ms": 1000}},
        queue={"max_wait_ms": 5000},
    )
    assert await one_by_one(http, simulator.url, token, 3) == [200] * 3
    assert await one_by_one(http, proxy.url, token, 1) == [200]
    refused = upstream_429s(simulator, resource)
    status = await status_json(http, proxy)
    view = resource_row(status, "admin429Loc")
    assert refused >= 1
    assert view["upstream_429s"] == refused == status["upstream_429s"]
