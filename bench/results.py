"""Writing a benchmark's section of bench/RESULTS.md, keeping the other sections."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(heading: str, text: str) -> None:
    """Replace the section that starts with `heading` (or add it at the end)."""
    existing = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    head, found, rest = existing.partition(heading)
    next_section = rest.find("\n## ") if found else -1
    tail = rest[next_section:] if next_section >= 0 else ""
    RESULTS.write_text(head.rstrip() + "\n\n" + text.rstrip() + "\n" + tail)
