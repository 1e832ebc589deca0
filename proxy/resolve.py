"""Who is calling, for which app, and for which resource (Location or Company).

With the caller's own HighLevel token, the resource and app are the token's (its JWT
payload, read without a signature check, names authClass, authClassId and the app), and
a request that names another is refused. Otherwise the first rule that names a resource
wins, and later ones are not read: `X-HoopAI-Location-Id` / `X-HoopAI-Company-Id`;
`locationId` / `companyId` in the query; `/locations/{id}` in the path; `locationId` /
`companyId` at the top of a JSON body; `default_resource` (docs/architecture.md, "The
request path"). Nothing here does I/O: the body, if any, was read before.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy, MultiMapping

from proxy.config import AppConfig, CallerConfig, Config
from proxy.errors import (
    BadRequest,
    CallerUnauthenticated,
    ResourceForbidden,
    ResourceUnresolved,
)
from proxy.jwt import jwt_claims
from proxy.typing import PRIORITIES, Priority, ResourceKey, ResourceKind, priority_named

LOCATION_HEADER = "X-HoopAI-Location-Id"
COMPANY_HEADER = "X-HoopAI-Company-Id"
APP_HEADER = "X-HoopAI-App"
PROXY_KEY_HEADER = "X-HoopAI-Proxy-Key"
PRIORITY_HEADER = "X-HoopAI-Priority"

MAX_ID_CHARS = 128
_ID = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_ID_CHARS}}}")
# The limit key of private integration (pit-) tokens: they belong to no marketplace app.
PRIVATE_INTEGRATION = "private-integration"
_LOCATIONS_PATH = re.compile(r"^/locations/([^/?]+)")
_AUTH_CLASSES: dict[str, ResourceKind] = {"Location": "location", "Company": "company"}
# Decoded tokens remembered (a few MiB at most: tokens are about 1 KiB).
CLAIMS_KEPT = 4096
# A resource a request names: (kind, id).
Named = tuple[ResourceKind, str]


@dataclass(frozen=True, slots=True)
class Target:
    """The outcome of resolution: what the request is limited and authorized as."""

    app_id: str
    app: AppConfig | None  # the configured app; None for a pass-through token of another app
    kind: ResourceKind
    id: str
    caller: str | None  # the caller's name when caller keys are configured
    passthrough_token: str | None  # the caller's own HighLevel token, sent upstream as is
    # Interactive requests take the earliest slot; batch ones wait their turn (admission).
    priority: Priority = "interactive"
    weight: int = 1  # the caller's share among batch requests waiting for one resource
    # Built once: the request path asks for it at every step.
    key: ResourceKey = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ResourceKey(self.app_id, self.kind, self.id))

    @property
    def resource(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """The parts of a request that resolution reads."""

    path: str
    headers: CIMultiDictProxy[str]
    query: MultiMapping[str]
    json_body: bytes | None  # a held body, when it may be JSON


def bearer_of(headers: CIMultiDictProxy[str]) -> str | None:
    """The value of `Authorization: Bearer ...`, if any."""
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def is_highlevel_token(token: str, claims: dict[str, Any] | None) -> bool:
    """A HighLevel access token (JWT with authClass) or a private integration token."""
    return token.startswith("pit-") or (claims is not None and "authClass" in claims)


class Resolver:
    """Turns a request into a Target, or raises the error that tells the caller what to send."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._apps_by_id = {app.app_id: app for app in config.apps}
        self._callers = {caller.key_sha256: caller for caller in config.callers}
        self._default = _split_resource(config.default_resource)
        self._claims_of: dict[str, dict[str, Any] | None] = {}

    def use_callers(self, callers: tuple[CallerConfig, ...], default_resource: str) -> None:
        """The callers (keys, allow lists, apps, weights, priorities) and default resource
        of a reloaded config (proxy/reload.py). Requests resolve with the new ones from
        the next one on; a request already resolved keeps its Target. The apps stay the
        ones the process started with: changing them needs a restart."""
        self._callers = {caller.key_sha256: caller for caller in callers}
        self._default = _split_resource(default_resource)

    def _claims(self, token: str) -> dict[str, Any] | None:
        """`jwt_claims`, remembered for the last tokens seen: a caller sends the same
        token for up to a day, and decoding it is a good part of resolving."""
        if token in self._claims_of:
            return self._claims_of[token]
        if len(self._claims_of) >= CLAIMS_KEPT:
            self._claims_of.clear()  # the next requests fill it again with the live ones
        claims = self._claims_of[token] = jwt_claims(token)
        return claims

    def resolve(self, facts: RequestFacts) -> Target:
        bearer = bearer_of(facts.headers)
        claims = self._claims(bearer) if bearer else None
        passthrough = bearer if bearer and is_highlevel_token(bearer, claims) else None
        caller = self._caller(facts.headers, bearer if passthrough is None else None)
        app: AppConfig | None
        if passthrough is not None and claims is not None:
            app, (kind, resource_id) = self._token_target(facts, claims)
            app_id = app.app_id
        else:
            # A private integration token (pit-) is opaque: it belongs to no marketplace
            # app, so it is limited under a key of its own, never a configured app's.
            app = None if passthrough else self._app(facts.headers)
            app_id = app.app_id if app else PRIVATE_INTEGRATION
            kind, resource_id = self._resource(facts)
        _check_id(resource_id, kind)
        if caller is not None:
            _check_allowed(caller, kind, resource_id)
            _check_app_allowed(caller, app)
        return Target(
            app_id=app_id,
            app=app,
            kind=kind,
            id=resource_id,
            caller=caller.name if caller else None,
            passthrough_token=passthrough,
            priority=_priority(facts.headers, caller),
            weight=caller.weight if caller else 1,
        )

    def _caller(self, headers: CIMultiDictProxy[str], bearer: str | None) -> CallerConfig | None:
        if not self._callers:
            return None
        for candidate in (headers.get(PROXY_KEY_HEADER), bearer):
            # Keys are looked up by their SHA-256: the config never holds a key itself.
            found = self._callers.get(_sha256(candidate)) if candidate else None
            if found is not None:
                return found
        raise CallerUnauthenticated(
            f"This proxy needs a caller key: send it as {PROXY_KEY_HEADER}: <key> "
            "(or as Authorization: Bearer <key> when the proxy holds the token)"
        )

    def _app(self, headers: CIMultiDictProxy[str]) -> AppConfig:
        named = headers.get(APP_HEADER)
        if named is not None:
            return self._named_app(named)
        app = self._config.app_named(None)
        if app is None:
            raise BadRequest(
                f"Several apps are configured: send {APP_HEADER} with one of: "
                + self._config.app_names
            )
        return app

    def _named_app(self, name: str) -> AppConfig:
        app = self._config.app_named(name)
        if app is None:
            raise BadRequest(
                f"{APP_HEADER} names no configured app; send one of: {self._config.app_names}"
            )
        return app

    def _token_target(self, facts: RequestFacts, claims: dict[str, Any]) -> tuple[AppConfig, Named]:
        """The app and resource a caller's own HighLevel token is for.

        The upstream counts a request against the resource of the token that carries it,
        so that is the key, whatever else the request names: a header, query, path or
        body naming another resource of the same kind is refused, not believed.
        """
        app = self._token_app(facts.headers, claims)
        own = _from_claims(claims)
        if own is None:
            raise BadRequest(
                "The HighLevel token names no Location or Company (authClass / authClassId); "
                "send a Location or Company access token"
            )
        _check_id(own[1], own[0])
        for source, named in _named_resources(facts):
            if _conflicts(own, named, source):
                raise BadRequest(
                    f"The {source} names {named[0]} {named[1][:MAX_ID_CHARS]}, but the "
                    f"HighLevel token sent is for {own[0]} {own[1]}: the upstream counts "
                    f"the request against the token's {own[0]}. Send a token for that "
                    f"resource, or drop the {source}"
                )
        return app, own

    def _token_app(self, headers: CIMultiDictProxy[str], claims: dict[str, Any]) -> AppConfig:
        """The configured app a token belongs to; another app's token is refused, so it is
        never counted against a configured app's key (nor grows state of its own)."""
        app_id = _app_id_from_claims(claims)
        app = self._apps_by_id.get(app_id) if app_id is not None else None
        if app is None:
            raise BadRequest(
                "The HighLevel token belongs to a marketplace app this proxy is not "
                "configured for; configured app ids: " + ", ".join(sorted(self._apps_by_id))
            )
        named = headers.get(APP_HEADER)
        if named is not None and self._named_app(named) is not app:
            raise BadRequest(
                f"{APP_HEADER} names app {named!r}, but the HighLevel token sent belongs to "
                f"app {app.name!r}; drop {APP_HEADER} or send that app's token"
            )
        return app

    def _resource(self, facts: RequestFacts) -> Named:
        """The first rule that names a resource; later rules are not even looked at."""
        for _, found in _named_resources(facts):
            return found
        if self._default is not None:
            return self._default
        raise ResourceUnresolved(
            f"Which Location or Company is this request for? Send {LOCATION_HEADER} or "
            f"{COMPANY_HEADER}, or a locationId/companyId in the query or JSON body, "
            "or set default_resource in the proxy's config"
        )


def _named_resources(facts: RequestFacts) -> Iterator[tuple[str, Named]]:
    """(source, (kind, id)) for each rule that names a resource, in the order they win;
    each rule is evaluated only when the one before it has been passed."""
    if (found := _from_headers(facts.headers)) is not None:
        yield "header", found
    if (found := _from_mapping(facts.query)) is not None:
        yield "query", found
    if (found := _from_path(facts.path)) is not None:
        yield "path", found
    if (found := _from_json(facts.json_body)) is not None:
        yield "JSON body", found


def _conflicts(own: Named, named: Named, source: str) -> bool:
    """Does `named` contradict the token's own resource? A header states the limit key
    itself, so any other resource there does; elsewhere only the same kind does (an
    agency token may well name a location in the query)."""
    if named == own:
        return False
    return source == "header" or named[0] == own[0]


def _from_headers(headers: CIMultiDictProxy[str]) -> Named | None:
    if LOCATION_HEADER in headers:
        return "location", headers[LOCATION_HEADER]
    if COMPANY_HEADER in headers:
        return "company", headers[COMPANY_HEADER]
    return None


def _from_claims(claims: dict[str, Any] | None) -> Named | None:
    if claims is None:
        return None
    kind = _AUTH_CLASSES.get(str(claims.get("authClass")))
    resource_id = claims.get("authClassId")
    if kind is None or not isinstance(resource_id, str):
        return None
    return kind, resource_id


def _from_mapping(values: Any) -> Named | None:
    fields: tuple[tuple[str, ResourceKind], ...] = (
        ("locationId", "location"),
        ("companyId", "company"),
    )
    for name, kind in fields:
        value = values.get(name)
        if isinstance(value, str) and value:
            return kind, value
    return None


def _from_path(path: str) -> Named | None:
    found = _LOCATIONS_PATH.match(path)
    if found is None or found.group(1) in ("search", "timezones"):
        return None
    return "location", found.group(1)


def _from_json(body: bytes | None) -> Named | None:
    if not body:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read
        return None
    return _from_mapping(document) if isinstance(document, dict) else None


def _sha256(text: str) -> str:
    # Header bytes that are not UTF-8 arrive as surrogate escapes; they hash (and so
    # match no key) instead of failing to encode.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _split_resource(resource: str) -> Named | None:
    if not resource:
        return None
    kind, _, resource_id = resource.partition(":")
    # The config loader admitted only "location:<id>" or "company:<id>".
    return ("location" if kind == "location" else "company"), resource_id


def _app_id_from_claims(claims: dict[str, Any]) -> str | None:
    meta = claims.get("oauthMeta")
    if isinstance(meta, dict) and isinstance(meta.get("client"), str):
        return str(meta["client"])
    source = claims.get("sourceId")
    return source.split("-", 1)[0] if isinstance(source, str) else None


def _check_id(resource_id: str, kind: ResourceKind) -> None:
    if not _ID.fullmatch(resource_id):
        raise BadRequest(
            f"The {kind} id must be 1 to {MAX_ID_CHARS} letters, digits, '.', '_' or '-'"
        )


def _priority(headers: CIMultiDictProxy[str], caller: CallerConfig | None) -> Priority:
    """The request's priority: the caller's, or lower if X-HoopAI-Priority asks for it
    (never higher than the caller's key allows; with no caller keys, as asked)."""
    allowed = priority_named(caller.priority) if caller else "interactive"
    asked = headers.get(PRIORITY_HEADER)
    if asked is None:
        return allowed
    wanted = asked.strip().lower()
    if wanted not in PRIORITIES:
        raise BadRequest(
            f"{PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)}, got {asked[:40]!r}"
        )
    if PRIORITIES.index(priority_named(wanted)) < PRIORITIES.index(allowed):
        raise ResourceForbidden(
            f"Caller {caller.name if caller else ''!r} may send at most priority {allowed!r}: "
            f"send {PRIORITY_HEADER}: {allowed} or leave the header out"
        )
    return priority_named(wanted)


def _check_app_allowed(caller: CallerConfig, app: AppConfig | None) -> None:
    if app is None or "*" in caller.apps or app.name in caller.apps:
        return
    raise ResourceForbidden(f"Caller {caller.name!r} may not use app {app.name!r}")


def _check_allowed(caller: CallerConfig, kind: ResourceKind, resource_id: str) -> None:
    wanted = f"{kind}:{resource_id}"
    if any(rule in ("*", f"{kind}:*", wanted) for rule in caller.allow):
        return
    raise ResourceForbidden(f"Caller {caller.name!r} may not use {wanted}")
