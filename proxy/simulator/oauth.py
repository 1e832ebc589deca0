"""The OAuth endpoints: ``/oauth/token``, ``/oauth/locationToken``, ``/oauth/installedLocations``.

Each answer is decided (codes spent, refresh tokens rotated) BEFORE the optional
``token_latency_ms`` sleep, as on the real server, where a rotation is done even when its
answer is then lost: a test can kill a client mid-refresh and see the old token dead.
The ``oauth_errors`` fault answers the next N calls with ``error_status`` before anything
is decided (the token endpoint down for a while).

``/oauth/installedLocations`` follows HighLevel's spec (GetInstalledLocationsSuccessfulResponseDto):
``companyId`` and ``appId`` are required (422 without them), ``skip`` and ``limit``
(default 20) page the list, ``isInstalled=true|false`` filters it; the answer is
``{"locations": [{"_id", "name", "address", "isInstalled"}], "count": <all that match>,
"installToFutureLocations": bool}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from aiohttp import web

from proxy.simulator.state import SIMULATOR, Simulator
from proxy.simulator.tokens import GrantError, Install, grant_json
from proxy.simulator.wire import error_response

# The v3 token endpoint's camelCase fields, and the snake_case names they stand for.
_CAMEL_FIELDS = {
    "clientId": "client_id",
    "clientSecret": "client_secret",
    "grantType": "grant_type",
    "refreshToken": "refresh_token",
    "userType": "user_type",
    "redirectUri": "redirect_uri",
}
NOT_ALLOWED = (
    "This authClass type is not allowed to access this scope. "
    "Please reach out to the Platform team to get it added."
)


async def read_form(request: web.Request) -> dict[str, str]:
    """The form (or JSON) fields, camelCase names mapped to snake_case; snake_case wins."""
    data: Mapping[str, object]
    if request.content_type == "application/json":
        try:
            loaded = await request.json() if request.body_exists else {}
        except ValueError:
            loaded = {}
        data = loaded if isinstance(loaded, dict) else {}
    else:
        data = await request.post()
    fields = {key: value for key, value in data.items() if isinstance(value, str)}
    for camel, snake in _CAMEL_FIELDS.items():
        if snake not in fields and camel in fields:
            fields[snake] = fields[camel]
    return fields


@contextmanager
def _answering(sim: Simulator) -> Iterator[None]:
    """Count one OAuth call in flight until its answer is returned (or it is cancelled)."""
    counters = sim.counters  # a reset meanwhile must not make the new counters negative
    counters.oauth_in_flight += 1
    counters.max_oauth_in_flight = max(counters.max_oauth_in_flight, counters.oauth_in_flight)
    try:
        yield
    finally:
        counters.oauth_in_flight -= 1


def _injected_error(sim: Simulator) -> web.Response | None:
    """The ``oauth_errors`` fault's answer, while it lasts."""
    if sim.faults.oauth_errors <= 0:
        return None
    sim.faults.oauth_errors -= 1
    sim.counters.oauth_errors += 1
    status = sim.faults.error_status
    return error_response(status, "Injected token endpoint failure", error="Service Unavailable")


async def _token_latency(sim: Simulator) -> None:
    if sim.faults.token_latency_ms > 0:
        await asyncio.sleep(sim.faults.token_latency_ms / 1000)


def _invalid_client() -> web.Response:
    body = {"error": "UnAuthorized!", "error_description": "Invalid client credentials!"}
    return web.json_response(body, status=401)


def _exchange_code(sim: Simulator, client_id: str, code: str) -> web.Response:
    try:
        pair = sim.tokens.redeem_code(
            code, client_id, sim.now(), sim.config.access_token_lifetime_s
        )
    except GrantError:
        sim.counters.invalid_codes += 1
        return error_response(
            400, "Invalid grant: authorization code is invalid", error="invalid_grant"
        )
    sim.counters.codes_exchanged += 1
    return web.json_response(grant_json(pair))


def _is_inactive(sim: Simulator, install: Install) -> bool:
    return install.user_type == "Location" and install.location_id in sim.faults.inactive_locations


def _refresh(sim: Simulator, client_id: str, refresh_token: str) -> web.Response:
    grant = sim.tokens.refresh_grant(refresh_token)
    if grant is not None and grant.alive and _is_inactive(sim, grant.install):
        # Temporary on the real server: the token is NOT used up.
        sim.counters.inactive_location_refusals += 1
        return error_response(400, "Location is not active")
    config = sim.config
    try:
        pair = sim.tokens.rotate(
            refresh_token,
            client_id,
            sim.now(),
            config.access_token_lifetime_s,
            config.refresh_token_lifetime_s,
        )
    except GrantError as exc:
        if exc.reason == "dead_refresh":
            sim.counters.dead_refresh_token_uses += 1
        else:
            sim.counters.unknown_refresh_tokens += 1
        return error_response(400, "Invalid grant: refresh token is invalid", error="invalid_grant")
    sim.counters.refreshes += 1
    sim.counters.resource(pair.install.resource).refreshes += 1
    return web.json_response(grant_json(pair))


def token_answer(sim: Simulator, form: Mapping[str, str]) -> web.Response:
    """Decide a /oauth/token request: credentials, then the grant."""
    client_id = form.get("client_id", "")
    if not sim.client_ok(client_id, form.get("client_secret", "")):
        return _invalid_client()
    grant_type = form.get("grant_type")
    if grant_type == "authorization_code":
        return _exchange_code(sim, client_id, form.get("code", ""))
    if grant_type == "refresh_token":
        return _refresh(sim, client_id, form.get("refresh_token", ""))
    return error_response(
        400, f"Unsupported grant type: {grant_type!r}", error="unsupported_grant_type"
    )


async def token_handler(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    with _answering(sim):
        form = await read_form(request)
        sim.counters.token_requests += 1
        if sim.faults.token_accept_delay_ms > 0:
            await asyncio.sleep(sim.faults.token_accept_delay_ms / 1000)
        answer = _injected_error(sim) or token_answer(sim, form)
        await _token_latency(sim)
        return answer


def _company_install(sim: Simulator, request: web.Request) -> Install | web.Response:
    """The Company install behind the request's bearer token, or the error answer."""
    if "Version" not in request.headers:
        return error_response(401, "version header was not found.")
    grant = sim.authenticate(request.headers.get("Authorization"))
    if grant is None:
        sim.counters.invalid_jwt += 1
        return error_response(401, "Invalid JWT")
    if grant.install.user_type != "Company":
        return error_response(401, NOT_ALLOWED)
    return grant.install


def location_token_answer(
    sim: Simulator, company: Install, form: Mapping[str, str]
) -> web.Response:
    """Mint a Location token from a Company install, if it covers that location."""
    location_id = form.get("locationId") or form.get("location_id") or ""
    company_id = form.get("companyId") or form.get("company_id") or ""
    if not location_id or not company_id:
        return error_response(400, "companyId and locationId are required", error="Bad Request")
    if company_id != company.company_id:
        return error_response(400, "The token does not belong to this company", error="Bad Request")
    if not sim.approves(company, location_id) or location_id in sim.faults.unknown_locations:
        return error_response(400, "The app is not installed on this location", error="Bad Request")
    if location_id in sim.faults.inactive_locations:
        return error_response(400, "Location is not active")
    pair = sim.tokens.issue(
        company.for_location(location_id), sim.now(), sim.config.access_token_lifetime_s
    )
    sim.counters.location_tokens_minted += 1
    body = grant_json(pair)
    body.pop("isBulkInstallation")
    return web.json_response(body)


async def location_token_handler(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    with _answering(sim):
        sim.counters.location_token_requests += 1
        company = _company_install(sim, request)
        form = await read_form(request)
        answer = _injected_error(sim) or (
            company
            if isinstance(company, web.Response)
            else location_token_answer(sim, company, form)
        )
        await _token_latency(sim)
        return answer


def installed_locations_answer(
    sim: Simulator, company: Install, query: Mapping[str, str]
) -> web.Response:
    """The locations a Company install approved, one page of them (none listed: none known
    here). Every location the simulator knows of a company is one the app is installed on."""
    company_id, app_id = query.get("companyId", ""), query.get("appId", "")
    if not company_id or not app_id:
        missing = [
            name for name, value in (("companyId", company_id), ("appId", app_id)) if not value
        ]
        return web.json_response(
            {
                "statusCode": 422,
                "message": [f"{name} should not be empty" for name in missing],
                "error": "Unprocessable Entity",
            },
            status=422,
        )
    if company_id != company.company_id or app_id != company.app_id:
        return error_response(
            400, "companyId or appId does not match the token", error="Bad Request"
        )
    try:
        skip, limit = _page(query)
    except ValueError as exc:
        return web.json_response(
            {"statusCode": 422, "message": [str(exc)], "error": "Unprocessable Entity"},
            status=422,
        )
    listed = sim.approved_locations(company)
    if query.get("isInstalled") == "false":
        listed = ()  # every location the simulator knows of has the app installed
    locations = [
        {
            "_id": location_id,
            "name": f"Simulated location {location_id}",
            "address": "",
            "isInstalled": True,
        }
        for location_id in listed[skip : skip + limit]
    ]
    return web.json_response(
        {"locations": locations, "count": len(listed), "installToFutureLocations": False}
    )


DEFAULT_PAGE = 20


def _page(query: Mapping[str, str]) -> tuple[int, int]:
    """``skip`` and ``limit`` from the query (strings, as HighLevel's spec has them)."""
    values = []
    for name, default in (("skip", 0), ("limit", DEFAULT_PAGE)):
        text = query.get(name, str(default))
        if not text.isdigit():
            raise ValueError(f"{name} must be a number string")
        values.append(int(text))
    if values[1] < 1:
        raise ValueError("limit must be at least 1")
    return values[0], values[1]


async def installed_locations_handler(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    sim.counters.installed_locations_requests += 1
    company = _injected_error(sim) or _company_install(sim, request)
    if not isinstance(company, web.Response):
        company = installed_locations_answer(sim, company, request.query)
    await _token_latency(sim)
    return company


def routes() -> list[web.RouteDef]:
    return [
        web.post("/oauth/token", token_handler),
        web.post("/oauth/locationToken", location_token_handler),
        web.get("/oauth/installedLocations", installed_locations_handler),
    ]
