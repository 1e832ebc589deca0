"""Resends after the upstream's `401 Command timed out`, against the simulator over real
HTTP: the request may have run upstream, so only what is safe to repeat is sent again
(an idempotent method, a request with `Idempotency-Key`, a route listed in
`upstream.safe_resend_routes`); anything else is a 504 sent upstream exactly once. A 429
(not processed) and an `Invalid JWT` (not run) are resent for every method, as before."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from typing import Any

import aiohttp
import pytest

from proxy.simulator.faults import Dice
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "resendLoc01"
RESOURCE = f"{APP_ID}:location:{LOCATION}"
CALLERS = 40
# Limits are not the subject here: neither the proxy nor the simulator holds anything back.
ROOMY = {"limits": {"burst": {"requests": 100_000}}}
SAFE_ROUTES = ["POST /contacts/upsert", "POST /contacts/search*"]


@pytest.fixture
def token(simulator) -> str:
    """The caller's own location token (passed through); the simulator's limits lifted."""
    simulator.state.set_limits({"burst": 100_000})
    return str(simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"])


async def send(
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    method: str,
    body: bytes = b"",
    **headers: str,
) -> tuple[int, Any]:
    """One request through the proxy with the caller's own token: (status, json body)."""
    sent = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers}
    async with http.request(method, url, data=body, headers=sent) as answer:
        return answer.status, json.loads(await answer.read())


async def concurrently(
    http: aiohttp.ClientSession,
    url: str,
    token: str,
    method: str,
    *,
    key: bool = False,
    paths: tuple[str, ...] = ("/contacts/",),
) -> list[tuple[int, Any]]:
    """CALLERS requests at once, spread over `paths`; with `key`, each its own
    Idempotency-Key."""

    async def one(index: int) -> tuple[int, Any]:
        path = paths[index % len(paths)]
        headers = {"Idempotency-Key": f"key-{index}"} if key else {}
        body = json.dumps({"locationId": LOCATION, "i": index}).encode()
        return await send(http, f"{url}{path}?i={index}", token, method, body, **headers)

    return await asyncio.gather(*(one(index) for index in range(CALLERS)))


def sends(simulator, method: str) -> int:
    """How many requests of `method` reached the simulator's API."""
    return int(simulator.state.stats()["requests_by_method"].get(method, 0))


def timed_out(results: list[tuple[int, Any]]) -> list[str]:
    """The messages of the proxy's 504 upstream_timeout answers; asserts they are all such."""
    assert [(status, body.get("error")) for status, body in results] == [
        (504, "upstream_timeout")
    ] * len(results), results[:3]
    return [body["message"] for _, body in results]


def seed_timing_out_once() -> int:
    """A dice seed with which, at ratio 0.5, the first request times out and the second
    does not (the simulator's own dice, so this follows it)."""
    for seed in itertools.count():
        dice = Dice(seed)
        if dice.roll(0.5) and not dice.roll(0.5):
            return seed
    raise AssertionError("unreachable")


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_unsafe_request_is_not_resent(simulator, start_proxy, http, token, method) -> None:
    """POST or PATCH without Idempotency-Key, on no listed route: one send, then 504 saying
    it may have run and how to have it resent."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    simulator.state.set_faults({"command_timeout_ratio": 1.0})
    messages = timed_out(await concurrently(http, proxy.url, token, method))
    assert sends(simulator, method) == CALLERS
    assert simulator.state.stats()["command_timeouts"] == CALLERS
    message = messages[0]
    assert "may have run" in message and "not resent" in message
    assert "Idempotency-Key" in message and "upstream.safe_resend_routes" in message
    assert f"{method} /contacts/" in message


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_request_with_idempotency_key_is_resent(
    simulator, start_proxy, http, token, method
) -> None:
    """With Idempotency-Key the caller says it is safe to repeat: sent again once, then
    the usual 504 after a second timeout."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    simulator.state.set_faults({"command_timeout_ratio": 1.0})
    messages = timed_out(await concurrently(http, proxy.url, token, method, key=True))
    assert sends(simulator, method) == 2 * CALLERS
    assert all("twice" in message for message in messages)


async def test_resent_request_gets_the_second_answer(simulator, start_proxy, http, token) -> None:
    """A POST with Idempotency-Key that times out once gets the resend's answer; the key
    itself reaches the upstream (HighLevel ignores headers it does not know)."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    simulator.state.dice.reseed(seed_timing_out_once())
    simulator.state.set_faults({"command_timeout_ratio": 0.5})
    body = b'{"locationId": "resendLoc01", "firstName": "Ada"}'
    status, echo = await send(
        http, f"{proxy.url}/contacts/", token, "POST", body, **{"Idempotency-Key": "k-1"}
    )
    assert status == 200, echo
    assert echo["method"] == "POST" and echo["path"] == "/contacts/"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["headers"]["Idempotency-Key"] == "k-1"
    assert sends(simulator, "POST") == 2
    assert simulator.state.stats()["command_timeouts"] == 1


async def test_listed_routes_are_resent(simulator, start_proxy, http, token) -> None:
    """A POST to a route in upstream.safe_resend_routes (exact, or under a `*` prefix; the
    query does not count) is sent again without a key."""
    proxy = await start_proxy(simulator.url, upstream={"safe_resend_routes": SAFE_ROUTES}, **ROOMY)
    simulator.state.set_faults({"command_timeout_ratio": 1.0})
    paths = ("/contacts/upsert", "/contacts/search", "/contacts/search/duplicate")
    messages = timed_out(await concurrently(http, proxy.url, token, "POST", paths=paths))
    assert sends(simulator, "POST") == 2 * CALLERS
    assert all("twice" in message for message in messages)


async def test_routes_not_listed_are_not_resent(simulator, start_proxy, http, token) -> None:
    """An exact route does not cover paths below it or beside it, nor another method."""
    proxy = await start_proxy(simulator.url, upstream={"safe_resend_routes": SAFE_ROUTES}, **ROOMY)
    simulator.state.set_faults({"command_timeout_ratio": 1.0})
    paths = ("/contacts/upsert/more", "/contacts/upserts", "/contacts/", "/contacts/searc")
    messages = timed_out(await concurrently(http, proxy.url, token, "POST", paths=paths))
    assert sends(simulator, "POST") == CALLERS
    assert all("not resent" in message for message in messages)
    timed_out(await concurrently(http, proxy.url, token, "PATCH", paths=("/contacts/upsert",)))
    assert sends(simulator, "PATCH") == CALLERS


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
async def test_idempotent_methods_are_resent(simulator, start_proxy, http, token, method) -> None:
    """Idempotent methods are sent again once, as before, with no key and no listed route."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    simulator.state.set_faults({"command_timeout_ratio": 1.0})
    messages = timed_out(await concurrently(http, proxy.url, token, method))
    assert sends(simulator, method) == 2 * CALLERS
    assert all("twice" in message for message in messages)


async def test_upstream_429_on_post_is_resent(simulator, start_proxy, http, token) -> None:
    """A 429 means the upstream did not process the request: a POST without a key is sent
    again after the pause, and every caller gets its own answer."""
    proxy = await start_proxy(
        simulator.url, limits={"burst": {"requests": 100_000, "interval_ms": 500}}
    )
    simulator.state.set_faults({"force_429": CALLERS})
    results = await concurrently(http, proxy.url, token, "POST")
    assert [status for status, _ in results] == [200] * CALLERS, results[:3]
    assert sorted(body["query_string"] for _, body in results) == sorted(
        f"i={index}" for index in range(CALLERS)
    )
    stats = simulator.state.stats()
    assert stats["forced_429"] == CALLERS
    assert sends(simulator, "POST") == 2 * CALLERS


async def test_invalid_jwt_on_post_is_still_resent(simulator, start_proxy, http) -> None:
    """An `Invalid JWT` was not run upstream: a managed POST is refreshed and sent again."""
    simulator.state.set_limits({"burst": 100_000})
    proxy = await start_proxy(simulator.url, **ROOMY)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)
    simulator.state.expire_tokens(RESOURCE)
    headers = {"X-HoopAI-Location-Id": LOCATION}
    async with http.post(f"{proxy.url}/contacts/", data=b"{}", headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        assert (await answer.json())["method"] == "POST"
    stats = simulator.state.stats()
    assert (stats["invalid_jwt"], stats["refreshes"]) == (1, 1)
    assert sends(simulator, "POST") == 2
