"""Burst and daily limits per resource, with a sliding or fixed burst window.

Burst: at most ``burst`` admitted requests per ``interval_ms``, counted either in the
sliding window ``(now - W, now]`` or in fixed windows aligned to multiples of W since the
epoch. Daily: at most ``daily`` per UTC day. A refused request consumes nothing.

Whatever the window kind, every resource also keeps the admitted times of the last W
(to measure ``max_in_window``, the most admissions any sliding W-window ever held) and a
bounded history of admitted times, so tests can check the limits from the outside.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from proxy.simulator.config import SimulatorConfig

HISTORY_LIMIT = 100_000
DAY_S = 86400


@dataclass(frozen=True)
class LimitView:
    """A resource's limits and what is left of them, as the five response headers say."""

    burst: int
    interval_ms: int
    daily: int
    burst_remaining: int
    daily_remaining: int

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit-Daily": str(self.daily),
            "X-RateLimit-Daily-Remaining": str(self.daily_remaining),
            "X-RateLimit-Interval-Milliseconds": str(self.interval_ms),
            "X-RateLimit-Max": str(self.burst),
            "X-RateLimit-Remaining": str(self.burst_remaining),
        }


@dataclass
class _Window:
    recent: deque[float] = field(default_factory=deque)
    history: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_LIMIT))
    refusals: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY_LIMIT))
    fixed_index: int = -1
    fixed_count: int = 0
    day: int = -1
    day_count: int = 0
    max_in_window: int = 0


class LimitBook:
    """Window state of every resource, read against the (mutable) config's limits."""

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config
        self._windows: dict[str, _Window] = {}

    def allows(self, resource: str, now: float) -> bool:
        """Whether one more request for ``resource`` fits both limits at ``now``."""
        window = self._window(resource, now)
        return (
            self._burst_used(window, now) < self._config.burst
            and window.day_count < self._config.daily
        )

    def admit(self, resource: str, now: float) -> None:
        """Record one admitted request for ``resource`` at ``now``."""
        window = self._window(resource, now)
        window.recent.append(now)
        window.history.append(now)
        window.fixed_count += 1
        window.day_count += 1
        window.max_in_window = max(window.max_in_window, len(window.recent))

    def refuse(self, resource: str, now: float) -> None:
        """Record one request for ``resource`` refused over its limits at ``now``."""
        self._window(resource, now).refusals.append(now)

    def view(self, resource: str, now: float) -> LimitView:
        window = self._window(resource, now)
        config = self._config
        return LimitView(
            burst=config.burst,
            interval_ms=config.interval_ms,
            daily=config.daily,
            burst_remaining=max(0, config.burst - self._burst_used(window, now)),
            daily_remaining=max(0, config.daily - window.day_count),
        )

    def max_in_window(self, resource: str) -> int:
        window = self._windows.get(resource)
        return 0 if window is None else window.max_in_window

    def admitted_times(self, resource: str) -> list[float]:
        """The admitted times of ``resource``, oldest first (the last 100k)."""
        window = self._windows.get(resource)
        return [] if window is None else list(window.history)

    def refused_times(self, resource: str) -> list[float]:
        """When requests of ``resource`` were refused over its limits, oldest first."""
        window = self._windows.get(resource)
        return [] if window is None else list(window.refusals)

    def clear(self) -> None:
        self._windows.clear()

    def _burst_used(self, window: _Window, now: float) -> int:
        if self._config.window_kind == "sliding":
            return len(window.recent)
        return window.fixed_count

    def _window(self, resource: str, now: float) -> _Window:
        """The resource's state, rolled forward to ``now``."""
        window = self._windows.setdefault(resource, _Window())
        interval_ms = self._config.interval_ms
        start = now - interval_ms / 1000
        while window.recent and window.recent[0] <= start:
            window.recent.popleft()
        fixed_index = int(now * 1000 // interval_ms)
        if fixed_index != window.fixed_index:
            window.fixed_index, window.fixed_count = fixed_index, 0
        day = int(now // DAY_S)
        if day != window.day:
            window.day, window.day_count = day, 0
        return window
