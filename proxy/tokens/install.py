"""The install flow: `/_proxy/oauth/start` sends the browser to the authorization page,
`/_proxy/oauth/callback` exchanges the code and stores the token.

The callback is bound to the browser that opened /start (install CSRF: otherwise a page
could send an admin's browser to the callback with a code of the attacker's choosing).
/start puts `<app name>.<nonce>` in `state` and the nonce in a short-lived cookie
(HttpOnly, SameSite=Lax, scoped to /_proxy/oauth/); a callback whose state carries a nonce
installs only if the cookie holds the same one, and the callback clears the cookie. A
callback with no nonce (the marketplace's own install button sends no state; older
proxies sent the bare app name) is unsolicited: accepted only when
`tokens.accept_unsolicited_installs` is true.

Every refused code costs a call to the token endpoint, so a client address may have at
most `BAD_CODE_LIMIT` codes refused within `BAD_CODE_WINDOW_S`; past that it gets 429
and the token endpoint is not called.

The app's name travels in `state`, so one proxy can install several apps on one callback
URL. The page shown at the end says what was installed, never a token.

A Company install (a bulk install approving many locations) is reconciled at once
(reconcile.py): the callback waits up to `INSTALL_WAIT_S` for every approved location's
token to be minted, then lets the rest go on in the background, and its page says which.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from aiohttp import web

from proxy.config import AppConfig, Config
from proxy.errors import (
    BadRequest,
    InstallRefused,
    InvalidGrant,
    ProxyError,
    RateLimited,
    TokenEndpointError,
)
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import OAuthClient, TokenGrant
from proxy.tokens.reconcile import Reconciled, Reconciler

log = logging.getLogger(__name__)

INSTALL_COOKIE = "hoopai_install"
COOKIE_PATH = "/_proxy/oauth/"
# Long enough to pick locations on the authorization page; its codes live 10 minutes too.
COOKIE_MAX_AGE_S = 600
BAD_CODE_LIMIT = 5
BAD_CODE_WINDOW_S = 60.0
# Addresses remembered at most; past it the least recently seen is forgotten, so a flood
# from many addresses costs bounded memory.
MAX_TRACKED_ADDRESSES = 10_000
# How long the callback waits for a Company's locations to be minted before answering.
INSTALL_WAIT_S = 10.0


class InstallFlow:
    """The two handlers of the OAuth install flow."""

    def __init__(
        self,
        config: Config,
        oauth: OAuthClient,
        manager: TokenManager,
        reconciler: Reconciler,
    ) -> None:
        self._config = config
        self._oauth = oauth
        self._manager = manager
        self._reconciler = reconciler
        self._bad_codes = BadCodeLimit(oauth.clock)

    def _app(self, name: str | None) -> AppConfig:
        app = self._config.app_named(name)
        if app is None:
            raise BadRequest(
                f"Say which app to install with ?app=NAME, one of: {self._config.app_names}"
            )
        return app

    async def start(self, request: web.Request) -> web.Response:
        """Redirect the browser to the marketplace's authorization page for the app, with
        a fresh nonce in `state` and in the install cookie."""
        app = self._app(request.query.get("app"))
        nonce = secrets.token_urlsafe(32)
        query = {
            "response_type": "code",
            "redirect_uri": app.redirect_uri,
            "client_id": app.client_id,
            "state": f"{app.name}.{nonce}",
        }
        if app.scopes:
            query["scope"] = app.scopes
        redirect = web.HTTPFound(f"{self._config.tokens.authorize_url}?{urlencode(query)}")
        # Secure when the callback is served over TLS; a browser drops a Secure cookie
        # set over plain http, which would break local installs.
        secure = app.redirect_uri.startswith("https://")
        redirect.headers["Set-Cookie"] = _cookie(nonce, COOKIE_MAX_AGE_S, secure=secure)
        raise redirect

    async def callback(self, request: web.Request) -> web.Response:
        """Exchange `code` for tokens, store them, and say what was installed. The install
        cookie is cleared whatever the outcome: a nonce is good for one callback."""
        # Never Secure: clearing must work on a plain-http callback too, and a browser
        # lets an https page overwrite a Secure cookie with a plain one.
        clear = (
            {"Set-Cookie": _cookie("", 0, secure=False)}
            if INSTALL_COOKIE in request.cookies
            else {}
        )
        try:
            page = await self._install(request)
        except ProxyError as exc:
            exc.headers.update(clear)
            raise
        return web.Response(text=page, content_type="text/html", headers=clear)

    async def _install(self, request: web.Request) -> str:
        declined = request.query.get("error")
        if declined:
            raise BadRequest(
                f"The authorization page did not grant the install ({declined[:80]}); "
                "start again from /_proxy/oauth/start"
            )
        code = request.query.get("code")
        if not code:
            raise BadRequest("The callback needs ?code=... from the authorization page")
        app = self._solicited_app(request)
        grant = await self._exchange(app, code, request.remote or "")
        record = await self._manager.install(grant.record(app.app_id, now=self._oauth.clock()))
        reconciled = None
        if record.kind == "company":
            reconciled = await self._reconcile(app, record.id)
        return _installed_page(app, record.kind, record.id, grant.approved_locations, reconciled)

    async def _reconcile(self, app: AppConfig, company_id: str) -> Reconciled | None:
        """Mint the Company's locations now; None if that takes over INSTALL_WAIT_S (it
        goes on in the background)."""
        task = self._reconciler.schedule(app, company_id)
        done, _ = await asyncio.wait({task}, timeout=INSTALL_WAIT_S)
        return task.result() if done else None

    def _solicited_app(self, request: web.Request) -> AppConfig:
        """The app of the callback, once its state is bound to this browser's cookie (or
        an unsolicited install is allowed); else InstallRefused."""
        state = request.query.get("state", "")
        name, nonce = _split_state(state, self._config)
        app = self._app(name or request.query.get("app"))
        if nonce is None:
            if self._config.tokens.accept_unsolicited_installs:
                return app
            raise InstallRefused(
                "This install did not start at /_proxy/oauth/start, so nothing shows it was "
                f"asked for: start it at /_proxy/oauth/start?app={app.name}. To accept installs "
                "from the marketplace's own install button, the operator sets "
                "tokens.accept_unsolicited_installs: true"
            )
        cookie = request.cookies.get(INSTALL_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), nonce.encode()):
            raise InstallRefused(
                "This install was not started in this browser, or was started over 10 "
                "minutes ago (its state does not match the install cookie): start again at "
                f"/_proxy/oauth/start?app={app.name}"
            )
        return app

    async def _exchange(self, app: AppConfig, code: str, address: str) -> TokenGrant:
        """The grant for `code`; a refused code counts against `address`."""
        attempt = self._bad_codes.begin(address)
        refused = False
        try:
            return await self._oauth.exchange_code(app, code)
        except InvalidGrant as exc:
            refused = True
            raise BadRequest(
                f"The authorization code was refused ({exc.message}): codes work once and "
                f"expire quickly; install again from /_proxy/oauth/start?app={app.name}"
            ) from exc
        except TokenEndpointError as exc:
            raise BadRequest(f"The token endpoint refused the install: {exc.message}") from exc
        finally:
            if not refused:
                self._bad_codes.forgive(address, attempt)


class BadCodeLimit:
    """Refused authorization codes per client address, over a sliding window.

    An attempt counts from the moment it starts (so concurrent guesses cannot slip past
    the limit) and is forgiven unless its code is refused.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        limit: int = BAD_CODE_LIMIT,
        window_s: float = BAD_CODE_WINDOW_S,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
    ) -> None:
        if limit < 1 or window_s <= 0 or max_addresses < 1:
            raise ValueError("limit, window_s and max_addresses must be positive")
        self._clock = clock
        self._limit = limit
        self._window_s = window_s
        self._max_addresses = max_addresses
        self._attempts: OrderedDict[str, deque[float]] = OrderedDict()

    def begin(self, address: str) -> float:
        """Count an attempt from `address` (its time is returned), or raise RateLimited."""
        now = self._clock()
        times = self._attempts.pop(address, None) or deque()
        while times and times[0] <= now - self._window_s:
            times.popleft()
        self._attempts[address] = times  # now the most recently seen
        if len(times) >= self._limit:
            wait_s = max(1, math.ceil(times[0] + self._window_s - now))
            raise RateLimited(
                f"{len(times)} authorization codes from this address were refused within "
                f"{self._window_s:g} s: wait {wait_s} s, then install again from "
                "/_proxy/oauth/start",
                headers={"Retry-After": str(wait_s)},
            )
        times.append(now)
        while len(self._attempts) > self._max_addresses:
            self._attempts.popitem(last=False)
        return now

    def forgive(self, address: str, attempt: float) -> None:
        """The attempt begun at `attempt` did not end in a refused code: uncount it."""
        times = self._attempts.get(address)
        if times is not None and attempt in times:
            times.remove(attempt)
            if not times:
                del self._attempts[address]


def _split_state(state: str, config: Config) -> tuple[str | None, str | None]:
    """(app name, nonce) from `state`. No state, or a bare app name, carries no nonce."""
    if not state:
        return None, None
    name, dot, nonce = state.rpartition(".")
    if config.app_named(state) is not None or not dot or not nonce:
        return state, None
    return name, nonce


def _cookie(value: str, max_age_s: int, *, secure: bool) -> str:
    """The install cookie as a Set-Cookie value."""
    jar: SimpleCookie = SimpleCookie()
    jar[INSTALL_COOKIE] = value
    morsel = jar[INSTALL_COOKIE]
    morsel["path"] = COOKIE_PATH
    morsel["max-age"] = str(max_age_s)
    morsel["httponly"] = True
    morsel["samesite"] = "Lax"
    if secure:
        morsel["secure"] = True
    return morsel.OutputString()


def _installed_page(
    app: AppConfig,
    kind: str,
    resource_id: str,
    approved: tuple[str, ...],
    reconciled: Reconciled | None = None,
) -> str:
    what = f"{kind} {html.escape(resource_id)}"
    extra = ""
    if kind == "company":
        extra = (
            f"<p>Approved locations: {html.escape(', '.join(approved)) or 'all'}. "
            f"{_minting_note(reconciled)}</p>"
        )
    return (
        "<!doctype html><title>Installed</title>"
        f"<h1>Installed {html.escape(app.name)}</h1><p>The proxy now holds the token for "
        f"{what}.</p>{extra}"
    )


def _minting_note(reconciled: Reconciled | None) -> str:
    """What the page says of the location tokens of a Company install."""
    if reconciled is None:
        return (
            "Location tokens are being minted in the background; /status and "
            "`hoopai-proxy tokens list` show them as they come."
        )
    if reconciled.skipped or not reconciled.listed:
        return "Location tokens are minted from this install when first used."
    failed = f", {reconciled.failed} could not be minted yet" if reconciled.failed else ""
    return (
        f"The app is installed on {reconciled.listed} location(s): "
        f"{reconciled.minted + reconciled.present} hold a token now{failed}."
    )
