"""Admission: hold a request until its slot, or refuse it, before it goes upstream.

The limiter decides; this module applies the config to it (the numbers, the queue mode,
shadow mode, the caller's `X-HoopAI-Max-Wait-Ms`), sleeps the wait, turns a refusal into
a 429 (worded by `limit_answers`), records each decision in the metrics and the status
board, and hands what each upstream answer says back to the limiter: its counts, its
stated limits (`learned_limits`), and how long it took (the pad, `limiter/pad.py`).

Three kinds of wait besides a slot's (docs/architecture.md, "Admission"):
- a cold key's probe: the first request to a key with nothing in its hold goes alone, and
  the others ask again once its answer is known (or after `PROBE_WAIT_S`), because
  traffic the proxy never saw may already fill the window;
- batch requests: one per key at a time asks for a slot free now, as if the limit were
  one less (`BATCH_HEADROOM`), about W/N after the last (`BATCH_SPACING_SHARE`), and the
  others wait in the `BatchLine`, weighted by caller, for no longer than their max wait;
  so a slot of every window is left to interactive requests, and it comes back all
  through the window, not once: they take it at once;
- the daily reserve: the last `limits.daily.reserve` requests of a day are interactive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.batch_line import BatchLine
from proxy.cold_keys import PROBE_POLL_S, PROBE_WAIT_S, ColdKeys
from proxy.config import LimitsConfig, QueueConfig
from proxy.errors import BadRequest, LimiterUnavailable, RateLimited, TooManyKeys
from proxy.headers import (
    UPSTREAM_BURST_REMAINING,
    UPSTREAM_DAILY_REMAINING,
    Headers,
    upstream_remaining,
)
from proxy.learned_limits import LearnedLimits
from proxy.limit_answers import MAX_WAIT_HEADER, LimitAnswers, shadow_verdict
from proxy.limiter.base import Day, Decision, Limiter, Limits, UpstreamCounts
from proxy.limiter.days import DayClock
from proxy.limiter.pad import PadEstimate
from proxy.metrics import Metrics
from proxy.status import StatusBoard
from proxy.typing import Priority, ResourceKey
from proxy.waiting import WaitingLine

log = logging.getLogger(__name__)

# Slots of every window batch requests leave free for interactive ones; and a batch
# request takes a slot only if it is free within this share of the slot interval (W/N), so
# it never holds a place in the shared queue that an interactive request could want.
BATCH_HEADROOM = 1
# Distinct limits (configured and learned) whose answer headers are kept ready.
ANSWER_SHAPES = 64
BATCH_GATE_SHARE = 0.1
# Batch slots of one process are this share of W/N apart (batch_line.py): spread over the
# window, yet the latency of each ask cannot stretch N - 1 of them past W + pad.
BATCH_SPACING_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class Asker:
    """Who asks for a slot, as admission treats it."""

    priority: Priority = "interactive"
    caller: str = ""
    weight: int = 1


INTERACTIVE = Asker()


def limits_from(config: LimitsConfig) -> Limits:
    return Limits(
        burst=config.burst.requests,
        window_s=config.burst.interval_ms / 1000,
        pad_s=config.burst.pad_ms / 1000,
        daily=config.daily.requests,
    )


def _outcome(decision: Decision, shadow: bool) -> str:
    """The metrics label of a decision."""
    if shadow:
        if decision.limited_by:
            return "shadow_would_refuse"
        return "shadow_would_queue" if decision.wait_s > 0 else "sent"
    if not decision.admitted:
        return f"refused_{decision.limited_by}"
    return "queued" if decision.wait_s > 0 else "sent"


class Admission:
    """The limiter applied to one proxy's config."""

    def __init__(
        self,
        limiter: Limiter,
        limits: LimitsConfig,
        queue: QueueConfig,
        *,
        metrics: Metrics,
        board: StatusBoard,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._board = board
        self._wall_clock = wall_clock
        self._config = limits
        self.limits = limits_from(limits)
        self.learned = LearnedLimits(self.limits, limits.learn, limits.max_tracked_keys)
        self.pad = PadEstimate(self.limits.pad_s, limits.burst.max_pad_ms / 1000)
        self.shadow = limits.mode == "shadow"
        self._answers: dict[tuple[int, float, int], LimitAnswers] = {}
        self._daily_reserve = limits.daily.reserve
        self._days = DayClock(limits.daily.zone, wall_clock)
        self._with_pad: dict[tuple[Limits, float], Limits] = {}
        self._max_wait_s = 0.0 if queue.mode == "reject" else queue.max_wait_ms / 1000
        self.line = WaitingLine(self._give_back)
        self.batch = BatchLine()
        self.cold = ColdKeys()
        # This replica's writes of learned limits: how many are under way, and how many
        # began (a decision asked meanwhile may carry the limits a write replaces).
        self._learn_writes = 0
        self._learn_epoch = 0

    def use_limits(self, limits: LimitsConfig, queue: QueueConfig) -> None:
        """Apply reloaded limits and queue settings (proxy/reload.py decided they may change
        in place; `max_tracked_keys` may not, the limiter was sized by it).

        Requests already held keep their slots and wake at them: the slots were placed
        under the limits then in force, and the limiter places every later one so that no
        window ending at it holds more than the new N (as when the upstream's headers
        teach a lower limit); so a window that spans the reload holds at most the old N,
        and from the last held slot on at most the new one. Requests waiting for a cold
        key's probe or a batch turn ask with the new limits, as each ask reads them anew.
        New burst or daily numbers (or a new `learn`) forget the limits learned from the
        upstream: the next answers teach them again, against the new configuration.
        """
        self._max_wait_s = 0.0 if queue.mode == "reject" else queue.max_wait_ms / 1000
        old, self._config = self._config, limits
        if limits == old:
            return
        configured = limits_from(limits)
        if configured != self.limits or limits.learn != old.learn:
            self.limits = configured
            self.learned = LearnedLimits(configured, limits.learn, limits.max_tracked_keys)
            self._board.use_limits(configured)
        burst, before = limits.burst, old.burst
        if (burst.pad_ms, burst.max_pad_ms) != (before.pad_ms, before.max_pad_ms):
            self.pad = PadEstimate(configured.pad_s, limits.burst.max_pad_ms / 1000)
        if limits.daily.timezone != old.daily.timezone:
            self._days = DayClock(limits.daily.zone, self._wall_clock)
        self.shadow = limits.mode == "shadow"
        self._daily_reserve = limits.daily.reserve
        # Both are built from the limits and the mode: start them afresh.
        self._answers.clear()
        self._with_pad.clear()

    def today(self) -> Day:
        return self._days.today()

    def limits_for(self, key: ResourceKey) -> Limits:
        """The key's limits now: learned or configured, with the pad in force."""
        limits = self.learned.limits_for(key)
        pad = self.pad.pad_s
        if limits.pad_s == pad:
            return limits
        # Kept, not built per request: a few limits and pads are in force at a time.
        padded = self._with_pad.get((limits, pad))
        if padded is None:
            if len(self._with_pad) >= ANSWER_SHAPES:
                self._with_pad.clear()
            padded = self._with_pad[limits, pad] = dataclasses.replace(limits, pad_s=pad)
        return padded

    def answers_for(self, key: ResourceKey) -> LimitAnswers:
        """How the key's decisions look to a caller, on the key's own limits."""
        limits = self.learned.limits_for(key)
        shape = (limits.burst, limits.window_s, limits.daily)
        answers = self._answers.get(shape)
        if answers is None:
            if len(self._answers) >= ANSWER_SHAPES:
                self._answers.clear()  # a few shapes are real; more is churn, start afresh
            answers = self._answers[shape] = LimitAnswers(limits, shadow=self.shadow)
        return answers

    @property
    def answers(self) -> LimitAnswers:
        """How decisions look on the configured limits."""
        return self.answers_for(_NO_KEY)

    def max_wait_for(self, headers: CIMultiDictProxy[str]) -> float:
        """The longest this request may be held: config's, lowered by the caller's header."""
        asked = headers.get(MAX_WAIT_HEADER)
        if asked is None:
            return self._max_wait_s
        asked = asked.strip()
        if not (asked.isascii() and asked.isdigit()):
            raise BadRequest(
                f"{MAX_WAIT_HEADER} must be a whole number of milliseconds (0 = never wait), "
                f"got {asked[:40]!r}"
            )
        if len(asked) > 9:  # longer than a week in milliseconds: the config's cap anyway
            return self._max_wait_s
        return min(self._max_wait_s, int(asked) / 1000)

    async def admit(
        self, key: ResourceKey, max_wait_s: float, asker: Asker = INTERACTIVE
    ) -> Decision:
        """Wait for `key`'s next slot and return the decision, or raise RateLimited."""
        deadline = time.monotonic() + max_wait_s
        if asker.priority == "batch" and not self.shadow:
            # The wait for the turn counts against the deadline: past it, the request asks
            # once without the turn (for a slot free now, else a 429), never waits longer.
            async with self.batch.turn(key, asker.caller, asker.weight, max_wait_s) as turn:
                decision = await self._decide_batch(key, deadline)
                # The key's next batch slot about W/N after this one, not in a bunch with it.
                limits = self.limits_for(key)
                spacing_s = limits.window_s / limits.burst * BATCH_SPACING_SHARE
                turn.pass_on_after_s = decision.wait_s + spacing_s
        else:
            decision = await self._decide(key, deadline)
        if self.shadow:
            if decision.limited_by or decision.wait_s > 0:
                log.info(
                    "shadow: %s would be held or refused: %s", key.tag, shadow_verdict(decision)
                )
            return decision
        held_s = 0.0
        if decision.wait_s > 0:
            began = time.monotonic()
            try:
                decision = await self._hold(key, decision)
            except asyncio.CancelledError:
                # A probe never sent must not hold this process's others back (its mark in
                # the limiter expires by itself).
                self.cold.settle(key, decision)
                raise
            # Not decision.wait_s: a caller ahead who left may have moved this one up.
            held_s = time.monotonic() - began
        self._metrics.queue_seconds.observe(held_s)
        return decision

    async def _decide(self, key: ResourceKey, deadline: float, *, batch: bool = False) -> Decision:
        """The limiter's decision within the deadline; refusals raise RateLimited.

        Asks again, rather than refuse, while another request probes the cold key (for at
        most PROBE_WAIT_S, whatever the deadline), and
        (a batch request) while the next slot is not free yet but will be before the
        deadline: a batch request never reserves a slot ahead. Each ask takes the key's
        limits anew: the probe's answer may have taught other ones.
        """
        # Waiting for a probe's answer is waiting for news, not for a slot: allowed even
        # to a request that may not queue, for as long as a probe may be out.
        probe_deadline = time.monotonic() + PROBE_WAIT_S
        while True:
            now = time.monotonic()
            left = max(0.0, deadline - now)
            limits = self.limits_for(key)
            gate = limits.window_s / limits.burst * BATCH_GATE_SHARE
            max_wait_s = min(left, gate) if batch else left
            # Past the probe's time, decide without it (the probe's send may have failed).
            probe_s = PROBE_WAIT_S if now < probe_deadline else 0.0
            decision = await self._ask(key, limits, max_wait_s, batch, probe_s)
            if decision.probe == "other":
                await self.cold.answered(key, min(decision.retry_after_s, PROBE_POLL_S))
            elif (
                batch
                and not decision.admitted
                and decision.limited_by == "burst"
                and decision.retry_after_s <= left
            ):
                await asyncio.sleep(decision.retry_after_s)
            else:
                return self._decided(key, decision, left)

    async def _decide_batch(self, key: ResourceKey, deadline: float) -> Decision:
        """A batch request's slot: free now, one of every window left to interactive
        requests, and never one of the day's reserve."""
        return await self._decide(key, deadline, batch=True)

    async def _ask(
        self, key: ResourceKey, limits: Limits, max_wait_s: float, batch: bool, probe_s: float
    ) -> Decision:
        epoch = self._learn_epoch if self._learn_writes == 0 else -1
        asked_at = time.monotonic()
        try:
            decision = await self._limiter.acquire(
                key,
                limits,
                self.today(),
                max_wait_s,
                shadow=self.shadow,
                probe_s=0.0 if self.shadow else probe_s,
                headroom=BATCH_HEADROOM if batch else 0,
                reserve=self._daily_reserve if batch else 0,
            )
        except LimiterUnavailable:
            if not self.shadow:
                raise
            # Shadow mode never holds or refuses, not even when it cannot decide.
            log.warning("shadow: limiter unavailable, %s sent undecided", key.tag)
            self._metrics.decisions.labels("undecided").inc()
            return self._undecided()
        except TooManyKeys:
            # The limiter has logged the cap (once a minute, not once a request).
            if not self.shadow:
                self._metrics.decisions.labels("refused_too_many_keys").inc()
                raise
            self._metrics.decisions.labels("undecided").inc()
            return self._undecided()
        if (
            decision.limits is not None
            and decision.limits is not limits
            # Not the fallback's share of the limits while Redis is down, nor what the shared
            # state held before a write of this replica's that may not have landed yet.
            and not decision.local
            and epoch == self._learn_epoch
        ):
            # Another replica learned the key's limits: the shared state decided with them.
            self._adopt(key, decision.limits)
        self.cold.probing(key, decision)
        if decision.admitted and not self.shadow:
            # Never later than the slot on this process's clock: what the pad is measured from.
            decision = dataclasses.replace(decision, due_at=asked_at + decision.wait_s)
        return decision

    def _decided(self, key: ResourceKey, decision: Decision, max_wait_s: float) -> Decision:
        """Record a decision; a refusal raises RateLimited."""
        self._board.decided(key, decision)
        self._metrics.count_decision(_outcome(decision, self.shadow))
        if not decision.admitted:
            raise RateLimited(
                self.answers_for(key).refusal_message(key, decision, max_wait_s),
                headers=self.answers_for(key).refusal_headers(decision),
            )
        return decision

    async def settle(self, key: ResourceKey, decision: Decision) -> None:
        """The request of `decision` is done. A probe that got no answer (the send failed)
        lets the others go all the same, on every replica."""
        if not self.cold.unanswered(key, decision):
            return
        try:
            counts = UpstreamCounts(end_probe=True)
            await self._limiter.observe(key, self.limits_for(key), self.today(), counts)
        except LimiterUnavailable:
            pass  # the probe's mark expires by itself
        finally:
            self.cold.settle(key, decision)

    async def aclose(self) -> None:
        await self.line.aclose()

    async def _hold(self, key: ResourceKey, decision: Decision) -> Decision:
        """Wait in line for the slot (it may move earlier when a caller ahead leaves); if
        this caller leaves, nothing is sent and the slot is passed on."""
        self._metrics.waiting.inc()
        self._board.waiting(key, +1)
        try:
            return await self.line.hold(key, decision)
        finally:
            self._metrics.waiting.dec()
            self._board.waiting(key, -1)

    async def _give_back(self, key: ResourceKey, decision: Decision) -> None:
        await self._limiter.release(key, self.limits_for(key), decision)
        self._metrics.slots_given_back.inc()

    async def observe(
        self,
        key: ResourceKey,
        status: int,
        headers: Headers,
        decision: Decision,
    ) -> None:
        """Tell the limiter what the upstream's answer (its headers just came) says of the
        key's limits, and how long after its slot it came (the pad, late answers).

        `decision` is what the limiter said when this request was admitted. The upstream
        saying fewer remain than that means traffic the limiter never saw (it bypassed the
        proxy): every replica must know at once, as must the others waiting for a cold
        key's probe. Otherwise the counts may ride along with the key's next decision,
        which costs no extra round trip.
        """
        if decision.due_at is not None:
            await self._measured(key, decision, time.monotonic() - decision.due_at)
        learned = self.learned.learn(key, headers)
        if learned is not None:
            await self._learned(key, learned)
        limits = self.limits_for(key)
        # As the upstream said them, on its own limits and interval: `r` left means at most
        # `r` more until its window moves on, whatever our own numbers are.
        burst = upstream_remaining(headers, UPSTREAM_BURST_REMAINING)
        daily = upstream_remaining(headers, UPSTREAM_DAILY_REMAINING)
        self._board.answered(key, headers, status)
        probe = decision.probe == "this"
        try:
            if status == 429:
                # Not processed upstream: the whole window is taken, for every replica, now.
                counts = UpstreamCounts(0, daily, pause=True, end_probe=probe)
                await self._limiter.observe(key, limits, self.today(), counts)
            elif burst is not None or daily is not None or probe:
                # Requests admitted just after this one may reach the upstream first; only
                # a shortfall beyond that reordering is news worth a round trip now.
                slack = max(2, limits.burst // 20)
                surprising = (burst is not None and burst < decision.burst_remaining - slack) or (
                    daily is not None and daily < decision.daily_remaining - slack
                )
                counts = UpstreamCounts(burst, daily, at_once=surprising, end_probe=probe)
                await self._limiter.observe(key, limits, self.today(), counts)
        finally:
            self.cold.settle(key, decision)

    async def _measured(
        self, key: ResourceKey, decision: Decision, slot_to_answer_s: float
    ) -> None:
        """Learn the pad from one answer's time; an answer later than its request's bound
        moves the bound (it may have reached the counter that late)."""
        self.pad.record(slot_to_answer_s)
        late_by_s = slot_to_answer_s - decision.pad_s
        if late_by_s > 0 and decision.slot is not None:
            await self._limiter.anchor(key, self.limits_for(key), decision, late_by_s)
            self._metrics.late_answers.inc()

    async def _learned(self, key: ResourceKey, limits: Limits) -> None:
        """This replica learned new limits for `key`: every replica decides with them."""
        configured = limits == self.limits
        self._learn_writes += 1
        self._learn_epoch += 1
        try:
            await self._limiter.learn(key, limits, forget=configured)
        finally:
            self._learn_writes -= 1
        self._board.set_limits(key, limits, learned=not configured)

    def _adopt(self, key: ResourceKey, limits: Limits) -> None:
        """The shared state decided with `limits`, learned by another replica."""
        changed = self.learned.adopt(key, limits)
        if changed is not None:
            self._board.set_limits(key, changed, learned=changed != self.limits)

    def _undecided(self) -> Decision:
        day = self.today()
        return Decision(
            admitted=True,
            wait_s=0.0,
            retry_after_s=0.0,
            limited_by="",
            burst_remaining=self.limits.burst,
            burst_reset_s=0.0,
            daily_remaining=self.limits.daily,
            daily_reset_s=day.ends_in_s,
        )


_NO_KEY = ResourceKey("", "location", "")
