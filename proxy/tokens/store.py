"""The TokenStore protocol and the TokenRecord it keeps, one per app and resource.

Refresh tokens rotate: the upstream invalidates a refresh token the moment it answers a
refresh with a new one. So a record is only ever replaced by compare-and-set on its
`version` (the writer proves it read the version it replaces), and a refresh happens
under a lock that every replica (and every worker process) honours. Two backends:
SQLite (embedded default) and Redis (shared); both migrate their own schema, and both
index Company records by the locations they approve, so minting a Location token never
reads the whole store.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Protocol

from proxy.typing import ResourceKey, ResourceKind, TokenStatus

OK: TokenStatus = "ok"
NEEDS_REAUTH: TokenStatus = "needs_reauth"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """The tokens of one app for one Location or Company, and what is known of them."""

    app: str  # the marketplace app id (client_id before its first '-')
    kind: ResourceKind
    id: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)  # "" for a minted location token without one
    expires_at: float  # epoch seconds when the access token expires
    refreshed_at: float  # epoch seconds when this refresh token was issued
    scope: str = ""
    user_type: str = ""  # "Location" | "Company", as the upstream says
    company_id: str = ""
    location_id: str = ""
    user_id: str = ""
    approved_locations: tuple[str, ...] = ()  # Company installs: where it may mint
    version: int = 1  # 1 for a new record; every replacement adds one
    status: TokenStatus = OK

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.app, self.kind, self.id)

    @property
    def tag(self) -> str:
        return f"{self.app}:{self.kind}:{self.id}"


class TokenStore(Protocol):
    """Durable token records plus the locks and once-only claims that guard them."""

    async def get(self, app: str, kind: str, id: str) -> TokenRecord | None:
        """The stored record, or None."""
        ...

    async def compare_and_set(self, record: TokenRecord) -> bool:
        """Store `record` only if the stored version is `record.version - 1` (no record
        counts as version 0). True when stored."""
        ...

    async def replace(self, record: TokenRecord) -> TokenRecord:
        """Store `record` whatever is stored (a fresh install), with version = stored + 1;
        returns the record as stored."""
        ...

    async def delete(self, app: str, kind: str, id: str) -> bool:
        """Remove a record; True if there was one."""
        ...

    async def reseal(self, app: str, kind: str, id: str) -> bool:
        """Rewrite the record's tokens sealed with the first encryption key, keeping its
        version, unless they are already; True if rewritten. Never overwrites a record
        that changed since it was read (`tokens reencrypt` runs beside live proxies)."""
        ...

    async def list(self) -> list[TokenRecord]:
        """Every record, in no particular order."""
        ...

    async def companies_approving(self, app: str, location_id: str) -> builtins.list[TokenRecord]:
        """The app's Company records that may mint a token for `location_id`: first those
        whose `approved_locations` lists it, then those that list no location at all,
        each group ordered by id; whatever their status. Read through an index kept with
        every write, so the cost follows the records found, not the size of the store."""
        ...

    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        """Take the named lock for `ttl_s` seconds: a random owner value, or None if held.
        Held across every process that shares this store."""
        ...

    async def release_lock(self, name: str, owner: str) -> bool:
        """Release the lock only if `owner` still holds it (compare-and-delete)."""
        ...

    async def claim_once(self, name: str, ttl_s: float) -> bool:
        """True the first time `name` is claimed within `ttl_s` seconds (webhook replays)."""
        ...

    async def claimed(self, name: str) -> bool:
        """Whether `name` is claimed now (by `claim_once`, its TTL not yet over); claims
        nothing. A webhook delivery is claimed only once it has been acted on, so its
        handler asks first, under a lock that keeps two replicas from acting at once."""
        ...

    async def close(self) -> None: ...
