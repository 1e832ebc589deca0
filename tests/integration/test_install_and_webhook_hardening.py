"""Issue 7, findings 9 to 11, over HTTP against the proxy and the simulator: webhook
deliveries need a webhookId; installs are bound to the browser that started them (state
and cookie), unsolicited ones are a config decision, bad codes are rate-limited; location
tokens survive a Company token refused early, and unknown locations are remembered."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET
from tests.support.installs import INSTALL_COOKIE, callback, start_install
from tests.support.limiters import ManualClock
from tests.support.webhook_deliveries import APP_ID, PUBLIC_PEM, deliver, event

UNSOLICITED = {"tokens": {"accept_unsolicited_installs": True}}
ROOMY = {"limits": {"burst": {"requests": 100_000}}}


async def managed(http: aiohttp.ClientSession, proxy_url: str, location: str) -> tuple[int, Any]:
    """A request the proxy puts its own token on."""
    headers = {"X-HoopAI-Location-Id": location}
    async with http.get(f"{proxy_url}/contacts/", headers=headers) as answer:
        return answer.status, await answer.json()


def exchanges(simulator) -> int:
    """Authorization codes the token endpoint was asked to exchange, good or bad."""
    stats = simulator.state.stats()
    return int(stats["codes_exchanged"] + stats["invalid_codes"])


async def install_unsolicited(
    http: aiohttp.ClientSession, proxy_url: str, simulator, **where: Any
) -> None:
    """An install from the marketplace's own button (no state); the proxy accepts it."""
    code, _ = simulator.state.install(SIM_CLIENT_ID, **where)
    answer = await callback(http, proxy_url, code)
    assert answer.status == 200, await answer.text()


def set_cookie_of(answer: aiohttp.ClientResponse) -> str:
    [header] = [h for h in answer.headers.getall("Set-Cookie", []) if INSTALL_COOKIE in h]
    return header


# -- finding 9: a delivery without a webhookId --------------------------------------------


@pytest.mark.parametrize("webhook_id", ["absent", "", 12345], ids=["absent", "empty", "number"])
async def test_delivery_without_a_webhook_id_is_refused(
    simulator, start_proxy, http, webhook_id
) -> None:
    """A signed, fresh UNINSTALL with no webhookId string (absent, empty, a number) cannot
    be told from its replay: each of three sends is 401 webhook_rejected naming webhookId,
    and the token stays."""
    proxy = await start_proxy(
        simulator.url, webhooks={"ed25519_public_key": PUBLIC_PEM}, **UNSOLICITED
    )
    await install_unsolicited(http, proxy.url, simulator, location_id="noIdLoc")
    payload = event("UNINSTALL", locationId="noIdLoc")
    if webhook_id == "absent":
        del payload["webhookId"]
    else:
        payload["webhookId"] = webhook_id
    for _ in range(3):
        status, body = await deliver(http, proxy.url, payload)
        assert (status, body["error"]) == (401, "webhook_rejected")
        assert "webhookId" in body["message"]
    assert (await managed(http, proxy.url, "noIdLoc"))[0] == 200


# -- finding 10: install CSRF -------------------------------------------------------------


async def test_start_sets_a_cookie_the_callback_needs(simulator, start_proxy, http) -> None:
    """/start names the app and a nonce in `state` and puts the nonce in a short-lived,
    HttpOnly, SameSite=Lax cookie scoped to /_proxy/oauth/; the callback with both
    installs, and its answer clears the cookie."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}/_proxy/oauth/start", allow_redirects=False) as answer:
        assert answer.status == 302
        header = set_cookie_of(answer)
        nonce = answer.cookies[INSTALL_COOKIE].value
    attributes = {part.strip().lower() for part in header.split(";")}
    assert {"httponly", "samesite=lax", "path=/_proxy/oauth/", "max-age=600"} <= attributes
    assert "secure" not in attributes  # the default redirect_uri is http://localhost
    assert len(nonce) >= 32
    state, cookie = await start_install(http, proxy.url)
    assert state.startswith("main.") and state != f"main.{nonce}"  # a new nonce each time
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="csrfLoc1")
    answer = await callback(http, proxy.url, code, state=state, cookie=cookie)
    assert answer.status == 200, await answer.text()
    cleared = {part.strip().lower() for part in set_cookie_of(answer).split(";")}
    assert "max-age=0" in cleared and "path=/_proxy/oauth/" in cleared
    assert (await managed(http, proxy.url, "csrfLoc1"))[0] == 200


async def test_cookie_is_secure_when_the_redirect_uri_is_https(
    simulator, start_proxy, http
) -> None:
    """An https redirect_uri means the callback is served over TLS: the cookie is Secure."""
    app = {
        "name": "main",
        "client_id": SIM_CLIENT_ID,
        "client_secret": SIM_CLIENT_SECRET,
        "redirect_uri": "https://proxy.example/_proxy/oauth/callback",
    }
    proxy = await start_proxy(simulator.url, apps=[app])
    async with http.get(f"{proxy.url}/_proxy/oauth/start", allow_redirects=False) as answer:
        attributes = {part.strip().lower() for part in set_cookie_of(answer).split(";")}
    assert "secure" in attributes


@pytest.mark.parametrize("cookie", ["none", "another start's", "tampered"])
async def test_state_without_its_cookie_is_refused(simulator, start_proxy, http, cookie) -> None:
    """A callback whose state nonce is not the browser's cookie (none, the cookie of
    another start, or altered) is 403 install_refused pointing at /start, and the token
    endpoint is not called: the code stays unspent."""
    proxy = await start_proxy(simulator.url)
    state, own = await start_install(http, proxy.url)
    sent = {
        "none": None,
        "another start's": (await start_install(http, proxy.url))[1],
        "tampered": own[:-2] + ("AA" if not own.endswith("AA") else "BB"),
    }[cookie]
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="csrfLoc2")
    answer = await callback(http, proxy.url, code, state=state, cookie=sent)
    body = json.loads(await answer.text())
    assert (answer.status, body["error"]) == (403, "install_refused")
    assert "/_proxy/oauth/start" in body["message"]
    assert exchanges(simulator) == 0
    assert (await managed(http, proxy.url, "csrfLoc2"))[0] == 404


@pytest.mark.parametrize("state", [None, "main"], ids=["no state", "bare app name"])
async def test_unsolicited_install_is_refused_by_default(
    simulator, start_proxy, http, state
) -> None:
    """An install that did not start at /start (no state, or the legacy bare app name) is
    403 install_refused naming the config key that would accept it; no code exchange."""
    proxy = await start_proxy(simulator.url)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="csrfLoc3")
    answer = await callback(http, proxy.url, code, state=state)
    body = json.loads(await answer.text())
    assert (answer.status, body["error"]) == (403, "install_refused")
    assert "tokens.accept_unsolicited_installs" in body["message"]
    assert exchanges(simulator) == 0


@pytest.mark.parametrize("state", [None, "main"], ids=["no state", "bare app name"])
async def test_unsolicited_install_is_accepted_with_the_switch(
    simulator, start_proxy, http, state
) -> None:
    """With tokens.accept_unsolicited_installs the marketplace's own install button works:
    the callback without a nonce installs."""
    proxy = await start_proxy(simulator.url, **UNSOLICITED)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="csrfLoc4")
    answer = await callback(http, proxy.url, code, state=state)
    assert answer.status == 200, await answer.text()
    assert (await managed(http, proxy.url, "csrfLoc4"))[0] == 200


async def test_sixth_bad_code_in_a_minute_is_429_without_an_exchange(
    simulator, start_proxy, http
) -> None:
    """Five refused codes from one address within 60 s: the sixth callback is 429 with a
    Retry-After and never reaches the token endpoint (the simulator saw five exchanges);
    once the minute has passed, the address is heard again."""
    clock = ManualClock(simulator.state.now())
    proxy = await start_proxy(simulator.url, clock=clock, **UNSOLICITED)
    statuses = []
    for attempt in range(6):
        answer = await callback(http, proxy.url, f"guessed-code-{attempt}")
        statuses.append(answer.status)
        clock.advance(5)
    assert statuses == [400] * 5 + [429]
    assert json.loads(await answer.text())["error"] == "rate_limited"
    retry_after = int(answer.headers["Retry-After"])
    assert 0 < retry_after <= 60
    assert simulator.state.stats()["invalid_codes"] == 5
    clock.advance(retry_after)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="csrfLoc5")
    assert (await callback(http, proxy.url, code)).status == 200
    assert (await managed(http, proxy.url, "csrfLoc5"))[0] == 200


# -- finding 11: location tokens ----------------------------------------------------------


async def test_location_minted_after_the_company_token_is_refused(
    simulator, start_proxy, http
) -> None:
    """The cached Company token is refused upstream (revoked, or expired early): minting a
    location token refreshes the Company token once and tries again, and the request
    gets 200 instead of 404. (The install lists no location, so the reconcile at install
    mints none ahead: mL is minted on first use.)"""
    simulator.state.set_limits({"burst": 100_000})
    proxy = await start_proxy(simulator.url, **ROOMY, **UNSOLICITED)
    await install_unsolicited(http, proxy.url, simulator, user_type="Company", company_id="coX")
    simulator.state.expire_tokens(f"{APP_ID}:company:coX")
    status, body = await managed(http, proxy.url, "mL")
    assert status == 200, body
    assert body["auth"]["authClassId"] == "mL"
    stats = simulator.state.stats()
    assert (stats["invalid_jwt"], stats["refreshes"], stats["location_tokens_minted"]) == (1, 1, 1)


async def test_unknown_location_is_asked_upstream_once_a_minute(
    simulator, start_proxy, http
) -> None:
    """A location the Company install cannot mint for, asked five times: one call to
    /oauth/locationToken, five 404 no_token. The answer is remembered for a minute only,
    and an INSTALL delivery for that location forgets it at once."""
    simulator.state.set_limits({"burst": 100_000})
    clock = ManualClock(simulator.state.now())
    proxy = await start_proxy(
        simulator.url,
        clock=clock,
        webhooks={"ed25519_public_key": PUBLIC_PEM},
        **ROOMY,
        **UNSOLICITED,
    )
    # No approvedLocations: the Company install may mint for any location.
    await install_unsolicited(http, proxy.url, simulator, user_type="Company", company_id="coY")
    simulator.state.set_faults({"unknown_locations": ["ghost"]})
    for _ in range(5):
        status, body = await managed(http, proxy.url, "ghost")
        assert (status, body["error"]) == (404, "no_token")
    assert simulator.state.stats()["location_token_requests"] == 1
    clock.advance(61)
    assert (await managed(http, proxy.url, "ghost"))[0] == 404
    assert simulator.state.stats()["location_token_requests"] == 2
    simulator.state.clear_faults()  # the location now exists upstream
    assert (await managed(http, proxy.url, "ghost"))[0] == 404  # remembered: no call
    assert simulator.state.stats()["location_token_requests"] == 2
    payload = event("INSTALL", installType="Location", locationId="ghost", companyId="coY")
    status, body = await deliver(http, proxy.url, payload)
    assert (status, body["action"]) == (200, "token ready for location ghost")
    assert (await managed(http, proxy.url, "ghost"))[0] == 200
