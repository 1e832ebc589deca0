"""The admin listener: `/metrics` (Prometheus), `/status.json`, and `/status` (the live
dashboard, `proxy.dashboard`, which draws `/status.json`).

It listens on its own address (`admin.host:admin.port`, loopback by default) so it can be
kept off the callers' network. With `admin.token` set, every admin request needs
`Authorization: Bearer <token>`, except the dashboard's static page and files, which hold
no data (a browser's navigation cannot send the header; the page's script sends it).
Browsers on the operator's machine are kept out too (`guard_admin_request`): without a
token the listener answers only requests addressed to a loopback name (a DNS-rebinding
page names its own host), and a request that changes something and carries another
site's `Origin` is refused.
Nothing here shows a token or a caller key: the status shows each resource's limits
(configured or learned from the upstream), remaining counts, daily budget (today's count,
the projection for the end of the limit day, near the limit at 80%), requests held, the
upstream's last rate-limit headers, when the cached access token expires, admitted requests
per second and the upstream's recent 429s.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from proxy import admin_tokens, dashboard
from proxy.config import is_loopback_host
from proxy.errors import CallerUnauthenticated, ResourceForbidden
from proxy.http_errors import answer_errors_as_json
from proxy.services import SERVICES, Services

MAIN_APP = web.AppKey("main_app", web.Application)


def create_admin_app(main: web.Application) -> web.Application:
    """The admin application for the proxy application `main` (its services are read at
    each request: they exist once `main` has started)."""
    admin = web.Application(middlewares=[answer_errors_as_json(before=guard_admin_request)])
    admin[MAIN_APP] = main
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/status.json", status_json)
    dashboard.setup(admin)
    admin_tokens.setup(admin, _services)
    return admin


def _services(request: web.Request) -> Services:
    return request.app[MAIN_APP][SERVICES]


def guard_admin_request(request: web.Request) -> None:
    """Every admin request: not from another site's page, and with the token if set."""
    refuse_rebinding(request)
    refuse_cross_site(request)
    require_admin_token(request)


def refuse_rebinding(request: web.Request) -> None:
    """Without `admin.token`, only requests addressed to a loopback name are answered.

    A page on `evil.example` whose name is then pointed at 127.0.0.1 (DNS rebinding) is
    same-origin with this listener as far as the browser knows, and could read the status
    or delete tokens; its requests still say `Host: evil.example`. With a token set, the
    token is the guard (and the listener may be reached by any name, e.g. in compose).
    """
    if _services(request).config.admin.token:
        return
    host = URL.build(scheme="http", authority=request.host).host if request.host else None
    if host is None or not is_loopback_host(host.strip("[]")):
        raise ResourceForbidden(
            "The admin listener has no admin.token, so it answers only requests addressed "
            "to a loopback name: use http://127.0.0.1:PORT or http://localhost:PORT"
        )


def refuse_cross_site(request: web.Request) -> None:
    """A request that changes something (any method but GET, HEAD and OPTIONS) and says it
    comes from another site's page is refused: a page must not be able to make an
    operator's browser refresh or delete tokens or reload the config. Scripts and curl
    send no `Origin`."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise ResourceForbidden(
            "Changes are not taken from another site's page (this request carried an Origin "
            "header): send it from a script or curl, without Origin"
        )


def require_admin_token(request: web.Request) -> None:
    """With `admin.token` set, every admin request needs `Authorization: Bearer <token>`."""
    token = _services(request).config.admin.token
    if not token or request.path in dashboard.PUBLIC_PATHS:
        return
    # Bytes that are not UTF-8 arrive as surrogate escapes: encode them, never fail.
    sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(sent, f"Bearer {token}".encode()):
        raise CallerUnauthenticated("The admin listener needs Authorization: Bearer <admin.token>")


async def metrics(request: web.Request) -> web.Response:
    body = _services(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _resources(services: Services) -> list[dict[str, object]]:
    return services.board.snapshot(services.tokens.cached_expiry)


async def status_json(request: web.Request) -> web.Response:
    services = _services(request)
    limits = services.admission.limits
    # Keys are only ever added (scripts read this): the board's overall figures (`now`,
    # the chart's spans, admitted per second and upstream 429s of every resource) too.
    return web.json_response(
        {
            **services.board.overall(),
            "limits": {
                "burst": limits.burst,
                "window_s": limits.window_s,
                "daily": limits.daily,
                "mode": "shadow" if services.admission.shadow else "enforce",
            },
            "resources": _resources(services),
            "needs_reauth": services.reauth.listing(),
        },
        headers={"Cache-Control": "no-store"},
    )
