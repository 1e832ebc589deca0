"""The limiter's behaviour, held the same on every backend (memory, Redis).

The clock is moved by hand (Redis is handed the test's clock in place of TIME), so no
test sleeps through a window.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.harness.redis_server import RedisServer
from proxy.limiter.base import Day, Decision, Limits, UpstreamCounts
from proxy.typing import ResourceKey
from tests.support.limiters import (
    KEY,
    SMALL,
    TODAY,
    ManualClock,
    max_in_any_window,
    replay_limiter,
)


async def test_burst_admits_n_at_once_then_queues_after_the_window(make_limiter) -> None:
    """N requests go at once; the next waits until the first slot is W + pad old."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    waits = [(await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s for _ in range(7)]
    assert waits[:5] == [0, 0, 0, 0, 0]
    assert waits[5] == pytest.approx(1.1)
    assert waits[6] == pytest.approx(1.1)


async def test_queue_is_fifo_window_after_window(make_limiter) -> None:
    """3N requests at one instant are spread over three windows, N per window, in order."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    waits = [(await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s for _ in range(15)]
    assert waits == sorted(waits)
    assert waits == pytest.approx([0] * 5 + [1.1] * 5 + [2.2] * 5)


async def test_refusal_records_nothing_and_says_when_to_retry(make_limiter) -> None:
    """Over max_wait: refused with retry_after, and the refusal takes no slot."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    for _ in range(5):
        assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).admitted
    clock.advance(0.4)
    refused = await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert not refused.admitted
    assert refused.limited_by == "burst"
    assert refused.retry_after_s == pytest.approx(0.7)
    assert refused.burst_remaining == 0
    again = await limiter.acquire(KEY, SMALL, TODAY, 0.7001)
    assert again.admitted and again.wait_s == pytest.approx(0.7)


async def test_remaining_counts_down_and_frees_after_the_window(make_limiter) -> None:
    """burst_remaining falls with each admission and is whole again after W + pad."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    remaining = [(await limiter.acquire(KEY, SMALL, TODAY, 0)).burst_remaining for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    clock.advance(1.1001)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).burst_remaining == 4


async def test_daily_limit_refuses_until_the_day_ends(make_limiter) -> None:
    """At the daily limit requests are refused with retry_after = time to the reset."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    limits = replace(SMALL, burst=100, daily=3)
    daily = [(await limiter.acquire(KEY, limits, TODAY, 0)).daily_remaining for _ in range(3)]
    assert daily == [2, 1, 0]
    refused = await limiter.acquire(KEY, limits, TODAY, 30)
    assert (refused.admitted, refused.limited_by) == (False, "daily")
    assert refused.retry_after_s == pytest.approx(TODAY.ends_in_s)
    tomorrow = Day(id="2027-01-16", ends_in_s=86400)
    assert (await limiter.acquire(KEY, limits, tomorrow, 0)).admitted


async def test_keys_are_independent(make_limiter) -> None:
    """One resource's full window does not hold back another's."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    other = ResourceKey(KEY.app, "company", "co1")
    for _ in range(5):
        await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert not (await limiter.acquire(KEY, SMALL, TODAY, 0)).admitted
    assert (await limiter.acquire(other, SMALL, TODAY, 0)).wait_s == 0


async def test_upstream_remaining_lower_than_ours_holds_the_window(make_limiter) -> None:
    """The upstream saying 1 remains (traffic we did not send) leaves us 1 until W passes."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    await limiter.acquire(KEY, SMALL, TODAY, 0)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(burst_remaining=1))
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).admitted
    refused = await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx(1.1)


async def test_upstream_remaining_higher_than_ours_changes_nothing(make_limiter) -> None:
    """The proxy only ever believes the upstream when it is the stricter of the two."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    for _ in range(4):
        await limiter.acquire(KEY, SMALL, TODAY, 0)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(5, 999))
    decision = await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert decision.burst_remaining == 0 and decision.daily_remaining == 995


async def test_upstream_counts_on_a_longer_interval_hold_nothing_under_both_limits(
    make_limiter,
) -> None:
    """The upstream's remaining count is read on its own limits: 60 left of its 100 per
    10 s allows more than our whole window of 5, so nothing is held."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    for _ in range(2):
        await limiter.acquire(KEY, SMALL, TODAY, 0)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(burst_remaining=60, at_once=True))
    decisions = [await limiter.acquire(KEY, SMALL, TODAY, 0) for _ in range(3)]
    assert [d.wait_s for d in decisions] == [0, 0, 0]


async def test_upstream_remaining_below_our_room_leaves_only_that_many(make_limiter) -> None:
    """2 left upstream while we would allow 4 more: 2 go now, the next waits a window."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    await limiter.acquire(KEY, SMALL, TODAY, 0)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(burst_remaining=2, at_once=True))
    waits = [(await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s for _ in range(3)]
    assert waits == pytest.approx([0, 0, 1.1])


async def test_upstream_429_pauses_the_key_for_a_window(make_limiter) -> None:
    """After an upstream 429 (remaining 0) no slot comes before now + W + pad."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(burst_remaining=0))
    decision = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert decision.wait_s == pytest.approx(1.1)


async def test_upstream_daily_remaining_lowers_the_count(make_limiter) -> None:
    """X-RateLimit-Daily-Remaining lower than ours is taken as today's count."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(daily_remaining=2))
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).daily_remaining == 1
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).daily_remaining == 0
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).limited_by == "daily"


async def test_shadow_never_holds_or_refuses_but_says_what_it_would_do(make_limiter) -> None:
    """Shadow mode admits at once and reports the limit it would have applied."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    decisions = [await limiter.acquire(KEY, SMALL, TODAY, 0, shadow=True) for _ in range(7)]
    assert all(d.admitted for d in decisions)
    assert [d.limited_by for d in decisions] == [""] * 5 + ["burst"] * 2
    clock.advance(1.1001)
    # What shadow recorded is what was really sent: 7 requests at one instant.
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).admitted


async def test_a_released_slot_goes_to_the_next_request(make_limiter) -> None:
    """The last queued slot given back (a waiting line passes on its last place) is the
    next request's."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    one = replace(SMALL, burst=1)
    await limiter.acquire(KEY, one, TODAY, 30)
    queued = await limiter.acquire(KEY, one, TODAY, 30)
    last = await limiter.acquire(KEY, one, TODAY, 30)
    assert (queued.wait_s, last.wait_s) == pytest.approx((1.1, 2.2))
    await limiter.release(KEY, one, last)
    clock.advance(0.5)
    assert (await limiter.acquire(KEY, one, TODAY, 30)).wait_s == pytest.approx(1.7)


async def test_a_release_never_forgets_the_slots_before_it(make_limiter) -> None:
    """Two sent at 0, a third queued for W + pad and given back: at 0.5 the window still
    holds the two sent, so the next one waits for W + pad, it does not go at once."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    limits = replace(SMALL, burst=2)
    for _ in range(2):
        assert (await limiter.acquire(KEY, limits, TODAY, 30)).wait_s == 0
    queued = await limiter.acquire(KEY, limits, TODAY, 30)
    await limiter.release(KEY, limits, queued)
    clock.advance(0.5)
    assert (await limiter.acquire(KEY, limits, TODAY, 30)).wait_s == pytest.approx(0.6)


async def test_releasing_a_slot_no_longer_kept_changes_nothing(make_limiter) -> None:
    """A slot whose hold is over (or a refusal, or a shadow decision) has nothing to give."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    first = await limiter.acquire(KEY, SMALL, TODAY, 30)
    clock.advance(5)
    await limiter.release(KEY, SMALL, first)
    for _ in range(5):
        await limiter.acquire(KEY, SMALL, TODAY, 30)
    refused = await limiter.acquire(KEY, SMALL, TODAY, 0)
    shadow = await limiter.acquire(KEY, SMALL, TODAY, 0, shadow=True)
    assert refused.slot is None and shadow.slot is None
    await limiter.release(KEY, SMALL, refused)
    await limiter.release(KEY, SMALL, shadow)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s == pytest.approx(1.1)


def reference_admissions(
    arrivals_ms: list[int], burst: int, window_ms: int, pad_ms: int, max_wait_ms: float
) -> list[float | None]:
    """The plain model: every send time kept; a slot is W + pad after the N-th last one."""
    sent: list[int] = []
    result: list[float | None] = []
    for arrival in arrivals_ms:
        slot = arrival if len(sent) < burst else max(arrival, sent[-burst] + window_ms + pad_ms)
        if slot - arrival > max_wait_ms:
            result.append(None)
        else:
            sent.append(slot)
            result.append(slot)
    return result


def reference_with_releases(
    steps: list[tuple[int, int | None]], burst: int, window_ms: int, pad_ms: int, max_wait_ms: float
) -> tuple[list[float | None], list[int]]:
    """The plain model with callers who leave: every slot kept unless given back.

    A step is (arrival ms, None) for a request, or (time ms, k) for the caller of the k-th
    (mod how many) admitted request still waiting at that time leaving. Returns each
    request's slot (None: refused) and the slots finally sent.
    """
    kept: list[int] = []
    result: list[float | None] = []
    for at, leaver in steps:
        if leaver is not None:
            waiting = [slot for slot in kept if slot > at]
            if waiting:
                kept.remove(waiting[leaver % len(waiting)])
            continue
        ordered = sorted(kept)
        slot = at if len(ordered) < burst else max(at, ordered[-burst] + window_ms + pad_ms)
        if slot - at > max_wait_ms:
            result.append(None)
        else:
            kept.append(slot)
            result.append(slot)
    return result, kept


_example_ids = itertools.count()


@pytest.mark.parametrize("backend", ["memory", "redis"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=60),
    burst=st.integers(min_value=1, max_value=6),
    window_ms=st.integers(min_value=50, max_value=1000),
    pad_ms=st.integers(min_value=0, max_value=50),
    max_wait_ms=st.integers(min_value=0, max_value=3000),
)
def test_backends_match_the_reference_model(
    backend,
    property_redis,
    event_loop_for_hypothesis,
    gaps,
    burst,
    window_ms,
    pad_ms,
    max_wait_ms,
) -> None:
    """For random arrivals every backend admits exactly what the model admits, at the same
    slots, and no window of W ever holds more than N admissions."""
    arrivals = list(itertools.accumulate(gaps))
    expected = reference_admissions(arrivals, burst, window_ms, pad_ms, max_wait_ms + 0.5)
    limits = Limits(burst=burst, window_s=window_ms / 1000, pad_s=pad_ms / 1000, daily=10**9)
    steps: list[tuple[int, int | None]] = [(arrival, None) for arrival in arrivals]
    got = event_loop_for_hypothesis.run_until_complete(
        _replay(backend, property_redis, steps, limits, (max_wait_ms + 0.5) / 1000)
    )
    # Slots are whole milliseconds; rounding removes float noise from the backends' seconds.
    slots = [None if g is None else round(g) for g in got]
    assert slots == expected
    admitted = [slot for slot in slots if slot is not None]
    assert max_in_any_window(admitted, window_ms) <= burst


@pytest.mark.parametrize("backend", ["memory", "redis"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=300),
            st.one_of(st.none(), st.none(), st.integers(min_value=0, max_value=50)),
        ),
        min_size=1,
        max_size=60,
    ),
    burst=st.integers(min_value=1, max_value=6),
    window_ms=st.integers(min_value=50, max_value=1000),
    pad_ms=st.integers(min_value=0, max_value=50),
    max_wait_ms=st.integers(min_value=0, max_value=3000),
)
def test_backends_match_the_reference_model_when_callers_leave(
    backend,
    property_redis,
    event_loop_for_hypothesis,
    steps,
    burst,
    window_ms,
    pad_ms,
    max_wait_ms,
) -> None:
    """With callers leaving while queued (their slots given back), every backend still
    gives exactly the model's slots, and no window of W ever holds more than N sends."""
    times = list(itertools.accumulate(gap for gap, _ in steps))
    timed = [(at, leaver) for at, (_, leaver) in zip(times, steps, strict=True)]
    expected, sent = reference_with_releases(timed, burst, window_ms, pad_ms, max_wait_ms + 0.5)
    limits = Limits(burst=burst, window_s=window_ms / 1000, pad_s=pad_ms / 1000, daily=10**9)
    got = event_loop_for_hypothesis.run_until_complete(
        _replay(backend, property_redis, timed, limits, (max_wait_ms + 0.5) / 1000)
    )
    assert [None if g is None else round(g) for g in got] == expected
    assert max_in_any_window(sent, window_ms) <= burst


async def _replay(
    backend: str,
    property_redis: Callable[[], RedisServer],
    steps: list[tuple[int, int | None]],
    limits: Limits,
    max_wait_s: float,
) -> list[float | None]:
    """Each step's decision on a fresh key: a request's slot in ms (None: refused), or a
    waiting request's caller leaving (as in `reference_with_releases`)."""
    clock = ManualClock()
    key = ResourceKey("app", "location", f"example-{next(_example_ids)}")
    start = clock.now
    slots: list[float | None] = []
    admitted: list[tuple[float, Decision]] = []
    async with replay_limiter(backend, clock, property_redis) as limiter:
        for at, leaver in steps:
            clock.now = start + at / 1000
            if leaver is not None:
                waiting = [(slot, d) for slot, d in admitted if round(slot) > at]
                if waiting:
                    left = waiting[leaver % len(waiting)]
                    admitted.remove(left)
                    await limiter.release(key, limits, left[1])
                continue
            decision = await limiter.acquire(key, limits, TODAY, max_wait_s)
            slot = (at + decision.wait_s * 1000) if decision.admitted else None
            slots.append(slot)
            if slot is not None:
                admitted.append((slot, decision))
    return slots


async def test_upstream_counts_hold_from_when_they_were_said(make_limiter) -> None:
    """An upstream count applied with a later decision still holds from when it was said."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(burst_remaining=0))
    clock.advance(0.5)
    refused = await limiter.acquire(KEY, SMALL, TODAY, 0)
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx(0.6)


async def test_upstream_429_takes_the_whole_window_from_now(make_limiter) -> None:
    """A pause (upstream 429) holds every slot until now + W + pad, whatever was sent."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    for _ in range(3):
        await limiter.acquire(KEY, SMALL, TODAY, 0)
    clock.advance(0.5)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(0, pause=True))
    assert (await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s == pytest.approx(1.1)


async def test_yesterdays_daily_count_does_not_carry_over(make_limiter) -> None:
    """A daily count the upstream gave yesterday is not applied to today's counter."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    yesterday = Day(id="2027-01-14", ends_in_s=1.0)
    await limiter.observe(KEY, SMALL, yesterday, UpstreamCounts(daily_remaining=10))
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).daily_remaining == SMALL.daily - 1
