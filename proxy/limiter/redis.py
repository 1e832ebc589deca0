"""The shared limiter: one Lua script call per decision in Redis (or Redis Cluster).

The script reads Redis `TIME` and answers waits relative to it, so replicas whose clocks
disagree still agree on the order and spacing of slots: each replica sleeps the relative
wait on its own monotonic clock. Both keys of a resource carry the hash tag
`{app:kind:id}`, so a cluster keeps them in one slot and the script may touch both.

What the upstream's headers say is applied inside the next decision for the same key
(with its age, so it counts as of when it was said): one round trip per request. An
upstream 429, and counts that reveal traffic the proxy never saw, are written at once,
because every replica must know now. Counts waiting for their key's next decision are
dropped once a window old, and beyond `max_keys` of them the oldest go first: by then the
burst count no longer matters and the daily one is within the slack of the proxy's own
count (a larger gap is written at once), so a dropped one only delays a small correction.

Redis errors are translated here, at one boundary, into `LimiterUnavailable`; nothing
above this module sees a redis-py type.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.errors import LimiterUnavailable
from proxy.limiter.base import DEFAULT_MAX_KEYS, Day, Decision, Limits, Probe, UpstreamCounts
from proxy.pipelined_redis import PipelinedCluster, PipelinedRedis, Script
from proxy.typing import LimitedBy, ResourceKey

US = 1_000_000
ScriptClient = PipelinedRedis | PipelinedCluster
KEY_PREFIX = "hoopai:limit"
NOT_SEEN = -1
# A release touches only the slot list, never a day's counter.
_ANY_DAY = Day(id="release", ends_in_s=0.0)


def redis_keys(key: ResourceKey, day: Day) -> list[str]:
    """The bounds (a ZSET), today's counter, the after-outage marker, the cold-key probe,
    the learned limits and the groups of revealed traffic (a short string) of `key`,
    sharing one cluster hash slot (lua/limiter.lua, KEYS[1..6]). The bounds are not at
    `...:burst`, where older versions kept a LIST, so no replica meets the other's type."""
    base = f"{KEY_PREFIX}:{{{key.tag}}}"
    return [
        f"{base}:bounds",
        f"{base}:day:{day.id}",
        f"{base}:transition",
        f"{base}:probe",
        f"{base}:limits",
        f"{base}:groups",
    ]


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the upstream last said of a key, and when (on this replica's clock)."""

    burst_remaining: int
    daily_remaining: int
    day_id: str  # a daily count said yesterday is not today's
    at: float


class RedisLimiter:
    """The limiter algorithm in Redis, shared by every replica that uses the same server."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        scripts: ScriptClient | None = None,
        clock: Callable[[], float] | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        """`scripts` runs the script (the pipelined client: one connection per server,
        the decisions of one loop pass in one write); without it, redis-py's `client`
        does, as it answers `ping` either way. `clock` replaces Redis TIME; only tests
        set it, to replay chosen arrival times. `max_keys` caps the upstream counts kept
        for keys' next decisions."""
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        script = resources.files("proxy.limiter").joinpath("lua", "limiter.lua").read_text()
        self._client = client
        self._scripts = scripts
        self._lua = Script(script)
        self._script: AsyncScript = client.register_script(script)
        self._clock = clock
        self._max_keys = max_keys
        # In the order they were said (a newer count for a key moves it to the end).
        self._seen: OrderedDict[ResourceKey, _Seen] = OrderedDict()

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
        seen = self._seen.pop(key, None)
        reply = await self._call(
            "acquire",
            key,
            limits,
            day,
            _us(max_wait_s),
            shadow,
            seen,
            probe_s=probe_s,
            headroom=headroom,
            reserve=reserve,
        )
        admitted, wait, retry_after, limited_by, remaining, reset, daily_remaining, slot, end = (
            reply[:9]
        )
        return Decision(
            admitted=bool(admitted),
            wait_s=int(wait) / US,
            retry_after_s=int(retry_after) / US,
            limited_by=_limited_by(limited_by),
            burst_remaining=int(remaining),
            burst_reset_s=int(reset) / US,
            daily_remaining=int(daily_remaining),
            daily_reset_s=day.ends_in_s,
            slot=None if int(slot) < 0 else int(slot),
            queue_end_s=int(end) / US,
            probe=_probe(reply[9]),
            limits=_learned(limits, reply[10:13]),
            pad_s=limits.pad_s,
        )

    async def fill_until(self, key: ResourceKey, limits: Limits, day: Day, in_s: float) -> None:
        """Make the key's window full `in_s` from now (Redis TIME): no slot before then +
        W + pad, for every replica. Filling twice at one time adds nothing."""
        at = _Seen(
            burst_remaining=0, daily_remaining=NOT_SEEN, day_id=day.id, at=self._now() + in_s
        )
        await self._call("pause", key, limits, day, 0, False, at)

    async def resume(
        self,
        key: ResourceKey,
        limits: Limits,
        own_in_s: tuple[float, ...],
        others: int,
        for_s: float,
    ) -> None:
        """After an outage, before the key's next decision: add the slots this replica
        took while Redis was away (`own_in_s`, seconds from now), and for `for_s` leave
        `others` slots of every window to the replicas still deciding locally (every
        replica's decisions in Redis honour it)."""
        extra = [str(_us(at)) for at in own_in_s]
        await self._call(
            "resume", key, limits, _ANY_DAY, _us(for_s), False, None, others=others, extra=extra
        )

    async def release(self, key: ResourceKey, limits: Limits, decision: Decision) -> None:
        if decision.slot is None:
            return
        # The slot travels as the integer microseconds the script stored (no float on the
        # way), so the script finds the very value it answered.
        await self._call("release", key, limits, _ANY_DAY, int(decision.slot), False, None)

    async def learn(self, key: ResourceKey, limits: Limits, *, forget: bool = False) -> None:
        await self._call("learn", key, limits, _ANY_DAY, 0 if forget else 1, False, None)

    async def anchor(
        self, key: ResourceKey, limits: Limits, decision: Decision, late_by_s: float
    ) -> None:
        if decision.slot is None:
            return
        await self._call(
            "anchor", key, limits, _ANY_DAY, int(decision.slot), False, None, others=_us(late_by_s)
        )

    async def observe(
        self,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        counts: UpstreamCounts,
    ) -> None:
        seen = _Seen(
            burst_remaining=_or_not_seen(counts.burst_remaining),
            daily_remaining=_or_not_seen(counts.daily_remaining),
            day_id=day.id,
            at=self._now(),
        )
        if counts.pause or counts.at_once or counts.end_probe:
            self._seen.pop(key, None)
            op = "pause" if counts.pause else "observe"
            await self._call(op, key, limits, day, 0, False, seen, end_probe=counts.end_probe)
        else:
            self._seen[key] = seen
            self._seen.move_to_end(key)
            self._forget(seen.at - (limits.window_s + limits.pad_s))

    async def ping(self) -> None:
        """Raise LimiterUnavailable unless Redis answers now."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"Redis limiter unavailable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """The client belongs to whoever created it (the app's cleanup context)."""

    @property
    def pending_corrections(self) -> int:
        """Keys with upstream counts waiting for their next decision."""
        return len(self._seen)

    def _forget(self, said_before: float) -> None:
        """Drop counts said before `said_before`, and the oldest beyond `max_keys`."""
        seen = self._seen
        while seen and (len(seen) > self._max_keys or next(iter(seen.values())).at < said_before):
            seen.popitem(last=False)

    async def _call(
        self,
        op: str,
        key: ResourceKey,
        limits: Limits,
        day: Day,
        max_wait_or_slot_us: int,
        shadow: bool,
        seen: _Seen | None,
        *,
        others: int = 0,
        extra: list[str] | None = None,
        probe_s: float = 0.0,
        headroom: int = 0,
        reserve: int = 0,
        end_probe: bool = False,
    ) -> Any:
        """ARGV[7] is the longest wait for `acquire`, the bound for `release` and
        `anchor`, how long for `resume`; ARGV[8] is `others` for `resume` (how many slots
        to leave) and `anchor` (how late); ARGV[17..] `extra` (lua/limiter.lua)."""
        args: list[int | str] = [
            op,
            limits.burst,
            _us(limits.window_s),
            _us(limits.pad_s),
            limits.daily,
            _us(day.ends_in_s),
            max_wait_or_slot_us,
            str(others) if op in ("resume", "anchor") else ("1" if shadow else "0"),
            NOT_SEEN if seen is None else seen.burst_remaining,
            NOT_SEEN if seen is None or seen.day_id != day.id else seen.daily_remaining,
            # A count said in the past, or (a fill) a time still to come: negative.
            0 if seen is None else _us(self._now() - seen.at),
        ]
        args += [
            "" if self._clock is None else _us(self._clock()),
            _us(probe_s),
            "1" if end_probe else "0",
            headroom,
            reserve,
            *(extra or ()),
        ]
        keys = redis_keys(key, day)
        try:
            if self._scripts is not None:
                return await self._scripts.run(self._lua, keys, args)
            return await self._script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"Redis limiter unavailable: {type(exc).__name__}") from exc

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.monotonic()


def _limited_by(raw: object) -> LimitedBy:
    """The script's `limited_by` reply as the limiter's word for it."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if text not in ("", "burst", "daily"):
        raise LimiterUnavailable(f"the limiter script answered an unknown limit {text[:20]!r}")
    return cast(LimitedBy, text)


def _learned(asked: Limits, reply: list[Any]) -> Limits:
    """The limits the script decided with: the key's learned ones, or those `asked`."""
    burst, window_us, daily = (int(value) for value in reply)
    if burst <= 0:
        return asked
    return Limits(burst=burst, window_s=window_us / US, pad_s=asked.pad_s, daily=daily)


def _probe(raw: object) -> Probe:
    """The script's `probe` reply as the limiter's word for it."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if text == "this":
        return "this"
    if text == "other":
        return "other"
    return ""


def _or_not_seen(remaining: int | None) -> int:
    return NOT_SEEN if remaining is None else max(0, remaining)


def _us(seconds: float) -> int:
    return round(seconds * US)
