"""The markdown a run writes into bench/RESULTS.md: the main section (setup, headline
figures, Redis work per request, every scenario, the Lua cost table) and, with
`--profile`, a dated section of the profile's buckets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bench.gateway.headline import Figure
from bench.gateway.profile import CONNECTIONS as PROFILE_CONNECTIONS
from bench.gateway.profile import RATE, Profile
from bench.gateway.profile_buckets import table as bucket_table
from bench.gateway.scenarios import CONNECTIONS, Measurement
from bench.gateway.workload import LOCATIONS
from bench.results import machine

SECTION = "## Gateway: nginx, a bare forwarder and the proxy under wrk (`python bench/run.py`)"
PROFILE_SECTION = "## Gateway profile"


EVERY_SCENARIO = (
    "p50 and p99 are wrk's; *p99 ms in the proxy* is the p99 of the time the proxy's "
    "access lines give (`ms`, from its handler's start), *p99 admission ms* that of "
    "their `queue_ms` (the limiter's decision, Redis round trip included, and any hold). "
    "A wrk p99 far above the proxy's own is time the request waited before the handler "
    "ran.\n\n"
)


@dataclass(frozen=True)
class RunInfo:
    duration_s: int
    rounds: int
    elapsed_s: float  # from the start to the end of the measurements
    load_before: float  # the 1-minute load average when the run started: others' work
    load_after: float  # the same when the measurements ended (this run's own load in it)


def main_section(
    info: RunInfo, matrix: Sequence[Measurement], headline: Sequence[Figure], lua_cost: str
) -> str:
    parts = [
        SECTION,
        setup_text(info),
        "![Throughput and p50/p99 per scenario and connection count](results.png)",
        f"### Headline (median of {info.rounds} interleaved rounds)\n\n" + headline_table(headline),
        "### Redis work per forwarded request (calls during the run ÷ requests wrk completed)\n\n"
        + redis_table(matrix),
        "### Every scenario\n\n" + EVERY_SCENARIO + matrix_table(matrix),
        "### Lua cost by N\n\n" + lua_cost,
    ]
    return "\n\n".join(part.rstrip() for part in parts) + "\n"


def setup_text(info: RunInfo) -> str:
    took = (
        f" Starting everything and measuring took {info.elapsed_s / 60:.1f} min. "
        f"Load average (1 min) before: {info.load_before:.2f} (other processes' work; 0 on "
        f"an idle machine), after: {info.load_after:.2f}."
    )
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}. {LOCATIONS:,} Locations, "
        "each request (`GET /contacts/?locationId=...`) with its own token: pass-through "
        "sends the Location's JWT, managed tokens only the caller key (the proxy holds the "
        f"{LOCATIONS:,} installs, seeded in its store). The real limits (100 per 10 s, "
        "200,000 a day per Location), never reached at these rates: the figures are the "
        "cost of the path. Upstream: nginx answering a 274-byte JSON body with HighLevel's "
        "five `X-RateLimit-*` headers, on loopback over http. The proxy runs a gateway's "
        "defaults (caller keys, access log, metrics, status, upstream sync, tokens sealed "
        "at rest). wrk (closed loop; `-t1` at 1 connection, `-t2` above) for "
        f"{info.duration_s} s per run, after a warm-up of one request per Location. "
        "No CPU pinning: wrk, nginx, Redis (and the Cluster's 3 nodes) and the server under "
        "test share the 2 cores, so a second worker or process competes with them and "
        f"cannot double throughput.{took}"
    )


def headline_table(figures: Sequence[Figure]) -> str:
    rows = ["| figure | median | min | max |", "|---|---:|---:|---:|"]
    for f in figures:
        low, high = min(f.values), max(f.values)
        cells = (_value(value, f.unit) for value in (f.median, low, high))
        rows.append(f"| {f.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _value(value: float, unit: str) -> str:
    return f"{value:.2f}x" if unit == "x" else f"{value:+.2f} ms"


def redis_table(matrix: Sequence[Measurement]) -> str:
    header = " | ".join(f"c={c} scripts / all" for c in CONNECTIONS)
    rows = [f"| scenario | {header} |", "|---|" + "---:|" * len(CONNECTIONS)]
    by_label: dict[str, dict[int, Measurement]] = {}
    for m in matrix:
        if m.redis is not None:
            by_label.setdefault(m.scenario.label, {})[m.connections] = m
    for label, runs in by_label.items():
        cells = (_redis_cell(runs.get(c)) for c in CONNECTIONS)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _redis_cell(m: Measurement | None) -> str:
    if m is None or m.redis is None:
        return "-"
    return f"{m.per_request(m.redis.scripts):.2f} / {m.per_request(m.redis.commands):.2f}"


def matrix_table(matrix: Sequence[Measurement]) -> str:
    rows = [
        "| scenario | connections | req/s | p50 ms | p99 ms | p99 ms in the proxy "
        "| p99 admission ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in matrix:
        r = m.result
        inside = f"{m.access.p99_ms:.1f} | {m.access.admission_p99_ms:.1f}" if m.access else "- | -"
        rows.append(
            f"| {m.scenario.label} | {m.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} "
            f"| {r.p99_ms:.2f} | {inside} | {r.non_2xx + r.socket_errors} |"
        )
    return "\n".join(rows) + "\n"


def profile_heading(label: str) -> str:
    return f"{PROFILE_SECTION}: {label}, {datetime.now(UTC):%Y-%m-%d}"


def profile_section(label: str, profile: Profile) -> str:
    m = profile.measurement
    return (
        f"{profile_heading(label)}\n\n"
        f"py-spy (`--nonblocking`, {RATE} Hz) on the proxy process during "
        f"`{m.scenario.label}` at c={PROFILE_CONNECTIONS} ({m.result.rps:,.0f} req/s while "
        f"sampled, {m.result.p50_ms:.2f} ms p50), {machine()}; each sample goes to the "
        "innermost frame's owner (`bench/gateway/profile_buckets.py`).\n\n"
        + bucket_table(profile.counts)
    )
