"""The limit day: which day it is in the configured timezone, and when it ends.

HoopAI does not document when its daily count resets, so the timezone is configurable
(`limits.daily.timezone`, UTC by default). DST days are 23 or 25 hours long; the end of
the day is computed as the next local midnight, so both come out right.
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

from proxy.limiter.base import Day


def day_at(epoch_s: float, zone: tzinfo) -> Day:
    """The limit day containing `epoch_s` in `zone`."""
    local = datetime.fromtimestamp(epoch_s, zone)
    next_midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)
    return Day(id=local.date().isoformat(), ends_in_s=next_midnight.timestamp() - epoch_s)
