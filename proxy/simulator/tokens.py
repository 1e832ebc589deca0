"""Installs, authorization codes, access tokens and refresh tokens, with rotation.

Pure bookkeeping over an injected ``now``: no HTTP, no stats. A refresh rotates the
pair: the used refresh token is marked dead (kept, so a later use can be told apart
from a token that never existed); access tokens already handed out stay valid until
their own expiry, as on the real server.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Literal

from proxy.simulator.config import app_id_of
from proxy.simulator.jwt import encode_jwt, random_hex

UserType = Literal["Location", "Company"]
USER_TYPES: tuple[UserType, ...] = ("Location", "Company")

DEFAULT_SCOPES: tuple[str, ...] = (
    "contacts.readonly",
    "contacts.write",
    "conversations.readonly",
    "conversations.write",
    "locations.readonly",
    "oauth.readonly",
    "oauth.write",
)
CODE_LIFETIME_S = 600.0
_PLAN_ID = "sim-plan"

GrantFailure = Literal["invalid_code", "dead_refresh", "unknown_refresh"]


class GrantError(Exception):
    """A code or refresh token that cannot be used; ``reason`` says why."""

    def __init__(self, reason: GrantFailure) -> None:
        super().__init__(reason)
        self.reason: GrantFailure = reason


@dataclass(frozen=True)
class Install:
    """One app installed on one Location, or on one Company (agency)."""

    client_id: str
    user_type: UserType
    company_id: str
    location_id: str | None
    user_id: str
    approved_locations: tuple[str, ...] = ()
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    @property
    def app_id(self) -> str:
        return app_id_of(self.client_id)

    @property
    def auth_class_id(self) -> str:
        if self.user_type == "Location" and self.location_id is not None:
            return self.location_id
        return self.company_id

    @property
    def resource(self) -> str:
        """The limit key, ``<appid>:location:<id>`` or ``<appid>:company:<id>``."""
        return resource_key(self.app_id, self.user_type, self.auth_class_id)

    def approves(self, location_id: str) -> bool:
        """Whether a Company install covers a location (no list means all of them)."""
        return not self.approved_locations or location_id in self.approved_locations

    def for_location(self, location_id: str) -> Install:
        """The Location install a location token minted from this Company one stands for."""
        return dataclasses.replace(
            self, user_type="Location", location_id=location_id, approved_locations=()
        )


def resource_key(app_id: str, user_type: str, auth_class_id: str) -> str:
    return f"{app_id}:{user_type.lower()}:{auth_class_id}"


@dataclass
class AccessGrant:
    install: Install
    expires_at: float


@dataclass
class RefreshGrant:
    install: Install
    token_id: str
    issued_at: float
    alive: bool = True


@dataclass(frozen=True)
class TokenPair:
    """What a successful grant hands out."""

    install: Install
    access_token: str
    refresh_token: str
    refresh_token_id: str
    expires_in: int


def grant_json(pair: TokenPair) -> dict[str, object]:
    """The /oauth/token answer for a freshly issued pair."""
    install = pair.install
    body: dict[str, object] = {
        "access_token": pair.access_token,
        "token_type": "Bearer",
        "expires_in": pair.expires_in,
        "refresh_token": pair.refresh_token,
        "scope": " ".join(install.scopes),
        "refreshTokenId": pair.refresh_token_id,
        "userType": install.user_type,
        "companyId": install.company_id,
        "userId": install.user_id,
        "isBulkInstallation": install.user_type == "Company" and bool(install.approved_locations),
        "planId": _PLAN_ID,
        "traceId": str(uuid.uuid4()),
    }
    if install.user_type == "Location":
        body["locationId"] = install.location_id
    else:
        body["approvedLocations"] = list(install.approved_locations)
    return body


def _claims(install: Install, now: float) -> dict[str, object]:
    return {
        "authClass": install.user_type,
        "authClassId": install.auth_class_id,
        "source": "INTEGRATION",
        "sourceId": install.client_id,
        "channel": "OAUTH",
        "primaryAuthClassId": install.auth_class_id,
        "oauthMeta": {
            "client": install.app_id,
            "scopes": list(install.scopes),
            "versionId": install.app_id,
        },
        "iat": int(now),
        "jti": random_hex(),
    }


class TokenBook:
    """Every code and token the simulator ever issued, keyed by its string."""

    def __init__(self) -> None:
        self._codes: dict[str, tuple[Install, float]] = {}
        self._access: dict[str, AccessGrant] = {}
        self._refresh: dict[str, RefreshGrant] = {}

    def mint_code(self, install: Install, now: float) -> str:
        """A single-use authorization code for ``install``, valid for ten minutes."""
        self._codes = {c: v for c, v in self._codes.items() if v[1] > now}
        code = random_hex(20)
        self._codes[code] = (install, now + CODE_LIFETIME_S)
        return code

    def redeem_code(self, code: str, client_id: str, now: float, lifetime_s: float) -> TokenPair:
        """Exchange a code for a token pair; the code is gone afterwards either way."""
        entry = self._codes.pop(code, None)
        if entry is None or entry[1] <= now or entry[0].client_id != client_id:
            raise GrantError("invalid_code")
        return self.issue(entry[0], now, lifetime_s)

    def refresh_grant(self, refresh_token: str) -> RefreshGrant | None:
        """Look a refresh token up without using it."""
        return self._refresh.get(refresh_token)

    def rotate(
        self,
        refresh_token: str,
        client_id: str,
        now: float,
        access_lifetime_s: float,
        refresh_lifetime_s: float,
    ) -> TokenPair:
        """Use a refresh token: it dies, and a brand-new pair is issued."""
        grant = self._refresh.get(refresh_token)
        if grant is None or grant.install.client_id != client_id:
            raise GrantError("unknown_refresh")
        if grant.alive and now - grant.issued_at > refresh_lifetime_s:
            grant.alive = False
        if not grant.alive:
            raise GrantError("dead_refresh")
        grant.alive = False
        return self.issue(grant.install, now, access_lifetime_s)

    def issue(self, install: Install, now: float, lifetime_s: float) -> TokenPair:
        """A fresh access token and refresh token for ``install``."""
        access_token = encode_jwt(_claims(install, now))
        token_id = random_hex()
        refresh_claims = _claims(install, now) | {"refreshTokenId": token_id}
        refresh_token = encode_jwt(refresh_claims)
        self._access[access_token] = AccessGrant(install, now + lifetime_s)
        self._refresh[refresh_token] = RefreshGrant(install, token_id, now)
        return TokenPair(install, access_token, refresh_token, token_id, int(lifetime_s))

    def access(self, access_token: str, now: float) -> AccessGrant | None:
        """The grant behind a live access token; ``None`` when unknown or expired."""
        grant = self._access.get(access_token)
        if grant is None or grant.expires_at <= now:
            return None
        return grant

    def issued(self) -> set[str]:
        """Every access and refresh token ever issued (tests grep logs for them)."""
        return set(self._access) | set(self._refresh)

    def expire(self, resource: str | None, now: float) -> int:
        """Expire the live access tokens of one resource (or all); returns how many."""
        count = 0
        for grant in self._access.values():
            if grant.expires_at > now and resource in (None, grant.install.resource):
                grant.expires_at = now
                count += 1
        return count
