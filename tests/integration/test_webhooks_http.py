"""`POST /_proxy/webhooks/{app}` over real HTTP: signed, fresh, once, for the right app;
and what INSTALL and UNINSTALL do to the stored tokens."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.webhook_deliveries import PUBLIC_PEM, SIGNER, deliver, event


@pytest.fixture
async def proxy(simulator, start_proxy) -> Any:
    return await start_proxy(simulator.url, webhooks={"ed25519_public_key": PUBLIC_PEM})


async def installed(http: aiohttp.ClientSession, proxy_url: str, simulator, location: str) -> None:
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=location)
    await install_via_start(http, proxy_url, code)


async def managed_status(http: aiohttp.ClientSession, proxy_url: str, location: str) -> int:
    async with http.get(
        f"{proxy_url}/contacts/", headers={"X-HoopAI-Location-Id": location}
    ) as answer:
        return answer.status


async def test_signed_uninstall_deletes_the_token(simulator, proxy, http) -> None:
    """A valid UNINSTALL removes the location's token: its requests then get 404 no_token."""
    await installed(http, proxy.url, simulator, "whLoc1")
    assert await managed_status(http, proxy.url, "whLoc1") == 200
    status, body = await deliver(http, proxy.url, event("UNINSTALL", locationId="whLoc1"))
    assert (status, body["action"]) == (200, "deleted location whLoc1")
    assert await managed_status(http, proxy.url, "whLoc1") == 404


async def test_install_for_an_approved_location_mints_its_token(simulator, proxy, http) -> None:
    """INSTALL of a location under an installed Company mints the location token at once."""
    code, _ = simulator.state.install(
        SIM_CLIENT_ID, user_type="Company", company_id="whCo", approved_locations=["whLoc2"]
    )
    await install_via_start(http, proxy.url, code)
    payload = event("INSTALL", installType="Location", locationId="whLoc2", companyId="whCo")
    status, body = await deliver(http, proxy.url, payload)
    assert (status, body["action"]) == (200, "token ready for location whLoc2")
    assert simulator.state.stats()["location_tokens_minted"] == 1


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("tampered", (401, "webhook_rejected")),
        ("other key", (401, "webhook_rejected")),
        ("stale", (401, "webhook_rejected")),
        ("wrong app", (401, "webhook_rejected")),
        ("unknown app path", (404, "not_found")),
    ],
)
async def test_bad_deliveries_are_refused_and_change_nothing(
    simulator, proxy, http, case, expected
) -> None:
    """Invalid signature, another signer, a stale timestamp, another app's delivery, or an
    unknown app in the URL: refused, and the token stays."""
    await installed(http, proxy.url, simulator, "whLoc3")
    payload = event("UNINSTALL", locationId="whLoc3", age_s=400 if case == "stale" else 0)
    if case == "wrong app":
        payload["appId"] = "someOtherApp"
    status, body = await deliver(
        http,
        proxy.url,
        payload,
        tamper=case == "tampered",
        signer=Ed25519PrivateKey.generate() if case == "other key" else SIGNER,
        app="nope" if case == "unknown app path" else "main",
    )
    assert (status, body["error"]) == expected
    assert await managed_status(http, proxy.url, "whLoc3") == 200


async def test_replayed_delivery_is_refused(simulator, proxy, http) -> None:
    """The same webhookId twice: the second is 409 webhook_replayed and does nothing."""
    await installed(http, proxy.url, simulator, "whLoc4")
    payload = event("INSTALL", installType="Location", locationId="whLoc4")
    assert (await deliver(http, proxy.url, payload))[0] == 200
    status, body = await deliver(http, proxy.url, payload)
    assert (status, body["error"]) == (409, "webhook_replayed")


async def test_unsigned_delivery_is_refused(simulator, proxy, http) -> None:
    """No signature header at all: 401, whatever the body says."""
    payload = json.dumps(event("UNINSTALL", locationId="x")).encode()
    async with http.post(f"{proxy.url}/_proxy/webhooks/main", data=payload) as answer:
        assert answer.status == 401
