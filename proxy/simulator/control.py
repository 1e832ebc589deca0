"""The control endpoints under ``/_sim/``: installs, stats, faults, limits, clock, reset.

JSON in, JSON out. Each endpoint is a plain function of the state and the request's JSON
object; one wrapper reads the body and turns a ``ValueError`` (a bad field) into a 400.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.simulator.state import SIMULATOR, Simulator
from proxy.simulator.wire import bad_request, read_json_object

Json = dict[str, object]
ControlOp = Callable[[Simulator, Json], Json]


def _optional_str(data: Json, key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}: must be a string, got {value!r}")
    return value


def _required_str(data: Json, key: str) -> str:
    value = _optional_str(data, key)
    if not value:
        raise ValueError(f"{key}: required")
    return value


def _str_list(data: Json, key: str) -> list[str]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key}: must be a list of strings, got {value!r}")
    return value


def _number(data: Json, key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be a number, got {value!r}")
    return float(value)


def install(sim: Simulator, data: Json) -> Json:
    code, done = sim.install(
        _required_str(data, "client_id"),
        user_type=_optional_str(data, "user_type") or "Location",
        location_id=_optional_str(data, "location_id"),
        company_id=_optional_str(data, "company_id"),
        approved_locations=_str_list(data, "approved_locations"),
    )
    return {
        "code": code,
        "userType": done.user_type,
        "companyId": done.company_id,
        "locationId": done.location_id,
        "approvedLocations": list(done.approved_locations),
        "resource": done.resource,
    }


def approve(sim: Simulator, data: Json) -> Json:
    """Approve more locations for a Company install (a bulk install growing later)."""
    client_id = _required_str(data, "client_id")
    company_id = _required_str(data, "company_id")
    sim.approve_locations(client_id, company_id, _str_list(data, "location_ids"))
    return {"companyId": company_id, "added": _str_list(data, "location_ids")}


def stats(sim: Simulator, data: Json) -> Json:
    return sim.stats()


def set_faults(sim: Simulator, data: Json) -> Json:
    return sim.set_faults(data)


def clear_faults(sim: Simulator, data: Json) -> Json:
    sim.clear_faults()
    return sim.faults.as_json()


def set_limits(sim: Simulator, data: Json) -> Json:
    return sim.set_limits(data)


def set_config(sim: Simulator, data: Json) -> Json:
    return sim.set_config(data)


def register_app(sim: Simulator, data: Json) -> Json:
    client_id = _required_str(data, "client_id")
    sim.register_app(client_id, _required_str(data, "client_secret"))
    return {"client_id": client_id}


def advance_clock(sim: Simulator, data: Json) -> Json:
    now = sim.advance_clock(_number(data, "advance_s"))
    return {"now": now, "offset_s": sim.clock_offset}


def expire(sim: Simulator, data: Json) -> Json:
    return {"expired": sim.expire_tokens(_optional_str(data, "resource"))}


def reset(sim: Simulator, data: Json) -> Json:
    sim.reset()
    return {"reset": True}


def _handler(op: ControlOp) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        sim = request.app[SIMULATOR]
        try:
            result = op(sim, await read_json_object(request))
        except ValueError as exc:
            return bad_request(str(exc))
        return web.json_response(result)

    return handle


def routes() -> list[web.RouteDef]:
    return [
        web.post("/_sim/install", _handler(install)),
        web.post("/_sim/approve", _handler(approve)),
        web.get("/_sim/stats", _handler(stats)),
        web.post("/_sim/faults", _handler(set_faults)),
        web.delete("/_sim/faults", _handler(clear_faults)),
        web.post("/_sim/limits", _handler(set_limits)),
        web.post("/_sim/config", _handler(set_config)),
        web.post("/_sim/apps", _handler(register_app)),
        web.post("/_sim/clock", _handler(advance_clock)),
        web.post("/_sim/expire", _handler(expire)),
        web.post("/_sim/reset", _handler(reset)),
    ]
