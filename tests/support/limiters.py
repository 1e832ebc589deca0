"""Limiter backends for tests, each on a clock the test moves by hand.

One test body runs against every backend (memory and Redis), so both are held to the
same answers; the Redis backend is given the test's clock in place of Redis TIME.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.limiter.base import Day, Limits
from proxy.typing import ResourceKey

START = 1_800_000_000.0


@dataclass
class ManualClock:
    """A clock that only moves when told to."""

    now: float = START

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


KEY = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", "loc1")
SMALL = Limits(burst=5, window_s=1.0, pad_s=0.1, daily=1000)
TODAY = Day(id="2027-01-15", ends_in_s=3600.0)
