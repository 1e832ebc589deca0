"""`hoopai-proxy tokens add|list|delete|refresh|reencrypt`: the stored tokens, from the
command line.

For existing installs (a refresh token from another system) and for operators. Every
command works on the configured store (SQLite file or Redis) and upstream, so it is safe
while proxies run: `refresh` goes through the token manager and its cross-process lock,
and `reencrypt` rewrites a record only if it is unchanged since it read it. A refresh
token is read from stdin or a file, never from argv (every user sees argv in `ps`), and
no command ever prints a token, a key or any part of one. `list`, `delete` and `refresh`
are the operations of proxy/tokens/operations.py, which the admin listener's token routes
run too.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from proxy.commandline import CONFIG_ENV, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, config_from
from proxy.config import AppConfig, Config
from proxy.errors import (
    ClientRejected,
    CommandRefused,
    ConfigError,
    InvalidGrant,
    LocationInactive,
    ProxyError,
    TokenEndpointError,
    TokenUnavailable,
)
from proxy.services import Services, open_services
from proxy.tokens import operations
from proxy.tokens.manager import TokenManager
from proxy.tokens.oauth import OAuthClient
from proxy.tokens.sealing import Sealer, reencrypt
from proxy.tokens.store import TokenRecord
from proxy.typing import ResourceKind

DAY_S = 86400.0
USER_TYPES = {"location": "Location", "company": "Company"}


# -- arguments -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `add`, `list`, `delete`, `refresh` and `reencrypt` under the `tokens` command."""
    commands = parser.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument(
        "--config", metavar="FILE", help=f"config file (default: ${CONFIG_ENV})"
    )
    common = argparse.ArgumentParser(add_help=False, parents=[config_only])
    common.add_argument(
        "--app", metavar="NAME", help="app name from the config (optional with one app)"
    )

    add = _subcommand(commands, "add", common, run_add, "import an existing install's token")
    _resource_arguments(add)
    source = add.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--refresh-token-stdin", action="store_true", help="read the refresh token from stdin"
    )
    source.add_argument(
        "--refresh-token-file", metavar="PATH", help="read the refresh token from a file"
    )
    # A trap, not an input: refuses before the value could be used, and never echoes it.
    add.add_argument("--refresh-token", nargs="?", action=_RefuseArgv, help=argparse.SUPPRESS)
    add.add_argument(
        "--user-type", choices=sorted(USER_TYPES.values()), help="default: from the resource"
    )

    _subcommand(commands, "list", common, run_list, "list stored tokens (never the tokens)")
    delete = _subcommand(commands, "delete", common, run_delete, "delete a stored token")
    _resource_arguments(delete)
    refresh = _subcommand(commands, "refresh", common, run_refresh, "refresh a token now")
    _resource_arguments(refresh)
    _subcommand(
        commands,
        "reencrypt",
        config_only,
        run_reencrypt,
        "encrypt every stored token with the first key of store.encryption_key",
    )


def _subcommand(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    common: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    summary: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, parents=[common], help=summary, allow_abbrev=False)
    parser.set_defaults(run=run)
    return parser


def _resource_arguments(parser: argparse.ArgumentParser) -> None:
    resource = parser.add_mutually_exclusive_group(required=True)
    resource.add_argument("--location", metavar="ID", help="a Location (sub-account) id")
    resource.add_argument("--company", metavar="ID", help="a Company (agency) id")


class _RefuseArgv(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        parser.error(
            "a refresh token is never taken from the command line (other users can read it "
            "with ps): use --refresh-token-stdin or --refresh-token-file PATH"
        )


# -- commands --------------------------------------------------------------------------------


def run_add(args: argparse.Namespace) -> int:
    config = config_from(args.config, os.environ)
    return _run(args, lambda: _add(config, args, _read_refresh_token(args)))


def run_list(args: argparse.Namespace) -> int:
    config = config_from(args.config, os.environ)
    return _run(args, lambda: _list(config, args))


def run_delete(args: argparse.Namespace) -> int:
    config = config_from(args.config, os.environ)
    return _run(args, lambda: _delete(config, args))


def run_refresh(args: argparse.Namespace) -> int:
    config = config_from(args.config, os.environ)
    return _run(args, lambda: _refresh(config, args))


def run_reencrypt(args: argparse.Namespace) -> int:
    config = config_from(args.config, os.environ)
    # Checked here, before any store opens: a malformed key is a ConfigError too (exit 2).
    if not Sealer.from_config(config.store.encryption_key).enabled:
        raise ConfigError(
            "store.encryption_key",
            "is not set: tokens reencrypt encrypts every token with its first key",
        )
    return _run(args, lambda: _reencrypt(config))


def _run(args: argparse.Namespace, command: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run one command; a refusal or a failure is one line on stderr and its exit code."""
    try:
        asyncio.run(command())
    except CommandRefused as exc:
        return _fail(args, exc.message, EXIT_USAGE if exc.usage else EXIT_RUNTIME)
    except ConfigError:
        raise  # the command line's own answer: one line naming the key, exit 2
    except ProxyError as exc:
        return _fail(args, exc.message, EXIT_RUNTIME)
    return EXIT_OK


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"hoopai-proxy tokens {args.tokens_command}: {message}", file=sys.stderr)
    return code


async def _add(config: Config, args: argparse.Namespace, refresh_token: str) -> None:
    app = _app(config, args.app)
    kind, resource_id = _resource(args)
    user_type = args.user_type or USER_TYPES[kind]
    async with _services(config) as services:
        # The refresh spends the imported token, so an unreachable store must fail first,
        # while the token still works: read from it before anything else.
        await services.token_store.get(app.app_id, kind, resource_id)
        record = await _redeem(services.oauth, app, refresh_token, user_type)
        if not record.id:
            record = replace(record, id=resource_id)
        stored = await _keep(services.tokens, record)
    until = _utc(stored.expires_at)
    print(f"added {stored.kind} {stored.id} for app {app.name} (access token valid until {until})")
    if (stored.kind, stored.id) != (kind, resource_id):
        raise CommandRefused(
            f"the token belongs to {stored.kind} {stored.id}, not {kind} {resource_id}: it "
            "was stored under the resource it belongs to"
        )


async def _redeem(
    oauth: OAuthClient, app: AppConfig, refresh_token: str, user_type: str
) -> TokenRecord:
    """Use the imported refresh token once; the answer's new pair is what gets stored."""
    try:
        grant = await oauth.refresh(app, refresh_token, user_type)
    except InvalidGrant as exc:
        raise CommandRefused(
            f"the refresh token is invalid or already used ({exc.message}); nothing was stored"
        ) from exc
    except ClientRejected as exc:
        raise CommandRefused(
            f"the token endpoint refused app {app.name!r}'s client credentials ({exc.message}): "
            "check its client_id and client_secret; nothing was stored"
        ) from exc
    except LocationInactive as exc:
        raise CommandRefused(f"{exc.message}; nothing was stored, try again later") from exc
    except TokenEndpointError as exc:
        raise CommandRefused(f"{exc.message}; nothing was stored") from exc
    except TokenUnavailable as exc:
        raise CommandRefused(
            "the upstream's token endpoint did not answer; nothing was stored. If the refresh "
            "did reach it, the token is spent and the app must be installed again"
        ) from exc
    return grant.record(app.app_id, now=oauth.clock())


async def _keep(manager: TokenManager, record: TokenRecord) -> TokenRecord:
    """Store the new pair; if that fails now, the imported token is already spent."""
    try:
        return await manager.install(record)
    except ProxyError as exc:
        raise CommandRefused(
            f"{exc.message}: the new token could not be stored, and the imported one is "
            "spent; install the app again"
        ) from exc


async def _list(config: Config, args: argparse.Namespace) -> None:
    app = _app(config, args.app) if args.app else None
    async with _services(config) as services:
        shown = await operations.list_views(config, services.token_store, app=app)
    if not shown:
        print("no tokens stored")
        return
    print(_table(shown, time.time()), end="")


async def _delete(config: Config, args: argparse.Namespace) -> None:
    app = _app(config, args.app)
    kind, resource_id = _resource(args)
    async with _services(config) as services:
        await operations.delete(services.tokens, app, kind, resource_id)
    print(f"deleted {kind} {resource_id} for app {app.name}")


async def _refresh(config: Config, args: argparse.Namespace) -> None:
    app = _app(config, args.app)
    kind, resource_id = _resource(args)
    async with _services(config) as services:
        fresh = await operations.refresh(
            services.tokens, services.token_store, app, kind, resource_id
        )
    until = _utc(fresh.expires_at)
    print(
        f"refreshed {kind} {resource_id} for app {app.name} "
        f"(version {fresh.version}, access token valid until {until})"
    )


async def _reencrypt(config: Config) -> None:
    async with _services(config) as services:
        rewritten, total = await reencrypt(services.token_store)
    print(
        f"rewrote {rewritten} of {total} token records with the first key of "
        "store.encryption_key (the others already were)"
    )


# -- helpers ---------------------------------------------------------------------------------


def _services(config: Config) -> AbstractAsyncContextManager[Services]:
    """The proxy's services for one command: no keep-alive, and no warning about a
    missing encryption key (an operator runs these by hand)."""
    return open_services(config, keepalive=False, warn_clear=False)


def _app(config: Config, name: str | None) -> AppConfig:
    app = config.app_named(name)
    if app is None:
        said = "say which with --app NAME" if name is None else f"unknown app {name!r}"
        raise CommandRefused(f"--app: {said}; the config has: {config.app_names}", usage=True)
    return app


def _resource(args: argparse.Namespace) -> tuple[ResourceKind, str]:
    return ("location", args.location) if args.location else ("company", args.company)


def _read_refresh_token(args: argparse.Namespace) -> str:
    """The refresh token's first line, from stdin (unechoed on a terminal) or a file."""
    if args.refresh_token_file:
        try:
            with open(args.refresh_token_file, encoding="utf-8") as stream:
                line = stream.readline()
        except (OSError, UnicodeDecodeError) as exc:
            # Not str(exc): a decode error quotes bytes of the file, i.e. of the token.
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            where = f"--refresh-token-file: cannot read {args.refresh_token_file}"
            raise CommandRefused(f"{where}: {reason}", usage=True) from exc
        where = f"--refresh-token-file: {args.refresh_token_file} has no token on its first line"
    else:
        line = getpass.getpass("Refresh token: ") if sys.stdin.isatty() else sys.stdin.readline()
        where = "--refresh-token-stdin: no token on stdin"
    token = line.strip()
    if not token:
        raise CommandRefused(where, usage=True)
    return token


def _table(views: Sequence[operations.TokenView], now: float) -> str:
    header = ("APP", "RESOURCE", "STATUS", "ACCESS TOKEN EXPIRES", "REFRESH AGE (DAYS)", "VERSION")
    rows = [header, *(_row(view, now) for view in views)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        + "\n"
        for row in rows
    )


def _row(view: operations.TokenView, now: float) -> tuple[str, ...]:
    # A minted Location token has no refresh token of its own: its age means nothing.
    age = view.refresh_age_s(now)
    expires = f"{_utc(view.expires_at)} ({_relative(view.expires_at - now)})"
    return (
        view.app,
        f"{view.kind}:{view.id}",
        view.status,
        expires,
        "-" if age is None else f"{age / DAY_S:.1f}",
        str(view.version),
    )


def _utc(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _relative(seconds: float) -> str:
    minutes = int(abs(seconds)) // 60
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    span = f"{days}d {hours}h" if days else f"{hours}h {minutes}m" if hours else f"{minutes}m"
    return f"in {span}" if seconds >= 0 else f"expired {span} ago"
