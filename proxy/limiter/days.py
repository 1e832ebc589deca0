"""The limit day: which day it is in the configured timezone, and when it ends.

HoopAI does not document when its daily count resets, so the timezone is configurable
(`limits.daily.timezone`, UTC by default). DST days are 23 or 25 hours long; the end of
the day is computed as the next local midnight, so both come out right.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo

from proxy.limiter.base import Day


def day_at(epoch_s: float, zone: tzinfo) -> Day:
    """The limit day containing `epoch_s` in `zone`."""
    local = datetime.fromtimestamp(epoch_s, zone)
    next_midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)
    return Day(id=local.date().isoformat(), ends_in_s=next_midnight.timestamp() - epoch_s)


class DayClock:
    """`day_at` for the current time, worked out once per day: every decision asks for
    the day, and building it from datetimes each time costs more than the decision.
    A clock moved back before the day's start (tests do) works it out again."""

    def __init__(self, zone: tzinfo, wall_clock: Callable[[], float]) -> None:
        self._zone = zone
        self._wall_clock = wall_clock
        self._id = ""
        self._starts_at = float("inf")
        self._ends_at = float("-inf")

    def today(self) -> Day:
        now = self._wall_clock()
        if not self._starts_at <= now < self._ends_at:
            day = day_at(now, self._zone)
            local = datetime.fromtimestamp(now, self._zone)
            midnight = datetime.combine(local.date(), datetime.min.time(), self._zone)
            self._id, self._ends_at = day.id, now + day.ends_in_s
            self._starts_at = midnight.timestamp()
            return day
        return Day(id=self._id, ends_in_s=self._ends_at - now)
