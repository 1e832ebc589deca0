"""``running_simulator``: a real simulator on 127.0.0.1, a free port, for one test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from proxy.simulator.config import SimulatorConfig
from proxy.simulator.server import create_simulator_app
from proxy.simulator.serving import serve_simulator
from proxy.simulator.state import SIMULATOR, Simulator


@dataclass(frozen=True)
class RunningSimulator:
    """A served simulator: its base URL, port, state and app."""

    url: str
    port: int
    state: Simulator
    app: web.Application


@asynccontextmanager
async def running_simulator(
    config: SimulatorConfig | None = None,
    *,
    clock: Callable[[], float] = time.time,
    host: str = "127.0.0.1",
) -> AsyncIterator[RunningSimulator]:
    """Serve a fresh simulator on ``host``, port 0, until the block ends."""
    app = create_simulator_app(config, clock=clock)
    server = await serve_simulator(app, host, 0, shutdown_timeout=0.5, access_log=False)
    try:
        yield RunningSimulator(url=server.url, port=server.port, state=app[SIMULATOR], app=app)
    finally:
        await server.stop()
