"""Take the dashboard's screenshot (docs/status.png) after real traffic.

    python -m tests.support.dashboard_screenshot docs/status.png [--seconds 280]

Starts the simulator and a proxy in this process (as the tests do), installs five
locations, sends traffic for `--seconds` (one location asks for more than its limit and
queues, one comes in bursts, one trickles, one passes its own token through), makes one
location's refresh token dead (another copy of the app used it, so a person must install
again), then has headless Chromium load /status with the admin token in the fragment and
save the picture. Not a test: it gates nothing and prints where the file went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.admin import create_admin_app
from proxy.app import create_app
from proxy.server import RunningServer, bind_socket, start_server
from proxy.services import SERVICES
from proxy.simulator import SimulatorConfig
from proxy.simulator.testing import RunningSimulator, running_simulator
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, proxy_config
from tests.support import dashboard_scene as scene
from tests.support.browser import screenshot

STEADY, BURSTY, TRICKLE, DEAD = "loc-orders", "loc-crm", "loc-calendar", "loc-legacy"
PASS_THROUGH = scene.PASS_THROUGH
SETTINGS = scene.PROXY_SETTINGS | {
    "limits": {
        "burst": {"requests": 10, "interval_ms": 2000, "pad_ms": 50},
        "daily": {"requests": 2000},
    },
    "queue": {"max_wait_ms": 30_000},
}
SIZE = (1280, 1000)


async def traffic(http: aiohttp.ClientSession, proxy_url: str, seconds: float) -> None:
    """Each location's callers, until `seconds` have passed."""
    end = time.monotonic() + seconds

    async def caller(location: str, pause_s: float, burst: int = 1) -> None:
        while time.monotonic() < end:
            await asyncio.gather(*(scene.send(http, proxy_url, location) for _ in range(burst)))
            await asyncio.sleep(pause_s)

    await asyncio.gather(
        *(caller(STEADY, 0.0) for _ in range(8)),  # asks for more than 5 a second: queues
        caller(BURSTY, 12.0, burst=14),
        caller(TRICKLE, 1.0),
        caller(PASS_THROUGH, 4.0),
    )


async def kill_refresh_token(
    http: aiohttp.ClientSession, sim: RunningSimulator, proxy: RunningServer
) -> None:
    """Another copy of the app uses DEAD's refresh token (it rotates: the proxy's copy
    dies); once its access token expires the proxy finds out and lists it."""
    services = proxy.runner.app[SERVICES]
    [record] = [r for r in await services.token_store.list() if r.id == DEAD]
    form = {
        "grant_type": "refresh_token",
        "refresh_token": record.refresh_token,
        "client_id": SIM_CLIENT_ID,
        "client_secret": SIM_CLIENT_SECRET,
        "user_type": "Location",
    }
    async with http.post(f"{sim.url}/oauth/token", data=form) as answer:
        assert answer.status == 200, await answer.text()
    sim.state.expire_tokens()
    status = await scene.send(http, proxy.url, DEAD)
    print(f"a request for {DEAD} after its refresh token died: HTTP {status}")


async def main(path: Path, seconds: float) -> None:
    async with (
        running_simulator(SimulatorConfig()) as sim,
        aiohttp.ClientSession() as http,
    ):
        with tempfile.TemporaryDirectory() as folder:
            config = proxy_config(sim.url, store={"sqlite_path": f"{folder}/tokens.db"}, **SETTINGS)
            app = create_app(config)
            proxy = await start_server(app, bind_socket("127.0.0.1", 0), server=config.server)
            admin = await start_server(
                create_admin_app(app), bind_socket("127.0.0.1", 0), access_log=False
            )
            try:
                for location in (STEADY, BURSTY, TRICKLE, DEAD):
                    await scene.install(http, sim.state, proxy.url, location)
                await scene.send(http, proxy.url, DEAD)
                await kill_refresh_token(http, sim, proxy)
                running = asyncio.create_task(traffic(http, proxy.url, seconds))
                await asyncio.sleep(seconds - 2)  # the queue is still full when taken
                url = f"{admin.url}/status#token={scene.ADMIN_TOKEN}"
                await screenshot(url, path, budget_ms=3000, size=SIZE)
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
                print(f"upstream 429s: {sim.state.stats()['rate_limited']}")
            finally:
                await admin.stop()
                await proxy.stop()
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    # Most of the chart's five minutes, so it shows traffic rather than the proxy's start.
    parser.add_argument("--seconds", type=float, default=280.0)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.path.resolve(), arguments.seconds))
    sys.exit(0)
