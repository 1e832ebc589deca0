"""Keep-alive: refresh tokens before anyone needs them, spread over time.

Access tokens are refreshed a little before the request path would have to (each record
at its own offset, derived from its key, so thousands of tokens issued at the same moment
are not refreshed at the same moment), and any refresh token older than
`tokens.refresh_token_max_age_days` is refreshed so that idle resources never reach the
upstream's one-year expiry (spread over a day the same way). Every refresh goes through
the token manager, so across replicas only one of them does it (the same lock); the
others find it done.

A pass refreshes the records it found due, the soonest to expire first, with at most
half of `tokens.max_concurrent_refreshes` (at least one) in flight: the token manager's
cap bounds every refresh of the process, and keep-alive leaves the other half to the
requests that need a token now. Records due together (after downtime) are therefore
refreshed a few at a time, and their next refreshes fall apart again by their offsets.

Each pass also hands the list it read to the reauth watch (proxy/tokens/reauth.py), so
the `needs_reauth` gauge and status list follow what other replicas marked or healed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping

from proxy.config import AppConfig, TokensConfig
from proxy.errors import ProxyError
from proxy.tokens.manager import TokenManager
from proxy.tokens.reauth import ReauthWatch
from proxy.tokens.store import OK, TokenRecord, TokenStore

log = logging.getLogger(__name__)

MAX_SPREAD_S = 3600.0
DAY_S = 86400.0


def spread_fraction(tag: str) -> float:
    """A stable number in [0, 1) for a key: its place in the spread."""
    digest = hashlib.sha256(tag.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def keepalive_concurrency(config: TokensConfig) -> int:
    """Keep-alive refreshes in flight at once: half the process's cap, at least one."""
    return max(1, config.max_concurrent_refreshes // 2)


class KeepAlive:
    """Finds records that are due and refreshes them, a few at a time."""

    def __init__(
        self,
        manager: TokenManager,
        store: TokenStore,
        apps: Mapping[str, AppConfig],
        config: TokensConfig,
        *,
        clock: Callable[[], float] = time.time,
        reauth: ReauthWatch | None = None,
    ) -> None:
        """`apps` maps marketplace app id to its config; `reauth`, when given, is shown
        every list a pass reads."""
        self._reauth = reauth
        self._manager = manager
        self._store = store
        self._apps = apps
        self._config = config
        self._clock = clock

    def due(self, record: TokenRecord, now: float) -> bool:
        """True when `record` should be refreshed now."""
        if record.status != OK or record.app not in self._apps:
            return False
        fraction = spread_fraction(record.tag)
        lifetime = max(0.0, record.expires_at - record.refreshed_at)
        refresh_at = (
            record.expires_at
            - self._config.refresh_skew_s
            - fraction * min(MAX_SPREAD_S, lifetime / 4)
        )
        max_age_s = self._config.refresh_token_max_age_days * DAY_S - fraction * DAY_S
        return now >= refresh_at or now - record.refreshed_at > max_age_s

    async def run_once(self) -> int:
        """Refresh every due record; returns how many were refreshed (or found refreshed)."""
        began = self._reauth.scan_began() if self._reauth is not None else 0
        records = await self._store.list()
        if self._reauth is not None:
            self._reauth.observe(records, began)
        now = self._clock()
        due = [record for record in records if self.due(record, now)]
        due.sort(key=lambda record: record.expires_at)  # the most urgent first
        queue = iter(due)
        refreshed = 0

        async def worker() -> None:
            nonlocal refreshed
            for record in queue:  # shared: each record goes to one worker
                try:
                    await self._manager.refresh_now(self._apps[record.app], record)
                except ProxyError as exc:
                    log.warning("keep-alive could not refresh %s: %s", record.tag, exc)
                else:
                    refreshed += 1

        workers = min(len(due), keepalive_concurrency(self._config))
        await asyncio.gather(*(worker() for _ in range(workers)))
        return refreshed

    async def run_forever(self) -> None:
        """Run until cancelled, every `tokens.keepalive_interval_s`."""
        while True:
            try:
                await self.run_once()
            except ProxyError as exc:  # the store being down must not end the task
                log.warning("keep-alive pass failed: %s", exc)
            except Exception:
                # Anything else (a bad record, a bug) must not end it either: idle refresh
                # tokens would then age out unnoticed.
                log.exception("keep-alive pass failed")
            await asyncio.sleep(self._config.keepalive_interval_s)
