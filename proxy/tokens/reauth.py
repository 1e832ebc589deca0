"""Resources whose refresh token is dead, and telling someone before a request fails.

HighLevel has no reconnect API: a refresh token refused as `invalid_grant` means a human
must install the app again for that resource. `ReauthWatch` keeps the dead resources this
process knows of, from two sources:
- the token manager reports each transition it makes (`marked`: only when its
  compare-and-set wrote the dead record, so of all processes sharing the store exactly
  one reports it) and each heal it makes (`cleared`: a reinstall, a delete, a revival);
- the keep-alive pass, which lists the store anyway, hands over every record (`observe`),
  so a resource marked or healed by another replica (or a `tokens` command) shows here
  within `tokens.keepalive_interval_s`. A change this process made while that list was
  being read is newer than the list, and wins over it.
From that set it keeps the gauge `hoopai_proxy_needs_reauth{app=<app name>}` (every
configured app, 0 included) and the `needs_reauth` list of /status.json. On a transition
it logs one WARNING event and, with `alerts.webhook_url` set, sends one signed alert.
`since` is when this process saw the transition happen; null when it learned of it from
the store (another process marked it, or it was dead before this process started).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from proxy.alerts import AlertSender
from proxy.config import Config
from proxy.metrics import Metrics
from proxy.tokens.operations import install_url
from proxy.tokens.store import NEEDS_REAUTH, TokenRecord
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

EVENT = "needs_reauth"


class ReauthWatch:
    """The resources that need a reinstall: gauge, status list, log event and alert."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        alerts: AlertSender,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._apps = {app.app_id: app for app in config.apps}
        self._metrics = metrics
        self._alerts = alerts
        self._clock = clock
        self._dead: dict[ResourceKey, float | None] = {}  # key -> since (epoch s) or None
        self._changes = 0  # transitions and heals reported to this process so far
        # The last change reported for each key, by its number: newer than a store list
        # that began before it.
        self._touched: dict[ResourceKey, tuple[int, bool]] = {}
        self._publish()

    # -- what the token manager reports ----------------------------------------------------

    def marked(self, record: TokenRecord, reason: str) -> None:
        """This process wrote `record` as needs_reauth: a transition. `reason` is the
        upstream's words (never a token)."""
        app = self._apps.get(record.app)
        name = app.name if app is not None else record.app
        url = install_url(app) if app is not None else None
        log.warning(
            "%s %s of app %s needs reauthorization (%s): install the app again at %s",
            record.kind,
            record.id,
            name,
            reason,
            url or "-",
            extra={"event": EVENT, "app": name, "kind": record.kind, "id": record.id},
        )
        if app is None:
            return
        now = self._clock()
        self._touch(record.key, dead=True)
        self._dead[record.key] = now
        self._publish()
        event = {
            "event": EVENT,
            "app": name,
            "app_id": record.app,
            "kind": record.kind,
            "id": record.id,
            "install_url": url,
            "time": int(now),
        }
        self._alerts.notify(event, about=f"{EVENT} {record.kind} {record.id} of app {name}")

    def cleared(self, key: ResourceKey) -> None:
        """The resource was installed again, deleted, or found alive after all."""
        self._touch(key, dead=False)
        if key in self._dead:
            del self._dead[key]
            self._publish()
            app = self._apps.get(key.app)
            name = app.name if app is not None else key.app
            log.info("%s %s of app %s no longer needs reauthorization", key.kind, key.id, name)

    # -- what keep-alive reports -----------------------------------------------------------

    def scan_began(self) -> int:
        """Call before reading the store's list; pass the answer to `observe`."""
        return self._changes

    def observe(self, records: Iterable[TokenRecord], began: int) -> None:
        """Every stored record, as listed after `scan_began()` returned `began`."""
        dead = {
            record.key
            for record in records
            if record.status == NEEDS_REAUTH and record.app in self._apps
        }
        for key, (change, is_dead) in self._touched.items():
            if change > began:  # reported while the list was being read: newer
                if is_dead:
                    dead.add(key)
                else:
                    dead.discard(key)
        self._touched = {key: t for key, t in self._touched.items() if t[0] > began}
        self._dead = {key: self._dead.get(key) for key in sorted(dead)}
        self._publish()

    # -- what the admin listener shows -----------------------------------------------------

    def listing(self) -> list[dict[str, object]]:
        """The `needs_reauth` list of /status.json, ordered by app, kind and id."""
        shown: list[dict[str, object]] = []
        for key, since in sorted(self._dead.items()):
            app = self._apps[key.app]
            shown.append(
                {
                    "app": app.name,
                    "app_id": key.app,
                    "kind": key.kind,
                    "id": key.id,
                    "since": since,
                    "install_url": install_url(app),
                }
            )
        return shown

    # -- internals -------------------------------------------------------------------------

    def _touch(self, key: ResourceKey, *, dead: bool) -> None:
        self._changes += 1
        self._touched[key] = (self._changes, dead)

    def _publish(self) -> None:
        counts = Counter(key.app for key in self._dead)
        for app_id, app in self._apps.items():
            self._metrics.needs_reauth.labels(app=app.name).set(counts[app_id])
