"""The token store's behaviour, held the same on every backend (SQLite, Redis).

One test body runs against each store; what only one backend promises (the SQLite file's
mode and pragmas, a lock held across processes; Redis's key layout, its outage answer, a
3-master cluster) is tested against that backend alone. Lock and claim expiry is real Redis TTL
and wall-clock time, so those few tests sleep a fraction of a second.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as ClusterClient
from redis.crc import key_slot

from proxy.config import StoreConfig
from proxy.errors import TokenStoreUnavailable
from proxy.harness.redis_cluster import RedisCluster
from proxy.harness.redis_server import RedisServer
from proxy.limiter.redis import redis_keys
from proxy.redis_client import open_redis
from proxy.tokens.redis import RedisTokenStore
from proxy.tokens.sqlite import MIGRATIONS, SqliteTokenStore
from proxy.tokens.store import NEEDS_REAUTH, TokenRecord, TokenStore
from tests.support.limiters import TODAY

ROOT = Path(__file__).resolve().parents[2]
APP = "6650f1a2b3c4d5e6f7a8b9c0"
SHORT_TTL_S = 0.2
PAST_SHORT_TTL_S = 0.35


def token(
    id: str = "loc1", *, version: int = 1, kind: str = "location", **changes: object
) -> TokenRecord:
    """A record with every required field set; `changes` override any field."""
    record = TokenRecord(
        app=APP,
        kind=kind,
        id=id,
        access_token=f"access-{id}-{version}",
        refresh_token=f"refresh-{id}-{version}",
        expires_at=1_767_225_600.5,
        refreshed_at=1_767_139_200.25,
        version=version,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


# -- every backend ----------------------------------------------------------------------------


async def test_get_of_a_missing_record_is_none(store: TokenStore) -> None:
    """Nothing stored: get answers None, list is empty."""
    assert await store.get(APP, "location", "nowhere") is None
    assert await store.list() == []


async def test_a_new_record_is_stored_only_as_version_1(store: TokenStore) -> None:
    """On an empty store a compare-and-set of version 2 fails; version 1 succeeds."""
    assert not await store.compare_and_set(token(version=2))
    assert await store.get(APP, "location", "loc1") is None
    assert await store.compare_and_set(token(version=1))
    assert await store.get(APP, "location", "loc1") == token(version=1)


async def test_compare_and_set_needs_the_version_it_replaces(store: TokenStore) -> None:
    """Only version stored + 1 replaces a record; a stale or skipping writer is refused."""
    assert await store.compare_and_set(token(version=1))
    assert not await store.compare_and_set(token(version=1, access_token="stale"))
    assert not await store.compare_and_set(token(version=3))
    assert await store.compare_and_set(token(version=2))
    assert await store.get(APP, "location", "loc1") == token(version=2)


@pytest.mark.parametrize("version", [1, 2])
async def test_of_concurrent_writers_of_one_version_exactly_one_wins(
    store: TokenStore, version: int
) -> None:
    """20 concurrent compare-and-sets with the same version: one succeeds, and its record
    is the one stored."""
    if version > 1:
        assert await store.compare_and_set(token(version=version - 1))
    writers = [token(version=version, access_token=f"writer-{n}") for n in range(20)]
    results = await asyncio.gather(*(store.compare_and_set(w) for w in writers))
    assert results.count(True) == 1
    assert await store.get(APP, "location", "loc1") == writers[results.index(True)]


async def test_replace_stores_one_version_past_whatever_is_stored(store: TokenStore) -> None:
    """replace ignores the record's version: 1 on an empty store, then stored + 1."""
    installed = token(version=7)
    first = await store.replace(installed)
    assert first == replace(installed, version=1)
    assert await store.get(APP, "location", "loc1") == first
    second = await store.replace(token(version=1, access_token="reinstalled"))
    assert second.version == 2 and second.access_token == "reinstalled"
    assert await store.get(APP, "location", "loc1") == second
    assert await store.compare_and_set(token(version=3))


async def test_delete_removes_only_that_record(store: TokenStore) -> None:
    """delete is True once and False after; other records stay."""
    await store.replace(token("loc1"))
    await store.replace(token("loc2"))
    assert await store.delete(APP, "location", "loc1")
    assert await store.get(APP, "location", "loc1") is None
    assert not await store.delete(APP, "location", "loc1")
    assert await store.list() == [token("loc2")]
    assert await store.compare_and_set(token("loc1", version=1))


async def test_list_returns_every_record(store: TokenStore) -> None:
    """list answers every record of every app and kind, each exactly as stored."""
    records = [
        token("loc1"),
        token("loc2", version=1, status=NEEDS_REAUTH),
        token("co1", kind="company", approved_locations=("loc1", "loc2")),
        token("loc1", app="otherapp"),
    ]
    for record in records:
        assert await store.compare_and_set(record)
    listed = await store.list()
    assert sorted(listed, key=lambda r: r.key) == sorted(records, key=lambda r: r.key)


async def test_every_field_round_trips_exactly(store: TokenStore) -> None:
    """Every field reads back equal: floats to the last bit, the locations tuple, status."""
    record = TokenRecord(
        app=APP,
        kind="company",
        id="co-é:1",
        access_token="eyJhbGciOi.access",
        refresh_token="eyJhbGciOi.refresh",
        expires_at=1_767_225_600.123456789,
        refreshed_at=0.1 + 0.2,
        scope="contacts.readonly contacts.write locations.readonly",
        user_type="Company",
        company_id="co-é:1",
        location_id="",
        user_id="user-42",
        approved_locations=("locA", "loc B", "loc-ü"),
        version=1,
        status=NEEDS_REAUTH,
    )
    minted = replace(record, kind="location", id="locA", refresh_token="", approved_locations=())
    for written in (record, minted):
        assert await store.compare_and_set(written)
        got = await store.get(written.app, written.kind, written.id)
        assert got == written
        assert got is not None and type(got.approved_locations) is tuple
    assert sorted(await store.list(), key=lambda r: r.key) == [record, minted]


async def test_a_held_lock_refuses_until_released(store: TokenStore) -> None:
    """A second acquire fails while the lock is held and succeeds after its release."""
    owner = await store.acquire_lock("refresh:a", 30)
    assert owner is not None
    assert await store.acquire_lock("refresh:a", 30) is None
    assert await store.acquire_lock("refresh:b", 30) is not None
    assert await store.release_lock("refresh:a", owner)
    second = await store.acquire_lock("refresh:a", 30)
    assert second is not None and second != owner


async def test_only_the_owner_releases_a_lock(store: TokenStore) -> None:
    """release by anyone but the owner does nothing; the lock stays held."""
    owner = await store.acquire_lock("refresh:a", 30)
    assert owner is not None
    assert not await store.release_lock("refresh:a", "0" * 32)
    assert await store.acquire_lock("refresh:a", 30) is None
    assert await store.release_lock("refresh:a", owner)
    assert not await store.release_lock("refresh:a", owner)


async def test_a_lock_frees_itself_after_its_ttl(store: TokenStore) -> None:
    """A lock nobody releases can be taken again once its TTL has passed, and the expired
    owner can no longer release it."""
    owner = await store.acquire_lock("refresh:a", SHORT_TTL_S)
    assert owner is not None
    await asyncio.sleep(PAST_SHORT_TTL_S)
    successor = await store.acquire_lock("refresh:a", 30)
    assert successor is not None
    assert not await store.release_lock("refresh:a", owner)
    assert await store.acquire_lock("refresh:a", 30) is None


async def test_claim_once_is_true_once_per_ttl(store: TokenStore) -> None:
    """claim_once is true, then false while the claim lasts, then true after its TTL."""
    # A claim that lasts the whole test, so "while it lasts" does not race its TTL.
    assert await store.claim_once("webhook:abc", 30)
    assert not await store.claim_once("webhook:abc", 30)
    assert await store.claim_once("webhook:other", 30)
    assert await store.claim_once("webhook:short", SHORT_TTL_S)
    await asyncio.sleep(PAST_SHORT_TTL_S)
    assert await store.claim_once("webhook:short", 30)
    assert not await store.claim_once("webhook:short", 30)


async def test_claimed_reads_a_claim_without_taking_it(store: TokenStore) -> None:
    """`claimed` is false before a claim (and claims nothing: `claim_once` still wins after
    it), true while the claim lasts, and false again once its TTL is over."""
    assert not await store.claimed("webhook:read")
    assert not await store.claimed("webhook:read")
    assert await store.claim_once("webhook:read", 30)
    assert await store.claimed("webhook:read")
    assert not await store.claimed("webhook:other")
    # "While it lasts" is checked on the 30 s claim above: a check inside a short TTL
    # would race it on a loaded machine.
    assert await store.claim_once("webhook:brief", SHORT_TTL_S)
    await asyncio.sleep(PAST_SHORT_TTL_S)
    assert not await store.claimed("webhook:brief")


# -- SQLite only ------------------------------------------------------------------------------


async def test_sqlite_file_and_its_sidecars_are_private(tmp_path: Path) -> None:
    """The database, -wal and -shm files are mode 0600, in a folder created for them."""
    path = tmp_path / "new" / "folder" / "tokens.db"
    store = await SqliteTokenStore.open(path)
    try:
        await store.replace(token())
        files = [path, path.with_name("tokens.db-wal"), path.with_name("tokens.db-shm")]
        assert {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in files} == {
            f.name: 0o600 for f in files
        }
    finally:
        await store.close()


async def test_sqlite_tightens_a_loose_existing_file(tmp_path: Path) -> None:
    """A database file left world-readable is made 0600 when opened."""
    path = tmp_path / "tokens.db"
    path.touch()
    path.chmod(0o644)
    store = await SqliteTokenStore.open(path)
    await store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_sqlite_is_wal_full_sync_latest_schema(tmp_path: Path) -> None:
    """The file is in WAL mode at the latest schema version, and the store syncs FULL."""
    path = tmp_path / "tokens.db"
    store = await SqliteTokenStore.open(path)
    try:
        # synchronous is per connection: only the store's own connection can show it.
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    db.close()


async def test_sqlite_reopening_keeps_the_records(tmp_path: Path) -> None:
    """Records survive closing and reopening the file, which is not migrated twice."""
    path = tmp_path / "tokens.db"
    first = await SqliteTokenStore.open(path)
    await first.replace(token("loc1"))
    await first.close()
    second = await SqliteTokenStore.open(path)
    try:
        assert await second.get(APP, "location", "loc1") == token("loc1")
        assert await second.compare_and_set(token("loc1", version=2))
    finally:
        await second.close()


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    """A file written by a newer schema is refused as unavailable, not misread."""
    path = tmp_path / "tokens.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(TokenStoreUnavailable):
        await SqliteTokenStore.open(path)


async def test_sqlite_unusable_path_is_unavailable(tmp_path: Path) -> None:
    """A path that cannot hold a database raises TokenStoreUnavailable, not OSError."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TokenStoreUnavailable):
        await SqliteTokenStore.open(tmp_path / "a-file" / "tokens.db")


# The other process: open the same file, take the lock, say so, wait, release it, say so.
LOCK_HOLDER = """
import asyncio, sys
from proxy.tokens.sqlite import SqliteTokenStore

async def main() -> None:
    store = await SqliteTokenStore.open(sys.argv[1])
    owner = await store.acquire_lock("refresh:shared", float(sys.argv[2]))
    print("held" if owner else "refused", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print("released" if await store.release_lock("refresh:shared", owner) else "lost")
    await store.close()

asyncio.run(main())
"""


async def start_lock_holder(path: Path, ttl_s: float) -> asyncio.subprocess.Process:
    """Another process holding `refresh:shared` in the file at `path`."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOCK_HOLDER,
        str(path),
        str(ttl_s),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None
    line = await asyncio.wait_for(holder.stdout.readline(), timeout=30)
    assert line == b"held\n"
    return holder


@pytest.mark.slow
async def test_sqlite_lock_holds_across_processes(tmp_path: Path) -> None:
    """A lock another process holds in the same file refuses this one until released."""
    path = tmp_path / "tokens.db"
    store = await SqliteTokenStore.open(path)
    holder = await start_lock_holder(path, 30)
    try:
        assert await store.acquire_lock("refresh:shared", 30) is None
        out, _ = await asyncio.wait_for(holder.communicate(b"\n"), timeout=30)
        assert out == b"released\n"
        assert await store.acquire_lock("refresh:shared", 30) is not None
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.communicate()
        await store.close()


@pytest.mark.slow
async def test_sqlite_lock_of_a_killed_process_frees_after_its_ttl(tmp_path: Path) -> None:
    """A lock whose holder process died stays held until its TTL passes, then frees."""
    path = tmp_path / "tokens.db"
    ttl_s = 1.0
    # This store's clock stands still at a moment before the holder took the lock, then
    # jumps past its TTL: no race with the TTL, no sleep.
    now = [time.time()]
    store = await SqliteTokenStore.open(path, clock=lambda: now[0])
    holder = await start_lock_holder(path, ttl_s)
    try:
        holder.kill()
        await holder.communicate()
        assert await store.acquire_lock("refresh:shared", 30) is None
        now[0] = time.time() + ttl_s  # the holder took the lock before this time.time()
        assert await store.acquire_lock("refresh:shared", 30) is not None
    finally:
        await store.close()


# -- Redis only -------------------------------------------------------------------------------


async def test_redis_outage_is_token_store_unavailable_promptly(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """With Redis dead, get, compare_and_set and acquire_lock raise TokenStoreUnavailable
    (the client's own timeouts end them), never hang."""
    store = RedisTokenStore(redis_client)
    assert await store.compare_and_set(token())
    redis_server.stop(kill=True)
    calls = {
        "get": lambda: store.get(APP, "location", "loc1"),
        "compare_and_set": lambda: store.compare_and_set(token(version=2)),
        "acquire_lock": lambda: store.acquire_lock("refresh:a", 30),
        "list": lambda: store.list(),
    }
    for call in calls.values():
        # Generous: a hang's failure timeout, never a measure of speed.
        with pytest.raises(TokenStoreUnavailable):
            await asyncio.wait_for(call(), timeout=30)


async def test_redis_keys_carry_their_hash_tags(redis_client: Redis) -> None:
    """A record's hash is tagged with its `app:kind:id` (as the limiter tags that resource),
    a lock or claim with its name; the index is the only untagged key."""
    store = RedisTokenStore(redis_client)
    record = token("loc1")
    assert await store.compare_and_set(record)
    assert await store.acquire_lock(f"refresh:{record.tag}", 30) is not None
    assert await store.claim_once("webhook:abc", 30)
    keys = {key.decode() for key in await redis_client.keys("*")}
    assert keys == {
        f"hoopai:token:{{{APP}:location:loc1}}",
        f"hoopai:lock:{{refresh:{APP}:location:loc1}}",
        "hoopai:claim:{webhook:abc}",
        "hoopai:tokens",
    }
    limiter_key = redis_keys(record.key, TODAY)[0]
    assert key_slot(f"hoopai:token:{{{record.tag}}}".encode()) == key_slot(limiter_key.encode())


async def test_redis_list_skips_and_prunes_index_entries_without_a_record(
    redis_client: Redis,
) -> None:
    """An index entry whose hash is gone is skipped by list() and dropped from the index."""
    store = RedisTokenStore(redis_client)
    assert await store.compare_and_set(token("loc1"))
    await redis_client.sadd("hoopai:tokens", f"{APP}:location:ghost")  # type: ignore[misc]
    assert await store.list() == [token("loc1")]
    members = await redis_client.smembers("hoopai:tokens")  # type: ignore[misc]
    assert members == {f"{APP}:location:loc1".encode()}


@pytest.mark.slow
async def test_redis_cluster_store_spans_slots(tmp_path: Path) -> None:
    """On a 3-master cluster, records in many slots are written, replaced, listed, locked
    and deleted."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    client = open_redis(StoreConfig(redis_url=cluster.url, redis_cluster=True))
    assert isinstance(client, ClusterClient)
    try:
        # redis-py's async cluster client must discover the cluster before concurrent
        # commands: concurrent first commands on a fresh client fail (redis-py #3032).
        await client.initialize()
        store = RedisTokenStore(client)
        records = [token(f"loc{n}") for n in range(12)]
        assert len({key_slot(r.tag.encode()) * 3 // 16384 for r in records}) > 1
        assert all(await asyncio.gather(*(store.compare_and_set(r) for r in records)))
        assert await store.compare_and_set(token("loc0", version=2))
        assert await store.delete(APP, "location", "loc1")
        reinstalled = await store.replace(token("loc2", access_token="reinstalled"))
        assert reinstalled.version == 2
        expected = [token("loc0", version=2), reinstalled, *records[3:]]
        by_key = sorted(expected, key=lambda r: r.key)
        assert sorted(await store.list(), key=lambda r: r.key) == by_key
        owner = await store.acquire_lock(records[3].tag, 30)
        assert owner is not None and await store.acquire_lock(records[3].tag, 30) is None
        assert await store.release_lock(records[3].tag, owner)
    finally:
        await client.aclose()
        cluster.stop()
