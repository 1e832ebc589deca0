"""The gateway benchmark, one command: nginx, a bare aiohttp forwarder and the proxy under
wrk, with 2,000 Locations each sending its own token (not a test, never a CI gate).

Starts, on free ports in a temp dir, Redis, a 3-master Redis Cluster, nginx (the upstream
and a proxy_pass twin; nginx and wrk are installed from Debian's packages when missing),
the bare forwarder (1 and 2 processes) and the proxies (pass-through and managed tokens;
memory, Redis and Redis Cluster limiters; 1 and 2 workers), and tears all of it down
however the run ends. Then:
1. every scenario at 1, 32 and 256 connections;
2. the headline rounds, interleaved (median ratios at c=32, added p50 at c=1);
3. with --profile, py-spy on the proxy (pass-through, Redis, 1 worker, c=32).
Writes its section of bench/RESULTS.md, bench/results.png and, with --profile, a dated
profile section (--profile-label names it: before / after).

    python bench/run.py                       # full run, about 17 minutes on 2 cores
    python bench/run.py --profile --profile-label before
    python bench/run.py --profile-only --profile-label after    # the profile alone, ~1 min
    python bench/run.py --quick               # smoke test: 1 s runs, 1 round, writes nothing
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/run.py` puts bench/, not the root, on the path

from bench.gateway.chart import write_chart  # noqa: E402
from bench.gateway.headline import Round, figures, run_rounds  # noqa: E402
from bench.gateway.lua_table import lua_cost_table  # noqa: E402
from bench.gateway.profile import Profile, profile  # noqa: E402
from bench.gateway.report import (  # noqa: E402
    SECTION,
    RunInfo,
    main_section,
    profile_heading,
    profile_section,
)
from bench.gateway.scenarios import CONNECTIONS, Measurement, matrix, measure  # noqa: E402
from bench.gateway.stack import Gateway, running_gateway  # noqa: E402
from bench.gateway.tools import MissingTool, ensure_tools  # noqa: E402
from bench.results import write_section  # noqa: E402

CHART = ROOT / "bench" / "results.png"
BUDGET_S = 19 * 60.0  # a full run, Lua cost table included, within 20 minutes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 round, no writing")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick 1)")
    parser.add_argument("--rounds", type=int, help="headline rounds (default 5; quick 1)")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy, bucketed")
    parser.add_argument(
        "--profile-only", action="store_true", help="only the profile (implies --profile)"
    )
    parser.add_argument("--profile-label", default="before", help="names the profile section")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        help="write bench/RESULTS.md and bench/results.png (default: yes, except --quick)",
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (1 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.write = (not args.quick) if args.write is None else args.write
    args.profile = args.profile or args.profile_only
    return args


def run_matrix(gateway: Gateway, duration_s: int) -> list[Measurement]:
    print("every scenario at " + ", ".join(map(str, CONNECTIONS)) + " connections", flush=True)
    return [
        measure(gateway, scenario, connections, duration_s)
        for scenario in matrix(gateway)
        for connections in CONNECTIONS
    ]


@dataclass(frozen=True)
class Measured:
    table: list[Measurement]  # empty with --profile-only
    rounds: list[Round]
    profile: Profile | None


def measure_all(args: argparse.Namespace, tools: dict[str, str]) -> Measured:
    """Everything measured, with everything it needs running only meanwhile."""
    with (
        tempfile.TemporaryDirectory(prefix="hoopai-bench-") as tmp,
        running_gateway(Path(tmp), tools) as gateway,
    ):
        table = [] if args.profile_only else run_matrix(gateway, args.duration)
        rounds = [] if args.profile_only else run_rounds(gateway, args.rounds, args.duration)
        spied = profile(gateway, Path(tmp), args.duration) if args.profile else None
    return Measured(table, rounds, spied)


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds every `with`, so everything started is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        tools = ensure_tools()
    except MissingTool as exc:
        print(f"bench/run.py: {exc}", file=sys.stderr)
        return 1
    measured = measure_all(args, tools)
    if measured.table:
        elapsed = time.monotonic() - started
        info = RunInfo(args.duration, args.rounds, elapsed, load_before, os.getloadavg()[0])
        # What is left of the run's budget (never under two minutes); a minute when quick.
        lua_limit_s = 60.0 if args.quick else max(120.0, BUDGET_S - elapsed)
        lua_cost = lua_cost_table(lua_limit_s)
        text = main_section(info, measured.table, figures(measured.rounds), lua_cost)
        report(args, SECTION, text)
        if args.write:
            write_chart(measured.table, CHART)
    if measured.profile is not None:
        label = args.profile_label
        report(args, profile_heading(label), profile_section(label, measured.profile))
    print(f"bench/run.py took {(time.monotonic() - started) / 60:.1f} min")
    return 0


def report(args: argparse.Namespace, heading: str, text: str) -> None:
    """Print a section and, unless told not to, write it into bench/RESULTS.md."""
    print("\n" + text)
    if args.write:
        write_section(heading, text)
        print(f"(written into bench/RESULTS.md under {heading!r})")
    else:
        print("(not written: --quick or --no-write)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench/run.py: interrupted; everything it started has been stopped", file=sys.stderr)
        sys.exit(130)
