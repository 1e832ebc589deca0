"""The limits each key really has, as the upstream's X-RateLimit-* headers state them.

HighLevel's 100 per 10 s and 200,000 a day are the common case, not every case: a plan
with other limits, or a lowered limit for a Private Integration, shows in
`X-RateLimit-Max`, `X-RateLimit-Interval-Milliseconds` and `X-RateLimit-Limit-Daily` on
every answer. `limits.learn` says how far to follow them: `down` (the default) only
where they are stricter than configured, `up` both ways, `off` never. A key whose stated
limits match the configuration keeps none.

"Stricter" for a burst limit: (N1 per W1) is at least as strict as (N2 per W2) when any
schedule it allows fits the other too: a window of W2 holds at most N1 * ceil(W2 / W1) of
its requests, so when that is at most N2. With `down`, whichever of the stated and the
configured burst limits is at least as strict as the other is kept; when neither is
(60 per 5 s against 100 per 10 s), the smaller count over the longer interval, which
satisfies both. The daily limit is the smaller of the two.

This is the process's view; with Redis the limits a replica learns are written beside
the key's slots, the limiter script decides with them, and every replica adopts them from
its answers (`adopt`), so one replica's answer teaches them all. Each change is logged
once, where it happens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict

from proxy.headers import (
    UPSTREAM_BURST_MAX,
    UPSTREAM_DAILY_LIMIT,
    UPSTREAM_INTERVAL_MS,
    Headers,
    upstream_remaining,
)
from proxy.limiter.base import Limits
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

# Distinct statements of the limits (three header values) whose outcome is remembered.
STATEMENTS_KEPT = 256


def at_least_as_strict(first: Limits, second: Limits) -> bool:
    """Whether every schedule `first`'s burst limit allows fits `second`'s too."""
    windows = math.ceil(second.window_s / first.window_s - 1e-9)
    return first.burst * max(1, windows) <= second.burst


class LearnedLimits:
    """Each key's limits where they differ from the configured ones; at most `max_keys`
    keys, the least recently changed forgotten first (they are learned again from the
    next answer)."""

    def __init__(self, configured: Limits, mode: str, max_keys: int) -> None:
        if mode not in ("down", "up", "off"):
            raise ValueError(f"limits.learn must be down, up or off, got {mode!r}")
        self.configured = configured
        self._mode = mode
        self._max_keys = max_keys
        self._learned: OrderedDict[ResourceKey, Limits] = OrderedDict()
        # What each statement of the headers allows (answers repeat the same few).
        self._allowed_for: dict[tuple[str | None, str | None, str | None], Limits] = {}

    def limits_for(self, key: ResourceKey) -> Limits:
        """The key's limits (its pad is the configured floor: the caller sets the pad)."""
        return self._learned.get(key, self.configured)

    def is_learned(self, key: ResourceKey) -> bool:
        return key in self._learned

    def learn(self, key: ResourceKey, headers: Headers) -> Limits | None:
        """Follow what an answer's headers state of the key's limits; the new limits when
        they changed (logged), else None."""
        if self._mode == "off":
            return None
        said = (
            headers.get(UPSTREAM_BURST_MAX),
            headers.get(UPSTREAM_INTERVAL_MS),
            headers.get(UPSTREAM_DAILY_LIMIT),
        )
        allowed = self._allowed_for.get(said)
        if allowed is None:
            stated = self._stated(headers)
            if stated is None:
                return None
            if len(self._allowed_for) >= STATEMENTS_KEPT:
                self._allowed_for.clear()
            allowed = self._allowed_for[said] = self._set_pad(self._allowed(stated))
        if allowed == self._learned.get(key, self.configured):
            return None  # the usual answer: nothing new (checked before any copy is made)
        return self._set(key, allowed, said="the upstream states")

    def adopt(self, key: ResourceKey, limits: Limits) -> Limits | None:
        """Take the limits another replica learned; the new limits when they changed,
        else None."""
        if self._mode == "off":
            return None
        return self._set(key, limits, said="another replica learned")

    def _stated(self, headers: Headers) -> Limits | None:
        burst = upstream_remaining(headers, UPSTREAM_BURST_MAX)
        interval_ms = upstream_remaining(headers, UPSTREAM_INTERVAL_MS)
        daily = upstream_remaining(headers, UPSTREAM_DAILY_LIMIT)
        if burst is None and interval_ms is None and daily is None:
            return None
        configured = self.configured
        return dataclasses.replace(
            configured,
            burst=burst or configured.burst,
            window_s=interval_ms / 1000 if interval_ms else configured.window_s,
            daily=daily or configured.daily,
        )

    def _allowed(self, stated: Limits) -> Limits:
        """`stated` as far as `limits.learn` lets the limits move from the configured."""
        if self._mode == "up":
            return stated
        configured = self.configured
        if at_least_as_strict(configured, stated):
            burst, window_s = configured.burst, configured.window_s
        elif at_least_as_strict(stated, configured):
            burst, window_s = stated.burst, stated.window_s
        else:
            burst = min(configured.burst, stated.burst)
            window_s = max(configured.window_s, stated.window_s)
        return dataclasses.replace(
            configured, burst=burst, window_s=window_s, daily=min(configured.daily, stated.daily)
        )

    def _set_pad(self, limits: Limits) -> Limits:
        # The pad is each replica's own (limiter/pad.py): never part of what is learned.
        if limits.pad_s == self.configured.pad_s:
            return limits
        return dataclasses.replace(limits, pad_s=self.configured.pad_s)

    def _set(self, key: ResourceKey, limits: Limits, *, said: str) -> Limits | None:
        limits = self._set_pad(limits)
        if limits == self.limits_for(key):
            return None
        if limits == self.configured:
            del self._learned[key]
            log.info("limits for %s are the configured ones again (%s)", key.tag, said)
            return limits
        self._learned[key] = limits
        self._learned.move_to_end(key)
        while len(self._learned) > self._max_keys:
            self._learned.popitem(last=False)
        log.warning(
            "limits for %s follow the upstream (%s): %d per %g s and %d a day, where the "
            "configuration says %d per %g s and %d a day",
            key.tag,
            said,
            limits.burst,
            limits.window_s,
            limits.daily,
            self.configured.burst,
            self.configured.window_s,
            self.configured.daily,
        )
        return limits
