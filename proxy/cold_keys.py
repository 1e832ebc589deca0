"""This process's probes of cold keys, and the requests waiting for their answers.

A key with nothing in its hold is cold: traffic the proxy never saw may already fill the
upstream's window. The limiter lets its first request go alone (`Decision.probe ==
"this"`) and tells the others to ask again (`"other"`) until the probe's answer has been
applied (docs/architecture.md, "Cold keys"). A request waiting here wakes when this
process's probe of the key is answered or fails (`settle`), or after a short poll when
the probe is another replica's.
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy.limiter.base import Decision
from proxy.typing import ResourceKey

# How long the others wait at most for a probe to be answered (its answer usually ends
# the wait much sooner; a slower one, a long search, lets them go without it), and how
# often they ask again meanwhile when the probe is another replica's.
PROBE_WAIT_S = 1.0
PROBE_POLL_S = 0.05


class ColdKeys:
    """The probes this process sent, until each is answered or fails."""

    def __init__(self) -> None:
        self._probes: dict[ResourceKey, asyncio.Event] = {}

    def probing(self, key: ResourceKey, decision: Decision) -> None:
        """Note a decision: one that makes its request the key's probe starts a wait."""
        if decision.probe == "this":
            self._probes[key] = asyncio.Event()

    async def answered(self, key: ResourceKey, at_most_s: float) -> None:
        """Wait until this process's probe of `key` is answered, or `at_most_s` when the
        probe is another replica's (then ask the limiter again)."""
        probe = self._probes.get(key)
        if probe is None:
            await asyncio.sleep(at_most_s)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probe.wait(), PROBE_WAIT_S)

    def unanswered(self, key: ResourceKey, decision: Decision) -> bool:
        """Whether `decision` made its request this process's probe of `key`, still out."""
        return decision.probe == "this" and key in self._probes

    def settle(self, key: ResourceKey, decision: Decision) -> None:
        """The request of `decision` is done (answered, failed, or never sent): if it was
        the probe, the others go (the limiter's own expiry is the backstop for a probe
        whose replica died)."""
        if decision.probe == "this" and (probe := self._probes.pop(key, None)) is not None:
            probe.set()
