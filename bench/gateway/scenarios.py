"""What one measurement is: a target (nginx, the bare forwarder, or one of the proxies with
one request shape), driven by wrk at a number of connections after a warm-up, with the
Redis calls counted across it. `matrix` lists every scenario of the full table."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.gateway.access_log import AccessSummary, summarize
from bench.gateway.proxies import SPECS, ProxySpec
from bench.gateway.redis_calls import Calls, calls
from bench.gateway.stack import Gateway
from bench.gateway.warmup import warm_up
from bench.gateway.workload import MODES, Mode
from bench.gateway.wrk import WrkResult, run_wrk

Kind = Literal["nginx", "forwarder", "proxy"]
CONNECTIONS = (1, 32, 256)
MODE_NAMES: dict[Mode, str] = {"passthrough": "pass-through", "managed": "managed tokens"}


@dataclass(frozen=True)
class Scenario:
    label: str
    url: str
    mode: Mode
    kind: Kind
    redis_nodes: tuple[str, ...] = ()
    log_path: Path | None = None  # the proxy's log, emptied after each measurement
    pid: int | None = None  # the proxy's process (the parent, with 2 workers)


@dataclass(frozen=True)
class Measurement:
    scenario: Scenario
    connections: int
    result: WrkResult
    redis: Calls | None  # Redis calls during the measured run, None without Redis
    access: AccessSummary | None = None  # the proxy's access lines of the measured run

    def per_request(self, count: int) -> float:
        return count / self.result.requests if self.result.requests else 0.0


def nginx_direct(gateway: Gateway) -> Scenario:
    return Scenario("nginx direct", gateway.nginx.upstream_url, "passthrough", "nginx")


def nginx_proxy_pass(gateway: Gateway) -> Scenario:
    return Scenario("nginx proxy_pass", gateway.nginx.proxy_pass_url, "passthrough", "nginx")


def bare_forwarder(gateway: Gateway, processes: int) -> Scenario:
    count = "1 process" if processes == 1 else f"{processes} processes"
    return Scenario(
        f"bare forwarder, {count}", gateway.forwarders[processes], "passthrough", "forwarder"
    )


def proxy(gateway: Gateway, spec: ProxySpec, mode: Mode = "passthrough") -> Scenario:
    process = gateway.proxies[spec]
    assert process.process is not None
    return Scenario(
        f"proxy {MODE_NAMES[mode]}, {spec.label}",
        process.url,
        mode,
        "proxy",
        redis_nodes=gateway.redis_nodes[spec.limiter],
        log_path=process.log_path,
        pid=process.process.pid,
    )


def matrix(gateway: Gateway) -> list[Scenario]:
    """Every scenario of the full table, in table order."""
    return [
        nginx_direct(gateway),
        nginx_proxy_pass(gateway),
        *(bare_forwarder(gateway, processes) for processes in sorted(gateway.forwarders)),
        *(proxy(gateway, spec, mode) for mode in MODES for spec in SPECS),
    ]


def measure(
    gateway: Gateway,
    scenario: Scenario,
    connections: int,
    duration_s: int,
    *,
    before_wrk: Callable[[], None] | None = None,
) -> Measurement:
    """Warm up (unless just measured), then wrk for `duration_s`; prints one progress
    line. `before_wrk` runs between the two (the profiler starts there)."""
    target = (scenario.url, scenario.mode)
    if gateway.warmth.needed(target):
        warm_up(scenario.url, gateway.requests[scenario.mode])
    _empty(scenario.log_path)
    before = calls(scenario.redis_nodes) if scenario.redis_nodes else None
    if before_wrk is not None:
        before_wrk()
    result = run_wrk(
        gateway.wrk,
        scenario.url,
        gateway.request_files[scenario.mode],
        connections=connections,
        duration_s=duration_s,
    )
    gateway.warmth.ran(target, result.requests)
    spent = calls(scenario.redis_nodes) - before if before is not None else None
    access = summarize(scenario.log_path) if scenario.log_path else None
    _empty(scenario.log_path)
    measurement = Measurement(scenario, connections, result, spent, access)
    print(progress_line(measurement), flush=True)
    return measurement


def _empty(log_path: Path | None) -> None:
    """Empty a proxy's log: it appends (O_APPEND), so it writes on from the start."""
    if log_path is not None:
        os.truncate(log_path, 0)


def progress_line(m: Measurement) -> str:
    r = m.result
    errors = r.non_2xx + r.socket_errors
    line = (
        f"  {m.scenario.label:<48} c={m.connections:<4} {r.rps:8.0f} req/s  "
        f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms"
    )
    if m.access is not None:
        line += f"  in proxy p99 {m.access.p99_ms:.1f}, admission {m.access.admission_p99_ms:.1f}"
    if m.redis is not None:
        line += f"  Redis scripts/req {m.per_request(m.redis.scripts):.2f}"
    return line + (f"  ERRORS {errors}" if errors else "")
