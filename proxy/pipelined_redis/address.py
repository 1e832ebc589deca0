"""Where one Redis server is and how to log in to it, read from a `redis_url`.

The URL forms are redis-py's (`redis_client` reads the same `store.redis_url`):
`redis://[user:password@]host[:port][/db]`, `rediss://...` for TLS, and
`unix://[user:password@]/path/to/redis.sock[?db=N]`. TLS verifies the server with the
system's default CA store (`ssl.create_default_context`); redis-py's `ssl_*` query options
are not read. A wrong URL is a `ValueError` that names the part, never the password.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class Address:
    """One server: a TCP `host:port` (with `tls` for rediss://) or a unix socket `path`."""

    host: str = "localhost"
    port: int = DEFAULT_PORT
    path: str = ""
    tls: bool = False
    username: str = ""
    password: str = field(default="", repr=False)
    db: int = 0

    def at(self, host: str, port: int) -> Address:
        """Another node of the same cluster: same credentials and TLS, its own host:port."""
        return replace(self, host=host, port=port, path="")

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context() if self.tls else None

    def __str__(self) -> str:
        # What error messages and logs name: never the credentials.
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def parse_url(url: str) -> Address:
    """The `Address` a redis://, rediss:// or unix:// URL names."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"a Redis URL starts with redis://, rediss:// or unix://, got {parts.scheme!r}"
        )
    db_values = parse_qs(parts.query).get("db", [])
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs the socket's path")
        db = _db(db_values[0] if db_values else "0")
        return Address(path=parts.path, username=username, password=password, db=db)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:  # urlsplit checks the port only when asked for it
        raise ValueError(f"the Redis URL's port is not a port number: {exc}") from exc
    path_db = parts.path.lstrip("/")
    db = _db(path_db or (db_values[0] if db_values else "0"))
    return Address(
        host=parts.hostname or "localhost",
        port=port,
        tls=parts.scheme == "rediss",
        username=username,
        password=password,
        db=db,
    )


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"the Redis URL's database must be a number, got {text[:20]!r}")
    return int(text)
