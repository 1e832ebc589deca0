"""Proxy and simulator as separate OS processes, started the way an operator starts them.

Each process prints `... listening on http://HOST:PORT` once it is bound; the helpers
wait for that line, so port 0 works and no test guesses a port. Stderr (the JSON logs)
goes to a file the test can read afterwards.
"""

from __future__ import annotations

import os
import re
import resource
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LISTENING = re.compile(rb"listening on (http://\S+)")
ADMIN = re.compile(rb"admin on (http://\S+)")


@dataclass
class ServiceProcess:
    """A started `hoopai-proxy ...` process and the URL it announced."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    announces_admin: bool = False
    # The process's RLIMIT_NOFILE (soft and hard), to see it under descriptor pressure.
    open_files: int | None = None
    url: str = ""
    admin_url: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout_s: float = 20.0) -> ServiceProcess:
        environ = {**os.environ, **self.env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", *self.args],
                stdout=subprocess.PIPE,
                stderr=log,
                env=environ,
                preexec_fn=None if self.open_files is None else self._limit_open_files,
            )
        self.url = self._await_banner(timeout_s)
        return self

    def _limit_open_files(self) -> None:
        """Runs in the child between fork and exec."""
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def _await_banner(self, timeout_s: float) -> str:
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        buffered = b""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.args} exited {self.process.returncode}: {self.logs()}")
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                buffered += os.read(self.process.stdout.fileno(), 4096)
                found = LISTENING.search(buffered)
                admin = ADMIN.search(buffered)
                if found and (admin or not self.announces_admin):
                    self.admin_url = admin.group(1).decode() if admin else ""
                    return found.group(1).decode()
        raise RuntimeError(f"{self.args} did not announce itself in {timeout_s}s: {self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for a clean exit, and return the exit status (SIGKILL if stuck)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def proxy_process(config_path: Path, log_path: Path, **env: str) -> ServiceProcess:
    """`hoopai-proxy serve --config FILE`, not started yet."""
    return ServiceProcess(
        ["serve", "--config", str(config_path)], log_path, env=dict(env), announces_admin=True
    )


def simulator_process(log_path: Path, *extra: str) -> ServiceProcess:
    """`hoopai-proxy simulate --port 0 ...`, not started yet."""
    return ServiceProcess(["simulate", "--port", "0", *extra], log_path)
