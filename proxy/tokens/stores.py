"""Choosing the token store from the config: Redis when `store.redis_url` is set, else the
SQLite file at `store.sqlite_path`, either sealing its tokens with `store.encryption_key`.
Used by the proxy and by `hoopai-proxy tokens`."""

from __future__ import annotations

import logging

from redis.asyncio import Redis, RedisCluster

from proxy.config import StoreConfig
from proxy.tokens.redis import RedisTokenStore
from proxy.tokens.sealing import Sealer
from proxy.tokens.sqlite import SqliteTokenStore

logger = logging.getLogger(__name__)


async def open_token_store(
    store: StoreConfig, client: Redis | RedisCluster | None, *, warn_clear: bool = True
) -> SqliteTokenStore | RedisTokenStore:
    """The configured store; `client` is the Redis client when `store.redis_url` is set.

    A malformed `store.encryption_key` is a ConfigError, raised before anything opens.
    Without a key the store keeps tokens in clear, and says so once here (unless
    `warn_clear` is False: the `tokens` commands, which the operator runs by hand).
    """
    sealer = Sealer.from_config(store.encryption_key)
    opened: SqliteTokenStore | RedisTokenStore
    if client is not None:
        opened = RedisTokenStore(client, sealer=sealer)
    else:
        opened = await SqliteTokenStore.open(store.sqlite_path, sealer=sealer)
    if warn_clear and not sealer.enabled:
        logger.warning(
            "store.encryption_key is not set: access and refresh tokens are stored in clear"
        )
    return opened
