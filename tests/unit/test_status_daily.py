"""The status board's daily budget (today's count, near the limit at 80%, the projection
for the end of the limit day), each key's limits, and the metrics read from the board.
Time moves on a clock the tests hold."""

from __future__ import annotations

import math

from proxy.limiter.base import Decision, Limits
from proxy.metrics import Metrics
from proxy.status import StatusBoard
from proxy.typing import ResourceKey
from tests.support.limiters import ManualClock

CONFIGURED = Limits(burst=100, window_s=10.0, pad_s=0.1, daily=1000)
KEY = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", "dailyLoc1")
OTHER = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", "dailyLoc2")


def decision(
    daily_remaining: int, ends_in_s: float, *, admitted: bool = True, local: bool = False
) -> Decision:
    return Decision(
        admitted=admitted,
        wait_s=0.0,
        retry_after_s=0.0 if admitted else ends_in_s,
        limited_by="" if admitted else "daily",
        burst_remaining=50,
        burst_reset_s=1.0,
        daily_remaining=daily_remaining,
        daily_reset_s=ends_in_s,
        local=local,
    )


def row(board: StatusBoard, key: ResourceKey = KEY) -> dict[str, object]:
    [found] = [r for r in board.snapshot(lambda _key: None) if r["id"] == key.id]
    return found


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def test_todays_count_is_the_limit_less_the_remaining_and_near_from_80_percent() -> None:
    """799 of 1,000 used is not near the limit; 800 is."""
    board = StatusBoard(CONFIGURED, clock=ManualClock())
    board.decided(KEY, decision(201, 3600))
    before = row(board)
    assert (before["daily_used"], before["near_daily_limit"]) == (799, False)
    board.decided(KEY, decision(200, 3600))
    after = row(board)
    assert (after["daily_used"], after["near_daily_limit"]) == (800, True)
    assert after["limits"] == {"burst": 100, "window_s": 10.0, "daily": 1000, "learned": False}


def test_projection_is_the_count_plus_the_rate_until_the_day_ends() -> None:
    """The count rising 300 in 300 s is 1 a second: 400 used with 3,300 s left projects
    3,700. Quiet for the next 300 s, the rate decays by e^-1 and is averaged over 600 s."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    board.decided(KEY, decision(900, 3600))  # 100 used when first seen: no rate yet
    assert (row(board)["daily_projected"], row(board)["daily_rate_per_min"]) == (100, 0.0)
    clock.advance(300)
    board.decided(KEY, decision(600, 3300))
    steady = row(board)
    assert (steady["daily_used"], steady["daily_projected"]) == (400, 3700)
    assert steady["daily_rate_per_min"] == 60.0
    clock.advance(300)
    quiet = row(board)
    rate = math.exp(-1) / (1 + math.exp(-1))  # (1 - e^-1) e^-1 / (1 - e^-2)
    assert quiet["daily_projected"] == round(400 + rate * 3000)


def test_a_steady_stream_reads_as_its_rate() -> None:
    """One request every 6 s for half an hour reads as 10 a minute, and projects that."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    for index in range(301):
        board.decided(KEY, decision(999 - index, 7200 - 6 * index))
        clock.advance(6)
    clock.advance(-6)  # back to the last decision
    view = row(board)
    assert view["daily_rate_per_min"] == 10.0
    assert view["daily_projected"] == 300 + 1 + round((7200 - 1800) / 6)


def test_the_first_minute_counts_as_a_minute() -> None:
    """Two requests a millisecond apart, just seen, read as about one a minute rather than
    a thousand a second."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    board.decided(KEY, decision(990, 3600))
    clock.advance(0.001)
    board.decided(KEY, decision(989, 3600))
    assert row(board)["daily_rate_per_min"] == 1.1


def test_a_new_limit_day_starts_afresh() -> None:
    """Once the day of the last decision ends, its count is not today's: none is shown,
    nothing is near, and the next day's first count is a baseline, not a rise."""
    clock = ManualClock()
    metrics = Metrics()
    board = StatusBoard(CONFIGURED, clock=clock, metrics=metrics)
    board.decided(KEY, decision(100, 100))
    assert sample(metrics, "hoopai_proxy_daily_near_limit_resources") == 1
    clock.advance(100)
    ended = row(board)
    assert (ended["daily_used"], ended["daily_projected"], ended["near_daily_limit"]) == (
        None,
        None,
        False,
    )
    assert sample(metrics, "hoopai_proxy_daily_near_limit_resources") == 0
    assert sample(metrics, "hoopai_proxy_daily_use_max_ratio") == 0
    board.decided(KEY, decision(995, 86_400))
    fresh = row(board)
    assert (fresh["daily_used"], fresh["daily_projected"], fresh["daily_rate_per_min"]) == (
        5,
        5,
        0.0,
    )


def test_a_count_that_falls_starts_the_rate_afresh() -> None:
    """A count lower than the last one (the remaining rose) is a new baseline, never a
    negative rate: the projection is the count itself until the count rises again."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    board.decided(KEY, decision(900, 3600))
    clock.advance(60)
    board.decided(KEY, decision(800, 3540))
    clock.advance(60)
    board.decided(KEY, decision(850, 3480))
    fell = row(board)
    assert (fell["daily_used"], fell["daily_projected"], fell["daily_rate_per_min"]) == (
        150,
        150,
        0.0,
    )


def test_learned_limits_are_shown_and_todays_count_stays() -> None:
    """set_limits shows the key's own limits, marked learned; the count carries over (the
    remaining moves with the limit) and is measured against the new daily limit. A key
    without set_limits shows the configured limits."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    board.decided(KEY, decision(900, 3600))
    board.decided(OTHER, decision(900, 3600))
    board.set_limits(KEY, Limits(burst=50, window_s=5.0, pad_s=0.1, daily=120), learned=True)
    learned = row(board)
    assert learned["limits"] == {"burst": 50, "window_s": 5.0, "daily": 120, "learned": True}
    assert (learned["daily_used"], learned["daily_remaining"]) == (100, 20)
    assert learned["near_daily_limit"] is True  # 100 of 120
    assert row(board, OTHER)["limits"] == {
        "burst": 100,
        "window_s": 10.0,
        "daily": 1000,
        "learned": False,
    }
    clock.advance(60)
    board.decided(KEY, decision(19, 3540))
    assert row(board)["daily_used"] == 101
    assert row(board)["daily_rate_per_min"] == 1.0  # one more, not a jump of 880


def test_metrics_count_requests_taken_near_the_limit() -> None:
    """With 10 a day, the 9th and 10th requests are taken at 8 and 9 used (80% or more),
    as Envoy counts near_limit; a refusal is not counted. The gauges read the board: one
    resource near its limit, the highest use 100%; no resource id is in the scrape."""
    clock = ManualClock()
    metrics = Metrics()
    board = StatusBoard(
        Limits(burst=100, window_s=10.0, pad_s=0.1, daily=10), clock=clock, metrics=metrics
    )
    counted = []
    for remaining in range(9, -1, -1):
        board.decided(KEY, decision(remaining, 3600))
        counted.append(sample(metrics, "hoopai_proxy_daily_near_limit_requests_total"))
    board.decided(KEY, decision(0, 3600, admitted=False))
    board.decided(OTHER, decision(5, 3600))
    assert counted == [0] * 8 + [1, 2]
    assert sample(metrics, "hoopai_proxy_daily_near_limit_requests_total") == 2
    assert sample(metrics, "hoopai_proxy_daily_near_limit_resources") == 1
    assert sample(metrics, "hoopai_proxy_daily_use_max_ratio") == 1.0
    text = metrics.render().decode()
    assert KEY.id not in text and OTHER.id not in text


def test_local_decisions_leave_the_days_count() -> None:
    """A decision the fallback made in process counts against this replica's share: the
    day's count stays the last shared one, and near the limit follows that count."""
    clock = ManualClock()
    metrics = Metrics()
    board = StatusBoard(CONFIGURED, clock=clock, metrics=metrics)
    board.decided(KEY, decision(150, 3600))  # 850 used
    board.decided(KEY, decision(3, 3600, local=True))
    view = row(board)
    assert (view["daily_used"], view["daily_remaining"], view["burst_remaining"]) == (
        850,
        150,
        50,
    )
    assert sample(metrics, "hoopai_proxy_daily_near_limit_requests_total") == 2

