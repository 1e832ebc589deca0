"""The status board keeps the most recently seen resources only, each at a small cost."""

from __future__ import annotations

import gc
import tracemalloc

from multidict import CIMultiDict

from proxy.limiter.base import Decision, Limits
from proxy.status import CAPACITY, StatusBoard
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
