"""Fault injection: what is set (``Faults``) and the seeded dice that decide each request.

Ratios are drawn from ``random.Random(seed)`` so a run with the same seed and the same
request order fails the same requests. Ratios of 0 and 1 never draw, so turning one
fault on does not shift another fault's sequence. Arrival delays come from a second
stream of the same seed, for the same reason: jitter on or off, the ratios fail the same
requests.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

_RATIOS = ("error_ratio", "drop_ratio", "command_timeout_ratio")
_DELAYS = ("latency_ms", "arrival_delay_ms", "token_latency_ms", "token_accept_delay_ms")


@dataclass
class Faults:
    """The faults currently switched on. All off by default."""

    latency_ms: float = 0.0
    # The most an API request waits, a uniform draw from 0, between arriving and being
    # counted by the limits: the varying one-way delay from a sender to the real API's
    # counter, so requests sent W apart may be counted less than W apart.
    arrival_delay_ms: float = 0.0
    error_ratio: float = 0.0
    error_status: int = 503
    drop_ratio: float = 0.0
    command_timeout_ratio: float = 0.0
    token_latency_ms: float = 0.0
    # Before the token endpoint decides anything: a client that dies meanwhile changed
    # nothing (its request is cancelled), unlike token_latency_ms which comes after.
    token_accept_delay_ms: float = 0.0
    force_429: int = 0
    # The next N calls to /oauth/* (token, locationToken, installedLocations) answer
    # `error_status` before deciding anything: the token endpoint down for a while.
    oauth_errors: int = 0
    inactive_locations: set[str] = field(default_factory=set)
    # Location ids no Company owns: /oauth/locationToken refuses them even under a Company
    # install that approves every location (the proxy cannot know they do not exist).
    unknown_locations: set[str] = field(default_factory=set)

    def merge(self, updates: Mapping[str, object]) -> None:
        """Apply a partial update; raises ``ValueError`` naming the bad field, changing nothing."""
        checked = {name: _check(name, value) for name, value in updates.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["inactive_locations"] = sorted(self.inactive_locations)
        data["unknown_locations"] = sorted(self.unknown_locations)
        return data


def _check(name: str, value: object) -> object:
    if name in _RATIOS:
        return _number(name, value, 0.0, 1.0)
    if name in _DELAYS:
        return _number(name, value, 0.0, float("inf"))
    if name == "error_status":
        return int(_number(name, value, 500, 599, integer=True))
    if name in ("force_429", "oauth_errors"):
        return int(_number(name, value, 0, float("inf"), integer=True))
    if name in ("inactive_locations", "unknown_locations"):
        if not isinstance(value, list | tuple | set) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: must be a list of location ids, got {value!r}")
        return set(value)
    raise ValueError(f"{name}: unknown fault")


def _number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}: must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return float(value)


class Dice:
    """Seeded draws for fault ratios and arrival delays."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._random, self._delays = _streams(seed)

    def roll(self, ratio: float) -> bool:
        """True with probability ``ratio``."""
        if ratio <= 0:
            return False
        if ratio >= 1:
            return True
        return self._random.random() < ratio

    def delay_s(self, most_ms: float) -> float:
        """Seconds drawn uniformly from ``[0, most_ms]`` milliseconds; 0 draws nothing."""
        if most_ms <= 0:
            return 0.0
        return self._delays.uniform(0.0, most_ms) / 1000

    def reseed(self, seed: int | None = None) -> None:
        self._seed = self._seed if seed is None else seed
        self._random, self._delays = _streams(self._seed)


def _streams(seed: int) -> tuple[random.Random, random.Random]:
    """The ratio stream and the delay stream of ``seed`` (a string seed hashes the same in
    every process, so the delay stream is as reproducible as the ratio stream)."""
    return random.Random(seed), random.Random(f"arrival-delay:{seed}")
