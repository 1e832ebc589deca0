"""Bulk installs over real HTTP against the simulator: a Company install's approved
locations get their tokens at install, on INSTALL deliveries and periodically, each minted
once, under limiter slots of the Company; one replica at a time reconciles a Company; and
the simulator's /oauth/installedLocations answers as HighLevel's spec says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.harness.redis_server import RedisServer
from proxy.server import RunningServer
from proxy.services import SERVICES, Services
from proxy.simulator.client import SimulatorClient
from proxy.tokens.reconcile import Reconciler
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.json_logs import json_log_lines
from tests.support.webhook_deliveries import (
    APP_ID,
    PUBLIC_PEM,
    deliver_answer,
    event,
)

WEBHOOKS = {"webhooks": {"ed25519_public_key": PUBLIC_PEM}}
STATE_WAIT_S = 15.0


def services_of(proxy: RunningServer) -> Services:
    return proxy.runner.app[SERVICES]


async def location_ids(proxy: RunningServer) -> set[str]:
    """The locations whose token the proxy's store holds (what `tokens list` shows)."""
    records = await services_of(proxy).token_store.list()
    return {record.id for record in records if record.kind == "location"}


async def no_reconcile_running(proxy: RunningServer) -> bool:
    return services_of(proxy).reconciler.running == 0


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for observable state, not for time: poll `check` until it holds."""
    deadline = time.monotonic() + STATE_WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"never saw: {what}"
        await asyncio.sleep(0.05)


def company_slots(proxy: RunningServer, company_id: str) -> int | None:
    """Limiter slots the Company's key took today, as the proxy's status board counts them."""
    rows = services_of(proxy).board.snapshot(lambda key: None)
    row = next((r for r in rows if r["kind"] == "company" and r["id"] == company_id), None)
    return None if row is None else row["daily_used"]  # type: ignore[return-value]


async def install_company(
    http: aiohttp.ClientSession, proxy: RunningServer, simulator: Any, company: str, n: int
) -> str:
    """A Company install approving n locations `<company>-L<i>`, through the callback."""
    code, _ = simulator.state.install(
        SIM_CLIENT_ID,
        user_type="Company",
        company_id=company,
        approved_locations=[f"{company}-L{i}" for i in range(n)],
    )
    return await install_via_start(http, proxy.url, code)


async def test_company_install_mints_every_approved_location_once(
    simulator, start_proxy, http
) -> None:
    """A Company install approving 12 locations: when the callback answers, the store holds
    all 12 location tokens, each minted once, after one installedLocations call; the
    Company's limiter key took 13 slots (12 mints and the list); no more than half the
    token endpoint cap ran at once; and using a location mints nothing more."""
    proxy = await start_proxy(simulator.url)
    page = await install_company(http, proxy, simulator, "bulkCo", 12)
    # The callback waits a while for the reconcile; a machine too busy to finish it by
    # then says the rest comes in the background (either way, the state below follows).
    assert (
        "installed on 12 location(s): 12 hold a token now" in page
        or "being minted in the background" in page
    )
    wanted = {f"bulkCo-L{i}" for i in range(12)}

    async def all_minted() -> bool:
        return await location_ids(proxy) == wanted

    await wait_for(all_minted, "all 12 location tokens stored")
    await wait_for(lambda: no_reconcile_running(proxy), "the reconcile finished")
    stats = simulator.state.stats()
    assert stats["installed_locations_requests"] == 1
    assert (stats["location_token_requests"], stats["location_tokens_minted"]) == (12, 12)
    assert stats["max_oauth_in_flight"] <= 2  # half of tokens.max_concurrent_refreshes (4)
    assert company_slots(proxy, "bulkCo") == 13
    async with http.get(
        f"{proxy.url}/contacts/", headers={"X-HoopAI-Location-Id": "bulkCo-L7"}
    ) as answer:
        assert answer.status == 200
        assert (await answer.json())["auth"]["authClassId"] == "bulkCo-L7"
    assert simulator.state.stats()["location_tokens_minted"] == 12


async def test_install_webhook_for_a_new_location_reconciles_the_company(
    simulator, start_proxy, http
) -> None:
    """Two locations added to a Company install later: the INSTALL delivery of one mints
    it at once (its answer says so), and the reconcile it triggers lists the Company again
    and mints the other, which no delivery named. The delivery's own log line carries its
    request id; the reconcile, running after the delivery was answered, does not."""
    proxy = await start_proxy(simulator.url, **WEBHOOKS)
    await install_company(http, proxy, simulator, "hookCo", 2)
    simulator.state.approve_locations(SIM_CLIENT_ID, "hookCo", ["hookCo-new1", "hookCo-new2"])
    payload = event("INSTALL", installType="Location", locationId="hookCo-new1", companyId="hookCo")
    with json_log_lines() as lines:
        status, body, headers = await deliver_answer(http, proxy.url, payload)
        assert (status, body["action"]) == (200, "token ready for location hookCo-new1")

        async def all_four() -> bool:
            return len(await location_ids(proxy)) == 4

        await wait_for(all_four, "the location no delivery named minted by the reconcile")
        await wait_for(lambda: no_reconcile_running(proxy), "the reconcile finished")
    stats = simulator.state.stats()
    assert stats["installed_locations_requests"] == 2
    assert stats["location_tokens_minted"] == 4
    request_id = headers["X-Request-Id"]
    webhook_line = next(line for line in lines() if line["msg"].startswith("webhook INSTALL"))
    assert webhook_line["request_id"] == request_id
    reconciled = [line for line in lines() if line["msg"].startswith("reconciled ")]
    assert reconciled and all("request_id" not in line for line in reconciled)


async def test_periodic_reconcile_picks_up_a_location_added_later(
    simulator, start_proxy, http
) -> None:
    """With tokens.reconcile_interval_s set, a location approved after the install (no
    delivery, no request) gets its token from the periodic pass."""
    proxy = await start_proxy(simulator.url, tokens={"reconcile_interval_s": 0.2})
    await install_company(http, proxy, simulator, "tickCo", 1)
    simulator.state.approve_locations(SIM_CLIENT_ID, "tickCo", ["tickCo-later"])

    async def picked_up() -> bool:
        return "tickCo-later" in await location_ids(proxy)

    await wait_for(picked_up, "the later location minted by a periodic pass")
    assert simulator.state.stats()["location_tokens_minted"] == 2


@pytest.mark.slow
async def test_one_replica_reconciles_a_company_at_a_time(
    simulator, start_proxy, http, redis_server: RedisServer
) -> None:
    """Two replicas sharing Redis reconcile the same Company at the same moment: one does
    it, the other skips it (another replica holds the lock), and each location is minted
    once."""
    shared = {"store": {"redis_url": redis_server.url}, "tokens": {"reconcile_interval_s": 0}}
    first = await start_proxy(simulator.url, **shared)
    second = await start_proxy(simulator.url, **shared)
    await install_company(http, first, simulator, "twinCo", 1)
    simulator.state.approve_locations(SIM_CLIENT_ID, "twinCo", [f"twinCo-x{i}" for i in range(6)])
    simulator.state.set_faults({"token_latency_ms": 100})  # so that the two overlap
    app = services_of(first).config.apps[0]
    results = await asyncio.gather(
        services_of(first).reconciler.reconcile(app, "twinCo"),
        services_of(second).reconciler.reconcile(app, "twinCo"),
    )
    done = [r for r in results if not r.skipped]
    skipped = [r for r in results if r.skipped]
    assert len(done) == 1 and len(skipped) == 1, results
    assert "another replica" in skipped[0].skipped
    assert (done[0].listed, done[0].minted, done[0].present) == (7, 6, 1)
    assert simulator.state.stats()["location_tokens_minted"] == 7
    assert len(await location_ids(second)) == 7


async def test_reconcile_reads_every_page_of_installed_locations(
    simulator, start_proxy, http
) -> None:
    """25 locations listed 10 to a page: three installedLocations calls, each under a slot
    of the Company, and all 25 tokens minted."""
    proxy = await start_proxy(simulator.url, tokens={"reconcile_interval_s": 0})
    await install_company(http, proxy, simulator, "pageCo", 0)
    simulator.state.approve_locations(SIM_CLIENT_ID, "pageCo", [f"pageCo-p{i}" for i in range(25)])
    services = services_of(proxy)
    reconciler = Reconciler(
        services.config,
        services.token_store,
        services.oauth,
        services.tokens,
        services.admission,
        page_size=10,
    )
    slots_before = company_slots(proxy, "pageCo") or 0
    calls_before = simulator.state.stats()["installed_locations_requests"]
    result = await reconciler.reconcile(services.config.apps[0], "pageCo")
    assert (result.listed, result.minted, result.failed) == (25, 25, 0)
    assert simulator.state.stats()["installed_locations_requests"] - calls_before == 3
    assert company_slots(proxy, "pageCo") == slots_before + 3 + 25
    assert len(await location_ids(proxy)) == 25


async def test_simulator_installed_locations_follows_the_spec(simulator, http) -> None:
    """/oauth/installedLocations needs companyId and appId (422), pages with skip and limit
    (20 by default), filters on isInstalled, and answers count and
    installToFutureLocations beside the entries (_id, name, address, isInstalled); a
    location approved later (POST /_sim/approve) is listed too."""
    locations = [f"specL{i}" for i in range(25)]
    grant = simulator.state.grant(
        SIM_CLIENT_ID, user_type="Company", company_id="specCo", approved_locations=locations
    )
    headers = {"Authorization": f"Bearer {grant['access_token']}", "Version": "2021-07-28"}
    url = f"{simulator.url}/oauth/installedLocations"

    async def ask(**query: str) -> tuple[int, Any]:
        async with http.get(url, params=query, headers=headers) as answer:
            return answer.status, await answer.json()

    status, body = await ask(companyId="specCo")
    assert (status, body["statusCode"]) == (422, 422)
    status, body = await ask(companyId="specCo", appId=APP_ID)
    assert status == 200
    assert (len(body["locations"]), body["count"], body["installToFutureLocations"]) == (
        20,
        25,
        False,
    )
    assert set(body["locations"][0]) == {"_id", "name", "address", "isInstalled"}
    status, body = await ask(companyId="specCo", appId=APP_ID, skip="20", limit="10")
    assert [entry["_id"] for entry in body["locations"]] == locations[20:]
    status, body = await ask(companyId="specCo", appId=APP_ID, isInstalled="false")
    assert (body["locations"], body["count"]) == ([], 0)
    await SimulatorClient(simulator.url, http).approve_locations(SIM_CLIENT_ID, "specCo", ["new"])
    status, body = await ask(companyId="specCo", appId=APP_ID, skip="25")
    assert ([entry["_id"] for entry in body["locations"]], body["count"]) == (["new"], 26)
