"""The headline figures: interleaved rounds, each one pass over the same targets, and the
median over rounds of each ratio taken within a round (so a slow spell of the machine
hits both sides of a ratio).

A round: at 32 connections the bare forwarder (1 and 2 processes) and the proxy
pass-through with the memory, Redis (1 and 2 workers) and Redis Cluster limiters; at 1
connection the forwarder and the three 1-worker proxies, for the added p50. The order is
the same in every round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bench.gateway.proxies import ProxySpec
from bench.gateway.scenarios import Measurement, Scenario, bare_forwarder, measure, proxy
from bench.gateway.stack import Gateway

# name -> how to find its scenario
TARGETS: dict[str, Callable[[Gateway], Scenario]] = {
    "forwarder": lambda g: bare_forwarder(g, 1),
    "forwarder x2": lambda g: bare_forwarder(g, 2),
    "memory": lambda g: proxy(g, ProxySpec("memory")),
    "Redis": lambda g: proxy(g, ProxySpec("redis")),
    "Redis x2": lambda g: proxy(g, ProxySpec("redis", 2)),
    "Redis Cluster": lambda g: proxy(g, ProxySpec("cluster")),
}
# Each target's c=1 run right after its c=32 run, which leaves it warm (see warmup.Warmth).
ROUND: tuple[tuple[str, int], ...] = (
    ("forwarder", 32),
    ("forwarder", 1),
    ("forwarder x2", 32),
    ("memory", 32),
    ("memory", 1),
    ("Redis", 32),
    ("Redis", 1),
    ("Redis x2", 32),
    ("Redis Cluster", 32),
    ("Redis Cluster", 1),
)
Round = dict[tuple[str, int], Measurement]


@dataclass(frozen=True)
class Figure:
    """One headline figure: its median over rounds and the spread."""

    name: str
    unit: str
    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def run_rounds(gateway: Gateway, rounds: int, duration_s: int) -> list[Round]:
    results: list[Round] = []
    for number in range(1, rounds + 1):
        print(f"round {number} of {rounds}", flush=True)
        results.append(
            {
                (name, connections): measure(
                    gateway, TARGETS[name](gateway), connections, duration_s
                )
                for name, connections in ROUND
            }
        )
    return results


def figures(rounds: list[Round]) -> list[Figure]:
    """The headline figures, in the order the report lists them."""
    limiters = ("memory", "Redis", "Redis Cluster")
    return [
        *(
            _rps_ratio(rounds, f"throughput at c=32, proxy ({n}) ÷ bare forwarder", n, "forwarder")
            for n in limiters
        ),
        *(_p50_added(rounds, n) for n in limiters),
        _rps_ratio(
            rounds, "throughput at c=32, proxy (Redis) 2 workers ÷ 1 worker", "Redis x2", "Redis"
        ),
        _rps_ratio(
            rounds,
            "throughput at c=32, bare forwarder 2 processes ÷ 1 process",
            "forwarder x2",
            "forwarder",
        ),
    ]


def _rps_ratio(rounds: list[Round], name: str, top: str, bottom: str) -> Figure:
    values = tuple(r[top, 32].result.rps / r[bottom, 32].result.rps for r in rounds)
    return Figure(name, "x", values)


def _p50_added(rounds: list[Round], limiter: str) -> Figure:
    values = tuple(r[limiter, 1].result.p50_ms - r["forwarder", 1].result.p50_ms for r in rounds)
    return Figure(f"p50 added at c=1, proxy ({limiter}) minus bare forwarder", "ms", values)
