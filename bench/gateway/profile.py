"""`--profile`: py-spy on the proxy process during the c=32 pass-through scenario with the
Redis limiter and 1 worker, its samples bucketed (`profile_buckets`) into a table.

py-spy runs `--nonblocking` (it reads the process's memory without stopping it, so the
proxy is not slowed by the sampling itself) at 200 samples a second, for as long as wrk.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.gateway.profile_buckets import bucket_samples
from bench.gateway.proxies import ProxySpec
from bench.gateway.scenarios import Measurement, measure, proxy
from bench.gateway.stack import Gateway

RATE = 200
CONNECTIONS = 32
SPEC = ProxySpec("redis")


@dataclass(frozen=True)
class Profile:
    measurement: Measurement
    counts: Counter[str]


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


def profile(gateway: Gateway, workdir: Path, duration_s: int) -> Profile:
    scenario = proxy(gateway, SPEC)
    assert scenario.pid is not None
    output = workdir / "profile.raw"
    command = [
        py_spy(),
        "record",
        "--pid",
        str(scenario.pid),
        "--duration",
        str(duration_s),
        "--rate",
        str(RATE),
        "--format",
        "raw",
        "--full-filenames",
        "--nonblocking",
        "--output",
        str(output),
    ]
    print(f"profiling {scenario.label} at c={CONNECTIONS} with py-spy", flush=True)
    # py-spy starts once the warm-up is over: measure() calls back before wrk starts.
    spy: list[subprocess.Popen[bytes]] = []

    def start_spy() -> None:
        spy.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    try:
        measurement = measure(gateway, scenario, CONNECTIONS, duration_s, before_wrk=start_spy)
        _, errors = spy[0].communicate(timeout=duration_s + 60)
    finally:
        for process in spy:
            if process.poll() is None:
                process.kill()
                process.wait()
    if spy[0].returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed ({spy[0].returncode}): {errors.decode()[-1000:]}")
    with output.open() as lines:
        return Profile(measurement, bucket_samples(lines))
