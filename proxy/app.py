"""Wires the proxy together: `create_app(config)` returns the aiohttp application.

Every resource the app holds (the pooled upstream ClientSession, the Redis client, the
limiter, the token store and manager, the keep-alive task) is opened and closed in a
cleanup context and reached through a typed `AppKey`, so tests can run many apps side by
side. Backends are chosen here from the config: no Redis means the in-process limiter and
the SQLite token store; with Redis, the shared limiter (with its fallback) and the Redis
token store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisError

from proxy.admission import Admission
from proxy.config import Config, UpstreamConfig
from proxy.errors import (
    BadRequest,
    InternalError,
    NotFound,
    RequestError,
    TokenStoreUnavailable,
    error_response,
)
from proxy.forward import Forwarder
from proxy.limiter.base import Limiter
from proxy.limiter.fallback import FallbackLimiter
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.metrics import Metrics
from proxy.redis_client import connect_redis
from proxy.resolve import Resolver
from proxy.tokens.deliveries import WebhookReceiver
from proxy.tokens.install import InstallFlow
from proxy.tokens.keepalive import KeepAlive
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import TokenStore
from proxy.tokens.stores import open_token_store
from proxy.tokens.webhooks import WebhookKeys

CONFIG = web.AppKey("config", Config)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
RedisClient = Redis | RedisCluster
REDIS: web.AppKey[RedisClient | None] = web.AppKey("redis")
LIMITER = web.AppKey("limiter", Limiter)
TOKEN_STORE = web.AppKey("token_store", TokenStore)
TOKENS = web.AppKey("tokens", TokenManager)
FORWARDER = web.AppKey("forwarder", Forwarder)
INSTALL = web.AppKey("install", InstallFlow)
METRICS = web.AppKey("metrics", Metrics)
ADMISSION = web.AppKey("admission", Admission)
WEBHOOKS = web.AppKey("webhooks", WebhookReceiver)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger(__name__)


def create_app(
    config: Config, *, clock: Callable[[], float] = time.time, keepalive: bool = True
) -> web.Application:
    """Build the proxy application for `config`.

    `clock` (wall time) drives token expiry and the limit day; tests move it. With
    `keepalive` False no background refresh task runs (tests drive it by hand).
    """
    app = web.Application(middlewares=[answer_errors_as_json])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_limiter)
    app.cleanup_ctx.append(_token_store)
    app.cleanup_ctx.append(_upstream(clock, keepalive))
    app.router.add_get("/_proxy/healthz", healthz)
    app.router.add_get("/_proxy/readyz", readyz)
    app.router.add_get("/_proxy/oauth/start", oauth_start)
    app.router.add_get("/_proxy/oauth/callback", oauth_callback)
    app.router.add_post("/_proxy/webhooks/{app}", webhook)
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
    client = await connect_redis(store) if store.redis_url else None
    app[REDIS] = client
    yield
    if client is not None:
        await client.aclose()


def choose_limiter(config: Config, client: Redis | RedisCluster | None) -> Limiter:
    """Memory without Redis; with Redis, the shared limiter behind its fallback. Either
    way the state kept in process is capped at `limits.max_tracked_keys` keys."""
    max_keys = config.limits.max_tracked_keys
    if client is None:
        return MemoryLimiter(max_keys=max_keys)
    share = config.store.expected_replicas if config.store.on_redis_error == "local" else None
    shared = RedisLimiter(client, max_keys=max_keys)
    return FallbackLimiter(shared, local_share=share, max_keys=max_keys)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    limiter = choose_limiter(app[CONFIG], app[REDIS])
    app[LIMITER] = limiter
    if isinstance(limiter, FallbackLimiter):
        app[METRICS].watch_degraded(lambda: limiter.degraded)
    yield
    await limiter.close()


async def _token_store(app: web.Application) -> AsyncIterator[None]:
    store = await open_token_store(app[CONFIG].store, app[REDIS])
    app[TOKEN_STORE] = store
    yield
    await store.close()


def _upstream(
    clock: Callable[[], float], keepalive: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The upstream session and everything that uses it: tokens, install, forwarding."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        apps_by_id = {app_config.app_id: app_config for app_config in config.apps}
        async with upstream_session(config.upstream) as session:
            metrics = app[METRICS]
            tokens = TokenManager.for_config(
                config, app[TOKEN_STORE], session, metrics=metrics, clock=clock
            )
            oauth = tokens.oauth
            admission = Admission(
                app[LIMITER], config.limits, config.queue, metrics=metrics, wall_clock=clock
            )
            app[ADMISSION] = admission
            app[HTTP_SESSION] = session
            app[TOKENS] = tokens
            apps_by_name = {app_config.name: app_config for app_config in config.apps}
            app[INSTALL] = InstallFlow(apps_by_name, config.tokens, oauth, tokens)
            keys = WebhookKeys.from_pem(
                config.webhooks.ed25519_public_key, config.webhooks.rsa_public_key
            )
            app[WEBHOOKS] = WebhookReceiver(
                apps_by_name, keys, config.webhooks, tokens, clock=clock
            )
            app[FORWARDER] = Forwarder(session, config, Resolver(config), admission, tokens)
            task = None
            if keepalive:
                refresher = KeepAlive(tokens, apps_by_id, config.tokens, clock=clock)
                task = asyncio.create_task(refresher.run_forever())
            yield
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await tokens.aclose(config.tokens.refresh_lock_ttl_s)

    return context


@web.middleware
async def answer_errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse targets a reverse proxy must not follow; turn RequestErrors into JSON, and
    any unexpected exception into a JSON 500 `internal_error` with one log line."""
    try:
        refuse_non_origin_form(request)
        response = await handler(request)
    except RequestError as error:
        response = error_response(error)
    except web.HTTPException:
        raise  # aiohttp's own answers (redirects of the install flow)
    except Exception as error:
        response = error_response(unexpected(request, error))
    request.app[METRICS].answers.labels(str(response.status)).inc()
    return response


def unexpected(request: web.Request, error: Exception) -> InternalError:
    """Log an unexpected exception as one line and say so to the caller.

    The line names the exception's type and where it was raised, never its message or a
    traceback with values: either may quote a header, a body or a token.
    """
    frame = traceback.extract_tb(error.__traceback__)[-1:] or None
    where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "?"
    log.error(
        "unexpected %s at %s answering %s %s",
        type(error).__name__,
        where,
        request.method,
        request.path,
    )
    return InternalError(
        "The proxy failed unexpectedly on this request; it was logged. Retry, and report it "
        "if it persists"
    )


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
    checks = {"redis": await _redis_check(request.app[REDIS]), "token_store": "ok"}
    try:
        await request.app[TOKEN_STORE].get("readyz", "location", "readyz")
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
    return await request.app[INSTALL].start(request)


async def oauth_callback(request: web.Request) -> web.Response:
    return await request.app[INSTALL].callback(request)


async def webhook(request: web.Request) -> web.Response:
    return await request.app[WEBHOOKS].handle(request)


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER](request)
