"""Wires the proxy together: `create_app(config)` returns the aiohttp application.

Every resource the app holds (the pooled upstream ClientSession, the Redis client, the
limiter) is opened and closed in a cleanup context and reached through a typed `AppKey`,
so tests can run many apps side by side. Backends are chosen here from the config: no
Redis means the in-process limiter; with Redis, the shared one with its fallback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from proxy.admission import Admission
from proxy.config import Config, UpstreamConfig
from proxy.errors import BadRequest, NotFound, RequestError, error_response
from proxy.forward import Forwarder
from proxy.limiter.base import Limiter
from proxy.limiter.fallback import FallbackLimiter
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.redis_client import open_redis
from proxy.resolve import Resolver

CONFIG = web.AppKey("config", Config)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
RedisClient = Redis | RedisCluster
REDIS: web.AppKey[RedisClient | None] = web.AppKey("redis")
LIMITER = web.AppKey("limiter", Limiter)
FORWARDER = web.AppKey("forwarder", Forwarder)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(config: Config) -> web.Application:
    """Build the proxy application for `config`."""
    app = web.Application(middlewares=[answer_errors_as_json])
    app[CONFIG] = config
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_forwarder)
    app.router.add_get("/_proxy/healthz", healthz)
    app.router.add_get("/_proxy/readyz", readyz)
    app.router.add_route("*", "/_proxy/{tail:.*}", unknown_proxy_path)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def upstream_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """One pooled session for all upstream traffic.

    Bodies pass through untouched (no decompression, no added User-Agent, Accept or
    Content-Type), cookies are never kept, and the timeouts bound every phase except a
    long body that keeps flowing.
    """
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=upstream.timeout_s,
        sock_connect=upstream.connect_timeout_s,
        sock_read=upstream.timeout_s,
    )
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=upstream.max_connections),
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


async def _redis(app: web.Application) -> AsyncIterator[None]:
    store = app[CONFIG].store
    client = open_redis(store) if store.redis_url else None
    app[REDIS] = client
    yield
    if client is not None:
        await client.aclose()


def choose_limiter(config: Config, client: Redis | RedisCluster | None) -> Limiter:
    """Memory without Redis; with Redis, the shared limiter behind its fallback."""
    if client is None:
        return MemoryLimiter()
    share = config.store.expected_replicas if config.store.on_redis_error == "local" else None
    return FallbackLimiter(RedisLimiter(client), local_share=share)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    limiter = choose_limiter(app[CONFIG], app[REDIS])
    app[LIMITER] = limiter
    yield
    await limiter.close()


async def _forwarder(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    admission = Admission(app[LIMITER], config.limits, config.queue)
    async with upstream_session(config.upstream) as session:
        app[HTTP_SESSION] = session
        app[FORWARDER] = Forwarder(session, config, Resolver(config), admission)
        yield


@web.middleware
async def answer_errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse targets a reverse proxy must not follow; turn RequestErrors into JSON."""
    try:
        refuse_non_origin_form(request)
        return await handler(request)
    except RequestError as error:
        return error_response(error)


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
    """Ready: Redis (when configured) answers a PING."""
    client = request.app[REDIS]
    if client is None:
        return web.json_response({"status": "ok", "redis": "not configured"})
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return web.json_response({"status": "unavailable", "redis": type(exc).__name__}, status=503)
    return web.json_response({"status": "ok", "redis": "ok"})


async def unknown_proxy_path(request: web.Request) -> web.Response:
    raise NotFound(
        f"No proxy endpoint at {request.path}; /_proxy/ paths are the proxy's own "
        "(try /_proxy/healthz), every other path is forwarded upstream"
    )


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER](request)
