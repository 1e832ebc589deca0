"""The groups of `proxy.limiter.slots` on their own: the d-th latest over singles and
groups, and what merging may and may not do to the entries (no backend, no clock)."""

from __future__ import annotations

import bisect

from hypothesis import given
from hypothesis import strategies as st

from proxy.limiter import slots
from proxy.limiter.base import Limits

BOUNDS = st.integers(min_value=0, max_value=400).map(float)


def limits(burst: int) -> Limits:
    return Limits(burst=burst, window_s=1.0, pad_s=0.0, daily=10**9)


def state_of(singles: list[float], adds: list[tuple[float, int]], burst: int) -> slots.KeyState:
    state = slots.KeyState(slots=sorted(singles))
    for bound, count in adds:
        slots.add_group(state, limits(burst), bound, count)
    return state


@given(
    singles=st.lists(BOUNDS, max_size=40),
    adds=st.lists(
        st.tuples(BOUNDS, st.integers(min_value=1, max_value=5)), min_size=5, max_size=20
    ),
    burst=st.integers(min_value=1, max_value=60),
)
def test_the_dth_latest_is_that_of_every_entry_spelled_out(singles, adds, burst) -> None:
    """`latest(d)` walks the groups and counts singles, yet answers what sorting every
    entry (a group's once per entry) would, for every d, and None past the last."""
    state = state_of(singles, adds, burst)
    every = slots.entries(state)
    assert slots.held(state) == len(every)
    assert len(state.groups) <= slots.GROUPS
    for d in range(1, len(every) + 2):
        assert slots.latest(state, d) == (every[-d] if d <= len(every) else None)


@given(
    singles=st.lists(BOUNDS, max_size=20),
    adds=st.lists(
        st.tuples(BOUNDS, st.integers(min_value=1, max_value=5)), min_size=9, max_size=30
    ),
    burst=st.integers(min_value=1, max_value=40),
)
def test_groups_only_ever_move_entries_later(singles, adds, burst) -> None:
    """However many groups are added (merging past GROUPS, counts capped at N), for every
    d up to N the d-th latest entry kept is at least the d-th latest of all the entries
    added at their own bounds: no later slot can come sooner than without groups."""
    state = slots.KeyState(slots=sorted(singles))
    exact = sorted(singles)
    for bound, count in adds:
        slots.add_group(state, limits(burst), bound, count)
        for _ in range(count):
            bisect.insort(exact, bound)
        assert len(state.groups) <= slots.GROUPS
        for d in range(1, min(burst, len(exact)) + 1):
            kept = slots.latest(state, d)
            assert kept is not None and kept >= exact[-d]
