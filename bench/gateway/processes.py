"""Background processes of the benchmark that are not the proxy (nginx, the bare
forwarder): started in a session of their own, awaited until their ports accept, and
stopped as a group (the forwarder's extra workers and nginx's worker with them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Background:
    """A command run in its own process group, its output in `log_path`."""

    name: str
    args: list[str]
    ports: tuple[int, ...]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 20.0) -> Background:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not all(port_open(port) for port in self.ports):
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen within {timeout_s}s: {self.tail()}")
            time.sleep(0.05)
        return self

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to the process group; SIGKILL to what is left of it after `timeout_s`."""
        if self.process is None or self.process.returncode is not None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self._signal_group(0) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader; its group lives while a worker does
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, signum: int) -> bool:
        """Signal the group this process leads (start_new_session); False when it is gone."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        return True
