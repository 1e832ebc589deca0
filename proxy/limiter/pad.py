"""The pad: how late after its slot a request may reach the upstream's counter.

The upstream counts a request when it arrives, and the time from the proxy's slot to that
arrival varies: the event loop's lag before the send, then the network (TCP retransmits
alone add 200 ms). A slot's arrival bound is the slot plus the pad (limiter/slots.py), so
the pad must cover that delay. It cannot be seen directly, but it is never longer than
from the slot to the answer's headers, which is measured on every answer: the pad is the
p99.9 of the last `SAMPLES` of those, never below `pad_ms` (the floor, for a quiet
start) nor above `max_pad_ms` (answers slow because the upstream works long on them say
little of the network, and each pad millisecond costs throughput: N per W + pad). The
rare answer later than its pad moves its own bound (Limiter.anchor).
"""

from __future__ import annotations

import bisect
import math
from collections import deque

SAMPLES = 1000
QUANTILE = 0.999


class PadEstimate:
    """The pad from recent slot-to-answer times, between a floor and a ceiling."""

    def __init__(self, floor_s: float, ceiling_s: float, samples: int = SAMPLES) -> None:
        if samples < 1:
            raise ValueError("samples must be at least 1")
        self._floor = floor_s
        self._ceiling = max(floor_s, ceiling_s)
        self._recent: deque[float] = deque(maxlen=samples)
        self._sorted: list[float] = []
        self.pad_s = floor_s

    def record(self, slot_to_answer_s: float) -> None:
        """One answer's time from its slot to its headers."""
        if not math.isfinite(slot_to_answer_s) or slot_to_answer_s < 0:
            return
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._recent.append(slot_to_answer_s)
        bisect.insort(self._sorted, slot_to_answer_s)
        # With fewer than 1000 samples, p99.9 is the largest: careful while little is known.
        at = min(len(self._sorted) - 1, math.ceil(QUANTILE * len(self._sorted)) - 1)
        self.pad_s = min(self._ceiling, max(self._floor, self._sorted[at]))
