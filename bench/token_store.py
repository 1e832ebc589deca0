"""Benchmark: minting a new Location token as the token store grows (not a test).

A store holds one Company install (from the in-process simulator, approving the locations
minted here) and filler Location records written straight into the backend (SQLite rows,
Redis hashes plus the `hoopai:tokens` index, as the stores write them), 1, 10,000 and
100,000 records in all. Then `TokenManager.access_token` mints tokens for new locations one
after another, through the simulator's `/oauth/locationToken`. The first mint is timed on
its own: on Redis it includes the one-time index backfill for records written before the
Company index existed (the fillers here).

    python -m bench.token_store            # print the table
    python -m bench.token_store --write    # and write it into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from bench.results import machine, write_section
from proxy.config import AppConfig, TokensConfig
from proxy.harness.redis_server import RedisServer
from proxy.harness.tokens import SIM_CLIENT_ID
from proxy.simulator import SimulatorConfig
from proxy.simulator.testing import RunningSimulator, running_simulator
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import OAuthClient, parse_grant
from proxy.tokens.redis import INDEX_KEY, RedisTokenStore, record_key
from proxy.tokens.sqlite import SqliteTokenStore
from proxy.tokens.store import TokenStore

SECTION = "## Token store: minting a new location as the store grows"
SIZES = (1, 10_000, 100_000)
APP = AppConfig(name="bench", client_id=SIM_CLIENT_ID, client_secret="sim-secret")
COMPANY = "benchCompany"
NEW_LOCATIONS = 1_000  # the Company approves these; the bench mints some of them
TIME_BUDGET_S = 3.0  # minting stops after this long (or MAX_MINTS), whichever first
MAX_MINTS = 300
INSERT_BATCH = 5_000


def filler_fields(index: int, now: float) -> dict[str, str]:
    """The stored fields of one filler Location record (tokens in clear, as without a key)."""
    return {
        "app": APP.app_id,
        "kind": "location",
        "id": f"filler{index:06d}",
        "access_token": f"filler-access-{index}",
        "refresh_token": f"filler-refresh-{index}",
        "expires_at": repr(now + 86_000.0),
        "refreshed_at": repr(now),
        "scope": "",
        "user_type": "Location",
        "company_id": "",
        "location_id": f"filler{index:06d}",
        "user_id": "",
        "approved_locations": "[]",
        "version": "1",
        "status": "ok",
    }


def fill_sqlite(path: Path, count: int) -> None:
    """`count` filler rows in one transaction, straight into the `tokens` table."""
    now = time.time()
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("BEGIN IMMEDIATE")
        rows = (filler_fields(index, now) for index in range(count))
        db.executemany(
            "INSERT INTO tokens (app, kind, id, access_token, refresh_token, expires_at, "
            "refreshed_at, scope, user_type, company_id, location_id, user_id, "
            "approved_locations, version, status) VALUES (:app, :kind, :id, :access_token, "
            ":refresh_token, :expires_at, :refreshed_at, :scope, :user_type, :company_id, "
            ":location_id, :user_id, :approved_locations, :version, :status)",
            rows,
        )
        db.execute("COMMIT")
    db.close()


async def fill_redis(client: aioredis.Redis, count: int) -> None:
    """`count` filler hashes and their index entries, pipelined."""
    now = time.time()
    for start in range(0, count, INSERT_BATCH):
        pipe = client.pipeline(transaction=False)
        for index in range(start, min(count, start + INSERT_BATCH)):
            fields = filler_fields(index, now)
            tag = f"{fields['app']}:location:{fields['id']}"
            pipe.hset(record_key(tag), mapping=fields)  # type: ignore[arg-type]
            pipe.sadd(INDEX_KEY, tag)
        await pipe.execute()


@asynccontextmanager
async def opened_store(backend: str, workdir: Path, fillers: int) -> AsyncIterator[TokenStore]:
    """A fresh store of `backend` holding `fillers` filler records."""
    if backend == "SQLite":
        path = workdir / f"tokens-{fillers}.db"
        await (await SqliteTokenStore.open(path)).close()  # create the schema
        fill_sqlite(path, fillers)
        sqlite = await SqliteTokenStore.open(path)
        try:
            yield sqlite
        finally:
            await sqlite.close()
        return
    server = RedisServer(workdir / f"redis-{fillers}").start()
    client = aioredis.Redis.from_url(server.url)
    try:
        await fill_redis(client, fillers)
        yield RedisTokenStore(client)
    finally:
        await client.aclose()
        server.stop()


async def install_company(sim: RunningSimulator, manager: TokenManager) -> None:
    answer = sim.state.grant(
        SIM_CLIENT_ID,
        user_type="Company",
        company_id=COMPANY,
        approved_locations=[f"new{index:04d}" for index in range(NEW_LOCATIONS)],
    )
    await manager.install(parse_grant(answer).record(APP.app_id, now=time.time()))


async def mint_rates(backend: str, size: int, workdir: Path) -> tuple[float, float, int]:
    """(ms for the first mint, mints per second after it, mints timed)."""
    async with (
        running_simulator(SimulatorConfig()) as sim,
        aiohttp.ClientSession() as session,
        opened_store(backend, workdir, size - 1) as store,
    ):
        sim.state.set_limits({"burst": 10**6, "daily": 10**9})
        manager = TokenManager(store, OAuthClient(session, sim.url), TokensConfig())
        await install_company(sim, manager)
        started = time.perf_counter()
        await manager.access_token(APP, "location", "new0000")
        first_ms = (time.perf_counter() - started) * 1000
        minted = 0
        started = time.perf_counter()
        while minted < MAX_MINTS and time.perf_counter() - started < TIME_BUDGET_S:
            minted += 1
            await manager.access_token(APP, "location", f"new{minted:04d}")
        elapsed = time.perf_counter() - started
        return first_ms, minted / elapsed, minted


async def main(write: bool) -> None:
    rows: list[tuple[str, int, float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("SQLite", "Redis"):
            for size in SIZES:
                first_ms, rate, count = await mint_rates(backend, size, Path(tmp))
                rows.append((backend, size, first_ms, rate, count))
                print(f"{backend} {size:,}: first {first_ms:.1f} ms, {rate:.2f}/s", flush=True)
    lines = [
        SECTION,
        "",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {machine()}; one Company "
        "install plus filler Location records; new locations minted one after another "
        "through the in-process simulator (`TokenManager.access_token`).",
        "",
        "| store | records | first mint ms | ms per mint after it | mints/s | mints timed |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {backend} | {size:,} | {first:.1f} | {1000 / rate:.1f} | {rate:.2f} | {count} |"
            for backend, size, first, rate, count in rows
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(SECTION, text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    asyncio.run(main(parser.parse_args().write))
