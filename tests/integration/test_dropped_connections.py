"""Dropped upstream connections, over real HTTP: every send to the upstream takes a limiter
slot, so nothing is resent behind the limiter's back (aiohttp's client would resend an
idempotent request once by itself), and a dropped connection is the caller's 502."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp
import pytest

from proxy.server import RunningServer
from proxy.services import SERVICES, upstream_session
from tests.conftest import SIM_CLIENT_ID, proxy_config

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "dropLoc01"
METHODS = ("GET", "PUT", "DELETE", "POST")
PER_METHOD = 60
# Far above the test's traffic, in the proxy and in the simulator: no request waits and
# no upstream 429 adds a resend of the proxy's own.
LIMITS = {"limits": {"burst": {"requests": 10_000, "interval_ms": 10_000}}}


def slots_taken(proxy: RunningServer) -> int:
    """Slots the proxy's limiter gave (sent, queued or shadow), refusals left out."""
    registry = proxy.runner.app[SERVICES].metrics.registry
    return sum(
        int(sample.value)
        for family in registry.collect()
        if family.name == "hoopai_proxy_limiter_decisions"
        for sample in family.samples
        if sample.name.endswith("_total") and not sample.labels["outcome"].startswith("refused")
    )


async def send(
    http: aiohttp.ClientSession, url: str, token: str, method: str, index: int
) -> tuple[str, int, Any]:
    """One request through the proxy with the caller's own token: (method, status, json)."""
    body = json.dumps({"n": index}).encode() if method in ("PUT", "POST") else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with http.request(
        method, f"{url}/contacts/{method.lower()}-{index}", data=body, headers=headers
    ) as response:
        return method, response.status, json.loads(await response.read())


@pytest.mark.slow
async def test_every_send_upstream_takes_a_slot_and_a_drop_is_502(
    simulator, start_proxy, http
) -> None:
    """With 30% of upstream connections dropped after the whole request was read, the
    simulator sees exactly as many requests as the limiter gave slots, for every method
    (GET, PUT and DELETE included, which aiohttp would resend by itself); every dropped
    request is the caller's 502 `upstream_unreachable` and every other one a 200."""
    simulator.state.set_limits({"burst": 10_000, "interval_ms": 10_000})
    token = str(simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"])
    proxy = await start_proxy(simulator.url, **LIMITS)
    simulator.state.set_faults({"drop_ratio": 0.3})

    results = await asyncio.gather(
        *(
            send(http, proxy.url, token, method, index)
            for index in range(PER_METHOD)
            for method in METHODS
        )
    )

    stats = simulator.state.stats()
    arrived, dropped = stats["requests_by_method"], stats["dropped_by_method"]
    slots = slots_taken(proxy)
    answered = Counter((method, status) for method, status, _ in results)
    print(
        f"\nslots {slots}, arrivals {stats['requests']}, per method: "
        + ", ".join(
            f"{m} {arrived.get(m, 0)} arrived / {PER_METHOD} slots, "
            f"{dropped.get(m, 0)} dropped, {answered[m, 502]} x 502"
            for m in METHODS
        )
    )
    assert stats["dropped"] > 0  # the fault did drop connections
    assert stats["requests"] == slots == len(METHODS) * PER_METHOD
    for method in METHODS:
        assert arrived.get(method, 0) == PER_METHOD, method
        assert answered[method, 502] == dropped.get(method, 0), method
        assert answered[method, 200] == PER_METHOD - dropped.get(method, 0), method
    for _, status, body in results:
        if status == 502:
            assert body == {
                "statusCode": 502,
                "message": body["message"],
                "error": "upstream_unreachable",
            }


async def test_upstream_session_never_resends_by_itself(simulator) -> None:
    """The upstream session's own resend of a dropped idempotent request is off: one GET
    to an upstream that drops every connection arrives once and fails."""
    session = upstream_session(proxy_config(simulator.url).upstream)
    async with session:
        simulator.state.set_faults({"drop_ratio": 1.0})
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.get(f"{simulator.url}/contacts/"):
                pass
    assert simulator.state.stats()["requests_by_method"] == {"GET": 1}
