"""Everything a run measures, started once on free ports in the run's temp dir and torn
down in reverse order however the run ends (error, Ctrl-C, SIGTERM): Redis, a 3-master
Redis Cluster, nginx (upstream and proxy_pass), the bare forwarder with 1 and 2
processes, and the proxies of `proxies.SPECS`, their token stores seeded first."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.gateway import forwarder
from bench.gateway.nginx import NginxPorts, nginx_process
from bench.gateway.processes import Background
from bench.gateway.proxies import (
    SPECS,
    Limiter,
    ProxySettings,
    ProxySpec,
    new_proxy,
    seed_tokens,
)
from bench.gateway.warmup import Warmth
from bench.gateway.workload import Mode, Request, Workload
from proxy.harness.processes import ServiceProcess
from proxy.harness.redis_cluster import RedisCluster
from proxy.harness.redis_server import RedisServer, free_port

FORWARDER_PROCESSES = (1, 2)


@dataclass(frozen=True)
class Gateway:
    """The running targets and what a measurement needs to drive them."""

    wrk: str
    nginx: NginxPorts
    forwarders: dict[int, str]  # processes -> URL
    proxies: dict[ProxySpec, ServiceProcess]
    redis_nodes: dict[Limiter, tuple[str, ...]]  # where a limiter's Redis calls are counted
    requests: dict[Mode, list[Request]]
    request_files: dict[Mode, Path]
    warmth: Warmth = field(default_factory=Warmth)


@contextmanager
def running_gateway(workdir: Path, tools: dict[str, str]) -> Iterator[Gateway]:
    with ExitStack() as stack:
        workload = Workload()
        redis = RedisServer(workdir / "redis", tcp=True)
        stack.callback(redis.stop)
        redis.start()
        cluster = stack.enter_context(_cluster(workdir / "cluster"))
        nginx, ports = nginx_process(tools["nginx"], workdir / "nginx")
        stack.callback(nginx.stop)
        nginx.start()
        forwarders = {
            n: _forwarder(stack, workdir, ports.upstream_url, n) for n in FORWARDER_PROCESSES
        }
        settings = ProxySettings(
            workdir, ports.upstream_url, workload, redis_url=redis.url, cluster_url=cluster.url
        )
        proxies = _proxies(stack, settings)
        yield Gateway(
            wrk=tools["wrk"],
            nginx=ports,
            forwarders=forwarders,
            proxies=proxies,
            redis_nodes={
                "memory": (),
                "redis": (redis.url,),
                "cluster": tuple(node.url for node in cluster.nodes),
            },
            requests={mode: workload.requests(mode) for mode in ("passthrough", "managed")},
            request_files=workload.write(workdir),
        )


@contextmanager
def _cluster(workdir: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(workdir)
    try:
        yield cluster.start()  # stops its own nodes when it fails to start
    finally:
        cluster.stop()


def _forwarder(stack: ExitStack, workdir: Path, upstream: str, processes: int) -> str:
    port = free_port()
    args = [
        sys.executable,
        forwarder.__file__,
        "--port",
        str(port),
        "--upstream",
        upstream,
        "--workers",
        str(processes),
    ]
    name = f"forwarder-{processes}"
    process = Background(name, args, (port,), workdir / f"{name}.log")
    stack.callback(process.stop)
    process.start()
    return f"http://127.0.0.1:{port}"


def _proxies(stack: ExitStack, settings: ProxySettings) -> dict[ProxySpec, ServiceProcess]:
    seeded: set[Limiter] = set()
    for spec in SPECS:  # proxies of one backend share its store: seed it once
        if spec.limiter not in seeded:
            seed_tokens(spec, settings)
            seeded.add(spec.limiter)
    proxies: dict[ProxySpec, ServiceProcess] = {}
    for spec in SPECS:
        proxies[spec] = proxy = new_proxy(spec, settings)
        stack.callback(proxy.stop)
        proxy.start(timeout_s=60)
    return proxies
