"""The HoopAI simulator over real HTTP: OAuth with rotation, tokens, limits, faults, probes,
control endpoints and the ``simulate`` command. Time moves by ``advance_clock`` on an
injected clock, never by sleeping through windows."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from proxy.jwt import b64url_decode
from proxy.simulator import SIMULATOR, Simulator, SimulatorConfig, create_simulator_app
from proxy.simulator.client import SimulatorClient, SimulatorError
from proxy.simulator.testing import RunningSimulator, running_simulator

CLIENT_ID = "6650f1a2b3c4d5e6f7a8b9c0-simdemo01"
SECRET = "sim-secret"
APP_ID = "6650f1a2b3c4d5e6f7a8b9c0"
# A multiple of the 10 s interval, so fixed windows start exactly at T0.
T0 = 1_700_000_000.0
VERSION = {"Version": "2021-07-28"}
RATE_HEADERS = (
    "X-RateLimit-Limit-Daily",
    "X-RateLimit-Daily-Remaining",
    "X-RateLimit-Interval-Milliseconds",
    "X-RateLimit-Max",
    "X-RateLimit-Remaining",
)
INVALID_REFRESH = {
    "statusCode": 400,
    "message": "Invalid grant: refresh token is invalid",
    "error": "invalid_grant",
}
ROOT = Path(__file__).resolve().parents[2]


class ManualClock:
    """A clock that stands still; the simulator's own offset moves it forward."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RunningClock:
    """A clock that starts at ``start`` and runs at the event loop's pace (monotonic), for
    faults that sleep for real: the simulator's times then measure the sleeps."""

    def __init__(self, start: float) -> None:
        self._offset = start - time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() + self._offset


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator(SimulatorConfig(), clock=ManualClock(T0)) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def client(sim: RunningSimulator, session: aiohttp.ClientSession) -> SimulatorClient:
    return SimulatorClient(sim.url, session)


class Answer:
    """Status, headers and decoded JSON body of one response."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def rate_headers(self) -> dict[str, str]:
        return {name: self.headers[name] for name in RATE_HEADERS if name in self.headers}


async def call(
    session: aiohttp.ClientSession,
    url: str | URL,
    token: str | None = None,
    *,
    method: str = "GET",
    version: bool = True,
    headers: Mapping[str, str] | None = None,
    **kw: Any,
) -> Answer:
    headers = {**(VERSION if version else {}), **(headers or {})}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with session.request(method, url, headers=headers, **kw) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return Answer(response.status, response.headers, body)


async def post_token(session: aiohttp.ClientSession, url: str, form: dict[str, str]) -> Answer:
    async with session.post(f"{url}/oauth/token", data=form) as response:
        return Answer(response.status, response.headers, await response.json())


def jwt_part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(b64url_decode(part))
    return decoded


# -- OAuth and tokens --------------------------------------------------------------------


async def test_exchange_gives_jwt_shaped_token_with_the_right_claims(
    client: SimulatorClient,
) -> None:
    """A Location install exchanged for tokens: full answer, JWT shape and claims."""
    tokens = await client.install_and_exchange(
        CLIENT_ID, SECRET, location_id="loc1", company_id="comp1"
    )
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 86399
    assert (tokens["userType"], tokens["locationId"], tokens["companyId"]) == (
        "Location",
        "loc1",
        "comp1",
    )
    for key in ("refresh_token", "userId", "refreshTokenId", "traceId", "planId"):
        assert tokens[key], key
    assert tokens["isBulkInstallation"] is False
    access = tokens["access_token"]
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", access)
    assert jwt_part(access, 0) == {"alg": "RS256", "typ": "JWT"}
    claims = jwt_part(access, 1)
    assert claims["authClass"] == "Location"
    assert claims["authClassId"] == "loc1"
    assert claims["sourceId"] == CLIENT_ID
    assert claims["oauthMeta"]["client"] == APP_ID
    assert claims["oauthMeta"]["versionId"] == APP_ID
    assert claims["oauthMeta"]["scopes"] == tokens["scope"].split(" ")
    assert claims["iat"] == int(T0)
    assert "exp" not in claims
    again = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="loc1")
    assert jwt_part(again["access_token"], 1)["jti"] != claims["jti"]
    assert again["refresh_token"] != tokens["refresh_token"]


async def test_authorization_code_is_single_use(
    client: SimulatorClient, sim: RunningSimulator
) -> None:
    """A used code answers 400 invalid_grant, as does an unknown one."""
    code = await client.install(CLIENT_ID)
    await client.exchange_code(CLIENT_ID, SECRET, code)
    with pytest.raises(SimulatorError) as used:
        await client.exchange_code(CLIENT_ID, SECRET, code)
    assert used.value.status == 400
    assert used.value.body == {
        "statusCode": 400,
        "message": "Invalid grant: authorization code is invalid",
        "error": "invalid_grant",
    }
    assert sim.state.stats()["codes_exchanged"] == 1


async def test_refresh_rotates_and_the_old_refresh_token_is_dead(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """A refresh gives a new pair; the used refresh token then answers 400 and counts a
    dead use, an unknown one counts separately, and the old access token still works."""
    first = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="loc1")
    second = await client.refresh(CLIENT_ID, SECRET, first["refresh_token"])
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]
    assert second["locationId"] == "loc1"
    with pytest.raises(SimulatorError) as dead:
        await client.refresh(CLIENT_ID, SECRET, first["refresh_token"])
    assert (dead.value.status, dead.value.body) == (400, INVALID_REFRESH)
    with pytest.raises(SimulatorError) as unknown:
        await client.refresh(CLIENT_ID, SECRET, "never-issued")
    assert (unknown.value.status, unknown.value.body) == (400, INVALID_REFRESH)
    assert (await call(session, f"{sim.url}/contacts/", first["access_token"])).status == 200
    third = await client.refresh(CLIENT_ID, SECRET, second["refresh_token"])
    assert third["refresh_token"] not in (first["refresh_token"], second["refresh_token"])
    stats = await client.stats()
    assert stats["refreshes"] == 2
    assert stats["dead_refresh_token_uses"] == 1
    assert stats["unknown_refresh_tokens"] == 1
    assert stats["per_resource"][f"{APP_ID}:location:loc1"]["refreshes"] == 2


async def test_camel_case_token_form_is_accepted(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """The v3 camelCase fields work for both the code exchange and the refresh."""
    code = await client.install(CLIENT_ID, location_id="loc1")
    common = {"clientId": CLIENT_ID, "clientSecret": SECRET, "userType": "Location"}
    exchanged = await post_token(
        session, sim.url, common | {"grantType": "authorization_code", "code": code}
    )
    assert exchanged.status == 200
    assert exchanged.body["locationId"] == "loc1"
    refreshed = await post_token(
        session,
        sim.url,
        common | {"grantType": "refresh_token", "refreshToken": exchanged.body["refresh_token"]},
    )
    assert refreshed.status == 200
    assert refreshed.body["access_token"] != exchanged.body["access_token"]


async def test_wrong_client_secret_is_401(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Bad client credentials answer 401 in HighLevel's shape, and spend nothing."""
    code = await client.install(CLIENT_ID)
    form = {
        "client_id": CLIENT_ID,
        "client_secret": "wrong",
        "grant_type": "authorization_code",
        "code": code,
    }
    answer = await post_token(session, sim.url, form)
    assert answer.status == 401
    assert answer.body == {
        "error": "UnAuthorized!",
        "error_description": "Invalid client credentials!",
    }
    assert (await client.exchange_code(CLIENT_ID, SECRET, code))["access_token"]


async def test_expired_access_token_answers_invalid_jwt(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Past its lifetime an access token gets 401 Invalid JWT; a refresh cures it."""
    await client.set_config(access_token_lifetime_s=60)
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    assert tokens["expires_in"] == 60
    url = f"{sim.url}/contacts/"
    await client.advance_clock(59.5)
    assert (await call(session, url, tokens["access_token"])).status == 200
    await client.advance_clock(1)
    expired = await call(session, url, tokens["access_token"])
    assert (expired.status, expired.body) == (401, {"statusCode": 401, "message": "Invalid JWT"})
    assert "X-RateLimit-Remaining" not in expired.headers
    fresh = await client.refresh(CLIENT_ID, SECRET, tokens["refresh_token"])
    assert (await call(session, url, fresh["access_token"])).status == 200
    assert (await client.stats())["invalid_jwt"] == 1


async def test_expire_tokens_hits_only_the_named_resource(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """/_sim/expire with a resource expires that resource's tokens and no other's."""
    one = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="one")
    two = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="two")
    assert await client.expire_tokens(f"{APP_ID}:location:one") == 1
    assert (await call(session, f"{sim.url}/x", one["access_token"])).status == 401
    assert (await call(session, f"{sim.url}/x", two["access_token"])).status == 200


async def test_missing_version_header_is_401(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Without Version the API answers 401 before looking at the token."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    answer = await call(session, f"{sim.url}/contacts/", tokens["access_token"], version=False)
    assert answer.status == 401
    assert answer.body == {"statusCode": 401, "message": "version header was not found."}


async def test_registered_app_can_install_and_its_app_id_is_the_prefix(
    client: SimulatorClient,
) -> None:
    """/_sim/apps adds an app; its tokens carry the client id's part before the first '-'."""
    await client.register_app("abc123-second-app", "s2")
    tokens = await client.install_and_exchange("abc123-second-app", "s2")
    assert jwt_part(tokens["access_token"], 1)["oauthMeta"]["client"] == "abc123"


# -- location tokens ---------------------------------------------------------------------


async def test_location_token_is_minted_only_for_approved_locations(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """A Company token mints Location tokens for approved locations, 400 for others."""
    company = await client.install_and_exchange(
        CLIENT_ID, SECRET, user_type="Company", company_id="comp1", approved_locations=["locA"]
    )
    assert company["userType"] == "Company"
    assert company["approvedLocations"] == ["locA"]
    assert company["isBulkInstallation"] is True
    assert "locationId" not in company
    url = f"{sim.url}/oauth/locationToken"
    minted = await call(
        session,
        url,
        company["access_token"],
        method="POST",
        data={"companyId": "comp1", "locationId": "locA"},
    )
    assert minted.status == 200
    body = minted.body
    assert (body["userType"], body["locationId"], body["companyId"]) == (
        "Location",
        "locA",
        "comp1",
    )
    for key in ("access_token", "refresh_token", "expires_in", "scope", "userId"):
        assert body[key], key
    echoed = await call(session, f"{sim.url}/contacts/", body["access_token"])
    assert echoed.body["auth"] == {"authClass": "Location", "authClassId": "locA", "client": APP_ID}
    refused = await call(
        session,
        url,
        company["access_token"],
        method="POST",
        data={"companyId": "comp1", "locationId": "locB"},
    )
    assert refused.status == 400
    assert refused.body["message"]
    assert (await client.stats())["location_tokens_minted"] == 1
    installed = await call(
        session,
        f"{sim.url}/oauth/installedLocations?companyId=comp1&appId={APP_ID}",
        company["access_token"],
    )
    assert installed.status == 200
    assert installed.body["count"] == 1
    assert installed.body["locations"][0]["_id"] == "locA"
    assert installed.body["locations"][0]["isInstalled"] is True


async def test_location_token_needs_a_company_token(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """A Location token cannot mint location tokens (401, not a grant)."""
    location = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="locA")
    answer = await call(
        session,
        f"{sim.url}/oauth/locationToken",
        location["access_token"],
        method="POST",
        data={"companyId": location["companyId"], "locationId": "locA"},
    )
    assert answer.status == 401
    assert (await client.stats())["location_tokens_minted"] == 0


async def test_inactive_location_keeps_the_refresh_token(client: SimulatorClient) -> None:
    """'Location is not active' is temporary: the same refresh token works afterwards."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="sleepy")
    await client.set_faults(inactive_locations=["sleepy"])
    with pytest.raises(SimulatorError) as inactive:
        await client.refresh(CLIENT_ID, SECRET, tokens["refresh_token"])
    assert inactive.value.status == 400
    assert inactive.value.body == {"statusCode": 400, "message": "Location is not active"}
    await client.clear_faults()
    refreshed = await client.refresh(CLIENT_ID, SECRET, tokens["refresh_token"])
    assert refreshed["locationId"] == "sleepy"
    stats = await client.stats()
    assert (stats["refreshes"], stats["dead_refresh_token_uses"]) == (1, 0)


# -- limits ------------------------------------------------------------------------------


async def test_101st_request_in_ten_seconds_is_429_and_not_counted(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """100 requests pass with Remaining counting down; the 101st is 429, consumes nothing."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="busy")
    url = f"{sim.url}/contacts/"
    for sent in range(1, 101):
        answer = await call(session, url, tokens["access_token"])
        assert answer.status == 200
        assert answer.headers["X-RateLimit-Remaining"] == str(100 - sent)
    limited = await call(session, url, tokens["access_token"])
    assert limited.status == 429
    assert limited.body == {
        "statusCode": 429,
        "message": "Too many requests",
        "error": "Too Many Requests",
    }
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert limited.headers["X-RateLimit-Daily-Remaining"] == str(200000 - 100)
    resource = (await client.stats())["per_resource"][f"{APP_ID}:location:busy"]
    assert resource == {
        "requests": 101,
        "admitted": 100,
        "rate_limited": 1,
        "refreshes": 0,
        "max_in_window": 100,
    }


async def test_fixed_window_resets_at_the_boundary(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Fixed windows let N through at the end of one window and N more at the start of the
    next: 2N inside one sliding interval, which max_in_window reports."""
    await client.set_limits(burst=5, window="fixed")
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="fx")
    url = f"{sim.url}/x"
    await client.advance_clock(9)
    statuses = [(await call(session, url, tokens["access_token"])).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    await client.advance_clock(1)
    statuses = [(await call(session, url, tokens["access_token"])).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    stats = await client.stats()
    assert stats["per_resource"][f"{APP_ID}:location:fx"]["max_in_window"] == 10


async def test_sliding_window_counts_the_last_interval(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Sliding windows refuse at the fixed boundary and admit only once the old requests
    are a full interval old; no interval ever holds more than N."""
    await client.set_limits(burst=5, window="sliding")
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="sl")
    url = f"{sim.url}/x"
    await client.advance_clock(9)
    for _ in range(5):
        assert (await call(session, url, tokens["access_token"])).status == 200
    await client.advance_clock(1)
    assert (await call(session, url, tokens["access_token"])).status == 429
    await client.advance_clock(8.9)
    assert (await call(session, url, tokens["access_token"])).status == 429
    await client.advance_clock(0.2)
    answer = await call(session, url, tokens["access_token"])
    assert (answer.status, answer.headers["X-RateLimit-Remaining"]) == (200, "4")
    stats = await client.stats()
    assert stats["per_resource"][f"{APP_ID}:location:sl"]["max_in_window"] == 5


async def test_daily_limit_refuses_until_the_next_utc_day(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """After D requests in a UTC day the rest of the day is 429; midnight UTC resets it."""
    await client.set_limits(daily=3)
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    url = f"{sim.url}/x"
    for _ in range(3):
        assert (await call(session, url, tokens["access_token"])).status == 200
    limited = await call(session, url, tokens["access_token"])
    assert limited.status == 429
    assert limited.headers["X-RateLimit-Daily-Remaining"] == "0"
    assert limited.headers["X-RateLimit-Remaining"] == "97"
    next_midnight = (T0 // 86400 + 1) * 86400
    await client.advance_clock(next_midnight - T0 + 1)
    answer = await call(session, url, tokens["access_token"])
    assert (answer.status, answer.headers["X-RateLimit-Daily-Remaining"]) == (200, "2")


async def test_five_rate_limit_headers_carry_the_right_values(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """The five X-RateLimit-* headers describe the key's limits after this request."""
    await client.set_limits(burst=7, interval_ms=5000, daily=50)
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    await call(session, f"{sim.url}/x", tokens["access_token"])
    answer = await call(session, f"{sim.url}/x", tokens["access_token"])
    assert answer.rate_headers() == {
        "X-RateLimit-Limit-Daily": "50",
        "X-RateLimit-Daily-Remaining": "48",
        "X-RateLimit-Interval-Milliseconds": "5000",
        "X-RateLimit-Max": "7",
        "X-RateLimit-Remaining": "5",
    }


async def test_limits_are_kept_per_resource(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """One location's exhausted burst does not touch another location's."""
    await client.set_limits(burst=1)
    one = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="one")
    two = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="two")
    assert (await call(session, f"{sim.url}/x", one["access_token"])).status == 200
    assert (await call(session, f"{sim.url}/x", one["access_token"])).status == 429
    assert (await call(session, f"{sim.url}/x", two["access_token"])).status == 200


async def test_max_in_window_and_admitted_times_in_process(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """The admitted times are reachable in-process and max_in_window matches them."""
    await client.set_limits(burst=3, interval_ms=1000)
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="m")
    for step in (0.0, 0.4, 0.4, 0.4, 0.4):
        await client.advance_clock(step)
        await call(session, f"{sim.url}/x", tokens["access_token"])
        await call(session, f"{sim.url}/x", tokens["access_token"])
    resource = f"{APP_ID}:location:m"
    times = sim.state.admitted_times(resource)
    assert len(times) == (await client.stats())["per_resource"][resource]["admitted"]
    busiest = max(sum(1 for t in times if start - 1 < t <= start) for start in times)
    assert busiest == 3
    assert sim.state.stats()["per_resource"][resource]["max_in_window"] == busiest


# -- echo and probes ---------------------------------------------------------------------


async def test_echo_preserves_the_raw_query_byte_for_byte(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """The API echo and /_sim/echo report path and query exactly as they arrived."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="q")
    raw_query = "a=%2F%20b&c=1+2&c=3"
    api = await call(
        session, URL(f"{sim.url}/contacts/search?{raw_query}", encoded=True), tokens["access_token"]
    )
    assert api.body["query_string"] == raw_query
    assert api.body["raw_path"] == f"/contacts/search?{raw_query}"
    assert api.body["path"] == "/contacts/search"
    assert api.body["method"] == "GET"
    assert api.body["headers"]["Authorization"] == f"Bearer {tokens['access_token']}"
    assert api.body["auth"] == {"authClass": "Location", "authClassId": "q", "client": APP_ID}
    probe = await call(
        session, URL(f"{sim.url}/_sim/echo/a%2Fb?{raw_query}", encoded=True), version=False
    )
    assert probe.body["raw_path"] == f"/_sim/echo/a%2Fb?{raw_query}"
    assert probe.body["query_string"] == raw_query
    assert probe.body["auth"] is None


async def test_streamed_upload_is_hashed_whole(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """A few MB sent in chunks (no Content-Length) arrive with the right length and hash."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    chunks = [hashlib.sha256(str(i).encode()).digest() * 4096 for i in range(32)]
    expected = hashlib.sha256(b"".join(chunks)).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    api = await call(
        session, f"{sim.url}/medias/upload", tokens["access_token"], method="POST", data=body()
    )
    assert (api.body["body_length"], api.body["body_sha256"]) == (32 * 32 * 4096, expected)
    probe = await call(
        session, f"{sim.url}/_sim/echo/u", method="PUT", data=io.BytesIO(b"".join(chunks))
    )
    assert (probe.body["body_length"], probe.body["body_sha256"]) == (32 * 32 * 4096, expected)


async def test_echo_hashes_a_compressed_body_as_sent(
    session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """A gzip request body is hashed as it crossed the wire, not decompressed."""
    body = gzip.compress(b'{"hello": "world"}' * 100)
    echoed = await call(
        session,
        f"{sim.url}/_sim/echo/gz",
        method="POST",
        data=body,
        headers={"Content-Encoding": "gzip"},
    )
    assert echoed.body["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echoed.body["headers"]["Content-Encoding"] == "gzip"


async def test_download_streams_the_exact_bytes(
    session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """/_sim/download?bytes=N sends N deterministic bytes with a Content-Length."""
    size = 1_000_003
    digest = hashlib.sha256()
    received = 0
    async with session.get(f"{sim.url}/_sim/download?bytes={size}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_chunked(100_000):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == hashlib.sha256(bytes(i % 251 for i in range(size))).hexdigest()


async def test_slow_and_headers_probes(
    session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """/_sim/slow answers after the delay; /_sim/headers sets the asked-for headers,
    Connection and the headers it names included."""
    started = time.monotonic()
    slow = await call(session, f"{sim.url}/_sim/slow?ms=150", version=False)
    assert (slow.status, slow.body) == (200, {"slept_ms": 150})
    assert time.monotonic() - started >= 0.15
    query = "Connection=X-Hop&X-Hop=1&X-RateLimit-Remaining=7&X-Other=ok"
    headers = await call(session, f"{sim.url}/_sim/headers?{query}", version=False)
    assert headers.status == 200
    assert headers.headers["Connection"] == "X-Hop"
    assert headers.headers["X-Hop"] == "1"
    assert headers.headers["X-RateLimit-Remaining"] == "7"
    assert headers.headers["X-Other"] == "ok"


async def test_reserved_prefixes_are_not_the_generic_api(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Unknown paths under /oauth/ and /_sim/ are 404, not echoed."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    for path in ("/oauth/nope", "/_sim/nope", "/oauth/token"):
        answer = await call(session, f"{sim.url}{path}", tokens["access_token"])
        assert answer.status == 404, path


# -- faults ------------------------------------------------------------------------------


async def test_drop_fault_closes_the_connection_without_an_answer(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """drop_ratio 1.0 disconnects before any byte of answer, even without a token."""
    await client.set_faults(drop_ratio=1.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await call(session, f"{sim.url}/contacts/", "anything")
    assert (await client.stats())["dropped"] >= 1
    await client.clear_faults()
    assert (await call(session, f"{sim.url}/contacts/", "anything")).status == 401


async def test_error_ratio_one_gives_5xx_with_rate_limit_headers(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """error_ratio 1.0 answers the configured 5xx after the request was admitted."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    await client.set_faults(error_ratio=1.0, error_status=502)
    answer = await call(session, f"{sim.url}/x", tokens["access_token"])
    assert (answer.status, answer.body) == (502, {"statusCode": 502, "message": "Bad Gateway"})
    assert answer.headers["X-RateLimit-Remaining"] == "99"
    assert len(answer.rate_headers()) == 5
    assert (await client.stats())["faults_5xx"] == 1


async def test_command_timeout_fault(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """command_timeout_ratio 1.0 answers 401 Command timed out, with the rate headers."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    await client.set_faults(command_timeout_ratio=1.0)
    answer = await call(session, f"{sim.url}/x", tokens["access_token"])
    assert answer.status == 401
    assert answer.body == {"statusCode": 401, "message": "Command timed out"}
    assert len(answer.rate_headers()) == 5
    assert (await client.stats())["command_timeouts"] == 1


async def test_force_429_refuses_the_next_k_without_consuming(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """force_429=2: the next two API requests get 429 and take no quota; then 200."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    await client.set_faults(force_429=2)
    url = f"{sim.url}/x"
    first, second, third = [await call(session, url, tokens["access_token"]) for _ in range(3)]
    assert (first.status, second.status, third.status) == (429, 429, 200)
    assert first.headers["X-RateLimit-Remaining"] == "100"
    assert third.headers["X-RateLimit-Remaining"] == "99"
    stats = await client.stats()
    assert (stats["forced_429"], stats["rate_limited"]) == (2, 2)


async def test_fault_ratios_follow_the_seed(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """With a ratio between 0 and 1 the same seed fails the same requests after a reset."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    await client.set_faults(error_ratio=0.5)

    async def statuses() -> list[int]:
        return [
            (await call(session, f"{sim.url}/x", tokens["access_token"])).status for _ in range(20)
        ]

    first = await statuses()
    await client.reset()
    assert await statuses() == first
    assert {200, 503} == set(first)


async def test_token_latency_delays_and_rotates_before_sleeping(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """token_latency_ms delays /oauth answers; a refresh whose answer is lost has still
    rotated, so the old refresh token is dead."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    await client.set_faults(token_latency_ms=600_000)  # this answer would come in 10 minutes
    form = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
    }

    async def refresh_and_read() -> bytes:
        async with session.post(f"{sim.url}/oauth/token", data=form) as answer:
            return await answer.read()

    lost = asyncio.create_task(refresh_and_read())
    while sim.state.stats()["refreshes"] < 1:  # rotated, its answer not yet sent
        assert not lost.done(), "the refresh was answered before the latency"
        await asyncio.sleep(0.01)
    lost.cancel()  # the caller hangs up: the answer is lost
    with pytest.raises(asyncio.CancelledError):
        await lost
    await client.set_faults(token_latency_ms=300)
    started = time.monotonic()
    with pytest.raises(SimulatorError) as dead:
        await client.refresh(CLIENT_ID, SECRET, tokens["refresh_token"])
    assert time.monotonic() - started >= 0.3
    assert (dead.value.status, dead.value.body) == (400, INVALID_REFRESH)


# A UTC midnight: a multiple of every interval below, so fixed windows start exactly here.
MIDNIGHT = 1_699_920_000.0


@pytest.mark.parametrize("window", ["sliding", "fixed"])
async def test_arrival_delay_holds_each_request_before_the_limits_count_it(
    window: str, session: aiohttp.ClientSession
) -> None:
    """arrival_delay_ms: each API request is counted a seeded 0..D after it arrived, so
    requests that arrive together are counted spread out and in another order; the window
    (sliding or fixed) sees the counted times and admits the first N counted."""
    burst, most_ms, sent = 5, 400, 12
    config = SimulatorConfig(burst=burst, interval_ms=60_000, window=window)
    async with running_simulator(config, clock=RunningClock(MIDNIGHT)) as running:
        client = SimulatorClient(running.url, session)
        tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="late")
        assert (await client.set_faults(arrival_delay_ms=most_ms))["arrival_delay_ms"] == most_ms
        answers = await asyncio.gather(
            *(call(session, f"{running.url}/x", tokens["access_token"]) for _ in range(sent))
        )
    resource = f"{APP_ID}:location:late"
    transits = running.state.transits_of(resource)  # in the order they were counted
    delays = [t.delay_s for t in transits]
    due = [t.received_at + t.delay_s for t in transits]
    assert sorted(a.status for a in answers) == [200] * burst + [429] * (sent - burst)
    assert len(transits) == sent
    assert all(0 <= d <= most_ms / 1000 for d in delays)
    assert max(delays) - min(delays) > most_ms / 2000  # drawn, not one fixed delay
    # Counted no sooner than arrival + delay (float rounding at 1.7e9 s is ~0.2 us) ...
    assert all(t.counted_at >= t.received_at + t.delay_s - 1e-5 for t in transits)
    # ... and in the order of arrival + delay (two due within 5 ms may swap on a busy loop),
    # which is not the order they arrived in.
    assert all(due[i] <= due[j] + 0.005 for i in range(sent) for j in range(i + 1, sent))
    received = [t.received_at for t in transits]
    assert received != sorted(received)
    # The limits' own history holds the counted times: the first N counted are admitted.
    assert [t.admitted for t in transits] == [True] * burst + [False] * (sent - burst)
    assert running.state.admitted_times(resource) == [t.counted_at for t in transits[:burst]]
    assert running.state.refused_times(resource) == [t.counted_at for t in transits[burst:]]


async def test_arrival_delays_follow_the_seed_and_leave_the_ratios_alone(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """The same seed draws the same delays after a reset; the delays have a stream of
    their own, so error_ratio fails the same requests with arrival_delay_ms on or off."""
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET, location_id="seeded")
    resource = f"{APP_ID}:location:seeded"
    await client.set_faults(error_ratio=0.5)

    async def run() -> tuple[list[int], list[float]]:
        await client.reset()
        statuses = [
            (await call(session, f"{sim.url}/x", tokens["access_token"])).status for _ in range(8)
        ]
        return statuses, [t.delay_s for t in sim.state.transits_of(resource)]

    plain, no_delays = await run()
    await client.set_faults(arrival_delay_ms=20)
    delayed, delays = await run()
    again, delays_again = await run()
    assert no_delays == [0.0] * 8
    assert {200, 503} == set(plain)
    assert delayed == plain
    assert again == plain
    assert delays_again == delays
    assert all(0 < d <= 0.02 for d in delays)
    assert len(set(delays)) == 8


# -- control -----------------------------------------------------------------------------


async def test_control_endpoints_reject_bad_values(client: SimulatorClient) -> None:
    """Bad limits, faults, settings and installs answer 400 naming the field."""
    attempts = [
        (client.set_limits(burst=0), "burst"),
        (client.set_limits(window="leaky"), "window"),
        (client.set_faults(error_ratio=2), "error_ratio"),
        (client.set_faults(arrival_delay_ms=-1), "arrival_delay_ms"),
        (client.set_faults(arrival_delay_ms="300"), "arrival_delay_ms"),
        (client.set_faults(no_such_fault=1), "no_such_fault"),
        (client.set_config(access_token_lifetime_s=-1), "access_token_lifetime_s"),
        (client.install("unknown-app"), "client_id"),
    ]
    for attempt, field in attempts:
        with pytest.raises(SimulatorError) as refused:
            await attempt
        assert refused.value.status == 400
        assert field in refused.value.body["message"]


async def test_reset_clears_counters_and_windows_but_keeps_tokens(
    client: SimulatorClient, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """After /_sim/reset the counters are zero, the burst is whole, tokens still work."""
    await client.set_limits(burst=1)
    tokens = await client.install_and_exchange(CLIENT_ID, SECRET)
    assert (await call(session, f"{sim.url}/x", tokens["access_token"])).status == 200
    assert (await call(session, f"{sim.url}/x", tokens["access_token"])).status == 429
    await client.reset()
    stats = await client.stats()
    assert (stats["requests"], stats["rate_limited"], stats["per_resource"]) == (0, 0, {})
    assert (await call(session, f"{sim.url}/x", tokens["access_token"])).status == 200


async def test_in_process_grant_gives_a_working_token(
    session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    """Simulator.grant installs and exchanges without HTTP; the token works over HTTP."""
    tokens = sim.state.grant(CLIENT_ID, location_id="inproc")
    answer = await call(session, f"{sim.url}/x", tokens["access_token"])
    assert answer.body["auth"]["authClassId"] == "inproc"
    assert sim.state.stats()["codes_exchanged"] == 1


async def test_app_state_is_a_copy_of_the_config() -> None:
    """create_simulator_app keeps its own config: changing it leaves the caller's alone."""
    config = SimulatorConfig(burst=5)
    app = create_simulator_app(config)
    state = app[SIMULATOR]
    assert isinstance(state, Simulator)
    state.set_limits({"burst": 9})
    assert (state.config.burst, config.burst) == (9, 5)


# -- command line ------------------------------------------------------------------------

CLI_CODE = (
    "import argparse, sys\n"
    "from proxy.simulator import cli\n"
    "parser = argparse.ArgumentParser()\n"
    "cli.add_arguments(parser)\n"
    "sys.exit(cli.run(parser.parse_args()))\n"
)


@pytest.mark.slow
async def test_cli_announces_its_port_and_serves_until_sigterm(
    session: aiohttp.ClientSession,
) -> None:
    """`--port 0` prints exactly one listening line with the real port, serves the
    options it was given (limits and the arrival delay), and exits 0 on SIGTERM."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLI_CODE,
        "--port",
        "0",
        "--burst",
        "7",
        "--app",
        "app9-x:s9",
        "--arrival-delay-ms",
        "250",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        found = re.fullmatch(rb"hoopai simulator listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert found, line
        url = found.group(1).decode()
        assert int(found.group(2)) > 0
        async with session.get(f"{url}/_sim/stats") as response:
            assert response.status == 200
            assert (await response.json())["requests"] == 0
        control = SimulatorClient(url, session)
        tokens = await control.install_and_exchange("app9-x", "s9")
        answer = await call(session, f"{url}/x", tokens["access_token"])
        assert answer.headers["X-RateLimit-Max"] == "7"
        assert (await control.set_faults())["arrival_delay_ms"] == 250
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert rest == b""
    assert process.returncode == 0
