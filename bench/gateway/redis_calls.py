"""Commands a Redis (or every node of a Redis Cluster) has answered so far, from
`INFO commandstats`: script calls (EVAL/EVALSHA and their read-only forms) and all
commands. The difference across a measurement, divided by the requests wrk completed,
is the Redis work per forwarded request."""

from __future__ import annotations

from dataclasses import dataclass

import redis

SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro")


@dataclass(frozen=True)
class Calls:
    scripts: int
    commands: int

    def __sub__(self, other: Calls) -> Calls:
        return Calls(self.scripts - other.scripts, self.commands - other.commands)


def calls(urls: tuple[str, ...]) -> Calls:
    """The sums over `urls` (one per node)."""
    nodes = [node_calls(url) for url in urls]
    return Calls(sum(n.scripts for n in nodes), sum(n.commands for n in nodes))


def node_calls(url: str) -> Calls:
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    counts = {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
    counts.pop("info", None)  # our own INFO calls
    return Calls(sum(counts.get(name, 0) for name in SCRIPT_COMMANDS), sum(counts.values()))
