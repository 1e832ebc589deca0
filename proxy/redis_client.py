"""The Redis connection the shared parts use: one client per app, with bounded timeouts.

A dead or unreachable Redis must never hang a request: every socket operation is bounded
(half a second), and one quick retry covers a connection that dropped between uses.
Whoever gets a `RedisError` from it translates it at their own boundary.
"""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from proxy.config import StoreConfig

SOCKET_TIMEOUT_S = 0.5


def open_redis(store: StoreConfig) -> Redis | RedisCluster:
    """A client for `store.redis_url` (a cluster client when `store.redis_cluster`)."""
    options = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    }
    if store.redis_cluster:
        return RedisCluster.from_url(store.redis_url, **options)
    return Redis.from_url(store.redis_url, **options)  # type: ignore[arg-type]


async def connect_redis(store: StoreConfig) -> Redis | RedisCluster:
    """`open_redis`, and for a cluster the slot map learnt before first use."""
    client = open_redis(store)
    if isinstance(client, RedisCluster):
        # An async cluster client must learn the slots before concurrent first commands
        # (redis-py #3032); a dead cluster here is a startup failure worth seeing.
        await client.initialize()
    return client
