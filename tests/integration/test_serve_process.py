"""`hoopai-proxy serve` as a separate process: streaming with bounded memory, draining on
SIGTERM, several workers on one port."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from collections.abc import AsyncIterator

import aiohttp
import psutil
import pytest

from proxy.harness.tokens import bearer

pytestmark = pytest.mark.slow

MB = 1024 * 1024
BIG = 200 * MB


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose every request carries the caller's own HighLevel token."""
    async with aiohttp.ClientSession(headers=bearer("processTests")) as session:
        yield session


class PeakRss:
    """Samples a process's resident memory in the background and keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._process.memory_info().rss)
            await asyncio.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / MB


async def zeros(total: int, chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    block = b"\0" * chunk
    for _ in range(total // chunk):
        yield block


async def warm_up(http, url: str) -> None:
    """A few requests first, so pools and buffers exist before the baseline is taken."""
    for _ in range(5):
        async with http.post(f"{url}/_sim/echo/warm", data=b"x" * MB) as response:
            await response.read()
        async with http.get(f"{url}/_sim/download?bytes={MB}") as response:
            await response.read()


async def test_200mb_upload_and_download_stream_with_bounded_memory(
    simulator, spawn_proxy, http
) -> None:
    """200 MB each way through the proxy process grows its RSS by only a few MB."""
    proxy = spawn_proxy(simulator.url, server={"max_body_bytes": BIG + MB})
    await warm_up(http, proxy.url)
    assert proxy.process is not None
    with PeakRss(proxy.process.pid) as upload_rss:
        async with http.post(
            f"{proxy.url}/_sim/echo/upload", data=zeros(BIG), headers={"Content-Length": str(BIG)}
        ) as response:
            seen = await response.json()
    assert seen["body_length"] == BIG
    digest = hashlib.sha256()
    received = 0
    with PeakRss(proxy.process.pid) as download_rss:
        async with http.get(f"{proxy.url}/_sim/download?bytes={BIG}") as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(MB):
                received += len(chunk)
                digest.update(chunk)
    assert received == BIG
    print(
        f"\n200 MB through the proxy: RSS grew {upload_rss.growth_mb:.1f} MB on upload, "
        f"{download_rss.growth_mb:.1f} MB on download"
    )
    assert upload_rss.growth_mb < 16, f"upload grew RSS by {upload_rss.growth_mb:.1f} MB"
    assert download_rss.growth_mb < 16, f"download grew RSS by {download_rss.growth_mb:.1f} MB"


async def test_sigterm_drains_in_flight_requests(simulator, spawn_proxy, http) -> None:
    """Requests already accepted when SIGTERM arrives finish with 200; the exit is clean."""
    proxy = spawn_proxy(simulator.url)
    # A first answer for the resource, so the ten below are not held behind a cold key's
    # probe (admission.py) and all reach the simulator at once.
    async with http.get(f"{proxy.url}/_sim/slow?ms=0") as first:
        assert first.status == 200
    in_flight = [asyncio.create_task(http.get(f"{proxy.url}/_sim/slow?ms=1500")) for _ in range(10)]
    # In flight: all ten have reached the simulator, which holds each for 1.5 s.
    while simulator.state.stats()["probe_requests"] < 11:
        assert not any(task.done() for task in in_flight), "a request ended before SIGTERM"
        await asyncio.sleep(0.01)
    proxy.signal(signal.SIGTERM)
    responses = await asyncio.gather(*in_flight)
    assert [response.status for response in responses] == [200] * 10
    for response in responses:
        response.release()
    # That one SIGTERM ends the process cleanly (stop() would send a second one, which may
    # land after the event loop has closed and kill it).
    assert proxy.process is not None
    assert await asyncio.to_thread(proxy.process.wait) == 0


async def test_several_workers_share_one_port(simulator, spawn_proxy, redis_server, http) -> None:
    """`server.workers: 3` (with Redis, which they need to share limits) serves from three
    processes on one port and stops cleanly."""
    proxy = spawn_proxy(simulator.url, server={"workers": 3}, store={"redis_url": redis_server.url})
    assert proxy.process is not None
    workers = psutil.Process(proxy.process.pid).children()
    assert len(workers) == 3

    async def one(index: int) -> int:
        async with http.get(f"{proxy.url}/_sim/echo/w?i={index}") as response:
            return response.status

    statuses = await asyncio.gather(*(one(i) for i in range(60)))
    assert statuses == [200] * 60
    assert proxy.stop() == 0
    assert not any(worker.is_running() for worker in workers)


def test_busy_port_is_one_line_naming_the_key(tmp_path) -> None:
    """A port already taken: exit 1 with one line naming the config keys, no traceback."""
    import socket
    import subprocess
    import sys

    from proxy.harness.processes import write_config
    from tests.conftest import base_document

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        document = base_document("http://127.0.0.1:9")
        document["server"]["port"] = taken.getsockname()[1]
        document["store"] = {"sqlite_path": str(tmp_path / "t.db")}
        config = write_config(tmp_path / "busy.yaml", document)
        done = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.host/server.port: cannot listen on" in lines[0]
