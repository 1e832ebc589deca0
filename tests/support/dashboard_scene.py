"""Real traffic for the dashboard's browser test and its screenshot: a proxy with a small
burst limit and an admin token, two installed locations and one pass-through, requests
through the proxy to the simulator, some of them held in the queue.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from proxy.harness.tokens import SIM_CLIENT_ID, bearer
from proxy.metrics import Metrics
from proxy.simulator.state import Simulator

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
ADMIN_TOKEN = "dashboard-test-admin-token"
BURST = 4
WINDOW_MS = 20_000
# Installed: the proxy holds their tokens. The first is the one whose requests queue.
INSTALLED = ("dashQueueLoc", "dashBusyLoc")
PASS_THROUGH = "dashPassLoc"  # the caller's own token: none cached by the proxy
# A long window, so requests over the burst wait for seconds: long enough to be seen
# waiting on the page, and cancelled when the test is done.
PROXY_SETTINGS: dict[str, Any] = {
    "admin": {"host": "127.0.0.1", "token": ADMIN_TOKEN},
    "limits": {"burst": {"requests": BURST, "interval_ms": WINDOW_MS, "pad_ms": 0}},
    "queue": {"max_wait_ms": 60_000},
    # The callbacks below carry no install state, as a marketplace-started install.
    "tokens": {"accept_unsolicited_installs": True},
}


async def install(
    http: aiohttp.ClientSession, simulator: Simulator, proxy_url: str, location: str
) -> None:
    """Install the app for `location` through the proxy's OAuth callback."""
    code, _ = simulator.install(SIM_CLIENT_ID, location_id=location)
    async with http.get(f"{proxy_url}/_proxy/oauth/callback?code={code}") as answer:
        assert answer.status == 200, await answer.text()


async def send(http: aiohttp.ClientSession, proxy_url: str, location: str) -> int:
    """One request for `location` (managed token, or the caller's own for PASS_THROUGH)."""
    if location == PASS_THROUGH:
        url, headers = f"{proxy_url}/_sim/echo/dashboard", bearer(location)
    else:
        url, headers = f"{proxy_url}/contacts/", {"X-HoopAI-Location-Id": location}
    async with http.get(url, headers=headers) as answer:
        await answer.read()
        return answer.status


async def until_queued(
    metrics: Metrics, tasks: list[asyncio.Task[int]], sent: int, waiting: int
) -> None:
    """Return once `sent` of `tasks` are answered and `waiting` requests are held for a
    slot (the gauge says so)."""
    while True:
        done = [task for task in tasks if task.done()]
        for task in done:
            assert task.result() == 200, "a request through the proxy failed"
        held = metrics.registry.get_sample_value("hoopai_proxy_requests_waiting")
        if len(done) == sent and held == waiting:
            return
        assert len(done) <= sent, "more requests were answered than the burst allows"
        await asyncio.sleep(0.01)
