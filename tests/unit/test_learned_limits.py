"""Limits learned from the upstream's headers: how far `limits.learn` follows them."""

from __future__ import annotations

import logging

import pytest
from multidict import CIMultiDict

from proxy.learned_limits import LearnedLimits, at_least_as_strict
from proxy.limiter.base import Limits
from proxy.typing import ResourceKey

CONFIGURED = Limits(burst=100, window_s=10.0, pad_s=0.1, daily=200_000)
KEY = ResourceKey("app", "location", "loc1")


def stated(burst: int, interval_ms: int, daily: int) -> CIMultiDict[str]:
    return CIMultiDict(
        {
            "X-RateLimit-Max": str(burst),
            "X-RateLimit-Interval-Milliseconds": str(interval_ms),
            "X-RateLimit-Limit-Daily": str(daily),
            "X-RateLimit-Remaining": "5",
        }
    )


def limits(burst: int, window_s: float, daily: int = 200_000) -> Limits:
    return Limits(burst=burst, window_s=window_s, pad_s=0.1, daily=daily)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (limits(4, 5), limits(100, 10), True),  # at most 8 in any 10 s
        (limits(25, 10), limits(100, 10), True),
        (limits(100, 60), limits(100, 10), True),
        (limits(50, 5), limits(100, 10), True),  # 100 in 10 s at most
        (limits(60, 5), limits(100, 10), False),  # 120 in 10 s
        (limits(100, 10), limits(60, 5), False),  # 100 in 5 s
        (limits(100, 10), limits(25, 10), False),
    ],
)
def test_strictness_compares_whole_burst_limits(first, second, expected) -> None:
    assert at_least_as_strict(first, second) is expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (stated(25, 10000, 10000), limits(25, 10, 10000)),  # a lowered plan
        (stated(100, 60000, 200000), limits(100, 60)),  # a longer interval
        (stated(4, 1000, 200000), limits(4, 1)),  # stricter over any 10 s
        (stated(60, 5000, 200000), limits(60, 10)),  # neither: both satisfied
        (stated(200, 10000, 400000), None),  # higher: the configuration stays
    ],
)
def test_down_follows_only_what_is_stricter(headers, expected) -> None:
    learned = LearnedLimits(CONFIGURED, "down", max_keys=10)
    assert learned.learn(KEY, headers) == expected
    assert learned.limits_for(KEY) == (expected or CONFIGURED)


def test_up_follows_the_upstream_both_ways_and_off_never() -> None:
    up = LearnedLimits(CONFIGURED, "up", max_keys=10)
    assert up.learn(KEY, stated(200, 10000, 400000)) == limits(200, 10, 400000)
    off = LearnedLimits(CONFIGURED, "off", max_keys=10)
    assert off.learn(KEY, stated(25, 10000, 10000)) is None
    assert off.limits_for(KEY) == CONFIGURED


def test_a_change_is_logged_once_and_the_configured_limits_come_back(caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy.learned_limits")
    learned = LearnedLimits(CONFIGURED, "down", max_keys=10)
    for _ in range(3):
        learned.learn(KEY, stated(25, 10000, 200000))
    assert sum("follow the upstream" in r.getMessage() for r in caplog.records) == 1
    assert learned.is_learned(KEY)
    assert learned.learn(KEY, stated(100, 10000, 200000)) == CONFIGURED
    assert not learned.is_learned(KEY)


def test_the_pad_is_never_learned() -> None:
    """Another replica's limits arrive with its pad: only N, W and the daily count."""
    learned = LearnedLimits(CONFIGURED, "down", max_keys=10)
    theirs = Limits(burst=25, window_s=10.0, pad_s=0.4, daily=200_000)
    assert learned.adopt(KEY, theirs) == limits(25, 10)
    assert learned.adopt(KEY, theirs) is None


def test_answers_without_the_headers_change_nothing() -> None:
    learned = LearnedLimits(CONFIGURED, "down", max_keys=10)
    assert learned.learn(KEY, CIMultiDict({"X-RateLimit-Remaining": "3"})) is None


def test_at_most_max_keys_are_kept() -> None:
    learned = LearnedLimits(CONFIGURED, "down", max_keys=2)
    keys = [ResourceKey("app", "location", f"loc{i}") for i in range(3)]
    for key in keys:
        learned.learn(key, stated(25, 10000, 200000))
    assert [learned.is_learned(key) for key in keys] == [False, True, True]
