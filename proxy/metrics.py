"""The proxy's metrics for Prometheus, in a registry of their own per application.

prometheus-client does the exposition format and the histogram arithmetic; each app
gets its own `CollectorRegistry`, so tests (and one process hosting several apps) never
share counters. Labels never carry a resource id, a caller key or a token: their number
must stay small, and a scrape must never leak what a log line must not. So what is kept
per resource (the daily budget) is exposed here as aggregates over resources, read from
the status board at each scrape; `/status` has each resource's figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

QUEUE_BUCKETS_S = (0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
# HighLevel answers most calls in 50-500 ms; its own timeout shows as a 401 after ~30 s.
UPSTREAM_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


Label = TypeVar("Label", str, int)


class CountsBy(Generic[Label]):
    """A labelled counter's children by label value, kept: `labels()` checks its
    arguments and takes a lock on every call, and the request path counts three times a
    request. Label values are few (statuses, outcomes), so the dict stays small."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[Label, Counter] = {}

    def inc(self, value: Label) -> None:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._counter.labels(str(value))
        child.inc()


class Metrics:
    """Every counter the proxy keeps, for one application."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.answers = Counter(
            "hoopai_proxy_answers", "Answers given to callers, by status.", ["status"], registry=r
        )
        self.decisions = Counter(
            "hoopai_proxy_limiter_decisions",
            "Limiter decisions: sent at once, queued, refused (burst or daily), or what shadow "
            "mode would have done.",
            ["outcome"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "hoopai_proxy_queue_seconds",
            "Time requests were held for their slot.",
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.waiting = Gauge(
            "hoopai_proxy_requests_waiting", "Requests held for a slot right now.", registry=r
        )
        self.slots_given_back = Counter(
            "hoopai_proxy_slots_given_back",
            "Slots of queued requests whose callers left before the send, passed on.",
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "hoopai_proxy_upstream_seconds",
            "Time from each send upstream to the answer's headers (or the send's failure).",
            buckets=UPSTREAM_BUCKETS_S,
            registry=r,
        )
        self.needs_reauth = Gauge(
            "hoopai_proxy_needs_reauth",
            "Resources of each app whose refresh token is dead: someone must install the app "
            "again for them (HighLevel has no reconnect API).",
            ["app"],
            registry=r,
        )
        self.upstream = Counter(
            "hoopai_proxy_upstream_answers",
            "Answers from the upstream, by status.",
            ["status"],
            registry=r,
        )
        self.resends = Counter(
            "hoopai_proxy_resends",
            "Requests sent again (after an upstream 429, Invalid JWT or Command timed out).",
            ["reason"],
            registry=r,
        )
        self.refreshes = Counter(
            "hoopai_proxy_token_refreshes",
            "Token refreshes this process made, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.late_answers = Counter(
            "hoopai_proxy_answers_later_than_pad",
            "Upstream answers that came later after their slot than the pad: each moved its "
            "slot's hold to its answer (it may have reached the upstream's counter that late).",
            registry=r,
        )
        self.pad_seconds = Gauge(
            "hoopai_proxy_pad_seconds",
            "The pad in force: p99.9 of slot-to-answer times, between pad_ms and max_pad_ms.",
            registry=r,
        )
        self.limiter_degraded = Gauge(
            "hoopai_proxy_limiter_degraded",
            "1 while the shared limiter (Redis) is unavailable and decisions are local or refused.",
            registry=r,
        )
        # Per resource only on the status page: these are aggregates over resources.
        self.daily_near_limit = Counter(
            "hoopai_proxy_daily_near_limit_requests",
            "Requests admitted while their resource's count today was 80% of its daily "
            "limit or more (Envoy ratelimit's near_limit).",
            registry=r,
        )
        self.near_limit_resources = Gauge(
            "hoopai_proxy_daily_near_limit_resources",
            "Resources on the status board whose count today is 80% of their daily limit or more.",
            registry=r,
        )
        self.highest_daily_use = Gauge(
            "hoopai_proxy_daily_use_max_ratio",
            "The highest count today / daily limit among resources on the status board "
            "(1: a resource has used its day).",
            registry=r,
        )
        self.least_daily_remaining = Gauge(
            "hoopai_proxy_daily_remaining_min",
            "The fewest requests any resource on the status board has left today (one with "
            "no decision this limit day counts its whole daily limit; so does an empty board).",
            registry=r,
        )
        self._answers_by: CountsBy[int] = CountsBy(self.answers)
        self._upstream_by: CountsBy[int] = CountsBy(self.upstream)
        self._decisions_by: CountsBy[str] = CountsBy(self.decisions)

    def count_answer(self, status: int) -> None:
        self._answers_by.inc(status)

    def count_upstream(self, status: int) -> None:
        self._upstream_by.inc(status)

    def count_decision(self, outcome: str) -> None:
        self._decisions_by.inc(outcome)

    def watch_degraded(self, degraded: Callable[[], bool]) -> None:
        """Read the limiter's state at each scrape."""
        self.limiter_degraded.set_function(lambda: 1.0 if degraded() else 0.0)

    def watch_daily_use(self, near: Callable[[], int], highest: Callable[[], float]) -> None:
        """Read the status board's daily figures at each scrape."""
        self.near_limit_resources.set_function(lambda: float(near()))
        self.highest_daily_use.set_function(highest)

    def watch_daily_remaining(self, least: Callable[[], int]) -> None:
        """Read the status board's least daily remaining at each scrape."""
        self.least_daily_remaining.set_function(lambda: float(least()))

    def watch_script_calls(self, calls: Callable[[], int], writes: Callable[[], int]) -> None:
        """Read the limiter's Redis script calls and the writes that carried them at each
        scrape: writes / calls is the round trips per call (under load, the calls of one
        event-loop pass share a write)."""
        self.registry.register(_ScriptCalls(calls, writes))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScriptCalls(Collector):
    """The pipelined script client's own counters, as Prometheus counters."""

    def __init__(self, calls: Callable[[], int], writes: Callable[[], int]) -> None:
        self._calls = calls
        self._writes = writes

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "hoopai_proxy_redis_script_calls",
            "Commands the limiter's pipelined client sent to Redis: its script calls (one "
            "per decision, observe or release), plus the few a connect or redirect needs.",
            value=self._calls(),
        )
        yield CounterMetricFamily(
            "hoopai_proxy_redis_script_writes",
            "Writes to Redis that carried them: the round trips (one per event-loop pass "
            "with calls to send, per Redis node).",
            value=self._writes(),
        )
