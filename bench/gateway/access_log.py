"""What the proxy's own access lines say about a measured run: the p99 of the time the
proxy measured (`ms`, from its handler's start) and of admission (`queue_ms`: the
limiter's decision, its Redis round trip included, and any hold; none at these rates).
A wrk p99 far above the proxy's own is time spent before the handler ran."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AccessSummary:
    requests: int
    p99_ms: float
    admission_p99_ms: float


def summarize(path: Path) -> AccessSummary | None:
    """The access lines in `path` (a proxy's stderr), or None when it holds none."""
    times: list[float] = []
    admission: list[float] = []
    with path.open(errors="replace") as lines:
        for line in lines:
            if '"proxy.access"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the truncation between runs
            times.append(float(record.get("ms", 0.0)))
            admission.append(float(record.get("queue_ms", 0.0)))
    if len(times) < 2:
        return None
    return AccessSummary(len(times), _p99(times), _p99(admission))


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]
