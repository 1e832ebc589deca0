"""The status board keeps the most recently seen resources only, each at a small cost, and
counts admitted requests and the upstream's 429s per second for the dashboard's chart."""

from __future__ import annotations

import gc
import tracemalloc

from multidict import CIMultiDict

from proxy.limiter.base import Decision, Limits
from proxy.status import (
    CAPACITY,
    CHART_SPAN_S,
    UPSTREAM_429_SPAN_S,
    StatusBoard,
    count_second,
    seconds_between,
)
from proxy.typing import ResourceKey
from tests.support.limiters import ManualClock

CONFIGURED = Limits(burst=100, window_s=10.0, pad_s=0.1, daily=200_000)


def decision(index: int, daily: int, used: int) -> Decision:
    """A decision with counts of its own (not ints every view shares)."""
    return Decision(True, 0.0, 0.0, "", 300 + index % 50, 1.0, daily - used - index, 3600.0)


def answer(index: int) -> CIMultiDict[str]:
    return CIMultiDict(
        {
            "X-RateLimit-Limit-Daily": "200000",
            "X-RateLimit-Daily-Remaining": str(199_000 + index % 1000),
            "X-RateLimit-Interval-Milliseconds": "10000",
            "X-RateLimit-Max": "100",
            "X-RateLimit-Remaining": str(index % 100),
            "Content-Type": "application/json",
        }
    )


def test_board_keeps_the_newest_views_under_1200_bytes_each() -> None:
    """20,000 resources leave the 10,000 newest on the board, under 1,200 bytes each with
    the upstream's five headers, a daily rate, and (every other one) learned limits made
    afresh for each; the snapshot still gives those headers as a dict."""
    clock = ManualClock()
    gc.collect()
    tracemalloc.start()
    try:
        board = StatusBoard(CONFIGURED, clock=clock)
        before = tracemalloc.get_traced_memory()[0]
        for index in range(2 * CAPACITY):
            key = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", f"board{index:019d}")
            board.decided(key, decision(index, CONFIGURED.daily, 50_000))
            clock.advance(0.25)
            limits = CONFIGURED
            if index % 2:
                limits = Limits(burst=100, window_s=10.0, pad_s=0.1, daily=int("180000"))
                board.set_limits(key, limits, learned=True)
            board.decided(key, decision(index, limits.daily, 50_003))
            board.answered(key, answer(index))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    rows = board.snapshot(lambda _key: None)
    assert len(rows) == CAPACITY
    assert rows[0]["id"] == f"board{2 * CAPACITY - 1:019d}"
    assert rows[-1]["id"] == f"board{CAPACITY:019d}"
    upstream = rows[0]["upstream"]
    assert isinstance(upstream, dict)
    assert upstream["X-RateLimit-Remaining"] == str((2 * CAPACITY - 1) % 100)
    assert "Content-Type" not in upstream
    assert rows[0]["daily_rate_per_min"] and rows[0]["limits"] == {
        "burst": 100,
        "window_s": 10.0,
        "daily": 180_000,
        "learned": True,
    }
    print(f"\nstatus board: {held / CAPACITY:.0f} bytes per view")
    assert held / CAPACITY < 1200


KEY = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", "chartLoc1")
OTHER = ResourceKey("6650f1a2b3c4d5e6f7a8b9c0", "location", "chartLoc2")


def admitted(wait_s: float = 0.0, *, slot: bool = True) -> Decision:
    """An admitted decision; `slot` False as in shadow mode (nothing reserved)."""
    return Decision(True, wait_s, 0.0, "", 10, 1.0, 1000, 3600.0, slot=1.0 if slot else None)


def refused() -> Decision:
    return Decision(False, 0.0, 2.0, "burst", 0, 2.0, 1000, 3600.0)


def row(board: StatusBoard, key: ResourceKey) -> dict[str, object]:
    [found] = [r for r in board.snapshot(lambda _key: None) if r["id"] == key.id]
    return found


def test_admitted_requests_count_in_the_second_they_are_due() -> None:
    """Two sent now and one queued 3 s out: the queued one is not in the counts until its
    second comes, and then in that second. A refusal is not counted; a shadow decision (no
    slot) counts now whatever its wait. The total adds up every resource."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    start = int(clock.now)
    board.decided(KEY, admitted())
    board.decided(KEY, admitted())
    board.decided(KEY, admitted(3.0))
    board.decided(KEY, refused())
    board.decided(OTHER, admitted(5.0, slot=False))
    assert row(board, KEY)["admitted_per_s"] == [[start, 2]]
    assert row(board, OTHER)["admitted_per_s"] == [[start, 1]]
    clock.advance(3)
    assert row(board, KEY)["admitted_per_s"] == [[start, 2], [start + 3, 1]]
    assert board.overall()["admitted_per_s"] == [[start, 3], [start + 3, 1]]
    assert board.overall()["now"] == clock.now


def test_counts_older_than_the_charts_span_are_dropped_and_the_total_outlives_eviction() -> None:
    """After the chart's span a second's count is gone from the view (and from memory once
    the view counts again); the total keeps a resource the board has let go."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, capacity=1, clock=clock)
    start = int(clock.now)
    board.decided(KEY, admitted())
    clock.advance(CHART_SPAN_S - 1)
    board.decided(KEY, admitted())
    assert row(board, KEY)["admitted_per_s"] == [[start, 1], [start + CHART_SPAN_S - 1, 1]]
    clock.advance(1)
    board.decided(KEY, admitted())
    assert row(board, KEY)["admitted_per_s"] == [
        [start + CHART_SPAN_S - 1, 1],
        [start + CHART_SPAN_S, 1],
    ]
    board.decided(OTHER, admitted())  # KEY leaves the board (capacity 1)
    assert [r["id"] for r in board.snapshot(lambda _key: None)] == [OTHER.id]
    assert board.overall()["admitted_per_s"] == [
        [start + CHART_SPAN_S - 1, 1],
        [start + CHART_SPAN_S, 2],
    ]


def test_upstream_429s_are_counted_over_ten_minutes() -> None:
    """Only answers given as 429 count (a 200, or an answer whose status is not said, do
    not), per resource and in total, until ten minutes have passed."""
    clock = ManualClock()
    board = StatusBoard(CONFIGURED, clock=clock)
    board.answered(KEY, answer(1), status=429)
    board.answered(KEY, answer(2), status=200)
    board.answered(KEY, answer(3))
    clock.advance(60)
    board.answered(KEY, answer(4), status=429)
    board.answered(OTHER, answer(5), status=429)
    assert row(board, KEY)["upstream_429s"] == 2 and row(board, OTHER)["upstream_429s"] == 1
    assert board.overall()["upstream_429s"] == 3
    clock.advance(UPSTREAM_429_SPAN_S - 60)
    assert row(board, KEY)["upstream_429s"] == 1 and board.overall()["upstream_429s"] == 2
    assert row(board, KEY)["upstream"]["X-RateLimit-Remaining"] == "4"  # type: ignore[index]


def test_per_second_counts_stay_in_order_and_sparse() -> None:
    """Seconds counted out of order land in order; only seconds with a count are kept."""
    counts = None
    for second in (105, 100, 105, 103, 100, 100):
        counts = count_second(counts, second, oldest=90)
    assert seconds_between(counts, 0, 200) == [[100, 3], [103, 1], [105, 2]]
    assert seconds_between(counts, 101, 104) == [[103, 1]]
    assert count_second(counts, 80, oldest=90) is counts  # before the span: not counted
    counts = count_second(counts, 106, oldest=104)
    assert seconds_between(counts, 0, 200) == [[105, 2], [106, 1]]
    assert counts is not None and len(counts) == 2
