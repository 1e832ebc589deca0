"""Outgoing alerts: a signed JSON POST to `alerts.webhook_url`, delivered in the background.

The body is compact JSON, signed under `alerts.secret` as everything the proxy sends to
people's endpoints is (`proxy.signing`: HMAC-SHA256 of `<timestamp>.<body>`); the
timestamp is the second the alert was made, which the body repeats as `time`, so every
attempt of one alert is the same message and a receiver can refuse old or replayed ones.
Delivery never holds up whoever raised the alert: each one is a task of its own. A
network error, a timeout (`alerts.timeout_s` per attempt), a 429 or a 5xx is tried again
after a pause that doubles from `BACKOFF_S` (at most `MAX_BACKOFF_S`), up to
`alerts.attempts` attempts in all; any other answer ends it (a 2xx delivered it). The URL
is never logged whole: chat webhooks carry their secret in the path, so log lines name
only its origin. On close, deliveries under way get `alerts.timeout_s` to finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from proxy.config import AlertsConfig
from proxy.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

log = logging.getLogger(__name__)

BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0

Outcome = Literal["delivered", "retry", "refused"]


def backoff_s(attempt: int, base_s: float = BACKOFF_S) -> float:
    """The pause after failed attempt number `attempt` (1-based)."""
    return float(min(MAX_BACKOFF_S, base_s * 2 ** (attempt - 1)))


class AlertSender:
    """Sends alerts to the configured URL, each in a background task."""

    def __init__(
        self,
        config: AlertsConfig,
        session: aiohttp.ClientSession | None,
        *,
        base_backoff_s: float = BACKOFF_S,
    ) -> None:
        """`session` None (no `alerts.webhook_url`): alerts go nowhere."""
        self._config = config
        self._session = session
        self._base_backoff_s = base_backoff_s
        self._tasks: set[asyncio.Task[None]] = set()
        parts = urlsplit(config.webhook_url)
        self._origin = f"{parts.scheme}://{parts.hostname}" if parts.hostname else "-"
        self.accepted = 0  # alerts handed over for delivery
        self.delivered = 0
        self.failed = 0  # given up after the last attempt, or refused by the receiver

    @property
    def enabled(self) -> bool:
        return self._session is not None and bool(self._config.webhook_url)

    def notify(self, event: Mapping[str, object], about: str) -> None:
        """Deliver `event` (JSON-able; with an int `time`) in the background; `about`
        names it in log lines."""
        if not self.enabled:
            return
        self.accepted += 1
        # A context of its own: the request that met the dead token must not label the
        # delivery's lines (it is long answered by then).
        task = asyncio.create_task(self._deliver(dict(event), about), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Give deliveries under way `alerts.timeout_s` to finish, then cancel them."""
        if not self._tasks:
            return
        pending = set(self._tasks)
        _, late = await asyncio.wait(pending, timeout=self._config.timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)  # a cancel of this close propagates
        if late:
            log.warning("%d alert(s) to %s not delivered before shutdown", len(late), self._origin)

    async def _deliver(self, event: dict[str, object], about: str) -> None:
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        timestamp = str(event.get("time", ""))
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._config.secret, timestamp, body),
            TIMESTAMP_HEADER: timestamp,
        }
        attempts = self._config.attempts
        for attempt in range(1, attempts + 1):
            outcome = await self._attempt(body, headers, about, attempt)
            if outcome == "delivered":
                self.delivered += 1
                log.info("alert %s delivered to %s (attempt %d)", about, self._origin, attempt)
                return
            if outcome == "refused":
                break
            if attempt < attempts:
                await asyncio.sleep(backoff_s(attempt, self._base_backoff_s))
        self.failed += 1
        log.error("alert %s not delivered to %s: giving up", about, self._origin)

    async def _attempt(
        self, body: bytes, headers: dict[str, str], about: str, attempt: int
    ) -> Outcome:
        assert self._session is not None
        try:
            async with self._session.post(
                self._config.webhook_url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._config.timeout_s),
            ) as answer:
                status = answer.status
                await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The class only: an aiohttp error's text may quote the URL (and its secret).
            self._warn(about, attempt, type(exc).__name__)
            return "retry"
        if 200 <= status < 300:
            return "delivered"
        self._warn(about, attempt, f"HTTP {status}")
        return "retry" if status == 429 or status >= 500 else "refused"

    def _warn(self, about: str, attempt: int, what: str) -> None:
        log.warning(
            "alert %s to %s failed (attempt %d of %d): %s",
            about,
            self._origin,
            attempt,
            self._config.attempts,
            what,
        )


@asynccontextmanager
async def open_alerts(config: AlertsConfig) -> AsyncIterator[AlertSender]:
    """An AlertSender for `config`, with a session of its own when a URL is configured
    (kept apart from the upstream's pool and its settings); closed after its deliveries."""
    if not config.webhook_url:
        yield AlertSender(config, None)
        return
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        sender = AlertSender(config, session)
        try:
            yield sender
        finally:
            await sender.aclose()
