"""docker-compose.yml and what it mounts agree: files exist, ports match the configs,
every variable the proxy config reads is provided, the config loads with the real loader
in the compose environment, and Prometheus scrapes each replica's admin port.

No docker here: the compose file is read as YAML and its `${...}` values are expanded the
way compose expands them, with sample values for the variables compose requires.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import re
import shlex
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import Config, load_config
from proxy.simulator.cli import apps_from

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "compose.env.example"
# What the README and the env example tell a user to set for the sim profile.
SIM_UPSTREAM = "http://simulator:8088"
# A value for every variable compose requires (${VAR:?...}), valid for the proxy's checks.
SAMPLE_ENV = {
    "HOOPAI_CLIENT_ID": "6650f1a2b3c4d5e6f7a8b9c0-sample01",
    "HOOPAI_CLIENT_SECRET": "sample-client-secret",
    "HOOPAI_ADMIN_TOKEN": "sample-admin-token",
    "HOOPAI_ENCRYPTION_KEY": base64.urlsafe_b64encode(b"k" * 32).decode(),
    "HOOPAI_APP_KEY_SHA256": hashlib.sha256(b"app key").hexdigest(),
    "HOOPAI_REPORTS_KEY_SHA256": hashlib.sha256(b"reports key").hexdigest(),
}

# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}.
_COMPOSE_REF = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)
# The proxy config's references: ${VAR} or ${VAR:-default}.
_CONFIG_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<default>:-[^}]*)?\}")


class MissingVariable(Exception):
    """A variable compose requires (${VAR:?...}) is unset."""


def expand(text: str, env: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?") and unset:
            raise MissingVariable(name)
        if op and op.endswith("-") and unset:
            return arg
        return value or ""

    return _COMPOSE_REF.sub(one, text)


def expanded(value: Any, env: Mapping[str, str]) -> Any:
    """A compose value with every string expanded, as compose does before using it."""
    if isinstance(value, str):
        return expand(value, env)
    if isinstance(value, list):
        return [expanded(item, env) for item in value]
    if isinstance(value, dict):
        return {key: expanded(item, env) for key, item in value.items()}
    return value


def compose(env: Mapping[str, str] = SAMPLE_ENV) -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return typing.cast(dict[str, Any], expanded(document, env))


def bind_mounts(service: Mapping[str, Any]) -> Iterator[tuple[Path, str]]:
    """(host path, container path) of the service's bind mounts (named volumes left out)."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            yield (ROOT / source).resolve(), target


def proxy_services(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the proxy: those told where their config is."""
    return {
        name: service
        for name, service in document["services"].items()
        if "HOOPAI_PROXY_CONFIG" in service.get("environment", {})
    }


def mounted_file(service: Mapping[str, Any], path: str) -> Path:
    """The host file the service sees at `path`: mounted itself, or in a mounted folder."""
    found = [
        source / Path(path).relative_to(target)
        for source, target in bind_mounts(service)
        if path == target or path.startswith(target.rstrip("/") + "/")
    ]
    assert len(found) == 1, f"{path} is not mounted once: {found}"
    return found[0]


def mounted_config(service: Mapping[str, Any]) -> Path:
    """The host file mounted where the service's HOOPAI_PROXY_CONFIG points."""
    return mounted_file(service, service["environment"]["HOOPAI_PROXY_CONFIG"])


def load_for(service: Mapping[str, Any]) -> Config:
    """The service's config, loaded by the proxy's own loader in the service's environment."""
    environ = {key: str(value) for key, value in service["environment"].items()}
    return load_config(mounted_config(service), environ)


def target_ports(service: Mapping[str, Any]) -> set[int]:
    """The container ports the service publishes ("[ip:]host:container")."""
    return {int(str(entry).rsplit(":", 1)[-1]) for entry in service.get("ports", [])}


def command_option(service: Mapping[str, Any], name: str) -> str:
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return words[i + 1]
    raise AssertionError(f"{name} not in {words}")


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_every_file_the_compose_file_references_exists() -> None:
    """The build context holds the Dockerfile, and every bind-mounted file (the proxy
    config, the Prometheus config) exists; named volumes and secrets are declared, and
    .dockerignore keeps .env (the secrets) out of the build context."""
    document = compose()
    services = document["services"]
    built = [service for service in services.values() if "build" in service]
    assert built, "nothing is built from the project"
    for service in built:
        build = service["build"]
        context = ROOT / (build["context"] if isinstance(build, dict) else build)
        dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else ""
        assert (context / (dockerfile or "Dockerfile")).is_file()
    mounted = 0
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            mounted += 1
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in document["volumes"], f"{name}: volume {source} not declared"
        for secret in service.get("secrets", []):
            assert secret in document["secrets"], f"{name}: secret {secret} not declared"
    assert mounted >= 3  # each replica's config and Prometheus's
    for name, service in proxy_services(document).items():
        assert mounted_config(service).is_file(), name
    prometheus = services["prometheus"]
    assert mounted_file(prometheus, command_option(prometheus, "--config.file")).is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored


def test_redis_is_append_only_on_a_named_volume() -> None:
    """Redis persists with appendonly yes into a named volume mounted at its /data, and the
    replicas' REDIS_URL names it on the port it listens on."""
    document = compose()
    redis = document["services"]["redis"]
    assert command_option(redis, "--appendonly") == "yes"
    [data] = [v for v in redis["volumes"] if v.split(":")[1] == "/data"]
    assert data.split(":")[0] in document["volumes"]
    port = int(command_option(redis, "--port"))
    assert port == 6379
    for name, service in proxy_services(document).items():
        url = urlsplit(load_for(service).store.redis_url)
        assert (url.hostname, url.port) == ("redis", port), name


def test_ports_match_the_mounted_proxy_config() -> None:
    """Each replica publishes its config's server.port, exposes its admin.port to the
    network, and its health check asks that server.port; there are two replicas, each
    with caller keys and one process (so a scrape sees the whole replica)."""
    replicas = proxy_services(compose())
    assert len(replicas) == 2
    host_ports = []
    for name, service in replicas.items():
        config = load_for(service)
        assert target_ports(service) == {config.server.port}, name
        assert str(config.admin.port) in [str(port) for port in service["expose"]], name
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{config.server.port}/_proxy/readyz" in probe, name
        assert len(config.callers) == 2 and config.server.workers == 1, name
        host_ports += [str(entry).split(":")[0] for entry in service["ports"]]
    assert len(set(host_ports)) == len(host_ports), "two replicas on one host port"


def test_every_variable_the_proxy_config_reads_is_provided() -> None:
    """Each ${VAR} the mounted config reads without a default is in the replica's
    environment, every variable compose requires is in the env example, and the config
    loads with the proxy's loader: the real API by default, the simulator when
    UPSTREAM_BASE_URL says so."""
    document = compose()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", COMPOSE.read_text()))
    example = ENV_EXAMPLE.read_text()
    for name in required:
        assert re.search(rf"^{name}=", example, re.MULTILINE), f"{name} not in {ENV_EXAMPLE}"
    assert f"UPSTREAM_BASE_URL={SIM_UPSTREAM}" in example
    for name, service in proxy_services(document).items():
        raw = yaml.safe_load(mounted_config(service).read_text())
        references = [m for text in strings(raw) for m in _CONFIG_REF.finditer(text)]
        assert references
        for match in references:
            if match.group("default") is None:
                assert match.group("name") in service["environment"], (name, match.group(0))
        config = load_for(service)
        assert config.upstream.base_url == "https://services.leadconnectorhq.com"
        assert config.admin.token == SAMPLE_ENV["HOOPAI_ADMIN_TOKEN"]
    with_sim = compose({**SAMPLE_ENV, "UPSTREAM_BASE_URL": SIM_UPSTREAM})
    for service in proxy_services(with_sim).values():
        assert load_for(service).upstream.base_url == SIM_UPSTREAM


def test_compose_refuses_to_start_without_a_secret() -> None:
    """Every secret the proxy config holds (fields kept out of repr) comes from a bare
    ${VAR} that compose requires, so nothing secret has a committed value or default;
    only the Redis URL is written in the compose file, and it carries no password."""
    [(name, service), *_] = proxy_services(compose()).items()
    raw = yaml.safe_load(mounted_config(service).read_text())
    written = yaml.safe_load(COMPOSE.read_text())["services"][name]["environment"]
    secrets = list(_secret_values(Config, raw))
    assert len(secrets) >= 6  # admin token, client secret, Redis URL, Fernet key, 2 callers
    for key, value in secrets:
        found = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", str(value))
        assert found, f"{key}: a secret must be a bare ${{VAR}}, got a literal or a default"
        variable = found.group(1)
        if "${" not in written[variable]:
            assert key == "store.redis_url" and urlsplit(written[variable]).password is None
            continue
        missing = {k: v for k, v in SAMPLE_ENV.items() if k != variable}
        with pytest.raises(MissingVariable):
            compose(missing)


def _secret_values(cls: type[Any], raw: Any, key: str = "") -> Iterator[tuple[str, object]]:
    """(key, raw value) of every field with repr=False in a raw config section."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name not in raw:
            continue
        where = f"{key}.{field.name}".lstrip(".")
        hint = hints[field.name]
        if not field.repr:
            yield where, raw[field.name]
        elif typing.get_origin(hint) is tuple:
            [item, *_] = typing.get_args(hint)
            if dataclasses.is_dataclass(item) and isinstance(item, type):
                for i, value in enumerate(raw[field.name] or []):
                    yield from _secret_values(item, value, f"{where}[{i}]")
        elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
            yield from _secret_values(hint, raw[field.name], where)


def strings(value: Any) -> Iterator[str]:
    """Every string value in a parsed YAML document (comments are gone)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)


def test_stop_grace_outlasts_a_held_request() -> None:
    """Compose waits longer after SIGTERM than a held request may take (queue.max_wait_ms
    plus upstream.timeout_s, the grace `serve` gives), so a redeploy does not kill it."""
    for name, service in proxy_services(compose()).items():
        config = load_for(service)
        grace_s = config.queue.max_wait_ms / 1000 + config.upstream.timeout_s
        assert seconds(service["stop_grace_period"]) > grace_s, name


def test_the_simulator_profile_serves_what_the_replicas_are_pointed_at() -> None:
    """The simulator runs only under the sim profile, listens (and is published) on the
    port of the URL the replicas are told to use, and accepts the replicas' app, given in
    its environment (as the simulator reads it), never on its command line."""
    simulator = compose()["services"]["simulator"]
    assert simulator["profiles"] == ["sim"]
    url = urlsplit(SIM_UPSTREAM)
    assert url.hostname == "simulator"
    assert command_option(simulator, "--host") == "0.0.0.0"
    assert int(command_option(simulator, "--port")) == url.port
    assert target_ports(simulator) == {url.port}
    client = (SAMPLE_ENV["HOOPAI_CLIENT_ID"], SAMPLE_ENV["HOOPAI_CLIENT_SECRET"])
    environment = {name: str(value) for name, value in simulator["environment"].items()}
    assert apps_from(argparse.Namespace(apps=None), environment) == [client]
    assert client[1] not in str(simulator["command"])  # `ps` shows a command line


def test_prometheus_scrapes_each_replicas_admin_port_with_the_admin_token() -> None:
    """Prometheus loads the mounted deploy/prometheus.yml, whose one job targets exactly
    each replica's service name and admin.port, with the bearer token read from a secret
    filled from the variable the replicas' admin.token reads."""
    document = compose()
    prometheus = document["services"]["prometheus"]
    source = mounted_file(prometheus, command_option(prometheus, "--config.file"))
    assert source == ROOT / "deploy" / "prometheus.yml"
    scrape = yaml.safe_load(source.read_text())
    [job] = scrape["scrape_configs"]
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    replicas = proxy_services(document)
    expected = {f"{name}:{load_for(service).admin.port}" for name, service in replicas.items()}
    assert targets == expected
    assert job.get("metrics_path", "/metrics") == "/metrics"
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer"
    [secret] = [s for s in prometheus["secrets"] if auth["credentials_file"] == f"/run/secrets/{s}"]
    variable = document["secrets"][secret]["environment"]
    raw = yaml.safe_load(COMPOSE.read_text())
    for name in replicas:
        admin_token = yaml.safe_load(mounted_config(replicas[name]).read_text())["admin"]["token"]
        assert admin_token == f"${{{variable}}}"
        assert raw["services"][name]["environment"][variable].startswith(f"${{{variable}:?")
