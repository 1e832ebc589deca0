"""The admin listener: `/metrics` (Prometheus), `/status.json`, and `/status` (the live
dashboard, `proxy.dashboard`, which draws `/status.json`).

It listens on its own address (`admin.host:admin.port`, loopback by default) so it can be
kept off the callers' network. With `admin.token` set, every admin request needs
`Authorization: Bearer <token>`, except the dashboard's static page and files, which hold
no data (a browser's navigation cannot send the header; the page's script sends it).
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

from proxy import admin_tokens, dashboard
from proxy.errors import CallerUnauthenticated
from proxy.http_errors import answer_errors_as_json
from proxy.services import SERVICES, Services

MAIN_APP = web.AppKey("main_app", web.Application)


def create_admin_app(main: web.Application) -> web.Application:
    """The admin application for the proxy application `main` (its services are read at
    each request: they exist once `main` has started)."""
    admin = web.Application(middlewares=[answer_errors_as_json(before=require_admin_token)])
    admin[MAIN_APP] = main
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/status.json", status_json)
    dashboard.setup(admin)
    admin_tokens.setup(admin, _services)
    return admin


def _services(request: web.Request) -> Services:
    return request.app[MAIN_APP][SERVICES]


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
