"""nginx for the benchmark, with a config of its own in the run's temp dir.

Two server blocks in one nginx (`worker_processes 1`, access log off):
- the upstream: answers every request that carries a bearer token with a small JSON body
  and the five `X-RateLimit-*` headers HighLevel sends (the real limits: 100 per 10 s,
  200,000 a day), and one without with a 401;
- a `proxy_pass` twin on another port that forwards to the upstream over keepalive
  connections, the yardstick for what a C reverse proxy costs.
It runs in the foreground (`daemon off`) as the current user, with its pid file, error
log and temp paths in the temp dir, so it touches nothing of the system's nginx.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from bench.gateway.processes import Background
from proxy.harness.redis_server import free_port

# A HighLevel-shaped answer to GET /contacts/ (one contact), about 300 bytes.
BODY = (
    '{"contacts":[{"id":"ocQHyuzHvysMo5N5VsXc","locationId":"$arg_locationId",'
    '"firstName":"Ada","lastName":"Lovelace","email":"ada@example.com",'
    '"phone":"+15550100","tags":["bench"],"dateAdded":"2024-01-01T00:00:00.000Z"}],'
    '"meta":{"total":1,"currentPage":1,"nextPage":null},"traceId":"bench"}'
)
UNAUTHORIZED = '{"statusCode":401,"message":"Invalid JWT"}'
RATE_LIMIT_HEADERS = {
    "X-RateLimit-Limit-Daily": "200000",
    "X-RateLimit-Daily-Remaining": "199999",
    "X-RateLimit-Interval-Milliseconds": "10000",
    "X-RateLimit-Max": "100",
    "X-RateLimit-Remaining": "99",
}
UPSTREAM_KEEPALIVE = 256  # idle connections the proxy_pass block keeps to the upstream


@dataclass(frozen=True)
class NginxPorts:
    upstream: int
    proxy_pass: int

    @property
    def upstream_url(self) -> str:
        return f"http://127.0.0.1:{self.upstream}"

    @property
    def proxy_pass_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_pass}"


def config_text(workdir: Path, ports: NginxPorts) -> str:
    """The whole nginx.conf."""
    headers = "\n".join(
        f"            add_header {name} {value} always;"
        for name, value in RATE_LIMIT_HEADERS.items()
    )
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would hand its worker to `nobody`; name the current user instead.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    return f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
{user}
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp}
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    upstream hoopai_api {{
        server 127.0.0.1:{ports.upstream};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{ports.upstream};
        location / {{
            default_type application/json;
{headers}
            # As HighLevel does: no bearer token, no answer (a managed request the proxy
            # forgot to sign fails the warm-up instead of passing as a 200).
            if ($http_authorization !~ "^Bearer .") {{
                return 401 '{UNAUTHORIZED}';
            }}
            return 200 '{BODY}';
        }}
    }}
    server {{
        listen 127.0.0.1:{ports.proxy_pass};
        location / {{
            proxy_pass http://hoopai_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_process(binary: str, workdir: Path) -> tuple[Background, NginxPorts]:
    """nginx on two free ports, configured in `workdir` (not started yet)."""
    workdir.mkdir(parents=True, exist_ok=True)
    upstream = free_port()
    proxy_pass = free_port()
    while proxy_pass == upstream:
        proxy_pass = free_port()
    ports = NginxPorts(upstream, proxy_pass)
    config = workdir / "nginx.conf"
    config.write_text(config_text(workdir, ports))
    args = [binary, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]
    log = workdir / "nginx.out"
    return Background("nginx", args, (ports.upstream, ports.proxy_pass), log), ports
