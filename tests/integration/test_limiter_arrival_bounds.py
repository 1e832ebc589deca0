"""The limiter's arrival bounds, cold-key probes, batch pacing and learned limits, held
the same on every backend (memory, Redis), on a clock the test moves by hand.

The upstream counts a request when it arrives, somewhere between its send and its send
plus the pad (or its answer, when that came later and was anchored). These tests pin that
no W-window of such arrivals ever holds more than N, whatever the pads and delays.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.harness.redis_server import RedisServer
from proxy.limiter.base import Limits, UpstreamCounts
from proxy.limiter.redis import RedisLimiter, redis_keys
from proxy.typing import ResourceKey
from tests.support.limiters import (
    KEY,
    SMALL,
    TODAY,
    ManualClock,
    max_in_any_window,
    replay_limiter,
)


async def test_a_longer_pad_holds_its_own_slot_longer(make_limiter) -> None:
    """A request decided with a pad of 0.4 s keeps its place until its send + 0.4 + W: the
    N-th request after it waits for that, not for the pad of whoever decides next."""
    limiter = make_limiter(ManualClock())
    slow = replace(SMALL, pad_s=0.4)
    await limiter.acquire(KEY, slow, TODAY, 30)
    for _ in range(4):
        await limiter.acquire(KEY, SMALL, TODAY, 30)
    sixth = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert sixth.wait_s == pytest.approx(1.1)  # the earliest bound: 0 + 0.1, the 4 others
    seventh = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert seventh.wait_s == pytest.approx(1.1)
    # Five of the bounds are now 0.1 (four) and 0.4 (one); the 0.4 one comes last.
    waits = [(await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s for _ in range(3)]
    assert waits == pytest.approx([1.1, 1.1, 1.4])


async def test_an_answer_later_than_its_pad_moves_its_bound(make_limiter) -> None:
    """A request answered 0.3 s after its bound may have arrived that late: the request
    N places after it waits for W after the answer, not after the bound."""
    limiter = make_limiter(ManualClock())
    first = await limiter.acquire(KEY, SMALL, TODAY, 30)
    for _ in range(4):
        await limiter.acquire(KEY, SMALL, TODAY, 30)
    await limiter.anchor(KEY, SMALL, first, 0.3)
    sixth = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert sixth.wait_s == pytest.approx(1.1)  # another bound at 0.1 is the 5th latest
    waits = [(await limiter.acquire(KEY, SMALL, TODAY, 30)).wait_s for _ in range(4)]
    assert waits == pytest.approx([1.1, 1.1, 1.1, 1.4])


async def test_a_cold_keys_first_request_probes_and_the_others_wait_for_its_answer(
    make_limiter,
) -> None:
    """On a key with nothing in its hold the first request goes alone; the others are told
    to ask again until its answer is applied, then decide on what it said."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    probe = await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=2.0)
    assert probe.admitted and probe.probe == "this" and probe.wait_s == 0
    other = await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=2.0)
    assert not other.admitted and other.probe == "other"
    assert other.retry_after_s == pytest.approx(2.0, abs=0.01)
    clock.advance(0.2)
    # The answer: one left in the upstream's window (traffic the proxy never saw).
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(1, None, end_probe=True))
    waits = [(await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=2.0)) for _ in range(2)]
    assert [d.probe for d in waits] == ["", ""]
    assert waits[0].wait_s == 0
    # Four bounds (the probe's at 0.1, three unseen at 0.3) and one more now: the next
    # slot is W after the probe's bound, 0.9 s from now.
    assert waits[1].wait_s == pytest.approx(0.9)


async def test_an_unanswered_probe_lets_the_others_go_when_it_expires(make_limiter) -> None:
    """A probe whose answer never comes (its replica died) holds the others back only
    until it expires; the key is not cold then (the probe is in its hold)."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=0.5)
    clock.advance(0.51)
    later = await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=0.5)
    assert later.admitted and later.probe == ""


async def test_a_key_idle_for_a_hold_is_probed_again(make_limiter) -> None:
    """Once nothing of a key is in its hold (W after the last bound), it is cold again."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    first = await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=2.0)
    await limiter.observe(KEY, SMALL, TODAY, UpstreamCounts(4, None, end_probe=True))
    busy = await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=2.0)
    assert first.probe == "this" and busy.probe == ""
    clock.advance(1.11)
    assert (await limiter.acquire(KEY, SMALL, TODAY, 30, probe_s=2.0)).probe == "this"


async def test_batch_requests_leave_a_slot_of_every_window_to_interactive_ones(
    make_limiter,
) -> None:
    """With a headroom of 1, batch requests take 4 of the 5 slots of a window; the fifth
    goes to an interactive request at once."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    batch = [await limiter.acquire(KEY, SMALL, TODAY, 0.02, headroom=1) for _ in range(5)]
    assert [d.admitted for d in batch] == [True] * 4 + [False]
    # What remains is said on the whole limit, by both backends alike.
    assert [d.burst_remaining for d in batch] == [4, 3, 2, 1, 1]
    assert batch[-1].retry_after_s == pytest.approx(1.1)
    interactive = await limiter.acquire(KEY, SMALL, TODAY, 30)
    assert interactive.admitted and interactive.wait_s == 0


async def test_a_key_on_a_longer_learned_window_keeps_its_slots_while_others_decide(
    make_limiter,
) -> None:
    """Keys may have learned windows of their own: a key on 2 per 60 s keeps its slots
    while keys on 5 per 1 s come and go, and refuses its third request for a minute."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    slow = replace(SMALL, burst=2, window_s=60.0)
    other = ResourceKey(KEY.app, "location", "other")
    await limiter.acquire(KEY, slow, TODAY, 0)
    await limiter.acquire(other, SMALL, TODAY, 0)
    await limiter.acquire(KEY, slow, TODAY, 0)
    clock.advance(2.0)
    await limiter.acquire(other, SMALL, TODAY, 0)
    third = await limiter.acquire(KEY, slow, TODAY, 0)
    assert not third.admitted
    assert third.retry_after_s == pytest.approx(58.1)


def reference_bounds(
    requests: list[tuple[int, int, int]], burst: int, window_ms: int, max_wait_ms: float
) -> list[int | None]:
    """The plain model: each request (arrival, pad, late) keeps its bound, slot + pad +
    late; a slot is W after the N-th latest bound."""
    bounds: list[int] = []
    result: list[int | None] = []
    for at, pad, late in requests:
        ordered = sorted(bounds)
        slot = at if len(ordered) < burst else max(at, ordered[-burst] + window_ms)
        if slot - at > max_wait_ms:
            result.append(None)
        else:
            bounds.append(slot + pad + late)
            result.append(slot)
    return result


_example_ids = itertools.count()


@pytest.mark.parametrize("backend", ["memory", "redis"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=300),  # gap before the request, ms
            st.integers(min_value=0, max_value=80),  # its pad, ms
            st.one_of(st.just(0), st.integers(min_value=1, max_value=120)),  # answer late by
            st.floats(min_value=0, max_value=1),  # where in its bound it arrives
        ),
        min_size=1,
        max_size=50,
    ),
    burst=st.integers(min_value=1, max_value=6),
    window_ms=st.integers(min_value=50, max_value=1000),
    max_wait_ms=st.integers(min_value=0, max_value=3000),
)
def test_arrivals_within_their_bounds_never_fill_a_window_past_n(
    backend, property_redis, event_loop_for_hypothesis, requests, burst, window_ms, max_wait_ms
) -> None:
    """Each request has its own pad, and some answers come back later than it (anchored
    at once); every backend gives the model's slots, and however each request's arrival
    falls between its send and its bound, no window of W holds more than N arrivals."""
    times = list(itertools.accumulate(gap for gap, *_ in requests))
    steps = [(at, pad, late) for at, (_, pad, late, _) in zip(times, requests, strict=True)]
    expected = reference_bounds(steps, burst, window_ms, max_wait_ms + 0.5)
    limits = Limits(burst=burst, window_s=window_ms / 1000, pad_s=0.0, daily=10**9)
    got = event_loop_for_hypothesis.run_until_complete(
        _replay(backend, property_redis, steps, limits, (max_wait_ms + 0.5) / 1000)
    )
    assert [None if g is None else round(g) for g in got] == expected
    arrivals = [
        slot + where * (pad + late)
        for slot, (_, pad, late, where) in zip(expected, requests, strict=True)
        if slot is not None
    ]
    assert max_in_any_window(arrivals, window_ms) <= burst


async def _replay(
    backend: str,
    property_redis: Callable[[], RedisServer],
    steps: list[tuple[int, int, int]],
    limits: Limits,
    max_wait_s: float,
) -> list[float | None]:
    """Each request's slot in ms on a fresh key (None: refused), anchoring late answers."""
    clock = ManualClock()
    key = ResourceKey("app", "location", f"bounds-{next(_example_ids)}")
    start = clock.now
    slots: list[float | None] = []
    async with replay_limiter(backend, clock, property_redis) as limiter:
        for at, pad_ms, late_ms in steps:
            clock.now = start + at / 1000
            own = replace(limits, pad_s=pad_ms / 1000)
            decision = await limiter.acquire(key, own, TODAY, max_wait_s)
            slots.append((at + decision.wait_s * 1000) if decision.admitted else None)
            if decision.admitted and late_ms:
                await limiter.anchor(key, own, decision, late_ms / 1000)
    return slots


@pytest.fixture
async def redis_limiter(
    tmp_path,
) -> AsyncIterator[tuple[RedisLimiter, RedisLimiter, aioredis.Redis]]:
    """Two replicas' limiters on one Redis and one clock, and a client to look inside."""
    server = RedisServer(tmp_path / "redis").start()
    client = aioredis.Redis.from_url(server.url)
    clock = ManualClock()
    try:
        yield RedisLimiter(client, clock=clock), RedisLimiter(client, clock=clock), client
    finally:
        await client.aclose()
        server.stop()


async def test_learning_a_longer_window_keeps_the_slots_already_taken(redis_limiter) -> None:
    """Slots taken under 2 per 0.5 s live as long as the learned 2 per 60 s needs them."""
    a, _, client = redis_limiter
    fast = replace(SMALL, burst=2, window_s=0.5)
    for _ in range(2):
        await a.acquire(KEY, fast, TODAY, 0)
    await a.learn(KEY, replace(fast, window_s=60.0))
    burst_key = redis_keys(KEY, TODAY)[0]
    assert await client.pttl(burst_key) > 59_000


async def test_limits_one_replica_learned_decide_for_every_replica(redis_limiter) -> None:
    """Replica A learns 2 per window for the key; replica B, asking with the configured 5,
    is decided on 2 and told which limits decided."""
    a, b, _ = redis_limiter
    learned = replace(SMALL, burst=2)
    await a.learn(KEY, learned)
    decisions = [await b.acquire(KEY, SMALL, TODAY, 30) for _ in range(3)]
    assert [d.wait_s for d in decisions] == pytest.approx([0, 0, 1.1])
    assert decisions[0].limits == learned
    await a.learn(KEY, SMALL, forget=True)
    assert (await b.acquire(KEY, SMALL, TODAY, 30)).limits == SMALL


async def test_forgetting_a_shorter_learned_window_keeps_the_slots_for_the_configured_one(
    redis_limiter,
) -> None:
    """Slots taken under a learned 2 per 0.5 s, when the key goes back to the configured
    2 per 60 s, live as long as that window needs them."""
    a, _, client = redis_limiter
    configured = replace(SMALL, burst=2, window_s=60.0)
    fast = replace(configured, window_s=0.5)
    await a.learn(KEY, fast)
    for _ in range(2):
        await a.acquire(KEY, fast, TODAY, 0)
    burst_key = redis_keys(KEY, TODAY)[0]
    assert await client.pttl(burst_key) < 10_000
    await a.learn(KEY, configured, forget=True)
    assert await client.pttl(burst_key) > 59_000
