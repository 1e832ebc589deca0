"""The proxy's configuration: frozen dataclasses, and the pure loader that builds them.

Owns the config contract (README.md, "Configuration": every key, its default and its rule), the
``${VAR}`` / ``${VAR:-default}`` interpolation, and ``describe_config`` for
``hoopai-proxy check-config``. Nothing is read at import time: ``load_config(path, environ)``
reads exactly that file and that mapping.

The schema is the dataclasses themselves. A generic walker builds each one from
``dataclasses.fields()`` and the type hints (a dataclass is a mapping, ``tuple[X, ...]`` a
list); a scalar field's ``metadata["check"]`` coerces and validates its value (a list's
``metadata["item"]`` does so for each element). A field with ``repr=False`` is a secret:
masked by ``describe_config`` and never echoed in an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import typing
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, tzinfo
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

from proxy.errors import ConfigError
from proxy.tokens.sealing import Sealer
from proxy.tokens.webhooks import WebhookKeyError, WebhookKeys

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")
Check = Callable[[object], object]


class _Invalid(Exception):
    """A check's verdict on a value; the walker adds the key and the value."""


# -- checks: each coerces a raw value (after interpolation) or raises _Invalid ----------------


def _integer(low: int, high: int | None, reason: str) -> Check:
    def check(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(reason)
        if value < low or (high is not None and value > high):
            raise _Invalid(reason)
        return value

    return check


_POSITIVE = _integer(1, None, "must be a positive integer")
_NON_NEGATIVE = _integer(0, None, "must be a non-negative integer")
# Port 0 asks the OS for a free port: tests bind it and read the port back.
_LISTEN_PORT = _integer(0, 65535, "must be an integer from 0 to 65535 (0 picks a free port)")


_SECONDS = "must be a positive number of seconds"


def _seconds(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _Invalid(_SECONDS) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(_SECONDS)
    if not math.isfinite(value) or value <= 0:
        raise _Invalid(_SECONDS)
    return float(value)


def _seconds_or_zero(value: object) -> float:
    """Seconds where 0 means "never"."""
    if value in (0, "0"):
        return 0.0
    try:
        return _seconds(value)
    except _Invalid:
        raise _Invalid("must be 0 (never) or a positive number of seconds") from None


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    return value


def _non_empty(value: object) -> str:
    text = _text(value)
    if not text.strip():
        raise _Invalid("must be a non-empty string")
    return text


def _pattern(regex: str, reason: str, *, lower: bool = False) -> Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or not re.fullmatch(regex, value):
            raise _Invalid(reason)
        return value.lower() if lower else value

    return check


def _one_of(*choices: str) -> Check:
    reason = "must be " + " or ".join(f'"{choice}"' for choice in choices)
    return _pattern("|".join(map(re.escape, choices)), reason)


_ID = r"[A-Za-z0-9_.-]+"
_NAME = _pattern(_ID, "must be a name made of letters, digits, '.', '_' or '-'")
_RESOURCE = _pattern(
    rf"|(?:location|company):{_ID}", 'must be "" or "location:<id>" or "company:<id>"'
)
_ALLOW = _pattern(
    rf"\*|(?:location|company):(?:\*|{_ID})",
    'must be "*", "location:*", "company:*", "location:<id>" or "company:<id>"',
)
_APP_RULE = _pattern(rf"\*|{_ID}", 'must be "*" or the name of a configured app')
_SHA256 = _pattern(
    r"[0-9a-fA-F]{64}", "must be 64 hex characters (the SHA-256 of the caller key)", lower=True
)
# "METHOD /path", the path ending in "*" to match every path it starts.
_ROUTE = _pattern(
    r"(?:GET|HEAD|PUT|DELETE|OPTIONS|POST|PATCH) /[^\s*]*\*?",
    'must be "METHOD /path" (the path may end in "*" to match every path it starts), '
    'e.g. "POST /contacts/upsert"',
)
_PRIORITY = _one_of("interactive", "batch")
_REDIS_URL = _pattern(
    r"|(?:redis|rediss|unix)://.*", "must be empty or start with redis://, rediss:// or unix://"
)


def _http_parts(value: object) -> SplitResult | None:
    """The parts of an http(s) URL with a host, or None."""
    try:
        parts = urlsplit(_text(value))
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port out of 1-65535 or not a number, a broken IPv6 literal
        return None
    return parts if valid else None


def _redirect_uri(value: object) -> str:
    url = _text(value)
    if _http_parts(url) is None:
        raise _Invalid("must be an http:// or https:// URL with a host")
    return url


def _base_url(value: object) -> str:
    url = _text(value)
    if _http_parts(url) is None or "?" in url or "#" in url:
        raise _Invalid("must be an http:// or https:// URL with a host and no query")
    return url.rstrip("/")


def _optional_url(value: object) -> str:
    url = _text(value)
    if url and _http_parts(url) is None:
        raise _Invalid("must be empty or an http:// or https:// URL with a host")
    return url


def _timezone(value: object) -> str:
    name = _text(value)
    if name == "UTC":  # always valid, even where tzdata is missing
        return name
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise _Invalid("must be an IANA time zone name such as UTC or Europe/Paris") from None
    return name


def _non_empty_list(value: object) -> object:
    if not value:
        raise _Invalid("must be a non-empty list")
    return value


_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    raise _Invalid("must be true or false")


def _rule(check: Check, item: Check | None = None) -> dict[str, Check]:
    return {"check": check} if item is None else {"check": check, "item": item}


# -- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata=_rule(_non_empty))
    port: int = field(default=8080, metadata=_rule(_LISTEN_PORT))
    workers: int = field(default=1, metadata=_rule(_POSITIVE))
    max_body_bytes: int = field(default=33554432, metadata=_rule(_POSITIVE))
    # Bodies up to this size are held so they can be searched for a locationId and sent
    # again after an upstream 429 or 401; larger ones stream through, sent once.
    replay_body_bytes: int = field(default=1048576, metadata=_rule(_POSITIVE))
    # A non-loopback host with no callers is an open relay for the managed tokens: serve
    # refuses it unless this says the network itself is trusted (a sidecar's pod network).
    trust_network: bool = field(default=False, metadata=_rule(_boolean))
    # Slow clients: a request's headers must arrive within header_timeout_s of the
    # connection (or of the previous answer), its body within body_timeout_s, and an idle
    # kept-alive connection is closed after keepalive_timeout_s.
    header_timeout_s: float = field(default=10.0, metadata=_rule(_seconds))
    body_timeout_s: float = field(default=60.0, metadata=_rule(_seconds))
    keepalive_timeout_s: float = field(default=15.0, metadata=_rule(_seconds))
    # Open client connections per process; more are closed at once. Lowered at start to
    # what the process's open-file limit allows.
    max_connections: int = field(default=4096, metadata=_rule(_POSITIVE))


@dataclass(frozen=True, slots=True)
class AdminConfig:
    host: str = field(default="127.0.0.1", metadata=_rule(_non_empty))
    port: int = field(default=9090, metadata=_rule(_LISTEN_PORT))
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = field(default="https://services.leadconnectorhq.com", metadata=_rule(_base_url))
    default_version: str = field(default="2021-07-28", metadata=_rule(_non_empty))
    connect_timeout_s: float = field(default=5.0, metadata=_rule(_seconds))
    timeout_s: float = field(default=60.0, metadata=_rule(_seconds))
    max_connections: int = field(default=256, metadata=_rule(_POSITIVE))
    # Routes a resend after "401 Command timed out" may repeat although their method is
    # not idempotent (the route itself is: an upsert, a search). GET, HEAD, PUT, DELETE
    # and OPTIONS are always resendable; so is a request that carries Idempotency-Key.
    safe_resend_routes: tuple[str, ...] = field(default=(), metadata={"item": _ROUTE})


@dataclass(frozen=True, slots=True)
class AppConfig:
    name: str = field(metadata=_rule(_NAME))
    client_id: str = field(metadata=_rule(_non_empty))
    client_secret: str = field(repr=False, metadata=_rule(_non_empty))
    redirect_uri: str = field(
        default="http://localhost:8080/_proxy/oauth/callback", metadata=_rule(_redirect_uri)
    )
    # Space-separated scopes asked for on the authorization page (/_proxy/oauth/start).
    scopes: str = field(default="", metadata=_rule(_text))

    @property
    def app_id(self) -> str:
        """The marketplace app id: the client_id before its first '-'."""
        return self.client_id.split("-", 1)[0]


@dataclass(frozen=True, slots=True)
class BurstConfig:
    requests: int = field(default=100, metadata=_rule(_POSITIVE))
    interval_ms: int = field(default=10000, metadata=_rule(_POSITIVE))
    pad_ms: int = field(default=100, metadata=_rule(_NON_NEGATIVE))
    # The pad grows to the measured p99.9 of send-to-answer times, never beyond this.
    max_pad_ms: int = field(default=1000, metadata=_rule(_NON_NEGATIVE))


@dataclass(frozen=True, slots=True)
class DailyConfig:
    requests: int = field(default=200000, metadata=_rule(_POSITIVE))
    timezone: str = field(default="UTC", metadata=_rule(_timezone))
    # The last `reserve` requests of each day are kept for interactive requests.
    reserve: int = field(default=0, metadata=_rule(_NON_NEGATIVE))

    @property
    def zone(self) -> tzinfo:
        """The tzinfo of ``timezone``; UTC needs no tzdata."""
        return UTC if self.timezone == "UTC" else zoneinfo.ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    mode: str = field(default="enforce", metadata=_rule(_one_of("enforce", "shadow")))
    burst: BurstConfig = field(default_factory=BurstConfig)
    daily: DailyConfig = field(default_factory=DailyConfig)
    # Keys (app, resource) one process tracks at most; past it, new keys are refused 503.
    max_tracked_keys: int = field(default=100000, metadata=_rule(_POSITIVE))
    # Follow the limits the upstream's X-RateLimit-* headers state: "down" only where they
    # are stricter than configured, "up" both ways, "off" never.
    learn: str = field(default="down", metadata=_rule(_one_of("down", "up", "off")))


@dataclass(frozen=True, slots=True)
class QueueConfig:
    mode: str = field(default="queue", metadata=_rule(_one_of("queue", "reject")))
    max_wait_ms: int = field(default=30000, metadata=_rule(_NON_NEGATIVE))


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # A secret because a Redis URL may carry a password; describe_config masks only that.
    redis_url: str = field(default="", repr=False, metadata=_rule(_REDIS_URL))
    # true: redis_url names one node of a Redis Cluster; the client discovers the rest.
    redis_cluster: bool = field(default=False, metadata=_rule(_boolean))
    sqlite_path: str = field(default="./data/tokens.db", metadata=_rule(_non_empty))
    on_redis_error: str = field(default="local", metadata=_rule(_one_of("local", "reject")))
    expected_replicas: int = field(default=1, metadata=_rule(_POSITIVE))
    # Fernet keys, comma-separated: tokens are encrypted at rest with the first, and any
    # of them can read. Empty: tokens are stored in clear (one warning at start).
    encryption_key: str = field(default="", repr=False, metadata=_rule(_text))


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str = field(metadata=_rule(_NAME))
    key_sha256: str = field(repr=False, metadata=_rule(_SHA256))
    allow: tuple[str, ...] = field(metadata=_rule(_non_empty_list, item=_ALLOW))
    # The apps (by name) this caller may use; "*" is every configured app.
    apps: tuple[str, ...] = field(default=("*",), metadata=_rule(_non_empty_list, item=_APP_RULE))
    # Among requests waiting for one resource's slots, this caller's share (batch ones).
    weight: int = field(default=1, metadata=_rule(_integer(1, 1000, "must be 1 to 1000")))
    # The highest priority its requests may ask for (X-HoopAI-Priority), and their default.
    priority: str = field(default="interactive", metadata=_rule(_PRIORITY))


@dataclass(frozen=True, slots=True)
class TokensConfig:
    # Refresh an access token when less than this remains (HoopAI tokens last a day).
    refresh_skew_s: float = field(default=300.0, metadata=_rule(_seconds))
    # Must outlive the slowest refresh, or a second replica could spend the same token.
    refresh_lock_ttl_s: float = field(default=90.0, metadata=_rule(_seconds))
    # Refresh tokens die after a year unused; refresh any older than this.
    refresh_token_max_age_days: int = field(default=300, metadata=_rule(_POSITIVE))
    keepalive_interval_s: float = field(default=60.0, metadata=_rule(_seconds))
    # Token endpoint calls (refreshes, location-token mints) one process makes at once. A
    # process killed mid-refresh loses the installs whose refresh it had sent: at most this
    # many. Keep-alive uses at most half, so requests always find a free one.
    max_concurrent_refreshes: int = field(default=4, metadata=_rule(_POSITIVE))
    authorize_url: str = field(
        default="https://marketplace.gohighlevel.com/oauth/chooselocation",
        metadata=_rule(_redirect_uri),
    )
    # Installs that did not start at /_proxy/oauth/start (the marketplace's own install
    # button) arrive with no state to check; accepting them allows install CSRF.
    accept_unsolicited_installs: bool = field(default=False, metadata=_rule(_boolean))
    # How often a Company install's approved locations are listed again
    # (/oauth/installedLocations) to mint tokens for new ones; 0: only at install and on
    # INSTALL webhooks.
    reconcile_interval_s: float = field(default=3600.0, metadata=_rule(_seconds_or_zero))


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    # PEM public keys HighLevel signs deliveries with (x-ghl-signature, x-wh-signature).
    ed25519_public_key: str = field(default="", metadata=_rule(_text))
    rsa_public_key: str = field(default="", metadata=_rule(_text))
    max_age_s: float = field(default=300.0, metadata=_rule(_seconds))
    # A valid delivery the proxy cannot act on for a passing reason (store, Redis or the
    # token endpoint down) is answered 429 with this Retry-After: HighLevel retries a
    # delivery only after a 429.
    retry_after_s: int = field(default=60, metadata=_rule(_POSITIVE))
    # Verified deliveries are passed on to these URLs, signed with forward_secret.
    # Hook URLs often carry their own secret in the path: shown as their origin only.
    forward_to: tuple[str, ...] = field(
        default=(), repr=False, metadata={"item": _redirect_uri}
    )
    forward_secret: str = field(default="", repr=False, metadata=_rule(_text))


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    # Where a signed JSON POST goes when a resource needs reauthorization (empty: none).
    # Chat and automation hooks carry their secret in the path: shown as the origin only.
    webhook_url: str = field(default="", repr=False, metadata=_rule(_optional_url))
    # The HMAC-SHA256 key of the X-HoopAI-Signature header.
    secret: str = field(default="", repr=False, metadata=_rule(_text))
    timeout_s: float = field(default=10.0, metadata=_rule(_seconds))
    attempts: int = field(default=5, metadata=_rule(_integer(1, 20, "must be 1 to 20")))


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = field(
        default="INFO", metadata=_rule(_one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    apps: tuple[AppConfig, ...] = field(metadata=_rule(_non_empty_list))
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    callers: tuple[CallerConfig, ...] = ()
    default_resource: str = field(default="", metadata=_rule(_RESOURCE))
    tokens: TokensConfig = field(default_factory=TokensConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def app_named(self, name: str | None) -> AppConfig | None:
        """The app called `name`; with no name, the only app if just one is configured.
        None when there is no such app (each caller says so in its own words)."""
        if name is None:
            return self.apps[0] if len(self.apps) == 1 else None
        return next((app for app in self.apps if app.name == name), None)

    @property
    def app_names(self) -> str:
        """The configured apps' names, for messages that list them."""
        return ", ".join(sorted(app.name for app in self.apps))


# -- loading ---------------------------------------------------------------------------------


class _Loader(yaml.BaseLoader):
    """Every scalar stays a string (no YAML 1.1 surprises such as ``no``, ``0123`` or dates:
    the schema coerces); ``~``, ``null`` or nothing is None; a repeated key is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f'duplicate key "{key_node.value}"', key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_NULL = "tag:yaml.org,2002:null"
_Loader.add_implicit_resolver(_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_Loader.add_constructor(_NULL, lambda loader, node: None)


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Read, interpolate and validate a config file; ``None`` is an empty document."""
    return parse_config(None if path is None else _read_yaml(path), environ)


def _read_yaml(path: str | os.PathLike[str]) -> object:
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(name, f"cannot read the file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "cannot read the file: it is not UTF-8 text") from exc
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "").split())
        raise ConfigError(name, f"invalid YAML{where}: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"invalid YAML: {' '.join(str(exc).split())}") from exc


def parse_config(document: object, environ: Mapping[str, str]) -> Config:
    """Build a Config from a parsed YAML value; raises ConfigError naming the first bad key."""
    if document is not None and not isinstance(document, Mapping):
        raise ConfigError("", f"the config must be a mapping, got {_show(document)}")
    config = _build(Config, document, "", environ)
    _unique(config.apps, "apps", "name")
    _unique(config.apps, "apps", "client_id")
    _unique(config.callers, "callers", "name")
    _unique(config.callers, "callers", "key_sha256", secret=True)
    _check_caller_apps(config)
    _check_admin_token(config.admin)
    _check_lock_outlives_refresh(config)
    _check_limits_agree(config.limits)
    _check_workers_share_limits(config)
    _check_webhook_keys(config.webhooks)
    _check_secrets_for_signing(config)
    Sealer.from_config(config.store.encryption_key)  # a malformed key names itself, not its value
    return config


def _build(cls: type[_D], raw: object, key: str, environ: Mapping[str, str]) -> _D:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"must be a mapping, got {_show(raw)}")
    fields = dataclasses.fields(cls)
    _refuse_unknown(raw, [f.name for f in fields], key)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in fields:
        sub = f"{key}.{f.name}" if key else f.name
        if raw.get(f.name) is not None:
            values[f.name] = _value(f, hints[f.name], raw[f.name], sub, environ)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "is required")
    return cls(**values)


def _refuse_unknown(raw: Mapping[Any, object], names: list[str], key: str) -> None:
    for name in map(str, raw):
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"{key}.{name}" if key else name, f"unknown key{hint}")


def _value(
    f: dataclasses.Field[Any], hint: Any, raw: object, key: str, environ: Mapping[str, str]
) -> object:
    if _is_section(hint):
        return _build(hint, raw, key, environ)
    if typing.get_origin(hint) is not tuple:
        return _scalar(f.metadata.get("check", _text), raw, key, not f.repr, environ)
    if not isinstance(raw, list):
        raise ConfigError(key, f"must be a list, got {_show(raw)}")
    item_hint = typing.get_args(hint)[0]
    items = (
        _build(item_hint, item, f"{key}[{i}]", environ)
        if _is_section(item_hint)
        else _scalar(f.metadata.get("item", _text), item, f"{key}[{i}]", not f.repr, environ)
        for i, item in enumerate(raw)
    )
    return _checked(f.metadata.get("check"), tuple(items), key, secret=False)


def _is_section(hint: object) -> TypeGuard[type[DataclassInstance]]:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _scalar(
    check: Check, raw: object, key: str, secret: bool, environ: Mapping[str, str]
) -> object:
    value = _interpolate(raw, key, environ) if isinstance(raw, str) else raw
    return _checked(check, value, key, secret)


def _checked(check: Check | None, value: object, key: str, secret: bool) -> object:
    if check is None:
        return value
    try:
        return check(value)
    except _Invalid as exc:
        raise ConfigError(key, f"{exc}, got {_show(value, secret)}") from exc


# $$ is a literal $; ${NAME} or ${NAME:-default}; a bare ${ that does not close is an error.
_REFERENCE = re.compile(r"\$\$|\$\{(?P<body>[^}]*)\}|\$\{")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def _interpolate(text: str, key: str, environ: Mapping[str, str]) -> str:
    """Expand references once, after YAML parsing, so a value from the environment is never
    parsed as YAML nor expanded again. ``:-`` uses the default when unset or empty, as sh does.
    """

    def expand(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        body = _BODY.fullmatch(match.group("body") or "")
        if body is None:
            raise ConfigError(key, "bad reference: use ${NAME}, ${NAME:-default}, or $$ for $")
        name, default = body.group("name", "default")
        if default is not None:
            return environ.get(name) or default
        if name not in environ:
            raise ConfigError(key, f"environment variable {name} is not set")
        return environ[name]

    return _REFERENCE.sub(expand, text)


def _unique(items: tuple[Any, ...], key: str, attr: str, *, secret: bool = False) -> None:
    seen: set[object] = set()
    for i, item in enumerate(items):
        value = getattr(item, attr)
        if value in seen:
            raise ConfigError(f"{key}[{i}].{attr}", f"must be unique, got {_show(value, secret)}")
        seen.add(value)


def _check_caller_apps(config: Config) -> None:
    names = {app.name for app in config.apps}
    for i, caller in enumerate(config.callers):
        for j, name in enumerate(caller.apps):
            if name != "*" and name not in names:
                raise ConfigError(
                    f"callers[{i}].apps[{j}]",
                    f"names no configured app, got {_show(name)}; use one of: "
                    + ", ".join(sorted(names))
                    + ' or "*"',
                )


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_open_relay(config: Config) -> None:
    """Refuse to serve the managed tokens to a network with no caller keys.

    Anyone who reaches a non-loopback port of a proxy without callers gets requests sent
    with the tokens it holds. `serve` and `check-config` call this; the `tokens` CLI,
    which serves nothing, does not.
    """
    server = config.server
    if is_loopback_host(server.host) or config.callers or server.trust_network:
        return
    raise ConfigError(
        "server.host",
        f"{_show(server.host)} is not a loopback address and no callers are configured, so "
        "anyone who reaches the port would use the proxy's tokens: configure callers (each "
        "with a key), or set server.trust_network: true if only a trusted network (such as "
        "a sidecar's pod network) can reach the port",
    )


def _check_admin_token(admin: AdminConfig) -> None:
    if admin.token or is_loopback_host(admin.host):
        return
    reason = f"is required when admin.host ({_show(admin.host)}) is not a loopback address"
    raise ConfigError("admin.token", reason)


def _check_webhook_keys(webhooks: WebhooksConfig) -> None:
    try:
        WebhookKeys.from_pem(webhooks.ed25519_public_key, webhooks.rsa_public_key)
    except WebhookKeyError as exc:
        raise ConfigError(f"webhooks.{exc.which}_public_key", exc.reason) from exc


def _check_secrets_for_signing(config: Config) -> None:
    if config.webhooks.forward_to and not config.webhooks.forward_secret:
        raise ConfigError(
            "webhooks.forward_secret",
            "is required when webhooks.forward_to is set: subscribers check the signature "
            "made with it",
        )
    if config.alerts.webhook_url and not config.alerts.secret:
        raise ConfigError(
            "alerts.secret",
            "is required when alerts.webhook_url is set: the receiver checks the signature "
            "made with it",
        )


def _check_workers_share_limits(config: Config) -> None:
    if config.server.workers > 1 and not config.store.redis_url:
        raise ConfigError(
            "server.workers",
            f"must be 1 without store.redis_url: each of {config.server.workers} processes "
            "would enforce the full limits on its own; set store.redis_url to share them",
        )


def _check_lock_outlives_refresh(config: Config) -> None:
    slowest = config.upstream.timeout_s + config.upstream.connect_timeout_s
    ttl = config.tokens.refresh_lock_ttl_s
    if ttl < slowest + 1:
        raise ConfigError(
            "tokens.refresh_lock_ttl_s",
            f"must be at least 1 s longer than the slowest refresh (upstream.timeout_s + "
            f"upstream.connect_timeout_s = {slowest:g} s), got {ttl:g}",
        )


def _check_limits_agree(limits: LimitsConfig) -> None:
    if limits.burst.max_pad_ms < limits.burst.pad_ms:
        raise ConfigError(
            "limits.burst.max_pad_ms",
            f"must be at least limits.burst.pad_ms ({limits.burst.pad_ms}), "
            f"got {limits.burst.max_pad_ms}",
        )
    if limits.daily.reserve >= limits.daily.requests:
        raise ConfigError(
            "limits.daily.reserve",
            f"must be less than limits.daily.requests ({limits.daily.requests}): batch "
            f"requests would never be sent, got {limits.daily.reserve}",
        )


def _show(value: object, secret: bool = False) -> str:
    """The bad value for an error message: one line, short, and never a secret."""
    if secret:
        return f"a value of {len(str(value))} characters"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list" if value else "[]"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:76] + '..."'


# -- describing ------------------------------------------------------------------------------


def describe_config(config: Config) -> str:
    """The effective config as YAML, with the file's keys; secrets show as "***" when set."""
    return yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True)


_URLS_WITH_SECRETS = ("webhook_url", "forward_to")


def _origin_only(url: str) -> str:
    """Where a URL points, without what may be secret in it (userinfo, path, query)."""
    if not url:
        return ""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/***"


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    return {
        f.name: _plain(getattr(value, f.name)) if f.repr else _mask(f.name, getattr(value, f.name))
        for f in dataclasses.fields(value)
    }


def _mask(name: str, value: object) -> object:
    if isinstance(value, tuple):
        return [_mask(name, item) for item in value]
    if not isinstance(value, str):
        return "***"
    if name in _URLS_WITH_SECRETS:
        return _origin_only(value)
    if name != "redis_url":
        return "***" if value else ""
    # Hide only the password, in the userinfo or in a ?password= query (unix:// URLs).
    # Greedy up to the last '@': masking too much is safe, too little is not.
    value = re.sub(r"^([a-z]+://[^:@/]*:).*@", r"\1***@", value)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", value)
