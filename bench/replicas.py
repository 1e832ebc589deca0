"""Fresh Redis, simulator and proxy replicas for one benchmark run, stopped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from proxy.harness.load import Scenario
from proxy.harness.processes import ServiceProcess, proxy_process, write_config
from proxy.harness.redis_server import RedisServer
from proxy.harness.tokens import SIM_CLIENT_ID
from proxy.simulator import SimulatorConfig
from proxy.simulator.testing import RunningSimulator, running_simulator


def proxy_document(upstream: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A replica's config: loopback, port 0, the simulator's app, and the scenario's
    store, limits and queue sections."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"base_url": upstream},
        # The callers' tokens are the simulator's, for this app: the proxy limits only
        # tokens of apps it is configured for.
        "apps": [{"name": "bench", "client_id": SIM_CLIENT_ID, "client_secret": "s"}],
        **overrides,
    }


@asynccontextmanager
async def running_replicas(
    workdir: Path, scenario: Scenario, *, seed: int = 0
) -> AsyncIterator[tuple[RunningSimulator, list[ServiceProcess], RedisServer]]:
    """The simulator (seeded), `scenario.replicas` proxies and their Redis, all fresh."""
    redis = RedisServer(workdir / "redis").start()
    proxies: list[ServiceProcess] = []
    try:
        async with running_simulator(SimulatorConfig(seed=seed)) as sim:
            document = proxy_document(sim.url, scenario.proxy_overrides(redis.url))
            for index in range(scenario.replicas):
                config = write_config(workdir / f"replica-{index}.yaml", document)
                proxies.append(proxy_process(config, workdir / f"replica-{index}.log").start())
            yield sim, proxies, redis
    finally:
        for process in proxies:
            process.stop()
        redis.stop()
