"""`hoopai_proxy_daily_remaining_min` after real traffic through a proxy to the simulator:
the fewest requests any resource on the status board has left today, read at each scrape.

The proxy runs on a clock the test holds, so the limit day ends when the test says.
"""

from __future__ import annotations

import aiohttp

from proxy.harness.tokens import bearer
from tests.integration.test_admin import metric, start_admin
from tests.support.limiters import ManualClock

GAUGE = "hoopai_proxy_daily_remaining_min"
DAILY = 10
DAY_S = 86_400


async def test_the_gauge_is_the_least_daily_remaining_among_resources(
    simulator, start_proxy, http: aiohttp.ClientSession
) -> None:
    """With 10 a day: an empty board reads the whole limit (not 0, which would look like
    an exhausted resource); after 3 requests for one location and 1 for another it reads
    7, the busier one's remaining, and no resource id is in the scrape. Once the limit day
    is over both have their whole day again (10); a request for the quieter one in the
    new day makes it 9, while the other, with no decision this day, counts as 10."""
    clock = ManualClock()
    proxy = await start_proxy(simulator.url, clock=clock, limits={"daily": {"requests": DAILY}})
    admin = await start_admin(proxy)

    async def send(location: str) -> None:
        async with http.get(f"{proxy.url}/_sim/echo/x", headers=bearer(location)) as answer:
            assert answer.status == 200, await answer.text()

    async def scrape() -> str:
        async with http.get(f"{admin.url}/metrics") as answer:
            assert answer.status == 200
            return await answer.text()

    try:
        empty = await scrape()
        for location in ("busyLoc01", "busyLoc01", "quietLoc01", "busyLoc01"):
            await send(location)
        after_traffic = await scrape()
        clock.advance(DAY_S + 1)
        next_day = await scrape()
        await send("quietLoc01")
        one_in_new_day = await scrape()
    finally:
        await admin.stop()
    assert metric(empty, GAUGE) == DAILY
    assert metric(after_traffic, GAUGE) == DAILY - 3
    assert "busyLoc01" not in after_traffic and "quietLoc01" not in after_traffic
    assert metric(next_day, GAUGE) == DAILY
    assert metric(one_in_new_day, GAUGE) == DAILY - 1
