"""bench/results.png: throughput and p50/p99 per scenario, one column per connection
count (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.gateway.scenarios import CONNECTIONS, Kind, Measurement

if TYPE_CHECKING:
    from matplotlib.axes import Axes

COLOURS: dict[Kind, str] = {"nginx": "#2a9d8f", "forwarder": "#e9c46a", "proxy": "#457b9d"}
TITLE = "hoopai-proxy beside nginx and a bare aiohttp forwarder (wrk; 2 cores shared by all)"


def write_chart(matrix: Sequence[Measurement], path: Path) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("matplotlib is not installed: pip install -e '.[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(m.scenario.label for m in matrix))  # table order
    figure, axes = plt.subplots(
        2, len(CONNECTIONS), figsize=(18, 11), sharey=True, squeeze=False, layout="constrained"
    )
    for column, connections in enumerate(CONNECTIONS):
        runs = {m.scenario.label: m for m in matrix if m.connections == connections}
        rows = [runs.get(label) for label in labels]
        _throughput(axes[0][column], rows, connections)
        _latency(axes[1][column], rows, connections)
    figure.suptitle(TITLE)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _throughput(ax: Axes, rows: list[Measurement | None], connections: int) -> None:
    rps = [m.result.rps if m else 0.0 for m in rows]
    ax.barh(
        _positions(rows), rps, color=[COLOURS[m.scenario.kind] if m else "white" for m in rows]
    )
    for position, value in zip(_positions(rows), rps, strict=True):
        ax.annotate(f" {value:,.0f}", (value, position), va="center", fontsize=8)
    _label_rows(ax, rows)
    _log_axis(ax, rps, headroom=4.0)
    ax.set_title(f"throughput at {_connections(connections)}")
    ax.set_xlabel("requests per second (log scale)")


def _latency(ax: Axes, rows: list[Measurement | None], connections: int) -> None:
    p99 = [m.result.p99_ms if m else 0.0 for m in rows]
    p50 = [m.result.p50_ms if m else 0.0 for m in rows]
    ax.barh(_positions(rows), p99, color="#e76f51", label="p99")
    ax.barh(_positions(rows), p50, color="#264653", label="p50")
    _label_rows(ax, rows)
    _log_axis(ax, p50 + p99, headroom=1.5)
    ax.set_title(f"p50 (dark) and p99 latency at {_connections(connections)}")
    ax.set_xlabel("milliseconds (log scale)")


def _log_axis(ax: Axes, values: list[float], *, headroom: float) -> None:
    """A log x axis from a little below the smallest value, its ticks plain numbers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    shown = [value for value in values if value > 0] or [1.0]
    ax.set_xscale("log")
    ax.set_xlim(min(shown) / 2, max(shown) * headroom)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _positions(rows: list[Measurement | None]) -> list[int]:
    return [-index for index in range(len(rows))]  # the first scenario on top


def _label_rows(ax: Axes, rows: list[Measurement | None]) -> None:
    labels = [m.scenario.label if m else "" for m in rows]
    ax.set_yticks(_positions(rows), labels)
    ax.grid(axis="x", alpha=0.3)


def _connections(count: int) -> str:
    return f"{count} connection{'s' if count > 1 else ''}"
