"""The limit day in a timezone, and the keep-alive's spread of refreshes over time."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.config import AppConfig, TokensConfig
from proxy.limiter.days import DayClock, day_at
from proxy.tokens.keepalive import KeepAlive, spread_fraction
from proxy.tokens.store import NEEDS_REAUTH, TokenRecord

NEW_YORK = ZoneInfo("America/New_York")


def test_day_resets_at_local_midnight() -> None:
    """The day's id and its end follow the configured timezone, not UTC."""
    late_evening = datetime(2026, 6, 1, 23, 30, tzinfo=NEW_YORK).timestamp()
    day = day_at(late_evening, NEW_YORK)
    assert day.id == "2026-06-01"
    assert day.ends_in_s == 30 * 60
    assert day_at(late_evening, UTC).id == "2026-06-02"


def test_dst_days_are_23_and_25_hours_long() -> None:
    """On the days clocks change, the day still ends at the next local midnight."""
    spring = datetime(2026, 3, 8, 0, 0, tzinfo=NEW_YORK).timestamp()
    autumn = datetime(2026, 11, 1, 0, 0, tzinfo=NEW_YORK).timestamp()
    assert day_at(spring, NEW_YORK).ends_in_s == 23 * 3600
    assert day_at(autumn, NEW_YORK).ends_in_s == 25 * 3600


APP = AppConfig(name="main", client_id="app1-x", client_secret="s")


def record(index: int, *, expires_at: float, refreshed_at: float, **more: object) -> TokenRecord:
    fields: dict[str, object] = {
        "app": "app1",
        "kind": "location",
        "id": f"loc{index}",
        "access_token": "a",
        "refresh_token": "r",
        "expires_at": expires_at,
        "refreshed_at": refreshed_at,
    }
    fields.update(more)
    return TokenRecord(**fields)  # type: ignore[arg-type]


def keepalive() -> KeepAlive:
    return KeepAlive(manager=None, store=None, apps={"app1": APP}, config=TokensConfig())  # type: ignore[arg-type]


def test_tokens_issued_together_are_refreshed_spread_over_an_hour() -> None:
    """1,000 tokens expiring at the same moment come due over an hour, not all at once."""
    alive = keepalive()
    records = [record(i, expires_at=86400.0, refreshed_at=0.0) for i in range(1000)]
    due_by_minute = [
        sum(alive.due(r, now) for r in records) for now in range(86400 - 300 - 3600, 86400, 60)
    ]
    assert due_by_minute[0] <= 25
    assert due_by_minute[-1] == 1000
    fractions = sorted(spread_fraction(r.tag) for r in records)
    assert fractions[100] > 0.05 and fractions[900] < 0.95


def test_old_refresh_tokens_are_refreshed_and_dead_ones_are_left() -> None:
    """A refresh token older than refresh_token_max_age_days is due however fresh its access
    token; a record needing reinstall never is."""
    alive = keepalive()
    day = 86400.0
    old = record(1, expires_at=301 * day + 80000, refreshed_at=0.0)
    assert alive.due(old, now=301 * day)
    young = record(2, expires_at=299 * day + 80000, refreshed_at=299 * day - 100)
    assert not alive.due(young, now=299 * day)
    dead = record(3, expires_at=0.0, refreshed_at=0.0, status=NEEDS_REAUTH)
    assert not alive.due(dead, now=10 * day)


def test_the_day_clock_agrees_with_day_at_across_midnight_dst_and_a_clock_moved_back() -> None:
    """DayClock works the day out once and reuses it; whatever the clock does (forward
    across midnight and a DST change, back to an earlier day), it says what day_at says."""
    zone = ZoneInfo("America/New_York")
    now = [datetime(2026, 3, 7, 23, 59, 30, tzinfo=zone).timestamp()]
    clock = DayClock(zone, lambda: now[0])
    for step_s in (0, 10, 29, 1, 3600, 86_400, 23 * 3600, -3 * 86_400, 200 * 86_400, 0.5):
        now[0] += step_s
        expected = day_at(now[0], zone)
        got = clock.today()
        assert got.id == expected.id
        assert got.ends_in_s == pytest.approx(expected.ends_in_s)
