"""The install flow: `/_proxy/oauth/start` sends the browser to the authorization page,
`/_proxy/oauth/callback` exchanges the code and stores the token.

The app is carried through the authorization page in `state` (its name), so one proxy can
install several apps on one callback URL. The page shown at the end says what was
installed, never a token.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from urllib.parse import urlencode

from aiohttp import web

from proxy.config import AppConfig, TokensConfig
from proxy.errors import BadRequest
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import InvalidGrant, OAuthClient, TokenEndpointError

log = logging.getLogger(__name__)


class InstallFlow:
    """The two handlers of the OAuth install flow."""

    def __init__(
        self,
        apps: Mapping[str, AppConfig],
        config: TokensConfig,
        oauth: OAuthClient,
        manager: TokenManager,
    ) -> None:
        self._apps = apps
        self._config = config
        self._oauth = oauth
        self._manager = manager

    def _app(self, name: str | None) -> AppConfig:
        if name is None and len(self._apps) == 1:
            return next(iter(self._apps.values()))
        if name is None or name not in self._apps:
            raise BadRequest(
                "Say which app to install with ?app=NAME, one of: " + ", ".join(sorted(self._apps))
            )
        return self._apps[name]

    async def start(self, request: web.Request) -> web.Response:
        """Redirect the browser to the marketplace's authorization page for the app."""
        app = self._app(request.query.get("app"))
        query = {
            "response_type": "code",
            "redirect_uri": app.redirect_uri,
            "client_id": app.client_id,
            "state": app.name,
        }
        if app.scopes:
            query["scope"] = app.scopes
        raise web.HTTPFound(f"{self._config.authorize_url}?{urlencode(query)}")

    async def callback(self, request: web.Request) -> web.Response:
        """Exchange `code` for tokens, store them, and say what was installed."""
        declined = request.query.get("error")
        if declined:
            raise BadRequest(
                f"The authorization page did not grant the install ({declined[:80]}); "
                "start again from /_proxy/oauth/start"
            )
        code = request.query.get("code")
        if not code:
            raise BadRequest("The callback needs ?code=... from the authorization page")
        app = self._app(request.query.get("state") or request.query.get("app"))
        try:
            grant = await self._oauth.exchange_code(app, code)
        except InvalidGrant as exc:
            raise BadRequest(
                f"The authorization code was refused ({exc.message}): codes work once and "
                f"expire quickly; install again from /_proxy/oauth/start?app={app.name}"
            ) from exc
        except TokenEndpointError as exc:
            raise BadRequest(f"The token endpoint refused the install: {exc.message}") from exc
        record = await self._manager.install(grant.record(app.app_id, now=self._oauth.clock()))
        page = _installed_page(app, record.kind, record.id, grant.approved_locations)
        return web.Response(text=page, content_type="text/html")


def _installed_page(app: AppConfig, kind: str, resource_id: str, approved: tuple[str, ...]) -> str:
    what = f"{kind} {html.escape(resource_id)}"
    extra = ""
    if kind == "company":
        extra = (
            f"<p>Approved locations: {html.escape(', '.join(approved)) or 'all'}. "
            "Location tokens are minted from this install when first used.</p>"
        )
    return (
        "<!doctype html><title>Installed</title>"
        f"<h1>Installed {html.escape(app.name)}</h1><p>The proxy now holds the token for "
        f"{what}.</p>{extra}"
    )
