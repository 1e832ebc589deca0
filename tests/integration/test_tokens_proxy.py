"""Managed tokens through one proxy (embedded store), against the simulator with strict
rotation: install, refresh storms, expiry, dead refresh tokens, location tokens, and no
token in any log line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from proxy.errors import NoToken
from proxy.services import SERVICES
from proxy.tokens.keepalive import KeepAlive
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import INSTALL_COOKIE, install_via_start
from tests.support.leaks import leaked
from tests.support.limiters import ManualClock

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "tokenLoc01"
RESOURCE = f"{APP_ID}:location:{LOCATION}"
ROOMY = {"limits": {"burst": {"requests": 100_000}}}  # tokens are the subject here, not limits


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture, simulator) -> Iterator[None]:
    """Every test here: no token the simulator issued appears in any log record. The
    simulator's limits are lifted too: tokens are the subject here."""
    simulator.state.set_limits({"burst": 100_000})
    caplog.set_level(logging.DEBUG)
    yield
    assert leaked([caplog.text], simulator.state.tokens.issued()) == []


async def install(http: aiohttp.ClientSession, proxy_url: str, simulator, **where: Any) -> str:
    """Install the app as a browser would: /_proxy/oauth/start, then the callback."""
    code, _ = simulator.state.install(SIM_CLIENT_ID, **where)
    return await install_via_start(http, proxy_url, code)


async def managed(
    http: aiohttp.ClientSession, proxy_url: str, location: str = LOCATION, index: int = 0
) -> tuple[int, Any]:
    """A request the proxy must put its own token on (the caller names only the location)."""
    headers = {"X-HoopAI-Location-Id": location}
    async with http.get(f"{proxy_url}/contacts/?i={index}", headers=headers) as answer:
        return answer.status, await answer.json()


async def test_install_callback_stores_a_token_used_for_requests(
    simulator, start_proxy, http
) -> None:
    """After the callback, requests carry the proxy's token; the page shows no token."""
    proxy = await start_proxy(simulator.url)
    page = await install(http, proxy.url, simulator, location_id=LOCATION)
    assert "location tokenLoc01" in page
    status, echo = await managed(http, proxy.url)
    assert status == 200
    assert echo["auth"]["authClassId"] == LOCATION
    assert leaked([page], simulator.state.tokens.issued()) == []


async def test_start_redirects_to_the_authorization_page(simulator, start_proxy, http) -> None:
    """/_proxy/oauth/start sends the browser to the marketplace with the app's client id."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}/_proxy/oauth/start", allow_redirects=False) as answer:
        assert answer.status == 302
        location = answer.headers["Location"]
    assert location.startswith("https://marketplace.gohighlevel.com/oauth/chooselocation?")
    assert f"client_id={SIM_CLIENT_ID}" in location and "state=main." in location
    assert INSTALL_COOKIE in answer.cookies  # the nonce the callback must bring back


async def test_refresh_storm_embedded_one_refresh(simulator, start_proxy, http) -> None:
    """300 concurrent requests on an expired token (SQLite store): one refresh, all 200."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    simulator.state.expire_tokens(RESOURCE)  # the proxy still believes in it: 401s come
    results = await asyncio.gather(*(managed(http, proxy.url, index=i) for i in range(300)))
    assert [status for status, _ in results] == [200] * 300
    stats = simulator.state.stats()
    assert stats["refreshes"] == 1
    assert stats["dead_refresh_token_uses"] == 0


async def test_token_refreshed_ahead_of_expiry_without_a_401(simulator, start_proxy, http) -> None:
    """A token within refresh_skew_s of expiry is refreshed before use: no Invalid JWT."""
    clock = ManualClock(simulator.state.now())
    proxy = await start_proxy(simulator.url, clock=clock, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    clock.advance(86399 - 200)  # the upstream would still accept it; the proxy refreshes
    results = await asyncio.gather(*(managed(http, proxy.url, index=i) for i in range(50)))
    assert [status for status, _ in results] == [200] * 50
    stats = simulator.state.stats()
    assert (stats["refreshes"], stats["invalid_jwt"]) == (1, 0)


async def test_24_simulated_hours_of_minute_long_tokens(simulator, start_proxy, http) -> None:
    """A day of traffic, a request a minute, tokens living 10 minutes, keep-alive every 3:
    no request fails for a token reason, and no dead refresh token is ever used."""
    clock = ManualClock()
    simulator.state.set_config({"access_token_lifetime_s": 600})
    simulator.state.advance_clock(clock.now - simulator.state.now())
    proxy = await start_proxy(simulator.url, clock=clock, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    config = proxy.runner.app[SERVICES].config
    manager = proxy.runner.app[SERVICES].tokens
    store = proxy.runner.app[SERVICES].token_store
    keepalive = KeepAlive(manager, store, {APP_ID: config.apps[0]}, config.tokens, clock=clock)
    statuses = []
    for minute in range(24 * 60):
        clock.advance(60)
        simulator.state.advance_clock(60)
        if minute % 3 == 0:
            await keepalive.run_once()
        statuses.append((await managed(http, proxy.url, index=minute))[0])
    assert statuses == [200] * (24 * 60)
    stats = simulator.state.stats()
    assert stats["dead_refresh_token_uses"] == 0
    assert stats["invalid_jwt"] == 0
    assert 24 * 60 / 10 <= stats["refreshes"] <= 24 * 60 / 3


async def test_dead_refresh_token_needs_reinstall_and_reinstall_heals(
    simulator, start_proxy, http
) -> None:
    """invalid_grant: the record is marked needs_reauth and callers get 401
    reauthorization_required naming the resource; a new install through the callback heals."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    stored = await proxy.runner.app[SERVICES].token_store.get(APP_ID, "location", LOCATION)
    simulator.state.tokens.rotate(  # spent behind the proxy's back: its copy is dead
        stored.refresh_token, SIM_CLIENT_ID, simulator.state.now(), 86399, 10**9
    )
    simulator.state.expire_tokens(RESOURCE)
    status, body = await managed(http, proxy.url)
    assert status == 401
    assert body["error"] == "reauthorization_required"
    assert LOCATION in body["message"] and "/_proxy/oauth/start" in body["message"]
    assert (await managed(http, proxy.url))[0] == 401  # stays dead, no second refresh try
    assert simulator.state.stats()["dead_refresh_token_uses"] == 1
    await install(http, proxy.url, simulator, location_id=LOCATION)
    assert (await managed(http, proxy.url))[0] == 200


async def test_nothing_installed_is_404_no_token(simulator, start_proxy, http) -> None:
    """A managed request for a resource with no token: 404 no_token saying how to install."""
    proxy = await start_proxy(simulator.url)
    status, body = await managed(http, proxy.url, location="nowhere")
    assert status == 404 and body["error"] == "no_token"
    assert "/_proxy/oauth/start?app=main" in body["message"]


async def test_location_token_minted_once_from_a_company_install(
    simulator, start_proxy, http
) -> None:
    """A Company install mints a token for each approved location at install, once each
    (the reconcile); 50 concurrent first requests mint nothing more; a location not
    approved gets 404 no_token."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    page = await install(
        http,
        proxy.url,
        simulator,
        user_type="Company",
        company_id="co1",
        approved_locations=["bulkLoc1", "bulkLoc2"],
    )
    assert "company co1" in page and "bulkLoc1" in page
    assert simulator.state.stats()["location_tokens_minted"] == 2
    results = await asyncio.gather(
        *(managed(http, proxy.url, location="bulkLoc1", index=i) for i in range(50))
    )
    assert [status for status, _ in results] == [200] * 50
    assert results[0][1]["auth"] == {
        "authClass": "Location",
        "authClassId": "bulkLoc1",
        "client": APP_ID,
    }
    assert simulator.state.stats()["location_tokens_minted"] == 2
    assert (await managed(http, proxy.url, location="otherLoc"))[0] == 404


async def test_inactive_location_keeps_its_token(simulator, start_proxy, http) -> None:
    """`Location is not active` on refresh: 503 with that message, and the token is kept."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    simulator.state.expire_tokens(RESOURCE)
    simulator.state.set_faults({"inactive_locations": [LOCATION]})
    status, body = await managed(http, proxy.url)
    assert status == 503 and "not active" in body["message"]
    simulator.state.clear_faults()
    assert (await managed(http, proxy.url))[0] == 200
    assert simulator.state.stats()["dead_refresh_token_uses"] == 0


async def test_command_timed_out_is_sent_again_once(simulator, start_proxy, http) -> None:
    """`401 Command timed out` is an upstream timeout: sent again (a new slot), then 200."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    simulator.state.set_faults({"command_timeout_ratio": 1.0})
    status, body = await managed(http, proxy.url)
    assert status == 504 and body["error"] == "upstream_timeout"
    assert simulator.state.stats()["per_resource"][RESOURCE]["requests"] == 2
    assert simulator.state.stats()["refreshes"] == 0  # not mistaken for an expiry


async def test_other_401s_pass_through_untouched(simulator, start_proxy, http) -> None:
    """A 401 that is not Invalid JWT (scope, authClass) goes back as is, with no refresh."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    # A Location token may not read a company: the upstream says so with a 401.
    headers = {"X-HoopAI-Location-Id": LOCATION}
    url = f"{proxy.url}/companies/co1"
    async with http.get(url, headers=headers) as answer:
        body = await answer.json()
    assert answer.status == 401 and "authClass type is not allowed" in body["message"]
    assert simulator.state.stats()["refreshes"] == 0


async def test_token_endpoint_down_keeps_the_old_token(simulator, start_proxy, http) -> None:
    """Network errors on refresh are retried with backoff, then 503 token_unavailable; the
    stored token is untouched and works again once the endpoint is back."""
    from proxy.harness.redis_server import free_port

    dead_end = f"http://127.0.0.1:{free_port()}"
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    services = proxy.runner.app[SERVICES]
    before = await services.token_store.get(APP_ID, "location", LOCATION)
    working_base = services.oauth._base_url
    services.oauth._base_url = dead_end  # the token endpoint goes away
    simulator.state.expire_tokens(RESOURCE)
    status, body = await managed(http, proxy.url)
    assert status == 503 and body["error"] == "token_unavailable"
    assert await services.token_store.get(APP_ID, "location", LOCATION) == before
    services.oauth._base_url = working_base
    assert (await managed(http, proxy.url))[0] == 200


async def test_refresh_of_a_deleted_record_ends_at_once(simulator, start_proxy, http) -> None:
    """A record deleted while a refresh is due: the refresh ends with no_token, it does not
    wait on itself, and later requests are not stuck behind it."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    services = proxy.runner.app[SERVICES]
    manager, store = services.tokens, services.token_store
    stale = await store.get(APP_ID, "location", LOCATION)
    await store.delete(APP_ID, "location", LOCATION)
    app = services.config.apps[0]
    with pytest.raises(NoToken):
        await asyncio.wait_for(manager.refresh_now(app, stale), timeout=5)
    manager.forget(stale.key)  # as an uninstall would; another replica's cache may lag
    status, body = await asyncio.wait_for(managed(http, proxy.url), timeout=5)
    assert status == 404 and body["error"] == "no_token"


async def test_max_wait_header_with_non_ascii_digits_is_a_400(simulator, start_proxy, http) -> None:
    """'²' is a digit to Python but not a number of milliseconds: 400, not 500."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    await install(http, proxy.url, simulator, location_id=LOCATION)
    headers = {"X-HoopAI-Location-Id": LOCATION, "X-HoopAI-Max-Wait-Ms": "²"}
    async with http.get(f"{proxy.url}/contacts/", headers=headers) as answer:
        assert answer.status == 400
