"""The pad: the p99.9 of recent slot-to-answer times, between a floor and a ceiling."""

from __future__ import annotations

import pytest

from proxy.limiter.pad import PadEstimate


def test_the_floor_holds_until_answers_are_slower() -> None:
    pad = PadEstimate(0.1, 1.0)
    assert pad.pad_s == 0.1
    pad.record(0.02)
    assert pad.pad_s == 0.1
    pad.record(0.3)
    assert pad.pad_s == 0.3  # with few samples, the largest


def test_the_ceiling_caps_slow_answers() -> None:
    pad = PadEstimate(0.1, 1.0)
    pad.record(5.0)
    assert pad.pad_s == 1.0


def test_it_is_the_p999_of_the_last_samples_and_forgets_older_ones() -> None:
    pad = PadEstimate(0.0, 10.0, samples=1000)
    for i in range(1000):
        pad.record(i / 1000)  # 0.000 .. 0.999
    assert pad.pad_s == pytest.approx(0.998)
    for _ in range(1000):
        pad.record(0.05)
    assert pad.pad_s == pytest.approx(0.05)


def test_nonsense_samples_are_ignored() -> None:
    pad = PadEstimate(0.1, 1.0)
    pad.record(float("nan"))
    pad.record(-1.0)
    assert pad.pad_s == 0.1
