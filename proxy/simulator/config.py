"""The simulator's settings: which apps exist, the limits it enforces, token lifetimes.

Mutable on purpose: the control endpoints (``/_sim/limits``, ``/_sim/config``,
``/_sim/apps``) change a running simulator's settings in place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, cast

WindowKind = Literal["sliding", "fixed"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("sliding", "fixed")

DEFAULT_CLIENT_ID = "6650f1a2b3c4d5e6f7a8b9c0-simdemo01"
DEFAULT_CLIENT_SECRET = "sim-secret"

# HighLevel refresh tokens die after one year unused.
ONE_YEAR_S = 365 * 86400.0


def _default_apps() -> dict[str, str]:
    return {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}


@dataclass
class SimulatorConfig:
    """Settings of one simulator. ``apps`` maps client_id to client_secret."""

    apps: dict[str, str] = field(default_factory=_default_apps, repr=False)
    burst: int = 100
    interval_ms: int = 10000
    daily: int = 200000
    window: str = "sliding"
    access_token_lifetime_s: float = 86399
    seed: int = 0
    refresh_token_lifetime_s: float = ONE_YEAR_S

    def __post_init__(self) -> None:
        check_limits(self.burst, self.interval_ms, self.daily, self.window)
        check_lifetime("access_token_lifetime_s", self.access_token_lifetime_s)
        check_lifetime("refresh_token_lifetime_s", self.refresh_token_lifetime_s)

    def copy(self) -> SimulatorConfig:
        """A copy that shares no mutable state with this one."""
        return dataclasses.replace(self, apps=dict(self.apps))

    @property
    def window_kind(self) -> WindowKind:
        return cast(WindowKind, self.window)


def app_id_of(client_id: str) -> str:
    """The app id: the part of a client id before the first ``-``."""
    return client_id.split("-", 1)[0]


def check_limits(burst: object, interval_ms: object, daily: object, window: object) -> None:
    """Raise ``ValueError`` naming the field when a limit setting is unusable."""
    for name, value in (("burst", burst), ("interval_ms", interval_ms), ("daily", daily)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if not isinstance(window, str) or window not in WINDOW_KINDS:
        raise ValueError(f"window: must be one of {', '.join(WINDOW_KINDS)}, got {window!r}")


def check_lifetime(name: str, value: object) -> float:
    """The lifetime as a float; ``ValueError`` when it is not a positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{name}: must be a positive number of seconds, got {value!r}")
    return float(value)
