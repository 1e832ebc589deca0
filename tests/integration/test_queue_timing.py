"""What the proxy says of where a request's time went, over real HTTP: `X-HoopAI-Queue-Ms`
is the time held for a slot (summed over resends), never the upstream's time, and
`Server-Timing` splits it into `queue`, `upstream` and, for a managed token, `token`.

No test here bounds a duration from above. They check orders that hold on any machine:
the parts are disjoint stretches of the caller's own wait, so together they fit in it;
`upstream` contains the simulator's injected latency; `queue` contains the hold the
limiter asked for (the proxy's own `hoopai_proxy_queue_seconds`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from proxy.server import RunningServer
from proxy.services import SERVICES
from tests.conftest import SIM_CLIENT_ID
from tests.integration.test_limits_proxy import decisions
from tests.support.installs import install_via_start

LOCATION = "timingLoc01"
LATENCY_MS = 300
ROOMY = {"limits": {"burst": {"requests": 10_000, "interval_ms": 10_000}}}
# Header values are rounded: whole milliseconds for X-HoopAI-Queue-Ms, tenths in
# Server-Timing. Sums of rounded parts may exceed the unrounded whole by this much.
ROUNDING_MS = 1.0


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    elapsed_ms: float  # from just before the request to the answer's headers

    @property
    def queue_ms(self) -> int:
        return int(self.headers["X-HoopAI-Queue-Ms"])

    @property
    def timing(self) -> dict[str, float]:
        return server_timing(self.headers)


def server_timing(headers: CIMultiDictProxy[str]) -> dict[str, float]:
    """`{name: dur}` of every Server-Timing metric with a duration, all fields read."""
    metrics: dict[str, float] = {}
    for field in headers.getall("Server-Timing", ()):
        for metric in field.split(","):
            name, *params = (part.strip() for part in metric.split(";"))
            for param in params:
                key, _, value = param.partition("=")
                if key == "dur":
                    metrics[name] = float(value)
    return metrics


async def send(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> Answer:
    started = time.monotonic()
    async with http.get(url, headers=headers or {}) as response:
        elapsed_ms = (time.monotonic() - started) * 1000
        body = json.loads(await response.read())
        return Answer(response.status, response.headers, body, elapsed_ms)


def caller_token(simulator) -> dict[str, str]:
    """The caller's own token for LOCATION (passed through; the limiter keys on it)."""
    simulator.state.set_limits({"burst": 10_000, "interval_ms": 10_000})
    token = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)["access_token"]
    return {"Authorization": f"Bearer {token}"}


def held_s(proxy: RunningServer) -> float:
    """The sum of the holds the limiter asked for (`hoopai_proxy_queue_seconds`)."""
    registry = proxy.runner.app[SERVICES].metrics.registry
    return float(registry.get_sample_value("hoopai_proxy_queue_seconds_sum") or 0.0)


def assert_parts_fit(answer: Answer) -> None:
    """queue, upstream and token are disjoint stretches of the caller's wait."""
    parts = sum(answer.timing.get(name, 0.0) for name in ("queue", "upstream", "token"))
    assert parts <= answer.elapsed_ms + ROUNDING_MS, (answer.timing, answer.elapsed_ms)
    assert answer.queue_ms + answer.timing["upstream"] <= answer.elapsed_ms + ROUNDING_MS


async def test_queue_ms_leaves_the_upstreams_time_out(
    simulator, start_proxy, http, caplog: pytest.LogCaptureFixture
) -> None:
    """With a 300 ms upstream and a free slot, X-HoopAI-Queue-Ms and the access line's
    queue_ms are only the time held; Server-Timing's upstream holds the 300 ms."""
    caplog.set_level(logging.INFO, logger="proxy.access")
    proxy = await start_proxy(simulator.url, **ROOMY)
    simulator.state.set_faults({"latency_ms": LATENCY_MS})
    answer = await send(http, f"{proxy.url}/contacts/", caller_token(simulator))
    assert answer.status == 200
    assert decisions(proxy) == {"sent": 1}
    # The upstream's 300 ms and the time held are disjoint parts of the caller's wait.
    assert answer.queue_ms + LATENCY_MS <= answer.elapsed_ms + ROUNDING_MS
    timing = answer.timing
    assert timing["upstream"] >= LATENCY_MS
    assert abs(timing["queue"] - answer.queue_ms) <= ROUNDING_MS
    assert "token" not in timing  # the caller's own token: the proxy fetched none
    assert_parts_fit(answer)
    (line,) = [r for r in caplog.records if r.name == "proxy.access"]
    assert vars(line)["queue_ms"] == answer.queue_ms
    assert vars(line)["upstream_ms"] >= LATENCY_MS


async def test_held_request_queue_time_includes_its_hold(simulator, start_proxy, http) -> None:
    """One slot per window, two concurrent requests: the one held for the next window
    says so in X-HoopAI-Queue-Ms and Server-Timing's queue, at least as long as the hold
    the limiter asked for."""
    proxy = await start_proxy(
        simulator.url, limits={"burst": {"requests": 1, "interval_ms": 500, "pad_ms": 50}}
    )
    token = caller_token(simulator)
    answers = await asyncio.gather(*(send(http, f"{proxy.url}/contacts/", token) for _ in "ab"))
    assert [a.status for a in answers] == [200, 200]
    assert decisions(proxy) == {"sent": 1, "queued": 1}
    hold_ms = held_s(proxy) * 1000  # the held one's hold; the other was not held
    assert hold_ms > 0
    held = max(answers, key=lambda a: a.timing["queue"])
    assert held.queue_ms >= hold_ms - ROUNDING_MS
    assert held.timing["queue"] >= hold_ms - ROUNDING_MS
    for answer in answers:
        assert_parts_fit(answer)


async def test_upstream_server_timing_is_kept(simulator, start_proxy, http) -> None:
    """An upstream Server-Timing reaches the caller as sent, beside the proxy's own."""
    proxy = await start_proxy(simulator.url, **ROOMY)
    answer = await send(
        http,
        f"{proxy.url}/_sim/headers?Server-Timing=db%3Bdur%3D53%3Bdesc%3D%22rows%22",
        caller_token(simulator),
    )
    assert answer.status == 200
    fields = answer.headers.getall("Server-Timing")
    assert fields[0] == 'db;dur=53;desc="rows"'
    assert {"db", "queue", "upstream"} <= set(answer.timing)


async def test_proxy_refusal_and_502_carry_server_timing(simulator, start_proxy, http) -> None:
    """The proxy's own 429 says how long it looked for a slot (nothing went upstream);
    a 502 after a dropped connection says how long the upstream took to drop it."""
    proxy = await start_proxy(
        simulator.url,
        limits={"burst": {"requests": 1, "interval_ms": 3_600_000}},
        queue={"mode": "reject"},
    )
    token = caller_token(simulator)
    simulator.state.set_faults({"drop_ratio": 1.0})
    dropped = await send(http, f"{proxy.url}/contacts/", token)
    assert (dropped.status, dropped.body["error"]) == (502, "upstream_unreachable")
    assert {"queue", "upstream"} <= set(dropped.timing)
    refused = await send(http, f"{proxy.url}/contacts/", token)
    assert (refused.status, refused.body["error"]) == (429, "rate_limited")
    assert "queue" in refused.timing and "upstream" not in refused.timing


@pytest.mark.slow
async def test_managed_token_time_and_resends_are_summed(simulator, start_proxy, http) -> None:
    """A managed token the upstream refuses (Invalid JWT) is refreshed and the request sent
    again: token holds the slow refresh, queue and upstream sum both sends."""
    simulator.state.set_limits({"burst": 10_000})
    proxy = await start_proxy(simulator.url, **ROOMY)
    code, _ = simulator.state.install(SIM_CLIENT_ID, location_id=LOCATION)
    await install_via_start(http, proxy.url, code)
    simulator.state.expire_tokens()  # the proxy's cached token is refused: Invalid JWT
    simulator.state.set_faults({"token_latency_ms": LATENCY_MS, "latency_ms": LATENCY_MS})
    answer = await send(http, f"{proxy.url}/contacts/", {"X-HoopAI-Location-Id": LOCATION})
    assert answer.status == 200, answer.body
    assert decisions(proxy) == {"sent": 2}  # the resend took a slot of its own
    timing = answer.timing
    assert timing["token"] >= LATENCY_MS
    assert timing["upstream"] >= 2 * LATENCY_MS  # both sends met the latency
    assert_parts_fit(answer)
