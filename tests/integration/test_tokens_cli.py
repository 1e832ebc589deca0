"""`hoopai-proxy tokens add|list|delete|refresh` as a real process, against the simulator
(which runs in this test's event loop, hence asyncio subprocesses) and a real store."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import parse_config
from proxy.harness.processes import write_config
from proxy.harness.redis_server import RedisServer
from proxy.redis_client import open_redis
from proxy.tokens.store import TokenRecord
from proxy.tokens.stores import open_token_store
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, base_document, merged
from tests.support.leaks import leaked

ROOT = Path(__file__).resolve().parents[2]
APP_ID = SIM_CLIENT_ID.split("-", 1)[0]
LOCATION = "cliLoc01"
FRAGMENT = 16  # no run of this many characters of any token may appear in the output

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def tokens(config: Path, *args: str, stdin: str | None = None) -> Run:
    """`hoopai-proxy tokens ARGS --config CONFIG`, with `stdin` piped in (else empty)."""
    environ = {k: v for k, v in os.environ.items() if k != "HOOPAI_PROXY_CONFIG"}
    argv = [sys.executable, "-m", "proxy.cli", "tokens", *args, "--config", str(config)]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=environ,
    )
    feed = None if stdin is None else stdin.encode()
    out, err = await asyncio.wait_for(process.communicate(feed), timeout=60)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def document(simulator: Any, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A config (as parsed YAML) for the simulator, with a SQLite store in `tmp_path`."""
    store = {"store": {"sqlite_path": str(tmp_path / "tokens.db")}}
    return merged(merged(base_document(simulator.url), store), overrides)


def config_file(simulator: Any, tmp_path: Path, name: str = "proxy.yaml", **over: Any) -> Path:
    return write_config(tmp_path / name, document(simulator, tmp_path, **over))


async def stored(doc: dict[str, Any]) -> list[TokenRecord]:
    """What the configured store holds, read in this process."""
    config = parse_config(doc, {})
    client = open_redis(config.store) if config.store.redis_url else None
    store = await open_token_store(config.store, client)
    try:
        return await store.list()
    finally:
        await store.close()
        if client is not None:
            await client.aclose()


def shown(texts: Iterable[str], tokens: Iterable[str]) -> list[str]:
    """Tokens of which any run of FRAGMENT characters appears in the texts (shortened)."""
    joined = "\n".join(texts)
    return [
        f"{token[:8]}..."
        for token in tokens
        if any(token[i : i + FRAGMENT] in joined for i in range(len(token) - FRAGMENT + 1))
    ]


async def installed(simulator: Any, config: Path) -> None:
    """Install LOCATION in the simulator and import its refresh token with `tokens add`."""
    old = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)
    run = await tokens(
        config, "add", "--location", LOCATION, "--refresh-token-stdin", stdin=old["refresh_token"]
    )
    assert run.code == 0, run.err


def refreshes(simulator: Any) -> int:
    count: int = simulator.state.stats()["refreshes"]
    return count


async def test_add_from_stdin_then_list_shows_it_without_any_token(simulator, tmp_path):
    """add stores the new pair; neither add nor list prints any part of any token."""
    config = config_file(simulator, tmp_path)
    old = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)

    added = await tokens(
        config, "add", "--location", LOCATION, "--refresh-token-stdin", stdin=old["refresh_token"]
    )
    listed = await tokens(config, "list")

    assert added.code == 0, added.err
    assert added.out.startswith(f"added location {LOCATION} for app main (access token valid")
    assert listed.code == 0, listed.err
    assert f"location:{LOCATION}" in listed.out and " ok " in listed.out
    [record] = await stored(document(simulator, tmp_path))
    issued = simulator.state.tokens.issued()
    assert {record.access_token, record.refresh_token, old["refresh_token"]} <= issued
    outputs = [added.out, added.err, listed.out, listed.err]
    assert leaked(outputs, issued) == []
    assert shown(outputs, issued) == []


async def test_add_refreshes_once_and_the_imported_token_dies_upstream(simulator, tmp_path):
    """add refreshes exactly once: the imported token dies, the stored new one lives."""
    config = config_file(simulator, tmp_path)
    old = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)
    before = refreshes(simulator)

    added = await tokens(
        config, "add", "--location", LOCATION, "--refresh-token-stdin", stdin=old["refresh_token"]
    )

    assert added.code == 0, added.err
    assert refreshes(simulator) == before + 1
    [record] = await stored(document(simulator, tmp_path))
    assert simulator.state.tokens.refresh_grant(old["refresh_token"]).alive is False
    assert simulator.state.tokens.refresh_grant(record.refresh_token).alive is True
    assert (record.app, record.kind, record.id, record.version) == (APP_ID, "location", LOCATION, 1)


async def test_add_with_an_already_used_token_exits_1_and_stores_nothing(simulator, tmp_path):
    """A refused (already used) token: one line saying so, exit 1, nothing stored."""
    old = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)
    elsewhere = {"sqlite_path": str(tmp_path / "elsewhere.db")}
    first = config_file(simulator, tmp_path, "elsewhere.yaml", store=elsewhere)
    second = config_file(simulator, tmp_path)
    args = ("add", "--location", LOCATION, "--refresh-token-stdin")
    assert (await tokens(first, *args, stdin=old["refresh_token"])).code == 0

    again = await tokens(second, *args, stdin=old["refresh_token"])

    assert again.code == 1
    assert "invalid or already used" in again.err and "nothing was stored" in again.err
    assert len(again.err.strip().splitlines()) == 1
    assert await stored(document(simulator, tmp_path)) == []
    assert leaked([again.out, again.err], simulator.state.tokens.issued()) == []


async def test_a_refresh_token_on_the_command_line_is_refused(simulator, tmp_path):
    """A token as an argv value: exit 2, not echoed, not used upstream, not stored."""
    config = config_file(simulator, tmp_path)
    old = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)
    before = refreshes(simulator)

    for spelled in (
        ["--refresh-token", old["refresh_token"]],
        [f"--refresh-token={old['refresh_token']}"],
    ):
        run = await tokens(config, "add", "--location", LOCATION, *spelled)

        assert run.code == 2
        assert "--refresh-token-stdin" in run.err
        assert old["refresh_token"] not in run.out + run.err
    assert refreshes(simulator) == before
    assert simulator.state.tokens.refresh_grant(old["refresh_token"]).alive is True
    assert await stored(document(simulator, tmp_path)) == []


async def test_refresh_bumps_the_version_with_one_more_upstream_refresh(simulator, tmp_path):
    """refresh goes to the upstream once and stores the new pair as the next version."""
    config = config_file(simulator, tmp_path)
    await installed(simulator, config)
    args = ("--location", LOCATION)
    [before] = await stored(document(simulator, tmp_path))
    count = refreshes(simulator)

    run = await tokens(config, "refresh", *args)

    assert run.code == 0, run.err
    assert run.out.startswith(f"refreshed location {LOCATION} for app main (version 2, access")
    assert refreshes(simulator) == count + 1
    [after] = await stored(document(simulator, tmp_path))
    assert after.version == before.version + 1
    assert after.refresh_token != before.refresh_token
    assert leaked([run.out, run.err], simulator.state.tokens.issued()) == []


async def test_refresh_of_a_token_dead_upstream_exits_1_saying_reinstall(
    simulator, tmp_path, http: aiohttp.ClientSession
):
    """A stored token dead upstream: exit 1 saying reinstall; the record is needs_reauth."""
    config = config_file(simulator, tmp_path)
    await installed(simulator, config)
    args = ("--location", LOCATION)
    [record] = await stored(document(simulator, tmp_path))
    await _spend(http, simulator.url, record.refresh_token)  # as if someone else used it

    run = await tokens(config, "refresh", *args)

    assert run.code == 1
    assert "no longer valid" in run.err and "reinstall" in run.err
    [after] = await stored(document(simulator, tmp_path))
    assert after.status == "needs_reauth"
    assert "needs_reauth" in (await tokens(config, "list")).out


async def _spend(http: aiohttp.ClientSession, base_url: str, refresh_token: str) -> None:
    form = {
        "client_id": SIM_CLIENT_ID,
        "client_secret": SIM_CLIENT_SECRET,
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "user_type": "Location",
    }
    async with http.post(f"{base_url}/oauth/token", data=form) as answer:
        assert answer.status == 200, await answer.text()


async def test_delete_then_list_shows_nothing_and_delete_again_exits_1(simulator, tmp_path):
    """delete removes the record; a second delete finds none and exits 1."""
    config = config_file(simulator, tmp_path)
    await installed(simulator, config)
    args = ("--location", LOCATION)

    deleted = await tokens(config, "delete", *args)
    listed = await tokens(config, "list")
    again = await tokens(config, "delete", *args)

    assert deleted.code == 0, deleted.err
    assert deleted.out == f"deleted location {LOCATION} for app main\n"
    assert listed.code == 0 and LOCATION not in listed.out
    assert await stored(document(simulator, tmp_path)) == []
    assert again.code == 1
    assert f"no token is stored for location {LOCATION}" in again.err


async def test_add_from_a_file_and_list_with_the_redis_store(
    simulator, tmp_path, redis_server: RedisServer
):
    """With store.redis_url: a Company token added from a file is listed; no SQLite file."""
    overrides = {"store": {"redis_url": redis_server.url}}
    config = config_file(simulator, tmp_path, **overrides)
    old = simulator.state.grant(SIM_CLIENT_ID, user_type="Company", company_id="cliCo01")
    token_file = tmp_path / "refresh-token"
    token_file.write_text(old["refresh_token"] + "\n")

    added = await tokens(
        config, "add", "--company", "cliCo01", "--refresh-token-file", str(token_file)
    )
    listed = await tokens(config, "list")

    assert added.code == 0, added.err
    assert added.out.startswith("added company cliCo01 for app main")
    assert listed.code == 0, listed.err
    assert "company:cliCo01" in listed.out
    [record] = await stored(document(simulator, tmp_path, **overrides))
    assert (record.kind, record.user_type) == ("company", "Company")
    assert not (tmp_path / "tokens.db").exists()
    issued = simulator.state.tokens.issued()
    assert shown([added.out, added.err, listed.out, listed.err], issued) == []


async def test_add_with_redis_down_exits_1_before_spending_the_token(
    simulator, tmp_path, redis_server: RedisServer
):
    """An unreachable store fails add before the refresh: the imported token stays alive."""
    config = config_file(simulator, tmp_path, store={"redis_url": redis_server.url})
    old = simulator.state.grant(SIM_CLIENT_ID, location_id=LOCATION)
    redis_server.stop()
    before = refreshes(simulator)

    run = await tokens(
        config, "add", "--location", LOCATION, "--refresh-token-stdin", stdin=old["refresh_token"]
    )

    assert run.code == 1
    assert "Redis token store unavailable" in run.err
    assert refreshes(simulator) == before
    assert simulator.state.tokens.refresh_grant(old["refresh_token"]).alive is True


async def test_a_bad_config_exits_2_naming_the_key(simulator, tmp_path):
    """A bad config value is one line on stderr naming the key, and exit 2."""
    config = config_file(simulator, tmp_path, limits={"burst": {"requests": "abc"}})

    run = await tokens(config, "list")

    assert run.code == 2
    assert "limits.burst.requests" in run.err
    assert len(run.err.strip().splitlines()) == 1
