"""The Redis connection the shared parts use: one client per app, with bounded timeouts.

A dead or unreachable Redis must never hang a request: every socket operation is bounded
(half a second), and one quick retry covers a connection that dropped between uses.
Whoever gets a `RedisError` from it translates it at their own boundary.

A burst of concurrent requests must not look like an outage either: the standalone
client's pool waits (up to the same half second) for a free connection instead of
failing at once when all `MAX_CONNECTIONS` are busy, as redis-py's default pool of 100
does; a failure there would send the limiter to its pessimistic fallback for nothing.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from proxy.config import StoreConfig

SOCKET_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 256


def open_redis(store: StoreConfig) -> Redis | RedisCluster:
    """A client for `store.redis_url` (a cluster client when `store.redis_cluster`)."""
    options = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    }
    if store.redis_cluster:
        return RedisCluster.from_url(store.redis_url, **options)
    pool = BlockingConnectionPool.from_url(
        store.redis_url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT_S, **options
    )
    client = Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as Redis.from_url does: closed with the client
    return client


async def connect_redis(store: StoreConfig) -> Redis | RedisCluster:
    """`open_redis`, and for a cluster the slot map learnt before first use."""
    client = open_redis(store)
    if isinstance(client, RedisCluster):
        # An async cluster client must learn the slots before concurrent first commands
        # (redis-py #3032); a dead cluster here is a startup failure worth seeing.
        await client.initialize()
    return client
