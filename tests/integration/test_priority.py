"""Fair share and priority between callers (issue 10, point 5), end to end: the real
simulator, the real proxy over HTTP, real Redis where replicas share a key.

Interactive requests take the earliest slot at once. Batch requests (a caller whose key
says `priority: batch`, or `X-HoopAI-Priority: batch`) wait in a per-key line weighted by
`callers[].weight`, for no longer than their max wait; the first in line asks for a slot
free now, about W/N after the last batch slot, deciding as if the limit were one less, so
one slot of every window is left to interactive requests and comes back all through the
window. A caller key allows at most its priority; the header may only lower it. The last
`limits.daily.reserve` requests of a day are interactive only. `pytest -s` prints the
measured figures.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.harness.redis_server import RedisServer
from proxy.server import RunningServer
from proxy.services import SERVICES
from proxy.typing import ResourceKey
from tests.conftest import SIM_CLIENT_ID

APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
API_PATH = "/contacts/"
PRIORITY_HEADER = "X-HoopAI-Priority"
MAX_WAIT_HEADER = "X-HoopAI-Max-Wait-Ms"
# Test-only caller keys; the proxy's config holds only their SHA-256.
ETL_KEY, CRM_KEY, BULK_KEY = "prio-etl-key", "prio-crm-key", "prio-bulk-key"
# N per W: a slot interval W/N of 100 ms, far above the scheduling noise of this machine
# (an event loop turn, a Redis round trip: a few ms), so that a wait of "about nothing"
# and a wait of "the next slot" cannot be mistaken for each other.
N, W_MS = 20, 2000
W_S = W_MS / 1000
SLOT_MS = W_MS / N
# The subject is priority, not jitter: a fixed pad (floor and ceiling alike) far above any
# delay between a slot and the simulator's count of it, even on a loaded machine. A slot's
# hold is W + pad (limiter/slots.py), 3 s: windows of that length hold the limit, and the
# interactive requests, half a second into each second, never sit on a window's edge.
PAD_MS = 1000
HOLD_S = W_S + PAD_MS / 1000
PER_HOLD = 3  # interactive requests in each window of HOLD_S, at one a second
# What batch requests get of each such window once they hold the key: the limit, less the
# slot they leave free and the interactive requests that take it.
BATCH_SHARE = N - 1 - PER_HOLD
HOUR_MS = 3_600_000


def caller(
    name: str, key: str, *, priority: str = "interactive", weight: int = 1
) -> dict[str, Any]:
    return {
        "name": name,
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "allow": ["*"],
        "priority": priority,
        "weight": weight,
    }


ETL = caller("etl", ETL_KEY, priority="batch")
CRM = caller("crm", CRM_KEY)


def settings(
    callers: list[dict[str, Any]],
    *,
    burst: int = N,
    window_ms: int = W_MS,
    max_wait_ms: int = 120_000,
    daily: dict[str, Any] | None = None,
    **more: Any,
) -> dict[str, Any]:
    """Proxy config overrides: the callers, N per W with the fixed pad, and a long max wait
    (a batch backlog must wait, not be refused)."""
    limits: dict[str, Any] = {
        "burst": {
            "requests": burst,
            "interval_ms": window_ms,
            "pad_ms": PAD_MS,
            "max_pad_ms": PAD_MS,
        }
    }
    if daily is not None:
        limits["daily"] = daily
    return {
        "callers": callers,
        "limits": limits,
        "queue": {"mode": "queue", "max_wait_ms": max_wait_ms},
        **more,
    }


def install(simulator: Any, location: str, *, burst: int = N, window_ms: int = W_MS) -> str:
    """A location token from the simulator, which allows `burst` per window (sliding)."""
    simulator.state.set_limits({"burst": burst, "interval_ms": window_ms, "window": "sliding"})
    return str(simulator.state.grant(SIM_CLIENT_ID, location_id=location)["access_token"])


@dataclass(frozen=True)
class Answer:
    """One finished request: status, the JSON error code and message, the proxy's queue time."""

    status: int
    error: str | None
    message: str
    queue_ms: int | None
    headers: dict[str, str]


async def call(
    http: aiohttp.ClientSession, url: str, token: str, key: str, **headers: str
) -> Answer:
    """GET the API path through the proxy with the caller's own token and caller key."""
    sent = {"Authorization": f"Bearer {token}", "X-HoopAI-Proxy-Key": key, **headers}
    async with http.get(url + API_PATH, headers=sent) as response:
        body = await response.read()
        error, message = None, ""
        if response.status != 200:
            document = json.loads(body)
            error, message = document.get("error"), str(document.get("message", ""))
        queue_ms = response.headers.get("X-HoopAI-Queue-Ms")
        return Answer(
            response.status,
            error,
            message,
            None if queue_ms is None else int(queue_ms),
            dict(response.headers),
        )


@pytest.fixture
async def wide_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with no cap on connections: a backlog of 200 must reach the proxy
    (aiohttp's default connector would hold all but 100 in the client)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


class Backlog:
    """`depth` requests of one caller always in flight: each loop sends the next request
    as soon as the previous one is answered. Stopping cancels the ones still waiting (the
    proxy sees their callers hang up)."""

    def __init__(
        self, http: aiohttp.ClientSession, url: str, token: str, key: str, depth: int
    ) -> None:
        self.answers: list[Answer] = []
        self._args = (http, url, token, key)
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(depth)]

    async def _loop(self) -> None:
        while True:
            self.answers.append(await call(*self._args))

    def check(self) -> None:
        """No loop may have ended on its own (an exception would end it)."""
        ended = [task for task in self._tasks if task.done()]
        assert not ended, f"a backlog loop ended: {ended[0].exception()!r}"

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def count(self, status: int) -> int:
        return sum(1 for answer in self.answers if answer.status == status)


async def until(condition: Callable[[], bool], *backlogs: Backlog) -> None:
    """Return once `condition` holds, looking every 10 ms while the backlogs run."""
    while not condition():
        for backlog in backlogs:
            backlog.check()
        await asyncio.sleep(0.01)


async def interactive_every_second(
    http: aiohttp.ClientSession, url: str, token: str, count: int, first_at: float
) -> list[Answer]:
    """`count` interactive requests, one a second from `first_at` (wall clock): the load's
    shape, not an ordering of events (each answer is awaited only at the end)."""
    tasks = []
    for index in range(count):
        await asyncio.sleep(max(0.0, first_at + index - time.time()))
        tasks.append(asyncio.create_task(call(http, url, token, CRM_KEY)))
    return await asyncio.gather(*tasks)


def percentile(values: list[int], share: float) -> int:
    """Nearest-rank percentile (the largest value for p99 of fewer than 100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def per_window(times: list[float], start: float, windows: int) -> list[int]:
    """Admissions in each window [start + jH, start + (j+1)H), H the hold W + pad."""
    ordered = sorted(times)
    edges = [bisect.bisect_left(ordered, start + j * HOLD_S) for j in range(windows + 1)]
    return [edges[j + 1] - edges[j] for j in range(windows)]


def batch_waiting(proxy: RunningServer, location: str) -> int:
    admission = proxy.runner.app[SERVICES].admission
    return admission.batch.waiting(ResourceKey(APP_ID, "location", location))


async def measure_priority(
    simulator: Any,
    http: aiohttp.ClientSession,
    location: str,
    batch_url: str,
    interactive_url: str,
    windows: int,
    backlog_in: Callable[[], bool],
) -> tuple[list[Answer], list[int]]:
    """The issue's scenario: a batch caller keeps 200 requests queued on `batch_url`; once
    it holds the key (the first window taken, the backlog in line: `backlog_in`), the
    interactive caller sends one request a second on `interactive_url` for `windows`
    windows of W + pad. Returns the interactive answers and the batch admissions of each
    window, counted at the simulator (all admissions less the interactive ones)."""
    token = install(simulator, location)
    resource = f"{APP_ID}:location:{location}"
    backlog = Backlog(http, batch_url, token, ETL_KEY, depth=200)
    try:
        await until(
            lambda: len(simulator.state.admitted_times(resource)) >= N - 1 and backlog_in(),
            backlog,
        )
        # Windows (of HOLD_S) start now; the interactive requests go half a second into
        # each second, so each window holds PER_HOLD of them whatever the scheduling noise.
        start = time.time()
        interactive = await interactive_every_second(
            http, interactive_url, token, windows * PER_HOLD, start + 0.5
        )
        # The backlog holds the key to the end of the last window: a batch admission past it.
        end = start + windows * HOLD_S
        await until(lambda: simulator.state.admitted_times(resource)[-1] >= end, backlog)
    finally:
        await backlog.stop()
    assert [answer.status for answer in interactive] == [200] * len(interactive)
    admitted = per_window(simulator.state.admitted_times(resource), start, windows)
    batch = [count - PER_HOLD for count in admitted]
    return interactive, batch


def report(label: str, interactive: list[Answer], batch: list[int], simulator: Any) -> list[int]:
    """Print the figures; the interactive waits, as X-HoopAI-Queue-Ms says them."""
    waits = [answer.queue_ms for answer in interactive if answer.queue_ms is not None]
    assert len(waits) == len(interactive), "an answer without X-HoopAI-Queue-Ms"
    print(
        f"\n[{label}] N={N} per W={W_S:g} s (W/N = {SLOT_MS:g} ms): interactive waits (ms) "
        f"{waits}: p50 {percentile(waits, 0.5)}, p99 {percentile(waits, 0.99)}; batch "
        f"admissions per {HOLD_S:g} s window (W + pad) {batch} (N-1 minus {PER_HOLD} "
        f"interactive = {BATCH_SHARE}); simulator 429s {simulator.state.stats()['rate_limited']}"
    )
    return waits


# -- 1: the test -------------------------------------------------------------------


@pytest.mark.slow
async def test_interactive_gets_a_slot_at_once_while_batch_takes_the_rest(
    simulator, start_proxy, wide_http
) -> None:
    """A batch caller keeps 200 requests queued while an interactive caller sends one a
    second: the interactive caller's p99 wait (X-HoopAI-Queue-Ms) stays under one slot
    interval W/N, and the batch caller still gets the rest of the limit, window by window.

    The wait bound is the issue's own requirement, and the one wall-clock bound in the
    suite. Structurally an interactive request here waits for nothing: batch requests
    decide as if the limit were N - 1, only for a slot free now, and W/N apart, so their
    holds end all through the window; after an interactive request takes the slot they
    left, the next hold to end frees one that they may not take (it would make N), and at
    one a second some hold ends before the next interactive request comes. What is
    measured is then a decision and an event loop turn, a few ms, against W/N = 100 ms: a
    wide margin, not a race. Batch requests filling the window, or taking their slots in
    a bunch (the holds ending once a window), would make it wait up to a window.
    """
    proxy = await start_proxy(simulator.url, **settings([ETL, CRM]))
    location = "prioLoc01"
    interactive, batch = await measure_priority(
        simulator,
        wide_http,
        location,
        proxy.url,
        proxy.url,
        windows=5,
        backlog_in=lambda: batch_waiting(proxy, location) >= 150,
    )
    waits = report("one proxy", interactive, batch, simulator)
    assert percentile(waits, 0.99) < SLOT_MS
    # The rest of the limit: every window, N less the slot left free and the interactive
    # requests it holds (a slot a little late may fall past a window's edge: one of slack
    # a window, and one at each end of the whole run).
    assert min(batch) >= BATCH_SHARE - 1, batch
    assert sum(batch) >= len(batch) * BATCH_SHARE - 2, batch
    assert simulator.state.stats()["rate_limited"] == 0


# -- 2: weights ------------------------------------------------------------------------------


async def test_batch_callers_share_by_weight(simulator, start_proxy, wide_http) -> None:
    """Two batch callers of weights 3 and 1, each with 90 requests queued on one key: the
    first 80 admissions split about 3:1 (between 2:1 and 4:1)."""
    burst, window_ms = 50, 1000  # 49 batch admissions a second: a short test
    location = "weightLoc01"
    token = install(simulator, location, burst=burst, window_ms=window_ms)
    heavy = caller("etl", ETL_KEY, priority="batch", weight=3)
    light = caller("bulk", BULK_KEY, priority="batch", weight=1)
    proxy = await start_proxy(
        simulator.url, **settings([heavy, light], burst=burst, window_ms=window_ms)
    )
    resource = f"{APP_ID}:location:{location}"
    answered = {ETL_KEY: 0, BULK_KEY: 0}

    async def counted(key: str) -> None:
        if (await call(wide_http, proxy.url, token, key)).status == 200:
            answered[key] += 1

    # Interleaved: neither caller's requests all reach the line first.
    tasks = [asyncio.create_task(counted(key)) for key in [ETL_KEY, BULK_KEY] * 90]
    try:
        await until(lambda: sum(answered.values()) >= 80)
        heavy_count, light_count = answered[ETL_KEY], answered[BULK_KEY]
        admitted = len(simulator.state.admitted_times(resource))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(
        f"\nweights 3:1, 90 queued each: first {heavy_count + light_count} answered "
        f"{heavy_count}:{light_count} = {heavy_count / max(1, light_count):.2f}:1 "
        f"(simulator admitted {admitted})"
    )
    assert 2 * light_count <= heavy_count <= 4 * light_count


# -- 3: across replicas ------------------------------------------------------------------------


@pytest.mark.slow
async def test_interactive_on_another_replica_gets_a_slot_at_once(
    simulator, redis_server: RedisServer, spawn_proxy, wide_http
) -> None:
    """Two proxies on one Redis: the batch caller's 200 queued requests on proxy A, the
    interactive caller on proxy B, one a second. B's requests still get a slot at once
    (p99 under W/N; the reasoning of the first test holds across replicas, since the slot
    batch requests leave free is left in the shared state), and A's batch caller gets the
    rest of the limit."""
    shared = settings([ETL, CRM], store={"redis_url": redis_server.url})
    proxy_a = spawn_proxy(simulator.url, **shared)
    proxy_b = spawn_proxy(simulator.url, **shared)
    location = "prioLoc02"
    # A is a process, its line out of sight: the first window taken means the backlog,
    # all sent at once, is in.
    interactive, batch = await measure_priority(
        simulator,
        wide_http,
        location,
        proxy_a.url,
        proxy_b.url,
        windows=3,
        backlog_in=lambda: True,
    )
    waits = report("two replicas", interactive, batch, simulator)
    assert percentile(waits, 0.99) < SLOT_MS
    assert min(batch) >= BATCH_SHARE - 1, batch
    assert simulator.state.stats()["rate_limited"] == 0


# -- 4: X-HoopAI-Priority ------------------------------------------------------------------------


async def test_priority_header_may_lower_never_raise(simulator, start_proxy, http) -> None:
    """A batch caller asking for `interactive` gets 403 saying what to send; an interactive
    caller may ask for `batch`; a value that is no priority is a 400 naming the choices."""
    token = install(simulator, "headerLoc01")
    proxy = await start_proxy(simulator.url, **settings([ETL, CRM]))

    raised = await call(http, proxy.url, token, ETL_KEY, **{PRIORITY_HEADER: "interactive"})
    assert (raised.status, raised.error) == (403, "resource_forbidden")
    assert f"{PRIORITY_HEADER}: batch" in raised.message
    assert (await call(http, proxy.url, token, ETL_KEY, **{PRIORITY_HEADER: "batch"})).status == 200

    lowered = await call(http, proxy.url, token, CRM_KEY, **{PRIORITY_HEADER: "Batch"})
    assert lowered.status == 200
    bad = await call(http, proxy.url, token, CRM_KEY, **{PRIORITY_HEADER: "urgent"})
    assert (bad.status, bad.error) == (400, "bad_request")
    assert "interactive, batch" in bad.message
    assert simulator.state.stats()["requests"] == 2  # refused ones never went upstream


async def test_batch_header_is_lined_up_with_the_batch_caller(simulator, start_proxy, http) -> None:
    """An interactive caller's request sent with `X-HoopAI-Priority: batch` is a batch
    request: it leaves the last slot of the window free, as the batch caller's do."""
    token = install(simulator, "headerLoc02", window_ms=HOUR_MS)
    proxy = await start_proxy(simulator.url, **settings([ETL, CRM], window_ms=HOUR_MS))
    batch = {PRIORITY_HEADER: "batch", MAX_WAIT_HEADER: "0"}
    first = [await call(http, proxy.url, token, CRM_KEY, **batch) for _ in range(N)]
    assert [answer.status for answer in first] == [200] * (N - 1) + [429]
    assert (await call(http, proxy.url, token, CRM_KEY)).status == 200  # the one left


# -- 5: the daily reserve ------------------------------------------------------------------------


async def test_daily_reserve_is_for_interactive_requests(simulator, start_proxy, http) -> None:
    """Daily limit 10 with reserve 3: batch requests get 429 (daily) after 7, told that 3
    remain (the reserve); interactive ones still get those 3, and then they are refused."""
    token = install(simulator, "dailyLoc01")
    daily = {"requests": 10, "reserve": 3}
    proxy = await start_proxy(simulator.url, **settings([ETL, CRM], daily=daily))
    batch = [await call(http, proxy.url, token, ETL_KEY) for _ in range(9)]
    assert [answer.status for answer in batch] == [200] * 7 + [429] * 2
    refused = batch[-1]
    assert refused.error == "rate_limited"
    # Refused by the daily limit (retry when the day ends), with the reserve still there.
    assert refused.headers["X-RateLimit-Daily-Remaining"] == "3"
    assert f'"daily";r=3;t={refused.headers["Retry-After"]}' in refused.headers["RateLimit"]
    interactive = [await call(http, proxy.url, token, CRM_KEY) for _ in range(4)]
    assert [answer.status for answer in interactive] == [200] * 3 + [429]
    assert "Daily limit" in interactive[-1].message
    assert interactive[-1].headers["X-RateLimit-Daily-Remaining"] == "0"
    stats = simulator.state.stats()["per_resource"][f"{APP_ID}:location:dailyLoc01"]
    assert stats["admitted"] == 10


# -- the batch line: a deadline, and callers who hang up ------------------------------------


def proxy_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]


async def fill_but_one(http: aiohttp.ClientSession, url: str, token: str) -> None:
    """N - 1 interactive requests: what batch requests may have of the window is taken."""
    taken = [await call(http, url, token, CRM_KEY) for _ in range(N - 1)]
    assert [answer.status for answer in taken] == [200] * (N - 1)


async def test_batch_request_waits_in_line_no_longer_than_its_max_wait(
    simulator, start_proxy, http
) -> None:
    """A batch request behind one that holds the key's turn for a long wait (its slot is a
    window away, within its max wait) is refused (429) once its own max wait is over, not
    kept in line; the interactive caller takes the slot left free meanwhile."""
    location = "lineLoc01"
    token = install(simulator, location, window_ms=HOUR_MS)
    proxy = await start_proxy(
        simulator.url, **settings([ETL, CRM], window_ms=HOUR_MS, max_wait_ms=2 * HOUR_MS)
    )
    await fill_but_one(http, proxy.url, token)
    # The first batch request holds the turn until the hour is over; one more waits behind.
    holder = asyncio.create_task(call(http, proxy.url, token, ETL_KEY))
    behind = asyncio.create_task(call(http, proxy.url, token, ETL_KEY))
    try:
        await until(lambda: batch_waiting(proxy, location) == 1)
        assert not (holder.done() or behind.done())
        hurried = await call(http, proxy.url, token, ETL_KEY, **{MAX_WAIT_HEADER: "200"})
        assert (hurried.status, hurried.error) == (429, "rate_limited")
        assert int(hurried.headers["Retry-After"]) > 1
        assert batch_waiting(proxy, location) == 1  # it left the line; `behind` still waits
        assert (await call(http, proxy.url, token, CRM_KEY)).status == 200
    finally:
        holder.cancel()
        behind.cancel()
        await asyncio.gather(holder, behind, return_exceptions=True)
    assert simulator.state.stats()["per_resource"][f"{APP_ID}:location:{location}"]["admitted"] == N


async def test_batch_callers_hanging_up_leave_the_line_clean(
    simulator, start_proxy, wide_http, caplog: pytest.LogCaptureFixture
) -> None:
    """Batch callers hanging up all at once, the turn's holder with them, leave the line
    without an error (no 500, nothing logged), and the next batch request is decided."""
    location = "lineLoc02"
    token = install(simulator, location, window_ms=HOUR_MS)
    proxy = await start_proxy(
        simulator.url, **settings([ETL, CRM], window_ms=HOUR_MS, max_wait_ms=2 * HOUR_MS)
    )
    await fill_but_one(wide_http, proxy.url, token)
    backlog = Backlog(wide_http, proxy.url, token, ETL_KEY, depth=30)
    await until(lambda: batch_waiting(proxy, location) == 29, backlog)
    await backlog.stop()
    await until(lambda: batch_waiting(proxy, location) == 0)
    # The line is free: a batch request with no wait is decided at once (the slot left
    # is the interactive caller's), and the interactive caller gets that slot.
    refused = await call(wide_http, proxy.url, token, ETL_KEY, **{MAX_WAIT_HEADER: "0"})
    assert (refused.status, refused.error) == (429, "rate_limited")
    assert (await call(wide_http, proxy.url, token, CRM_KEY)).status == 200
    assert proxy_errors(caplog) == []
