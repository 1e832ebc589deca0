"""Bulk installs: every location a Company install approves gets its token ahead of use.

A Company install approves many locations at once and hands out ONE Company token; its
location tokens are minted from it (`/oauth/locationToken`). Reconciling a Company lists
`/oauth/installedLocations` (only where the app is installed, page by page), records the
list on the Company's token record as its approved locations (so the token manager may
mint for each, and for no location uninstalled since), and mints a token for every listed
location that has none, through the token manager (which stores it). It runs:

- at install (the OAuth callback waits for it a little, then lets it go on),
- on INSTALL deliveries (`schedule`: in the background, coalesced per Company),
- and every `tokens.reconcile_interval_s` for every live Company record (0: never).

Bounds. Every installedLocations page and every mint takes a limiter slot of the
Company's key, asked as a batch request (caller `reconcile`), so a reconcile uses the
slots interactive callers leave and never starves them; a token endpoint call goes
through the manager's cap (`tokens.max_concurrent_refreshes`), and a reconcile keeps at
most half of it busy, as keep-alive does. Across replicas a store lock `reconcile:<tag>`
lets one replica reconcile a Company at a time, and a periodic pass first claims
`reconciled:<tag>` for most of the interval, so N replicas list a Company once an
interval, not N times. A pass stops before its lock expires and the rest is left to the
next one. Nothing is deleted here: an UNINSTALL delivery deletes tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from proxy.admission import Admission, Asker
from proxy.config import AppConfig, Config
from proxy.errors import (
    InvalidJwt,
    LimiterUnavailable,
    NoToken,
    ProxyError,
    RateLimited,
    ReauthorizationRequired,
    TokenEndpointError,
    TokenStoreUnavailable,
    TooManyKeys,
)
from proxy.limiter.base import Decision
from proxy.tokens.keepalive import keepalive_concurrency
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import InstalledPage, OAuthClient
from proxy.tokens.store import OK, TokenRecord, TokenStore
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

RECONCILER = Asker("batch", caller="reconcile")
PAGE_SIZE = 100
MAX_PAGES = 1000  # 100k locations: a bound on a list that never ends
LOCK_TTL_S = 300.0
LOCK_MARGIN_S = 75.0  # a pass stops taking new work this long before its lock expires
LOCK_POLL_S = 0.5
SLOT_WAIT_S = 30.0  # one ask for a slot; a refusal that says "soon" is asked again
IMPATIENT_WAIT_S = 5.0  # a webhook's mint: no slot by then, and HighLevel is told to retry
MAX_RETRY_AFTER_S = 60.0  # a refusal for longer (the daily limit) ends the pass
# The periodic claim lasts this share of the interval, so the next tick finds it gone.
CLAIM_SHARE = 0.9
# Stops a pass: the limiter or the store cannot be used, so neither can the next location.
_STOPS_A_PASS = (RateLimited, LimiterUnavailable, TooManyKeys, TokenStoreUnavailable)


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What one reconcile of a Company did."""

    company_id: str
    listed: int = 0  # locations the upstream lists with the app installed
    minted: int = 0  # tokens minted now
    present: int = 0  # listed locations that had a token already
    failed: int = 0  # listed locations nothing could mint for
    skipped: str = ""  # why nothing was done (another replica, no live Company token)
    unfinished: bool = False  # stopped before its lock's end; the next pass goes on

    @property
    def summary(self) -> str:
        if self.skipped:
            return f"company {self.company_id}: {self.skipped}"
        return (
            f"company {self.company_id}: {self.listed} listed, {self.minted} minted, "
            f"{self.present} already held, {self.failed} failed"
            + (", unfinished" if self.unfinished else "")
        )


class Reconciler:
    """Lists a Company install's locations and mints the tokens it lacks."""

    def __init__(
        self,
        config: Config,
        store: TokenStore,
        oauth: OAuthClient,
        manager: TokenManager,
        admission: Admission,
        *,
        page_size: int = PAGE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be positive")
        self._config = config
        self._apps = {app.app_id: app for app in config.apps}
        self._store = store
        self._oauth = oauth
        self._manager = manager
        self._admission = admission
        self._page_size = page_size
        self._clock = clock
        self._tasks: dict[ResourceKey, asyncio.Task[Reconciled]] = {}
        self._again: set[ResourceKey] = set()

    # -- entry points ----------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Background reconciles under way in this process."""
        return sum(not task.done() for task in self._tasks.values())

    def schedule(self, app: AppConfig, company_id: str) -> asyncio.Task[Reconciled]:
        """Reconcile the Company in the background. Asked again while one runs, it runs
        once more after it (the running one may have listed before the change)."""
        key = ResourceKey(app.app_id, "company", company_id)
        running = self._tasks.get(key)
        if running is not None and not running.done():
            self._again.add(key)
            return running
        # A context of its own: the request that asked (a webhook) is long answered, and
        # its id must not label the reconcile's lines (nor those of later passes).
        task = asyncio.create_task(self._in_background(app, key), context=contextvars.Context())
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._forget_task(key, done))
        return task

    async def reconcile(
        self, app: AppConfig, company_id: str, *, wait_for_lock: bool = False
    ) -> Reconciled:
        """Reconcile the Company now, unless another replica holds its lock (then wait
        for it with `wait_for_lock`, else skip)."""
        tag = ResourceKey(app.app_id, "company", company_id).tag
        name = f"reconcile:{tag}"
        owner = await self._lock(name, wait_for_lock)
        if owner is None:
            return Reconciled(company_id, skipped="another replica is reconciling it")
        try:
            result = await self._reconcile_locked(app, company_id, time.monotonic() + LOCK_TTL_S)
        finally:
            with contextlib.suppress(TokenStoreUnavailable):  # it expires by itself
                await self._store.release_lock(name, owner)
        log.info("reconciled %s", result.summary)
        return result

    async def reconcile_all(self) -> list[Reconciled]:
        """The periodic pass: every live Company record of a configured app that no other
        replica reconciled within the interval."""
        interval = self._config.tokens.reconcile_interval_s
        results = []
        for company in await self._companies():
            if interval > 0 and not await self._store.claim_once(
                f"reconciled:{company.tag}", interval * CLAIM_SHARE
            ):
                continue  # another replica did it this interval
            try:
                results.append(await self.reconcile(self._apps[company.app], company.id))
            except ProxyError as exc:
                log.warning("could not reconcile %s: %s", company.tag, exc.message)
        return results

    async def run_forever(self) -> None:
        """Every `tokens.reconcile_interval_s` (the first after one interval), until
        cancelled; 0 runs nothing."""
        interval = self._config.tokens.reconcile_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reconcile_all()
            except ProxyError as exc:  # the store being down must not end the task
                log.warning("reconcile pass failed: %s", exc.message)
            except Exception:
                log.exception("reconcile pass failed")

    async def mint_location(self, app: AppConfig, company: TokenRecord, location_id: str) -> bool:
        """Mint `location_id`'s token from `company` now, under a slot of the Company's key
        (an INSTALL delivery said the app was installed there). False when the location
        had its token already. Raises NoToken when nothing could mint it."""
        await self._approve(company, (location_id,), add=True)
        return await self._mint(app, company.id, location_id, patient=False)

    async def aclose(self) -> None:
        """Cancel the reconciles under way (a mint cut short spends nothing)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        # Their outcomes are settled here; a cancel of this close itself still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- a reconcile under its lock --------------------------------------------------------

    async def _reconcile_locked(
        self, app: AppConfig, company_id: str, lock_ends: float
    ) -> Reconciled:
        company = await self._store.get(app.app_id, "company", company_id)
        if company is None or company.status != OK:
            return Reconciled(company_id, skipped="no live Company token is stored")
        listed = await self._installed(app, company_id)
        await self._approve(company, listed, add=False)
        missing = [lid for lid in listed if await self._absent(app, lid)]
        minted, failed, unfinished = await self._mint_all(
            app, company_id, missing, lock_ends - LOCK_MARGIN_S
        )
        return Reconciled(
            company_id,
            listed=len(listed),
            minted=minted,
            present=len(listed) - len(missing),
            failed=failed,
            unfinished=unfinished,
        )

    async def _mint_all(
        self, app: AppConfig, company_id: str, missing: list[str], stop_at: float
    ) -> tuple[int, int, bool]:
        """Mint the missing tokens, a few at a time; (minted, failed, unfinished)."""
        queue = iter(missing)
        minted = failed = 0
        unfinished = False

        async def worker() -> None:
            nonlocal minted, failed, unfinished
            for location_id in queue:  # shared: each location goes to one worker
                if time.monotonic() > stop_at:
                    unfinished = True
                    return
                try:
                    if await self._mint(app, company_id, location_id):
                        minted += 1
                except _STOPS_A_PASS:
                    raise
                except (NoToken, ReauthorizationRequired, TokenEndpointError) as exc:
                    failed += 1
                    log.info("could not mint location %s: %s", location_id, exc.message)
                except ProxyError as exc:  # the token endpoint down: try the rest anyway
                    failed += 1
                    log.warning("could not mint location %s: %s", location_id, exc.message)

        workers = min(len(missing), keepalive_concurrency(self._config.tokens))
        # A TaskGroup, not gather: when one worker stops the pass, the others are cancelled
        # before the caller releases the reconcile lock (gather would leave them minting).
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(worker())
        except BaseExceptionGroup as failed_group:
            raise failed_group.exceptions[0] from None
        return minted, failed, unfinished

    async def _mint(
        self, app: AppConfig, company_id: str, location_id: str, *, patient: bool = True
    ) -> bool:
        """One location's token, under a slot of the Company's key; False if it had one.
        Not `patient`: no slot within a short wait raises RateLimited."""
        location = ResourceKey(app.app_id, "location", location_id)
        if not await self._absent(app, location_id):
            return False
        self._manager.forget(location)  # "nothing mints it" may be out of date now
        # The Company's token first (cached, or refreshed under the manager's own cap), so
        # nothing slow stands between the slot and the send.
        await self._manager.access_token(app, "company", company_id)
        company = ResourceKey(app.app_id, "company", company_id)
        decision = await self._slot(company, patient=patient)
        try:
            await self._manager.access_token(app, "location", location_id)
        finally:
            await self._admission.settle(company, decision)
        return True

    async def _installed(self, app: AppConfig, company_id: str) -> tuple[str, ...]:
        """Every location the upstream lists with the app installed, in its order."""
        found: dict[str, None] = {}
        skip = 0
        for _ in range(MAX_PAGES):
            page = await self._page(app, company_id, skip)
            found.update(dict.fromkeys(page.location_ids))
            skip += page.listed
            if page.listed < self._page_size or (page.count and skip >= page.count):
                break
        return tuple(found)

    async def _page(self, app: AppConfig, company_id: str, skip: int) -> InstalledPage:
        """One page, under a slot; a Company token refused as Invalid JWT is refreshed and
        the page asked once more (under a slot of its own)."""
        key = ResourceKey(app.app_id, "company", company_id)
        token = await self._manager.access_token(app, "company", company_id)
        for attempt in range(2):
            decision = await self._slot(key)
            try:
                return await self._oauth.installed_locations_page(
                    token, company_id, app.app_id, skip=skip, limit=self._page_size
                )
            except InvalidJwt:
                if attempt:
                    raise
                log.info("company %s token refused listing its locations; refreshing", company_id)
            finally:
                await self._admission.settle(key, decision)
            token = await self._manager.after_invalid_jwt(app, "company", company_id, token)
        raise AssertionError("unreachable")

    # -- helpers ---------------------------------------------------------------------------

    async def _slot(self, key: ResourceKey, *, patient: bool = True) -> Decision:
        """A batch slot of `key`. Patient: a refusal that says "soon" is asked again, a
        longer one (the daily limit) is raised; else one short ask."""
        if not patient:
            return await self._admission.admit(key, IMPATIENT_WAIT_S, RECONCILER)
        while True:
            try:
                return await self._admission.admit(key, SLOT_WAIT_S, RECONCILER)
            except RateLimited as exc:
                retry_after = _retry_after_s(exc)
                if retry_after > MAX_RETRY_AFTER_S:
                    raise
            await asyncio.sleep(retry_after)

    async def _approve(self, company: TokenRecord, listed: tuple[str, ...], *, add: bool) -> None:
        """Record `listed` as the Company's approved locations (with `add`, on top of
        those recorded), by compare-and-set, so the manager mints for exactly them. A
        record that lists none may mint anywhere: an empty list never narrows it, and
        one location installed alone never narrows it either."""
        current: TokenRecord | None = company
        for _ in range(3):
            if current is None or current.status != OK:
                return
            approved = current.approved_locations
            if add:
                if not approved or all(lid in approved for lid in listed):
                    return
                wanted = (*approved, *(lid for lid in listed if lid not in approved))
            else:
                if not listed or set(listed) == set(approved):
                    return
                wanted = listed
            updated = replace(current, approved_locations=wanted, version=current.version + 1)
            if await self._store.compare_and_set(updated):
                return
            # Refreshed meanwhile: never write over a newer pair; read it and try again.
            current = await self._store.get(company.app, "company", company.id)

    async def _absent(self, app: AppConfig, location_id: str) -> bool:
        return await self._store.get(app.app_id, "location", location_id) is None

    async def _companies(self) -> list[TokenRecord]:
        return [
            record
            for record in await self._store.list()
            if record.kind == "company" and record.status == OK and record.app in self._apps
        ]

    async def _lock(self, name: str, wait: bool) -> str | None:
        """The lock's owner value; None if another replica holds it (after waiting for it
        for at most a lock's lifetime, with `wait`)."""
        give_up = time.monotonic() + LOCK_TTL_S
        while True:
            owner = await self._store.acquire_lock(name, LOCK_TTL_S)
            if owner is not None or not wait or time.monotonic() > give_up:
                return owner
            await asyncio.sleep(LOCK_POLL_S)

    async def _in_background(self, app: AppConfig, key: ResourceKey) -> Reconciled:
        while True:
            self._again.discard(key)
            try:
                result = await self.reconcile(app, key.id, wait_for_lock=True)
            except ProxyError as exc:
                log.warning("could not reconcile %s: %s", key.tag, exc.message)
                result = Reconciled(key.id, skipped=f"failed: {exc.message}")
            if key not in self._again and not result.unfinished:
                return result

    def _forget_task(self, key: ResourceKey, done: asyncio.Task[Reconciled]) -> None:
        if self._tasks.get(key) is done:
            del self._tasks[key]
        if done.cancelled():
            return
        # `_in_background` answers the proxy's own errors: anything else is a bug, and
        # nobody may be waiting for the task to hear of it.
        error = done.exception()
        if error is not None:
            log.error("reconcile of %s failed", key.tag, exc_info=error)


def _retry_after_s(error: RateLimited) -> float:
    try:
        return max(0.1, float(error.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0
