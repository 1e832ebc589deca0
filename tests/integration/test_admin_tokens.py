"""Token admin over HTTP on the admin listener, against a real proxy and the simulator:
list, refresh now, delete and the install URL; the admin token on every route; no token
in any answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.admin import create_admin_app
from proxy.server import RunningServer, bind_socket, start_server
from proxy.services import SERVICES, Services
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.leaks import leaked

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "adminTokLoc1"
ADMIN_TOKEN = "adm1n-t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROUTE = f"/tokens/main/location/{LOCATION}"


@dataclass
class Setup:
    proxy: RunningServer
    admin: RunningServer

    @property
    def services(self) -> Services:
        return self.proxy.runner.app[SERVICES]


@pytest.fixture
async def installed(simulator, start_proxy, http) -> AsyncIterator[Setup]:
    """A proxy (admin token set) with the app installed for LOCATION, and its admin
    listener."""
    proxy = await start_proxy(simulator.url, admin={"host": "127.0.0.1", "token": ADMIN_TOKEN})
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )
    yield Setup(proxy, admin)
    await admin.stop()


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, str]:
    """status, parsed JSON and raw text of one admin request (with the admin token unless
    `headers` says otherwise)."""
    async with http.request(method, url, headers=AUTH if headers is None else headers) as answer:
        text = await answer.text()
        assert answer.content_type == "application/json", text
        return answer.status, await answer.json(), text


async def test_list_shows_status_expiry_age_and_version_never_a_token(
    installed, simulator, http
) -> None:
    """GET /tokens lists the installed resource with its status, expiry, refresh-token
    age, version and install URL; ?app= and ?kind= filter; an unknown app is a 404 that
    names the configured apps, an unknown kind a 400 naming the kinds; no token appears."""
    admin = installed.admin.url
    status, body, text = await call(http, "GET", f"{admin}/tokens")
    assert status == 200
    [row] = body["tokens"]
    assert {k: row[k] for k in ("app", "app_id", "kind", "id", "status", "version")} == {
        "app": "main",
        "app_id": APP_ID,
        "kind": "location",
        "id": LOCATION,
        "status": "ok",
        "version": 1,
    }
    assert row["install_url"] == "http://localhost:8080/_proxy/oauth/start?app=main"
    assert 0 < row["access_token_expires_in_s"] <= 86399
    assert row["access_token_expires_at"] > simulator.state.now()
    assert 0 <= row["refresh_token_age_s"] < 3600
    texts = [text]
    for query, count in (("?app=main&kind=location", 1), ("?kind=company", 0)):
        status, body, text = await call(http, "GET", f"{admin}/tokens{query}")
        assert (status, len(body["tokens"])) == (200, count)
        texts.append(text)
    status, body, _ = await call(http, "GET", f"{admin}/tokens?app=nope")
    assert (status, body["error"]) == (404, "not_found") and "main" in body["message"]
    status, body, _ = await call(http, "GET", f"{admin}/tokens?kind=agency")
    assert (status, body["error"]) == (400, "bad_request") and "location" in body["message"]
    status, body, text = await call(http, "GET", f"{admin}{ROUTE}")
    assert (status, body["id"], body["version"]) == (200, LOCATION, 1)
    texts.append(text)
    assert leaked(texts, simulator.state.tokens.issued()) == []


async def test_refresh_now_rotates_the_pair_once(installed, simulator, http) -> None:
    """POST .../refresh refreshes through the token manager: one upstream refresh, the
    version goes up by one, the stored refresh token is a new one, and the answer shows
    the new version and no token."""
    store = installed.services.token_store
    before = await store.get(APP_ID, "location", LOCATION)
    refreshes = simulator.state.stats()["refreshes"]
    status, body, text = await call(http, "POST", f"{installed.admin.url}{ROUTE}/refresh")
    assert (status, body["status"], body["version"]) == (200, "ok", 2)
    after = await store.get(APP_ID, "location", LOCATION)
    assert before is not None and after is not None
    assert after.version == 2 and after.refresh_token != before.refresh_token
    assert simulator.state.stats()["refreshes"] == refreshes + 1
    assert leaked([text], simulator.state.tokens.issued()) == []


async def test_delete_removes_it_and_an_unknown_resource_is_404(installed, simulator, http) -> None:
    """DELETE removes the record (the list is empty after); deleting, refreshing or
    showing a resource with nothing stored is 404 no_token saying where the stored ones
    are listed, and an unknown app in the path is 404 naming the configured apps."""
    admin = installed.admin.url
    status, body, _ = await call(http, "DELETE", f"{admin}{ROUTE}")
    assert (status, body) == (200, {"deleted": {"app": "main", "kind": "location", "id": LOCATION}})
    assert (await call(http, "GET", f"{admin}/tokens"))[1] == {"tokens": []}
    for method, path in (("DELETE", ROUTE), ("POST", f"{ROUTE}/refresh"), ("GET", ROUTE)):
        status, body, _ = await call(http, method, f"{admin}{path}")
        assert (status, body["error"]) == (404, "no_token"), (method, path)
        assert LOCATION in body["message"] and "GET /tokens" in body["message"]
    status, body, _ = await call(http, "POST", f"{admin}/tokens/other/location/x/refresh")
    assert (status, body["error"]) == (404, "not_found") and "main" in body["message"]
    assert simulator.state.stats()["refreshes"] == 0


async def test_every_token_route_needs_the_admin_token(installed, simulator, http) -> None:
    """Without the admin token (or with a wrong one) each token route answers 401 and
    does nothing: no refresh upstream, the record still stored."""
    admin = installed.admin.url
    routes = [
        ("GET", "/tokens"),
        ("GET", "/tokens/main/install-url"),
        ("GET", ROUTE),
        ("POST", f"{ROUTE}/refresh"),
        ("DELETE", ROUTE),
    ]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in routes:
            status, body, _ = await call(http, method, f"{admin}{path}", headers=headers)
            assert (status, body["error"]) == (401, "caller_unauthenticated"), (method, path)
    assert simulator.state.stats()["refreshes"] == 0
    assert await installed.services.token_store.get(APP_ID, "location", LOCATION) is not None


async def test_a_token_change_from_another_site_is_refused(installed, simulator, http) -> None:
    """A refresh or delete carrying a foreign Origin (a web page posting to the admin
    listener from an operator's browser) is 403 and changes nothing."""
    foreign = {**AUTH, "Origin": "http://evil.example"}
    for method, path in (("POST", f"{ROUTE}/refresh"), ("DELETE", ROUTE)):
        status, body, _ = await call(http, method, f"{installed.admin.url}{path}", foreign)
        assert (status, body["error"]) == (403, "resource_forbidden")
    assert simulator.state.stats()["refreshes"] == 0
    assert await installed.services.token_store.get(APP_ID, "location", LOCATION) is not None


async def test_install_url_is_the_proxy_start_on_the_redirect_uri_origin(
    simulator, start_proxy, http
) -> None:
    """GET /tokens/{app}/install-url: the proxy's /_proxy/oauth/start?app=NAME on the
    scheme, host and port of that app's redirect_uri; an unknown app is 404 naming both."""
    apps = [
        {"name": "main", "client_id": SIM_CLIENT_ID, "client_secret": "s"},
        {
            "name": "sales.team",
            "client_id": "7760f1a2b3c4d5e6f7a8b9c1-other",
            "client_secret": "s",
            "redirect_uri": "https://gw.example:8443/_proxy/oauth/callback",
        },
    ]
    proxy = await start_proxy(simulator.url, apps=apps)
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )
    try:
        status, body, _ = await call(http, "GET", f"{admin.url}/tokens/sales.team/install-url")
        missing = await call(http, "GET", f"{admin.url}/tokens/nope/install-url")
    finally:
        await admin.stop()
    assert (status, body) == (
        200,
        {
            "app": "sales.team",
            "install_url": "https://gw.example:8443/_proxy/oauth/start?app=sales.team",
        },
    )
    assert missing[0] == 404 and "main, sales.team" in missing[1]["message"]
