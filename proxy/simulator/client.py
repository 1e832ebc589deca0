"""``SimulatorClient``: async helpers that drive a simulator over HTTP.

For tests, the demo and benchmarks that hold a simulator's URL rather than its state.
A non-2xx answer raises ``SimulatorError`` with the status and the decoded body.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp


class SimulatorError(Exception):
    """The simulator answered with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"simulator answered {status}: {body!r}")
        self.status = status
        self.body = body


async def _decode(response: aiohttp.ClientResponse) -> Any:
    if response.content_type == "application/json":
        return await response.json()
    return await response.text()


class SimulatorClient:
    """Control and OAuth calls against the simulator at ``base_url``."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = session

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, object] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Any:
        async with self._session.request(
            method, self._base_url + path, json=json, data=form
        ) as response:
            body = await _decode(response)
            if response.status >= 300:
                raise SimulatorError(response.status, body)
            return body

    # -- OAuth ---------------------------------------------------------------------------

    async def install(
        self,
        client_id: str,
        *,
        user_type: str = "Location",
        location_id: str | None = None,
        company_id: str | None = None,
        approved_locations: Iterable[str] | None = None,
    ) -> str:
        """Install the app as the marketplace would; returns the authorization code."""
        payload = {
            "client_id": client_id,
            "user_type": user_type,
            "location_id": location_id,
            "company_id": company_id,
            "approved_locations": list(approved_locations or ()),
        }
        answer = await self._call("POST", "/_sim/install", json=payload)
        return str(answer["code"])

    async def approve_locations(
        self, client_id: str, company_id: str, location_ids: Iterable[str]
    ) -> None:
        """Approve more locations for a Company install (a bulk install growing later)."""
        payload = {
            "client_id": client_id,
            "company_id": company_id,
            "location_ids": list(location_ids),
        }
        await self._call("POST", "/_sim/approve", json=payload)

    async def exchange_code(
        self, client_id: str, client_secret: str, code: str, user_type: str = "Location"
    ) -> dict[str, Any]:
        """The /oauth/token answer for an authorization code."""
        return await self._token(
            client_id, client_secret, user_type, grant_type="authorization_code", code=code
        )

    async def install_and_exchange(
        self,
        client_id: str,
        client_secret: str,
        *,
        user_type: str = "Location",
        location_id: str | None = None,
        company_id: str | None = None,
        approved_locations: Iterable[str] | None = None,
    ) -> dict[str, Any]:
        """Install, then exchange the code: the token answer of a fresh install."""
        code = await self.install(
            client_id,
            user_type=user_type,
            location_id=location_id,
            company_id=company_id,
            approved_locations=approved_locations,
        )
        return await self.exchange_code(client_id, client_secret, code, user_type)

    async def refresh(
        self, client_id: str, client_secret: str, refresh_token: str, user_type: str = "Location"
    ) -> dict[str, Any]:
        """The /oauth/token answer for a refresh (the used refresh token dies)."""
        return await self._token(
            client_id,
            client_secret,
            user_type,
            grant_type="refresh_token",
            refresh_token=refresh_token,
        )

    async def _token(
        self, client_id: str, client_secret: str, user_type: str, **grant: str
    ) -> dict[str, Any]:
        form = {
            "client_id": client_id,
            "client_secret": client_secret,
            "user_type": user_type,
            **grant,
        }
        answer: dict[str, Any] = await self._call("POST", "/oauth/token", form=form)
        return answer

    # -- control -------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("GET", "/_sim/stats")
        return answer

    async def set_faults(self, **faults: object) -> dict[str, Any]:
        """Merge faults into the current ones; returns all faults now set."""
        answer: dict[str, Any] = await self._call("POST", "/_sim/faults", json=faults)
        return answer

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/_sim/faults")

    async def set_limits(self, **limits: object) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("POST", "/_sim/limits", json=limits)
        return answer

    async def set_config(self, **settings: object) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("POST", "/_sim/config", json=settings)
        return answer

    async def register_app(self, client_id: str, client_secret: str) -> None:
        payload = {"client_id": client_id, "client_secret": client_secret}
        await self._call("POST", "/_sim/apps", json=payload)

    async def advance_clock(self, seconds: float) -> float:
        """Move the simulator's clock forward; returns its new time."""
        answer = await self._call("POST", "/_sim/clock", json={"advance_s": seconds})
        return float(answer["now"])

    async def expire_tokens(self, resource: str | None = None) -> int:
        """Expire access tokens now (one resource's, or all); returns how many."""
        payload = {} if resource is None else {"resource": resource}
        answer = await self._call("POST", "/_sim/expire", json=payload)
        return int(answer["expired"])

    async def reset(self) -> None:
        await self._call("POST", "/_sim/reset")
