"""Passing verified webhook deliveries on to the apps behind the proxy, signed by the proxy.

Every delivery the proxy verified and acted on (of any type, not only INSTALL and
UNINSTALL; never a refused or replayed one) is POSTed to each `webhooks.forward_to` URL,
its body byte for byte as HighLevel sent it, with these headers:

    Content-Type: application/json
    X-HoopAI-Timestamp: <unix seconds when this attempt was sent>
    X-HoopAI-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under forward_secret>
    X-HoopAI-Webhook-Id: <the delivery's webhookId>
    X-HoopAI-Event-Type: <the delivery's type>

so a subscriber checks one shared secret (`proxy.signing.verify`, or the copy in the README)
instead of HighLevel's public-key signatures. Forwarding runs in the background: the
answer to HighLevel never waits for a subscriber, and a subscriber that is down changes
nothing for HighLevel (the proxy has acted on the delivery; asking HighLevel to send it
again would act twice). A network error, a timeout, a 429 or a 5xx is tried again after
`retry_delays_s` (each attempt signed afresh); any other answer is final. Delivery is
therefore at least once (subscribers dedupe on the webhookId), and attempts still pending
when the process stops are given a few seconds, then dropped with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Sequence

import aiohttp
from yarl import URL

from proxy.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify

log = logging.getLogger(__name__)

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "EventForwarder", "sign", "verify"]

WEBHOOK_ID_HEADER = "X-HoopAI-Webhook-Id"
EVENT_TYPE_HEADER = "X-HoopAI-Event-Type"
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # six attempts over about a quarter minute
ATTEMPT_TIMEOUT_S = 10.0
CLOSE_GRACE_S = 5.0
# Forwards under way at once: each lives up to about 75 s while a subscriber is down, and a
# bulk install sends one delivery per location. Beyond this, a forward is dropped (logged).
MAX_PENDING = 1000
_RETRIED = frozenset({408, 425, 429})


class EventForwarder:
    """Forwards deliveries to the configured subscribers, each in a task of its own."""

    def __init__(
        self,
        urls: Sequence[str],
        secret: str,
        *,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        attempt_timeout_s: float = ATTEMPT_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if urls and not secret:
            raise ValueError("forwarding needs a secret to sign with")
        self._urls = tuple(urls)
        self._secret = secret
        self._delays = tuple(retry_delays_s)
        self._timeout = aiohttp.ClientTimeout(total=attempt_timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[bool]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self._urls)

    def forward(self, body: bytes, webhook_id: str, event_type: str) -> list[asyncio.Task[bool]]:
        """Start passing `body` on to every subscriber; the tasks end True when it was
        accepted (2xx), False when given up."""
        tasks = []
        for url in self._urls:
            if len(self._pending) >= MAX_PENDING:
                log.warning(
                    "not forwarding webhook %s to %s: %d forwards already pending",
                    webhook_id,
                    _where(url),
                    len(self._pending),
                )
                continue
            # A context of its own: the delivery's request id must not label the retries.
            task = asyncio.create_task(
                self._deliver(url, body, webhook_id, event_type), context=contextvars.Context()
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            tasks.append(task)
        return tasks

    async def aclose(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Give pending forwards `grace_s` to finish, drop the rest, close the session."""
        if self._pending:
            _, late = await asyncio.wait(set(self._pending), timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("dropped %d webhook forward(s) still pending at shutdown", len(late))
                await asyncio.gather(*late, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _deliver(self, url: str, body: bytes, webhook_id: str, event_type: str) -> bool:
        problem = ""
        for attempt, delay in enumerate((*self._delays, None)):
            problem = await self._attempt(url, body, webhook_id, event_type)
            if not problem:
                log.info("forwarded webhook %s to %s", webhook_id, _where(url))
                return True
            if problem.startswith("final"):
                break
            if delay is None:
                break
            log.info(
                "forwarding webhook %s to %s failed (%s), attempt %d; retrying",
                webhook_id,
                _where(url),
                problem,
                attempt + 1,
            )
            await asyncio.sleep(delay)
        log.warning("gave up forwarding webhook %s to %s: %s", webhook_id, _where(url), problem)
        return False

    async def _attempt(self, url: str, body: bytes, webhook_id: str, event_type: str) -> str:
        """One POST: "" when accepted, else what went wrong ("final ..." is not retried)."""
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            WEBHOOK_ID_HEADER: webhook_id,
            EVENT_TYPE_HEADER: event_type,
        }
        try:
            async with self._client().post(
                url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
            ) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__
        if 200 <= status < 300:
            return ""
        if status >= 500 or status in _RETRIED:
            return f"HTTP {status}"
        return f"final: HTTP {status}"

    def _client(self) -> aiohttp.ClientSession:
        # Its own session, made on first use: subscribers are not the upstream, and share
        # neither its connection pool nor its limits.
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session


def _where(url: str) -> str:
    """The URL's origin: hook URLs carry their secret in the userinfo, path or query."""
    with contextlib.suppress(ValueError):
        parts = URL(url)
        if parts.host:
            return f"{parts.scheme}://{parts.host}:{parts.port}"
    return "subscriber"
