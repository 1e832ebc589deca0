"""Counters the simulator keeps, globally and per resource, and their JSON snapshot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ResourceStats:
    """Counters of one ``<appid>:<kind>:<id>`` resource."""

    requests: int = 0
    admitted: int = 0
    rate_limited: int = 0
    refreshes: int = 0
    max_in_window: int = 0


@dataclass
class Stats:
    """Everything counted since start or the last reset.

    ``requests`` counts every request that reached the fake API: the generic endpoint and
    the ``/_sim/`` probes (echo, download, slow, headers), not OAuth or control calls;
    ``probe_requests`` is the probes' share and ``requests_by_method`` splits ``requests``
    by HTTP method. ``dropped`` counts the connections the ``drop_ratio`` fault closed
    without an answer (each one also counted in ``requests``), ``dropped_by_method`` the
    same by method. ``rate_limited`` counts every 429 the generic endpoint answered,
    ``forced_429`` the subset forced by the fault.
    ``location_token_requests`` counts every call to ``/oauth/locationToken``, refused or
    not; ``location_tokens_minted`` the ones that handed out a token.
    ``installed_locations_requests`` counts every call to ``/oauth/installedLocations``;
    ``oauth_errors`` the calls to ``/oauth/*`` the ``oauth_errors`` fault answered 5xx.
    ``token_requests`` counts every call to ``/oauth/token`` once its form has arrived,
    before any accept delay (a test can kill a client whose call is surely received).
    ``oauth_in_flight`` is how many calls to ``/oauth/token`` and ``/oauth/locationToken``
    are being answered now (arrived, answer not yet returned), ``max_oauth_in_flight`` the
    most at any moment: what a client's cap on concurrent token calls is checked against.
    """

    requests: int = 0
    probe_requests: int = 0
    requests_by_method: dict[str, int] = field(default_factory=dict)
    admitted: int = 0
    rate_limited: int = 0
    forced_429: int = 0
    refreshes: int = 0
    dead_refresh_token_uses: int = 0
    unknown_refresh_tokens: int = 0
    inactive_location_refusals: int = 0
    invalid_jwt: int = 0
    missing_version: int = 0
    codes_exchanged: int = 0
    invalid_codes: int = 0
    location_token_requests: int = 0
    location_tokens_minted: int = 0
    token_requests: int = 0
    installed_locations_requests: int = 0
    oauth_errors: int = 0
    oauth_in_flight: int = 0
    max_oauth_in_flight: int = 0
    dropped: int = 0
    dropped_by_method: dict[str, int] = field(default_factory=dict)
    faults_5xx: int = 0
    command_timeouts: int = 0
    per_resource: dict[str, ResourceStats] = field(default_factory=dict)

    def arrived(self, method: str, *, probe: bool = False) -> None:
        """Count one request that reached the fake API (``probe``: a ``/_sim/`` probe)."""
        self.requests += 1
        if probe:
            self.probe_requests += 1
        self.requests_by_method[method] = self.requests_by_method.get(method, 0) + 1

    def dropped_one(self, method: str) -> None:
        """Count one connection closed by the ``drop_ratio`` fault."""
        self.dropped += 1
        self.dropped_by_method[method] = self.dropped_by_method.get(method, 0) + 1

    def resource(self, key: str) -> ResourceStats:
        """The counters of one resource, created on first use."""
        return self.per_resource.setdefault(key, ResourceStats())

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy, safe to keep while counting goes on."""
        return asdict(self)
