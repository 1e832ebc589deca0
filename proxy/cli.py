"""The `hoopai-proxy` command: serve, reload, check-config, simulate, demo, tokens.

Exit codes: 0 ok, 2 bad config or usage (one line naming the key and the reason),
1 a failure at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence

from proxy.admin import create_admin_app
from proxy.app import create_app
from proxy.commandline import CONFIG_ENV, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, config_from
from proxy.config import Config, describe_config, refuse_open_relay
from proxy.demo import run_demo as demo
from proxy.errors import ConfigError, ListenError
from proxy.logs import configure_logging
from proxy.reloader import Reloader, request_reload
from proxy.server import EarlyReloads, bind_socket, run_forked_workers, serve_until_signalled
from proxy.simulator import cli as simulator_cli
from proxy.tokens import cli as tokens_cli
from proxy.tracing import tracing_from_environment


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as error:
        print(f"hoopai-proxy: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ListenError as error:
        print(f"hoopai-proxy: {error}", file=sys.stderr)
        return EXIT_RUNTIME
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hoopai-proxy", description="Rate-limiting reverse proxy for the HoopAI API."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    serve.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default: log.level of the config)"
    )
    serve.set_defaults(run=run_serve)

    reload = commands.add_parser("reload", help="make the running proxy re-read its config")
    reload.add_argument("--config", help=f"config file (default: ${CONFIG_ENV})")
    reload.add_argument(
        "--admin-url", help="the admin listener (default: admin.host and admin.port of the file)"
    )
    reload.set_defaults(run=run_reload)

    check = commands.add_parser("check-config", help="validate a config and print it")
    check.add_argument("file", nargs="?", help=f"config file (default: ${CONFIG_ENV})")
    # --config too, like every other command, so scripts can use one form throughout.
    check.add_argument("--config", help="config file (the same as the positional FILE)")
    check.set_defaults(run=run_check_config)

    simulate = commands.add_parser("simulate", help="run the HoopAI API simulator")
    simulator_cli.add_arguments(simulate)
    simulate.set_defaults(run=run_simulate)

    demo = commands.add_parser("demo", help="simulator + proxy + traffic, on this machine")
    demo.add_argument("--requests", type=int, default=30, help="requests to send (default 30)")
    demo.set_defaults(run=run_demo)

    tokens = commands.add_parser(
        "tokens", help="add, list, delete, refresh or reencrypt stored tokens"
    )
    tokens_cli.add_arguments(tokens)
    return parser


def run_check_config(args: argparse.Namespace) -> int:
    config = config_from(args.file or args.config, os.environ)
    refuse_open_relay(config)
    print(describe_config(config), end="")
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    config = config_from(args.config, os.environ)
    refuse_open_relay(config)
    # The flag wins at start; a reload applies log.level when the file changes it.
    configure_logging(args.log_level or config.log.level)
    early_reloads = EarlyReloads()  # a SIGHUP while starting is acted on once started
    config_path = args.config or os.environ[CONFIG_ENV]
    warn_if_network_trusted(config)
    sock = _listen("server", config.server.host, config.server.port)
    admin_sock = _listen("admin", config.admin.host, config.admin.port)
    # Queued requests may wait max_wait_ms and then take up to timeout_s upstream.
    grace_s = config.queue.max_wait_ms / 1000 + config.upstream.timeout_s

    def serve_one(banner: str | None = "hoopai-proxy") -> None:
        # Per process (a forked worker starts its own exporter thread); None when off.
        app = create_app(config, tracing=tracing_from_environment(os.environ))
        admin_app = create_admin_app(app)
        forked = config.server.workers > 1
        reloader = Reloader(app, config_path, os.environ, started=config, tell_parent=forked)
        reloader.add_route(admin_app)
        admin = (admin_app, admin_sock)
        asyncio.run(
            serve_until_signalled(
                app,
                sock,
                banner=banner,
                grace_s=grace_s,
                server_config=config.server,
                admin=admin,
                on_reload=reloader.on_signal,
                early_reloads=early_reloads,
            )
        )

    if config.server.workers == 1:
        serve_one()
        return EXIT_OK

    def announce() -> None:
        host, port = sock.getsockname()[:2]
        admin_host, admin_port = admin_sock.getsockname()[:2]
        workers = config.server.workers
        print(f"hoopai-proxy ({workers} workers) listening on http://{host}:{port}", flush=True)
        print(f"hoopai-proxy admin on http://{admin_host}:{admin_port}", flush=True)

    return run_forked_workers(
        config.server.workers,
        lambda: serve_one(banner=None),
        started=announce,
        early_reloads=early_reloads,
    )


def run_reload(args: argparse.Namespace) -> int:
    """Ask the running proxy (its admin listener) to re-read its config file."""
    return request_reload(config_from(args.config, os.environ), args.admin_url)


def warn_if_network_trusted(config: Config) -> None:
    """`server.trust_network` opens the managed tokens to the network: say so at start."""
    if config.server.trust_network and not config.callers:
        logging.getLogger("proxy.cli").warning(
            "server.trust_network is true and no callers are configured: anything that "
            "reaches %s:%d can send requests with the proxy's tokens",
            config.server.host,
            config.server.port,
        )


def _listen(section: str, host: str, port: int) -> socket.socket:
    """Bind a listening socket; a failure names the config keys to change."""
    try:
        return bind_socket(host, port)
    except OSError as exc:
        raise ListenError(
            f"{section}.host/{section}.port: cannot listen on {host}:{port}: {exc.strerror}"
        ) from exc


def run_simulate(args: argparse.Namespace) -> int:
    return simulator_cli.run(args)


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(demo(requests=args.requests))


if __name__ == "__main__":
    sys.exit(main())
