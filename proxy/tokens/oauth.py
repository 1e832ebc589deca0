"""The client of the upstream's token endpoints: code exchange, refresh, location tokens,
and the list of a Company install's locations.

Answers are classified here, at one seam, so the token manager sees only the proxy's own
outcomes: a `TokenGrant`; `InvalidGrant` (the refresh token is dead: reinstall);
`LocationInactive` (temporary: keep the token); `ClientRejected` (wrong client secret);
`InvalidJwt` (the Company bearer token of /oauth/locationToken was refused: refresh it);
or, after a few quick retries of network errors and 5xx, `TokenUnavailable`.
`installed_locations_page` is sent once (its caller took a limiter slot for it, and a
resend needs a slot of its own): a network error or 5xx is `TokenUnavailable` at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from proxy.config import AppConfig
from proxy.errors import (
    ClientRejected,
    InvalidGrant,
    InvalidJwt,
    LocationInactive,
    TokenEndpointError,
    TokenUnavailable,
)
from proxy.tokens.store import OK, TokenRecord
from proxy.typing import ResourceKind

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.2, 0.5, 1.0)
LOCATION_TOKEN_VERSION = "2021-07-28"


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What the token endpoint handed out."""

    access_token: str
    refresh_token: str
    expires_in: float
    scope: str
    user_type: str
    company_id: str
    location_id: str
    user_id: str
    approved_locations: tuple[str, ...]

    @property
    def kind(self) -> ResourceKind:
        return "company" if self.user_type == "Company" else "location"

    @property
    def resource_id(self) -> str:
        return self.company_id if self.kind == "company" else self.location_id

    def record(self, app_id: str, *, now: float, version: int = 1) -> TokenRecord:
        """The record to store for this grant."""
        return TokenRecord(
            app=app_id,
            kind=self.kind,
            id=self.resource_id,
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            expires_at=now + self.expires_in,
            refreshed_at=now,
            scope=self.scope,
            user_type=self.user_type,
            company_id=self.company_id,
            location_id=self.location_id,
            user_id=self.user_id,
            approved_locations=self.approved_locations,
            version=version,
            status=OK,
        )


@dataclass(frozen=True, slots=True)
class InstalledPage:
    """One page of /oauth/installedLocations: the ids with the app installed, and how
    many the upstream says match in all (`count`)."""

    location_ids: tuple[str, ...]
    listed: int  # entries on this page, installed or not: a short page is the last
    count: int


def _installed_page(body: Mapping[str, Any]) -> InstalledPage:
    entries = body.get("locations")
    entries = entries if isinstance(entries, list) else []
    ids = tuple(
        str(entry["_id"])
        for entry in entries
        if isinstance(entry, dict)
        and isinstance(entry.get("_id"), str)
        and entry["_id"]
        # Filtered upstream already (isInstalled=true); an entry saying false is not one.
        and entry.get("isInstalled", True) is not False
    )
    count = body.get("count")
    total = int(count) if isinstance(count, int | float) and not isinstance(count, bool) else 0
    return InstalledPage(location_ids=ids, listed=len(entries), count=total)


def parse_grant(body: Mapping[str, Any], *, user_type: str = "") -> TokenGrant:
    """A TokenGrant from a token endpoint answer; a missing token is a TokenEndpointError."""
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise TokenEndpointError("the token endpoint's answer has no access_token")
    approved = body.get("approvedLocations") or ()
    return TokenGrant(
        access_token=access,
        refresh_token=str(body.get("refresh_token") or ""),
        expires_in=float(body.get("expires_in") or 86399),
        scope=str(body.get("scope") or ""),
        user_type=str(body.get("userType") or user_type or "Location"),
        company_id=str(body.get("companyId") or ""),
        location_id=str(body.get("locationId") or ""),
        user_id=str(body.get("userId") or ""),
        approved_locations=tuple(str(item) for item in approved),
    )


class OAuthClient:
    """Talks to `{base_url}/oauth/*` over the proxy's pooled session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        attempt_timeout_s: float = 65.0,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`attempt_timeout_s` bounds one call from start to answer (pool wait included)."""
        self._session = session
        self._base_url = base_url
        self._attempt_timeout = aiohttp.ClientTimeout(total=attempt_timeout_s)
        self._retry_delays_s = tuple(retry_delays_s)
        self.clock = clock

    async def exchange_code(self, app: AppConfig, code: str, user_type: str = "") -> TokenGrant:
        form = self._client_form(app) | {"grant_type": "authorization_code", "code": code}
        if user_type:
            form["user_type"] = user_type
        return parse_grant(await self._post_form("/oauth/token", form), user_type=user_type)

    async def refresh(
        self,
        app: AppConfig,
        refresh_token: str,
        user_type: str,
        *,
        start_by: float | None = None,
    ) -> TokenGrant:
        """Refresh; no attempt starts after `start_by` (monotonic), so every attempt can
        finish while the caller's lock still holds. An attempt once started is never cut
        short: the upstream may already have rotated the token, and its answer is the only
        copy of the new pair."""
        form = self._client_form(app) | {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "user_type": user_type,
        }
        body = await self._post_form("/oauth/token", form, start_by=start_by)
        return parse_grant(body, user_type=user_type)

    async def location_token(
        self, company_access_token: str, company_id: str, location_id: str
    ) -> TokenGrant:
        headers = {
            "Authorization": f"Bearer {company_access_token}",
            "Version": LOCATION_TOKEN_VERSION,
        }
        form = {"companyId": company_id, "locationId": location_id}
        body = await self._post_form("/oauth/locationToken", form, headers=headers)
        grant = parse_grant(body, user_type="Location")
        return grant if grant.location_id else _with_location(grant, location_id, company_id)

    async def installed_locations_page(
        self, company_access_token: str, company_id: str, app_id: str, *, skip: int, limit: int
    ) -> InstalledPage:
        """One page of `GET /oauth/installedLocations` (only the locations with the app
        installed), sent once."""
        headers = {
            "Authorization": f"Bearer {company_access_token}",
            "Version": LOCATION_TOKEN_VERSION,
            "Accept": "application/json",
        }
        query = {
            "companyId": company_id,
            "appId": app_id,
            "isInstalled": "true",
            "skip": str(skip),
            "limit": str(limit),
        }
        path = "/oauth/installedLocations"
        try:
            async with self._session.get(
                self._base_url + path,
                params=query,
                headers=headers,
                timeout=self._attempt_timeout,
                allow_redirects=False,  # see _post_form
            ) as answer:
                body = await _json_body(answer)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenUnavailable(
                f"{path} could not be reached ({type(exc).__name__}); retry shortly"
            ) from exc
        if status >= 500:
            raise TokenUnavailable(f"{path} answered HTTP {status}; retry shortly")
        return _installed_page(_classified(status, body, path))

    def _client_form(self, app: AppConfig) -> dict[str, str]:
        return {
            "client_id": app.client_id,
            "client_secret": app.client_secret,
            "redirect_uri": app.redirect_uri,
        }

    async def _post_form(
        self,
        path: str,
        form: dict[str, str],
        headers: Mapping[str, str] | None = None,
        *,
        start_by: float | None = None,
    ) -> dict[str, Any]:
        """POST a form; retry network errors and 5xx with backoff; classify refusals."""
        # The shared session adds no Content-Type of its own (the forwarder relays the
        # caller's), so the form says what it is.
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        problem = "no attempt fitted in the time allowed"
        for attempt, delay in enumerate((*self._retry_delays_s, None)):
            if attempt > 0 and start_by is not None and time.monotonic() > start_by:
                break  # the first attempt always fits: config makes the lock long enough
            try:
                # Never follow a redirect: a 307/308 would post the client secret and the
                # refresh token wherever it points, and each hop is one more send upstream
                # that no decision paid for. A 3xx is a refusal like any other.
                async with self._session.post(
                    self._base_url + path,
                    data=form,
                    headers=headers,
                    timeout=self._attempt_timeout,
                    allow_redirects=False,
                ) as answer:
                    body = await _json_body(answer)
                    if answer.status < 500:
                        return _classified(answer.status, body, path)
                    problem = f"HTTP {answer.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            if delay is None:
                break
            log.warning(
                "token endpoint %s failed (%s), attempt %d; retrying", path, problem, attempt + 1
            )
            await asyncio.sleep(delay)
        raise TokenUnavailable(
            f"The upstream's token endpoint is not answering ({problem}); the stored "
            "token was kept, retry shortly"
        )


async def _json_body(answer: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await answer.json(content_type=None)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _classified(status: int, body: dict[str, Any], path: str) -> dict[str, Any]:
    if status == 200:
        return body
    message = str(body.get("message") or body.get("error_description") or f"HTTP {status}")
    if status == 401 and "client" in message.lower():
        raise ClientRejected(message)
    if status == 401 and message.strip().lower() == "invalid jwt":
        raise InvalidJwt(f"{path} answered 401: {message}")
    if "not active" in message.lower():
        raise LocationInactive(message)
    if body.get("error") == "invalid_grant" or "invalid grant" in message.lower():
        raise InvalidGrant(message)
    raise TokenEndpointError(f"{path} answered {status}: {message}")


def _with_location(grant: TokenGrant, location_id: str, company_id: str) -> TokenGrant:
    return TokenGrant(
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        expires_in=grant.expires_in,
        scope=grant.scope,
        user_type="Location",
        company_id=grant.company_id or company_id,
        location_id=location_id,
        user_id=grant.user_id,
        approved_locations=(),
    )
