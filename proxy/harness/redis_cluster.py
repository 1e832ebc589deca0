"""A real 3-master Redis Cluster for tests and benchmarks, on free TCP ports, torn down after.

Three `redis-server --cluster-enabled yes` nodes (each a `RedisServer` in its own folder,
with its own unix socket for the readiness PING), joined by `redis-cli --cluster create`,
then awaited until every node reports `cluster_state:ok`. The cluster bus port is chosen
explicitly (`--cluster-port`), so a data port above 55535 cannot push it out of range.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from proxy.harness.redis_server import RedisServer, free_port

MASTERS = 3


def _redis_cli() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError(
            "redis-cli was not found on PATH; the Redis Cluster tests need it "
            "(`apt-get install redis-server` installs both)"
        )
    return found


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class RedisCluster:
    """Three cluster-enabled masters on 127.0.0.1; `url` names the first one."""

    workdir: Path
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout_s: float = 20.0) -> RedisCluster:
        """Start the nodes, create the cluster and wait until it serves every slot."""
        ports = _distinct_free_ports(2 * MASTERS)
        data_ports, bus_ports = ports[:MASTERS], ports[MASTERS:]
        ready = False
        try:
            for port, bus in zip(data_ports, bus_ports, strict=True):
                node = RedisServer(
                    self.workdir / f"node-{port}",
                    tcp=True,
                    port=port,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(self.workdir / f"nodes-{port}.conf"),
                        "--cluster-port",
                        str(bus),
                        "--cluster-node-timeout",
                        "5000",
                    ),
                )
                self.nodes.append(node.start())
            self._create(timeout_s)
            self._wait_ok(timeout_s)
            ready = True
        finally:
            if not ready:  # no half-started cluster is left running
                self.stop()
        return self

    def _create(self, timeout_s: float) -> None:
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        done = subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({done.returncode}): "
                f"{done.stdout.decode(errors='replace')[-1500:]}"
                f"{done.stderr.decode(errors='replace')[-1500:]}"
            )

    def cluster_info(self, port: int) -> str:
        done = subprocess.run(
            [_redis_cli(), "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
            capture_output=True,
            timeout=5,
            check=False,
        )
        return done.stdout.decode(errors="replace")

    def _wait_ok(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in self.cluster_info(port) for port in self.ports):
                return
            time.sleep(0.1)
        states = {port: self.cluster_info(port).splitlines()[:1] for port in self.ports}
        raise RuntimeError(f"the Redis Cluster did not reach cluster_state:ok: {states}")

    def stop(self) -> None:
        """Stop every node (SIGTERM); safe to call twice."""
        for node in self.nodes:
            node.stop()
