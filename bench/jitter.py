"""Benchmark: jitter between the proxies' sends and the upstream's counter, on 3 replicas.

The upstream counts a request when it arrives; the simulator's `arrival_delay_ms` holds
each API request a random 0..D (seeded) before its limits count it, as a varying one-way
delay would. 3 `hoopai-proxy serve` processes share one redis-server in front of it, with
its limits (30 per 6 s, the simulator's window sliding or fixed; the proxies' pad between
`pad_ms` and `max_pad_ms`), under an open-loop load of evenly spaced requests at 120% of
the limit over 5 locations, each spread over all three replicas. Each run loads until every
location has had 2 whole cycles of N admissions after its first window, then sends nothing
new and waits for every held request to be answered. The scenario and the measure are the
jitter test's own (`tests/integration/test_jitter.py`, `proxy/harness/load.py`: `run_steady`,
`whole_cycles`); Redis, the simulator and the proxies are fresh for every run. Prints a
table; not a test, not a CI gate.

    python -m bench.jitter [--runs 1] [--jitter-ms 0 100 300] [--load 1.2] [--pad-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.replicas import running_replicas
from bench.results import machine
from proxy.harness.load import OVER_THE_LIMIT, Scenario, SteadyFigures, run_steady
from proxy.simulator.config import WINDOW_KINDS


async def one_run(workdir: Path, scenario: Scenario, seed: int) -> SteadyFigures:
    """Fresh Redis, simulator (its delays drawn from `seed`) and replicas; the load held
    over the limit; the figures."""
    async with running_replicas(workdir, scenario, seed=seed) as (sim, proxies, _):
        return await run_steady(sim, proxies, scenario)


def table(rows: list[tuple[int, SteadyFigures]], scenario: Scenario) -> str:
    s = scenario
    lines = [
        "## Arrival jitter on 3 replicas",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; {s.replicas} replicas on one "
        f"Redis, {s.rate_per_s:g} req/s ({s.arrivals}, {100 * s.load_share:.0f}% of the limit) "
        f"over {s.locations} locations, limit {s.burst} per {s.window_s:g} s (pad "
        f"{s.pad_ms}..{s.max_pad_ms} ms, max wait {s.max_wait_ms} ms). The simulator counts "
        "each request a uniform 0..jitter after it arrives. 'Share' is what the simulator "
        "admitted over each location's whole cycles of N admissions after its first window, "
        "as a share of the limit (all locations together; the lowest location's apart); "
        "'tightest' is the least time between an admission and the N-th after it, against W.",
        "",
        "| jitter ms | window | run | upstream 429s | share | lowest location | tightest "
        "| sends | extra sends | 200s | proxy 429s | other answers |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run, f in rows:
        others = ", ".join(
            f"{status} {error}: {n}"
            for (status, error), n in f.answers.items()
            if (status, error) not in ((200, None), (429, "rate_limited"))
        )
        lines.append(
            f"| {f.scenario.arrival_delay_ms:g} | {f.scenario.window} | {run} "
            f"| {f.upstream_429s} | {f.share:.3f} | {f.lowest_share:.3f} "
            f"| W{1000 * (f.tightest_s - s.window_s):+.0f} ms | {f.sends} | {f.resends} "
            f"| {f.answers[(200, None)]} | {f.answers[(429, 'rate_limited')]} "
            f"| {others or '-'} |"
        )
    return "\n".join(lines) + "\n"


async def main(runs: int, jitters: list[float], load: float, pad_ms: int) -> None:
    base = dataclasses.replace(OVER_THE_LIMIT, pad_ms=pad_ms)
    scenario = dataclasses.replace(base, rate_per_s=load * base.limit_per_s)
    rows: list[tuple[int, SteadyFigures]] = []
    for run in range(1, runs + 1):
        for jitter_ms in jitters:
            for window in WINDOW_KINDS:
                case = dataclasses.replace(scenario, arrival_delay_ms=jitter_ms, window=window)
                with tempfile.TemporaryDirectory() as tmp:
                    figures = await one_run(Path(tmp), case, seed=run)
                print(figures.line(), flush=True)
                rows.append((run, figures))
    print()
    print(table(rows, scenario))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each case")
    parser.add_argument(
        "--jitter-ms", type=float, nargs="+", default=[0.0, 100.0, 300.0], help="arrival jitters"
    )
    parser.add_argument("--load", type=float, default=1.2, help="offered rate / the limit")
    parser.add_argument("--pad-ms", type=int, default=50, help="limits.burst.pad_ms (the floor)")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.jitter_ms, args.load, args.pad_ms))
