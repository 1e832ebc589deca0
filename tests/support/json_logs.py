"""The JSON lines the proxy's own handler writes, captured in memory for a test."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from proxy.logs import JsonLinesHandler

LogLines = Callable[[], list[dict[str, Any]]]


@contextmanager
def json_log_lines() -> Iterator[LogLines]:
    """While open, the lines written at INFO and up, as dicts (call the result to read)."""
    stream = io.StringIO()
    handler = JsonLinesHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    def lines() -> list[dict[str, Any]]:
        handler.flush()
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
