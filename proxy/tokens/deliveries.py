"""`POST /_proxy/webhooks/{app}`: acting on HighLevel's deliveries, once, and passing them on.

A delivery is acted on only if it is signed by a configured key (webhooks.py), names the
app of its URL, is fresh (`webhooks.max_age_s`) and carries a `webhookId` string; those
refusals are final (4xx). UNINSTALL deletes the resource's tokens: they are dead upstream.
INSTALL of a location mints its token at once from the Company install that covers it
(under a limiter slot of the Company, reconcile.py), and INSTALL of anything under a
stored Company reconciles that Company in the background (bulk installs send one INSTALL
per location). Every delivery acted on is then forwarded to `webhooks.forward_to`
(forwarding.py), in the background.

Once, across replicas, without burning the id. HighLevel sends a delivery again only
after a 429, so a valid delivery the proxy cannot act on for a passing reason (the store
or Redis down, the token endpoint failing, no limiter slot, acting taking longer than
`ACT_BUDGET_S`) is answered 429 `webhook_deferred` with `Retry-After:
webhooks.retry_after_s`, and its id stays free. The id is marked done (`claim_once`, kept
twice the freshness window) only after acting succeeded. While acting, the replica holds
the store lock `webhook:<id>` (`BUSY_TTL_S`, longer than acting may take): the same
delivery arriving meanwhile, at any replica, gets 429 and acts on nothing; one arriving
after a success gets 409 `webhook_replayed`; one after a failure acts. A replica that
dies while acting leaves only the lock, which expires, so the id is never burned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from proxy.config import AppConfig, Config
from proxy.errors import (
    NotFound,
    NoToken,
    RateLimited,
    ReauthorizationRequired,
    TokenStoreUnavailable,
    Unavailable,
    WebhookDeferred,
    WebhookRejected,
    WebhookReplayed,
)
from proxy.tokens.forwarding import EventForwarder
from proxy.tokens.manager import TokenManager
from proxy.tokens.reconcile import Reconciler
from proxy.tokens.store import OK, TokenRecord, TokenStore
from proxy.tokens.webhooks import (
    INSTALL,
    UNINSTALL,
    WebhookEvent,
    WebhookKeys,
    check_fresh,
    parse_event,
    require_webhook_id,
    verify_signature,
)
from proxy.typing import ResourceKey, ResourceKind

log = logging.getLogger(__name__)

# Acting on one delivery may take this long before it is deferred (429): HighLevel should
# hear back well within its own timeout, and a slow token endpoint is a passing reason.
ACT_BUDGET_S = 20.0
# The lock held while acting outlives the budget, so no other replica acts meanwhile.
BUSY_TTL_S = 60.0


class WebhookReceiver:
    """Verifies a delivery, acts on it once (or defers it), and forwards it."""

    def __init__(
        self,
        config: Config,
        keys: WebhookKeys,
        manager: TokenManager,
        store: TokenStore,
        reconciler: Reconciler,
        forwarder: EventForwarder,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._keys = keys
        self._manager = manager
        self._store = store  # also where a webhookId is locked and claimed, across replicas
        self._reconciler = reconciler
        self._forwarder = forwarder
        self._clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        app = self._config.app_named(request.match_info["app"])
        if app is None:
            raise NotFound(
                "No such app: deliveries go to /_proxy/webhooks/NAME with NAME one of: "
                + self._config.app_names
            )
        body = await request.read()
        event, webhook_id = self._verified(app, body, request)
        action = await self._once(webhook_id, lambda: self._apply(app, event))
        log.info("webhook %s for app %s: %s", event.type, app.name, action)
        if self._forwarder.enabled:
            self._forwarder.forward(body, webhook_id, event.type)
        return web.json_response({"status": "ok", "action": action})

    def _verified(
        self, app: AppConfig, body: bytes, request: web.Request
    ) -> tuple[WebhookEvent, str]:
        """The event and its webhookId, or WebhookRejected saying what is wrong."""
        verify_signature(self._keys, body, request.headers)
        event = parse_event(body)
        if event.type in (INSTALL, UNINSTALL) and event.app_id != app.app_id:
            raise WebhookRejected(
                f"The delivery is for app {event.app_id!r}, but this URL is app "
                f"{app.name!r} ({app.app_id})"
            )
        check_fresh(
            event, datetime.fromtimestamp(self._clock(), UTC), self._config.webhooks.max_age_s
        )
        return event, require_webhook_id(event)

    # -- once, or deferred -------------------------------------------------------------

    async def _once(self, webhook_id: str, act: Callable[[], Awaitable[str]]) -> str:
        """Run `act` unless the delivery was acted on already (409) or is being acted on
        now (429); a passing failure is a 429 that leaves the id unclaimed."""
        name = f"webhook:{webhook_id}"
        try:
            owner = await self._store.acquire_lock(name, BUSY_TTL_S)
        except TokenStoreUnavailable as exc:
            raise self._deferred(f"the token store cannot be used: {exc.message}") from exc
        if owner is None:
            raise self._deferred("the same delivery is being acted on right now")
        try:
            if await self._store.claimed(name):
                raise WebhookReplayed(f"Delivery {webhook_id} was already received")
            action = await self._act(act)
            await self._mark_done(name, webhook_id)
            return action
        except TokenStoreUnavailable as exc:
            raise self._deferred(f"the token store cannot be used: {exc.message}") from exc
        finally:
            with contextlib.suppress(TokenStoreUnavailable):  # it expires by itself
                await self._store.release_lock(name, owner)

    async def _act(self, act: Callable[[], Awaitable[str]]) -> str:
        try:
            async with asyncio.timeout(ACT_BUDGET_S):
                return await act()
        except TimeoutError as exc:
            raise self._deferred(f"acting on it took over {ACT_BUDGET_S:g} s") from exc
        except WebhookDeferred:
            raise
        except (Unavailable, RateLimited) as exc:
            raise self._deferred(exc.message) from exc

    async def _mark_done(self, name: str, webhook_id: str) -> None:
        """Claim the id now that it was acted on; kept as long as a replay could pass the
        freshness check (twice the window: the sender's clock may be ahead)."""
        try:
            await self._store.claim_once(name, self._config.webhooks.max_age_s * 2)
        except TokenStoreUnavailable:
            # Acted on, so answering 429 would only have it acted on twice; every action
            # is idempotent, so a replay now costs at most a repeat.
            log.warning("delivery %s acted on, but its id could not be claimed", webhook_id)

    def _deferred(self, reason: str) -> WebhookDeferred:
        retry_after = self._config.webhooks.retry_after_s
        return WebhookDeferred(
            f"The delivery is valid but could not be acted on now ({reason}); it was not "
            f"recorded as received, so send it again after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )

    # -- what a delivery does ------------------------------------------------------------

    async def _apply(self, app: AppConfig, event: WebhookEvent) -> str:
        if event.type == UNINSTALL:
            kind, resource_id = _resource_of(event)
            deleted = await self._manager.uninstall(app.app_id, kind, resource_id)
            return (
                f"deleted {kind} {resource_id}" if deleted else f"no token for {kind} {resource_id}"
            )
        if event.type != INSTALL:
            return "nothing to do"
        action = "nothing to do"
        if event.install_type == "Location" and event.location_id:
            action = await self._install_location(app, event.location_id, event.company_id)
        if event.company_id and await self._live_company(app, event.company_id) is not None:
            # A bulk install sends one INSTALL per location: the others come with the list.
            self._reconciler.schedule(app, event.company_id)
        return action

    async def _install_location(
        self, app: AppConfig, location_id: str, company_id: str | None
    ) -> str:
        # A location minting failed for before may be approved now.
        self._manager.forget(ResourceKey(app.app_id, "location", location_id))
        if await self._store.get(app.app_id, "location", location_id) is not None:
            return f"token ready for location {location_id}"
        company = await self._minting_company(app, location_id, company_id)
        if company is None:
            # A location install brings its token through the OAuth callback.
            return f"noted location {location_id}; its token comes with the callback"
        try:
            await self._reconciler.mint_location(app, company, location_id)
        except NoToken:
            return f"noted location {location_id}; its token comes with the callback"
        except ReauthorizationRequired:
            return f"noted location {location_id}; company {company.id} needs reauthorization"
        return f"token ready for location {location_id}"

    async def _minting_company(
        self, app: AppConfig, location_id: str, company_id: str | None
    ) -> TokenRecord | None:
        """The live Company install to mint the location's token from: the delivery's,
        else one that approves the location."""
        if company_id:
            company = await self._live_company(app, company_id)
            if company is not None:
                return company
        approving = await self._store.companies_approving(app.app_id, location_id)
        return next((c for c in approving if c.status == OK), None)

    async def _live_company(self, app: AppConfig, company_id: str) -> TokenRecord | None:
        company = await self._store.get(app.app_id, "company", company_id)
        return company if company is not None and company.status == OK else None


def _resource_of(event: WebhookEvent) -> tuple[ResourceKind, str]:
    if event.location_id:
        return "location", event.location_id
    return "company", event.company_id or ""
