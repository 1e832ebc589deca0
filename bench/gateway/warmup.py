"""Before a measurement: one request per Location, 32 at a time, every answer a 200.

It warms connection pools and the proxy's token cache, and touches every Location within
the limiter's window (a Location unseen for a window is cold again, and its first request
goes alone), so the measured run sees the steady state. A scenario that answers anything
but 200 stops the benchmark here, before a number is taken from it.

A target measured a moment ago needs none (`Warmth`): a run of at least two rotations over
the Locations touched each of them in its second half, so none is cold yet.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.gateway.workload import LOCATIONS, Request

CONCURRENCY = 32
FRESH_S = 3.0  # after the end of a run, well inside the limiter's 10 s window


@dataclass
class Warmth:
    """Until when each target (URL and request shape) needs no warm-up."""

    _until: dict[tuple[str, str], float] = field(default_factory=dict)

    def needed(self, target: tuple[str, str]) -> bool:
        return time.monotonic() > self._until.get(target, 0.0)

    def ran(self, target: tuple[str, str], requests: int) -> None:
        """A run against `target` just ended with `requests` answered."""
        if requests >= 2 * LOCATIONS:
            self._until[target] = time.monotonic() + FRESH_S
        else:
            self._until.pop(target, None)


class WarmupFailed(RuntimeError):
    """A target answered the warm-up with something other than 200."""


def warm_up(url: str, requests: list[Request]) -> None:
    statuses, sample = asyncio.run(_send_all(url, requests))
    if set(statuses) != {200}:
        raise WarmupFailed(f"{url} answered {dict(statuses)}; one answer: {sample[:300]!r}")


async def _send_all(url: str, requests: list[Request]) -> tuple[Counter[int], str]:
    statuses: Counter[int] = Counter()
    sample = ""
    pending = iter(requests)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def sender() -> None:
            nonlocal sample
            for request in pending:  # shared: each request is sent once
                async with http.get(url + request.path, headers=request.headers) as answer:
                    body = await answer.text()
                statuses[answer.status] += 1
                if answer.status != 200:
                    sample = body

        await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))
    return statuses, sample
