"""Config: defaults, validation messages, interpolation, secrets, example files."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import (
    AppConfig,
    CallerConfig,
    Config,
    describe_config,
    load_config,
    parse_config,
)
from proxy.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
SECRET = "s3cr3t-value-xyz"
KEY_SHA = "AB" * 32
APP = {"name": "main", "client_id": "6650f0fc2d1d-lwxyz123", "client_secret": SECRET}
CALLER = {"name": "crm", "key_sha256": KEY_SHA, "allow": ["location:*"]}
EXAMPLE_ENV = {
    "HOOPAI_CLIENT_ID": "6650f0fc2d1d-lwxyz123",
    "HOOPAI_CLIENT_SECRET": SECRET,
    "HOOPAI_ADMIN_TOKEN": "admin-token-value",
    "REDIS_URL": "redis://:redis-password@redis:6379/0",
}


def doc(**sections: Any) -> dict[str, Any]:
    """A valid document with one app, plus the given top-level keys."""
    return {"apps": [dict(APP)], **copy.deepcopy(sections)}


def with_value(key: str, value: object) -> dict[str, Any]:
    """A valid document (one app, one caller) with the dotted ``key`` set to ``value``."""
    document = doc(callers=[CALLER])
    parts = re.findall(r"\w+|\[\d+\]", key)
    target: Any = document
    for part, following in itertools.pairwise(parts):
        name: Any = int(part[1:-1]) if part.startswith("[") else part
        if isinstance(target, dict) and name not in target:
            target[name] = [] if following.startswith("[") else {}
        target = target[name]
    last = parts[-1]
    target[int(last[1:-1]) if last.startswith("[") else last] = value
    return document


def error(document: object, environ: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that parsing ``document`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(document, environ or {})
    return str(info.value)


def test_defaults_when_only_apps_given() -> None:
    """Every key but apps has the default the README promises."""
    config = parse_config(doc(), {})
    assert dataclasses.asdict(config) == {
        "server": {
            "host": "127.0.0.1",
            "port": 8080,
            "workers": 1,
            "max_body_bytes": 33554432,
            "replay_body_bytes": 1048576,
            "trust_network": False,
            "header_timeout_s": 10.0,
            "body_timeout_s": 60.0,
            "keepalive_timeout_s": 15.0,
            "max_connections": 4096,
        },
        "admin": {"host": "127.0.0.1", "port": 9090, "token": ""},
        "upstream": {
            "base_url": "https://services.leadconnectorhq.com",
            "default_version": "2021-07-28",
            "connect_timeout_s": 5.0,
            "timeout_s": 60.0,
            "max_connections": 256,
            "safe_resend_routes": (),
        },
        "apps": (
            {
                "name": "main",
                "client_id": "6650f0fc2d1d-lwxyz123",
                "client_secret": SECRET,
                "redirect_uri": "http://localhost:8080/_proxy/oauth/callback",
                "scopes": "",
            },
        ),
        "limits": {
            "mode": "enforce",
            "burst": {"requests": 100, "interval_ms": 10000, "pad_ms": 100, "max_pad_ms": 1000},
            "daily": {"requests": 200000, "timezone": "UTC", "reserve": 0},
            "max_tracked_keys": 100000,
            "learn": "down",
        },
        "queue": {"mode": "queue", "max_wait_ms": 30000},
        "store": {
            "redis_url": "",
            "redis_cluster": False,
            "sqlite_path": "./data/tokens.db",
            "on_redis_error": "local",
            "expected_replicas": 1,
            "encryption_key": "",
        },
        "callers": (),
        "default_resource": "",
        "tokens": {
            "refresh_skew_s": 300.0,
            "refresh_lock_ttl_s": 90.0,
            "refresh_token_max_age_days": 300,
            "keepalive_interval_s": 60.0,
            "max_concurrent_refreshes": 4,
            "authorize_url": "https://marketplace.gohighlevel.com/oauth/chooselocation",
            "accept_unsolicited_installs": False,
            "reconcile_interval_s": 3600.0,
        },
        "webhooks": {
            "ed25519_public_key": "",
            "rsa_public_key": "",
            "max_age_s": 300.0,
            "retry_after_s": 60,
            "forward_to": (),
            "forward_secret": "",
        },
        "alerts": {"webhook_url": "", "secret": "", "timeout_s": 10.0, "attempts": 5},
        "log": {"level": "INFO"},
    }


def test_parsed_values_have_their_declared_types() -> None:
    """Numbers from strings become int or float; lists become tuples."""
    config = parse_config(
        doc(server={"port": "8081"}, upstream={"timeout_s": "2.5"}, callers=[CALLER]), {}
    )
    assert config.server.port == 8081 and type(config.server.port) is int
    assert config.upstream.timeout_s == 2.5
    assert type(config.upstream.connect_timeout_s) is float
    assert config.callers[0].allow == ("location:*",)


def test_config_is_frozen() -> None:
    """A built config cannot be changed in place."""
    config = parse_config(doc(), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


def test_app_id_is_client_id_before_first_dash() -> None:
    """AppConfig.app_id is the marketplace app id inside the client_id."""
    app = AppConfig(name="main", client_id="6650f0fc2d1d-lwxyz123-x", client_secret="s")
    assert app.app_id == "6650f0fc2d1d"
    assert AppConfig(name="m", client_id="nodash", client_secret="s").app_id == "nodash"


def test_port_zero_is_allowed_for_listeners() -> None:
    """Port 0 (pick a free port) is valid for the server and admin listeners."""
    config = parse_config(doc(server={"port": 0}, admin={"port": "0"}), {})
    assert (config.server.port, config.admin.port) == (0, 0)


def test_normalised_values() -> None:
    """base_url loses trailing slashes; key_sha256 is lowercased; named zones load."""
    config = parse_config(
        doc(
            upstream={"base_url": "http://localhost:9000/api//"},
            limits={"daily": {"timezone": "UTC"}},
            callers=[CALLER],
        ),
        {},
    )
    assert config.upstream.base_url == "http://localhost:9000/api"
    assert config.callers[0].key_sha256 == KEY_SHA.lower()
    assert config.limits.daily.zone.utcoffset(None) is not None


POSITIVE = "must be a positive integer"
NON_NEGATIVE = "must be a non-negative integer"
PORT = "must be an integer from 0 to 65535 (0 picks a free port)"
SECONDS = "must be a positive number of seconds"
NON_EMPTY = "must be a non-empty string"
NAME = "must be a name made of letters, digits, '.', '_' or '-'"
RESOURCE = 'must be "" or "location:<id>" or "company:<id>"'
ALLOW = 'must be "*", "location:*", "company:*", "location:<id>" or "company:<id>"'
BASE_URL = "must be an http:// or https:// URL with a host and no query"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("server.host", "", NON_EMPTY),
        ("server.host", 12, "must be a string"),
        ("server.port", "abc", PORT),
        ("server.port", -1, PORT),
        ("server.port", 65536, PORT),
        ("server.port", True, PORT),
        ("server.port", 80.5, PORT),
        ("server.port", "8080.0", PORT),
        ("server.port", [8080], PORT),
        ("server.workers", 0, POSITIVE),
        ("server.max_body_bytes", "-5", POSITIVE),
        ("server.replay_body_bytes", 0, POSITIVE),
        ("tokens.refresh_skew_s", "-1", SECONDS),
        ("tokens.refresh_token_max_age_days", 0, POSITIVE),
        ("webhooks.max_age_s", 0, SECONDS),
        ("store.redis_cluster", "maybe", "must be true or false"),
        ("store.redis_cluster", 1, "must be true or false"),
        ("admin.host", "", NON_EMPTY),
        ("admin.port", 70000, PORT),
        ("upstream.base_url", "ftp://example.com", BASE_URL),
        ("upstream.base_url", "https://example.com/?a=1", BASE_URL),
        ("upstream.base_url", "https://example.com/#top", BASE_URL),
        ("upstream.base_url", "services.leadconnectorhq.com", BASE_URL),
        ("upstream.base_url", "https://", BASE_URL),
        ("upstream.base_url", "https://example.com:99999", BASE_URL),
        ("upstream.default_version", "", NON_EMPTY),
        ("upstream.connect_timeout_s", 0, SECONDS),
        ("upstream.connect_timeout_s", "-1", SECONDS),
        ("upstream.timeout_s", "abc", SECONDS),
        ("upstream.timeout_s", True, SECONDS),
        ("upstream.timeout_s", "inf", SECONDS),
        ("upstream.timeout_s", "nan", SECONDS),
        ("upstream.max_connections", 0, POSITIVE),
        ("apps[0].name", "", NAME),
        ("apps[0].name", "has space", NAME),
        ("apps[0].client_id", "  ", NON_EMPTY),
        ("apps[0].redirect_uri", "/callback", "must be an http:// or https:// URL with a host"),
        ("limits.mode", "off", 'must be "enforce" or "shadow"'),
        ("limits.burst.requests", "abc", POSITIVE),
        ("limits.burst.requests", 0, POSITIVE),
        ("limits.burst.requests", 1.5, POSITIVE),
        ("limits.burst.interval_ms", -10, POSITIVE),
        ("limits.burst.pad_ms", -1, NON_NEGATIVE),
        ("limits.daily.requests", 0, POSITIVE),
        (
            "limits.daily.timezone",
            "Mars/Olympus_Mons",
            "must be an IANA time zone name such as UTC or Europe/Paris",
        ),
        (
            "limits.daily.timezone",
            "../etc/passwd",
            "must be an IANA time zone name such as UTC or Europe/Paris",
        ),
        ("queue.mode", "wait", 'must be "queue" or "reject"'),
        ("queue.max_wait_ms", -5, NON_NEGATIVE),
        ("store.sqlite_path", "", NON_EMPTY),
        ("store.on_redis_error", "ignore", 'must be "local" or "reject"'),
        ("store.expected_replicas", 0, POSITIVE),
        ("callers[0].name", "a/b", NAME),
        ("callers[0].allow[0]", "user:1", ALLOW),
        ("callers[0].allow[0]", "location:", ALLOW),
        ("callers[0].allow[0]", "*:*", ALLOW),
        ("default_resource", "abc", RESOURCE),
        ("default_resource", "location:", RESOURCE),
        ("default_resource", "location:*", RESOURCE),
        ("default_resource", "user:1", RESOURCE),
    ],
)
def test_bad_value_names_key_and_reason(key: str, value: object, reason: str) -> None:
    """Each bad value gives one line: the dotted key, the reason, then the value."""
    message = error(with_value(key, value))
    assert message.startswith(f"{key}: {reason}, got ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"limits": {"burst": {"requests": "abc"}}},
            'limits.burst.requests: must be a positive integer, got "abc"',
        ),
        ({"server": {"port": True}}, f"server.port: {PORT}, got true"),
        ({"server": {"port": [1, 2]}}, f"server.port: {PORT}, got list"),
        ({"limits": [1, 2]}, "limits: must be a mapping, got list"),
        ({"limits": {"burst": "fast"}}, 'limits.burst: must be a mapping, got "fast"'),
        ({"callers": {"name": "x"}}, "callers: must be a list, got mapping"),
        ({"callers": [CALLER, "crm"]}, 'callers[1]: must be a mapping, got "crm"'),
        (
            {"callers": [{**CALLER, "allow": []}]},
            "callers[0].allow: must be a non-empty list, got []",
        ),
        ({"callers": [{**CALLER, "allow": "*"}]}, 'callers[0].allow: must be a list, got "*"'),
        ({"callers": [{"name": "x", "allow": ["*"]}]}, "callers[0].key_sha256: is required"),
    ],
)
def test_exact_messages(document: dict[str, Any], message: str) -> None:
    """Whole messages, for type and shape errors."""
    assert error(doc(**document)) == message


def test_null_means_default() -> None:
    """A key given as null (``key:`` or ``~`` in YAML) keeps its default."""
    config = parse_config(doc(server=None, admin={"token": None}, callers=None), {})
    assert config.server.port == 8080 and config.admin.token == "" and config.callers == ()


def test_apps_are_required() -> None:
    """No apps, an empty document, a null document or an empty list: apps is named."""
    assert error({}) == "apps: is required"
    assert error(None) == "apps: is required"
    assert error({"apps": []}) == "apps: must be a non-empty list, got []"
    for field in ("name", "client_id", "client_secret"):
        app = {k: v for k, v in APP.items() if k != field}
        assert error({"apps": [app]}) == f"apps[0].{field}: is required"


def test_document_must_be_a_mapping() -> None:
    """A top-level list or string is refused without a key."""
    assert error(["apps"]) == "the config must be a mapping, got list"
    assert error("apps") == 'the config must be a mapping, got "apps"'


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("limts", 'limts: unknown key (did you mean "limits"?)'),
        ("limits.brust", 'limits.brust: unknown key (did you mean "burst"?)'),
        ("limits.burst.request", 'limits.burst.request: unknown key (did you mean "requests"?)'),
        ("apps[0].clientid", 'apps[0].clientid: unknown key (did you mean "client_id"?)'),
        ("callers[0].allowed", 'callers[0].allowed: unknown key (did you mean "allow"?)'),
        ("store.redis", 'store.redis: unknown key (did you mean "redis_url"?)'),
        ("zzz", "zzz: unknown key"),
        ("server.qqq", "server.qqq: unknown key"),
    ],
)
def test_unknown_key_with_did_you_mean(key: str, message: str) -> None:
    """Unknown keys at any level are refused, suggesting the closest known key."""
    assert error(with_value(key, 1)) == message


def test_duplicate_names_and_ids_are_refused() -> None:
    """App names, app client_ids, caller names and caller keys are each unique."""
    twin = {**APP, "client_id": "other-id"}
    assert error({"apps": [APP, twin]}) == 'apps[1].name: must be unique, got "main"'
    twin = {**APP, "name": "second"}
    assert error({"apps": [APP, twin]}).startswith("apps[1].client_id: must be unique, got ")
    caller = {**CALLER, "key_sha256": "c" * 64}
    assert error(doc(callers=[CALLER, caller])) == 'callers[1].name: must be unique, got "crm"'
    caller = {**CALLER, "name": "other", "key_sha256": KEY_SHA.lower()}
    assert error(doc(callers=[CALLER, caller])) == (
        "callers[1].key_sha256: must be unique, got a value of 64 characters"
    )


def test_admin_token_required_off_loopback() -> None:
    """An admin listener beyond loopback needs a token; loopback hosts do not."""
    assert error(doc(admin={"host": "0.0.0.0"})) == (
        'admin.token: is required when admin.host ("0.0.0.0") is not a loopback address'
    )
    parse_config(doc(admin={"host": "0.0.0.0", "token": "t"}), {})
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        parse_config(doc(admin={"host": host}), {})


# -- interpolation ---------------------------------------------------------------------------


def test_interpolation_reads_the_given_environ() -> None:
    """${VAR} takes the variable's value from the mapping passed in."""
    config = parse_config(doc(admin={"token": "${TOKEN}"}), {"TOKEN": "tok"})
    assert config.admin.token == "tok"


def test_interpolation_default() -> None:
    """${VAR:-default} uses the default when VAR is unset or empty, as sh does."""
    document = doc(server={"host": "${HOST:-0.0.0.0}"})
    assert parse_config(document, {}).server.host == "0.0.0.0"
    assert parse_config(document, {"HOST": ""}).server.host == "0.0.0.0"
    assert parse_config(document, {"HOST": "10.0.0.1"}).server.host == "10.0.0.1"


def test_interpolation_empty_default_and_empty_value() -> None:
    """${VAR:-} gives "" when unset; ${VAR} set to "" gives ""."""
    assert parse_config(doc(default_resource="${RES:-}"), {}).default_resource == ""
    assert parse_config(doc(admin={"token": "${T}"}), {"T": ""}).admin.token == ""


def test_interpolation_unset_variable_names_key_and_variable() -> None:
    """${VAR} with VAR unset is an error naming the key and the variable."""
    document = {"apps": [{**APP, "client_id": "${HOOPAI_CLIENT_ID}"}]}
    assert error(document) == (
        "apps[0].client_id: environment variable HOOPAI_CLIENT_ID is not set"
    )


def test_interpolation_inside_a_string() -> None:
    """References may be part of a string, several in one value."""
    app = {**APP, "redirect_uri": "http://${HOST}:${PORT:-8080}/cb"}
    config = parse_config({"apps": [app]}, {"HOST": "example.com"})
    assert config.apps[0].redirect_uri == "http://example.com:8080/cb"


def test_dollar_dollar_is_a_literal_dollar() -> None:
    """$$ escapes a literal $, also in front of a brace; a lone $ stays as it is."""
    config = parse_config(doc(admin={"token": "pa$$word$${HOME}"}), {"HOME": "/root"})
    assert config.admin.token == "pa$word${HOME}"
    assert parse_config(doc(admin={"token": "a$b"}), {}).admin.token == "a$b"


def test_environment_values_are_not_parsed_or_expanded() -> None:
    """A value from the environment is taken verbatim: no YAML, no second expansion."""
    environ = {"T": "x: [1]\n- ${OTHER}", "OTHER": "no"}
    assert parse_config(doc(admin={"token": "${T}"}), environ).admin.token == environ["T"]


def test_interpolation_in_lists() -> None:
    """List items are interpolated too."""
    caller = {**CALLER, "allow": ["${ALLOW}"], "key_sha256": "${KEY}"}
    config = parse_config(doc(callers=[caller]), {"ALLOW": "company:c1", "KEY": "f" * 64})
    assert config.callers[0] == CallerConfig("crm", "f" * 64, ("company:c1",))


def test_numbers_from_the_environment() -> None:
    """Numeric keys accept interpolated strings and still check them."""
    document = doc(server={"port": "${PORT:-8080}"}, upstream={"timeout_s": "${T:-60}"})
    assert parse_config(document, {}).server.port == 8080
    config = parse_config(document, {"PORT": "9000", "T": "1.5"})
    assert (config.server.port, config.upstream.timeout_s) == (9000, 1.5)
    assert error(document, {"PORT": "http"}) == f'server.port: {PORT}, got "http"'


@pytest.mark.parametrize("text", ["${}", "${1ABC}", "${A-B}", "${OPEN", "x${A:default}"])
def test_bad_reference_is_an_error(text: str) -> None:
    """A malformed ${...} is refused, naming the key."""
    message = error(doc(server={"host": text}))
    assert message.startswith("server.host: bad reference: use ${NAME}, ${NAME:-default}")


def test_only_the_given_environ_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process environment is ignored: only the mapping passed in counts."""
    monkeypatch.setenv("HOOPAI_TEST_ONLY_VAR", "from-os")
    document = doc(admin={"token": "${HOOPAI_TEST_ONLY_VAR}"})
    assert error(document) == "admin.token: environment variable HOOPAI_TEST_ONLY_VAR is not set"


# -- secrets ---------------------------------------------------------------------------------


def secret_config() -> Config:
    """A config whose every secret is set to a recognisable value."""
    document = doc(
        admin={"token": "admin-token-value"},
        store={"redis_url": "redis://user:redis-password@redis:6379/0"},
        callers=[CALLER],
    )
    return parse_config(document, {})


SECRETS = (SECRET, "admin-token-value", "redis-password", KEY_SHA.lower())


def test_secrets_absent_from_repr() -> None:
    """repr() of the config shows no secret value."""
    text = repr(secret_config())
    assert not [secret for secret in SECRETS if secret in text]
    assert "client_id='6650f0fc2d1d-lwxyz123'" in text


def test_describe_masks_secrets() -> None:
    """describe_config shows "***" for set secrets and only masks a Redis password."""
    text = describe_config(secret_config())
    assert not [secret for secret in SECRETS if secret in text]
    described = yaml.safe_load(text)
    assert described["apps"][0]["client_secret"] == "***"
    assert described["admin"]["token"] == "***"
    assert described["callers"][0]["key_sha256"] == "***"
    assert described["store"]["redis_url"] == "redis://user:***@redis:6379/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("", ""),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://user:p@ss:word@redis:6380", "rediss://user:***@redis:6380"),
        ("redis://user@redis", "redis://user@redis"),
        ("unix:///run/redis.sock?db=1&password=pw", "unix:///run/redis.sock?db=1&password=***"),
    ],
)
def test_describe_masks_only_the_redis_password(url: str, shown: str) -> None:
    """A Redis URL is shown with its password, and only its password, masked."""
    config = parse_config(doc(store={"redis_url": url}), {})
    assert yaml.safe_load(describe_config(config))["store"]["redis_url"] == shown


def test_hook_urls_show_only_their_origin() -> None:
    """Alert and forward URLs may carry a secret in their path, userinfo or query:
    describe_config shows their origin only, and a bad one is never quoted."""
    config = parse_config(
        doc(
            webhooks={
                "forward_to": ["https://user:pw@hooks.example.com:8443/catch/S3CRET?k=Q"],
                "forward_secret": "k",
            },
            alerts={"webhook_url": "https://chat.example.com/services/T0/B0/S3CRET", "secret": "z"},
        ),
        {},
    )
    text = describe_config(config)
    assert "S3CRET" not in text and "pw" not in text
    described = yaml.safe_load(text)
    assert described["webhooks"]["forward_to"] == ["https://hooks.example.com:8443/***"]
    assert described["alerts"]["webhook_url"] == "https://chat.example.com/***"
    message = error(doc(alerts={"webhook_url": "ftp://host/S3CRET", "secret": "z"}))
    assert message.startswith("alerts.webhook_url:") and "S3CRET" not in message


def test_describe_shows_empty_secrets_as_empty() -> None:
    """An unset secret is described as "", so an operator sees it is missing."""
    described = yaml.safe_load(describe_config(parse_config(doc(), {})))
    assert described["admin"]["token"] == ""


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "store.redis_url",
            "http://:redis-password@x",
            "store.redis_url: must be empty or start with redis://, rediss:// or unix://, "
            "got a value of 24 characters",
        ),
        (
            "callers[0].key_sha256",
            "redis-password",
            "callers[0].key_sha256: must be 64 hex characters (the SHA-256 of the caller key), "
            "got a value of 14 characters",
        ),
        (
            "apps[0].client_secret",
            "   ",
            "apps[0].client_secret: must be a non-empty string, got a value of 3 characters",
        ),
        ("admin.token", 12345, "admin.token: must be a string, got a value of 5 characters"),
    ],
)
def test_secrets_absent_from_errors(key: str, value: object, message: str) -> None:
    """An error about a secret key gives the value's length, never the value."""
    assert error(with_value(key, value)) == message


# -- describe_config -------------------------------------------------------------------------


def key_tree(value: object) -> object:
    """The nested keys of a YAML value (mappings to dicts of keys, lists item by item)."""
    if isinstance(value, dict):
        return {key: key_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [key_tree(item) for item in value]
    return None


def test_describe_round_trips() -> None:
    """describe_config's YAML has the file's keys and parses back to the same values."""
    config = secret_config()
    described = yaml.safe_load(describe_config(config))
    assert key_tree(described) == key_tree(dataclasses.asdict(config))
    assert list(described) == [field.name for field in dataclasses.fields(Config)]
    without_callers = dataclasses.replace(config, callers=())
    reparsed = parse_config(yaml.safe_load(describe_config(without_callers)), {})
    assert reparsed == dataclasses.replace(
        without_callers,
        apps=(dataclasses.replace(config.apps[0], client_secret="***"),),
        admin=dataclasses.replace(config.admin, token="***"),
        store=dataclasses.replace(config.store, redis_url="redis://user:***@redis:6379/0"),
    )


# -- files -----------------------------------------------------------------------------------


def test_proxy_example_loads() -> None:
    """config/proxy.yaml loads: embedded store, one app from the environment."""
    environ = {**EXAMPLE_ENV, "HOOPAI_DEFAULT_RESOURCE": "location:abc123"}
    config = load_config(CONFIG_DIR / "proxy.yaml", environ)
    assert config.store.redis_url == "" and config.callers == ()
    assert config.apps[0].client_id == EXAMPLE_ENV["HOOPAI_CLIENT_ID"]
    assert config.apps[0].client_secret == SECRET
    assert config.default_resource == "location:abc123"
    assert config.server == parse_config(doc(), {}).server


def test_proxy_example_needs_only_the_app() -> None:
    """config/proxy.yaml needs only the client id and secret from the environment."""
    environ = {k: EXAMPLE_ENV[k] for k in ("HOOPAI_CLIENT_ID", "HOOPAI_CLIENT_SECRET")}
    assert load_config(str(CONFIG_DIR / "proxy.yaml"), environ).default_resource == ""
    with pytest.raises(ConfigError, match=r"^apps\[0\]\.client_secret: environment variable"):
        load_config(CONFIG_DIR / "proxy.yaml", {"HOOPAI_CLIENT_ID": "x"})


def test_gateway_example_loads() -> None:
    """config/gateway.yaml loads: Redis, three replicas, two callers, admin token."""
    config = load_config(CONFIG_DIR / "gateway.yaml", EXAMPLE_ENV)
    assert config.server.host == "0.0.0.0"
    assert config.store.redis_url == EXAMPLE_ENV["REDIS_URL"]
    assert config.store.on_redis_error == "local"
    assert config.store.expected_replicas == 3
    assert [caller.name for caller in config.callers] == ["crm-sync", "billing"]
    assert all(caller.allow for caller in config.callers)
    assert config.admin.token == "admin-token-value"


def test_gateway_example_requires_redis_url() -> None:
    """config/gateway.yaml without REDIS_URL names the key and the variable."""
    environ = {k: v for k, v in EXAMPLE_ENV.items() if k != "REDIS_URL"}
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG_DIR / "gateway.yaml", environ)
    assert str(info.value) == "store.redis_url: environment variable REDIS_URL is not set"


def test_no_file_is_an_empty_document() -> None:
    """load_config(None, ...) parses an empty document, so apps is missing."""
    with pytest.raises(ConfigError) as info:
        load_config(None, EXAMPLE_ENV)
    assert str(info.value) == "apps: is required"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A file that does not exist, or a directory, is an error naming the path."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, {})
    assert str(info.value) == f"{missing}: cannot read the file: No such file or directory"
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path, {})


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    """Invalid YAML is an error naming the file and the line."""
    path = tmp_path / "bad.yaml"
    path.write_text("apps:\n  - name: main\n    client_id: [unclosed\nserver: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert re.fullmatch(
        rf"{re.escape(str(path))}: invalid YAML at line \d+, column \d+: .+", message
    )
    assert "line 4" in message


def test_duplicate_yaml_key_names_line(tmp_path: Path) -> None:
    """A key repeated in one mapping is refused with its line, not silently overwritten."""
    path = tmp_path / "dup.yaml"
    path.write_text("server:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f'{path}: invalid YAML at line 3, column 3: duplicate key "port"'


def test_not_utf8_file(tmp_path: Path) -> None:
    """A file that is not UTF-8 is refused with the file named."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"server:\n  host: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value) == f"{path}: cannot read the file: it is not UTF-8 text"


def test_yaml_scalars_stay_strings(tmp_path: Path) -> None:
    """No YAML 1.1 surprises: unquoted dates, octal-looking and yes/no values stay text."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "upstream:\n  default_version: 2021-07-28\n"
        "apps:\n  - name: no\n    client_id: 0123\n    client_secret: 0x1F\n"
        "server:\n  port: 08080\n  host: ~\n"
    )
    config = load_config(path, {})
    assert config.upstream.default_version == "2021-07-28"
    assert (config.apps[0].name, config.apps[0].client_id) == ("no", "0123")
    assert config.apps[0].client_secret == "0x1F"
    assert (config.server.port, config.server.host) == (8080, "127.0.0.1")


def test_interpolated_yaml_file(tmp_path: Path) -> None:
    """Unquoted ${VAR:-default} in a file is read after parsing, then coerced."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "server:\n  port: ${PORT:-8080}\n"
        "apps:\n  - {name: main, client_id: '${ID}', client_secret: '${SECRET}'}\n"
    )
    config = load_config(path, {"ID": "a-b", "SECRET": "s", "PORT": "9999"})
    assert config.server.port == 9999 and config.apps[0].app_id == "a"


def test_refresh_lock_must_outlive_the_slowest_refresh() -> None:
    """A lock shorter than a refresh could expire mid-refresh and let a token be spent twice."""
    message = error(doc(tokens={"refresh_lock_ttl_s": 30}))
    assert message == (
        "tokens.refresh_lock_ttl_s: must be at least 1 s longer than the slowest refresh "
        "(upstream.timeout_s + upstream.connect_timeout_s = 65 s), got 30"
    )
    assert error(doc(tokens={"refresh_lock_ttl_s": 65.5})).startswith("tokens.refresh_lock")
    assert parse_config(doc(tokens={"refresh_lock_ttl_s": 66}), {}).tokens.refresh_lock_ttl_s == 66


def test_redis_cluster_flag_from_the_environment() -> None:
    """store.redis_cluster takes true/false, also from an environment variable."""
    document = doc(store={"redis_cluster": "${CLUSTER:-false}"})
    assert parse_config(document, {"CLUSTER": "true"}).store.redis_cluster is True
    assert parse_config(document, {}).store.redis_cluster is False


def test_several_workers_need_redis_to_share_limits() -> None:
    """workers > 1 without Redis would multiply the limits: refused, naming the key."""
    assert error(doc(server={"workers": 2})).startswith(
        "server.workers: must be 1 without store.redis_url"
    )
    document = doc(server={"workers": 2}, store={"redis_url": "redis://localhost:6379/0"})
    assert parse_config(document, {}).server.workers == 2
