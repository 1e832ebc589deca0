"""The token endpoint client never follows a redirect (proxy/tokens/oauth.py): a 307 from
/oauth/token would post the client secret and the refresh token wherever it points, and
every hop is one more send upstream that no limiter decision paid for. Two real HTTP
servers: an "upstream" that redirects, and the place it redirects to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.config import AppConfig, UpstreamConfig
from proxy.errors import TokenEndpointError
from proxy.services import upstream_session
from proxy.tokens.oauth import OAuthClient

APP = AppConfig(
    name="main",
    client_id="app1-client",
    client_secret="client-secret-value",
    redirect_uri="http://localhost:8080/_proxy/oauth/callback",
)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def redirecting() -> AsyncIterator[tuple[str, list[str], list[dict[str, Any]]]]:
    """(upstream URL, the upstream's request log, what the redirect target received)."""
    upstream_seen: list[str] = []
    target_seen: list[dict[str, Any]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        target_seen.append({"path": request.path, "body": await request.text()})
        return web.json_response({"access_token": "stolen", "locations": [], "count": 0})

    target, target_url = await serve(_app("/{tail:.*}", elsewhere))

    async def redirect(request: web.Request) -> web.Response:
        upstream_seen.append(f"{request.method} {request.path}")
        raise web.HTTPTemporaryRedirect(f"{target_url}/catch")

    upstream = web.Application()
    upstream.router.add_post("/oauth/token", redirect)
    upstream.router.add_get("/oauth/installedLocations", redirect)
    runner, upstream_url = await serve(upstream)
    yield upstream_url, upstream_seen, target_seen
    await runner.cleanup()
    await target.cleanup()


def _app(path: str, handler: Any) -> web.Application:
    app = web.Application()
    app.router.add_route("*", path, handler)
    return app


async def test_a_redirected_refresh_is_refused_and_sends_nothing_elsewhere(redirecting) -> None:
    """A 307 to a refresh is a TokenEndpointError after one send; the redirect's target
    receives nothing (no client secret, no refresh token)."""
    upstream_url, upstream_seen, target_seen = redirecting
    async with upstream_session(UpstreamConfig()) as session:
        oauth = OAuthClient(session, upstream_url, retry_delays_s=())
        with pytest.raises(TokenEndpointError, match="307"):
            await oauth.refresh(APP, "refresh-token-value", "Location")
    assert upstream_seen == ["POST /oauth/token"]
    assert target_seen == []


async def test_a_redirected_location_listing_is_refused_after_one_send(redirecting) -> None:
    """A 307 to /oauth/installedLocations is refused after one send, and the Company's
    token goes nowhere else."""
    upstream_url, upstream_seen, target_seen = redirecting
    async with upstream_session(UpstreamConfig()) as session:
        oauth = OAuthClient(session, upstream_url, retry_delays_s=())
        with pytest.raises(TokenEndpointError, match="307"):
            await oauth.installed_locations_page("company-token", "co1", "app1", skip=0, limit=5)
    assert upstream_seen == ["GET /oauth/installedLocations"]
    assert target_seen == []
