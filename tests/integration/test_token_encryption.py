"""Tokens at rest: `store.encryption_key` seals access and refresh tokens in SQLite and
Redis, several keys can read and the first writes, and `tokens reencrypt` moves every
record to the first key without overwriting a concurrent refresh.

Every test runs against a real SQLite file or a real redis-server and reads what the
backend holds raw (sqlite3, a plain Redis client), never through the store under test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from proxy.config import StoreConfig, parse_config
from proxy.errors import ConfigError, TokenStoreUnavailable
from proxy.harness.processes import write_config
from proxy.harness.redis_server import RedisServer
from proxy.redis_client import open_redis
from proxy.tokens.redis import record_key
from proxy.tokens.sealing import Sealer, reencrypt
from proxy.tokens.store import TokenRecord
from proxy.tokens.stores import open_token_store
from tests.conftest import base_document, merged
from tests.support.leaks import leaked

ROOT = Path(__file__).resolve().parents[2]
APP = "6650f1a2b3c4d5e6f7a8b9c0"
KEY_A = Fernet.generate_key().decode()
KEY_B = Fernet.generate_key().decode()
KEY_ENV = "HOOPAI_PROXY_TEST_ENCRYPTION_KEY"
NOWHERE = "http://127.0.0.1:9"  # no command here calls the upstream


def token(id: str = "loc1", *, version: int = 1, **changes: Any) -> TokenRecord:
    """A record whose two tokens are long, distinctive, and unique to (id, version)."""
    record = TokenRecord(
        app=APP,
        kind="location",
        id=id,
        access_token=f"eyJhbGciOi.access-{id}-v{version}.c2lnbmF0dXJl",
        refresh_token=f"eyJhbGciOi.refresh-{id}-v{version}.c2lnbmF0dXJl",
        expires_at=1_767_225_600.5,
        refreshed_at=1_767_139_200.25,
        version=version,
    )
    return replace(record, **changes)


def tokens_of(records: Iterable[TokenRecord]) -> set[str]:
    return {t for r in records for t in (r.access_token, r.refresh_token) if t}


RECORDS = [
    token("loc1"),
    token("loc2", version=3),
    token("co1", kind="company", approved_locations=("loc1",)),
    token("minted", refresh_token=""),  # a minted Location token has no refresh token
]


@dataclass
class Backend:
    """One store backend: its store opened under a key, and its records read raw."""

    name: str
    sqlite_path: Path
    redis_url: str = ""

    def config(self, key: str) -> StoreConfig:
        return StoreConfig(
            sqlite_path=str(self.sqlite_path), redis_url=self.redis_url, encryption_key=key
        )

    @asynccontextmanager
    async def opened(self, key: str) -> AsyncIterator[Any]:
        """The store as the proxy opens it, with `store.encryption_key` set to `key`."""
        config = self.config(key)
        client = open_redis(config) if config.redis_url else None
        try:
            store = await open_token_store(config, client)
            try:
                yield store
            finally:
                await store.close()
        finally:
            if client is not None:
                await client.aclose()

    async def write(self, key: str, records: Iterable[TokenRecord]) -> None:
        async with self.opened(key) as store:
            for record in records:
                assert await store.compare_and_set(replace(record, version=1))
                for version in range(2, record.version + 1):
                    assert await store.compare_and_set(replace(record, version=version))

    async def raw(self) -> list[str]:
        """Every value of every token record, exactly as the backend holds it."""
        if self.redis_url:
            client = open_redis(StoreConfig(redis_url=self.redis_url))
            try:
                values = []
                async for name in client.scan_iter(match="hoopai:token:*"):
                    stored = await client.hgetall(name)
                    values += [text(v) for v in stored.values()]
                return values
            finally:
                await client.aclose()
        with sqlite3.connect(self.sqlite_path) as db:
            rows = db.execute("SELECT * FROM tokens").fetchall()
        db.close()
        return [str(value) for row in rows for value in row]

    def raw_bytes(self) -> bytes:
        """For SQLite, the database file and its WAL, byte for byte."""
        files = [self.sqlite_path, self.sqlite_path.with_name(self.sqlite_path.name + "-wal")]
        return b"".join(f.read_bytes() for f in files if f.exists())


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend, empty; the SQLite file is there in both (unused with Redis)."""
    path = tmp_path / "tokens.db"
    if request.param == "sqlite":
        return Backend("sqlite", path)
    server: RedisServer = request.getfixturevalue("redis_server")
    return Backend("redis", path, server.url)


async def read_all(store: Any, records: Iterable[TokenRecord]) -> list[TokenRecord | None]:
    return [await store.get(r.app, r.kind, r.id) for r in records]


def text(value: bytes | str | None) -> str:
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


def by_key(records: Iterable[TokenRecord]) -> list[TokenRecord]:
    return sorted(records, key=lambda r: r.key)


def no_secret_in(texts: Iterable[str]) -> list[str]:
    """The tokens and keys (shortened) found in any of the texts."""
    return leaked(texts, [*tokens_of(RECORDS), KEY_A, KEY_B])


# -- sealing in the store ---------------------------------------------------------------------


async def test_with_a_key_the_backend_holds_neither_token(backend: Backend) -> None:
    """With a key, the raw row / hash holds no access or refresh token, only sealed values,
    yet get and list return every record exactly as written."""
    await backend.write(KEY_A, RECORDS)

    raw = await backend.raw()
    assert leaked(raw, tokens_of(RECORDS)) == []
    if backend.name == "sqlite":
        assert leaked([backend.raw_bytes().decode("latin-1")], tokens_of(RECORDS)) == []
    assert sum(value.startswith("fernet:") for value in raw) == 2 * len(RECORDS)
    async with backend.opened(KEY_A) as store:
        assert await read_all(store, RECORDS) == RECORDS
        assert by_key(await store.list()) == by_key(RECORDS)
        installed = await store.replace(token("loc1", access_token="eyJhbGciOi.reinstalled"))
        assert await store.get(APP, "location", "loc1") == installed
    assert "eyJhbGciOi.reinstalled" not in "\n".join(await backend.raw())


async def test_records_written_under_an_old_key_are_read_with_it_second(
    backend: Backend,
) -> None:
    """Written under A: "B,A" reads them (and writes new ones under B); "B" alone cannot
    read the old ones."""
    await backend.write(KEY_A, RECORDS)

    async with backend.opened(f"{KEY_B}, {KEY_A}") as store:
        assert await read_all(store, RECORDS) == RECORDS
        assert await store.compare_and_set(token("loc1", version=2))
    async with backend.opened(KEY_B) as store:
        assert await store.get(APP, "location", "loc1") == token("loc1", version=2)
        with pytest.raises(TokenStoreUnavailable):
            await store.get(APP, "location", "loc2")


async def test_reencrypt_moves_every_record_to_the_first_key(backend: Backend) -> None:
    """After reencrypt under "B,A", "B" alone reads every record and A reads none; versions
    are unchanged, and a second run rewrites nothing."""
    await backend.write(KEY_A, RECORDS)
    before = await backend.raw()

    async with backend.opened(f"{KEY_B},{KEY_A}") as store:
        assert await reencrypt(store) == (len(RECORDS), len(RECORDS))
        assert await reencrypt(store) == (0, len(RECORDS))

    assert set(await backend.raw()).isdisjoint(v for v in before if v.startswith("fernet:"))
    async with backend.opened(KEY_B) as store:
        assert await read_all(store, RECORDS) == RECORDS
    async with backend.opened(KEY_A) as store:
        for record in RECORDS:
            with pytest.raises(TokenStoreUnavailable):
                await store.get(record.app, record.kind, record.id)


async def test_clear_records_are_read_with_a_key_and_sealed_by_reencrypt(
    backend: Backend,
) -> None:
    """Records written before any key was set stay readable once one is; reencrypt seals
    them, after which the backend holds no token and a store with no key cannot read."""
    await backend.write("", RECORDS)
    assert leaked(await backend.raw(), tokens_of(RECORDS)) != []  # in clear, as written

    async with backend.opened(KEY_A) as store:
        assert await read_all(store, RECORDS) == RECORDS
        assert await reencrypt(store) == (len(RECORDS), len(RECORDS))
        assert await read_all(store, RECORDS) == RECORDS

    assert leaked(await backend.raw(), tokens_of(RECORDS)) == []
    async with backend.opened("") as store:
        with pytest.raises(TokenStoreUnavailable, match=r"store\.encryption_key"):
            await store.list()


@pytest.mark.parametrize("reader_key", ["other", "none"])
async def test_a_key_that_cannot_open_a_record_is_unavailable_naming_the_key(
    backend: Backend, reader_key: str
) -> None:
    """A sealed record read with a wrong key, or with none: TokenStoreUnavailable whose
    message names store.encryption_key and holds no token and no key."""
    await backend.write(KEY_A, RECORDS)
    key = KEY_B if reader_key == "other" else ""

    async with backend.opened(key) as store:
        for read in (lambda: store.get(APP, "location", "loc1"), store.list):
            with pytest.raises(TokenStoreUnavailable) as raised:
                await read()
            assert "store.encryption_key" in raised.value.message
            assert no_secret_in([str(raised.value), raised.value.message]) == []


async def test_reencrypt_never_overwrites_a_concurrent_refresh(backend: Backend) -> None:
    """Refreshes racing reencrypt all succeed by compare-and-set (reencrypt keeps the
    version), and every record ends as its refresher wrote it, readable by "B" alone."""
    records = [token(f"loc{n}") for n in range(100)]
    await backend.write(KEY_A, records)

    async with backend.opened(f"{KEY_B},{KEY_A}") as store:

        async def refresh_all() -> list[bool]:
            results = []
            for record in records:
                for version in (2, 3):
                    results.append(await store.compare_and_set(token(record.id, version=version)))
            return results

        resealed, refreshed = await asyncio.gather(reencrypt(store), refresh_all())

    assert all(refreshed)
    assert resealed[1] == len(records)
    async with backend.opened(KEY_B) as store:
        assert await read_all(store, records) == [token(r.id, version=3) for r in records]


async def test_redis_reseal_script_refuses_a_read_older_than_the_record(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The Redis script that rewrites a record in place does so only if its version and both
    stored tokens are still those reencrypt read: a refresh made after the read, or a
    delete and re-install back at version 1, is never overwritten."""
    backend = Backend("redis", tmp_path / "unused.db", redis_server.url)
    await backend.write(KEY_A, [token("loc1")])
    sealer = Sealer.from_config(f"{KEY_B},{KEY_A}")
    script = resources.files("proxy.tokens").joinpath("lua", "reseal.lua").read_text()
    key = record_key(token("loc1").tag)
    client = open_redis(StoreConfig(redis_url=redis_server.url))

    async def read() -> list[str]:
        found = await client.hmget(key, ["version", "access_token", "refresh_token"])
        return [text(value) for value in found]

    async def reseal(seen: list[str]) -> int:
        again = [sealer.reseal(value, "loc1") for value in seen[1:]]
        done = await client.eval(script, 1, key, *seen, *again)
        return int(done)

    try:
        async with backend.opened(f"{KEY_B},{KEY_A}") as store:
            first_read = await read()
            assert await store.compare_and_set(token("loc1", version=2))  # a refresh
            assert await reseal(first_read) == 0
            assert await store.get(APP, "location", "loc1") == token("loc1", version=2)

            assert await store.delete(APP, "location", "loc1")
            reinstalled = token("loc1", access_token="eyJhbGciOi.reinstalled")
            assert await store.compare_and_set(reinstalled)  # version 1 again
            assert await reseal(first_read) == 0
            assert await store.get(APP, "location", "loc1") == reinstalled

            current = await read()
            assert await reseal(current) == 1
            assert await read() != current
            assert await store.get(APP, "location", "loc1") == reinstalled
    finally:
        await client.aclose()


# -- the key, checked ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-fernet-key",
        f"{KEY_A},",
        f"{KEY_A},{KEY_B[:-4]}",
        KEY_A[:43] + "!",
    ],
    ids=["not-base64", "trailing-comma", "second-truncated", "bad-character"],  # never a key
)
async def test_a_malformed_key_is_a_config_error_that_does_not_echo_it(
    tmp_path: Path, bad: str
) -> None:
    """A key that is not a Fernet key (or an empty entry in the list) is refused when the
    store opens, as a ConfigError naming store.encryption_key and not echoing the value."""
    config = StoreConfig(sqlite_path=str(tmp_path / "tokens.db"), encryption_key=bad)

    with pytest.raises(ConfigError) as raised:
        await open_token_store(config, None)

    assert raised.value.key == "store.encryption_key"
    for part in bad.split(","):
        if part:
            assert part not in str(raised.value)


async def test_without_a_key_the_store_warns_once_when_it_opens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No key: exactly one warning, naming store.encryption_key, when the store opens and
    none when it is used; with a key, no warning."""
    caplog.set_level(logging.WARNING)
    clear = Backend("sqlite", tmp_path / "clear.db")
    async with clear.opened("") as store:
        await store.replace(token())
        await store.get(APP, "location", "loc1")
        await store.list()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "store.encryption_key" in warnings[0].getMessage()

    caplog.clear()
    async with Backend("sqlite", tmp_path / "sealed.db").opened(KEY_A) as store:
        await store.replace(token())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_proxy_started_without_a_key_warns_once(
    simulator: Any, start_proxy: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy started with no store.encryption_key logs the one warning at start; one
    started with a key logs none about it."""
    caplog.set_level(logging.WARNING)
    await start_proxy(simulator.url)
    about_key = [r for r in caplog.records if "store.encryption_key" in r.getMessage()]
    assert [r.levelno for r in about_key] == [logging.WARNING]

    caplog.clear()
    await start_proxy(
        simulator.url, store={"encryption_key": KEY_A, "sqlite_path": str(tmp_path / "sealed.db")}
    )
    assert [r for r in caplog.records if "store.encryption_key" in r.getMessage()] == []


# -- the command ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def hoopai_proxy(*args: str, key: str | None) -> Run:
    """`hoopai-proxy ARGS` as a process; the key (if any) only in its environment."""
    environ = {k: v for k, v in os.environ.items() if k not in ("HOOPAI_PROXY_CONFIG", KEY_ENV)}
    if key is not None:
        environ[KEY_ENV] = key
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=environ,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def config_file(backend: Backend, tmp_path: Path) -> Path:
    """A config whose key comes from the environment, as an operator would set it."""
    store = {"sqlite_path": str(backend.sqlite_path), "encryption_key": f"${{{KEY_ENV}:-}}"}
    if backend.redis_url:
        store["redis_url"] = backend.redis_url
    document = merged(base_document(NOWHERE), {"store": store})
    assert parse_config(document, {KEY_ENV: KEY_A}).store.encryption_key == KEY_A
    return write_config(tmp_path / "proxy.yaml", document)


@pytest.mark.slow
async def test_tokens_reencrypt_command_rewrites_and_prints_only_counts(
    backend: Backend, tmp_path: Path
) -> None:
    """`tokens reencrypt` with "B,A" rewrites every record, says how many, and prints no
    token or key; then "B" alone reads them all; a second run rewrites none."""
    await backend.write(KEY_A, RECORDS)
    config = config_file(backend, tmp_path)

    first = await hoopai_proxy(
        "tokens", "reencrypt", "--config", str(config), key=f"{KEY_B},{KEY_A}"
    )
    again = await hoopai_proxy("tokens", "reencrypt", "--config", str(config), key=KEY_B)

    assert first.code == 0, first.err
    assert first.out.startswith(f"rewrote {len(RECORDS)} of {len(RECORDS)} token records")
    assert again.code == 0, again.err
    assert again.out.startswith(f"rewrote 0 of {len(RECORDS)} token records")
    assert no_secret_in([first.out, first.err, again.out, again.err]) == []
    async with backend.opened(KEY_B) as store:
        assert await read_all(store, RECORDS) == RECORDS


@pytest.mark.slow
async def test_tokens_reencrypt_refusals_name_the_key_and_leak_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    """No key: exit 2. A key that cannot open the records: exit 1, nothing rewritten. A
    malformed key: exit 2. Each ends with one line of the command naming
    store.encryption_key, and no output holds a token or a key."""
    await backend.write(KEY_A, RECORDS)
    config = config_file(backend, tmp_path)
    before = await backend.raw()
    args = ("tokens", "reencrypt", "--config", str(config))

    unset = await hoopai_proxy(*args, key=None)
    wrong = await hoopai_proxy(*args, key=KEY_B)
    malformed = await hoopai_proxy(*args, key=KEY_B[:20])

    assert (unset.code, wrong.code, malformed.code) == (2, 1, 2)
    for run in (unset, malformed):
        assert len(run.err.strip().splitlines()) == 1, run.err
        assert run.err.startswith("hoopai-proxy: config error: store.encryption_key: ")
    last = wrong.err.strip().splitlines()[-1]
    assert last.startswith("hoopai-proxy tokens reencrypt: ") and "store.encryption_key" in last
    assert [run.out for run in (unset, wrong, malformed)] == ["", "", ""]
    assert KEY_B[:20] not in malformed.err
    assert no_secret_in([r.out + r.err for r in (unset, wrong, malformed)]) == []
    assert sorted(await backend.raw()) == sorted(before)


@pytest.mark.slow
async def test_serve_with_a_malformed_key_exits_2_without_echoing_it(tmp_path: Path) -> None:
    """`serve` with a key that is not a Fernet key stops at start with exit 2 and a config
    error naming store.encryption_key that does not contain the value."""
    config = config_file(Backend("sqlite", tmp_path / "tokens.db"), tmp_path)

    run = await hoopai_proxy("serve", "--config", str(config), key="zzzz-not-a-key-zzzz")

    assert run.code == 2, run.err
    assert "store.encryption_key" in run.err
    assert "zzzz-not-a-key-zzzz" not in run.out + run.err
