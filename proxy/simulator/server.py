"""``create_simulator_app``: the aiohttp application, its state and its routes."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from proxy.simulator import api, control, oauth, probes
from proxy.simulator.config import SimulatorConfig
from proxy.simulator.state import SIMULATOR, Simulator


def create_simulator_app(
    config: SimulatorConfig | None = None, *, clock: Callable[[], float] = time.time
) -> web.Application:
    """A fresh simulator; its state is ``app[SIMULATOR]``."""
    app = web.Application()
    app[SIMULATOR] = Simulator(config, clock=clock)
    app.router.add_routes(oauth.routes())
    app.router.add_routes(control.routes())
    app.router.add_routes(probes.routes())
    # Last: the generic endpoint answers every path the routes above do not.
    app.router.add_routes(api.routes())
    return app
