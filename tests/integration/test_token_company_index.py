"""The stores' index of Company records by the locations they approve
(`TokenStore.companies_approving`), held the same on SQLite and Redis: what it finds, that
it follows every write and delete, that records stored before it existed are found (SQLite
migrates the file on open, Redis indexes them on first use), and that a lookup reads only
the Companies it finds, however many records the store holds.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio import RedisCluster as ClusterClient
from redis.crc import key_slot

from proxy.config import StoreConfig
from proxy.harness.redis_cluster import RedisCluster
from proxy.redis_client import open_redis
from proxy.tokens.redis import (
    APPROVALS_INDEXED_KEY,
    RedisTokenStore,
    approvers_key,
    open_companies_key,
)
from proxy.tokens.sqlite import COMPANIES_APPROVING, MIGRATIONS, SqliteTokenStore
from proxy.tokens.store import NEEDS_REAUTH, TokenRecord, TokenStore

APP = "6650f1a2b3c4d5e6f7a8b9c0"
OTHER_APP = "77aa00bb11cc22dd33ee44ff"


def company(id: str, *approved: str, version: int = 1, **changes: object) -> TokenRecord:
    """A Company record approving `approved` (none: it lists no location)."""
    record = TokenRecord(
        app=APP,
        kind="company",
        id=id,
        access_token=f"access-{id}-{version}",
        refresh_token=f"refresh-{id}-{version}",
        expires_at=1_767_225_600.5,
        refreshed_at=1_767_139_200.25,
        user_type="Company",
        company_id=id,
        approved_locations=approved,
        version=version,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def location(id: str, **changes: object) -> TokenRecord:
    record = TokenRecord(
        app=APP,
        kind="location",
        id=id,
        access_token=f"access-{id}",
        refresh_token=f"refresh-{id}",
        expires_at=1_767_225_600.5,
        refreshed_at=1_767_139_200.25,
        user_type="Location",
        location_id=id,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


async def ids_approving(store: TokenStore, location_id: str, app: str = APP) -> list[str]:
    return [record.id for record in await store.companies_approving(app, location_id)]


# -- every backend ----------------------------------------------------------------------------


async def test_listing_companies_come_first_then_open_ones(store: TokenStore) -> None:
    """For a location: the app's Companies listing it (by id), then those listing none (by
    id); not Companies listing only other locations, not another app's, never a Location
    record; a Company needing reauthorization is still returned (the caller decides)."""
    assert await ids_approving(store, "locA") == []
    for record in (
        company("coZ", "locA", "locB"),
        company("coB", "locB"),
        company("coOpen2"),
        company("coOpen1"),
        company("coA", "locA", status=NEEDS_REAUTH),
        replace(company("coOther", "locA"), app=OTHER_APP),
        location("locA", approved_locations=("locA",)),
    ):
        assert await store.compare_and_set(record)
    assert await ids_approving(store, "locA") == ["coA", "coZ", "coOpen1", "coOpen2"]
    assert await ids_approving(store, "locB") == ["coB", "coZ", "coOpen1", "coOpen2"]
    assert await ids_approving(store, "locC") == ["coOpen1", "coOpen2"]
    assert await ids_approving(store, "locA", app=OTHER_APP) == ["coOther"]
    found = await store.companies_approving(APP, "locA")
    assert found[1] == company("coZ", "locA", "locB")  # whole records, tokens included


async def test_the_index_follows_every_write(store: TokenStore) -> None:
    """A Company whose approvals change (by compare-and-set or by a reinstall) is found
    where it approves now and nowhere else; a stale writer changes nothing."""
    assert await store.compare_and_set(company("co1", "locA", "locB"))
    assert await store.compare_and_set(company("co1", "locB", "locC", version=2))
    assert not await store.compare_and_set(company("co1", "locD", version=2))  # stale
    assert await ids_approving(store, "locA") == []
    assert await ids_approving(store, "locB") == ["co1"]
    assert await ids_approving(store, "locC") == ["co1"]
    assert await ids_approving(store, "locD") == []
    reinstalled = await store.replace(company("co1"))  # now it lists no location
    assert reinstalled.version == 3
    assert await ids_approving(store, "locB") == ["co1"]
    assert await ids_approving(store, "anywhere") == ["co1"]
    assert await store.replace(company("co1", "locE"))
    assert await ids_approving(store, "anywhere") == []
    assert await ids_approving(store, "locE") == ["co1"]
    assert [record.version for record in await store.companies_approving(APP, "locE")] == [4]


async def test_a_deleted_company_is_not_found(store: TokenStore) -> None:
    """After a delete the Company is found nowhere; installed again, it is found again."""
    assert await store.compare_and_set(company("co1", "locA"))
    assert await store.compare_and_set(company("coOpen"))
    assert await store.delete(APP, "company", "co1")
    assert await store.delete(APP, "company", "coOpen")
    assert await ids_approving(store, "locA") == []
    await store.replace(company("co1", "locA"))
    assert await ids_approving(store, "locA") == ["co1"]


async def test_concurrent_writers_leave_the_index_with_the_winner(store: TokenStore) -> None:
    """20 concurrent compare-and-sets of one version, each approving another location:
    the index answers for the winner's location only."""
    assert await store.compare_and_set(company("co1", "loc-start"))
    writers = [company("co1", f"loc{n}", version=2) for n in range(20)]
    results = await asyncio.gather(*(store.compare_and_set(w) for w in writers))
    (winner,) = [w for w, won in zip(writers, results, strict=True) if won]
    found = {n: await ids_approving(store, f"loc{n}") for n in range(20)}
    assert found == {n: ["co1"] if writers[n] is winner else [] for n in range(20)}
    assert await ids_approving(store, "loc-start") == []


# -- SQLite -----------------------------------------------------------------------------------


def schema_1_file(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """A token file as the previous release left it: schema 1, records (app, id,
    approved_locations JSON) of Companies, no approvals table."""
    with sqlite3.connect(path, isolation_level=None) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        for app, id, approved in rows:
            db.execute(
                "INSERT INTO tokens VALUES (?, 'company', ?, 'a', 'r', 1.0, 0.5, '', "
                "'Company', ?, '', '', ?, 1, 'ok')",
                (app, id, id, approved),
            )
    db.close()


async def test_sqlite_indexes_the_records_of_an_older_file_on_open(tmp_path: Path) -> None:
    """A schema-1 file is migrated when opened: its Companies are found, by the locations
    they list or as listing none, and the next write keeps the index."""
    path = tmp_path / "tokens.db"
    schema_1_file(
        path,
        [
            (APP, "coListed", '["locA", "locB"]'),
            (APP, "coOpen", "[]"),
            (OTHER_APP, "coOther", '["locA"]'),
        ],
    )
    store = await SqliteTokenStore.open(path)
    try:
        assert await ids_approving(store, "locA") == ["coListed", "coOpen"]
        assert await ids_approving(store, "locB") == ["coListed", "coOpen"]
        assert await ids_approving(store, "locC") == ["coOpen"]
        assert await ids_approving(store, "locA", app=OTHER_APP) == ["coOther"]
        old = await store.get(APP, "company", "coListed")
        assert old is not None
        assert await store.compare_and_set(replace(old, approved_locations=("locC",), version=2))
        assert await ids_approving(store, "locA") == ["coOpen"]
        assert await ids_approving(store, "locC") == ["coListed", "coOpen"]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) == 2
    db.close()


async def test_sqlite_lookup_reads_indexes_never_the_whole_table(tmp_path: Path) -> None:
    """The lookup's query plan searches indexes only: no step scans a table, so its cost
    does not grow with the number of records."""
    store = await SqliteTokenStore.open(tmp_path / "tokens.db")
    await store.close()
    with sqlite3.connect(tmp_path / "tokens.db") as db:
        plan = [
            row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {COMPANIES_APPROVING}", (APP,) * 4)
        ]
    db.close()
    reads = [step for step in plan if step.startswith(("SEARCH", "SCAN"))]
    assert len(reads) == 3 and all(step.startswith("SEARCH") for step in reads), plan
    assert any("open_companies" in step for step in reads), plan


# -- Redis ------------------------------------------------------------------------------------


async def forget_the_index(client: Redis) -> None:
    """Leave Redis as the previous release left it: records and `hoopai:tokens`, but no
    approval sets and no marker."""
    keys = await client.keys("hoopai:approvers:*") + await client.keys("hoopai:open-companies:*")
    await client.delete(*keys, APPROVALS_INDEXED_KEY)


async def test_redis_indexes_companies_stored_before_the_index(redis_client: Redis) -> None:
    """Companies written before the approval sets existed are found by the first lookup,
    which indexes them and sets the marker; a later store (another process) trusts the
    marker and does not index again."""
    writer = RedisTokenStore(redis_client)
    assert await writer.compare_and_set(company("coListed", "locA", "locB"))
    assert await writer.compare_and_set(company("coOpen"))
    assert await writer.compare_and_set(location("locA"))
    await forget_the_index(redis_client)
    assert await redis_client.keys("hoopai:approvers:*") == []
    upgraded = RedisTokenStore(redis_client)
    assert await ids_approving(upgraded, "locB") == ["coListed", "coOpen"]
    assert await redis_client.get(APPROVALS_INDEXED_KEY) == b"1"
    members = await redis_client.smembers(approvers_key(APP, "locA"))  # type: ignore[misc]
    assert members == {b"coListed"}
    # Past the marker, nothing is indexed again: an unindexed record stays unseen.
    await redis_client.delete(approvers_key(APP, "locA"))
    assert await ids_approving(RedisTokenStore(redis_client), "locA") == ["coOpen"]


async def test_redis_drops_members_whose_record_does_not_approve(redis_client: Redis) -> None:
    """A set naming a Company that is gone or approves elsewhere is read past, and the
    member is removed; members whose record approves stay."""
    store = RedisTokenStore(redis_client)
    assert await store.compare_and_set(company("co1", "locA"))
    assert await store.compare_and_set(company("co2", "locB"))
    await redis_client.sadd(approvers_key(APP, "locA"), "ghost", "co2")  # type: ignore[misc]
    await redis_client.sadd(open_companies_key(APP), "co1")  # type: ignore[misc]
    assert await ids_approving(store, "locA") == ["co1"]
    assert await redis_client.smembers(approvers_key(APP, "locA")) == {b"co1"}  # type: ignore[misc]
    assert await redis_client.smembers(open_companies_key(APP)) == set()  # type: ignore[misc]


async def test_redis_lookup_reads_only_the_companies_it_finds(redis_client: Redis) -> None:
    """With 2,000 Location records and 50 Companies approving other locations, a lookup
    reads the hashes of the two Companies that approve, and no other: its cost follows
    what it finds, not the size of the store."""
    store = RedisTokenStore(redis_client)
    await store.compare_and_set(company("coListed", "locA"))
    await store.compare_and_set(company("coOpen"))
    await asyncio.gather(*(store.compare_and_set(company(f"co{n}", f"x{n}")) for n in range(50)))
    pipe = redis_client.pipeline(transaction=False)
    for n in range(2_000):
        pipe.hset(f"hoopai:token:{{{APP}:location:l{n}}}", mapping={"kind": "location"})
        pipe.sadd("hoopai:tokens", f"{APP}:location:l{n}")
    await pipe.execute()
    await store.companies_approving(APP, "warm-up")  # the one-time check of older records
    await redis_client.config_resetstat()
    assert await ids_approving(store, "locA") == ["coListed", "coOpen"]
    stats = await redis_client.info("commandstats")
    reads = {name: stats[name]["calls"] for name in stats if name.startswith("cmdstat_")}
    assert reads.pop("cmdstat_hgetall") == 2
    assert reads.pop("cmdstat_smembers") == 2
    assert reads.pop("cmdstat_exists", 0) == 0
    assert [name for name in reads if not name.startswith(("cmdstat_config", "cmdstat_info"))] == []


@pytest.mark.slow
async def test_redis_cluster_index_spans_slots(tmp_path: Path) -> None:
    """On a 3-master cluster, Companies and the locations they approve live in many
    slots; the index is written, read, followed and pruned across them."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    client = open_redis(StoreConfig(redis_url=cluster.url, redis_cluster=True))
    assert isinstance(client, ClusterClient)
    try:
        await client.initialize()  # before concurrent commands (redis-py #3032)
        store = RedisTokenStore(client)
        locations = [f"loc{n}" for n in range(12)]
        keys = [approvers_key(APP, loc) for loc in locations]
        assert len({key_slot(key.encode()) * 3 // 16384 for key in keys}) > 1
        assert await store.compare_and_set(company("co1", *locations))
        assert await store.compare_and_set(company("co2", *locations[:6]))
        assert await store.compare_and_set(company("coOpen"))
        assert await ids_approving(store, "loc1") == ["co1", "co2", "coOpen"]
        assert await ids_approving(store, "loc9") == ["co1", "coOpen"]
        assert await store.compare_and_set(company("co1", "loc0", version=2))
        assert await ids_approving(store, "loc9") == ["coOpen"]
        assert await store.delete(APP, "company", "co2")
        assert await ids_approving(store, "loc1") == ["coOpen"]
        assert await ids_approving(store, "loc0") == ["co1", "coOpen"]
    finally:
        await client.aclose()
        cluster.stop()
