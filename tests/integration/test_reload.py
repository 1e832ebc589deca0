"""Config reload of a running `hoopai-proxy serve` process: SIGHUP and `hoopai-proxy reload`
apply callers and limits in place without dropping a queued request, refuse a change that
needs a restart or a malformed file (the old config keeps serving), and reach every forked
worker."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml

from proxy.config import load_config
from proxy.harness.processes import ServiceProcess
from proxy.reloader import request_reload
from tests.conftest import SIM_CLIENT_ID

pytestmark = pytest.mark.slow

KEY_A, KEY_B = "reload-test-caller-a", "reload-test-caller-b"


def caller(name: str, key: str) -> dict[str, Any]:
    return {
        "name": name,
        "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
        "allow": ["location:*"],
    }


def config_path(proxy: ServiceProcess) -> Path:
    return Path(proxy.args[proxy.args.index("--config") + 1])


def rewrite(proxy: ServiceProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the proxy's config file in place (as an operator edits it)."""
    path = config_path(proxy)
    document = yaml.safe_load(path.read_text())
    changed = copy.deepcopy(document)
    change(changed)
    path.write_text(yaml.safe_dump(changed, sort_keys=False))


def reload_records(proxy: ServiceProcess) -> list[dict[str, Any]]:
    """The proxy's log lines about a reload (JSON objects carrying `reload`)."""
    records = []
    for line in proxy.logs().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "reload" in record:
            records.append(record)
    return records


async def until(condition: Callable[[], bool], proxy: ServiceProcess) -> None:
    """Return once `condition` holds, looking every 20 ms; fail if the proxy exits."""
    while not condition():
        assert proxy.process is not None and proxy.process.poll() is None, proxy.logs()
        await asyncio.sleep(0.02)


async def until_logged(proxy: ServiceProcess, count: int) -> list[dict[str, Any]]:
    """The reload lines, once there are `count` of them."""
    await until(lambda: len(reload_records(proxy)) >= count, proxy)
    return reload_records(proxy)


async def call(
    http: aiohttp.ClientSession, proxy: ServiceProcess, key: str, token: str, **headers: str
) -> int:
    """One GET through the proxy with caller key `key` and the location's own token."""
    sent = {"X-HoopAI-Proxy-Key": key, "Authorization": f"Bearer {token}", **headers}
    async with http.get(f"{proxy.url}/contacts/", headers=sent) as answer:
        await answer.read()
        return answer.status


async def status_json(http: aiohttp.ClientSession, proxy: ServiceProcess) -> dict[str, Any]:
    async with http.get(f"{proxy.admin_url}/status.json") as answer:
        assert answer.status == 200
        document: dict[str, Any] = await answer.json()
        return document


def token_for(simulator: Any, location: str) -> str:
    return str(simulator.state.grant(SIM_CLIENT_ID, location_id=location)["access_token"])


async def test_sighup_applies_callers_and_limits_and_keeps_queued_requests(
    simulator, spawn_proxy, http
) -> None:
    """SIGHUP with a second caller and a lower burst limit in the file: the new caller's key
    is accepted, /status.json shows the new limit and decisions follow it, and a request
    queued before the reload still gets its 200."""
    token, other_token = token_for(simulator, "reloadLoc1"), token_for(simulator, "reloadLoc2")
    proxy = spawn_proxy(
        simulator.url,
        callers=[caller("crm", KEY_A)],
        limits={"burst": {"requests": 2, "interval_ms": 3000, "pad_ms": 50}},
        queue={"max_wait_ms": 10000},
    )
    assert await call(http, proxy, KEY_B, other_token) == 401
    assert [await call(http, proxy, KEY_A, token) for _ in range(2)] == [200, 200]
    # The window is full: the third waits for a slot.
    queued = asyncio.create_task(call(http, proxy, KEY_A, token))

    async def waiting() -> bool:
        rows = (await status_json(http, proxy))["resources"]
        return any(row["id"] == "reloadLoc1" and row["waiting"] == 1 for row in rows)

    while not await waiting():
        assert not queued.done(), "the third request was not held"
        await asyncio.sleep(0.02)

    def more_callers_fewer_requests(document: dict[str, Any]) -> None:
        document["callers"].append(caller("reports", KEY_B))
        document["limits"]["burst"]["requests"] = 1

    rewrite(proxy, more_callers_fewer_requests)
    proxy.signal(signal.SIGHUP)
    [record] = await until_logged(proxy, 1)
    assert record["reload"] == "applied"
    assert set(record["changed"]) == {"callers", "limits.burst.requests"}
    assert (await status_json(http, proxy))["limits"]["burst"] == 1
    assert await call(http, proxy, KEY_B, other_token) == 200
    # The new limit decides: a second request in the window is refused (2 were allowed).
    assert await call(http, proxy, KEY_B, other_token, **{"X-HoopAI-Max-Wait-Ms": "0"}) == 429
    assert not queued.done(), "the queued request was answered before its slot"
    assert await queued == 200


async def reload_command(config: Path, admin_url: str) -> tuple[int, str]:
    """`hoopai-proxy reload --config FILE --admin-url URL`: (exit code, its output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.cli",
        "reload",
        "--config",
        str(config),
        "--admin-url",
        admin_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_refusals_keep_the_running_config_and_the_command_says_so(
    simulator, spawn_proxy, http, capsys
) -> None:
    """A new server.port (beside a new caller) is refused by SIGHUP and by the reload
    command (exit 2, naming the key), a malformed file too; the old config keeps serving
    throughout; then a good file is applied by the command (exit 0), and a new admin token
    and log level by SIGHUP."""
    token = token_for(simulator, "reloadLoc3")
    proxy = spawn_proxy(simulator.url, callers=[caller("crm", KEY_A)])
    original = config_path(proxy).read_text()

    def new_port_and_caller(document: dict[str, Any]) -> None:
        document["server"]["port"] = 18089
        document["callers"].append(caller("reports", KEY_B))

    rewrite(proxy, new_port_and_caller)
    proxy.signal(signal.SIGHUP)
    [refused] = await until_logged(proxy, 1)
    assert refused["level"] == "error" and refused["reload"] == "refused"
    assert refused["refused"] == ["server.port"]
    assert "server.port" in refused["msg"]
    # What `hoopai-proxy reload` runs, in a thread here (a new interpreter costs seconds).
    running = load_config(config_path(proxy), {})
    code = await asyncio.to_thread(request_reload, running, proxy.admin_url)
    assert code == 2
    assert "server.port" in capsys.readouterr().err
    assert await call(http, proxy, KEY_B, token) == 401
    assert await call(http, proxy, KEY_A, token) == 200

    config_path(proxy).write_text(original + "\nlimits: [unclosed\n")
    proxy.signal(signal.SIGHUP)
    records = await until_logged(proxy, 3)
    assert [record["reload"] for record in records[:2]] == ["refused", "refused"]
    assert records[2]["reload"] == "invalid" and "invalid YAML" in records[2]["msg"]
    assert await call(http, proxy, KEY_A, token) == 200

    rewrite_from = yaml.safe_load(original)
    rewrite_from["callers"].append(caller("reports", KEY_B))
    config_path(proxy).write_text(yaml.safe_dump(rewrite_from, sort_keys=False))
    code, output = await reload_command(config_path(proxy), proxy.admin_url)
    assert code == 0, output
    assert "callers" in output
    assert await call(http, proxy, KEY_B, token) == 200

    # The admin token changes in place too: the admin listener asks for it at once.
    admin_token = "reload-test-admin-token"
    rewrite(proxy, lambda document: document["admin"].update(token=admin_token))
    proxy.signal(signal.SIGHUP)
    assert (await until_logged(proxy, 5))[4]["changed"] == ["admin.token"]
    async with http.get(f"{proxy.admin_url}/status.json") as answer:
        assert answer.status == 401
    bearer = {"Authorization": f"Bearer {admin_token}"}
    async with http.get(f"{proxy.admin_url}/status.json", headers=bearer) as answer:
        assert answer.status == 200

    # log.level too: once WARNING, an applied reload's INFO line is no longer written,
    # and the refused one after it (ERROR) is.
    rewrite(proxy, lambda document: document.update(log={"level": "WARNING"}))
    proxy.signal(signal.SIGHUP)
    assert (await until_logged(proxy, 6))[5]["changed"] == ["log.level"]
    rewrite(proxy, lambda document: document.update(queue={"max_wait_ms": 1000}))
    with_token = load_config(config_path(proxy), {})  # the command sends the file's token
    assert await asyncio.to_thread(request_reload, with_token, proxy.admin_url) == 0
    rewrite(proxy, lambda document: document["server"].update(port=18089))
    assert await asyncio.to_thread(request_reload, with_token, proxy.admin_url) == 2
    assert [record["reload"] for record in (await until_logged(proxy, 7))[6:]] == ["refused"]


async def test_sighup_reaches_every_forked_worker(
    simulator, spawn_proxy, redis_server, http
) -> None:
    """With server.workers: 2, SIGHUP to the parent reloads both workers: each logs the
    reload, and requests spread over new connections all accept the new caller's key; a
    `hoopai-proxy reload` (POST /reload, answered by one worker) reloads both too."""
    token = token_for(simulator, "reloadLoc4")
    proxy = spawn_proxy(
        simulator.url,
        server={"workers": 2},
        store={"redis_url": redis_server.url},
        callers=[caller("crm", KEY_A)],
    )
    assert proxy.process is not None
    workers = {child.pid for child in psutil.Process(proxy.process.pid).children()}
    assert len(workers) == 2
    rewrite(proxy, lambda document: document["callers"].append(caller("reports", KEY_B)))
    proxy.signal(signal.SIGHUP)
    records = await until_logged(proxy, 2)
    assert {record["pid"] for record in records} == workers
    assert {record["reload"] for record in records} == {"applied"}
    statuses = await asyncio.gather(
        *(call(http, proxy, KEY_B, token, Connection="close") for _ in range(10))
    )
    assert statuses == [200] * 10

    # POST /reload reaches one worker; it has the parent pass SIGHUP on to the others.
    rewrite(proxy, lambda document: document.update(limits={"burst": {"requests": 7}}))
    running = load_config(config_path(proxy), {})
    assert await asyncio.to_thread(request_reload, running, proxy.admin_url) == 0

    def applied_limits() -> set[int]:
        return {
            record["pid"]
            for record in reload_records(proxy)
            if "limits.burst.requests" in record["changed"] and record["reload"] == "applied"
        }

    await until(lambda: applied_limits() == workers, proxy)
