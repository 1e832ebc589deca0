"""Benchmark: what the limiter costs at scale, in memory and in time (not a test).

1. 10,000 requests queued on ONE resource (100 per 10 s): the time per decision and the
   state kept, for the memory and the Redis backend; then the same 10,000 requests held
   by a real proxy process (its RSS while they wait).
2. 10,000 resources active at once (one decision each, then a second round): the time
   per decision and the state kept, for both backends.

Writes its table into bench/RESULTS.md.

    python -m bench.limiter
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
import redis.asyncio as aioredis

from bench.results import machine, write_section
from proxy.harness.processes import proxy_process, simulator_process, write_config
from proxy.harness.redis_server import RedisServer
from proxy.harness.tokens import SIM_CLIENT_ID, bearer
from proxy.limiter.base import Day, Limiter, Limits
from proxy.limiter.memory import MemoryLimiter
from proxy.limiter.redis import RedisLimiter
from proxy.typing import ResourceKey

SECTION = "## Limiter at scale"
REAL = Limits(burst=100, window_s=10.0, pad_s=0.1, daily=200_000)
DAY = Day(id="2026-01-01", ends_in_s=86_400.0)
COUNT = 10_000


async def timed_decisions(limiter: Limiter, keys: Callable[[int], ResourceKey]) -> float:
    """Microseconds per decision for COUNT sequential decisions."""
    started = time.perf_counter()
    for index in range(COUNT):
        await limiter.acquire(keys(index), REAL, DAY, max_wait_s=10**6)
    return (time.perf_counter() - started) / COUNT * 1e6


async def memory_backend(keys: Callable[[int], ResourceKey]) -> tuple[float, float]:
    """(us per decision, KiB of state) for the memory backend."""
    gc.collect()
    tracemalloc.start()
    limiter = MemoryLimiter()
    per_decision = await timed_decisions(limiter, keys)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return per_decision, held / 1024


async def redis_backend(redis_url: str, keys: Callable[[int], ResourceKey]) -> tuple[float, float]:
    """(us per decision, KiB of state in Redis) for the Redis backend."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushall()
        before = int((await client.info("memory"))["used_memory"])
        per_decision = await timed_decisions(RedisLimiter(client), keys)
        after = int((await client.info("memory"))["used_memory"])
    finally:
        await client.aclose()
    return per_decision, (after - before) / 1024


async def proxy_holding_queue(workdir: Path) -> tuple[float, float]:
    """(MiB of proxy RSS growth, seconds to accept) with COUNT requests queued on one key."""
    simulator = simulator_process(workdir / "sim.log").start()
    config = write_config(
        workdir / "queue.yaml",
        {
            # Every queued request is an open connection: lift the cap above COUNT.
            "server": {"host": "127.0.0.1", "port": 0, "max_connections": COUNT * 2},
            "admin": {"host": "127.0.0.1", "port": 0},
            "upstream": {"base_url": simulator.url},
            # The callers' own tokens (bearer()) belong to this app: the proxy limits only
            # tokens of apps it is configured for.
            "apps": [{"name": "bench", "client_id": SIM_CLIENT_ID, "client_secret": "s"}],
            "queue": {"max_wait_ms": 3_600_000},
            "store": {"sqlite_path": str(workdir / "queue-tokens.db")},
        },
    )
    proxy = proxy_process(config, workdir / "queue.log").start()
    assert proxy.process is not None
    process = psutil.Process(proxy.process.pid)
    baseline = process.memory_info().rss
    connector = aiohttp.TCPConnector(limit=0)
    started = time.perf_counter()
    try:
        async with aiohttp.ClientSession(connector=connector, headers=bearer("queueBench")) as http:
            tasks = [
                asyncio.create_task(http.get(f"{proxy.url}/_sim/echo/q?i={i}"))
                for i in range(COUNT)
            ]
            # Polling another process: there is no event to wait on.
            while len(process.net_connections()) < COUNT and time.perf_counter() - started < 60:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            accepted_s = time.perf_counter() - started
            await asyncio.sleep(2)  # let the held requests settle into their waits
            growth = (process.memory_info().rss - baseline) / 2**20
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        proxy.stop(timeout_s=10)
        simulator.stop()
    return growth, accepted_s


async def main() -> None:
    one_key = ResourceKey("benchapp", "location", "one")

    def same(_: int) -> ResourceKey:
        return one_key

    def many(index: int) -> ResourceKey:
        return ResourceKey("benchapp", "location", f"loc{index}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis").start()
        try:
            rows = [
                ("10,000 queued on one resource", "memory", *await memory_backend(same)),
                ("10,000 queued on one resource", "Redis", *await redis_backend(redis.url, same)),
                ("10,000 resources active", "memory", *await memory_backend(many)),
                ("10,000 resources active", "Redis", *await redis_backend(redis.url, many)),
            ]
        finally:
            redis.stop()
        growth, accepted_s = await proxy_holding_queue(workdir)
    lines = [
        SECTION,
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {machine()}; limits 100 per "
        "10 s; decisions made one after another from one client.",
        "",
        "| case | backend | us per decision | state kept (Redis: used_memory growth) |",
        "|---|---|---:|---:|",
        *(f"| {case} | {backend} | {us:.0f} | {kib:,.0f} KiB |" for case, backend, us, kib in rows),
        "",
        f"A proxy process holding {COUNT:,} queued requests on one resource (10,000 open "
        f"connections, 100 slots per 10 s): RSS grew by {growth:.0f} MiB; the load generator "
        f"had all connections open after {accepted_s:.1f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    asyncio.run(main())
