"""Traffic the upstream reveals, and its 429s, kept as a few groups: the same answers on
every backend (memory, Redis), no window past N, and a Redis state whose size does not
grow with N on those paths (the Lua script's cost per call stays flat; `bench/lua_cost.py`
measures it).

Times in the property test are whole ticks of 1/64 s (15,625 us): exact in the memory
backend's float seconds and in Redis's integer microseconds alike, so the two compare
bound for bound, not within a rounding error.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from proxy.harness.redis_server import RedisServer
from proxy.limiter import slots
from proxy.limiter.base import Decision, Limits, UpstreamCounts
from proxy.limiter.memory import MemoryLimiter
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

TICK = 1 / 64


def view(decision: Decision) -> tuple[object, ...]:
    """What a caller sees of a decision, times in whole microseconds."""
    return (
        decision.admitted,
        round(decision.wait_s * 1e6),
        round(decision.retry_after_s * 1e6),
        decision.limited_by,
        decision.burst_remaining,
        round(decision.burst_reset_s * 1e6),
        round(decision.queue_end_s * 1e6),
        decision.probe,
    )


@dataclass
class Sent:
    """An admitted request: its slot, where in its bound it arrives, each backend's
    decision (for a release), and whether its caller left before it was sent."""

    slot: float
    where: float
    decisions: tuple[Decision, Decision, Decision]
    released: bool = False


@dataclass
class Run:
    """What one example did: the requests sent and the entries revealed traffic added."""

    sent: list[Sent]
    revealed: list[float]
    merges: int


_example_ids = itertools.count()


async def _replay(
    property_redis: Callable[[], RedisServer],
    steps: list[tuple[int, str, int, float]],
    limits: Limits,
    max_wait_s: float,
    *,
    mixed: bool,
) -> Run:
    """Each step on `slots` over a KeyState (the reference, which also says how many
    entries a reveal added), the memory backend and the Redis backend, asserting they
    decide alike and that no slot after an upstream 429 comes before its window is over.

    A step is (ticks since the one before, kind, value, where): "acquire" (arriving
    `where` of the way from its slot to its bound), "reveal" (the upstream's remaining
    count: `value` % 3 fewer than the reference has room for, as an upstream says after
    that many requests the proxy never saw, so small reveals pile up as groups; when
    `mixed`, for `value` < 10 any count, `value` % (N + 2)), "pause" (an upstream 429)
    or "leave" (the caller of the `value`-th waiting request leaves, its slot given
    back)."""
    clock = ManualClock()
    key = ResourceKey("app", "location", f"groups-{next(_example_ids)}")
    model = slots.KeyState()
    run = Run(sent=[], revealed=[], merges=0)
    paused_until = float("-inf")  # since the last release (which may give back a fill)
    async with replay_limiter("redis", clock, property_redis) as shared:
        backends = (MemoryLimiter(clock), shared)
        ticks = 0
        for gap, kind, value, where in steps:
            ticks += gap
            clock.now = now = (START_TICKS + ticks) * TICK
            slots.trim(model, limits, now)  # as every step does first: changes no answer
            if kind == "acquire":
                expected = slots.decide(model, limits, TODAY, now, max_wait_s, shadow=False)
                got = [await b.acquire(key, limits, TODAY, max_wait_s) for b in backends]
                assert [view(d) for d in got] == [view(expected)] * 2
                if expected.admitted:
                    slot = now + expected.wait_s
                    assert slot >= paused_until
                    run.sent.append(Sent(slot, where, (expected, got[0], got[1])))
            elif kind == "leave":
                waiting = [r for r in run.sent if r.slot > now and not r.released]
                if waiting:
                    leaver = waiting[value % len(waiting)]
                    leaver.released = True
                    assert leaver.decisions[0].slot is not None
                    slots.release(model, leaver.decisions[0].slot)
                    for backend, decision in zip(backends, leaver.decisions[1:], strict=True):
                        await backend.release(key, limits, decision)
                    paused_until = float("-inf")
            else:
                pause = kind == "pause"
                room = limits.burst - slots.held(model)
                if mixed and value < 10:
                    said = value % (limits.burst + 2)
                else:
                    said = max(0, room - value % 3)
                counts = UpstreamCounts(burst_remaining=said, pause=pause, at_once=True)
                before = {group.bound for group in model.groups}
                added = slots.observe(model, limits, TODAY, now, counts)
                for backend in backends:
                    await backend.observe(key, limits, TODAY, counts)
                at = now + limits.pad_s
                run.merges += bool(added and len(before) == slots.GROUPS and at not in before)
                assert len(model.groups) <= slots.GROUPS
                if pause:
                    # A 429's fill says the window is full; it stands for no arrivals.
                    paused_until = max(paused_until, at + limits.window_s)
                else:
                    run.revealed += [at] * added
    return run


# The manual clock's start in ticks: 1.8e9 s is a whole number of them.
START_TICKS = round(ManualClock().now / TICK)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=8),
            st.sampled_from(["acquire"] * 3 + ["reveal"] * 6 + ["pause", "leave"]),
            st.integers(min_value=0, max_value=50),
            st.floats(min_value=0, max_value=1),
        ),
        min_size=30,
        max_size=120,
    ),
    burst=st.integers(min_value=1, max_value=40),
    window_ticks=st.integers(min_value=4, max_value=128),
    pad_ticks=st.integers(min_value=0, max_value=4),
    max_wait_ticks=st.integers(min_value=0, max_value=200),
    pauses=st.booleans(),
    leaving=st.booleans(),
)
def test_backends_agree_with_revealed_traffic_and_never_fill_a_window_past_n(
    property_redis,
    event_loop_for_hypothesis,
    steps,
    burst,
    window_ticks,
    pad_ticks,
    max_wait_ticks,
    pauses,
    leaving,
) -> None:
    """Random requests, upstream counts that reveal random unknown traffic, upstream 429s
    and (in some examples) callers leaving while queued: the memory and Redis backends
    give the reference's every decision, groups merged past GROUPS alike; no slot decided
    after a 429 comes before that 429's window is over; and, with each request arriving
    anywhere between its slot and its bound and revealed traffic at its bound, no window
    of W holds more than N.

    That last one only where no caller left: a leaver's slot goes to a later request, and
    traffic revealed afterwards may then meet that request's slot, which no limiter can
    take back (the list before groups did the same)."""
    limits = Limits(burst=burst, window_s=window_ticks * TICK, pad_s=pad_ticks * TICK, daily=10**9)
    # Without pauses, or without leavers, those steps are reveals or requests; examples
    # without pauses reveal only a few requests at a time, and there groups pile up past
    # GROUPS (a pause, or a large reveal, fills the window and adds no group until later).
    kinds = {"pause": "pause" if pauses else "reveal", "leave": "leave" if leaving else "acquire"}
    steps = [(gap, kinds.get(kind, kind), value, where) for gap, kind, value, where in steps]
    run = event_loop_for_hypothesis.run_until_complete(
        _replay(property_redis, steps, limits, max_wait_ticks * TICK, mixed=pauses)
    )
    target(float(run.merges), label="groups merged")
    event("groups merged" if run.merges else "no group merged")
    if any(r.released for r in run.sent):
        return
    start = START_TICKS * TICK
    arrivals = [(r.slot + r.where * limits.pad_s - start) / TICK for r in run.sent]
    revealed = [(bound - start) / TICK for bound in run.revealed]
    assert max_in_any_window(arrivals + revealed, window_ticks) <= burst


async def test_merged_groups_move_entries_later_the_narrowest_pair_first(make_limiter) -> None:
    """Twelve reveals of one request each, 0.25 s apart in one window (more than GROUPS):
    the four merges take the pairs that span least, (0, 1), (2, 3), (4, 5), (6, 7), so
    one entry of each pair is held from the later bound. With 24 held (N), the queue that
    follows waits for the second earliest at 0.35 where it was at 0.1, and no later."""
    clock = ManualClock()
    limiter = make_limiter(clock)
    limits = replace(SMALL, burst=24, window_s=4.0)
    for _ in range(12):
        ours = await limiter.acquire(KEY, limits, TODAY, 0)
        # One more than ours and the ones revealed before: a single unknown request.
        said = UpstreamCounts(burst_remaining=ours.burst_remaining - 1, at_once=True)
        await limiter.observe(KEY, limits, TODAY, said)
        clock.advance(0.25)
    waits = [(await limiter.acquire(KEY, limits, TODAY, 60)).wait_s for _ in range(5)]
    # Unmerged: 2 entries at each of 0.1, 0.35, 0.6: [1.1, 1.1, 1.35, 1.35, 1.6].
    # Merging always the two earliest would have moved four: [1.1, 1.35, 1.6, 1.85, 2.1].
    assert waits == pytest.approx([1.1, 1.35, 1.35, 1.35, 1.6])


async def test_reveals_that_keep_coming_never_hold_the_window_full(make_limiter) -> None:
    """One unknown request revealed with every answer, 20 a window for 5 s (100 reveals,
    far more than GROUPS): the entries held stay near the 2 per tick the traffic really
    takes, so every request still goes at once. (Merging always the two earliest groups
    made one group absorb every reveal, its bound moving on with each merge and its count
    stuck at N: the whole window held for as long as reveals came.)"""
    clock = ManualClock()
    limiter = make_limiter(clock)
    limits = replace(SMALL, burst=100)
    remaining = []
    for _ in range(100):
        ours = await limiter.acquire(KEY, limits, TODAY, 0)
        assert ours.admitted and ours.wait_s == 0
        remaining.append(ours.burst_remaining)
        # One more than ours and the ones revealed before: N minus all held, minus one.
        said = UpstreamCounts(burst_remaining=ours.burst_remaining - 1, at_once=True)
        await limiter.observe(KEY, limits, TODAY, said)
        clock.advance(0.05)
    # Exactly held (no merge): 2 a tick over W + pad = 44 at most, so 56 remain.
    assert min(remaining) >= 40


@pytest.fixture
async def client(redis_server: RedisServer) -> aioredis.Redis:
    redis_client = aioredis.Redis.from_url(redis_server.url)
    yield redis_client
    await redis_client.aclose()


async def _groups(client: aioredis.Redis) -> list[tuple[int, int]]:
    """The key's groups in Redis as (bound us, count): lua/limiter.lua keeps them in
    KEYS[6] as cmsgpack of bound, count, since, ..., which Redis's own Lua unpacks."""
    unpack = "local raw = redis.call('GET', KEYS[1]) return raw and {cmsgpack.unpack(raw)} or {}"
    flat = await client.eval(unpack, 1, redis_keys(KEY, TODAY)[5])
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 2, 3)]


async def test_revealing_thousands_at_n_10000_adds_one_group_not_thousands(client) -> None:
    """At N = 10,000 with 6,000 of ours in the window: twenty reveals of 50 unknown
    requests each, at other times, leave GROUPS groups; counts then revealing the 3,000
    left add them as one group (merging, still GROUPS) and no single, and an upstream 429
    changes no single either: the state a call touches does not grow with N or with what
    the upstream reveals. The next request waits for the 10,000th latest, our earliest."""
    clock = ManualClock()
    limiter = RedisLimiter(client, clock=clock)
    limits = Limits(burst=10_000, window_s=60.0, pad_s=0.1, daily=10**9)
    bounds_key = redis_keys(KEY, TODAY)[0]
    # Ours: 6,000 slots over the last 6 s, written as a replica's own after an outage.
    await limiter.resume(KEY, limits, tuple(-i / 1000 for i in range(6000)), 0, 0.0)
    earliest = clock.now - 5.999  # resume takes bounds (pads included), from now
    assert await client.zcard(bounds_key) == 6000

    for revealed in range(50, 1001, 50):
        clock.advance(0.5)
        said = UpstreamCounts(burst_remaining=10_000 - 6000 - revealed, at_once=True)
        await limiter.observe(KEY, limits, TODAY, said)
        assert await client.zcard(bounds_key) == 6000
        assert len(await _groups(client)) == min(revealed // 50, slots.GROUPS)
    assert sum(count for _, count in await _groups(client)) == 1000

    await limiter.observe(KEY, limits, TODAY, UpstreamCounts(0, at_once=True))
    assert await client.zcard(bounds_key) == 6000
    groups = await _groups(client)
    assert len(groups) == slots.GROUPS
    assert sum(count for _, count in groups) == 4000

    decision = await limiter.acquire(KEY, limits, TODAY, 120)
    assert decision.wait_s == pytest.approx(earliest + limits.window_s - clock.now)
    await limiter.observe(KEY, limits, TODAY, UpstreamCounts(0, pause=True))
    assert await client.zcard(bounds_key) == 6001
    assert len(await _groups(client)) == slots.GROUPS


async def test_a_list_left_by_an_older_version_is_not_in_the_way(client) -> None:
    """Older versions kept a key's bounds as a LIST at `...:burst`; the ZSET lives under
    another name, so a replica of each may share a Redis without a WRONGTYPE error."""
    old_key = redis_keys(KEY, TODAY)[0].removesuffix(":bounds") + ":burst"
    await client.rpush(old_key, "1800000000100000")
    limiter = RedisLimiter(client, clock=ManualClock())
    assert (await limiter.acquire(KEY, SMALL, TODAY, 0)).admitted


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)
