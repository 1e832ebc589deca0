"""A real `redis-server` for tests, on a unix socket or a free TCP port, torn down after.

Never a shared fixed port and never a fake: the limiter and token store are tested
against the server they run on in production. The faults a fault test needs are real
too: `kill` (SIGKILL) and `start` again, empty, on the same address, so clients reconnect
to where they were; `pause` (SIGSTOP), where connections open but nothing answers, and
`resume` (SIGCONT), after which the server may first run commands that waited in its
sockets while it was stopped. With a `password` it requires one (`requirepass`), as a
production server may, and its `url` carries it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

INSTALL_HINT = (
    "redis-server was not found on PATH. The tests need a real Redis 7: install it with "
    "`apt-get install redis-server` (Debian/Ubuntu) or run `bash .ci/run`, which installs "
    "everything the tests need."
)


def redis_server_binary() -> str:
    """The path of redis-server, or a RuntimeError that says how to install it."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(INSTALL_HINT)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RedisServer:
    """One redis-server process; `url` is what the proxy's `store.redis_url` takes."""

    workdir: Path
    tcp: bool = False
    extra_args: tuple[str, ...] = ()
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    paused: bool = False
    # Set: the server requires it (`requirepass`), and `url` carries it.
    password: str = field(default="", repr=False)

    @property
    def socket_path(self) -> Path:
        return self.workdir / "redis.sock"

    @property
    def url(self) -> str:
        login = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tcp:
            return f"redis://{login}127.0.0.1:{self.port}/0"
        return f"unix://{login}{self.socket_path}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the server (again, after `stop`, on the same address) and wait for PONG."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tcp and not self.port:
            self.port = free_port()
        options = {
            "--port": str(self.port if self.tcp else 0),
            "--bind": "127.0.0.1",
            "--unixsocket": str(self.socket_path),
            "--unixsocketperm": "700",
            "--dir": str(self.workdir),
            "--save": "",
            "--appendonly": "no",
            "--logfile": str(self.workdir / "redis.log"),
        }
        if self.password:
            options["--requirepass"] = self.password
        flags = [part for option in options.items() for part in option]
        args = [redis_server_binary(), *flags, *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.paused = False
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self._log_tail()}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within {timeout_s}s: {self._log_tail()}")

    def ping(self) -> bool:
        """True when the server answers PING on its unix socket (False while paused)."""
        if not self.password:
            return self._command(b"PING").startswith(b"+PONG")
        return self._command(b"AUTH " + self.password.encode(), b"PING").endswith(b"+PONG\r\n")

    def _command(self, *lines: bytes) -> bytes:
        """Inline commands' raw answers (one line each), or b"" when they did not all
        come within half a second."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"".join(line + b"\r\n" for line in lines))
                answer = b""
                while answer.count(b"\r\n") < len(lines):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                return answer
        except OSError:
            return b""

    def kill(self) -> None:
        """SIGKILL, as `kill -9` does: no shutdown, nothing saved. `start` brings it back
        empty on the same address."""
        self.stop(kill=True)

    def pause(self) -> None:
        """SIGSTOP: the server holds its sockets but answers nothing until `resume`."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT: the server goes on, with its data, first reading whatever its clients
        sent meanwhile (commands of clients that gave up on it may still run)."""
        self._signal(signal.SIGCONT)
        self.paused = False

    def _signal(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        self.process.send_signal(signum)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (or SIGKILL with `kill`), and wait for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.paused and not kill:
            self.resume()  # a stopped process would hold SIGTERM until it is continued
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
        self.paused = False
        if self.process.stderr is not None:
            self.process.stderr.close()

    def _log_tail(self) -> str:
        log = self.workdir / "redis.log"
        return log.read_text()[-2000:] if log.exists() else "(no log)"
