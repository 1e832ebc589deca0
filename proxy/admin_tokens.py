"""Token admin on the admin listener: the `tokens` command's operations over HTTP.

    GET    /tokens[?app=NAME&kind=location|company]   every stored record, never a token
    GET    /tokens/{app}/install-url                  where a human installs the app again
    GET    /tokens/{app}/{kind}/{id}                  one record
    POST   /tokens/{app}/{kind}/{id}/refresh          refresh it now (through the manager)
    DELETE /tokens/{app}/{kind}/{id}                  delete it

They run proxy/tokens/operations.py, as the command line does, and sit behind the admin
listener's token check like every admin route. Answers are JSON; errors are the proxy's
JSON errors, saying what to send instead. A refresh of a dead refresh token answers 409
`reauthorization_required` rather than the 401 a forwarded request gets: on this listener
a 401 means the admin token was wrong. Cross-site and DNS-rebinding requests are refused
for every admin route by the listener's own guard (`proxy.admin.guard_admin_request`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from proxy.config import AppConfig, Config
from proxy.errors import BadRequest, NotFound, NoToken, ReauthorizationRequired
from proxy.http_errors import error_body
from proxy.services import Services
from proxy.tokens import operations
from proxy.tokens.operations import TokenView
from proxy.tokens.store import TokenRecord
from proxy.typing import RESOURCE_KINDS, ResourceKind, resource_kind

ServicesOf = Callable[[web.Request], Services]
SERVICES_OF: web.AppKey[ServicesOf] = web.AppKey("token_admin_services")
REAUTH_STATUS = 409


def setup(admin: web.Application, services_of: ServicesOf) -> None:
    """Add the token routes to the admin application; `services_of` finds the proxy's
    services for a request."""
    admin[SERVICES_OF] = services_of
    admin.router.add_get("/tokens", list_tokens)
    admin.router.add_get("/tokens/{app}/install-url", install_url)
    admin.router.add_get("/tokens/{app}/{kind}/{id}", show_token)
    admin.router.add_post("/tokens/{app}/{kind}/{id}/refresh", refresh_token)
    admin.router.add_delete("/tokens/{app}/{kind}/{id}", delete_token)


# -- handlers --------------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    services = _services(request)
    config = services.config
    name = request.query.get("app")
    app = _app(config, name) if name is not None else None
    kind = _kind(request.query["kind"]) if "kind" in request.query else None
    shown = await operations.list_views(config, services.token_store, app=app, kind=kind)
    now = time.time()
    return web.json_response({"tokens": [_json(view, config, now) for view in shown]})


async def install_url(request: web.Request) -> web.Response:
    app = _app(_services(request).config, request.match_info["app"])
    return web.json_response({"app": app.name, "install_url": operations.install_url(app)})


async def show_token(request: web.Request) -> web.Response:
    services = _services(request)
    app, kind, resource_id = _resource(request, services.config)
    record = await services.token_store.get(app.app_id, kind, resource_id)
    if record is None:
        raise _unknown(operations.not_stored(app, kind, resource_id))
    return _record_answer(record, services)


async def refresh_token(request: web.Request) -> web.Response:
    services = _services(request)
    app, kind, resource_id = _resource(request, services.config)
    try:
        fresh = await operations.refresh(
            services.tokens, services.token_store, app, kind, resource_id
        )
    except NoToken as exc:
        raise _unknown(exc) from exc
    except ReauthorizationRequired as exc:
        body = error_body(REAUTH_STATUS, exc.message, "reauthorization_required")
        return web.Response(status=REAUTH_STATUS, body=body, content_type="application/json")
    return _record_answer(fresh, services)


async def delete_token(request: web.Request) -> web.Response:
    services = _services(request)
    app, kind, resource_id = _resource(request, services.config)
    try:
        await operations.delete(services.tokens, app, kind, resource_id)
    except NoToken as exc:
        raise _unknown(exc) from exc
    return web.json_response({"deleted": {"app": app.name, "kind": kind, "id": resource_id}})


# -- helpers ---------------------------------------------------------------------------------


def _services(request: web.Request) -> Services:
    return request.app[SERVICES_OF](request)


def _app(config: Config, name: str) -> AppConfig:
    app = config.app_named(name)
    if app is None:
        raise NotFound(f"No app named {name[:64]!r} in the config; use one of: {config.app_names}")
    return app


def _kind(text: str) -> ResourceKind:
    try:
        return resource_kind(text)
    except ValueError:
        raise BadRequest(
            f"Unknown resource kind {text[:20]!r}; use one of: {', '.join(RESOURCE_KINDS)}"
        ) from None


def _resource(request: web.Request, config: Config) -> tuple[AppConfig, ResourceKind, str]:
    info = request.match_info
    return _app(config, info["app"]), _kind(info["kind"]), info["id"]


def _unknown(exc: NoToken) -> NoToken:
    return NoToken(f"{exc.message}: GET /tokens lists the stored resources")


def _record_answer(record: TokenRecord, services: Services) -> web.Response:
    """One record as the JSON answer: its view, never its tokens."""
    view = operations.view_of(record, operations.app_names_by_id(services.config))
    return web.json_response(_json(view, services.config, time.time()))


def _json(view: TokenView, config: Config, now: float) -> dict[str, object]:
    """A view as JSON: expiry and ages in seconds, the install URL when the app is
    configured; never a token."""
    app = next((app for app in config.apps if app.app_id == view.app_id), None)
    age = view.refresh_age_s(now)
    return {
        "app": view.app,
        "app_id": view.app_id,
        "kind": view.kind,
        "id": view.id,
        "status": view.status,
        "access_token_expires_at": view.expires_at,
        "access_token_expires_in_s": round(view.expires_at - now),
        "refresh_token_age_s": None if age is None else round(age),
        "version": view.version,
        "install_url": operations.install_url(app) if app is not None else None,
    }
