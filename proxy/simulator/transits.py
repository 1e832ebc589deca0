"""Each API request's way from arrival to the limits' count: when it arrived, the delay the
``arrival_delay_ms`` fault drew for it, and when the limits counted it, per resource.

This is how a test sees the jitter from outside: the limits' own history holds only the
counted times, which are what the upstream's windows see; the arrival times are what a
sender's spacing decided.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from proxy.simulator.limits import HISTORY_LIMIT


@dataclass(frozen=True, slots=True)
class Transit:
    """One API request that reached the limits, on the simulator's clock."""

    received_at: float
    delay_s: float  # drawn from arrival_delay_ms; 0 while it is off
    counted_at: float
    admitted: bool


class TransitLog:
    """The last ``HISTORY_LIMIT`` transits of every resource, oldest counted first."""

    def __init__(self) -> None:
        self._by_resource: dict[str, deque[Transit]] = {}

    def record(self, resource: str, transit: Transit) -> None:
        log = self._by_resource.setdefault(resource, deque(maxlen=HISTORY_LIMIT))
        log.append(transit)

    def of(self, resource: str) -> list[Transit]:
        return list(self._by_resource.get(resource, ()))

    def clear(self) -> None:
        self._by_resource.clear()
