"""The generic API endpoint: every path outside ``/oauth/`` and ``/_sim/``, any method.

Checks run in the real API's order: connection faults (drop, latency), the arrival delay
(a random wait before anything is counted: the varying one-way delay between a sender and
the real API's counter), the ``Version`` header, the bearer token, the token's class
(``/companies/...`` is for agency tokens only, as the real API's company endpoints are),
the limits of the token's resource, then answer faults (5xx, "Command timed out"), and
finally a 200 echo of the request. Every answer from the limit stage on carries the five
``X-RateLimit-*`` headers, computed after this request.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from aiohttp import web

from proxy.simulator.echo import echo
from proxy.simulator.oauth import NOT_ALLOWED
from proxy.simulator.state import SIMULATOR, Simulator, Verdict
from proxy.simulator.tokens import AccessGrant
from proxy.simulator.wire import error_response

_RESERVED_PREFIXES = ("/oauth/", "/_sim/")
_AGENCY_ONLY_PREFIX = "/companies/"


async def drop_connection(request: web.Request) -> web.StreamResponse:
    """Read the whole request, then close the connection without a byte of answer.

    This is the ambiguous failure a client cannot tell from "processed, answer lost": the
    request went out in full, so a client that resends it on its own (aiohttp does, for an
    idempotent method) sends it twice. The returned response is never sent: aiohttp fails
    to write it to the closed transport, treats that as a client disconnect and ends the
    connection quietly.
    """
    async for _ in request.content.iter_any():
        pass  # read and forget: a dropped request's body is never kept
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


def _auth_json(grant: AccessGrant) -> dict[str, str]:
    install = grant.install
    return {
        "authClass": install.user_type,
        "authClassId": install.auth_class_id,
        "client": install.app_id,
    }


def _answer_fault(sim: Simulator, headers: dict[str, str]) -> web.Response | None:
    """A 5xx or "Command timed out" answer when the dice say so, else ``None``."""
    if sim.dice.roll(sim.faults.error_ratio):
        sim.counters.faults_5xx += 1
        status = sim.faults.error_status
        return error_response(status, HTTPStatus(status).phrase, headers=headers)
    if sim.dice.roll(sim.faults.command_timeout_ratio):
        sim.counters.command_timeouts += 1
        return error_response(401, "Command timed out", headers=headers)
    return None


async def api_handler(request: web.Request) -> web.StreamResponse:
    if request.path.startswith(_RESERVED_PREFIXES):
        return error_response(404, f"Cannot {request.method} {request.path}", error="Not Found")
    sim = request.app[SIMULATOR]
    received_at = sim.now()
    sim.counters.arrived(request.method)
    if sim.dice.roll(sim.faults.drop_ratio):
        sim.counters.dropped_one(request.method)
        return await drop_connection(request)
    if sim.faults.latency_ms > 0:
        await asyncio.sleep(sim.faults.latency_ms / 1000)
    delay_s = sim.dice.delay_s(sim.faults.arrival_delay_ms)
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    if "Version" not in request.headers:
        sim.counters.missing_version += 1
        return error_response(401, "version header was not found.")
    grant = sim.authenticate(request.headers.get("Authorization"))
    if grant is None:
        sim.counters.invalid_jwt += 1
        return error_response(401, "Invalid JWT")
    if request.path.startswith(_AGENCY_ONLY_PREFIX) and grant.install.user_type != "Company":
        return error_response(401, NOT_ALLOWED)
    verdict, view = sim.gate(grant.install.resource, received_at=received_at, delay_s=delay_s)
    headers = view.headers()
    if verdict is not Verdict.ADMITTED:
        return error_response(429, "Too many requests", error="Too Many Requests", headers=headers)
    fault = _answer_fault(sim, headers)
    if fault is not None:
        return fault
    return web.json_response(await echo(request, _auth_json(grant)), headers=headers)


def routes() -> list[web.RouteDef]:
    """The catch-all route; register it after every other one."""
    return [web.route("*", "/{tail:.*}", api_handler)]
