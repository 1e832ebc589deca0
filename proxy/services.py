"""The one place that builds the proxy's object graph, and closes it in reverse.

`open_services(config)` opens, in order: the Redis client (when `store.redis_url` is set),
the limiter (in memory, or Redis behind its fallback), the token store (SQLite or Redis),
the upstream HTTP session, the token manager and its token endpoint client, admission, the
forwarder, the install flow and the webhook receiver, and the keep-alive task; on the way
out each is closed after everything that uses it. The main app, the admin app, the
`tokens` commands, the demo and the tests all take what they need from the `Services` it
yields, so there is one graph and one order of teardown (docs/architecture.md, "Layout
and dependencies").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis, RedisCluster

from proxy.admission import Admission, limits_from
from proxy.alerts import AlertSender, open_alerts
from proxy.config import Config, UpstreamConfig
from proxy.forward import Forwarder
from proxy.limiter.base import Limiter
from proxy.limiter.fallback import FallbackLimiter
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter, ScriptClient
from proxy.metrics import Metrics
from proxy.pipelined_redis import open_script_client
from proxy.redis_client import connect_redis
from proxy.resolve import Resolver
from proxy.status import StatusBoard
from proxy.tokens.deliveries import WebhookReceiver
from proxy.tokens.forwarding import EventForwarder
from proxy.tokens.install import InstallFlow
from proxy.tokens.keepalive import KeepAlive
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import OAuthClient
from proxy.tokens.reauth import ReauthWatch
from proxy.tokens.reconcile import Reconciler
from proxy.tokens.store import TokenStore
from proxy.tokens.stores import open_token_store
from proxy.tokens.webhooks import WebhookKeys

if TYPE_CHECKING:
    from proxy.tracing import RequestTracing  # loaded only when tracing is on

RedisClient = Redis | RedisCluster


@dataclass(frozen=True)
class Services:
    """Everything one proxy process runs on, built from one config."""

    config: Config
    metrics: Metrics
    redis: RedisClient | None
    limiter: Limiter
    token_store: TokenStore
    session: aiohttp.ClientSession
    oauth: OAuthClient
    tokens: TokenManager
    admission: Admission
    board: StatusBoard
    resolver: Resolver
    forwarder: Forwarder
    install: InstallFlow
    webhooks: WebhookReceiver
    reconciler: Reconciler
    alerts: AlertSender
    reauth: ReauthWatch

    def use_config(self, config: Config) -> None:
        """The config a reload applied (proxy/reloader.py): whoever reads `config` from
        now on sees it. Only the keys proxy/reload.py lets change in place differ from the
        one the services were built with; the owners of their state took them already."""
        object.__setattr__(self, "config", config)


SERVICES = web.AppKey("services", Services)


@asynccontextmanager
async def open_services(
    config: Config,
    *,
    clock: Callable[[], float] = time.time,
    keepalive: bool = True,
    warn_clear: bool = True,
    tracing: RequestTracing | None = None,
) -> AsyncIterator[Services]:
    """Open everything `config` describes; close it all, in reverse, on the way out.

    `clock` (wall time) drives token expiry and the limit day; tests move it. `keepalive`
    False runs no background task, neither token refresh nor the limiter's health check
    (the `tokens` commands, tests that drive it by hand); `warn_clear` False skips the
    warning about tokens stored in clear (commands an operator runs by hand). `tracing`
    (proxy.tracing) gives the forwarder its spans; None, the default, traces nothing.
    """
    async with AsyncExitStack() as stack:
        redis = await connect_redis(config.store) if config.store.redis_url else None
        if redis is not None:
            stack.push_async_callback(redis.aclose)
        scripts = await open_script_client(config.store) if config.store.redis_url else None
        if scripts is not None:
            stack.push_async_callback(scripts.aclose)
        metrics = Metrics()
        if scripts is not None:
            metrics.watch_script_calls(lambda: scripts.commands, lambda: scripts.flushes)
        limiter = choose_limiter(config, redis, scripts)
        stack.push_async_callback(limiter.close)
        if isinstance(limiter, FallbackLimiter):
            metrics.watch_degraded(lambda: limiter.degraded)
        store = await open_token_store(config.store, redis, warn_clear=warn_clear)
        stack.push_async_callback(store.close)
        session = await stack.enter_async_context(upstream_session(config.upstream))
        # The longest one token endpoint call can take; the refresh lock must outlive it.
        attempt_s = config.upstream.timeout_s + config.upstream.connect_timeout_s
        base_url = config.upstream.base_url
        oauth = OAuthClient(session, base_url, attempt_timeout_s=attempt_s, clock=clock)
        # Opened before the token manager, so alerts it raises while closing still go out.
        alerts = await stack.enter_async_context(open_alerts(config.alerts))
        reauth = ReauthWatch(config, metrics, alerts, clock=clock)
        tokens = TokenManager(
            store,
            oauth,
            config.tokens,
            metrics=metrics,
            attempt_s=attempt_s,
            clock=clock,
            reauth=reauth,
        )
        # Refreshes under way may hold the only live pair: let them finish first.
        stack.push_async_callback(tokens.aclose, config.tokens.refresh_lock_ttl_s)
        board = StatusBoard(limits_from(config.limits), clock=clock, metrics=metrics)
        metrics.watch_daily_remaining(board.least_daily_remaining)
        admission = Admission(
            limiter, config.limits, config.queue, metrics=metrics, board=board, wall_clock=clock
        )
        metrics.pad_seconds.set_function(lambda: admission.pad.pad_s)
        # Slots being given back reach the limiter before it closes.
        stack.push_async_callback(admission.aclose)
        reconciler = Reconciler(config, store, oauth, tokens, admission, clock=clock)
        # Reconciles under way use the session, the store and the limiter: cancelled first.
        stack.push_async_callback(reconciler.aclose)
        events = EventForwarder(config.webhooks.forward_to, config.webhooks.forward_secret)
        stack.push_async_callback(events.aclose)
        resolver = Resolver(config)
        services = Services(
            config=config,
            metrics=metrics,
            redis=redis,
            limiter=limiter,
            token_store=store,
            session=session,
            oauth=oauth,
            tokens=tokens,
            admission=admission,
            board=board,
            resolver=resolver,
            forwarder=Forwarder(
                session, config, resolver, admission, tokens, metrics, tracing=tracing
            ),
            install=InstallFlow(config, oauth, tokens, reconciler),
            webhooks=_webhook_receiver(config, tokens, store, reconciler, events, clock),
            reconciler=reconciler,
            alerts=alerts,
            reauth=reauth,
        )
        if keepalive:
            by_id = {app.app_id: app for app in config.apps}
            refresher = KeepAlive(tokens, store, by_id, config.tokens, clock=clock, reauth=reauth)
            await stack.enter_async_context(_running(refresher.run_forever))
            await stack.enter_async_context(_running(reconciler.run_forever))
            if isinstance(limiter, FallbackLimiter):
                await stack.enter_async_context(_running(limiter.watch))
        yield services


def _webhook_receiver(
    config: Config,
    tokens: TokenManager,
    store: TokenStore,
    reconciler: Reconciler,
    events: EventForwarder,
    clock: Callable[[], float],
) -> WebhookReceiver:
    webhooks = config.webhooks
    keys = WebhookKeys.from_pem(webhooks.ed25519_public_key, webhooks.rsa_public_key)
    return WebhookReceiver(config, keys, tokens, store, reconciler, events, clock=clock)


@asynccontextmanager
async def _running(loop: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """A background loop (keep-alive, the limiter's health check) as a task, cancelled on
    the way out."""
    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def choose_limiter(
    config: Config, client: RedisClient | None, scripts: ScriptClient | None = None
) -> Limiter:
    """Memory without Redis; with Redis, the shared limiter behind its fallback (its
    script run by `scripts`, the pipelined client, when given). Either way the state
    kept in process is capped at `limits.max_tracked_keys` keys."""
    max_keys = config.limits.max_tracked_keys
    if client is None:
        return MemoryLimiter(max_keys=max_keys)
    share = config.store.expected_replicas if config.store.on_redis_error == "local" else None
    shared = RedisLimiter(client, scripts=scripts, max_keys=max_keys)
    queue = config.queue
    max_queue_s = 0.0 if queue.mode == "reject" else queue.max_wait_ms / 1000
    return FallbackLimiter(shared, local_share=share, max_keys=max_keys, max_queue_s=max_queue_s)


def upstream_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """One pooled session for all upstream traffic.

    Bodies pass through untouched (no decompression, no added User-Agent, Accept or
    Content-Type), cookies are never kept, and the timeouts bound every phase except a
    long body that keeps flowing. The session never sends a request again by itself:
    every send takes a limiter slot, so any resend is the forwarder's decision.
    """
    # aiohttp resends an idempotent request (GET, PUT, DELETE...) once by itself when the
    # connection drops before the answer's headers (RFC 9112 9.3.1). Each resend is one
    # more request the upstream counts that no limiter slot paid for (30% drops sent 1.3
    # GETs per slot), and a request the upstream may already have run. aiohttp has no
    # public switch, only this attribute (its own test client turns it off the same way);
    # if an upgrade drops it, refuse to start rather than resend silently.
    if "_retry_connection" not in aiohttp.ClientSession.ATTRS:
        raise RuntimeError(
            f"aiohttp {aiohttp.__version__} has no ClientSession._retry_connection: the "
            "proxy cannot turn off its hidden resend of dropped requests; see "
            "proxy/services.py upstream_session"
        )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=upstream.timeout_s,
        sock_connect=upstream.connect_timeout_s,
        sock_read=upstream.timeout_s,
    )
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=upstream.max_connections),
        timeout=timeout,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )
    session._retry_connection = False
    return session
