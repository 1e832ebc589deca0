"""The cap on token endpoint calls in flight (`tokens.max_concurrent_refreshes`): what a
wave of refreshes costs the upstream, and what killing or stopping a process in the
middle of one costs the installs.

A process killed between the upstream rotating a refresh token and the new pair being
stored loses that install (docs/architecture.md, "What cannot be recovered"); the cap
bounds how many refreshes can be in that window at once. The simulator counts the OAuth
calls it is answering at once (`oauth_in_flight`, `max_oauth_in_flight`).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import AppConfig, TokensConfig
from proxy.tokens.keepalive import KeepAlive, keepalive_concurrency
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import OAuthClient, parse_grant
from proxy.tokens.sqlite import SqliteTokenStore
from proxy.tokens.store import OK, TokenRecord, TokenStore
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET

APP = AppConfig(name="main", client_id=SIM_CLIENT_ID, client_secret=SIM_CLIENT_SECRET)
CAP = 3
ATTEMPT_S = 15.0


def granted(simulator: Any, **install: Any) -> TokenRecord:
    """A record for a pair the simulator issued (in process, as an install would)."""
    body = simulator.state.grant(SIM_CLIENT_ID, **install)
    return parse_grant(body).record(APP.app_id, now=time.time())


def stale(record: TokenRecord) -> TokenRecord:
    """`record` as the store holds it once its access token is about to expire."""
    return replace(record, expires_at=time.time() + 60)


@asynccontextmanager
async def token_manager(
    simulator: Any, store: TokenStore, **tokens: Any
) -> AsyncIterator[TokenManager]:
    async with aiohttp.ClientSession() as session:
        oauth = OAuthClient(session, simulator.url, attempt_timeout_s=ATTEMPT_S)
        yield TokenManager(store, oauth, TokensConfig(**tokens), attempt_s=ATTEMPT_S)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteTokenStore]:
    store = await SqliteTokenStore.open(tmp_path / "tokens.db")
    yield store
    await store.close()


def alive(simulator: Any, record: TokenRecord) -> bool:
    """Whether the simulator would still take the record's refresh token."""
    grant = simulator.state.tokens.refresh_grant(record.refresh_token)
    return grant is not None and grant.alive


# -- in process -------------------------------------------------------------------------------


async def test_every_kind_of_token_call_shares_the_cap(simulator, sqlite_store) -> None:
    """12 resources need a token endpoint call at once (4 about to expire, 4 whose token
    the upstream refused as Invalid JWT, 4 new locations minted from a Company install):
    all 12 get a new token, and the upstream never answers more than the cap at once."""
    expiring = [stale(granted(simulator, location_id=f"expiring{n}")) for n in range(4)]
    revoked = [granted(simulator, location_id=f"revoked{n}") for n in range(4)]
    company = granted(
        simulator,
        user_type="Company",
        company_id="capCompany",
        approved_locations=[f"minted{n}" for n in range(4)],
    )
    for record in (*expiring, *revoked, company):
        await sqlite_store.replace(record)
    for record in revoked:
        simulator.state.expire_tokens(f"{APP.app_id}:location:{record.id}")
    simulator.state.set_faults({"token_latency_ms": 500})  # so that the calls overlap
    async with token_manager(simulator, sqlite_store, max_concurrent_refreshes=CAP) as manager:
        tokens = await asyncio.gather(
            *(manager.access_token(APP, "location", r.id) for r in expiring),
            *(manager.after_invalid_jwt(APP, "location", r.id, r.access_token) for r in revoked),
            *(manager.access_token(APP, "location", f"minted{n}") for n in range(4)),
        )
    stats = simulator.state.stats()
    assert stats["max_oauth_in_flight"] == CAP
    assert (stats["refreshes"], stats["location_tokens_minted"]) == (8, 4)
    assert stats["dead_refresh_token_uses"] == 0
    old = {record.access_token for record in (*expiring, *revoked)}
    assert len(set(tokens)) == 12 and not old & set(tokens)


async def test_a_refresh_holds_its_lock_only_while_it_holds_a_slot(
    simulator, sqlite_store, tmp_path: Path
) -> None:
    """10 refreshes at once with a cap of 2: the store never holds more than 2 refresh
    locks, because a refresh waits for its slot before it takes the lock (time spent
    waiting for a slot is not taken from the lock's TTL)."""
    records = [stale(granted(simulator, location_id=f"slot{n}")) for n in range(10)]
    for record in records:
        await sqlite_store.replace(record)
    simulator.state.set_faults({"token_latency_ms": 300})
    most_locks = 0
    done = asyncio.Event()

    async def count_locks() -> None:
        nonlocal most_locks
        with sqlite3.connect(tmp_path / "tokens.db") as db:
            while not done.is_set():
                (held,) = db.execute(
                    "SELECT COUNT(*) FROM locks WHERE expires_at > ?", (time.time(),)
                ).fetchone()
                most_locks = max(most_locks, held)
                await asyncio.sleep(0.005)  # sampling the store, not ordering anything
        db.close()

    counter = asyncio.create_task(count_locks())
    async with token_manager(simulator, sqlite_store, max_concurrent_refreshes=2) as manager:
        await asyncio.gather(*(manager.access_token(APP, "location", r.id) for r in records))
    done.set()
    await counter
    assert 1 <= most_locks <= 2
    assert simulator.state.stats()["max_oauth_in_flight"] == 2
    assert simulator.state.stats()["refreshes"] == 10


async def test_a_keepalive_pass_runs_half_the_cap(simulator, sqlite_store) -> None:
    """A keep-alive pass over 8 due records refreshes them all, never more than half the
    cap at once, the record closest to expiry first."""
    records = [stale(granted(simulator, location_id=f"due{n}")) for n in range(8)]
    records[5] = replace(records[5], expires_at=time.time() + 1)  # the most urgent
    for record in records:
        await sqlite_store.replace(record)
    simulator.state.set_faults({"token_latency_ms": 300})
    config = TokensConfig(max_concurrent_refreshes=4)
    async with token_manager(simulator, sqlite_store, max_concurrent_refreshes=4) as manager:
        keepalive = KeepAlive(manager, sqlite_store, {APP.app_id: APP}, config)
        assert await keepalive.run_once() == 8
    stats = simulator.state.stats()
    assert stats["max_oauth_in_flight"] == keepalive_concurrency(config) == 2
    assert stats["refreshes"] == 8
    # Counted per resource in order of arrival: the first two workers took the first two
    # records, and no third refresh starts before one of them is answered.
    assert f"{APP.app_id}:location:due5" in list(stats["per_resource"])[:2]


# -- real processes ---------------------------------------------------------------------------

WAVE = 3 * CAP
HELD_MS = 60_000  # the upstream answers a refresh this late: in flight until the kill


def wave_config(store_path: Path, **tokens: Any) -> dict[str, Any]:
    """A proxy on `store_path` with the cap, short timeouts and a short lock, roomy limits."""
    return {
        "store": {"sqlite_path": str(store_path)},
        "upstream": {"timeout_s": 5, "connect_timeout_s": 1},
        "tokens": {"refresh_lock_ttl_s": 7, "max_concurrent_refreshes": CAP, **tokens},
        "limits": {"burst": {"requests": 100_000}},
    }


async def seed(simulator: Any, path: Path, records: list[TokenRecord]) -> None:
    store = await SqliteTokenStore.open(path)
    try:
        for record in records:
            await store.replace(record)
    finally:
        await store.close()


async def stored(path: Path) -> dict[str, TokenRecord]:
    store = await SqliteTokenStore.open(path)
    try:
        return {record.id: record for record in await store.list()}
    finally:
        await store.close()


async def managed(http: aiohttp.ClientSession, proxy_url: str, location: str) -> tuple[int, Any]:
    headers = {"X-HoopAI-Location-Id": location}
    async with http.get(f"{proxy_url}/contacts/", headers=headers) as answer:
        return answer.status, await answer.json()


async def revoked_wave(simulator: Any, path: Path, prefix: str) -> list[TokenRecord]:
    """WAVE installs whose access tokens the upstream has expired (the proxy does not
    know yet): each first request gets 401 Invalid JWT, and its refresh starts."""
    simulator.state.set_limits({"burst": 100_000})
    records = [granted(simulator, location_id=f"{prefix}{n}") for n in range(WAVE)]
    await seed(simulator, path, records)
    simulator.state.expire_tokens()
    return records


async def until_wave_in_flight(simulator: Any, requests: list[asyncio.Task[Any]]) -> None:
    """Until every request has been refused as Invalid JWT (its refresh is next) and the
    upstream is answering CAP token calls."""
    while True:
        stats = simulator.state.stats()
        if stats["invalid_jwt"] >= WAVE and stats["oauth_in_flight"] >= CAP:
            return
        assert not any(task.done() for task in requests), "a request ended before the wave"
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_killed_during_a_refresh_wave_loses_at_most_the_cap(
    simulator, spawn_proxy, http, tmp_path: Path
) -> None:
    """SIGKILL while 9 resources wait for a refresh, the upstream holding its answers,
    with a cap of 3: only the 3 refreshes the upstream had rotated are lost (their
    resources need a reinstall, 401 reauthorization_required from the next proxy); the
    killed process held only those 3 refresh locks; the other 6 refresh normally."""
    path = tmp_path / "wave.db"
    records = await revoked_wave(simulator, path, "killWave")
    simulator.state.set_faults({"token_latency_ms": HELD_MS})
    doomed = spawn_proxy(simulator.url, **wave_config(path))
    requests = [asyncio.create_task(managed(http, doomed.url, r.id)) for r in records]
    await until_wave_in_flight(simulator, requests)
    assert doomed.process is not None
    doomed.process.kill()
    await asyncio.to_thread(doomed.process.wait)
    await asyncio.gather(*requests, return_exceptions=True)
    stats = simulator.state.stats()
    assert (stats["max_oauth_in_flight"], stats["refreshes"]) == (CAP, CAP)
    with sqlite3.connect(path) as db:
        (locks,) = db.execute(
            "SELECT COUNT(*) FROM locks WHERE expires_at > ?", (time.time(),)
        ).fetchone()
    db.close()
    assert locks <= CAP
    spent = [r.id for r in records if not alive(simulator, r)]
    assert len(spent) == CAP

    simulator.state.set_faults({"token_latency_ms": 0})
    survivor = spawn_proxy(simulator.url, **wave_config(path))
    answers = await asyncio.gather(*(managed(http, survivor.url, r.id) for r in records))
    outcome = {
        r.id: (status, body.get("error"))
        for r, (status, body) in zip(records, answers, strict=True)
    }
    assert outcome == {
        r.id: (401, "reauthorization_required") if r.id in spent else (200, None) for r in records
    }


@pytest.mark.slow
async def test_sigterm_during_a_refresh_wave_finishes_it(
    simulator, spawn_proxy, http, tmp_path: Path
) -> None:
    """SIGTERM while 9 resources wait for a refresh (3 at the upstream, 6 waiting for a
    slot): the process finishes them all before it exits (cleanly), every request gets its
    answer, and every stored refresh token is the live one: nothing needs a reinstall."""
    path = tmp_path / "wave.db"
    records = await revoked_wave(simulator, path, "termWave")
    simulator.state.set_faults({"token_latency_ms": 1_000})
    proxy = spawn_proxy(simulator.url, **wave_config(path))
    requests = [asyncio.create_task(managed(http, proxy.url, r.id)) for r in records]
    await until_wave_in_flight(simulator, requests)
    proxy.signal(signal.SIGTERM)
    answers = await asyncio.gather(*requests)
    assert [status for status, _ in answers] == [200] * WAVE
    assert proxy.process is not None
    assert await asyncio.to_thread(proxy.process.wait) == 0
    after = await stored(path)
    assert {r.status for r in after.values()} == {OK}
    assert all(alive(simulator, r) for r in after.values())
    stats = simulator.state.stats()
    assert (stats["refreshes"], stats["dead_refresh_token_uses"]) == (WAVE, 0)
    assert stats["max_oauth_in_flight"] == CAP


@pytest.mark.slow
async def test_sigterm_during_keepalive_refreshes_finishes_those_in_flight(
    simulator, spawn_proxy, tmp_path: Path
) -> None:
    """SIGTERM while keep-alive has refreshes at the upstream and more queued: the process
    waits for those in flight and stores them, drops the queued ones (nothing spent), and
    exits cleanly; every stored refresh token is the live one."""
    path = tmp_path / "keepalive.db"
    records = [stale(granted(simulator, location_id=f"idle{n}")) for n in range(WAVE)]
    await seed(simulator, path, records)
    simulator.state.set_faults({"token_latency_ms": 1_500})
    # Keep-alive's first pass starts at once, with half the cap: 2 refreshes in flight.
    proxy = spawn_proxy(simulator.url, **wave_config(path, max_concurrent_refreshes=4))
    share = keepalive_concurrency(TokensConfig(max_concurrent_refreshes=4))
    while simulator.state.stats()["oauth_in_flight"] < share:
        assert proxy.process is not None and proxy.process.poll() is None
        await asyncio.sleep(0.02)
    proxy.signal(signal.SIGTERM)
    assert proxy.process is not None
    assert await asyncio.to_thread(proxy.process.wait) == 0
    assert "token refresh(es) to finish" in proxy.logs()
    after = await stored(path)
    refreshed = [r for r in after.values() if r.version == 2]
    stats = simulator.state.stats()
    assert len(refreshed) == stats["refreshes"] >= share
    assert stats["max_oauth_in_flight"] == share
    assert {r.status for r in after.values()} == {OK}
    assert all(alive(simulator, r) for r in after.values())
