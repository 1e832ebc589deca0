"""The ``Simulator``: one fake HoopAI server's state, and the operations on it.

Handlers and in-process tests call these methods; none of them awaits, so each one is
atomic on the event loop. Time is ``clock() + clock_offset``: tests move the offset
instead of sleeping.
"""

from __future__ import annotations

import enum
import hmac
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from proxy.simulator.config import SimulatorConfig, app_id_of, check_lifetime, check_limits
from proxy.simulator.faults import Dice, Faults
from proxy.simulator.jwt import random_id
from proxy.simulator.limits import LimitBook, LimitView
from proxy.simulator.stats import Stats
from proxy.simulator.tokens import USER_TYPES, AccessGrant, Install, TokenBook, grant_json
from proxy.simulator.transits import Transit, TransitLog

_LIFETIMES = ("access_token_lifetime_s", "refresh_token_lifetime_s")


class Verdict(enum.Enum):
    """What the limit stage decided for one API request."""

    ADMITTED = "admitted"
    LIMITED = "limited"
    FORCED_429 = "forced_429"


class Simulator:
    """State of one simulated HoopAI API: apps, tokens, limits, faults and counters."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = (config or SimulatorConfig()).copy()
        self.clock_offset = 0.0
        self.faults = Faults()
        self.counters = Stats()
        self.tokens = TokenBook()
        self.limits = LimitBook(self.config)
        self.transits = TransitLog()
        self.dice = Dice(self.config.seed)
        self._clock = clock
        # Locations approved after a Company install: (app id, company id) -> location ids.
        self._added_locations: dict[tuple[str, str], tuple[str, ...]] = {}

    def now(self) -> float:
        """The simulator's time: the injected clock plus whatever tests advanced."""
        return self._clock() + self.clock_offset

    def advance_clock(self, seconds: float) -> float:
        """Move the simulator's time forward; returns the new ``now()``."""
        if seconds < 0:
            raise ValueError(f"advance_s: must not be negative, got {seconds!r}")
        self.clock_offset += seconds
        return self.now()

    # -- apps and installs -------------------------------------------------------------

    def register_app(self, client_id: str, client_secret: str) -> None:
        if not client_id or not client_secret:
            raise ValueError("client_id and client_secret: must not be empty")
        self.config.apps[client_id] = client_secret

    def client_ok(self, client_id: str, client_secret: str) -> bool:
        expected = self.config.apps.get(client_id)
        # compare_digest: the fake should not teach callers a timing-leaky habit.
        return expected is not None and hmac.compare_digest(
            expected.encode(), client_secret.encode()
        )

    def install(
        self,
        client_id: str,
        *,
        user_type: str = "Location",
        location_id: str | None = None,
        company_id: str | None = None,
        approved_locations: Iterable[str] = (),
    ) -> tuple[str, Install]:
        """Install an app (as the marketplace would) and mint its authorization code."""
        if client_id not in self.config.apps:
            raise ValueError(f"client_id: unknown app {client_id!r}")
        if user_type not in USER_TYPES:
            raise ValueError(f"user_type: must be Location or Company, got {user_type!r}")
        install = Install(
            client_id=client_id,
            user_type=user_type,
            company_id=company_id or random_id(),
            location_id=(location_id or random_id()) if user_type == "Location" else None,
            user_id=random_id(),
            approved_locations=tuple(approved_locations),
        )
        return self.tokens.mint_code(install, self.now()), install

    def grant(self, client_id: str, **install: Any) -> dict[str, Any]:
        """Install and exchange in one step, in process: the /oauth/token answer.

        ``install`` takes the keywords of :meth:`install`. Counts as an exchanged code.
        """
        code, _ = self.install(client_id, **install)
        pair = self.tokens.redeem_code(
            code, client_id, self.now(), self.config.access_token_lifetime_s
        )
        self.counters.codes_exchanged += 1
        return grant_json(pair)

    def approve_locations(
        self, client_id: str, company_id: str, location_ids: Iterable[str]
    ) -> None:
        """Approve more locations for an app's Company install, as an agency admin adding
        sub-accounts to a bulk install later: /oauth/installedLocations lists them and
        /oauth/locationToken mints for them (an install listing no location approves all
        already; after this it approves exactly what is listed)."""
        key = (app_id_of(client_id), company_id)
        added = [lid for lid in location_ids if lid not in self._added_locations.get(key, ())]
        self._added_locations[key] = (*self._added_locations.get(key, ()), *added)

    def approved_locations(self, install: Install) -> tuple[str, ...]:
        """The locations a Company install approves now: at install, and added since."""
        added = self._added_locations.get((install.app_id, install.company_id), ())
        return (
            *install.approved_locations,
            *(a for a in added if a not in install.approved_locations),
        )

    def approves(self, install: Install, location_id: str) -> bool:
        """Whether a Company install covers a location now (no list means all of them)."""
        approved = self.approved_locations(install)
        return not approved or location_id in approved

    def authenticate(self, authorization: str | None) -> AccessGrant | None:
        """The grant behind an ``Authorization: Bearer`` value, or ``None`` (Invalid JWT)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.tokens.access(token.strip(), self.now())

    # -- limits --------------------------------------------------------------------------

    def gate(
        self, resource: str, *, received_at: float | None = None, delay_s: float = 0.0
    ) -> tuple[Verdict, LimitView]:
        """Count one API request for ``resource`` against its limits and the forced 429s.

        ``received_at`` (default: now) and ``delay_s`` say when the request arrived and how
        long the arrival delay held it; both go to the transit log with the verdict.
        """
        now = self.now()
        counters = self.counters.resource(resource)
        counters.requests += 1
        if not self.limits.allows(resource, now):
            verdict = Verdict.LIMITED
            self.limits.refuse(resource, now)
        elif self.faults.force_429 > 0:
            # Forced 429s come after the limit check and, like real ones, consume nothing.
            self.faults.force_429 -= 1
            self.counters.forced_429 += 1
            verdict = Verdict.FORCED_429
        else:
            self.limits.admit(resource, now)
            counters.admitted += 1
            self.counters.admitted += 1
            counters.max_in_window = self.limits.max_in_window(resource)
            verdict = Verdict.ADMITTED
        if verdict is not Verdict.ADMITTED:
            counters.rate_limited += 1
            self.counters.rate_limited += 1
        arrived = now if received_at is None else received_at
        admitted = verdict is Verdict.ADMITTED
        self.transits.record(resource, Transit(arrived, delay_s, now, admitted))
        return verdict, self.limits.view(resource, now)

    def admitted_times(self, resource: str) -> list[float]:
        """Admitted request times of one resource (the last 100k), oldest first."""
        return self.limits.admitted_times(resource)

    def refused_times(self, resource: str) -> list[float]:
        """When requests of one resource were refused over its limits (the last 100k)."""
        return self.limits.refused_times(resource)

    def transits_of(self, resource: str) -> list[Transit]:
        """Arrival, drawn delay, count time and verdict of one resource's API requests (the
        last 100k), in the order the limits counted them."""
        return self.transits.of(resource)

    # -- control -------------------------------------------------------------------------

    def set_faults(
        self, faults: Mapping[str, object] | None = None, /, **more: object
    ) -> dict[str, object]:
        """Merge faults (a mapping, keywords, or both) into the current ones."""
        self.faults.merge({**(faults or {}), **more})
        return self.faults.as_json()

    def clear_faults(self) -> None:
        self.faults = Faults()

    def set_limits(
        self, limits: Mapping[str, object] | None = None, /, **more: object
    ) -> dict[str, object]:
        """Change burst, interval_ms, daily and/or window; all checked before any is set."""
        limits = {**(limits or {}), **more}
        current: dict[str, object] = {
            "burst": self.config.burst,
            "interval_ms": self.config.interval_ms,
            "daily": self.config.daily,
            "window": self.config.window,
        }
        unknown = set(limits) - set(current)
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown limit")
        merged = current | limits
        check_limits(merged["burst"], merged["interval_ms"], merged["daily"], merged["window"])
        for name, value in limits.items():
            setattr(self.config, name, value)
        return merged

    def set_config(
        self, settings: Mapping[str, object] | None = None, /, **more: object
    ) -> dict[str, object]:
        """Change token lifetimes (applies to tokens issued from now on)."""
        settings = {**(settings or {}), **more}
        checked: dict[str, float] = {}
        for name, value in settings.items():
            if name not in _LIFETIMES:
                raise ValueError(f"{name}: unknown setting")
            checked[name] = check_lifetime(name, value)
        for name, seconds in checked.items():
            setattr(self.config, name, seconds)
        return {name: getattr(self.config, name) for name in _LIFETIMES}

    def expire_tokens(self, resource: str | None = None) -> int:
        """Expire the live access tokens of one resource, or of all; returns how many."""
        return self.tokens.expire(resource, self.now())

    def reset(self) -> None:
        """Clear counters, limit windows, transits and the fault dice; keep apps, tokens
        and faults."""
        self.counters = Stats()
        self.limits.clear()
        self.transits.clear()
        self.dice.reseed()

    def stats(self) -> dict[str, Any]:
        """The counters as ``GET /_sim/stats`` answers them (a copy)."""
        return self.counters.snapshot()


SIMULATOR: web.AppKey[Simulator] = web.AppKey("simulator", Simulator)
