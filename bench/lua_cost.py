"""Benchmark: the Redis limiter script's server time per call, by N (not a test).

For N = 100, 1,000 and 10,000 a key holds N live arrival bounds (a window of 100,000 s, so
nothing is trimmed; half of them past, half queued ahead), and each path is called in
BATCHES batches of CALLS calls, the key put back as it was after each call by undoing
what the call changed (a few small commands, not counted). The time is Redis's own:
`CONFIG RESETSTAT` before a batch, `usec_per_call` of evalsha in `INFO commandstats` after
it, no client and no network in it; a cell is the least of its batches' means over ROUNDS
rounds (other processes on the machine only ever add time).

The paths: an acquire on the full window (queued; refused), one carrying upstream counts
that reveal nothing, counts that reveal REVEALED unknown requests (written at once), an
upstream 429 (`pause`, which fills the window: N/2 entries), an `anchor` of a late answer and a
`release` of a queued slot.

"before" is the script at commit c8f9adc, read with `git show` (its bounds a LIST at
`...:burst`, 5 keys); "after" is the package's script (a ZSET of bounds and at most
GROUPS groups at `...:groups`), run with GROUPS groups already kept among the queued
bounds, so that every d-th latest searches them and a reveal merges two: its worst case.
Both get the same ARGV (the layout did not change). `markdown_table()` runs it all and
returns the table (bench/run.py puts it in its report).

    python -m bench.lua_cost
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from bench.results import machine
from proxy.harness.redis_server import RedisServer
from proxy.limiter.base import Day
from proxy.limiter.redis import KEY_PREFIX, redis_keys
from proxy.limiter.slots import GROUPS
from proxy.typing import ResourceKey

OLD_COMMIT = "c8f9adc"
COUNTS = (100, 1_000, 10_000)
CALLS = 5
BATCHES = 50
ROUNDS = 3
SLOW_US = 5_000
REVEALED = 10
US = 1_000_000
WINDOW_US = 100_000 * US
PAD_US = 100_000
DAY = Day(id="2026-01-01", ends_in_s=86_400.0)
KEY = ResourceKey("bench", "location", "lua-cost")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Version:
    """One version of the script, with the keys it takes and how its bounds are kept."""

    label: str
    source: str
    keys: list[str]
    zset: bool  # the bounds as a ZSET and GROUPS groups (after), else a LIST (before)


def versions() -> list[Version]:
    """Before (from git, when the history is there) and after."""
    new = resources.files("proxy.limiter").joinpath("lua", "limiter.lua").read_text()
    after = Version("after", new, redis_keys(KEY, DAY), zset=True)
    shown = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:proxy/limiter/lua/limiter.lua"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode != 0:
        print(f"git show {OLD_COMMIT} failed, measuring the current script only", flush=True)
        return [after]
    base = f"{KEY_PREFIX}:{{{KEY.tag}}}"
    old_keys = [f"{base}:burst", *redis_keys(KEY, DAY)[1:5]]
    return [Version("before", shown.stdout, old_keys, zset=False), after]


def argv(op: str, burst: int, arg7: int = 0, arg8: int = 0, seen: int = -1) -> list[int | str]:
    """The script's ARGV (lua/limiter.lua): Redis TIME, no probe, no headroom."""
    day_us = round(DAY.ends_in_s * US)
    return [op, burst, WINDOW_US, PAD_US, 10**9, day_us, arg7, arg8, seen, -1, 0, "", 0, "0", 0, 0]


@dataclass(frozen=True)
class Call:
    """One path: its ARGV given N and the key's bounds (ascending), and how to put the key
    back as it was after the call (`undo`, given the reply), outside the time measured."""

    label: str
    args: Callable[[int, list[int]], list[int | str]]
    undo: Callable[[redis.Redis, Version, list[int], Any], None]


def _unadd(client: redis.Redis, version: Version, bounds: list[int], reply: Any) -> None:
    """Take out the bound an admitted acquire added (the reply's slot_us), the last one."""
    if version.zset:
        client.zrem(version.keys[0], str(reply[7]))
    else:
        client.lrem(version.keys[0], -1, str(reply[7]))


def _unreveal(client: redis.Redis, version: Version, bounds: list[int], reply: Any) -> None:
    """Take out what a reveal or a fill added at now + pad (a run of the old list, right
    after its past half; the new script's groups)."""
    if version.zset:
        write_groups(client, version, bounds)
    else:
        added = client.lindex(version.keys[0], len(bounds) // 2)
        if isinstance(added, bytes):
            client.lrem(version.keys[0], 0, added.decode())


def _unanchor(client: redis.Redis, version: Version, bounds: list[int], reply: Any) -> None:
    bound = bounds[len(bounds) // 2 - 1]
    if version.zset:
        client.zrem(version.keys[0], str(bound + US))
        client.zadd(version.keys[0], {str(bound): bound})
    else:
        client.lrem(version.keys[0], 1, str(bound + US))
        client.linsert(version.keys[0], "BEFORE", str(bounds[len(bounds) // 2]), str(bound))


def _unrelease(client: redis.Redis, version: Version, bounds: list[int], reply: Any) -> None:
    if version.zset:
        client.zadd(version.keys[0], {str(bounds[-1]): bounds[-1]})
    else:
        client.rpush(version.keys[0], str(bounds[-1]))


def _nothing(client: redis.Redis, version: Version, bounds: list[int], reply: Any) -> None:
    """A refusal records nothing."""


CALLS_BY_PATH = (
    Call("acquire, window full: queued", lambda n, b: argv("acquire", n, arg7=10**13), _unadd),
    Call("acquire, window full: refused", lambda n, b: argv("acquire", n), _nothing),
    Call(
        # N/2 left: the past half of the bounds is what the upstream counted.
        "acquire with counts that reveal nothing",
        lambda n, b: argv("acquire", n, arg7=10**13, seen=n // 2),
        _unadd,
    ),
    Call(
        # The past half is what the upstream counted, and REVEALED more.
        f"observe revealing {REVEALED} unknown",
        lambda n, b: argv("observe", n, seen=n - n // 2 - REVEALED),
        _unreveal,
    ),
    Call("pause (an upstream 429)", lambda n, b: argv("pause", n, seen=0), _unreveal),
    Call(
        "anchor (the latest sent, 1 s late)",
        lambda n, b: argv("anchor", n, arg7=b[n // 2 - 1], arg8=US),
        _unanchor,
    ),
    Call("release (the last queued)", lambda n, b: argv("release", n, arg7=b[-1]), _unrelease),
)


def write_groups(client: redis.Redis, version: Version, bounds: list[int]) -> None:
    """GROUPS groups of one among the queued half, off the singles' bounds, as the script
    keeps them (lua/limiter.lua, KEYS[6]: cmsgpack of bound, count, since, ...)."""
    now = bounds[len(bounds) // 2]  # the time `fill` wrote them (WINDOW_US / N is whole)
    groups = [now + (k + 1) * WINDOW_US // 20 + 1 for k in range(GROUPS)]
    flat = ", ".join(f"{bound}, 1, {bound}" for bound in groups)
    if flat:
        client.eval(f"redis.call('SET', KEYS[1], cmsgpack.pack({flat}))", 1, version.keys[5])


def fill(client: redis.Redis, version: Version, n: int) -> list[int]:
    """Write the key's N bounds (and, after, GROUPS groups of one); returns the bounds."""
    seconds, micros = client.time()
    now = seconds * US + micros
    bounds = [now - WINDOW_US // 2 + i * (WINDOW_US // n) for i in range(n)]
    client.delete(*version.keys)
    pipe = client.pipeline(transaction=False)
    for start in range(0, n, 1000):
        chunk = [str(bound) for bound in bounds[start : start + 1000]]
        if version.zset:
            pipe.zadd(version.keys[0], {member: int(member) for member in chunk})
        else:
            pipe.rpush(version.keys[0], *chunk)
    pipe.execute()
    if version.zset:
        write_groups(client, version, bounds)
    return bounds


def per_call_us(client: redis.Redis, run: Callable[[], None]) -> float:
    """Server microseconds per evalsha: the least mean of BATCHES batches of CALLS calls,
    so that other processes on the machine, which can only add to a batch's time, count
    as little as possible. A path slower than SLOW_US a call (the old script's at large N)
    is timed on 5 calls in all."""

    def batch(calls: int) -> float:
        client.config_resetstat()
        for _ in range(calls):
            run()
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return float(stats.get("usec_per_call", 0.0))

    first = batch(1)  # a warm-up, unless the path is slow
    if first > SLOW_US:
        return min(first, batch(2), batch(2))
    return min(batch(CALLS) for _ in range(BATCHES))


def measure(
    client: redis.Redis, version: Version, n: int, skip: frozenset[str] = frozenset()
) -> dict[str, float]:
    """Each path's server time per call at N, for one version (but the paths in `skip`):
    each call finds the key as `fill` wrote it (the call before undone)."""
    sha = client.script_load(version.source)
    bounds = fill(client, version, n)
    result: dict[str, float] = {}
    for path in CALLS_BY_PATH:
        if path.label in skip:
            continue
        args = path.args(n, bounds)

        def once(args: list[int | str] = args, undo: Any = path.undo) -> None:
            reply = client.evalsha(sha, len(version.keys), *version.keys, *args)
            undo(client, version, bounds, reply)

        result[path.label] = per_call_us(client, once)
    return result


def markdown_table(counts: tuple[int, ...] = COUNTS) -> str:
    """Run the benchmark on a redis-server of its own and return its table (markdown)."""
    with tempfile.TemporaryDirectory(prefix="lua-cost-") as workdir:
        server = RedisServer(Path(workdir) / "redis").start()
        try:
            # No timeout: the old script takes seconds a call at N = 10,000 (and a resent
            # call would run twice).
            client = redis.Redis.from_url(server.url, socket_timeout=None, retry=None)
            version_line = client.info("server").get("redis_version", "?")
            found: dict[tuple[str, int], dict[str, float]] = {}
            # Rounds apart in time, each cell the least of its rounds: a spell of load
            # from other processes spoils one round's cell, not all of them. Slow cells
            # (seconds a call) are not worth a second round.
            for _ in range(ROUNDS):
                for n in counts:
                    for version in versions():
                        best = found.setdefault((version.label, n), {})
                        slow = frozenset(label for label, us in best.items() if us > SLOW_US)
                        for label, us in measure(client, version, n, slow).items():
                            best[label] = min(us, best.get(label, us))
            client.close()
        finally:
            server.stop()
    labels = sorted({label for label, _ in found}, key=["before", "after"].index)
    head = ["path"] + [f"N = {n:,} {label}" for n in counts for label in labels]
    rows = [
        [path] + [f"{found[(label, n)][path]:,.0f}" for n in counts for label in labels]
        for path in (call.label for call in CALLS_BY_PATH)
    ]
    lines = [
        f"Server time per call, us (Redis {version_line}, {machine()}; the least mean of "
        f"{BATCHES} batches of {CALLS} calls, over {ROUNDS} rounds; "
        f"`python -m bench.lua_cost`):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
