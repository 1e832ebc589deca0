"""Shared fixtures: real redis-server, the simulator, and the proxy in-process or as processes.

Everything listens on port 0 or a unix socket in the test's temporary folder, so tests
can run side by side and never collide on a fixed port.
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from proxy.app import create_app
from proxy.config import Config, StoreConfig, parse_config
from proxy.harness.processes import ServiceProcess, proxy_process, write_config
from proxy.harness.redis_server import RedisServer
from proxy.redis_client import open_redis
from proxy.server import RunningServer, bind_socket, start_server
from proxy.simulator import SimulatorConfig
from proxy.simulator.testing import running_simulator
from proxy.tokens.redis import RedisTokenStore
from proxy.tokens.sqlite import SqliteTokenStore
from proxy.tokens.store import TokenStore

SIM_CLIENT_ID = "6650f1a2b3c4d5e6f7a8b9c0-simdemo01"
SIM_CLIENT_SECRET = "sim-secret"


def base_document(upstream_url: str) -> dict[str, Any]:
    """A minimal proxy config (as parsed YAML) that points at `upstream_url`."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"base_url": upstream_url, "timeout_s": 10, "connect_timeout_s": 2},
        "apps": [{"name": "main", "client_id": SIM_CLIENT_ID, "client_secret": SIM_CLIENT_SECRET}],
    }


def merged(document: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`document` with `overrides` merged in, section by section."""
    result = copy.deepcopy(document)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on a unix socket, stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to the proxy and the simulator."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
async def simulator() -> AsyncIterator[Any]:
    """The HoopAI simulator, in this process, on a free port."""
    async with running_simulator(SimulatorConfig()) as sim:
        yield sim


ProxyStarter = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[ProxyStarter]:
    """Start proxies in this process, each on a free port, the way `serve` starts them.
    Each gets its own SQLite token file unless the overrides name a store."""
    started: list[RunningServer] = []

    async def start(
        upstream_url: str, *, clock: Callable[[], float] = time.time, **overrides: Any
    ) -> RunningServer:
        overrides.setdefault("store", {"sqlite_path": str(tmp_path / f"tokens-{len(started)}.db")})
        config = proxy_config(upstream_url, **overrides)
        app = create_app(config, clock=clock)
        server = await start_server(
            app, bind_socket("127.0.0.1", 0), server=config.server, grace_s=5
        )
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


def proxy_config(upstream_url: str, **overrides: Any) -> Config:
    return parse_config(merged(base_document(upstream_url), overrides), {})


@pytest.fixture
def spawn_proxy(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start `hoopai-proxy serve` processes; each is stopped (SIGTERM) after the test."""
    started: list[ServiceProcess] = []

    def spawn(upstream_url: str, **overrides: Any) -> ServiceProcess:
        index = len(started)
        overrides.setdefault("store", {"sqlite_path": str(tmp_path / f"tokens-{index}.db")})
        config_path = write_config(
            tmp_path / f"proxy-{index}.yaml", merged(base_document(upstream_url), overrides)
        )
        process = proxy_process(config_path, tmp_path / f"proxy-{index}.log").start()
        started.append(process)
        return process

    yield spawn
    for process in started:
        process.stop()


# -- token stores: each test body runs on every backend -------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenStore]:
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        sqlite = await SqliteTokenStore.open(tmp_path / "tokens.db")
        yield sqlite
        await sqlite.close()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = open_redis(StoreConfig(redis_url=server.url))
    try:
        yield RedisTokenStore(client)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client made the way the proxy makes it, on a fresh redis-server."""
    client = open_redis(StoreConfig(redis_url=redis_server.url))
    assert isinstance(client, Redis)
    yield client
    await client.aclose()
