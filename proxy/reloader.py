"""Reloading a running proxy's config: SIGHUP, `POST /reload` on the admin listener, and the
`hoopai-proxy reload` command that asks for it.

`Reloader.reload()` reads the config file again (proxy/reload.py plans it) and, when every
changed key may change in place, hands each new value to the object that owns it: callers
to the Resolver, limits and queue to Admission (and through it the status board), the log
level to the root logger, and the whole config to `Services.use_config` for whoever reads
`services.config` (the admin token). It runs on the event loop in one go, with no await, so
no request ever sees half of a reload. A refused or invalid reload changes nothing and says
why in one log line (ERROR), and in the answer to `POST /reload`.

With forked workers (`server.workers > 1`) the parent passes SIGHUP on to every worker
(proxy/server.py), and a worker that applied a `POST /reload` signals the parent, so every
worker reloads (the one that answered finds nothing left to change).

`log.level` and `serve --log-level`: the flag wins at start; a reload applies `log.level`
when the file's value changed, so an operator can turn DEBUG on and off without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from proxy.commandline import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE
from proxy.config import Config
from proxy.reload import ReloadPlan, load_for_reload
from proxy.services import SERVICES, Services

log = logging.getLogger(__name__)

RELOAD_PATH = "/reload"
# The HTTP status of each outcome of POST /reload.
STATUS_OF = {"applied": 200, "unchanged": 200, "refused": 409, "invalid": 422}


class Reloader:
    """Reloads the config of the proxy application `app` from `path`."""

    def __init__(
        self,
        app: web.Application,
        path: str,
        environ: Mapping[str, str],
        *,
        started: Config,
        tell_parent: bool = False,
    ) -> None:
        """`started` is the config the process started with; `tell_parent`: this is a
        forked worker, whose parent passes SIGHUP on to every worker."""
        self._app = app
        self._path = path
        self._environ = environ
        self._started = started
        self._tell_parent = tell_parent

    def reload(self, cause: str = "SIGHUP") -> ReloadPlan:
        """Read the file and apply what may change in place, or nothing; log the outcome."""
        services = self._app[SERVICES]
        plan = load_for_reload(self._path, self._environ, services.config, started=self._started)
        if plan.new is not None and plan.status == "applied":
            apply_plan(services, plan, plan.new)
        _log_outcome(plan, self._path, cause)
        if plan.new is not None and plan.touches("log"):
            # After the line above, so a reload that quiets the log is still recorded.
            logging.getLogger().setLevel(plan.new.log.level)
        return plan

    def on_signal(self) -> None:
        """SIGHUP, on the event loop: a failure is logged, never raised into the loop."""
        try:
            self.reload("SIGHUP")
        except Exception:
            log.exception("config reload failed; the running config is kept")

    async def handle(self, request: web.Request) -> web.Response:
        """`POST /reload` on the admin listener (its token check runs first)."""
        plan = self.reload("POST /reload")
        if self._tell_parent and plan.status == "applied":
            os.kill(os.getppid(), signal.SIGHUP)
        return web.json_response(plan.as_json(), status=STATUS_OF[plan.status])

    def add_route(self, admin: web.Application) -> None:
        admin.router.add_post(RELOAD_PATH, self.handle)


def apply_plan(services: Services, plan: ReloadPlan, new: Config) -> None:
    """Hand the new values of `plan` to their owners; `services.config` last, so it never
    says more than what is in force."""
    if plan.touches("callers", "default_resource"):
        services.resolver.use_callers(new.callers, new.default_resource)
    if plan.touches("limits", "queue"):
        services.admission.use_limits(new.limits, new.queue)
    services.use_config(new)


def _log_outcome(plan: ReloadPlan, path: str, cause: str) -> None:
    fields = {
        "reload": plan.status,
        "changed": list(plan.changed),
        "refused": [refusal.key for refusal in plan.refused],
        "pid": os.getpid(),
    }
    if plan.status in ("refused", "invalid"):
        log.error("config reload (%s) of %s %s", cause, path, plan.describe(), extra=fields)
    else:
        log.info("config reload (%s) of %s %s", cause, path, plan.describe(), extra=fields)


# -- the `hoopai-proxy reload` command -------------------------------------------------------


def admin_url_of(config: Config) -> str:
    """Where the admin listener of a proxy started with `config` answers on this host."""
    host = config.admin.host
    if host in ("0.0.0.0", ""):  # all interfaces: loopback is one of them
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.admin.port}"


def request_reload(config: Config, admin_url: str | None = None) -> int:
    """Ask the running proxy to reload (`POST /reload` with the admin token of `config`)
    and print its answer (a refusal on stderr). The exit code: 0 applied or unchanged, 2
    refused or invalid, 1 the proxy could not be asked."""
    if admin_url is None and config.admin.port == 0:
        return _failed(EXIT_USAGE, "admin.port is 0 in the file (a free port): pass --admin-url")
    url = (admin_url or admin_url_of(config)).rstrip("/") + RELOAD_PATH
    try:
        status, answer = asyncio.run(_post(url, config.admin.token))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return _failed(EXIT_RUNTIME, f"cannot reach the proxy's admin listener at {url}: {exc}")
    if status == 401:
        return _failed(
            EXIT_RUNTIME,
            "the admin listener refused the admin.token of the file; if the file changes "
            "admin.token, reload with SIGHUP",
        )
    if status not in STATUS_OF.values() or not isinstance(answer, dict):
        return _failed(EXIT_RUNTIME, f"unexpected answer from {url}: HTTP {status}")
    message = f"reload {answer.get('message', '')}"
    if status != 200:
        return _failed(EXIT_USAGE, message)
    print(f"hoopai-proxy: {message}")
    return EXIT_OK


def _failed(code: int, message: str) -> int:
    print(f"hoopai-proxy: {message}", file=sys.stderr)
    return code


async def _post(url: str, token: str) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url, headers=headers) as response,
    ):
        body = await response.read()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, None
