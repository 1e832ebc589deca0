"""Benchmark: a Redis fault under load on 3 replicas, counted at the upstream (issue 9).

The issue's setup: 3 `hoopai-proxy serve` processes sharing one redis-server
(`on_redis_error: local`, `expected_replicas: 3`), 50 req/s over 20 locations, limit 4
per 2 s on the proxies and on the simulator (sliding window). Each run: load until a
window's worth is admitted, then Redis killed (kill -9) for 5 s and restarted empty, or
stopped (SIGSTOP) for 3 s and continued, or left alone (the baseline), then load until
a window's worth is admitted a whole window after every replica is back on Redis. The
simulator runs in this process (its arrival times are read in place); Redis, the
simulator and the proxies are fresh for every run. The scenario is the fault tests' own
(`tests/support/load.py`). Prints a table; not a test, not a CI gate.

    python -m bench.faults [--runs 1] [--rate 50] [--arrivals poisson|even] [--max-wait-ms 30000]
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
from proxy.harness.load import Arrivals, Fault, Figures, Scenario, run_fault

FAULTS = (Fault("none", 5.0), Fault("kill", 5.0), Fault("stop", 3.0))


async def one_run(workdir: Path, scenario: Scenario, fault: Fault) -> Figures:
    """Fresh Redis, simulator and replicas; the fault under load; the figures."""
    async with running_replicas(workdir, scenario) as (sim, proxies, redis):
        return await run_fault(sim, proxies, redis, scenario, fault)


def table(rows: list[tuple[int, Figures]], scenario: Scenario) -> str:
    s = scenario
    lines = [
        "## Redis faults under load (issue 9)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}; {s.replicas} replicas on one "
        f"Redis, {s.rate_per_s:g} req/s ({s.arrivals}, {100 * s.load_share:.0f}% of the limit) "
        f"over {s.locations} locations, limit {s.burst} per {s.window_s:g} s (pad "
        f"{s.pad_ms} ms, max wait {s.max_wait_ms} ms), the simulator's sliding window. "
        "Counts over the whole run; 'served' is what the simulator admitted from the fault "
        "until Redis answered again, against 1/replicas of the limit over that time.",
        "",
        "| fault | run | upstream 429s | sends | extra sends | 200s | proxy 429s | other "
        "answers | outage s | served in outage | 1/3 of the limit |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for run, f in rows:
        others = ", ".join(f"{status} {error}: {n}" for (status, error), n in f.others.items())
        lines.append(
            f"| {f.fault} | {run} | {f.upstream_429s} | {f.sends} | {f.resends} | {f.ok} "
            f"| {f.proxy_429s} | {others or '-'} | {f.outage_s:.2f} | {f.served_in_outage} "
            f"| {f.share_in_outage:.1f} |"
        )
    return "\n".join(lines) + "\n"


async def main(runs: int, rate: float, arrivals: Arrivals, max_wait_ms: int) -> None:
    rows: list[tuple[int, Figures]] = []
    scenario = Scenario(rate_per_s=rate, arrivals=arrivals, max_wait_ms=max_wait_ms)
    for run in range(1, runs + 1):
        for fault in FAULTS:
            # Each run its own Poisson stream; the faults of one run share it.
            seeded = dataclasses.replace(scenario, seed=scenario.seed + run)
            with tempfile.TemporaryDirectory() as tmp:
                figures = await one_run(Path(tmp), seeded, fault)
            print(figures.line(), flush=True)
            rows.append((run, figures))
    print()
    print(table(rows, scenario))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each fault")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--arrivals", choices=("poisson", "even"), default="poisson")
    parser.add_argument(
        "--max-wait-ms", type=int, default=30000, help="queue.max_wait_ms (the default)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.rate, args.arrivals, args.max_wait_ms))
