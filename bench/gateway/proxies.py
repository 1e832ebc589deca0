"""The proxies under test: their configs, their token stores seeded with the 2,000
Locations' installs, and starting them.

A gateway's config with the defaults (the real limits, the queue, upstream sync, access
log, metrics and status all on), one caller key, tokens sealed at rest, and
`upstream.base_url` the nginx upstream over plain http on loopback. One proxy per limiter
backend and worker count; each serves both request shapes (pass-through and managed).
The stores are seeded through the proxy's own store API (`open_token_store` and
`TokenStore.replace`, as an install writes them) before the proxies start.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.fernet import Fernet

from bench.gateway.workload import Workload
from proxy.config import StoreConfig, load_config
from proxy.harness.processes import ServiceProcess, proxy_process, write_config
from proxy.harness.tokens import SIM_CLIENT_ID
from proxy.redis_client import connect_redis
from proxy.tokens.store import TokenRecord
from proxy.tokens.stores import open_token_store

Limiter = Literal["memory", "redis", "cluster"]
LIMITER_NAMES: dict[Limiter, str] = {
    "memory": "memory",
    "redis": "Redis",
    "cluster": "Redis Cluster",
}
TOKEN_LIFETIME_S = 86_399  # HighLevel's access tokens last a day
SEED_BATCH = 100  # installs written at once


@dataclass(frozen=True)
class ProxySpec:
    """One proxy under test: its limiter backend and `server.workers`."""

    limiter: Limiter
    workers: int = 1

    @property
    def name(self) -> str:
        return f"{self.limiter}-{self.workers}w"

    @property
    def label(self) -> str:
        workers = "1 worker" if self.workers == 1 else f"{self.workers} workers"
        return f"{LIMITER_NAMES[self.limiter]}, {workers}"


# Workers need Redis (separate memory limiters would each allow the full limits).
SPECS = (
    ProxySpec("memory"),
    ProxySpec("redis"),
    ProxySpec("redis", 2),
    ProxySpec("cluster"),
    ProxySpec("cluster", 2),
)


@dataclass(frozen=True)
class ProxySettings:
    """What every proxy of one run shares."""

    workdir: Path
    upstream_url: str
    workload: Workload
    redis_url: str
    cluster_url: str
    # Tokens sealed at rest, as a gateway should keep them (read once per Location).
    encryption_key: str = field(
        default_factory=lambda: Fernet.generate_key().decode(), repr=False
    )


def store_section(spec: ProxySpec, settings: ProxySettings) -> dict[str, Any]:
    section: dict[str, Any] = {
        "sqlite_path": str(settings.workdir / f"tokens-{spec.name}.db"),
        "encryption_key": settings.encryption_key,
    }
    if spec.limiter == "redis":
        section["redis_url"] = settings.redis_url
    elif spec.limiter == "cluster":
        section |= {"redis_url": settings.cluster_url, "redis_cluster": True}
    return section


def document(spec: ProxySpec, settings: ProxySettings) -> dict[str, Any]:
    """The proxy's config: every key not named here keeps its default."""
    return {
        "server": {"host": "127.0.0.1", "port": 0, "workers": spec.workers},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"base_url": settings.upstream_url},
        # The workload's tokens belong to this app: pass-through tokens of another app
        # would be refused.
        "apps": [{"name": "main", "client_id": SIM_CLIENT_ID, "client_secret": "bench-secret"}],
        "store": store_section(spec, settings),
        "callers": [
            {
                "name": "bench",
                "key_sha256": settings.workload.caller_key_sha256,
                "allow": ["location:*"],
            }
        ],
    }


def config_path(spec: ProxySpec, settings: ProxySettings) -> Path:
    return write_config(settings.workdir / f"proxy-{spec.name}.yaml", document(spec, settings))


def new_proxy(spec: ProxySpec, settings: ProxySettings) -> ServiceProcess:
    """The proxy process for `spec`, not started yet."""
    log = settings.workdir / f"proxy-{spec.name}.log"
    return proxy_process(config_path(spec, settings), log)


def seed_tokens(spec: ProxySpec, settings: ProxySettings) -> None:
    """Install every Location in the store `spec`'s proxy reads (before it starts)."""
    store = load_config(config_path(spec, settings), {}).store
    asyncio.run(_seed(store, settings.workload))


async def _seed(config: StoreConfig, workload: Workload) -> None:
    client = await connect_redis(config) if config.redis_url else None
    store = await open_token_store(config, client, warn_clear=False)
    now = time.time()
    records = [installed(location, workload, now) for location in workload.locations]
    try:
        for start in range(0, len(records), SEED_BATCH):
            batch = records[start : start + SEED_BATCH]
            await asyncio.gather(*(store.replace(record) for record in batch))
    finally:
        await store.close()
        if client is not None:
            await client.aclose()


def installed(location: str, workload: Workload, now: float) -> TokenRecord:
    """The record a fresh Location install leaves (as the OAuth callback stores it)."""
    return TokenRecord(
        app=SIM_CLIENT_ID.split("-", 1)[0],
        kind="location",
        id=location,
        access_token=workload.token(location),
        refresh_token=f"bench-refresh-{location}",
        expires_at=now + TOKEN_LIFETIME_S,
        refreshed_at=now,
        user_type="Location",
        location_id=location,
    )
