"""Bucketing py-spy samples (`--format raw --full-filenames`) by what the time went to.

A sample is a stack, root first. It goes to the bucket of its innermost frame that
belongs to a known owner: a module of the proxy (other than its entry point), aiohttp
and its helpers, redis-py, prometheus_client. So `json` called from the access log counts
as logging, asyncio's streams called from redis-py as redis-py, and what is left (only
the standard library below the entry point) goes by its innermost frame: asyncio,
selectors and uvloop are the event loop, `logging` and `json` logging, the rest other.
aiohttp's shared code (parser, streams, helpers, yarl, multidict) is client or server
work depending on which side's modules called it, or the proxy's when its code called it
directly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REDIS = "redis-py / pipelined redis"
CLIENT = "aiohttp client"
SERVER = "aiohttp server"
GLUE = "proxy forward/app glue"
LIMITER = "limiter + admission"
LOGGING = "access log / logging / json"
LOOP = "event loop / asyncio"
RESOLVE = "resolve / JWT"
HEADERS = "headers"
PROMETHEUS = "prometheus"
STATUS = "status board"
OTHER = "other"
BUCKETS = (REDIS, CLIENT, SERVER, GLUE, LIMITER, LOGGING, LOOP, RESOLVE, HEADERS, PROMETHEUS,
           STATUS, OTHER)

PROXY_MODULES = {
    "proxy/limiter/": LIMITER,
    "proxy/admission.py": LIMITER,
    "proxy/batch_line.py": LIMITER,
    "proxy/cold_keys.py": LIMITER,
    "proxy/learned_limits.py": LIMITER,
    "proxy/limit_answers.py": LIMITER,
    "proxy/waiting.py": LIMITER,
    "proxy/pipelined_redis": REDIS,
    "proxy/redis_client.py": REDIS,
    "proxy/logs.py": LOGGING,
    "proxy/resolve.py": RESOLVE,
    "proxy/jwt.py": RESOLVE,
    "proxy/headers.py": HEADERS,
    "proxy/metrics.py": PROMETHEUS,
    "proxy/status.py": STATUS,
}
ENTRY_POINTS = ("proxy/cli.py", "proxy/commandline.py")
AIOHTTP_FAMILY = ("aiohttp/", "yarl/", "multidict/", "propcache/", "aiosignal/", "frozenlist/")
CLIENT_MODULES = re.compile(r"aiohttp/(client\w*|connector|tracing|resolver)\.py")
SERVER_MODULES = re.compile(r"aiohttp/web\w*\.py")
LIBRARIES = {"redis/": REDIS, "hiredis/": REDIS, "prometheus_client/": PROMETHEUS}
STDLIB = {
    "asyncio/": LOOP,
    "selectors.py": LOOP,
    "uvloop/": LOOP,
    "logging/": LOGGING,
    "json/": LOGGING,
}
_FRAME = re.compile(r"\((?P<path>[^()]*?)(?::\d+)?\)$")


def module_of(frame: str) -> str:
    """A frame's file as a module path: `proxy/forward.py`, `aiohttp/web_protocol.py`,
    `asyncio/streams.py` (standard library), or the frame itself when it names none."""
    found = _FRAME.search(frame)
    path = found.group("path") if found else frame
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    if path.startswith(str(ROOT) + "/"):
        return path[len(str(ROOT)) + 1 :]
    if "/proxy/" in path:  # the proxy run from another checkout (a "before" profile)
        return path[path.rindex("/proxy/") + 1 :]
    stdlib = re.search(r"/lib/python3\.\d+/(.*)$", path)
    return stdlib.group(1) if stdlib else path


def owner(module: str) -> str | None:
    """The bucket of a module that owns the time spent in what it calls, else None."""
    if module.startswith("proxy/"):
        if module.startswith(ENTRY_POINTS):
            return None
        return next((b for prefix, b in PROXY_MODULES.items() if module.startswith(prefix)), GLUE)
    return next((b for prefix, b in LIBRARIES.items() if module.startswith(prefix)), None)


def bucket(stack: list[str]) -> str:
    """The bucket of one sample; `stack` is module paths, root first."""
    for depth in range(len(stack) - 1, -1, -1):
        module = stack[depth]
        if module.startswith(AIOHTTP_FAMILY):
            return _aiohttp_side(stack[: depth + 1])
        found = owner(module)
        if found is not None:
            return found
    leaf = stack[-1] if stack else ""
    return next((b for prefix, b in STDLIB.items() if leaf.startswith(prefix)), OTHER)


def _aiohttp_side(stack: list[str]) -> str:
    """Whose work an innermost aiohttp-family frame is: the client's or the server's when
    a module of either side is among the family frames that called it; else the proxy
    module that called them (yarl or multidict used by the proxy's own code); else the
    server (the loop hands it the connection's bytes)."""
    for module in reversed(stack):
        if CLIENT_MODULES.match(module):
            return CLIENT
        if SERVER_MODULES.match(module):
            return SERVER
        if not module.startswith(AIOHTTP_FAMILY):
            return owner(module) or SERVER
    return SERVER


def bucket_samples(lines: Iterable[str]) -> Counter[str]:
    """Samples per bucket from py-spy's raw output (`frame;frame;... count` lines)."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            counts[bucket([module_of(frame) for frame in stack.split(";")])] += int(count)
    return counts


def table(counts: Counter[str]) -> str:
    """Buckets by share of the samples, largest first, as a markdown table."""
    total = sum(counts.values()) or 1
    rows = ["| bucket | samples | share |", "|---|---:|---:|"]
    for name, count in counts.most_common():
        rows.append(f"| {name} | {count} | {100 * count / total:.1f}% |")
    return "\n".join(rows) + "\n"
