"""Callers who hang up while queued give their slots back, over real HTTP, on both limiters.

The issue this pins: 40 of 60 queued callers left, their slots stayed spent, and the 20
who stayed (and a newcomer) waited behind requests that were never sent. Now those behind
move up, the last places go back to the limiter, and nothing more is sent than asked for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from proxy.server import RunningServer
from proxy.services import SERVICES
from tests.conftest import SIM_CLIENT_ID
from tests.integration.test_limits_proxy import call, decisions, until_decided

LOCATION = "leavingLoc01"
RESOURCE = f"{SIM_CLIENT_ID.split('-', 1)[0]}:location:{LOCATION}"
N, W_MS = 10, 3000  # a window long enough that every leaver is still held when it leaves
QUEUED, LEAVING = 60, 40


def given_back(proxy: RunningServer) -> int:
    registry = proxy.runner.app[SERVICES].metrics.registry
    return int(registry.get_sample_value("hoopai_proxy_slots_given_back_total") or 0)


async def queue_in_order(
    http: aiohttp.ClientSession, proxy: RunningServer, token: str, count: int, first: int
) -> list[asyncio.Task[tuple[int, dict[str, str], Any]]]:
    """`count` requests, each decided before the next is sent, so their order is definite."""
    tasks = []
    for index in range(first, first + count):
        task = asyncio.create_task(call(http, proxy.url, token, index))
        await until_decided(proxy, index + 1, task)
        tasks.append(task)
    return tasks


async def until_given_back(proxy: RunningServer, count: int) -> None:
    """Return once the proxy has seen `count` callers leave (it learns of each hang-up on
    its own loop) and given their places back."""
    while True:
        if given_back(proxy) >= count:
            return
        await asyncio.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_callers_who_leave_the_queue_give_their_places_to_those_behind(
    backend, simulator, start_proxy, http, request
) -> None:
    """60 queued behind a full window; the first 40 hang up. The 20 who stayed move up to
    the places of those who left, so a newcomer allowed to wait 5 windows is admitted: with
    the abandoned slots still spent it would have been 7 windows out, and refused."""
    # Only the proxy's limit applies, so the counts below are the proxy's doing alone.
    simulator.state.set_limits({"burst": 100_000})
    token = str(simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"])
    overrides: dict[str, Any] = {
        "limits": {"burst": {"requests": N, "interval_ms": W_MS, "pad_ms": 50}},
        "queue": {"mode": "queue", "max_wait_ms": 30_000},
    }
    if backend == "redis":
        overrides["store"] = {"redis_url": request.getfixturevalue("redis_server").url}
    proxy = await start_proxy(simulator.url, **overrides)
    first = await queue_in_order(http, proxy, token, N, 0)
    queued = await queue_in_order(http, proxy, token, QUEUED, N)
    assert decisions(proxy) == {"sent": N, "queued": QUEUED}

    for task in queued[:LEAVING]:
        task.cancel()
    await asyncio.gather(*queued[:LEAVING], return_exceptions=True)
    await until_given_back(proxy, LEAVING)

    # The stayers now hold windows 1 and 2; the newcomer's slot is window 3, well inside
    # its 5 windows. Had the 40 places stayed spent it would be window 7: refused.
    newcomer = await call(http, proxy.url, token, 999, **{"X-HoopAI-Max-Wait-Ms": str(5 * W_MS)})
    assert newcomer[0] == 200, newcomer[2]
    answers = await asyncio.gather(*first, *queued[LEAVING:])
    assert [status for status, _, _ in answers] == [200] * (N + QUEUED - LEAVING)
    sent = simulator.state.stats()["per_resource"][RESOURCE]["requests"]
    assert sent == N + (QUEUED - LEAVING) + 1
