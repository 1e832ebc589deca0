"""The front door as an attacker meets it (issue 7): no managed token leaves through the
API's credential endpoints, a pass-through token is limited as the resource it is for,
callers are held to their apps, and bad input gets a 4xx JSON answer, never a 500.

Everything runs over real HTTP against the proxy app and the simulator."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.admin import create_admin_app
from proxy.harness.tokens import location_jwt
from proxy.http_errors import answer_errors_as_json
from proxy.jwt import b64url
from proxy.server import bind_socket, start_server
from tests.conftest import SIM_CLIENT_ID

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
CALLER_KEY = "front-door-caller-key"
OTHER_APP = {"name": "other", "client_id": "7777bbbb-other01", "client_secret": "other-secret"}
ROOMY = {"limits": {"burst": {"requests": 100_000}}}
UNSOLICITED = {"tokens": {"accept_unsolicited_installs": True}}


def caller(allow: list[str], apps: list[str] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "crm",
        "key_sha256": hashlib.sha256(CALLER_KEY.encode()).hexdigest(),
        "allow": allow,
    }
    if apps is not None:
        entry["apps"] = apps
    return {"callers": [entry]}


async def install_company(http: aiohttp.ClientSession, proxy_url: str, simulator) -> None:
    """A Company install the proxy holds (approving LOCA and LOCV), through the callback."""
    code, _ = simulator.state.install(
        SIM_CLIENT_ID, user_type="Company", company_id="COMPX", approved_locations=["LOCA"]
    )
    async with http.get(f"{proxy_url}/_proxy/oauth/callback?code={code}") as answer:
        assert answer.status == 200, await answer.text()


async def send(
    http: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kwargs) as answer:
        text = await answer.text()
        try:
            return answer.status, json.loads(text)
        except ValueError:
            return answer.status, {"text": text}


# -- finding 1: managed tokens never go to the credential endpoints ----------------------

CREDENTIAL_TARGETS = [
    "/oauth/locationToken",
    "/OAuth/locationToken",
    "//oauth/locationToken",
    "/%6Fauth/locationToken",
    "/%256Fauth/locationToken",
    "/x/../oauth/locationToken",
    "/./oauth;v=1/locationToken",
    "/oauth/installedLocations?companyId=COMPX&appId=" + APP_ID,
    "/oauth/token",
]


@pytest.mark.parametrize("target", CREDENTIAL_TARGETS)
@pytest.mark.parametrize("with_callers", [False, True])
async def test_managed_token_never_reaches_a_credential_endpoint(
    simulator, start_proxy, http, target: str, with_callers: bool
) -> None:
    """POST /oauth/locationToken (in every spelling) with the proxy's Company token would
    hand the caller a token for any location: 403 credential_path_refused, nothing sent,
    with no callers and with a caller allowed only that company."""
    overrides: dict[str, Any] = {**ROOMY, **UNSOLICITED}
    headers = {"X-HoopAI-Company-Id": "COMPX"}
    if with_callers:
        overrides.update(caller(["company:COMPX"]))
        headers["X-HoopAI-Proxy-Key"] = CALLER_KEY
    proxy = await start_proxy(simulator.url, **overrides)
    await install_company(http, proxy.url, simulator)
    minted = simulator.state.stats()["location_tokens_minted"]
    status, body = await send(
        http,
        "POST",
        URL(f"{proxy.url}{target}", encoded=True),  # sent byte for byte, not normalised
        headers={**headers, "Content-Type": "application/x-www-form-urlencoded"},
        data="companyId=COMPX&locationId=LOCV",
    )
    assert (status, body.get("error")) == (403, "credential_path_refused"), body
    assert "access_token" not in json.dumps(body)
    assert simulator.state.stats()["location_tokens_minted"] == minted


async def test_own_agency_token_may_mint_through_the_proxy(simulator, start_proxy, http) -> None:
    """A caller that brings its own HighLevel Company token is passed through to
    /oauth/locationToken: it is the caller's credential, not the proxy's."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    own = simulator.state.grant(
        SIM_CLIENT_ID, user_type="Company", company_id="COMPY", approved_locations=["LOCY"]
    )
    status, body = await send(
        http,
        "POST",
        f"{proxy.url}/oauth/locationToken",
        headers={
            "Authorization": f"Bearer {own['access_token']}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        data="companyId=COMPY&locationId=LOCY",
    )
    assert status == 200, body
    assert body["locationId"] == "LOCY"


# -- finding 3: a pass-through request is keyed by its token's resource -------------------


@pytest.mark.parametrize(
    ("where", "request_kwargs"),
    [
        ("header", {"headers": {"X-HoopAI-Location-Id": "LOCV"}}),
        ("header", {"headers": {"X-HoopAI-Company-Id": "COMPX"}}),
        ("query", {"params": {"locationId": "LOCV"}}),
        ("path", {"path": "/locations/LOCV/customFields"}),
        ("JSON body", {"json": {"locationId": "LOCV", "name": "x"}}),
    ],
)
async def test_passthrough_naming_another_resource_is_refused(
    simulator, start_proxy, http, where: str, request_kwargs: dict[str, Any]
) -> None:
    """One's own (exhausted) token sent with another location named anywhere used to be
    limited, and paused, as that location: now a 400 that names both, and nothing sent."""
    proxy = await start_proxy(simulator.url)
    own = simulator.state.grant(SIM_CLIENT_ID, location_id="LOCA")["access_token"]
    path = request_kwargs.pop("path", "/contacts/")
    headers = {"Authorization": f"Bearer {own}", **request_kwargs.pop("headers", {})}
    before = simulator.state.stats()["requests"]
    status, body = await send(http, "POST", f"{proxy.url}{path}", headers=headers, **request_kwargs)
    assert (status, body["error"]) == (400, "bad_request"), body
    assert where in body["message"] and "LOCA" in body["message"]
    assert simulator.state.stats()["requests"] == before


async def test_upstream_429_to_a_passthrough_pauses_only_its_own_resource(
    simulator, start_proxy, http
) -> None:
    """An exhausted token of LOCA gets a 429 upstream; LOCV's managed traffic is not
    paused by it (the forged header is refused, and the 429 is keyed to LOCA)."""
    simulator.state.set_limits({"burst": 2})
    proxy = await start_proxy(simulator.url, **UNSOLICITED)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="LOCV")
    async with http.get(f"{proxy.url}/_proxy/oauth/callback?code={code}") as answer:
        assert answer.status == 200
    own = simulator.state.grant(SIM_CLIENT_ID, location_id="LOCA")["access_token"]
    mine = {"Authorization": f"Bearer {own}", "X-HoopAI-Max-Wait-Ms": "0"}
    statuses = [
        (await send(http, "GET", f"{proxy.url}/contacts/?i={i}", headers=mine))[0] for i in range(4)
    ]
    assert statuses[:2] == [200, 200] and set(statuses[2:]) == {429}
    forged = {**mine, "X-HoopAI-Location-Id": "LOCV"}
    assert (await send(http, "GET", f"{proxy.url}/contacts/", headers=forged))[0] == 400
    located = {"X-HoopAI-Location-Id": "LOCV", "X-HoopAI-Max-Wait-Ms": "0"}
    status, body = await send(http, "GET", f"{proxy.url}/contacts/", headers=located)
    assert status == 200, body


async def test_token_of_an_unconfigured_app_is_refused_and_keys_nothing(
    simulator, start_proxy, http
) -> None:
    """A JWT naming an app the proxy is not configured for (say with a 1.5 KB app id) is a
    400 before any limiter state exists for it; X-HoopAI-App cannot re-label a token."""
    proxy = await start_proxy(simulator.url)
    forged = location_jwt("LOCV", client_id="x" * 1500 + "-forged")
    status, body = await send(
        http, "GET", f"{proxy.url}/contacts/", headers={"Authorization": f"Bearer {forged}"}
    )
    assert status == 400 and "not configured" in body["message"]
    relabelled = {"Authorization": f"Bearer {forged}", "X-HoopAI-App": "main"}
    assert (await send(http, "GET", f"{proxy.url}/contacts/", headers=relabelled))[0] == 400
    assert simulator.state.stats()["requests"] == 0


async def test_private_integration_token_is_not_counted_against_the_app(
    simulator, start_proxy, http
) -> None:
    """A pit- token belongs to no marketplace app: its requests do not use the configured
    app's slots for the location they name."""
    proxy = await start_proxy(
        simulator.url, limits={"burst": {"requests": 1, "interval_ms": 60_000}}, **UNSOLICITED
    )
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id="LOCV")
    async with http.get(f"{proxy.url}/_proxy/oauth/callback?code={code}") as answer:
        assert answer.status == 200
    pit = {"Authorization": "Bearer pit-not-a-real-one", "X-HoopAI-Location-Id": "LOCV"}
    await send(http, "GET", f"{proxy.url}/_sim/echo/x", headers=pit)
    managed = {"X-HoopAI-Location-Id": "LOCV", "X-HoopAI-Max-Wait-Ms": "0"}
    status, body = await send(http, "GET", f"{proxy.url}/contacts/", headers=managed)
    assert status == 200, body


# -- finding 8: callers have an app dimension ----------------------------------------------


async def test_caller_limited_to_its_apps(simulator, start_proxy, http) -> None:
    """A caller allowed app `main` cannot pick app `other` with X-HoopAI-App (403), nor
    pass through a token of `other`; with `main` it gets through."""
    proxy = await start_proxy(
        simulator.url,
        apps=[
            {"name": "main", "client_id": SIM_CLIENT_ID, "client_secret": "sim-secret"},
            OTHER_APP,
        ],
        **caller(["location:LOCA"], apps=["main"]),
    )
    key = {"X-HoopAI-Proxy-Key": CALLER_KEY, "X-HoopAI-Location-Id": "LOCA"}
    status, body = await send(
        http, "GET", f"{proxy.url}/_sim/echo/x", headers={**key, "X-HoopAI-App": "other"}
    )
    assert (status, body["error"]) == (403, "resource_forbidden")
    assert "app 'other'" in body["message"]
    other_token = location_jwt("LOCA", client_id=OTHER_APP["client_id"])
    status, body = await send(
        http,
        "GET",
        f"{proxy.url}/_sim/echo/x",
        headers={"X-HoopAI-Proxy-Key": CALLER_KEY, "Authorization": f"Bearer {other_token}"},
    )
    assert (status, body["error"]) == (403, "resource_forbidden")
    main_token = location_jwt("LOCA")
    status, _ = await send(
        http,
        "GET",
        f"{proxy.url}/_sim/echo/x",
        headers={"X-HoopAI-Proxy-Key": CALLER_KEY, "Authorization": f"Bearer {main_token}"},
    )
    assert status == 200


# -- finding 6: bad input is a 4xx JSON answer, never a 500 -------------------------------


async def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send raw bytes (headers aiohttp's client would refuse to send) and read the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def head(target: str, *lines: bytes, length: int = 0) -> bytes:
    fields = [f"GET {target} HTTP/1.1".encode(), b"Host: proxy", b"Connection: close", *lines]
    if length:
        fields.append(f"Content-Length: {length}".encode())
    return b"\r\n".join(fields) + b"\r\n"


@pytest.mark.parametrize(
    ("line", "with_key"),
    [
        (b"X-HoopAI-Proxy-Key: \xff\xfe", False),
        (b"Authorization: Bearer \xff\xfe", False),
        (b"X-Custom: \xff\xfe", True),
    ],
)
async def test_non_utf8_header_bytes_are_a_4xx(
    simulator, start_proxy, line: bytes, with_key: bool
) -> None:
    """Bytes that are not UTF-8 in a caller key, a bearer or any header: 4xx JSON."""
    proxy = await start_proxy(simulator.url, **caller(["*"]))
    key = [f"X-HoopAI-Proxy-Key: {CALLER_KEY}".encode()] if with_key else []
    status, body = await raw_request(
        proxy.url, head("/_sim/echo/x", b"X-HoopAI-Location-Id: LOCA", *key, line)
    )
    assert 400 <= status < 500, body
    assert json.loads(body)["statusCode"] == status


async def test_non_utf8_admin_authorization_is_a_401(simulator, start_proxy) -> None:
    """The admin listener with a token: a non-UTF-8 Authorization is 401, not 500."""
    proxy = await start_proxy(simulator.url, admin={"token": "admin-token-for-test"})
    admin = await start_server(
        create_admin_app(proxy.runner.app), bind_socket("127.0.0.1", 0), grace_s=1
    )
    try:
        status, body = await raw_request(
            admin.url, head("/status.json", b"Authorization: Bearer \xff\xfe")
        )
    finally:
        await admin.stop()
    assert status == 401 and json.loads(body)["error"] == "caller_unauthenticated"


@pytest.mark.parametrize("located", [True, False])
async def test_deeply_nested_json_body_is_not_a_500(
    simulator, start_proxy, http, located: bool
) -> None:
    """A JSON body nested 100,000 deep: not parsed at all when a header names the
    resource (resolution stops at the first rule that answers); a 400 otherwise."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    headers = {"Content-Type": "application/json", **location_headers(located)}
    body = b"[" * 100_000 + b"]" * 100_000
    status, answer = await send(
        http, "POST", f"{proxy.url}/_sim/echo/x", headers=headers, data=body
    )
    if located:
        assert status == 200, answer
    else:
        assert (status, answer["error"]) == (400, "resource_unresolved")


def location_headers(located: bool) -> dict[str, str]:
    """A private integration token (passed through, no install needed), and the header."""
    pit = {"Authorization": "Bearer pit-for-the-nested-body-test"}
    return {**pit, "X-HoopAI-Location-Id": "LOCA"} if located else pit


async def test_jwt_payload_nested_too_deep_is_not_a_500(simulator, start_proxy, http) -> None:
    """A bearer whose payload is 5,000 `[`: not a HighLevel token, so not passed through;
    the answer is a 4xx JSON error, not a 500."""
    proxy = await start_proxy(simulator.url)
    token = f"{b64url(b'{}')}.{b64url(b'[' * 5000)}.c2ln"
    status, body = await send(
        http, "GET", f"{proxy.url}/contacts/", headers={"Authorization": f"Bearer {token}"}
    )
    assert 400 <= status < 500 and body["statusCode"] == status


async def test_unexpected_exception_is_json_internal_error_with_one_log_line(
    caplog: pytest.LogCaptureFixture, http
) -> None:
    """Whatever fails unexpectedly behind the proxy's middleware is a JSON 500
    `internal_error` and one log line naming the type, never the exception's message."""

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret-in-exception-message")

    app = web.Application(middlewares=[answer_errors_as_json()])
    app.router.add_get("/boom", boom)
    server = await start_server(app, bind_socket("127.0.0.1", 0), grace_s=1, access_log=False)
    try:
        status, body = await send(http, "GET", f"{server.url}/boom")
    finally:
        await server.stop()
    assert (status, body["error"]) == (500, "internal_error")
    lines = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and "RuntimeError" in lines[0].getMessage()
    assert "secret-in-exception-message" not in caplog.text
