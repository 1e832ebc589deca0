"""A steady open-loop load over several locations and replicas, and a Redis fault under it.

Open loop: each request goes out at its set time whatever the earlier answers were, as
independent callers send them; a closed loop would slow down when the proxies hold
requests and hide an overshoot by sending less. The times are evenly spaced or a seeded
Poisson stream (`arrivals`), and every location's requests are spread over every replica.

`run_fault` runs one scenario on a simulator in this process (its arrival times, on its
own clock, are only readable here) and proxy processes sharing one redis-server: load
until a window's worth is admitted, the fault, the way back, then load until a window's
worth is admitted a whole window after every replica is back on Redis. It returns the
`Figures`, measured where they matter: at the simulator (upstream 429s, sends, admissions
during the outage) and at the callers (answers by status). The tests assert on them;
`bench/faults.py` prints them. Nothing here sleeps to order events: each phase waits for
state it can see (Redis answering PING, the proxies' `limiter_degraded` gauge, the
simulator's counts); the only sleep is the length of the fault itself.

`run_steady` runs the same load with no fault, over the limit, until every location has
been held at its limit for whole windows, and measures the admitted share of the limit
from the simulator's admission history (`whole_cycles`): with the simulator's
`arrival_delay_ms` on, how much of the limit the proxies keep while leaving room for the
jitter between their sends and the upstream's counter. `bench/jitter.py` prints it.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from proxy.harness.processes import ServiceProcess
from proxy.harness.redis_server import RedisServer
from proxy.harness.tokens import SIM_CLIENT_ID
from proxy.simulator.config import WindowKind
from proxy.simulator.testing import RunningSimulator

API_PATH = "/contacts/"
APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
DEGRADED_METRIC = "hoopai_proxy_limiter_degraded"
RESENDS_METRIC = "hoopai_proxy_resends_total"
FaultKind = Literal["none", "kill", "stop"]
Arrivals = Literal["even", "poisson"]
PROXY_429 = (429, "rate_limited")  # the proxy's own refusal; the upstream's says otherwise


# -- what is run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """The load and the limits; the simulator and the proxies get the same limits."""

    replicas: int = 3
    locations: int = 20
    rate_per_s: float = 50.0
    burst: int = 4
    interval_ms: int = 2000
    pad_ms: int = 100
    max_wait_ms: int = 30000
    arrivals: Arrivals = "even"
    seed: int = 9
    max_pad_ms: int = 1000
    # The simulator's side: its burst window, and the most its arrival delay adds (a
    # uniform draw from 0) between a request's arrival and the limits' count of it.
    window: WindowKind = "sliding"
    arrival_delay_ms: float = 0.0

    @property
    def window_s(self) -> float:
        return self.interval_ms / 1000

    @property
    def limit_per_s(self) -> float:
        """What the upstream allows all the locations together, per second."""
        return self.locations * self.burst / self.window_s

    @property
    def load_share(self) -> float:
        """The offered rate as a share of the limit (1.0: exactly at it)."""
        return self.rate_per_s / self.limit_per_s

    def simulator_limits(self) -> dict[str, Any]:
        # Sliding by default, the strict one: any W-long stretch holds at most N.
        return {"burst": self.burst, "interval_ms": self.interval_ms, "window": self.window}

    def simulator_faults(self) -> dict[str, Any]:
        return {"arrival_delay_ms": self.arrival_delay_ms}

    def proxy_overrides(self, redis_url: str) -> dict[str, Any]:
        """The config sections every replica gets (merged into a minimal proxy config)."""
        return {
            "store": {
                "redis_url": redis_url,
                "on_redis_error": "local",
                "expected_replicas": self.replicas,
            },
            "limits": {
                "burst": {
                    "requests": self.burst,
                    "interval_ms": self.interval_ms,
                    "pad_ms": self.pad_ms,
                    "max_pad_ms": self.max_pad_ms,
                }
            },
            "queue": {"mode": "queue", "max_wait_ms": self.max_wait_ms},
        }


# Held over the limit, for the jitter runs: 5 locations of 30 per 6 s (W long enough that
# a pad near 0.35 s still leaves 94% of the limit), 30 req/s evenly spaced (120% of the
# limit: every location held at its limit from its second window on), a pad floor of 50 ms.
OVER_THE_LIMIT = Scenario(
    locations=5, rate_per_s=30.0, burst=30, interval_ms=6000, pad_ms=50, max_wait_ms=6000
)


@dataclass(frozen=True)
class Fault:
    """What happens to Redis: `kill` (kill -9, restarted empty), `stop` (SIGSTOP, then
    SIGCONT) or `none` (the same run with Redis left alone), for `down_s` seconds."""

    kind: FaultKind
    down_s: float


# -- the load ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One caller's request: where it went, when it left, what came back.

    `status` 0 means no answer within the caller's patience; `error` is the JSON `error`
    field of a refusal (`rate_limited` is the proxy's own 429, `Too Many Requests` the
    upstream's passed through).
    """

    resource: str
    replica: int
    sent_at: float
    status: int
    error: str | None


@dataclass(frozen=True)
class Arrival:
    """One request of the load: when it leaves (seconds from the start), for which
    location and through which replica (indexes)."""

    at_s: float
    location: int
    replica: int


def arrivals(scenario: Scenario) -> Iterator[Arrival]:
    """The load's requests, endlessly, in the scenario's `arrivals` pattern.

    `even`: one every 1/rate seconds, request i for location i mod L through replica
    (i div L) mod R, so each location's requests are evenly spaced and spread over every
    replica. `poisson`: independent callers; gaps drawn from an exponential distribution
    and location and replica drawn at random (seeded), so each location sees a Poisson
    stream of its own, with the bunches real callers make.
    """
    return _even(scenario) if scenario.arrivals == "even" else _poisson(scenario)


def _even(scenario: Scenario) -> Iterator[Arrival]:
    count, replicas = scenario.locations, scenario.replicas
    for index in itertools.count():
        yield Arrival(index / scenario.rate_per_s, index % count, (index // count) % replicas)


def _poisson(scenario: Scenario) -> Iterator[Arrival]:
    draw, at_s = random.Random(scenario.seed), 0.0
    while True:
        at_s += draw.expovariate(scenario.rate_per_s)
        yield Arrival(at_s, draw.randrange(scenario.locations), draw.randrange(scenario.replicas))


class OpenLoad:
    """Sends `schedule` to the replicas at `urls`, each request at its time whatever the
    answers. `tokens` maps each location's resource to its access token (in location
    order), which the proxies pass through and key the limit on."""

    def __init__(
        self,
        urls: list[str],
        tokens: dict[str, str],
        schedule: Iterator[Arrival],
        give_up_s: float,
    ) -> None:
        self._urls, self._resources = urls, list(tokens)
        self._tokens, self._schedule, self._give_up_s = tokens, schedule, give_up_s
        self._stopping = False
        self._in_flight: set[asyncio.Task[Answer]] = set()
        self.answers: list[Answer] = []
        # Held requests are open connections: no pool cap, or the pool would queue sends
        # and turn the open loop into a closed one.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._sender: asyncio.Task[None] | None = None

    async def __aenter__(self) -> OpenLoad:
        self._sender = asyncio.create_task(self._send_all())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stopping = True
        if exc_info[0] is not None:  # the test failed midway: do not wait for held requests
            for task in [*self._in_flight, self._sender]:
                if task is not None:
                    task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._sender is not None:
            await asyncio.gather(self._sender, return_exceptions=True)
        await self._http.close()

    @property
    def failed(self) -> BaseException | None:
        """Why the sender ended before `stop`, if it did (it never should)."""
        task = self._sender
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def stop(self) -> list[Answer]:
        """Send nothing more; wait for every request already sent to be answered."""
        self._stopping = True
        if self._sender is not None:
            await self._sender
        await asyncio.gather(*self._in_flight)
        return sorted(self.answers, key=lambda answer: answer.sent_at)

    async def _send_all(self) -> None:
        started = time.monotonic()
        for arrival in self._schedule:
            if self._stopping:
                return
            # On time even after a late wake-up: each send's time is fixed in advance.
            delay = started + arrival.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._send(arrival))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, arrival: Arrival) -> Answer:
        resource = self._resources[arrival.location]
        headers = {"Authorization": f"Bearer {self._tokens[resource]}", "Version": "2021-07-28"}
        sent_at = time.time()
        status, error = 0, None
        try:
            async with self._http.get(
                self._urls[arrival.replica] + API_PATH,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._give_up_s),
            ) as response:
                body = await response.read()
                status = response.status
                error = None if status == 200 else error_code(body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            error = type(exc).__name__
        answer = Answer(resource, arrival.replica, sent_at, status, error)
        self.answers.append(answer)
        return answer


def error_code(body: bytes) -> str:
    """The `error` field of a JSON error body, else the start of the body itself."""
    try:
        return str(json.loads(body).get("error"))
    except (ValueError, AttributeError):
        return body[:60].decode(errors="replace")


# -- what is measured --------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One run's figures. Upstream counts are the simulator's, over the whole run."""

    fault: FaultKind
    scenario: Scenario
    upstream_429s: int
    upstream_429s_before_fault: int
    sends: int  # requests that reached the simulator, resends included
    resends: int  # of those, sent again by a proxy (after an upstream 429), from its metrics
    answers: Counter[tuple[int, str | None]]
    outage_s: float  # from the fault until Redis answered PING again
    served_in_outage: int  # admissions the simulator counted during the outage, all locations
    # When the upstream refused, in seconds from the fault (the simulator's clock), sorted:
    # where in the run an overshoot happened (going local, during, or coming back).
    refused_at: tuple[float, ...] = ()

    @property
    def ok(self) -> int:
        return self.answers[(200, None)]

    @property
    def proxy_429s(self) -> int:
        return self.answers[PROXY_429]

    @property
    def others(self) -> dict[tuple[int, str | None], int]:
        """Every answer but a 200 and the proxy's own 429: the upstream's 429s passed on
        (no resend left, or no slot for one before the deadline), and any failure."""
        return {key: n for key, n in self.answers.items() if key not in ((200, None), PROXY_429)}

    @property
    def failures(self) -> dict[tuple[int, str | None], int]:
        """Answers that are neither a 200 nor a 429: a 5xx of the proxy, or no answer."""
        return {key: n for key, n in self.answers.items() if key[0] not in (200, 429)}

    @property
    def share_in_outage(self) -> float:
        """1/replicas of the limit over the outage, for all locations together: what the
        replicas must serve at least, each on its own share, while Redis is gone."""
        s = self.scenario
        return s.locations * s.burst / s.replicas * self.outage_s / s.window_s

    def line(self) -> str:
        return (
            f"fault {self.fault}: upstream 429s {self.upstream_429s} "
            f"({self.upstream_429s_before_fault} before the fault), sends {self.sends} "
            f"(resends {self.resends}), 200s {self.ok}, proxy 429s {self.proxy_429s}, "
            f"answers {dict(self.answers)}, outage {self.outage_s:.2f} s, served in it "
            f"{self.served_in_outage} (1/{self.scenario.replicas} of the limit: "
            f"{self.share_in_outage:.1f}), upstream 429s at {list(self.refused_at)} s "
            "from the fault"
        )


# -- one run -----------------------------------------------------------------------------------


def install_locations(sim: RunningSimulator, count: int) -> dict[str, str]:
    """Install the app for `count` locations: each location's access token, by resource."""
    tokens = {}
    for index in range(count):
        grant = sim.state.grant(SIM_CLIENT_ID, location_id=f"fault{index:02d}")
        tokens[resource_of(f"fault{index:02d}")] = str(grant["access_token"])
    return tokens


def resource_of(location: str) -> str:
    """The simulator's key of a location (its counters and admitted times are by it)."""
    return f"{APP_ID}:location:{location}"


class Replicas:
    """The proxy processes, watched through the metrics of their admin listeners."""

    def __init__(self, proxies: list[ServiceProcess], http: aiohttp.ClientSession) -> None:
        self.proxies, self._http = proxies, http

    @property
    def urls(self) -> list[str]:
        return [proxy.url for proxy in self.proxies]

    async def until_degraded(self, degraded: bool, load: OpenLoad | None = None) -> None:
        """Return once every replica's `limiter_degraded` gauge says `degraded`."""
        while not all(bool(g) == degraded for g in await self.each(DEGRADED_METRIC)):
            assert load is None or load.failed is None, f"the load stopped: {load.failed!r}"
            await asyncio.sleep(0.05)

    async def each(self, name: str) -> list[float]:
        """A metric on every replica, each the sum of its samples (every label)."""
        return [await self._metric(proxy, name) for proxy in self.proxies]

    async def _metric(self, proxy: ServiceProcess, name: str) -> float:
        async with self._http.get(f"{proxy.admin_url}/metrics") as answer:
            text = await answer.text()
        total = 0.0
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name or sample.startswith(name + "{"):
                total += float(value)
        return total


async def run_fault(
    sim: RunningSimulator,
    proxies: list[ServiceProcess],
    redis: RedisServer,
    scenario: Scenario,
    fault: Fault,
) -> Figures:
    """Load, the fault, the way back, a window more; then the figures."""
    sim.state.set_limits(scenario.simulator_limits())
    sim.state.set_faults(scenario.simulator_faults())
    tokens = install_locations(sim, scenario.locations)
    give_up_s = scenario.max_wait_ms / 1000 + 30
    window = scenario.locations * scenario.burst  # admissions a full window holds
    async with aiohttp.ClientSession() as http:
        replicas = Replicas(proxies, http)
        with no_gc_pauses():
            async with OpenLoad(replicas.urls, tokens, arrivals(scenario), give_up_s) as load:
                # Steady state on Redis first: a window's worth admitted.
                await until(lambda: sim.state.stats()["admitted"] >= window, load)
                limited_before = sim.state.stats()["rate_limited"]
                started, ended = await FAULTS[fault.kind](
                    redis, replicas, sim.state.now, fault.down_s
                )
                # Every replica back on Redis, then a window's worth admitted from a whole
                # window later on: whatever the outage left behind has met the upstream.
                await replicas.until_degraded(False, load)
                back_at = sim.state.now()
                await until(
                    lambda: admitted_in(sim, tokens, back_at + scenario.window_s) >= window, load
                )
                answers = await load.stop()
        resends = sum(await replicas.each(RESENDS_METRIC))
    stats = sim.state.stats()
    return Figures(
        fault=fault.kind,
        scenario=scenario,
        upstream_429s=stats["rate_limited"],
        upstream_429s_before_fault=limited_before,
        sends=stats["requests"],
        resends=int(resends),
        answers=Counter((a.status, a.error) for a in answers),
        outage_s=ended - started,
        served_in_outage=admitted_in(sim, tokens, started, ended),
        refused_at=tuple(
            sorted(
                round(t - started, 2)
                for resource in tokens
                for t in sim.state.refused_times(resource)
            )
        ),
    )


# -- the faults: each returns when it began and when Redis answered again, on `now` -------------

Clock = Callable[[], float]
FaultRun = Callable[[RedisServer, Replicas, Clock, float], Awaitable[tuple[float, float]]]


async def kill_and_restart(
    redis: RedisServer, replicas: Replicas, now: Clock, down_s: float
) -> tuple[float, float]:
    """kill -9, down for `down_s` (and until every replica has noticed), restarted empty
    on the same address, so the replicas' clients reconnect by themselves."""
    began = now()
    await asyncio.to_thread(redis.kill)
    await asyncio.gather(asyncio.sleep(down_s), replicas.until_degraded(True))
    await asyncio.to_thread(redis.start)  # returns once it answers PING
    return began, now()


async def stop_and_continue(
    redis: RedisServer, replicas: Replicas, now: Clock, down_s: float
) -> tuple[float, float]:
    """SIGSTOP for `down_s` (and until every replica has noticed), then SIGCONT: the
    server keeps its data, and may first run commands that waited in its sockets."""
    began = now()
    redis.pause()
    await asyncio.gather(asyncio.sleep(down_s), replicas.until_degraded(True))
    redis.resume()
    while not await asyncio.to_thread(redis.ping):
        pass  # each ping waits up to half a second for its answer
    return began, now()


async def no_fault(
    redis: RedisServer, replicas: Replicas, now: Clock, down_s: float
) -> tuple[float, float]:
    """The same stretch with Redis left alone: the baseline."""
    began = now()
    await asyncio.sleep(down_s)
    return began, now()


FAULTS: dict[FaultKind, FaultRun] = {
    "none": no_fault,
    "kill": kill_and_restart,
    "stop": stop_and_continue,
}


# -- held over the limit: the admitted share ---------------------------------------------------


@dataclass(frozen=True)
class Cycles:
    """Whole cycles of one location's admissions: `count` runs of N admissions (from one
    admission to the N-th after it) took `span_s` together, on the simulator's clock."""

    count: int
    span_s: float


def whole_cycles(times: list[float], burst: int, skip: int) -> Cycles:
    """The whole cycles in `times` (one location's admissions, oldest first) after the first
    `skip`: from admission `skip` to admission `skip + k*N`, k as large as fits.

    Admissions come in bunches (a freed window lets a bunch through), so a count over a
    set stretch of time depends on where the stretch cuts them; a whole cycle does not.
    Held at the limit, each cycle lasts W plus whatever the proxies leave unused, so
    k*W / span is the share of the limit the location got.
    """
    steady = times[skip:]
    count = (len(steady) - 1) // burst if steady else 0
    return Cycles(count, steady[count * burst] - steady[0] if count else 0.0)


def tightest_gap(times: list[float], burst: int) -> float:
    """The least time from an admission to the N-th after it (inf when there are not N+1):
    above W whenever the upstream's sliding window let all of them through."""
    gaps = [later - earlier for earlier, later in zip(times, times[burst:], strict=False)]
    return min(gaps, default=float("inf"))


@dataclass(frozen=True)
class SteadyFigures:
    """A run over the limit with no fault. Upstream counts are the simulator's, over the
    whole run; the cycles are each location's, from its second window of admissions on
    (the first window's went out at once, before anything was held)."""

    scenario: Scenario
    upstream_429s: int
    sends: int  # requests that reached the simulator, resends included
    resends: int  # of those, sent again by a proxy (after an upstream 429), from its metrics
    answers: Counter[tuple[int, str | None]]
    cycles: tuple[Cycles, ...]  # by location
    tightest_s: float  # tightest_gap over every location
    most_delay_s: float  # the longest arrival delay the simulator drew

    @property
    def share(self) -> float:
        """The admitted share of the limit over every location's whole cycles together."""
        span = sum(c.span_s for c in self.cycles)
        count = sum(c.count for c in self.cycles)
        return count * self.scenario.window_s / span if span else 0.0

    @property
    def lowest_share(self) -> float:
        """The share of the location that got the least."""
        window_s = self.scenario.window_s
        return min((c.count * window_s / c.span_s if c.span_s else 0.0) for c in self.cycles)

    @property
    def failures(self) -> dict[tuple[int, str | None], int]:
        """Answers that are neither a 200 nor a 429: a 5xx of the proxy, or no answer."""
        return {key: n for key, n in self.answers.items() if key[0] not in (200, 429)}

    def line(self) -> str:
        s = self.scenario
        return (
            f"jitter {s.arrival_delay_ms:g} ms, {s.window} window: upstream 429s "
            f"{self.upstream_429s}, admitted share {self.share:.3f} (lowest location "
            f"{self.lowest_share:.3f}; {sum(c.count for c in self.cycles)} whole cycles over "
            f"{sum(c.span_s for c in self.cycles):.1f} s), tightest N-apart admissions W"
            f"{1000 * (self.tightest_s - s.window_s):+.0f} ms, sends {self.sends} (resends "
            f"{self.resends}), answers {dict(self.answers)}, longest delay drawn "
            f"{1000 * self.most_delay_s:.0f} ms"
        )


async def run_steady(
    sim: RunningSimulator, proxies: list[ServiceProcess], scenario: Scenario, cycles: int = 2
) -> SteadyFigures:
    """Load over the limit until every location has `cycles` whole cycles after its first
    window admitted, then no new request and every held one answered; the figures."""
    sim.state.set_limits(scenario.simulator_limits())
    sim.state.set_faults(scenario.simulator_faults())
    tokens = install_locations(sim, scenario.locations)
    give_up_s = scenario.max_wait_ms / 1000 + 30
    enough = (1 + cycles) * scenario.burst + 1
    async with aiohttp.ClientSession() as http:
        replicas = Replicas(proxies, http)
        with no_gc_pauses():
            async with OpenLoad(replicas.urls, tokens, arrivals(scenario), give_up_s) as load:
                await until(
                    lambda: all(len(sim.state.admitted_times(r)) >= enough for r in tokens), load
                )
                answers = await load.stop()
        resends = sum(await replicas.each(RESENDS_METRIC))
    stats = sim.state.stats()
    admitted = [sim.state.admitted_times(resource) for resource in tokens]
    delays = [t.delay_s for resource in tokens for t in sim.state.transits_of(resource)]
    return SteadyFigures(
        scenario=scenario,
        upstream_429s=stats["rate_limited"],
        sends=stats["requests"],
        resends=int(resends),
        answers=Counter((a.status, a.error) for a in answers),
        cycles=tuple(whole_cycles(times, scenario.burst, scenario.burst) for times in admitted),
        tightest_s=min(tightest_gap(times, scenario.burst) for times in admitted),
        most_delay_s=max(delays, default=0.0),
    )


# -- observing ---------------------------------------------------------------------------------


def admitted_in(
    sim: RunningSimulator, tokens: dict[str, str], since: float, before: float = float("inf")
) -> int:
    """Admissions of every loaded location in [since, before) on the simulator's clock."""
    return sum(
        1 for resource in tokens for t in sim.state.admitted_times(resource) if since <= t < before
    )


async def until(condition: Callable[[], bool], load: OpenLoad) -> None:
    """Return once `condition` holds, looking every 50 ms while `load` runs."""
    while not condition():
        assert load.failed is None, f"the load stopped sending: {load.failed!r}"
        await asyncio.sleep(0.05)


@contextmanager
def no_gc_pauses() -> Iterator[None]:
    """No cyclic garbage collection in this process while the block runs.

    This process runs the simulator, whose arrival times are what is measured; a full
    collection of a test session's heap stalls its event loop for tens of milliseconds,
    and would be counted against the proxies.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
