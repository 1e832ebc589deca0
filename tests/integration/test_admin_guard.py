"""The admin listener keeps browsers on the operator's machine out (proxy/admin.py
`guard_admin_request`): without an admin token it answers only requests addressed to a
loopback name (a DNS-rebinding page names its own host), and no admin route takes a change
from another site's page. A real proxy with its admin listener, over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.admin import create_admin_app
from proxy.config import load_config
from proxy.harness.processes import write_config
from proxy.reloader import Reloader
from proxy.server import RunningServer, bind_socket, start_server
from proxy.services import SERVICES
from tests.conftest import SIM_CLIENT_ID, base_document
from tests.support.installs import install_via_start

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "guardLoc1"
ROUTE = f"/tokens/main/location/{LOCATION}"


@dataclass
class Admin:
    url: str
    proxy: RunningServer


@pytest.fixture
async def admin(simulator, start_proxy, http, tmp_path: Path) -> AsyncIterator[Admin]:
    """A proxy with no admin token (the loopback default), the app installed for
    LOCATION, and its admin listener with POST /reload."""
    proxy = await start_proxy(simulator.url)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)
    path = write_config(tmp_path / "proxy.yaml", base_document(simulator.url))
    listener = create_admin_app(proxy.runner.app)
    started = load_config(path, {})
    Reloader(proxy.runner.app, str(path), {}, started=started).add_route(listener)
    server = await start_server(listener, bind_socket("127.0.0.1", 0), access_log=False)
    yield Admin(server.url, proxy)
    await server.stop()


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str]
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers) as answer:
        return answer.status, await answer.json()


async def test_a_rebound_host_is_refused_without_an_admin_token(admin, simulator, http) -> None:
    """Host: rebind.example (a page whose name now points at 127.0.0.1, so the browser
    calls it same-origin): reading the status and deleting a token are both 403 and the
    token stays; the same requests addressed to 127.0.0.1 or localhost are answered."""
    port = admin.url.rsplit(":", 1)[1]
    rebound = {"Host": f"rebind.example:{port}", "Origin": f"http://rebind.example:{port}"}
    for method, path in (("GET", "/status.json"), ("GET", "/tokens"), ("DELETE", ROUTE)):
        status, body = await call(http, method, f"{admin.url}{path}", rebound)
        assert (status, body["error"]) == (403, "resource_forbidden"), (method, path)
        assert "loopback" in body["message"]
    services = admin.proxy.runner.app[SERVICES]
    assert await services.token_store.get(APP_ID, "location", LOCATION) is not None
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        status, _ = await call(http, "GET", f"{admin.url}/status.json", {"Host": host})
        assert status == 200


async def test_no_change_is_taken_from_another_sites_page(admin, simulator, http) -> None:
    """POST /reload, a token refresh and a delete carrying a foreign Origin are 403 and do
    nothing (no refresh upstream, the token kept); without Origin (curl, a script) the
    reload is answered."""
    foreign = {"Origin": "http://evil.example"}
    for method, path in (("POST", "/reload"), ("POST", f"{ROUTE}/refresh"), ("DELETE", ROUTE)):
        status, body = await call(http, method, f"{admin.url}{path}", foreign)
        assert (status, body["error"]) == (403, "resource_forbidden"), (method, path)
    assert simulator.state.stats()["refreshes"] == 0
    services = admin.proxy.runner.app[SERVICES]
    assert await services.token_store.get(APP_ID, "location", LOCATION) is not None
    status, body = await call(http, "POST", f"{admin.url}/reload", {})
    assert status in (200, 409) and body["status"] in ("applied", "unchanged", "refused")
