"""Reauthorization alerts, driven by a real invalid_grant from the simulator (its refresh
tokens rotate: one spent behind the proxy's back is dead): the needs_reauth gauge, the
/status.json list with the install URL, one WARNING event, and one signed POST to a real
receiver, retried while it fails, sent once however many requests and replicas see it."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from proxy.admin import create_admin_app
from proxy.server import RunningServer, bind_socket, start_server
from proxy.services import SERVICES, Services
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.leaks import leaked
from tests.support.receivers import Receiver, running_receiver

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "reauthLoc01"
RESOURCE = f"{APP_ID}:location:{LOCATION}"
SECRET = "alert-signing-secret"
INSTALL_URL = "http://localhost:8080/_proxy/oauth/start?app=main"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real server standing for the operator's alert endpoint."""
    async with running_receiver("/hooks/reauth") as taker:
        yield taker


@pytest.fixture(autouse=True)
def no_token_in_logs(caplog: pytest.LogCaptureFixture, simulator) -> Iterator[None]:
    """Every test here: no token the simulator issued appears in any log record."""
    caplog.set_level(logging.DEBUG)
    yield
    assert leaked([caplog.text], simulator.state.tokens.issued()) == []


def alerting(receiver: Receiver, **more: Any) -> dict[str, Any]:
    return {"alerts": {"webhook_url": receiver.url, "secret": SECRET, **more}}


def services(proxy: RunningServer) -> Services:
    return proxy.runner.app[SERVICES]


async def install(http: aiohttp.ClientSession, proxy: RunningServer, simulator) -> None:
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)


async def kill_refresh_token(proxy: RunningServer, simulator) -> None:
    """Spend the stored refresh token behind the proxy's back (its copy is now dead) and
    expire the access token, so the next use needs a refresh that gets invalid_grant."""
    stored = await services(proxy).token_store.get(APP_ID, "location", LOCATION)
    assert stored is not None
    simulator.state.tokens.rotate(
        stored.refresh_token, SIM_CLIENT_ID, simulator.state.now(), 86399, 10**9
    )
    simulator.state.expire_tokens(RESOURCE)


async def managed(http: aiohttp.ClientSession, proxy: RunningServer) -> tuple[int, Any]:
    headers = {"X-HoopAI-Location-Id": LOCATION}
    async with http.get(f"{proxy.url}/contacts/", headers=headers) as answer:
        return answer.status, await answer.json()


async def until(condition: Callable[[], bool]) -> None:
    """Return once `condition()` holds (the test's timeout bounds the wait)."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


def settled(replica: Services) -> int:
    """Alerts the replica is done with: delivered, or given up."""
    return replica.alerts.delivered + replica.alerts.failed


def dead_for_main(replica: Services) -> float | None:
    """The replica's needs_reauth gauge for app main, read from its registry."""
    return replica.metrics.registry.get_sample_value("hoopai_proxy_needs_reauth", {"app": "main"})


def gauge(text: str, app: str = "main") -> float | None:
    found = re.search(rf'^hoopai_proxy_needs_reauth{{app="{app}"}} ([0-9.e+-]+)$', text, re.M)
    return float(found.group(1)) if found else None


def check_signed(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """The alert's JSON, after checking its HMAC-SHA256 signature and timestamp header."""
    signed = headers["X-HoopAI-Timestamp"].encode() + b"." + body
    expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-HoopAI-Signature"], expected)
    event: dict[str, Any] = json.loads(body)
    assert headers["X-HoopAI-Timestamp"] == str(event["time"])
    assert headers["Content-Type"] == "application/json"
    return event


async def test_a_dead_refresh_token_is_reported_once_everywhere(
    simulator, start_proxy, http, receiver, caplog
) -> None:
    """invalid_grant on a request: the gauge reads 1 for the app, /status.json lists the
    resource with its install URL, one WARNING event names app, kind and id, and the
    receiver gets exactly one POST whose HMAC verifies, though a second request fails too
    and a keep-alive pass reads the dead record again. A reinstall clears gauge and list."""
    proxy = await start_proxy(simulator.url, **alerting(receiver))
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )
    try:
        await install(http, proxy, simulator)
        async with http.get(f"{admin.url}/metrics") as answer:
            assert gauge(await answer.text()) == 0  # every configured app, from the start
        await kill_refresh_token(proxy, simulator)
        status, body = await managed(http, proxy)
        assert (status, body["error"]) == (401, "reauthorization_required")
        assert (await managed(http, proxy))[0] == 401  # no second refresh, no second alert
        await until(lambda: settled(services(proxy)) == 1)
        async with http.get(f"{admin.url}/metrics") as answer:
            metrics_text = await answer.text()
        async with http.get(f"{admin.url}/status.json") as answer:
            listed = (await answer.json())["needs_reauth"]
        keepalive_pass = services(proxy)
        began = keepalive_pass.reauth.scan_began()
        keepalive_pass.reauth.observe(await keepalive_pass.token_store.list(), began)
        alerts = keepalive_pass.alerts
        assert (alerts.accepted, alerts.delivered) == (1, 1)
        await install(http, proxy, simulator)  # a human installs again
        async with http.get(f"{admin.url}/metrics") as answer:
            healed_text = await answer.text()
        async with http.get(f"{admin.url}/status.json") as answer:
            healed_list = (await answer.json())["needs_reauth"]
    finally:
        await admin.stop()
    assert gauge(metrics_text) == 1
    [entry] = listed
    since = entry.pop("since")
    assert isinstance(since, float) and since > 0
    assert entry == {
        "app": "main",
        "app_id": APP_ID,
        "kind": "location",
        "id": LOCATION,
        "install_url": INSTALL_URL,
    }
    [(headers, raw, _)] = receiver.received
    event = check_signed(headers, raw)
    assert event == {
        "event": "needs_reauth",
        "app": "main",
        "app_id": APP_ID,
        "kind": "location",
        "id": LOCATION,
        "install_url": INSTALL_URL,
        "time": event["time"],
    }
    events = [vars(r) for r in caplog.records if getattr(r, "event", None) == "needs_reauth"]
    seen = [(e["levelname"], e["app"], e["kind"], e["id"]) for e in events]
    assert seen == [("WARNING", "main", "location", LOCATION)]
    assert (gauge(healed_text), healed_list) == (0, [])
    assert simulator.state.stats()["dead_refresh_token_uses"] == 1
    shown = [metrics_text, json.dumps(listed), raw.decode()]
    assert leaked(shown, simulator.state.tokens.issued()) == []


@pytest.mark.slow
async def test_an_alert_is_retried_until_the_receiver_takes_it(
    simulator, start_proxy, http, receiver
) -> None:
    """A receiver that answers 503 twice, then 200, gets 3 identical signed POSTs and no
    more; the admin refresh that met invalid_grant answers 409."""
    receiver.statuses = [503, 503]
    proxy = await start_proxy(simulator.url, **alerting(receiver, attempts=5))
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), access_log=False
    )
    try:
        await install(http, proxy, simulator)
        await kill_refresh_token(proxy, simulator)
        url = f"{admin.url}/tokens/main/location/{LOCATION}/refresh"
        async with http.post(url) as answer:
            assert answer.status == 409
            assert (await answer.json())["error"] == "reauthorization_required"
        await until(lambda: settled(services(proxy)) == 1)
    finally:
        await admin.stop()
    assert len(receiver.received) == 3
    assert len({raw for _, raw, _ in receiver.received}) == 1
    for headers, raw, _ in receiver.received:
        assert check_signed(headers, raw)["id"] == LOCATION
    assert (services(proxy).alerts.accepted, services(proxy).alerts.failed) == (1, 0)


@pytest.mark.slow
async def test_two_replicas_send_one_alert_and_both_gauges_follow_the_store(
    simulator, start_proxy, http, receiver, redis_server
) -> None:
    """Two replicas on one Redis store both meet the dead token at once: one refresh
    reaches the upstream, one alert is sent in all; the replica that did not mark it
    learns of it from its keep-alive pass (its gauge reads 1 too), and with since null."""
    shared = {
        "store": {"redis_url": redis_server.url},
        "tokens": {"keepalive_interval_s": 0.1},
        **alerting(receiver),
    }
    first = await start_proxy(simulator.url, **shared)
    second = await start_proxy(simulator.url, **shared)
    await install(http, first, simulator)
    await managed(http, second)  # both hold the live token in their caches
    await kill_refresh_token(first, simulator)
    statuses = await asyncio.gather(*(managed(http, p) for p in (first, second, first, second)))
    assert [status for status, _ in statuses] == [401] * 4
    both = (services(first), services(second))
    await until(lambda: sum(settled(s) for s in both) >= 1)
    # Each sees the dead record, by its own mark or through its keep-alive pass.
    await until(lambda: [dead_for_main(replica) for replica in both] == [1, 1])
    assert [sum(s.alerts.accepted for s in both), sum(s.alerts.delivered for s in both)] == [1, 1]
    assert len(receiver.received) == 1
    sinces = sorted((s.reauth.listing()[0]["since"] is None) for s in both)
    assert sinces == [False, True]  # the marking replica knows when; the other does not
    assert simulator.state.stats()["dead_refresh_token_uses"] == 1
