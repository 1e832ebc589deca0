"""Request ids over real HTTP, through the proxy to the simulator: the caller's
`X-Request-Id` (or its `traceparent`'s trace id, or a new id) reaches the upstream, comes
back on every answer, the proxy's own errors included, and is on the request's access line
and on every event line logged while the request is handled."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from proxy.harness.tokens import bearer
from tests.conftest import SIM_CLIENT_ID
from tests.support.installs import install_via_start
from tests.support.json_logs import LogLines, json_log_lines

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "requestIds01"
CALLER = bearer(LOCATION)
NEW_ID = re.compile(r"[0-9a-f]{32}")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"



@pytest.fixture
def log_lines() -> Iterator[LogLines]:
    """The JSON lines the proxy's handler would write (INFO and up), as dicts."""
    with json_log_lines() as lines:
        yield lines


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def access_line(lines: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The one access line for `path`."""
    found = [line for line in lines if line["logger"] == "proxy.access" and line["path"] == path]
    assert len(found) == 1, found
    return found[0]


def received(echo: dict[str, Any]) -> dict[str, str]:
    """The headers a simulator echo says it received, by lower-case name."""
    return {name.lower(): value for name, value in echo["headers"].items()}


async def echoed(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """GET `url` (a simulator echo through the proxy): the answer's X-Request-Id and the
    headers the simulator received, by lower-case name."""
    async with http.get(url, headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        return answer.headers["X-Request-Id"], received(await answer.json())


async def test_new_id_when_caller_sends_none(simulator, start_proxy, http, log_lines) -> None:
    """No id sent: the proxy makes one (32 hex digits), a different one per request, and
    the upstream, the caller and the access line all see the same one."""
    proxy = await start_proxy(simulator.url)
    first, seen = await echoed(http, f"{proxy.url}/_sim/echo/one", CALLER)
    second, _ = await echoed(http, f"{proxy.url}/_sim/echo/two", CALLER)
    assert NEW_ID.fullmatch(first) and NEW_ID.fullmatch(second) and first != second
    assert seen["x-request-id"] == first
    lines = log_lines()
    assert access_line(lines, "/_sim/echo/one")["request_id"] == first
    assert access_line(lines, "/_sim/echo/two")["request_id"] == second


async def test_caller_id_is_kept(simulator, start_proxy, http, log_lines) -> None:
    """A printable X-Request-Id from the caller is the request's id, end to end."""
    proxy = await start_proxy(simulator.url)
    sent = "order-7/retry 2:" + "x" * 184  # 200 characters, spaces and punctuation included
    answered, seen = await echoed(
        http, f"{proxy.url}/_sim/echo/kept", {**CALLER, "X-Request-Id": sent}
    )
    assert answered == sent and seen["x-request-id"] == sent
    assert access_line(log_lines(), "/_sim/echo/kept")["request_id"] == sent


async def test_trace_id_of_traceparent_is_the_id(simulator, start_proxy, http, log_lines) -> None:
    """No X-Request-Id but a W3C traceparent: its trace id is the request's id, and the
    traceparent itself still reaches the upstream unchanged (tracing is off)."""
    proxy = await start_proxy(simulator.url)
    answered, seen = await echoed(
        http, f"{proxy.url}/_sim/echo/traced", {**CALLER, "traceparent": TRACEPARENT}
    )
    assert answered == TRACE_ID and seen["x-request-id"] == TRACE_ID
    assert seen["traceparent"] == TRACEPARENT
    assert access_line(log_lines(), "/_sim/echo/traced")["request_id"] == TRACE_ID


@pytest.mark.parametrize(
    "sent",
    ["y" * 201, "tab\there", "caf\u00e9-42", "", "pit-0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"],
    ids=["too-long", "control-character", "not-ascii", "empty", "a-pit-token"],
)
async def test_unacceptable_id_is_replaced(simulator, start_proxy, http, log_lines, sent) -> None:
    """An X-Request-Id that is too long, not printable ASCII, empty or a token is replaced
    by a new id: the caller's value reaches neither the upstream nor the answer nor the log."""
    proxy = await start_proxy(simulator.url)
    answered, seen = await echoed(
        http, f"{proxy.url}/_sim/echo/replaced", {**CALLER, "X-Request-Id": sent}
    )
    assert NEW_ID.fullmatch(answered)
    assert seen["x-request-id"] == answered
    lines = log_lines()
    assert access_line(lines, "/_sim/echo/replaced")["request_id"] == answered
    if sent:
        assert not [line for line in lines if any(sent in str(v) for v in line.values())]


async def test_bad_id_falls_back_to_traceparent(simulator, start_proxy, http) -> None:
    """A refused X-Request-Id beside a valid traceparent: the trace id is the request's id."""
    proxy = await start_proxy(simulator.url)
    headers = {**CALLER, "X-Request-Id": "z" * 300, "traceparent": TRACEPARENT}
    answered, seen = await echoed(http, f"{proxy.url}/_sim/echo/fallback", headers)
    assert answered == TRACE_ID == seen["x-request-id"]


async def test_resend_and_refresh_lines_carry_the_id(
    simulator, start_proxy, http, log_lines
) -> None:
    """Lines logged deep inside one request carry its id: the token manager's refresh
    after `Invalid JWT` (a task of its own) and the forwarder's resend; lines about
    anything else (the install before it) carry another id or none."""
    simulator.state.set_limits({"burst": 100_000})
    proxy = await start_proxy(simulator.url, limits={"burst": {"requests": 100_000}})
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)
    simulator.state.expire_tokens(f"{APP_ID}:location:{LOCATION}")
    headers = {"X-HoopAI-Location-Id": LOCATION, "X-Request-Id": "refresh-me-1"}
    async with http.get(f"{proxy.url}/contacts/", headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        assert answer.headers["X-Request-Id"] == "refresh-me-1"
        assert received(await answer.json())["x-request-id"] == "refresh-me-1"
    assert simulator.state.stats()["refreshes"] == 1
    lines = log_lines()
    refreshed = [line for line in lines if line["msg"].startswith("refreshed token")]
    resent = [line for line in lines if line["msg"].startswith("resending a request")]
    assert [line.get("request_id") for line in refreshed + resent] == ["refresh-me-1"] * 2
    installed = [line for line in lines if line["msg"].startswith("installed token")]
    assert installed and all(line.get("request_id") != "refresh-me-1" for line in installed)
    assert access_line(lines, "/contacts/")["request_id"] == "refresh-me-1"


async def test_upstream_429_resend_line_carries_the_id(
    simulator, start_proxy, http, log_lines
) -> None:
    """The resend after the upstream's 429 is logged with the request's id, and the one
    answer the caller gets carries it."""
    # The pause after a 429 lasts the upstream's interval: a short one keeps this quick.
    simulator.state.set_limits({"burst": 100_000, "interval_ms": 200})
    token = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"]
    proxy = await start_proxy(
        simulator.url, limits={"burst": {"requests": 100_000, "interval_ms": 200}}
    )
    simulator.state.set_faults({"force_429": 1})
    headers = {"Authorization": f"Bearer {token}", "X-Request-Id": "resend-me-1"}
    async with http.get(f"{proxy.url}/contacts/", headers=headers) as answer:
        assert answer.status == 200, await answer.text()
        assert answer.headers["X-Request-Id"] == "resend-me-1"
    assert simulator.state.stats()["forced_429"] == 1
    resent = [line for line in log_lines() if line["msg"].startswith("resending a request")]
    assert [(line["request_id"], line["msg"].endswith("rate_limited")) for line in resent] == [
        ("resend-me-1", True)
    ]


async def test_proxy_429_carries_the_id(simulator, start_proxy, http, log_lines) -> None:
    """The proxy's own 429 (never sent upstream) carries the caller's id, and so does its
    access line."""
    proxy = await start_proxy(simulator.url, limits={"burst": {"requests": 1}})
    for index in range(2):
        headers = {**CALLER, "X-HoopAI-Max-Wait-Ms": "0", "X-Request-Id": f"limit-{index}"}
        async with http.get(f"{proxy.url}/_sim/echo/limited", headers=headers) as answer:
            await answer.read()
            assert answer.headers["X-Request-Id"] == f"limit-{index}"
    assert (answer.status, (await answer.json())["error"]) == (429, "rate_limited")
    lines = [line for line in log_lines() if line["logger"] == "proxy.access"]
    assert [(line["status"], line["request_id"]) for line in lines] == [
        (200, "limit-0"),
        (429, "limit-1"),
    ]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/contacts/", {}, 400),  # no resource named: resource_unresolved
        ("/_proxy/healthz", {}, 200),
        ("/_proxy/nowhere", {}, 404),
        ("/_proxy/oauth/start", {}, 302),  # raised by the install flow, not returned
    ],
    ids=["400", "healthz", "404", "redirect"],
)
async def test_every_own_answer_carries_an_id(
    simulator, start_proxy, http, path, headers, status
) -> None:
    """The proxy's own answers, errors and /_proxy/ endpoints alike, carry X-Request-Id:
    the caller's when sent, else a new one."""
    proxy = await start_proxy(simulator.url)
    async with http.get(f"{proxy.url}{path}", headers=headers, allow_redirects=False) as answer:
        assert answer.status == status
        assert NEW_ID.fullmatch(answer.headers["X-Request-Id"])
    sent = {**headers, "X-Request-Id": f"own-{status}"}
    async with http.get(f"{proxy.url}{path}", headers=sent, allow_redirects=False) as answer:
        assert (answer.status, answer.headers["X-Request-Id"]) == (status, f"own-{status}")


async def test_streamed_answer_carries_the_id(simulator, start_proxy, http) -> None:
    """A large answer (over the 64 KiB relayed in one write) is streamed, its headers sent
    before the edge sees the answer: it carries the id all the same."""
    proxy = await start_proxy(simulator.url)
    headers = {**CALLER, "X-Request-Id": "streamed-1"}
    url = f"{proxy.url}/_sim/download?bytes={300 * 1024}"
    async with http.get(url, headers=headers) as answer:
        assert len(await answer.read()) == 300 * 1024
        assert answer.headers["X-Request-Id"] == "streamed-1"


async def test_upstream_id_gives_way_to_the_requests(simulator, start_proxy, http) -> None:
    """An upstream answer with an X-Request-Id of its own reaches the caller with the
    request's id instead: the caller correlates on the id it sent (or was given)."""
    proxy = await start_proxy(simulator.url)
    headers = {**CALLER, "X-Request-Id": "mine-1"}
    url = f"{proxy.url}/_sim/headers?X-Request-Id=upstreams-own"
    async with http.get(url, headers=headers) as answer:
        await answer.read()
        assert answer.headers.getall("X-Request-Id") == ["mine-1"]
