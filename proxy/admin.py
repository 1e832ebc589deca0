"""The admin listener: `/metrics` (Prometheus), `/status.json` and `/status` (HTML).

It listens on its own address (`admin.host:admin.port`, loopback by default) so it can be
kept off the callers' network. With `admin.token` set, every admin request needs
`Authorization: Bearer <token>`. Nothing here shows a token or a caller key: the status
shows each resource's remaining counts, requests held, the upstream's last rate-limit
headers and when the cached access token expires.
"""

from __future__ import annotations

import hmac
import html
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.app import ADMISSION, CONFIG, METRICS, TOKENS, unexpected
from proxy.errors import CallerUnauthenticated, RequestError, error_response

MAIN_APP = web.AppKey("main_app", web.Application)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(main: web.Application) -> web.Application:
    """The admin application for the proxy application `main`."""
    admin = web.Application(middlewares=[require_admin_token])
    admin[MAIN_APP] = main
    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/status.json", status_json)
    admin.router.add_get("/status", status_page)
    return admin


@web.middleware
async def require_admin_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[MAIN_APP][CONFIG].admin.token
    if token:
        sent = request.headers.get("Authorization", "")
        # Bytes that are not UTF-8 arrive as surrogate escapes: encode them, never fail.
        sent_bytes = sent.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(sent_bytes, f"Bearer {token}".encode()):
            return error_response(
                CallerUnauthenticated(
                    "The admin listener needs Authorization: Bearer <admin.token>"
                )
            )
    try:
        return await handler(request)
    except RequestError as error:
        return error_response(error)
    except web.HTTPException:
        raise
    except Exception as error:
        return error_response(unexpected(request, error))


async def metrics(request: web.Request) -> web.Response:
    body = request.app[MAIN_APP][METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _resources(main: web.Application) -> list[dict[str, object]]:
    return main[ADMISSION].board.snapshot(main[TOKENS].cached_expiry)


async def status_json(request: web.Request) -> web.Response:
    main = request.app[MAIN_APP]
    limits = main[ADMISSION].limits
    return web.json_response(
        {
            "limits": {
                "burst": limits.burst,
                "window_s": limits.window_s,
                "daily": limits.daily,
                "mode": "shadow" if main[ADMISSION].shadow else "enforce",
            },
            "resources": _resources(main),
        }
    )


async def status_page(request: web.Request) -> web.Response:
    rows = "".join(_row(view) for view in _resources(request.app[MAIN_APP]))
    page = (
        "<!doctype html><title>hoopai-proxy status</title><h1>hoopai-proxy</h1>"
        "<table border=1 cellpadding=4><tr><th>app id</th><th>resource</th><th>burst left</th>"
        "<th>daily left</th><th>waiting</th><th>upstream remaining</th>"
        f"<th>token expires in</th><th>last seen</th></tr>{rows}</table>"
    )
    return web.Response(text=page, content_type="text/html")


def _row(view: dict[str, object]) -> str:
    now = time.time()
    upstream = view["upstream"]
    remaining = upstream.get("X-RateLimit-Remaining", "-") if isinstance(upstream, dict) else "-"
    expires = view["token_expires_at"]
    expires_in = f"{(float(expires) - now) / 60:.0f} min" if isinstance(expires, float) else "-"
    seen = f"{now - float(str(view['last_seen'])):.0f} s ago"
    cells = [
        view["app"],
        f"{view['kind']}:{view['id']}",
        view["burst_remaining"],
        view["daily_remaining"],
        view["waiting"],
        remaining,
        expires_in,
        seen,
    ]
    return "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>"
