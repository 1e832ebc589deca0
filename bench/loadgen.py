"""A small closed-loop HTTP load generator for the benchmarks (not a test).

`concurrency` workers each send one request, wait for the answer, and send the next,
until `duration_s` has passed. Latency is measured per request on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class LoadResult:
    label: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


async def run_load(
    label: str,
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Drive `url` (POST when `body`, else GET) for `duration_s` seconds."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        started = time.monotonic()
        deadline = started + duration_s

        async def worker() -> None:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                method = "POST" if body else "GET"
                async with http.request(method, url, data=body or None) as response:
                    await response.read()
                latencies.append(time.monotonic() - sent)
                statuses[response.status] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    cuts = statistics.quantiles(latencies, n=100)
    return LoadResult(
        label, len(latencies), elapsed, cuts[49] * 1000, cuts[98] * 1000, dict(statuses)
    )
