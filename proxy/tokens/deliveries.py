"""`POST /_proxy/webhooks/{app}`: acting on HighLevel's INSTALL and UNINSTALL deliveries.

A delivery is acted on only if it is signed by a configured key (webhooks.py), names the
app of its URL, is fresh (`webhooks.max_age_s`), carries a `webhookId` string, and that id
was not seen before (claimed once in the shared store, so a replay to another replica is
refused too). UNINSTALL deletes the resource's tokens: they are dead upstream. INSTALL for
a location of a Company install mints the location token at once. The answer is 2xx only
once the change is stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web

from proxy.config import AppConfig, Config
from proxy.errors import NotFound, NoToken, WebhookRejected, WebhookReplayed
from proxy.tokens.manager import TokenManager
from proxy.tokens.store import TokenStore
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


class WebhookReceiver:
    """Verifies a delivery, refuses replays, and applies it to the token store."""

    def __init__(
        self,
        config: Config,
        keys: WebhookKeys,
        manager: TokenManager,
        claims: TokenStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._keys = keys
        self._manager = manager
        self._claims = claims  # where a webhookId is claimed once, across replicas
        self._clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        app = self._config.app_named(request.match_info["app"])
        if app is None:
            raise NotFound(
                "No such app: deliveries go to /_proxy/webhooks/NAME with NAME one of: "
                + self._config.app_names
            )
        event, webhook_id = self._verified(app, await request.read(), request)
        if not await self._claims.claim_once(
            f"webhook:{webhook_id}", self._config.webhooks.max_age_s * 2
        ):
            raise WebhookReplayed(f"Delivery {webhook_id} was already received")
        action = await self._apply(app, event)
        log.info("webhook %s for app %s: %s", event.type, app.name, action)
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

    async def _apply(self, app: AppConfig, event: WebhookEvent) -> str:
        if event.type == UNINSTALL:
            kind, resource_id = _resource_of(event)
            deleted = await self._manager.uninstall(app.app_id, kind, resource_id)
            return (
                f"deleted {kind} {resource_id}" if deleted else f"no token for {kind} {resource_id}"
            )
        if event.type == INSTALL and event.install_type == "Location" and event.location_id:
            # A location minting failed for before may be approved now.
            self._manager.forget(ResourceKey(app.app_id, "location", event.location_id))
            try:
                await self._manager.access_token(app, "location", event.location_id)
            except NoToken:
                # A location install brings its token through the OAuth callback.
                return f"noted location {event.location_id}; its token comes with the callback"
            return f"token ready for location {event.location_id}"
        return "nothing to do"


def _resource_of(event: WebhookEvent) -> tuple[ResourceKind, str]:
    if event.location_id:
        return "location", event.location_id
    return "company", event.company_id or ""
