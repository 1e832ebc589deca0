"""The proxy's HTTP application: `create_app(config)` returns it, routes and all.

The object graph behind the routes (Redis, limiter, token store, upstream session, token
manager, admission, forwarder, install flow, webhooks, keep-alive) is built by
`proxy.services.open_services` in the app's one cleanup context, and reached through the
`SERVICES` key, so tests can run many apps side by side.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from redis.exceptions import RedisError

from proxy.config import Config
from proxy.errors import BadRequest, NotFound, TokenStoreUnavailable
from proxy.http_errors import answer_errors_as_json
from proxy.services import SERVICES, RedisClient, open_services

if TYPE_CHECKING:
    from proxy.tracing import RequestTracing  # loaded only when tracing is on


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    keepalive: bool = True,
    tracing: RequestTracing | None = None,
) -> web.Application:
    """Build the proxy application for `config`.

    `clock` (wall time) drives token expiry and the limit day; tests move it. With
    `keepalive` False no background refresh task runs (tests drive it by hand). With
    `tracing` (`proxy.tracing`), each proxied request is traced; the app shuts the
    tracing down (flushing its spans) when it stops.
    """
    errors_as_json = answer_errors_as_json(before=refuse_non_origin_form, answered=count_answer)
    app = web.Application(middlewares=[errors_as_json])

    async def services(app: web.Application) -> AsyncIterator[None]:
        async with open_services(
            config, clock=clock, keepalive=keepalive, tracing=tracing
        ) as opened:
            app[SERVICES] = opened
            yield
        if tracing is not None:
            await tracing.aclose()

    app.cleanup_ctx.append(services)
    app.router.add_get("/_proxy/healthz", healthz)
    app.router.add_get("/_proxy/readyz", readyz)
    app.router.add_get("/_proxy/oauth/start", oauth_start)
    app.router.add_get("/_proxy/oauth/callback", oauth_callback)
    app.router.add_post("/_proxy/webhooks/{app}", webhook)
    app.router.add_route("*", "/_proxy/{tail:.*}", unknown_proxy_path)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def count_answer(request: web.Request, status: int) -> None:
    request.app[SERVICES].metrics.count_answer(status)


def refuse_non_origin_form(request: web.Request) -> None:
    """Only origin-form targets (`/path?query`) are proxied.

    An absolute-form target (`GET http://elsewhere/`) or CONNECT would turn the proxy into
    an open forward proxy, so both are refused before anything is sent.
    """
    if request.method == "CONNECT":
        raise BadRequest("CONNECT is not supported: this is a reverse proxy for the HoopAI API")
    if not request.raw_path.startswith("/"):
        raise BadRequest(
            "Absolute-form request targets are not proxied: send the path only, "
            "for example GET /contacts/?locationId=... to this proxy's address"
        )


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: Redis (when configured) answers a PING and the token store can be read."""
    services = request.app[SERVICES]
    checks = {"redis": await _redis_check(services.redis), "token_store": "ok"}
    try:
        await services.token_store.get("readyz", "location", "readyz")
    except TokenStoreUnavailable as exc:
        checks["token_store"] = exc.message
    ready = all(value in ("ok", "not configured") for value in checks.values())
    return web.json_response(
        {"status": "ok" if ready else "unavailable", **checks}, status=200 if ready else 503
    )


async def _redis_check(client: RedisClient | None) -> str:
    if client is None:
        return "not configured"
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return type(exc).__name__
    return "ok"


async def unknown_proxy_path(request: web.Request) -> web.Response:
    raise NotFound(
        f"No proxy endpoint at {request.path}; /_proxy/ paths are the proxy's own "
        "(try /_proxy/healthz), every other path is forwarded upstream"
    )


async def oauth_start(request: web.Request) -> web.Response:
    return await request.app[SERVICES].install.start(request)


async def oauth_callback(request: web.Request) -> web.Response:
    return await request.app[SERVICES].install.callback(request)


async def webhook(request: web.Request) -> web.Response:
    return await request.app[SERVICES].webhooks.handle(request)


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[SERVICES].forwarder(request)
