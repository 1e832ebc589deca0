"""The Limiter protocol, its key and limits, and the Decision every backend returns.

Backends (memory, Redis) implement the same algorithm (docs/architecture.md, "The limiter"):
burst is "at most N in ANY window of W", kept as the reserved slot times still in their
hold; daily is a counter per key per day in the configured timezone. A decision is one
atomic step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.typing import LimitedBy, ResourceKey

# Keys one process tracks at most unless `limits.max_tracked_keys` says otherwise.
DEFAULT_MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Limits:
    """The numbers a decision is made with, in seconds and counts."""

    burst: int
    window_s: float
    pad_s: float
    daily: int

    def scaled(self, share: int) -> Limits:
        """This replica's share when replicas cannot coordinate (Redis down)."""
        return Limits(
            burst=max(1, self.burst // share),
            window_s=self.window_s,
            pad_s=self.pad_s,
            daily=max(1, self.daily // share),
        )


# A cold key's probe: "this" request goes alone first; "other": not admitted, because a
# probe of this key is out (ask again after retry_after_s, or once it is answered).
Probe = Literal["", "this", "other"]


@dataclass(frozen=True, slots=True)
class Day:
    """The current limit day: an id for its counter and how long until it ends."""

    id: str
    ends_in_s: float


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one request for a slot.

    Admitted: send after `wait_s`. Refused: `retry_after_s` says when asking again can
    succeed, `limited_by` says which limit refused. The remaining counts and reset times
    describe the key after this decision and feed the response headers. `slot` is the
    reserved send time on the backend's own clock, which `Limiter.release` takes to give
    it back (None when nothing was reserved: a refusal, or shadow mode); `local` marks a
    decision the fallback made in process while the shared limiter was down.
    `queue_end_s` is how far from now the key's latest reserved slot lies (any replica's,
    as the backend knew it): the fallback's measure of the queue it may not overlap.
    `slot` is an arrival bound (send time plus pad, slots.py), `queue_end_s` that bound
    less the pad. `probe`
    marks a cold key's probe, or a refusal while another request probes it. `limits`:
    the limits decided with: the ones given, or those another replica learned for the
    key (Limiter.learn), which the shared state holds and decides with instead.
    """

    admitted: bool
    wait_s: float
    retry_after_s: float
    limited_by: LimitedBy
    burst_remaining: int
    burst_reset_s: float
    daily_remaining: int
    daily_reset_s: float
    slot: float | None = None
    local: bool = False
    queue_end_s: float = 0.0
    probe: Probe = ""
    # The limits the decision was made with: the ones given, or the key's learned ones the
    # shared state holds (another replica learned them). None: no decision was made.
    limits: Limits | None = None
    pad_s: float = 0.0  # the pad in `slot`
    # The slot on this process's monotonic clock, never later than it (Admission sets it).
    due_at: float | None = None


@dataclass(frozen=True, slots=True)
class UpstreamCounts:
    """What one upstream answer said of a key: its remaining counts, as it said them."""

    burst_remaining: int | None = None
    daily_remaining: int | None = None
    # An upstream 429: the whole window from now is taken, for every replica, at once.
    pause: bool = False
    # The counts reveal traffic the limiter never saw: every replica must know now.
    at_once: bool = False
    # The answer to a cold key's probe: apply the counts now and let the others go.
    end_probe: bool = False


class Limiter(Protocol):
    """Shared state for all replicas (Redis) or one process (memory)."""

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
        """Reserve the earliest slot for `key`, or refuse if it is more than `max_wait_s` away.

        With `shadow`, decide the same way but record the request as sent now and never
        refuse it: the caller reports the decision and sends at once. `probe_s` > 0 probes
        a cold key; `headroom` and `reserve` leave that many slots of every window and
        requests of the day to others (slots.decide).
        """
        ...

    async def observe(
        self,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        counts: UpstreamCounts,
    ) -> None:
        """Lower the key's state to the upstream's counts when they say fewer remain.

        A backend may apply this with the key's next decision unless `counts.at_once` or
        `counts.pause` ask for it now (see UpstreamCounts).
        """
        ...

    async def release(self, key: ResourceKey, limits: Limits, decision: Decision) -> None:
        """Give back the slot of an admitted request that will never be sent (its caller
        hung up while it was queued). Nothing happens if the slot is no longer kept."""
        ...

    async def anchor(
        self, key: ResourceKey, limits: Limits, decision: Decision, late_by_s: float
    ) -> None:
        """The answer to `decision`'s request came back `late_by_s` after its bound: move
        the bound there, for every replica, since the request may have arrived that late."""
        ...

    async def learn(self, key: ResourceKey, limits: Limits, *, forget: bool = False) -> None:
        """Keep `limits` (learned from the upstream) as the key's, for every replica's
        decisions; `forget`: the key has the configured limits again. A process-local
        backend keeps nothing: the caller's own view is all there is."""
        ...

    async def close(self) -> None: ...
