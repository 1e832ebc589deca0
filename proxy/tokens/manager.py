"""Fresh bearer tokens for managed resources: cache, refresh, single flight, minting.

`access_token(app, kind, id)` answers from an in-process cache while the token has more
than `tokens.refresh_skew_s` left; otherwise it refreshes. A refresh is single-flight
twice over: concurrent callers in this process share one task, and across processes and
replicas a lock in the store admits one refresher. The lock holder re-reads the record
(another replica may have refreshed it already), calls the token endpoint, stores the
new pair by compare-and-set on `version`, and only then releases the lock, so the new
refresh token is stored before anything else can use it. The others wait for the version
to change and read the new pair.

A refresh token the upstream calls invalid (`invalid_grant`) is re-read first (another
replica may have won); if it is still the one that failed, the record is marked
`needs_reauth` and callers get 401 `reauthorization_required`; the reauth listener
(proxy/tokens/reauth.py) hears of it from the one process whose write landed, and of every
reinstall, delete or revival that heals a record. A Location without a token
of its own, under a Company install that approves it, gets a token minted from the
Company token (single-flight too); a Company token refused there as `Invalid JWT` is
refreshed and the mint tried once more. A location nothing could mint for is remembered
for `MISSING_TTL_S` (at most `MAX_MISSING` of them, the oldest forgotten first), so asking
again costs no store lookup and no upstream call; an install of it forgets that at once.

At most `tokens.max_concurrent_refreshes` token endpoint calls run at once in a process.
Between the upstream rotating a refresh token and the new pair being stored, a killed
process loses the install, so the cap is the most a kill can cost. A refresh takes its
slot before the store's lock, so time spent waiting for a slot never shortens the lock's;
a mint takes one around its call only (it may first need the Company token refreshed,
which takes a slot of its own, and a mint cut short spends nothing).
The whole lifecycle is in docs/architecture.md, "Tokens"; the one window that cannot be
recovered, in "What cannot be recovered".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import replace
from typing import Protocol

from proxy.config import AppConfig, TokensConfig
from proxy.errors import (
    ClientRejected,
    InvalidGrant,
    InvalidJwt,
    LocationInactive,
    NoToken,
    ReauthorizationRequired,
    TokenEndpointError,
    TokenStoreUnavailable,
    TokenUnavailable,
)
from proxy.metrics import Metrics
from proxy.tokens.oauth import OAuthClient, TokenGrant
from proxy.tokens.store import NEEDS_REAUTH, TokenRecord, TokenStore
from proxy.typing import ResourceKey, ResourceKind

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.05
LOCK_MARGIN_S = 1.0  # kept between the last possible answer and the lock's expiry
STORE_ATTEMPTS = 3
# Short: a location may be added to a Company install upstream at any time, and this
# process hears of it only through an install or INSTALL delivery that reaches it.
MISSING_TTL_S = 60.0
MAX_MISSING = 10_000


class ReauthListener(Protocol):
    """Hears of each resource this process marks needs_reauth, and of each it heals
    (proxy/tokens/reauth.py: the gauge, the status list, the log event and the alert)."""

    def marked(self, record: TokenRecord, reason: str) -> None: ...

    def cleared(self, key: ResourceKey) -> None: ...


class TokenManager:
    """Hands out valid access tokens for (app, kind, id), refreshing them exactly once."""

    def __init__(
        self,
        store: TokenStore,
        oauth: OAuthClient,
        config: TokensConfig,
        *,
        metrics: Metrics | None = None,
        attempt_s: float = 65.0,
        clock: Callable[[], float] = time.time,
        reauth: ReauthListener | None = None,
    ) -> None:
        """`attempt_s` is the longest one token endpoint call can take; `reauth` hears
        of every resource marked needs_reauth here (else each is only logged)."""
        self._reauth = reauth
        self._store = store
        self._attempt_s = attempt_s
        self._holding: set[ResourceKey] = set()  # keys whose refresh lock this process holds
        self._metrics = metrics or Metrics()
        self._oauth = oauth
        self._config = config
        self._clock = clock
        self._cache: dict[ResourceKey, TokenRecord] = {}
        self._inflight: dict[ResourceKey, asyncio.Task[TokenRecord]] = {}
        self._slots = asyncio.Semaphore(config.max_concurrent_refreshes)  # token endpoint calls
        # (app id, location id) -> until when minting for it is known to fail
        self._missing: OrderedDict[tuple[str, str], float] = OrderedDict()

    # -- what the request path calls -----------------------------------------------------

    async def access_token(self, app: AppConfig, kind: ResourceKind, resource_id: str) -> str:
        """A valid access token for the resource, refreshed or minted if need be."""
        key = ResourceKey(app.app_id, kind, resource_id)
        cached = self._cache.get(key)
        if cached is not None and self._fresh(cached):
            return cached.access_token
        record = await self._current(app, key)
        if not self._fresh(record):
            record = await self._single_flight(key, lambda: self._refresh(app, record))
        return record.access_token

    async def after_invalid_jwt(
        self, app: AppConfig, kind: ResourceKind, resource_id: str, used_token: str
    ) -> str:
        """The upstream said `Invalid JWT` to `used_token`: a newer token, refreshed if the
        stored one is still the one that failed."""
        key = ResourceKey(app.app_id, kind, resource_id)
        self._cache.pop(key, None)
        record = await self._current(app, key)
        if record.access_token != used_token and self._fresh(record):
            return record.access_token
        refreshed = await self._single_flight(key, lambda: self._refresh(app, record, force=True))
        return refreshed.access_token

    async def refresh_now(self, app: AppConfig, record: TokenRecord) -> TokenRecord:
        """Refresh `record` now (keep-alive, CLI): skipped if another process already did."""
        return await self._single_flight(record.key, lambda: self._refresh(app, record, force=True))

    async def install(self, record: TokenRecord) -> TokenRecord:
        """Store a freshly installed pair over whatever was there (a reinstall heals a dead
        record)."""
        stored = await self._store.replace(record)
        self._cache[stored.key] = stored  # a reinstall may restart versions: it always wins
        if self._reauth is not None:
            self._reauth.cleared(stored.key)
        if stored.kind == "location":
            self._missing.pop((stored.app, stored.id), None)
        else:  # a Company install may approve any location of its app
            for missing in [m for m in self._missing if m[0] == stored.app]:
                del self._missing[missing]
        log.info("installed token %s (version %d)", stored.tag, stored.version)
        return stored

    async def uninstall(self, app_id: str, kind: ResourceKind, resource_id: str) -> bool:
        """Delete the record of an uninstalled app: its tokens are dead upstream."""
        key = ResourceKey(app_id, kind, resource_id)
        self.forget(key)
        deleted = await self._store.delete(app_id, kind, resource_id)
        if self._reauth is not None:
            self._reauth.cleared(key)
        return deleted

    async def aclose(self, timeout_s: float) -> None:
        """Let refreshes under way finish (they may hold the only live pair) before the
        session and the store close; bounded, so shutdown cannot hang."""
        holding = [task for key, task in self._inflight.items() if key in self._holding]
        others = [task for key, task in self._inflight.items() if key not in self._holding]
        for task in others:
            task.cancel()  # only waiting on another process's lock: nothing to lose
        if holding:
            log.info("waiting for %d token refresh(es) to finish", len(holding))
            await asyncio.wait(holding, timeout=timeout_s)

    def cached_access_token(
        self, app: AppConfig, kind: ResourceKind, resource_id: str
    ) -> str | None:
        """The cached access token if it is fresh, without any I/O (safe between a slot
        and its send)."""
        cached = self._cache.get(ResourceKey(app.app_id, kind, resource_id))
        return cached.access_token if cached is not None and self._fresh(cached) else None

    def cached_expiry(self, key: ResourceKey) -> float | None:
        """When the cached access token of `key` expires, if one is cached."""
        record = self._cache.get(key)
        return record.expires_at if record is not None else None

    def forget(self, key: ResourceKey) -> None:
        """Drop what is cached about `key` (after an uninstall, a reinstall, or an INSTALL
        delivery): its record, and that nothing could be minted for it."""
        self._cache.pop(key, None)
        self._missing.pop((key.app, key.id), None)

    # -- internals ------------------------------------------------------------------------

    def _fresh(self, record: TokenRecord) -> bool:
        return record.expires_at - self._clock() > self._config.refresh_skew_s

    async def _current(self, app: AppConfig, key: ResourceKey) -> TokenRecord:
        """The stored record (minting a Location token if need be); never a dead one."""
        record = await self._store.get(key.app, key.kind, key.id)
        if record is None and key.kind == "location":
            record = await self._single_flight(key, lambda: self._mint(app, key.id))
        if record is None:
            raise NoToken(
                f"No token is installed for {key.kind} {key.id} of app {app.name!r}: install the "
                f"app there (open /_proxy/oauth/start?app={app.name}) or import a refresh "
                "token with `hoopai-proxy tokens add`"
            )
        _refuse_dead(record, app)
        if self._fresh(record):
            self._remember(record)
        return record

    async def _single_flight(
        self, key: ResourceKey, work: Callable[[], Awaitable[TokenRecord]]
    ) -> TokenRecord:
        """One task per key in this process; callers share it. A caller that goes away
        does not cancel it (shield): the others still need its result."""
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
            task.add_done_callback(_read_outcome)
        record = await asyncio.shield(task)
        self._remember(record)
        return record

    def _remember(self, record: TokenRecord) -> None:
        """Cache `record` unless a newer version of it is cached already (a slow reader
        must not put back the token a refresh just replaced)."""
        cached = self._cache.get(record.key)
        if cached is None or cached.version <= record.version:
            self._cache[record.key] = record

    async def _refresh(
        self, app: AppConfig, stale: TokenRecord, *, force: bool = False
    ) -> TokenRecord:
        """Refresh `stale` under the store's lock, or wait for whoever holds it."""
        ttl = self._config.refresh_lock_ttl_s
        name = f"refresh:{stale.tag}"
        waiting_since: float | None = None
        while True:
            current = await self._store.get(stale.app, stale.kind, stale.id)
            if current is None:
                raise NoToken(f"The token for {stale.kind} {stale.id} was deleted")
            _refuse_dead(current, app)
            if current.version != stale.version or (not force and self._fresh(current)):
                return current  # someone else refreshed it
            # The slot before the lock: the lock's time (start_by) starts once both are ours.
            async with self._slot_for(current):
                locked_at = time.monotonic()
                owner = await self._store.acquire_lock(name, ttl)
                if owner is not None:
                    self._holding.add(stale.key)
                    try:
                        return await self._refresh_holding_lock(app, stale, locked_at)
                    finally:
                        self._holding.discard(stale.key)
                        await self._release(name, owner)
            # Another process holds the lock: wait for it without holding a slot.
            waiting_since = self._clock() if waiting_since is None else waiting_since
            if self._clock() - waiting_since > ttl * 2:
                raise TokenUnavailable(
                    f"Waited too long for another process to refresh {stale.tag}; retry"
                )
            await asyncio.sleep(WAIT_POLL_S)

    def _slot_for(self, record: TokenRecord) -> AbstractAsyncContextManager[object]:
        """A token endpoint slot for refreshing `record`. A record without a refresh token
        is minted again instead, and `_location_grant` takes the slot around that call
        alone: holding one here while it gets the Company's token could deadlock."""
        return self._slots if record.refresh_token else nullcontext()

    async def _release(self, name: str, owner: str) -> None:
        """Release a lock; if the store is down it expires by itself, and what was stored
        under it stands, so the caller should not see an error for it."""
        try:
            await self._store.release_lock(name, owner)
        except TokenStoreUnavailable:
            log.warning("could not release lock %s; it expires by itself", name)

    async def _refresh_holding_lock(
        self, app: AppConfig, stale: TokenRecord, locked_at: float
    ) -> TokenRecord:
        current = await self._store.get(stale.app, stale.kind, stale.id)
        if current is None:
            raise NoToken(f"The token for {stale.kind} {stale.id} was deleted")
        if current.version != stale.version:
            return current  # refreshed between our read and our lock
        refreshes = self._metrics.refreshes
        # The lock must outlive every call, or another process could spend the same
        # refresh token: no attempt starts that could still run when the lock expires.
        start_by = locked_at + self._config.refresh_lock_ttl_s - self._attempt_s - LOCK_MARGIN_S
        try:
            grant = await self._renewed_grant(app, current, start_by)
        except InvalidGrant as exc:
            refreshes.labels("invalid_grant").inc()
            return await self._mark_dead(app, current, exc.message)
        except TokenUnavailable:
            refreshes.labels("failed").inc()
            raise
        refreshes.labels("ok").inc()
        fresh = grant.record(current.app, now=self._clock(), version=current.version + 1)
        fresh = replace(
            fresh, approved_locations=fresh.approved_locations or current.approved_locations
        )
        return await self._store_renewed(app, current, fresh)

    async def _renewed_grant(
        self, app: AppConfig, current: TokenRecord, start_by: float
    ) -> TokenGrant:
        """A new grant for `current`: refreshed, or minted again when it has no refresh
        token. Refusals other than invalid_grant become 503 token_unavailable."""
        try:
            if current.refresh_token:
                return await self._oauth.refresh(
                    app, current.refresh_token, current.user_type, start_by=start_by
                )
            return await self._location_grant(app, current.company_id, current.id)
        except InvalidGrant:
            raise
        except LocationInactive as exc:
            raise TokenUnavailable(f"{exc.message} ({current.kind} {current.id})") from exc
        except ClientRejected as exc:
            raise TokenUnavailable(
                f"The token endpoint refused app {app.name!r}'s client credentials: check "
                "its client_id and client_secret in the config"
            ) from exc
        except TokenEndpointError as exc:
            raise TokenUnavailable(exc.message) from exc

    async def _store_renewed(
        self, app: AppConfig, current: TokenRecord, fresh: TokenRecord
    ) -> TokenRecord:
        """Store the new pair: it may be the only live one, so a store blip is retried
        (the lock is still held) and a record wrongly marked dead is overwritten."""
        for attempt in range(STORE_ATTEMPTS):
            try:
                if await self._store.compare_and_set(fresh):
                    log.info("refreshed token %s (version %d)", current.tag, fresh.version)
                    return fresh
                break
            except TokenStoreUnavailable:
                if attempt == STORE_ATTEMPTS - 1:
                    log.error("could not store the new pair of %s: it is lost", current.tag)
                    raise
                await asyncio.sleep(0.2)
        latest = await self._store.get(current.app, current.kind, current.id)
        if latest is None:
            raise NoToken(f"The token for {current.kind} {current.id} was deleted")
        if latest.refresh_token == fresh.refresh_token:
            return latest  # our write landed; only its answer was lost
        if latest.status == NEEDS_REAUTH and latest.refresh_token == current.refresh_token:
            # Someone holding our old refresh token saw it refused because we spent it:
            # our pair is the live one.
            revived = replace(fresh, version=latest.version + 1)
            if await self._store.compare_and_set(revived):
                if self._reauth is not None:
                    self._reauth.cleared(revived.key)
                return revived
        log.error("token record %s changed while its refresh lock was held", current.tag)
        _refuse_dead(latest, app)
        return latest

    async def _mark_dead(self, app: AppConfig, failed: TokenRecord, reason: str) -> TokenRecord:
        latest = await self._store.get(failed.app, failed.kind, failed.id)
        if latest is not None and latest.refresh_token != failed.refresh_token:
            _refuse_dead(latest, app)
            return latest  # another replica won the rotation; its pair is live
        dead = replace(failed, status=NEEDS_REAUTH, version=failed.version + 1)
        # Only the process whose write lands reports the transition: one alert in all.
        if not await self._store.compare_and_set(dead):
            log.info("refresh token of %s is invalid (%s); the record changed", dead.tag, reason)
        elif self._reauth is not None:
            self._reauth.marked(dead, reason)
        else:
            log.warning("refresh token of %s is invalid (%s): reinstall needed", dead.tag, reason)
        _refuse_dead(dead, app)
        raise AssertionError("unreachable")  # _refuse_dead raised

    async def _mint(self, app: AppConfig, location_id: str) -> TokenRecord:
        """A Location token from a Company install that approves this location."""
        existing = await self._store.get(app.app_id, "location", location_id)
        if existing is not None:
            return existing
        if self._known_missing(app.app_id, location_id):
            raise _nothing_mints(app, location_id)
        for company in await self._approving_companies(app, location_id):
            try:
                grant = await self._location_grant(app, company.id, location_id)
            except TokenEndpointError as exc:
                log.info(
                    "company %s could not mint for location %s: %s",
                    company.id,
                    location_id,
                    exc.message,
                )
                continue
            record = grant.record(app.app_id, now=self._clock())
            stored = await self._store.replace(record)
            log.info("minted a location token for %s from company %s", record.tag, company.id)
            return stored
        self._remember_missing(app.app_id, location_id)
        raise _nothing_mints(app, location_id)

    async def _location_grant(
        self, app: AppConfig, company_id: str, location_id: str
    ) -> TokenGrant:
        """A Location token from the Company's; a Company token refused as Invalid JWT
        (revoked, or expired before its time) is refreshed and the mint tried once more."""
        company_token = await self.access_token(app, "company", company_id)
        try:
            async with self._slots:
                return await self._oauth.location_token(company_token, company_id, location_id)
        except InvalidJwt:
            log.info("company %s token refused while minting; refreshing it", company_id)
        company_token = await self.after_invalid_jwt(app, "company", company_id, company_token)
        async with self._slots:
            return await self._oauth.location_token(company_token, company_id, location_id)

    def _known_missing(self, app_id: str, location_id: str) -> bool:
        until = self._missing.get((app_id, location_id))
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._missing[(app_id, location_id)]
        return False

    def _remember_missing(self, app_id: str, location_id: str) -> None:
        self._missing[(app_id, location_id)] = self._clock() + MISSING_TTL_S
        self._missing.move_to_end((app_id, location_id))
        while len(self._missing) > MAX_MISSING:
            self._missing.popitem(last=False)

    async def _approving_companies(self, app: AppConfig, location_id: str) -> list[TokenRecord]:
        """The live Companies that may mint for the location, those that list it first
        (an index lookup in the store: its cost does not grow with the store)."""
        companies = await self._store.companies_approving(app.app_id, location_id)
        return [company for company in companies if company.status != NEEDS_REAUTH]


def _read_outcome(task: asyncio.Task[TokenRecord]) -> None:
    """Mark a shared task's exception as seen: its callers may all have gone."""
    if not task.cancelled():
        task.exception()


def _nothing_mints(app: AppConfig, location_id: str) -> NoToken:
    return NoToken(
        f"No token is installed for location {location_id} of app {app.name!r}, and no "
        "installed Company approves it: install the app there (open "
        f"/_proxy/oauth/start?app={app.name})"
    )


def _refuse_dead(record: TokenRecord, app: AppConfig) -> None:
    if record.status == NEEDS_REAUTH:
        raise ReauthorizationRequired(
            f"The refresh token for {record.kind} {record.id} of app {app.name!r} is no "
            f"longer valid: reinstall the app there (open /_proxy/oauth/start?app={app.name})"
        )
