"""A faithful fake of the HoopAI (HighLevel) API, for tests, demos and benchmarks.

Modules, one concern each:
    config    SimulatorConfig: apps, limits, token lifetimes
    jwt       JWT-shaped strings and random ids
    tokens    installs, codes, access and refresh tokens, rotation
    limits    burst (sliding | fixed) and daily windows per resource
    faults    fault settings and the seeded dice
    stats     counters, global and per resource
    transits  each API request's arrival, drawn delay and count time
    state     Simulator: the state and its operations; the SIMULATOR app key
    wire      JSON error answers and JSON bodies in
    echo      the streamed echo answer
    api       the generic API endpoint
    oauth     /oauth/token, /oauth/locationToken, /oauth/installedLocations
    probes    unauthenticated /_sim/ helpers (echo, download, slow, headers)
    control   /_sim/ control endpoints
    server    create_simulator_app
    serving   binding and serving on a socket
    testing   running_simulator for tests
    client    SimulatorClient, async helpers over HTTP
    cli       the ``simulate`` command
"""

from __future__ import annotations

from proxy.simulator.config import SimulatorConfig
from proxy.simulator.server import create_simulator_app
from proxy.simulator.state import SIMULATOR, Simulator

__all__ = ["SIMULATOR", "Simulator", "SimulatorConfig", "create_simulator_app"]
