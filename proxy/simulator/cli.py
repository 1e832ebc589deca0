"""The ``simulate`` command: serve a simulator until SIGINT or SIGTERM.

The main CLI calls ``add_arguments`` on its subparser and ``run`` with the parsed args.
After binding, exactly one line goes to stdout, ``hoopai simulator listening on URL``,
flushed at once: other processes wait for it to learn the (possibly picked) port.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import sys
from collections.abc import Mapping

from proxy.simulator.config import WINDOW_KINDS, SimulatorConfig
from proxy.simulator.server import create_simulator_app
from proxy.simulator.serving import serve_simulator
from proxy.simulator.state import SIMULATOR

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {text!r}")
    return value


def _app(text: str) -> tuple[str, str]:
    client_id, sep, secret = text.partition(":")
    if not sep or not client_id or not secret:
        raise argparse.ArgumentTypeError("must be CLIENT_ID:SECRET")
    return client_id, secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    defaults = SimulatorConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=8081, help="port (default %(default)s; 0 picks a free one)"
    )
    parser.add_argument(
        "--burst", type=_positive_int, default=defaults.burst, help="requests per interval"
    )
    parser.add_argument(
        "--interval-ms", type=_positive_int, default=defaults.interval_ms, help="burst interval"
    )
    parser.add_argument(
        "--daily", type=_positive_int, default=defaults.daily, help="requests per UTC day"
    )
    parser.add_argument(
        "--window", choices=WINDOW_KINDS, default=defaults.window, help="burst window kind"
    )
    parser.add_argument(
        "--token-lifetime-s",
        type=_positive_float,
        default=defaults.access_token_lifetime_s,
        help="access token lifetime",
    )
    parser.add_argument(
        "--app",
        dest="apps",
        action="append",
        type=_app,
        metavar="CLIENT_ID:SECRET",
        help="an OAuth app (repeatable; replaces the default app). The secret shows in "
        f"ps: prefer {APPS_VARIABLE}=CLIENT_ID:SECRET[,...] in the environment",
    )
    parser.add_argument(
        "--arrival-delay-ms",
        type=_non_negative_float,
        default=0.0,
        metavar="MS",
        help="hold each API request a random 0..MS ms before the limits count it "
        "(the arrival_delay_ms fault; default %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for fault ratios and delays"
    )


APPS_VARIABLE = "HOOPAI_SIM_APPS"


def apps_from(args: argparse.Namespace, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """The apps of `--app` and of HOOPAI_SIM_APPS (comma-separated CLIENT_ID:SECRET): the
    variable keeps a secret out of the command line, where `ps` shows it to any user."""
    apps = list(args.apps or [])
    listed = environ.get(APPS_VARIABLE, "").strip()
    for item in filter(None, (part.strip() for part in listed.split(","))):
        try:
            apps.append(_app(item))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{APPS_VARIABLE}: each app {exc}") from None
    return apps


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> SimulatorConfig:
    config = SimulatorConfig(
        burst=args.burst,
        interval_ms=args.interval_ms,
        daily=args.daily,
        window=args.window,
        access_token_lifetime_s=args.token_lifetime_s,
        seed=args.seed,
    )
    apps = apps_from(args, environ or {})
    if apps:
        config.apps = dict(apps)
    return config


def faults_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The faults switched on from the start (the rest stay settable at /_sim/faults)."""
    return {"arrival_delay_ms": args.arrival_delay_ms}


async def serve(
    config: SimulatorConfig, host: str, port: int, faults: Mapping[str, object] | None = None
) -> int:
    """Serve until SIGINT/SIGTERM; 1 when the address cannot be bound."""
    app = create_simulator_app(config)
    app[SIMULATOR].set_faults(faults or {})
    try:
        server = await serve_simulator(app, host, port)
    except OSError as exc:
        print(f"hoopai simulator: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        print(f"hoopai simulator listening on {server.url}", flush=True)
        await stop.wait()
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        await server.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the simulator from parsed arguments; the process exit code."""
    try:
        config = config_from_args(args, os.environ)
    except ValueError as exc:
        print(f"hoopai simulator: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, args.host, args.port, faults_from_args(args)))
