"""The daily budget on the admin listener, from real traffic through a proxy to the
simulator: today's count and limit per resource, near the limit from 80%, the projection
for the end of the limit day, and the aggregate metrics (no resource id in a scrape).

The proxy runs on a clock the test holds (it drives the limit day and the board's rate).
"""

from __future__ import annotations

import aiohttp

from proxy.harness.tokens import bearer
from tests.integration.test_admin import metric, start_admin
from tests.support.limiters import ManualClock

LOCATION = "budgetLoc01"
NEAR_REQUESTS = "hoopai_proxy_daily_near_limit_requests_total"


async def test_status_and_metrics_show_a_resource_nearing_its_daily_limit(
    simulator, start_proxy, http: aiohttp.ClientSession
) -> None:
    """With 10 a day: after 7 requests the resource is not near its limit; after 8 it is
    (80%), though no request was yet taken near it. A minute later two more are taken near
    it (Envoy's near_limit counts 2), the 11th is refused, and the JSON shows
    10 of 10 used, near the limit, projected past the limit by the day's end; the gauges
    say one resource is near and the highest use is 100%."""
    clock = ManualClock()
    proxy = await start_proxy(simulator.url, clock=clock, limits={"daily": {"requests": 10}})
    admin = await start_admin(proxy)

    async def send() -> int:
        async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer(LOCATION)) as answer:
            return answer.status

    async def status() -> dict[str, object]:
        async with http.get(f"{admin.url}/status.json") as answer:
            [view] = (await answer.json())["resources"]
            assert isinstance(view, dict)
            return view

    async def scrape() -> str:
        async with http.get(f"{admin.url}/metrics") as answer:
            return await answer.text()

    try:
        statuses = [await send() for _ in range(7)]
        seven = await status()
        statuses.append(await send())
        eight = await status()
        eight_scrape = await scrape()
        clock.advance(60)
        statuses += [await send(), await send()]
        refused = await send()
        full = await status()
        text = await scrape()
    finally:
        await admin.stop()
    assert statuses == [200] * 10 and refused == 429
    assert (seven["daily_used"], seven["near_daily_limit"]) == (7, False)
    assert (eight["daily_used"], eight["near_daily_limit"]) == (8, True)
    assert metric(eight_scrape, NEAR_REQUESTS) == 0
    assert metric(eight_scrape, "hoopai_proxy_daily_near_limit_resources") == 1
    assert full["limits"] == {"burst": 100, "window_s": 10.0, "daily": 10, "learned": False}
    assert (full["daily_used"], full["daily_remaining"], full["near_daily_limit"]) == (10, 0, True)
    projected = full["daily_projected"]
    assert isinstance(projected, int) and projected > 10
    assert metric(text, NEAR_REQUESTS) == 2
    assert metric(text, "hoopai_proxy_daily_near_limit_resources") == 1
    assert metric(text, "hoopai_proxy_daily_use_max_ratio") == 1.0
    assert LOCATION not in text
