"""Fuzzing the front door (issue 7): random methods, paths, headers (with CR, LF, NUL and
bytes that are not UTF-8), bad JSON where the resolver looks for `locationId`, truncated
chunked bodies, huge and many headers, sent as raw bytes to a `serve` process.

Whatever arrives, the proxy's own code never answers 5xx, never crashes, logs no
`internal_error`, and serves the next valid request. The examples are derandomized, so CI
runs the same bounded set every time (a failure is a bug, never a flake); a local run with
`HYPOTHESIS_FUZZ_EXAMPLES=5000` explores further.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import string
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.harness.processes import ServiceProcess, proxy_process, simulator_process, write_config
from proxy.harness.tokens import location_jwt
from tests.conftest import SIM_CLIENT_ID, base_document, merged

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("HYPOTHESIS_FUZZ_EXAMPLES", "250"))
READ_LIMIT_S = 20.0  # a failure detector for a hung answer, far above the proxy's timeouts


@dataclass
class Services:
    simulator: ServiceProcess
    proxy: ServiceProcess

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.proxy.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One simulator and one proxy for every example (each example is one connection)."""
    folder = tmp_path_factory.mktemp("fuzz")
    simulator = simulator_process(folder / "simulator.log").start()
    document = merged(
        base_document(simulator.url),
        {
            "server": {"header_timeout_s": 0.5, "body_timeout_s": 0.5},
            "limits": {"burst": {"requests": 100_000}},
            "tokens": {"accept_unsolicited_installs": True},
            "store": {"sqlite_path": str(folder / "tokens.db")},
        },
    )
    proxy = proxy_process(write_config(folder / "proxy.yaml", document), folder / "proxy.log")
    proxy.start()
    _install_location(simulator.url, proxy.url, "LOCA")
    yield Services(simulator, proxy)
    assert proxy.stop() == 0
    simulator.stop()


def _install_location(simulator_url: str, proxy_url: str, location: str) -> None:
    """A managed token for LOCA, so fuzzed managed requests reach the upstream too."""
    payload = json.dumps({"client_id": SIM_CLIENT_ID, "location_id": location}).encode()
    install = urllib.request.Request(
        f"{simulator_url}/_sim/install", data=payload, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(install, timeout=10) as answer:
        code = json.loads(answer.read())["code"]
    with urllib.request.urlopen(f"{proxy_url}/_proxy/oauth/callback?code={code}", timeout=10):
        pass


# -- what a request is made of --------------------------------------------------------------

_NASTY = [b"\r", b"\n", b"\r\n", b"\x00", b"\xff\xfe", b"%", b"%00", b"\t", b" ", b"{", b"}"]
_SEGMENTS = [
    "oauth",
    "OAuth",
    "%6Fauth",
    "locationToken",
    "token",
    "locations",
    "LOCA",
    "LOCV",
    "contacts",
    "_proxy",
    "healthz",
    "oauth",
    "_sim",
    "echo",
    "..",
    ".",
    "%2e%2e",
    "%2F",
    "%ff",
    "",
    "a;b",
    "x" * 300,
]
_HEADER_NAMES = [
    "X-HoopAI-Location-Id",
    "X-HoopAI-Company-Id",
    "X-HoopAI-App",
    "X-HoopAI-Proxy-Key",
    "X-HoopAI-Max-Wait-Ms",
    "Authorization",
    "Content-Type",
    "Version",
    "Connection",
    "Expect",
    "Transfer-Encoding",
    "Content-Encoding",
    "Host",
    "Upgrade",
    "X-Anything",
]
_VALUES = [
    b"LOCA",
    b"LOCV",
    b"main",
    b"application/json",
    b"0",
    b"99999999999",
    b"-1",
    b"chunked",
    b"100-continue",
    b"keep-alive, X-HoopAI-Location-Id",
    b"Bearer pit-fuzz",
    b"Bearer " + location_jwt("LOCA").encode(),
    b"Bearer " + location_jwt("LOCV", client_id="zz-unknown").encode(),
    b"Bearer a." + b"W" * 40 + b".c",
    b"x" * 9000,
]

text = st.text(alphabet=string.printable, max_size=16)
segment = st.one_of(st.sampled_from(_SEGMENTS), text.map(lambda t: t.replace(" ", "%20")))
path = st.lists(segment, max_size=6).map(lambda parts: "/" + "/".join(parts))
query = st.lists(
    st.tuples(st.sampled_from(["locationId", "companyId", "api_key", "x", ""]), text),
    max_size=3,
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
method = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
    st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=10),
)
value = st.one_of(
    st.sampled_from(_VALUES),
    st.binary(max_size=40),
    st.lists(st.sampled_from([*_NASTY, b"a", b"LOCA"]), max_size=8).map(b"".join),
)
header = st.tuples(
    st.one_of(st.sampled_from(_HEADER_NAMES), st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True)),
    value,
)
json_bodies = st.sampled_from(
    [
        b'{"locationId": "LOCA"}',
        b'{"locationId": "LOCV", "companyId": 5}',
        b'{"locationId": ',
        b'{"locationId": "\xff"}',
        b"[" * 5000,
        b'{"a":' * 3000,
        b'"just a string"',
        b"null",
    ]
)
body = st.one_of(st.just(b""), json_bodies, st.binary(max_size=200))
framing = st.sampled_from(["length", "length", "chunked", "chunked-truncated", "short", "none"])


def raw_request(
    method: str, target: str, headers: list[tuple[str, bytes]], body: bytes, framing: str
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode("utf-8", "surrogateescape"), b"Host: fuzz"]
    lines += [name.encode() + b": " + data for name, data in headers]
    lines.append(b"Connection: close")
    if framing in ("length", "short"):
        declared = len(body) + (50 if framing == "short" else 0)
        lines.append(f"Content-Length: {declared}".encode())
    elif framing.startswith("chunked"):
        lines.append(b"Transfer-Encoding: chunked")
        chunk = f"{len(body):x}\r\n".encode() + body + b"\r\n"
        body = chunk if framing == "chunked-truncated" else chunk + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a fresh connection; read until the proxy closes it."""
    with socket.create_connection(address, timeout=READ_LIMIT_S) as sock:
        # The proxy may refuse and close before it has read everything.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def status_of(answer: bytes) -> int | None:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None


def still_serves(address: tuple[str, int]) -> None:
    """The next valid request, a managed one, is served."""
    valid = b"GET /contacts/ HTTP/1.1\r\nHost: fuzz\r\nX-HoopAI-Location-Id: LOCA\r\n"
    assert status_of(exchange(address, valid + b"Connection: close\r\n\r\n")) == 200


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=method,
    path=path,
    query=query,
    headers=st.lists(header, max_size=12),
    many=st.integers(min_value=0, max_value=150),
    body=body,
    framing=framing,
)
def test_front_door_never_answers_5xx_and_keeps_serving(
    services: Services,
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, bytes]],
    many: int,
    body: bytes,
    framing: str,
) -> None:
    """Random requests get a status below 500 (or the connection closed), and the next
    valid request is served."""
    target = f"{path}?{query}" if query else path
    headers = headers + [(f"X-Many-{i}", b"v") for i in range(many)]
    answer = exchange(services.address, raw_request(method, target, headers, body, framing))
    status = status_of(answer)
    assert status is None or status < 500, answer[:300]
    still_serves(services.address)


def test_fuzzing_left_no_internal_error_or_traceback(services: Services) -> None:
    """Runs after the fuzz test (same module): nothing the fuzzer sent made the proxy log
    an unexpected exception."""
    logs = Path(services.proxy.log_path).read_text(errors="replace")
    assert "Traceback" not in logs
    assert "unexpected" not in logs
