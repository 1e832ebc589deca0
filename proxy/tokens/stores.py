"""Choosing the token store from the config: Redis when `store.redis_url` is set, else the
SQLite file at `store.sqlite_path`. Used by the proxy and by `hoopai-proxy tokens`."""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster

from proxy.config import StoreConfig
from proxy.tokens.redis import RedisTokenStore
from proxy.tokens.sqlite import SqliteTokenStore
from proxy.tokens.store import TokenStore


async def open_token_store(store: StoreConfig, client: Redis | RedisCluster | None) -> TokenStore:
    """The configured store; `client` is the Redis client when `store.redis_url` is set."""
    if client is not None:
        return RedisTokenStore(client)
    return await SqliteTokenStore.open(store.sqlite_path)
