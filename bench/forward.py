"""Benchmark: going straight to the simulator, through the proxy with the memory limiter,
and through the proxy with the Redis limiter, in one run with one load generator.

The simulator, a redis-server and two proxies run as separate processes on this machine.
The proxies' limits are 100 per 1 ms, far above the load, so the figures show the cost of
the path, not the limit. Also counts Redis round trips (script calls) per forwarded
request. Prints a table and writes it into bench/RESULTS.md. Not a test, not a CI gate.

    python -m bench.forward [--duration 10] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.loadgen import LoadResult, run_load
from bench.results import machine, write_section
from proxy.harness.processes import (
    ServiceProcess,
    proxy_process,
    simulator_process,
    write_config,
)
from proxy.harness.redis_server import RedisServer
from proxy.harness.tokens import SIM_CLIENT_ID, bearer

SECTION = "## Forwarding: direct, memory limiter, Redis limiter"
# The real burst size (the slot list a decision reads is 100 long) over a 1 ms window, so
# the limiter does its real work per request but never holds one back.
UNLIMITED = {
    "burst": {"requests": 100, "interval_ms": 1, "pad_ms": 0},
    "daily": {"requests": 1_000_000_000},
}


def table(results: list[LoadResult], concurrency: int) -> str:
    lines = [
        SECTION,
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; {concurrency} concurrent "
        "callers, 1 KiB POST bodies to the simulator's echo endpoint; simulator, proxy and "
        "load generator share the machine.",
        "",
        "| path | requests | req/s | p50 ms | p99 ms | statuses |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.label} | {r.requests} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.statuses} |"
        )
    return "\n".join(lines) + "\n"


def start_proxy(workdir: Path, name: str, upstream: str, **store: str) -> ServiceProcess:
    config = write_config(
        workdir / f"{name}.yaml",
        {
            "server": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "upstream": {"base_url": upstream},
            # The callers' own tokens (bearer()) belong to this app: the proxy limits only
            # tokens of apps it is configured for.
            "apps": [{"name": "bench", "client_id": SIM_CLIENT_ID, "client_secret": "s"}],
            "limits": UNLIMITED,
            "store": {"sqlite_path": str(workdir / f"{name}-tokens.db"), **store},
        },
    )
    return proxy_process(config, workdir / f"{name}.log").start()


async def script_calls(redis_url: str) -> int:
    """EVAL + EVALSHA calls the server has answered so far."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha")
    )


async def main(duration_s: float, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis").start()
        simulator = simulator_process(workdir / "sim.log").start()
        memory = start_proxy(workdir, "memory", simulator.url)
        shared = start_proxy(workdir, "redis", simulator.url, redis_url=redis.url)
        body = b"x" * 1024
        # The caller's own token (pass-through) names the location the limiter keys on.
        caller = bearer("benchLocation")
        load = {
            "concurrency": concurrency,
            "duration_s": duration_s,
            "body": body,
            "headers": caller,
        }
        try:
            results = [
                await run_load("direct to simulator", f"{simulator.url}/_sim/echo/b", **load),
                await run_load("proxy, memory limiter", f"{memory.url}/_sim/echo/b", **load),
            ]
            before = await script_calls(redis.url)
            results.append(
                await run_load("proxy, Redis limiter", f"{shared.url}/_sim/echo/b", **load)
            )
            round_trips = (await script_calls(redis.url) - before) / results[-1].requests
        finally:
            for process in (shared, memory, simulator):
                process.stop()
            redis.stop()
    text = table(results, concurrency) + (
        f"\nRedis script calls per forwarded request (Redis limiter): {round_trips:.3f}\n"
    )
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.duration, args.concurrency))
