"""The admin listener: `/metrics` (Prometheus), `/status.json` and `/status` (HTML).

It listens on its own address (`admin.host:admin.port`, loopback by default) so it can be
kept off the callers' network. With `admin.token` set, every admin request needs
`Authorization: Bearer <token>`. Nothing here shows a token or a caller key: the status
shows each resource's limits (configured or learned from the upstream), remaining counts,
daily budget (today's count, the projection for the end of the limit day, near the limit
at 80%), requests held, the upstream's last rate-limit headers and when the cached access
token expires. Every value shown on the page is escaped.
"""

from __future__ import annotations

import hmac
import html
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

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
    admin.router.add_get("/status", status_page)
    return admin


def _services(request: web.Request) -> Services:
    return request.app[MAIN_APP][SERVICES]


def require_admin_token(request: web.Request) -> None:
    """With `admin.token` set, every admin request needs `Authorization: Bearer <token>`."""
    token = _services(request).config.admin.token
    if not token:
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
    return web.json_response(
        {
            "limits": {
                "burst": limits.burst,
                "window_s": limits.window_s,
                "daily": limits.daily,
                "mode": "shadow" if services.admission.shadow else "enforce",
            },
            "resources": _resources(services),
        }
    )


HEADINGS = (
    "app id",
    "resource",
    "burst left",
    "burst limit",
    "daily left",
    "daily used",
    "daily limit",
    "projected by day end",
    "limits",
    "waiting",
    "upstream remaining",
    "token expires in",
    "last seen",
)
PAGE_STYLE = "tr.near td{background:#fdd}"


async def status_page(request: web.Request) -> web.Response:
    rows = "".join(status_row(view) for view in _resources(_services(request)))
    headings = "".join(f"<th>{html.escape(heading)}</th>" for heading in HEADINGS)
    page = (
        f"<!doctype html><title>hoopai-proxy status</title><style>{PAGE_STYLE}</style>"
        "<h1>hoopai-proxy</h1><p>Projected: today's count plus the rate of about the last "
        "five minutes until the limit day ends. Near limit: 80% of the daily limit used.</p>"
        f"<table border=1 cellpadding=4><tr>{headings}</tr>{rows}</table>"
    )
    return web.Response(text=page, content_type="text/html")


def status_row(view: dict[str, object]) -> str:
    """One row of `/status` from a snapshot row, every cell escaped."""
    now = time.time()
    upstream = view["upstream"]
    remaining = upstream.get("X-RateLimit-Remaining", "-") if isinstance(upstream, dict) else "-"
    expires = view["token_expires_at"]
    expires_in = f"{(float(expires) - now) / 60:.0f} min" if isinstance(expires, float) else "-"
    seen = f"{now - float(str(view['last_seen'])):.0f} s ago"
    limits = view["limits"]
    assert isinstance(limits, dict)
    near = view["near_daily_limit"] is True
    used = _or_dash(view["daily_used"]) + (" (near limit)" if near else "")
    cells = [
        view["app"],
        f"{view['kind']}:{view['id']}",
        view["burst_remaining"],
        f"{limits['burst']} per {limits['window_s']:g} s",
        view["daily_remaining"],
        used,
        limits["daily"],
        _or_dash(view["daily_projected"]),
        "learned from upstream" if limits["learned"] else "configured",
        view["waiting"],
        remaining,
        expires_in,
        seen,
    ]
    opening = "<tr class=near>" if near else "<tr>"
    return opening + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
