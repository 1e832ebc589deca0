"""The embedded token store: one SQLite file (WAL, synchronous=FULL) only its owner reads.

Several `serve --workers` processes share the file, so every write that must not
interleave with another (compare-and-set, replace, locks, claims) runs in one
`BEGIN IMMEDIATE` transaction: SQLite's file lock makes it atomic across processes, and
the busy timeout makes a second process wait for it instead of failing. sqlite3 blocks, so
each call runs in a worker thread, on the store's one connection, one call at a time.

The store migrates its own schema with `PRAGMA user_version`: MIGRATIONS[n] takes a file
from version n to n + 1, so a later version appends a step.

Company records are indexed by the locations they approve: a row of `approvals` per
(app, approved location, company), written in the transaction that writes the record, and
a partial index on the Companies that approve none. Minting a Location token reads those,
never the whole table. Schema 2 added them, filled from the records already there.

The two tokens of a record are stored sealed by the store's `Sealer` (in clear without a
key); everything else stays plain. SQLite and file errors are translated here, at one
boundary, into `TokenStoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from proxy.errors import TokenStoreUnavailable
from proxy.tokens.sealing import Sealer
from proxy.tokens.store import TokenRecord
from proxy.typing import resource_kind, token_status

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

BUSY_TIMEOUT_S = 10.0  # longer than any one transaction of another process takes
PRIVATE = 0o600  # the file holds refresh tokens: its owner's alone
SIDECARS = ("-wal", "-shm", "-journal")

# Literal, not bound: SQLite uses a partial index only for a query that repeats its terms.
NO_LOCATIONS = "[]"  # approved_locations as stored when it lists none
OPEN_COMPANY = f"kind = 'company' AND approved_locations = '{NO_LOCATIONS}'"

MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE tokens (
            app TEXT NOT NULL,
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            access_token TEXT NOT NULL,
            refresh_token TEXT NOT NULL,
            expires_at REAL NOT NULL,
            refreshed_at REAL NOT NULL,
            scope TEXT NOT NULL,
            user_type TEXT NOT NULL,
            company_id TEXT NOT NULL,
            location_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            approved_locations TEXT NOT NULL,
            version INTEGER NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY (app, kind, id)
        )""",
        "CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL)",
        "CREATE TABLE claims (name TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
    ),
    (
        """CREATE TABLE approvals (
            app TEXT NOT NULL,
            location_id TEXT NOT NULL,
            company_id TEXT NOT NULL,
            PRIMARY KEY (app, location_id, company_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX approvals_by_company ON approvals (app, company_id)",
        f"CREATE INDEX open_companies ON tokens (app, id) WHERE {OPEN_COMPANY}",
        """INSERT OR IGNORE INTO approvals (app, location_id, company_id)
            SELECT tokens.app, approved.value, tokens.id
            FROM tokens, json_each(tokens.approved_locations) AS approved
            WHERE tokens.kind = 'company'""",
    ),
]

FIELDS = (
    "app",
    "kind",
    "id",
    "access_token",
    "refresh_token",
    "expires_at",
    "refreshed_at",
    "scope",
    "user_type",
    "company_id",
    "location_id",
    "user_id",
    "approved_locations",
    "version",
    "status",
)
COLUMNS = ", ".join(FIELDS)
PLACEHOLDERS = ", ".join("?" for _ in FIELDS)
WHERE_KEY = "WHERE app = ? AND kind = ? AND id = ?"
# One statement, so one snapshot: a Company rewritten meanwhile is found once or not at all.
# Without statistics the planner would walk every Company of the app for the second part.
COMPANIES_APPROVING = f"""
    SELECT 0 AS listed_last, {COLUMNS} FROM tokens
    WHERE app = ? AND kind = 'company' AND id IN
        (SELECT company_id FROM approvals WHERE app = ? AND location_id = ?)
    UNION ALL
    SELECT 1 AS listed_last, {COLUMNS} FROM tokens INDEXED BY open_companies
    WHERE app = ? AND {OPEN_COMPANY}
    ORDER BY listed_last, id"""


class SqliteTokenStore:
    """Token records in one SQLite file, shared by every process on this host that opens it.

    Build it with `await SqliteTokenStore.open(path)`: opening creates and migrates the
    file, which blocks, so it happens in a worker thread too.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        sealer: Sealer | None = None,
    ) -> None:
        """`clock` (epoch seconds) times locks and claims; every process must agree on it.
        `sealer` seals the tokens at rest (default: none, tokens in clear)."""
        self.path = Path(path)
        self._clock = clock
        self._sealer = sealer or Sealer()
        self._lock = threading.Lock()  # one call at a time on the one connection
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        sealer: Sealer | None = None,
    ) -> SqliteTokenStore:
        """The store at `path`, its file (and folder) created and its schema migrated."""
        store = cls(path, clock=clock, sealer=sealer)
        await store._run(store._connect)
        return store

    async def get(self, app: str, kind: str, id: str) -> TokenRecord | None:
        return await self._run(self._get, app, kind, id)

    async def compare_and_set(self, record: TokenRecord) -> bool:
        return await self._run(self._compare_and_set, record)

    async def replace(self, record: TokenRecord) -> TokenRecord:
        return await self._run(self._replace, record)

    async def delete(self, app: str, kind: str, id: str) -> bool:
        return await self._run(self._delete, app, kind, id)

    async def list(self) -> list[TokenRecord]:
        return await self._run(self._list)

    async def companies_approving(self, app: str, location_id: str) -> builtins.list[TokenRecord]:
        return await self._run(self._companies_approving, app, location_id)

    async def reseal(self, app: str, kind: str, id: str) -> bool:
        """Seal the record's tokens with the first key, keeping its version, unless they
        are already; True if rewritten (one transaction: no write can come between)."""
        return await self._run(self._reseal, app, kind, id)

    async def acquire_lock(self, name: str, ttl_s: float) -> str | None:
        return await self._run(self._acquire_lock, name, _positive(ttl_s))

    async def release_lock(self, name: str, owner: str) -> bool:
        return await self._run(self._release_lock, name, owner)

    async def claim_once(self, name: str, ttl_s: float) -> bool:
        return await self._run(self._claim_once, name, _positive(ttl_s))

    async def claimed(self, name: str) -> bool:
        return await self._run(self._claimed, name)

    async def close(self) -> None:
        await self._run(self._close)

    async def _run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await asyncio.to_thread(self._serialized, partial(call, *args, **kwargs))
        except (sqlite3.Error, OSError) as exc:
            logger.warning("SQLite token store error: %s: %s", type(exc).__name__, exc)
            raise TokenStoreUnavailable(
                f"SQLite token store unavailable: {type(exc).__name__}"
            ) from exc

    def _serialized(self, call: Callable[[], T]) -> T:
        # A threading lock, not an asyncio one: a cancelled caller does not stop its
        # thread, which must keep the connection until it is done.
        with self._lock:
            return call()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite token store is not open (use SqliteTokenStore.open)")
        return self._db

    # Everything below runs in a worker thread, holding self._lock.

    def _connect(self) -> None:
        if self._db is not None:
            return
        _create_private(self.path)
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        ready = False
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode!r}, not 'wal'")
            db.execute("PRAGMA synchronous = FULL")
            _migrate(db)
            ready = True
        finally:
            if not ready:
                db.close()
        _tighten_sidecars(self.path)
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _get(self, app: str, kind: str, id: str) -> TokenRecord | None:
        row = self._conn.execute(f"SELECT {COLUMNS} FROM tokens {WHERE_KEY}", (app, kind, id))
        found = row.fetchone()
        return None if found is None else self._sealer.open_record(_decode(found))

    def _compare_and_set(self, record: TokenRecord) -> bool:
        with _immediate(self._conn) as db:
            version, approved = _stored(db, record)
            if version != record.version - 1:
                return False
            _write(db, self._sealer.seal_record(record), approved)
            return True

    def _replace(self, record: TokenRecord) -> TokenRecord:
        with _immediate(self._conn) as db:
            version, approved = _stored(db, record)
            stored = replace(record, version=version + 1)
            _write(db, self._sealer.seal_record(stored), approved)
            return stored

    def _delete(self, app: str, kind: str, id: str) -> bool:
        with _immediate(self._conn) as db:
            deleted = db.execute(f"DELETE FROM tokens {WHERE_KEY}", (app, kind, id))
            if kind == "company":
                db.execute("DELETE FROM approvals WHERE app = ? AND company_id = ?", (app, id))
            return deleted.rowcount == 1

    def _list(self) -> builtins.list[TokenRecord]:
        rows = self._conn.execute(f"SELECT {COLUMNS} FROM tokens")
        return [self._sealer.open_record(_decode(row)) for row in rows]

    def _companies_approving(self, app: str, location_id: str) -> builtins.list[TokenRecord]:
        rows = self._conn.execute(COMPANIES_APPROVING, (app, app, location_id, app))
        return [self._sealer.open_record(_decode(row[1:])) for row in rows]

    def _reseal(self, app: str, kind: str, id: str) -> bool:
        key, tag = (app, kind, id), f"{app}:{kind}:{id}"
        with _immediate(self._conn) as db:
            found = db.execute(
                f"SELECT access_token, refresh_token FROM tokens {WHERE_KEY}", key
            ).fetchone()
            if found is None or all(self._sealer.is_current(value) for value in found):
                return False
            access, refresh = (self._sealer.reseal(value, tag) for value in found)
            db.execute(
                f"UPDATE tokens SET access_token = ?, refresh_token = ? {WHERE_KEY}",
                (access, refresh, *key),
            )
            return True

    def _acquire_lock(self, name: str, ttl_s: float) -> str | None:
        owner, now = secrets.token_hex(16), self._clock()
        with _immediate(self._conn) as db:
            db.execute("DELETE FROM locks WHERE expires_at <= ?", (now,))
            taken = db.execute(
                "INSERT OR IGNORE INTO locks (name, owner, expires_at) VALUES (?, ?, ?)",
                (name, owner, now + ttl_s),
            )
            return owner if taken.rowcount == 1 else None

    def _release_lock(self, name: str, owner: str) -> bool:
        # An expired lock is no longer its owner's, as in Redis, where it would be gone.
        released = self._conn.execute(
            "DELETE FROM locks WHERE name = ? AND owner = ? AND expires_at > ?",
            (name, owner, self._clock()),
        )
        return released.rowcount == 1

    def _claim_once(self, name: str, ttl_s: float) -> bool:
        now = self._clock()
        with _immediate(self._conn) as db:
            db.execute("DELETE FROM claims WHERE expires_at <= ?", (now,))
            claimed = db.execute(
                "INSERT OR IGNORE INTO claims (name, expires_at) VALUES (?, ?)",
                (name, now + ttl_s),
            )
            return claimed.rowcount == 1

    def _claimed(self, name: str) -> bool:
        found = self._conn.execute(
            "SELECT 1 FROM claims WHERE name = ? AND expires_at > ?", (name, self._clock())
        ).fetchone()
        return found is not None


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once: no other process writes until it ends."""
    db.execute("BEGIN IMMEDIATE")
    committed = False
    try:
        yield db
        db.execute("COMMIT")
        committed = True
    finally:
        # Whatever interrupted the transaction (cancellation included) undoes it.
        if not committed and db.in_transaction:
            db.execute("ROLLBACK")


def _migrate(db: sqlite3.Connection) -> None:
    with _immediate(db):
        current: int = db.execute("PRAGMA user_version").fetchone()[0]
        if current > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {current} is newer than this hoopai-proxy's {len(MIGRATIONS)}"
            )
        for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in step:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version:d}")


def _create_private(path: Path) -> None:
    """Create the file with mode 0600 before SQLite does (it would use 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE)
    try:
        # os.open's mode passes through the umask, and an existing file may be looser.
        os.fchmod(fd, PRIVATE)
    finally:
        os.close(fd)


def _tighten_sidecars(path: Path) -> None:
    """SQLite gives new -wal/-shm files the database's mode; ones left from before may
    be looser."""
    for suffix in SIDECARS:
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            os.chmod(sidecar, PRIVATE)


def _stored(db: sqlite3.Connection, record: TokenRecord) -> tuple[int, str | None]:
    """The stored version of `record`'s key (0 if none) and its approved_locations as
    stored (None if none)."""
    found = db.execute(
        f"SELECT version, approved_locations FROM tokens {WHERE_KEY}",
        (record.app, record.kind, record.id),
    ).fetchone()
    return (0, None) if found is None else (int(found[0]), str(found[1]))


def _write(db: sqlite3.Connection, record: TokenRecord, approved_before: str | None) -> None:
    """Write the record and, for a Company whose approvals changed, its `approvals` rows,
    inside the caller's transaction."""
    approved = json.dumps(list(record.approved_locations))
    db.execute(
        f"INSERT OR REPLACE INTO tokens ({COLUMNS}) VALUES ({PLACEHOLDERS})",
        (
            record.app,
            record.kind,
            record.id,
            record.access_token,
            record.refresh_token,
            record.expires_at,
            record.refreshed_at,
            record.scope,
            record.user_type,
            record.company_id,
            record.location_id,
            record.user_id,
            approved,
            record.version,
            record.status,
        ),
    )
    if record.kind != "company" or approved == approved_before:
        return
    db.execute("DELETE FROM approvals WHERE app = ? AND company_id = ?", (record.app, record.id))
    db.executemany(
        "INSERT OR IGNORE INTO approvals (app, location_id, company_id) VALUES (?, ?, ?)",
        ((record.app, location, record.id) for location in record.approved_locations),
    )


def _decode(row: Sequence[Any]) -> TokenRecord:
    (
        app,
        kind,
        id,
        access,
        refresh,
        expires,
        refreshed,
        scope,
        user_type,
        company,
        location,
        user,
        approved,
        version,
        status,
    ) = row
    return TokenRecord(
        app=app,
        kind=resource_kind(kind),
        id=id,
        access_token=access,
        refresh_token=refresh,
        expires_at=float(expires),
        refreshed_at=float(refreshed),
        scope=scope,
        user_type=user_type,
        company_id=company,
        location_id=location,
        user_id=user,
        approved_locations=tuple(json.loads(approved)),
        version=int(version),
        status=token_status(status),
    )


def _positive(ttl_s: float) -> float:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
    return ttl_s
