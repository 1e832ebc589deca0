"""Running wrk with `gateway.lua` and reading the figures it prints.

wrk is closed-loop: each connection sends its next request when the answer to the last
one is in. One thread at 1 connection, two above (wrk shares the 2 cores with the
servers). Latencies are wrk's own percentiles (its `done` hook), in milliseconds here.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).with_name("gateway.lua")
MARK = "GATEWAY_RESULT "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # answers with a status of 400 or more (wrk counts them, not by code)
    socket_errors: int  # connect, read, write errors and timeouts

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def threads_for(connections: int) -> int:
    return 1 if connections == 1 else 2


def run_wrk(
    binary: str, url: str, requests_file: Path, *, connections: int, duration_s: int
) -> WrkResult:
    """`wrk` against `url` for `duration_s` seconds, rotating over `requests_file`."""
    threads = threads_for(connections)
    command = [
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
        "--",
        str(requests_file),
        str(threads),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    if done.returncode != 0 or MARK not in done.stdout:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-1000:]}")
    return parse(done.stdout)


def parse(output: str) -> WrkResult:
    """The figures of the GATEWAY_RESULT line."""
    line = output[output.index(MARK) + len(MARK) :].splitlines()[0]
    values = {key: float(value) for key, value in (item.split("=") for item in line.split())}
    return WrkResult(
        requests=int(values["requests"]),
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        non_2xx=int(values["status"]),
        socket_errors=int(sum(values[key] for key in ("connect", "read", "write", "timeout"))),
    )
