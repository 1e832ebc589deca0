"""The gateway workload: 2,000 Locations (sub-accounts), each with its own HighLevel token
(a JWT whose claims name its Location), and the requests wrk rotates over.

Two shapes of the same request, `GET /contacts/?locationId=...`:
- pass-through: the caller sends the Location's own token (`Authorization: Bearer`); the
  proxy reads the Location from the token's claims and sends the token on as it is;
- managed: the proxy holds the tokens; the caller sends only its caller key and names
  the Location in the query.
Both carry the caller key (the proxy runs as a gateway, with caller keys configured) and
the `Version` header HighLevel's SDKs send. nginx and the bare forwarder get the
pass-through shape. Tokens and the key go to files in the run's temp dir, never to output.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.harness.tokens import location_jwt

Mode = Literal["passthrough", "managed"]
MODES: tuple[Mode, ...] = ("passthrough", "managed")
LOCATIONS = 2_000
API_VERSION = "2021-07-28"
KEY_HEADER = "X-HoopAI-Proxy-Key"


def location_ids(count: int = LOCATIONS) -> tuple[str, ...]:
    """`count` Location ids shaped like HighLevel's (20 letters and digits), stable per n."""
    return tuple(
        f"Loc{n:05d}" + hashlib.sha256(str(n).encode()).hexdigest()[:12] for n in range(count)
    )


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class Workload:
    """The Locations, their tokens and the caller key, for one run."""

    locations: tuple[str, ...] = field(default_factory=location_ids)
    caller_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @property
    def caller_key_sha256(self) -> str:
        return hashlib.sha256(self.caller_key.encode()).hexdigest()

    def token(self, location: str) -> str:
        return location_jwt(location)

    def requests(self, mode: Mode) -> list[Request]:
        """One request per Location, in rotation order."""
        return [self._request(location, mode) for location in self.locations]

    def _request(self, location: str, mode: Mode) -> Request:
        headers = {
            KEY_HEADER: self.caller_key,
            "Version": API_VERSION,
            "Accept": "application/json",
        }
        if mode == "passthrough":
            headers["Authorization"] = f"Bearer {self.token(location)}"
        return Request(f"/contacts/?locationId={location}", headers)

    def write(self, directory: Path) -> dict[Mode, Path]:
        """The requests of each mode as wrk's Lua script reads them: one line each, the
        path then `Name: value` headers, tab-separated. Readable by this user only."""
        files: dict[Mode, Path] = {}
        for mode in MODES:
            path = directory / f"requests-{mode}.tsv"
            path.touch(mode=0o600)
            lines = (
                "\t".join([request.path, *(f"{k}: {v}" for k, v in request.headers.items())])
                for request in self.requests(mode)
            )
            path.write_text("\n".join(lines) + "\n")
            files[mode] = path
        return files
