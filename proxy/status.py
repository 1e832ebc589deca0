"""What this process knows of each resource it served, for `/status` and `/status.json`.

The limiter's shared state lives in Redis; this board is the local view: the last
decision's remaining counts, requests held right now, and the upstream's last
`X-RateLimit-*` headers. It keeps the most recently seen resources only, so 10,000 quiet
resources cost a bounded amount of memory: under 1 KB a resource with the upstream's five
headers, so under 10 MB however many resources callers name.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from proxy.limiter.base import Decision
from proxy.typing import ResourceKey, ResourceKind

CAPACITY = 10_000
UPSTREAM_PREFIX = "x-ratelimit-"


@dataclass(slots=True)
class ResourceView:
    """The local view of one resource."""

    app: str
    kind: ResourceKind
    id: str
    burst_remaining: int = 0
    daily_remaining: int = 0
    waiting: int = 0
    last_seen: float = 0.0
    # (name, value) pairs with interned names, not a dict: a view takes half the memory.
    upstream: tuple[tuple[str, str], ...] = ()
    token_expires_at: float | None = None


class StatusBoard:
    """Resource views, most recently seen last, at most `capacity` of them."""

    def __init__(self, capacity: int = CAPACITY, clock: Callable[[], float] = time.time) -> None:
        self._views: OrderedDict[ResourceKey, ResourceView] = OrderedDict()
        self._capacity = capacity
        self._clock = clock

    def _view(self, key: ResourceKey) -> ResourceView:
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = ResourceView(key.app, key.kind, key.id)
            if len(self._views) > self._capacity:
                self._views.popitem(last=False)
        self._views.move_to_end(key)
        view.last_seen = self._clock()
        return view

    def decided(self, key: ResourceKey, decision: Decision) -> None:
        view = self._view(key)
        view.burst_remaining = decision.burst_remaining
        view.daily_remaining = decision.daily_remaining

    def waiting(self, key: ResourceKey, delta: int) -> None:
        self._view(key).waiting += delta

    def answered(self, key: ResourceKey, headers: Mapping[str, str]) -> None:
        """Keep the upstream's rate-limit headers (an answer without any, such as a 401
        given before the upstream counted the request, leaves the last ones)."""
        upstream = tuple(
            (sys.intern(str(name)), value)
            for name, value in headers.items()
            if name.lower().startswith(UPSTREAM_PREFIX)
        )
        view = self._view(key)
        if upstream:
            view.upstream = upstream

    def snapshot(
        self, token_expiry: Callable[[ResourceKey], float | None]
    ) -> list[dict[str, object]]:
        """Every view as plain data, most recent first, with the cached token expiry."""
        rows = []
        for key, view in reversed(self._views.items()):
            view.token_expires_at = token_expiry(key)
            row = asdict(view)
            row["upstream"] = dict(view.upstream)
            rows.append(row)
        return rows
