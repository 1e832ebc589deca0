"""No open relay (issue 7, finding 2): a proxy reachable from a network serves only callers
with keys, unless the operator says the network itself is trusted.

`serve` and `check-config` run as processes, the way an operator (or the Dockerfile) runs
them; the shipped example configs are checked as shipped."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.harness.processes import proxy_process, write_config
from tests.conftest import SIM_CLIENT_ID, SIM_CLIENT_SECRET, base_document, merged

REPO = Path(__file__).resolve().parents[2]
APP_ENV = {"HOOPAI_CLIENT_ID": SIM_CLIENT_ID, "HOOPAI_CLIENT_SECRET": SIM_CLIENT_SECRET}

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def network_config(tmp_path: Path, **overrides: Any) -> Path:
    document = merged(base_document("http://127.0.0.1:9"), {"server": {"host": "0.0.0.0"}})
    return write_config(tmp_path / "proxy.yaml", merged(document, overrides))


def assert_names_both_ways_out(stderr: str) -> None:
    assert stderr.startswith("hoopai-proxy: config error: server.host:"), stderr
    assert "callers" in stderr and "server.trust_network: true" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_network_host_without_callers_is_refused(tmp_path: Path, command: str) -> None:
    """0.0.0.0 with no callers: exit 2 and one line naming server.host and both ways out
    (configure callers, or server.trust_network: true). `serve` binds nothing."""
    result = run_cli(command, "--config", str(network_config(tmp_path)))
    assert result.returncode == 2
    assert_names_both_ways_out(result.stderr)
    assert "listening" not in result.stdout


def test_dockerfile_defaults_are_refused_until_the_operator_chooses() -> None:
    """The container's defaults (config/proxy.yaml with HOOPAI_PROXY_HOST=0.0.0.0, as the
    Dockerfile sets) refuse to serve; HOOPAI_TRUST_NETWORK=true is the explicit opt-in."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "HOOPAI_PROXY_HOST=0.0.0.0" in dockerfile
    env = {**APP_ENV, "HOOPAI_PROXY_HOST": "0.0.0.0"}
    refused = run_cli("check-config", "config/proxy.yaml", env=env)
    assert refused.returncode == 2
    assert_names_both_ways_out(refused.stderr)
    trusted = run_cli(
        "check-config", "config/proxy.yaml", env={**env, "HOOPAI_TRUST_NETWORK": "true"}
    )
    assert trusted.returncode == 0, trusted.stderr
    assert "trust_network: true" in trusted.stdout


def test_gateway_example_has_callers_and_passes() -> None:
    """The shared-gateway example listens on the network and is accepted: it has callers."""
    env = {**APP_ENV, "REDIS_URL": "redis://127.0.0.1:6379/0", "HOOPAI_ADMIN_TOKEN": "t" * 32}
    result = run_cli("check-config", "config/gateway.yaml", env=env)
    assert result.returncode == 0, result.stderr


def test_loopback_and_callers_need_no_opt_in(tmp_path: Path) -> None:
    """Loopback without callers, and a network host with callers, are both accepted."""
    loopback = network_config(tmp_path, server={"host": "127.0.0.1"})
    assert run_cli("check-config", str(loopback)).returncode == 0
    digest = hashlib.sha256(b"some-caller-key").hexdigest()
    with_callers = network_config(
        tmp_path, callers=[{"name": "svc", "key_sha256": digest, "allow": ["*"]}]
    )
    assert run_cli("check-config", str(with_callers)).returncode == 0


async def test_trusted_network_serves_and_warns_once(tmp_path: Path, simulator) -> None:
    """server.trust_network: true serves on 0.0.0.0 (reached here over loopback) and logs
    one warning at start saying anything that reaches the port uses the tokens."""
    document = merged(
        base_document(simulator.url), {"server": {"host": "0.0.0.0", "trust_network": True}}
    )
    document["store"] = {"sqlite_path": str(tmp_path / "tokens.db")}
    config_path = write_config(tmp_path / "proxy.yaml", document)
    process = proxy_process(config_path, tmp_path / "proxy.log").start()
    try:
        port = process.url.rsplit(":", 1)[1]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/_proxy/healthz") as answer,
        ):
            assert answer.status == 200
    finally:
        assert process.stop() == 0
    warnings = [line for line in process.logs().splitlines() if "trust_network" in line]
    assert len(warnings) == 1 and '"level": "warning"' in warnings[0]
