"""Keep-alive never bunches refreshes: a wave of records issued together comes due a few
per pass, spread over an hour (access tokens) or a day (old refresh tokens), and stays
spread after it is refreshed; a pass runs at most half the process's refresh cap."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from proxy.config import AppConfig, TokensConfig
from proxy.tokens.keepalive import KeepAlive, keepalive_concurrency
from proxy.tokens.store import TokenRecord

APP = AppConfig(name="main", client_id="app1-x", client_secret="s")
PASS_S = 60  # tokens.keepalive_interval_s's default
DAY_S = 86_400
LIFETIME_S = 86_399  # what HighLevel's access tokens live
WAVE = 1_000


def keepalive() -> KeepAlive:
    return KeepAlive(manager=None, store=None, apps={"app1": APP}, config=TokensConfig())  # type: ignore[arg-type]


def wave(expires_at: float, refreshed_at: float) -> list[TokenRecord]:
    """WAVE records issued at the same moment."""
    return [
        TokenRecord(
            app="app1",
            kind="location",
            id=f"wave{index}",
            access_token="a",
            refresh_token="r",
            expires_at=expires_at,
            refreshed_at=refreshed_at,
        )
        for index in range(WAVE)
    ]


def first_due(alive: KeepAlive, record: TokenRecord, start: int) -> int:
    """The first keep-alive pass (one every PASS_S from `start`) that finds `record` due.
    Once due, a record stays due until refreshed, so the pass is found by bisection."""
    low, high = 0, 1
    while not alive.due(record, start + high * PASS_S):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if alive.due(record, start + middle * PASS_S):
            high = middle
        else:
            low = middle
    return start + (high if not alive.due(record, start + low * PASS_S) else low) * PASS_S


def refresh_rounds(records: list[TokenRecord], start: int, rounds: int) -> list[Counter[int]]:
    """Each record refreshed at the first pass that finds it due (a new day-long token),
    `rounds` times: for each round, how many records were due at each pass."""
    alive = keepalive()
    counts: list[Counter[int]] = []
    for _ in range(rounds):
        due_at: Counter[int] = Counter()
        refreshed = []
        for record in records:
            now = first_due(alive, record, start)
            due_at[now] += 1
            refreshed.append(replace(record, refreshed_at=now, expires_at=now + LIFETIME_S))
        counts.append(due_at)
        records = refreshed
    return counts


def test_a_wave_issued_together_is_refreshed_a_few_per_pass_day_after_day() -> None:
    """1,000 tokens issued at the same moment: every 60-s pass finds at most 4% of them
    due, their refreshes span more than 55 minutes, and the same holds for the next two
    days' refreshes of the tokens those refreshes issued."""
    rounds = refresh_rounds(wave(expires_at=LIFETIME_S, refreshed_at=0), 0, rounds=3)
    for passes in rounds:
        assert max(passes.values()) <= WAVE * 4 // 100, sorted(passes.values())[-5:]
        assert max(passes) - min(passes) >= 55 * 60


def test_old_refresh_tokens_come_due_spread_over_a_day() -> None:
    """1,000 refresh tokens issued at the same moment, whose access tokens do not expire
    first: they come due for age a few per pass, over most of a day, not all at once."""
    max_age_s = TokensConfig().refresh_token_max_age_days * DAY_S
    records = wave(expires_at=max_age_s + 10 * DAY_S, refreshed_at=0)
    (due_at,) = refresh_rounds(records, max_age_s - 2 * DAY_S, rounds=1)
    assert max(due_at.values()) <= 10
    assert max(due_at) - min(due_at) >= 23 * 3600
    assert max(due_at) <= max_age_s + PASS_S  # none later than the configured age


@pytest.mark.parametrize(("cap", "share"), [(1, 1), (2, 1), (4, 2), (5, 2), (16, 8)])
def test_keepalive_runs_half_the_refresh_cap(cap: int, share: int) -> None:
    """A keep-alive pass runs at most half of tokens.max_concurrent_refreshes (at least
    one), leaving the rest to requests that need a token now."""
    assert keepalive_concurrency(TokensConfig(max_concurrent_refreshes=cap)) == share
