"""The in-process limiter: the embedded default, and the fallback when Redis is down.

One dict of key states guarded by the event loop (each decision runs without awaiting,
so it is atomic in this process).

Memory follows the keys in use, not every key a caller ever named. A key whose burst
window is empty keeps only today's count, in `DailyCounts` (about 100 bytes a key); its
slot list is dropped, which changes no decision. Idle keys are found through a heap of
the times their windows end, a few per decision, so no decision walks every key. A
process tracks at most `max_keys` keys, full and compact together: past that a new key is
refused with TooManyKeys (and one warning a minute is logged), while a key with slots in
its window is never dropped, since forgetting them would let more than N through in a
window. Daily counts go when their limit day ends.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import time
from collections.abc import Callable

from proxy.errors import TooManyKeys
from proxy.limiter import slots
from proxy.limiter.base import DEFAULT_MAX_KEYS, Day, Decision, Limits, UpstreamCounts
from proxy.typing import ResourceKey

log = logging.getLogger(__name__)

# Idle keys compacted per decision at most: more than the one key a decision can add, so
# the full states follow the active set, yet a decision after a quiet spell stays short.
SWEEP_BUDGET = 64
WARN_EVERY_S = 60.0


class DailyCounts:
    """Today's count of each key with nothing in its burst window, and nothing else.

    A key is kept as a 128-bit digest of its name (collisions are out of reach at any
    count of keys a process can hold), so its cost does not grow with the length of the
    ids a caller chose. Day ids are ISO dates, so they sort in time order: a later day
    drops every count, a stray earlier one changes nothing.
    """

    def __init__(self) -> None:
        self.day_id = ""
        self._counts: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def roll(self, day_id: str) -> bool:
        """Start `day_id` if it is a later day than the one counted; True if it did."""
        if day_id <= self.day_id:
            return False
        self.day_id = day_id
        self._counts = {}
        return True

    def put(self, key: ResourceKey, day_id: str, count: int) -> None:
        """Keep `count` if it is today's and not zero (zero is what a missing key means)."""
        if day_id == self.day_id and count > 0:
            self._counts[_digest(key)] = count

    def pop(self, key: ResourceKey) -> int | None:
        """The key's count, removed from here; None when none is kept."""
        if not self._counts:
            return None
        return self._counts.pop(_digest(key), None)

    def clear(self) -> None:
        self._counts = {}


def _digest(key: ResourceKey) -> int:
    name = f"{key.app}\0{key.kind}\0{key.id}".encode("utf-8", "surrogatepass")
    # As an int: 16 bytes less than the same 128 bits as a bytes object.
    return int.from_bytes(hashlib.blake2b(name, digest_size=16).digest())


class MemoryLimiter:
    """The limiter algorithm over a dict, on this process's clock."""

    def __init__(
        self, clock: Callable[[], float] = time.time, *, max_keys: int = DEFAULT_MAX_KEYS
    ) -> None:
        """`max_keys` is `limits.max_tracked_keys`: keys tracked at once, full or compact."""
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._live: dict[ResourceKey, slots.KeyState] = {}
        # One entry per live key: (a time no later than the end of its window, key).
        self._ends: list[tuple[float, ResourceKey]] = []
        self._counts = DailyCounts()
        self._warned_at: float | None = None
        self._refused = 0  # new keys refused since the last warning

    async def acquire(
        self,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        max_wait_s: float,
        *,
        shadow: bool = False,
        probe_s: float = 0.0,
        headroom: int = 0,
        reserve: int = 0,
    ) -> Decision:
        now = self._clock()
        state = self._state(key, limits, day, now)
        if state is None:
            raise self._too_many(key, day, now)
        return slots.decide(
            state,
            limits,
            day,
            now,
            max_wait_s,
            shadow=shadow,
            probe_s=probe_s,
            headroom=headroom,
            reserve=reserve,
        )

    async def observe(
        self,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        counts: UpstreamCounts,
    ) -> None:
        """Past the cap, counts for a key not tracked are dropped: its requests are
        refused anyway until there is room."""
        now = self._clock()
        state = self._state(key, limits, day, now)
        if state is not None:
            slots.observe(state, limits, day, now, counts)
            if counts.end_probe:
                slots.end_probe(state)

    async def fill_until(self, key: ResourceKey, limits: Limits, day: Day, in_s: float) -> None:
        """Make the key's window full `in_s` from now: no slot before then + W + pad."""
        now = self._clock()
        state = self._state(key, limits, day, now)
        if state is not None:
            slots.fill(state, limits, now, now + in_s)

    def slots_from_now(self, key: ResourceKey, limits: Limits) -> tuple[float, ...]:
        """The key's slots still in their hold, as seconds from now (negative: past)."""
        state = self._live.get(key)
        if state is None:
            return ()
        now = self._clock()
        slots.trim(state, limits, now)
        return tuple(bound - now for bound in slots.entries(state))

    async def release(self, key: ResourceKey, limits: Limits, decision: Decision) -> None:
        state = self._live.get(key)
        if state is not None and decision.slot is not None:
            slots.release(state, decision.slot)

    async def anchor(
        self, key: ResourceKey, limits: Limits, decision: Decision, late_by_s: float
    ) -> None:
        state = self._live.get(key)
        if state is not None and decision.slot is not None:
            now = self._clock()
            slots.anchor(state, limits, now, decision.slot, decision.slot + late_by_s)

    async def learn(self, key: ResourceKey, limits: Limits, *, forget: bool = False) -> None:
        """Nothing to share: this process's view (Admission's) is all there is."""

    async def close(self) -> None:
        self._live.clear()
        self._ends.clear()
        self._counts.clear()

    @property
    def active_keys(self) -> int:
        """Keys held in full (slot list and count)."""
        return len(self._live)

    @property
    def tracked_keys(self) -> int:
        """Keys held in full or as a compact daily count: what `max_keys` caps."""
        return len(self._live) + len(self._counts)

    def _state(
        self, key: ResourceKey, limits: Limits, day: Day, now: float
    ) -> slots.KeyState | None:
        """The key's full state, made from its compact count if it has one; None for a
        new key when the cap is reached even after compacting every idle key."""
        # A new day makes every idle key's count worthless at once: drop them all.
        self._sweep(now, None if self._counts.roll(day.id) else SWEEP_BUDGET)
        state = self._live.get(key)
        if state is not None:
            state.window_s = limits.window_s
            return state
        count = self._counts.pop(key)
        if count is None and self.tracked_keys >= self._max_keys:
            self._sweep(now, None)
            if self.tracked_keys >= self._max_keys:
                return None
        state = self._live[key] = slots.KeyState(
            day_id=self._counts.day_id, day_count=count or 0, window_s=limits.window_s
        )
        heapq.heappush(self._ends, (now, key))
        return state

    def _sweep(self, now: float, budget: int | None) -> None:
        """Compact live keys whose window has ended, at most `budget` of them (None: all).

        An entry's time is never later than its key's window end, so keys are checked no
        sooner than needed; one whose window has moved on goes back with its new end. Each
        key's own window counts (learned limits differ from key to key).
        """
        ends = self._ends
        checked = 0
        while ends and ends[0][0] <= now and (budget is None or checked < budget):
            _, key = heapq.heappop(ends)
            checked += 1
            state = self._live[key]
            last = slots.last_bound(state)
            if last is not None and last + state.window_s > now:
                heapq.heappush(ends, (last + state.window_s, key))
                continue
            del self._live[key]
            self._counts.put(key, state.day_id, state.day_count)

    def _too_many(self, key: ResourceKey, day: Day, now: float) -> TooManyKeys:
        """The refusal of a new key at the cap, and a warning at most every WARN_EVERY_S."""
        self._refused += 1
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY_S:
            log.warning(
                "tracking %d rate-limit keys, the most limits.max_tracked_keys allows: new "
                "keys are refused with 503 too_many_keys (%d refused since the last warning); "
                "raise limits.max_tracked_keys if this many resources are real traffic",
                self.tracked_keys,
                self._refused,
            )
            self._warned_at, self._refused = now, 0
        # Compact counts hold their place until the day ends; sooner if a key goes idle.
        retry_after = max(1, math.ceil(day.ends_in_s))
        return TooManyKeys(
            f"This proxy process already tracks {self._max_keys} rate-limit keys "
            f"(limits.max_tracked_keys), so {key.kind} {key.id} is refused for now; retry "
            f"after {retry_after} s at the latest, or raise limits.max_tracked_keys",
            headers={"Retry-After": str(retry_after)},
        )
