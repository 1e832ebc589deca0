"""Bursts of API calls for one location, straight to the simulator or through proxies,
and what the two sides counted of them (the simulator's stats, the proxy's decisions and
its `/status.json`)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp

from proxy.admin import create_admin_app
from proxy.server import RunningServer, bind_socket, start_server
from proxy.services import SERVICES
from tests.conftest import SIM_CLIENT_ID

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
API_PATH = "/contacts/"


def install(simulator: Any, location: str) -> tuple[str, str]:
    """Install the app for `location`: (its access token, the simulator's resource key)."""
    grant = simulator.state.grant(SIM_CLIENT_ID, location_id=location)
    return str(grant["access_token"]), f"{APP_ID}:location:{location}"


async def send(http: aiohttp.ClientSession, base_url: str, token: str) -> tuple[int, str]:
    """One GET with the location's own token: (status, the JSON `error` code or "")."""
    headers = {"Authorization": f"Bearer {token}", "Version": "2021-07-28"}
    async with http.get(base_url + API_PATH, headers=headers) as answer:
        body = await answer.read()
    error = ""
    if answer.status != 200:
        try:
            error = str(json.loads(body).get("error", ""))
        except (ValueError, AttributeError):
            error = body[:40].decode(errors="replace")
    return answer.status, error


async def one_by_one(
    http: aiohttp.ClientSession, base_url: str, token: str, count: int
) -> list[int]:
    """`count` calls one after another (each sent once the last is answered): statuses."""
    return [(await send(http, base_url, token))[0] for _ in range(count)]


async def at_once(
    http: aiohttp.ClientSession, urls: list[str], token: str, per_url: int
) -> Counter[tuple[int, str]]:
    """`per_url` concurrent calls through each of `urls`, all together: how many ended
    with each (status, error)."""
    results = await asyncio.gather(
        *(send(http, url, token) for url in urls for _ in range(per_url))
    )
    return Counter(results)


def upstream_429s(simulator: Any, resource: str) -> int:
    """How many requests for `resource` the simulator has refused with 429 so far."""
    per_resource = simulator.state.stats()["per_resource"]
    return int(per_resource[resource]["rate_limited"]) if resource in per_resource else 0


def admitted(simulator: Any, resource: str) -> int:
    """How many requests for `resource` the simulator has admitted so far."""
    per_resource = simulator.state.stats()["per_resource"]
    return int(per_resource[resource]["admitted"]) if resource in per_resource else 0


def decisions(proxy: RunningServer) -> dict[str, int]:
    """The proxy's limiter decisions so far, by outcome (sent, queued, refused_burst...)."""
    registry = proxy.runner.app[SERVICES].metrics.registry
    return {
        sample.labels["outcome"]: int(sample.value)
        for family in registry.collect()
        if family.name == "hoopai_proxy_limiter_decisions"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.value
    }


async def status_json(http: aiohttp.ClientSession, proxy: RunningServer) -> dict[str, Any]:
    """The proxy's `/status.json`, read over HTTP from its admin listener."""
    status, _ = await read_status(http, proxy)
    return status


async def read_status(
    http: aiohttp.ClientSession, proxy: RunningServer
) -> tuple[dict[str, Any], str]:
    """The proxy's `/status.json` and `/status` page, read over HTTP from its admin
    listener (started for the call, on a free port)."""
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )
    try:
        async with http.get(f"{admin.url}/status.json") as answer:
            assert answer.status == 200
            status: dict[str, Any] = await answer.json()
        async with http.get(f"{admin.url}/status") as answer:
            assert answer.status == 200
            page = await answer.text()
    finally:
        await admin.stop()
    return status, page


def resource_row(status: dict[str, Any], location: str) -> dict[str, Any]:
    """The `/status.json` row of `location`."""
    rows: list[dict[str, Any]] = status["resources"]
    [row] = [r for r in rows if (r["kind"], r["id"]) == ("location", location)]
    return row
