"""`hoopai-proxy demo`: the simulator, the proxy and some traffic, all on this machine.

It shows a newcomer what the proxy is for without any HoopAI account. A location is
installed in the simulator (a fake HoopAI API that enforces a small burst limit), then the
same burst of concurrent requests is sent twice: straight to the simulator, where most are
refused with 429, and through the proxy, which holds each request until its slot so every
one succeeds and the upstream refuses none.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.app import create_app
from proxy.config import parse_config
from proxy.server import bind_socket, start_server
from proxy.simulator import SimulatorConfig
from proxy.simulator.client import SimulatorClient
from proxy.simulator.testing import running_simulator

DEMO_LOCATION = "demoLocation0001"
BURST = 10
INTERVAL_MS = 2000


async def run_demo(requests: int = 30) -> int:
    """Run the demo and print what happened; returns the process exit code."""
    sim_config = SimulatorConfig(burst=BURST, interval_ms=INTERVAL_MS)
    with tempfile.TemporaryDirectory() as workdir:
        return await _run(sim_config, requests, Path(workdir))


async def _run(sim_config: SimulatorConfig, requests: int, workdir: Path) -> int:
    client_id, client_secret = next(iter(sim_config.apps.items()))
    async with running_simulator(sim_config) as simulator, aiohttp.ClientSession() as http:
        sim = SimulatorClient(simulator.url, http)
        tokens = await sim.install_and_exchange(client_id, client_secret, location_id=DEMO_LOCATION)
        token = tokens["access_token"]
        document = _demo_document(simulator.url, client_id, client_secret)
        document["store"] = {"sqlite_path": str(workdir / "tokens.db")}
        config = parse_config(document, {})
        proxy = await start_server(
            create_app(config), bind_socket("127.0.0.1", 0), server=config.server, access_log=False
        )
        try:
            _say(
                f"Simulated HoopAI API on {simulator.url}: {BURST} requests per "
                f"{INTERVAL_MS / 1000:g} s per location; proxy on {proxy.url}."
            )
            _say(f"Each run sends {requests} requests at once for one location.\n")
            direct = await _burst(http, simulator.url, token, requests)
            _report("Straight to the API", direct)
            await asyncio.sleep(INTERVAL_MS / 1000 + 0.2)  # let the window empty
            await sim.reset()
            through = await _burst(http, proxy.url, token, requests)
            _report("Through the proxy", through)
            stats = await sim.stats()
            _say(f"The API refused {stats['rate_limited']} of the requests the proxy sent.")
        finally:
            await proxy.stop()
    return 0


def _demo_document(upstream: str, client_id: str, client_secret: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "upstream": {"base_url": upstream},
        "apps": [{"name": "demo", "client_id": client_id, "client_secret": client_secret}],
        "limits": {"burst": {"requests": BURST, "interval_ms": INTERVAL_MS}},
    }


async def _burst(
    http: aiohttp.ClientSession, base_url: str, token: str, count: int
) -> list[tuple[int, float]]:
    """Send `count` requests at once; (status, seconds until the answer) for each."""
    # The caller's own location token: the proxy passes it through and limits by it.
    headers = {"Authorization": f"Bearer {token}", "Version": "2021-07-28"}

    async def one(index: int) -> tuple[int, float]:
        sent = time.monotonic()
        url = f"{base_url}/contacts/?locationId={DEMO_LOCATION}&page={index}"
        async with http.get(url, headers=headers) as response:
            await response.read()
            return response.status, time.monotonic() - sent

    return await asyncio.gather(*(one(i) for i in range(count)))


def _report(title: str, results: list[tuple[int, float]]) -> None:
    counts = collections.Counter(status for status, _ in results)
    slowest = max(seconds for _, seconds in results)
    summary = ", ".join(f"{n} x HTTP {status}" for status, n in sorted(counts.items()))
    _say(f"{title}: {summary}; the last answer came after {slowest:.1f} s")


def _say(line: str) -> None:
    print(line, flush=True)
