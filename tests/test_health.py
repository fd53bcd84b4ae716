"""The health endpoint over real sockets: /healthz, /metrics and /readyz as a prober sees them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.errors import ConfigError
from worker.health import HealthServer, serve_health
from worker.metrics import Metrics

HOST = "127.0.0.1"


class FakeWorker:
    """What the runner's readiness answers from: connection flags and the stop event."""

    def __init__(self) -> None:
        self.database = True
        self.listen = True
        self.draining = False
        self.calls = 0

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        self.calls += 1
        checks = {
            "database": "ok" if self.database else "unreachable",
            "listen": "ok" if self.listen else "down",
            "draining": "yes" if self.draining else "no",
        }
        return self.database and self.listen and not self.draining, checks


@pytest.fixture
def worker() -> FakeWorker:
    return FakeWorker()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def server(metrics: Metrics, worker: FakeWorker) -> AsyncIterator[HealthServer]:
    running = await serve_health(0, HOST, metrics, worker.readiness)
    yield running
    await running.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def url(server: HealthServer, path: str) -> str:
    return f"http://{HOST}:{server.port}{path}"


async def test_port_zero_binds_a_free_port_and_exposes_it(server: HealthServer) -> None:
    assert server.port > 0
    with socket.create_connection((HOST, server.port), timeout=5):
        pass


async def test_healthz_answers_while_the_loop_turns(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(url(server, "/healthz")) as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "alive"
    assert body["uptime_s"] >= 0


async def test_metrics_serves_the_workers_registry(
    server: HealthServer, http: aiohttp.ClientSession, metrics: Metrics
) -> None:
    lane = metrics.lane("cheqpay", "acme")
    lane.job_finished("succeeded")
    lane.job_finished("succeeded")
    async with http.get(url(server, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await response.text()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    succeeded = [
        sample.value
        for sample in families["linkworker_jobs_finished"].samples
        if sample.name == "linkworker_jobs_finished_total"
        and sample.labels == {"provider": "cheqpay", "account": "acme", "outcome": "succeeded"}
    ]
    assert succeeded == [2.0]

    lane.job_finished("succeeded")  # each scrape reads the registry afresh
    async with http.get(url(server, "/metrics")) as response:
        assert 'outcome="succeeded",provider="cheqpay"} 3.0' in await response.text()


async def test_readyz_is_ready_then_names_what_is_wrong(
    server: HealthServer, http: aiohttp.ClientSession, worker: FakeWorker
) -> None:
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 200
        body = await response.json()
    assert body == {
        "status": "ready",
        "checks": {"database": "ok", "listen": "ok", "draining": "no"},
    }

    worker.database = False
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["database"] == "unreachable"

    worker.database, worker.listen, worker.draining = True, False, True
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 503
        checks = (await response.json())["checks"]
    assert checks == {"database": "ok", "listen": "down", "draining": "yes"}

    worker.listen, worker.draining = True, False
    async with http.get(url(server, "/readyz")) as response:
        assert response.status == 200
    assert worker.calls == 4  # asked on every probe, never cached


async def test_readyz_says_so_when_readiness_crashes(
    metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    async def broken() -> tuple[bool, dict[str, str]]:
        raise RuntimeError("a bug in the readiness check")

    server = await serve_health(0, HOST, metrics, broken)
    try:
        async with http.get(url(server, "/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    finally:
        await server.cleanup()
    assert body == {"status": "not ready", "checks": {"readiness": "error: RuntimeError"}}


async def test_readyz_says_so_when_readiness_hangs(
    metrics: Metrics, http: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()

    async def stuck() -> tuple[bool, dict[str, str]]:
        await never.wait()
        return True, {}

    server = await serve_health(0, HOST, metrics, stuck, readiness_timeout_s=0.05)
    try:
        async with http.get(url(server, "/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    finally:
        await server.cleanup()
    assert body["checks"] == {"readiness": "no answer within 0.05 s"}


async def test_a_port_in_use_is_a_config_error_naming_the_key(
    server: HealthServer, metrics: Metrics, worker: FakeWorker
) -> None:
    with pytest.raises(ConfigError, match="metrics_port"):
        await serve_health(server.port, HOST, metrics, worker.readiness)


async def test_cleanup_closes_the_socket(metrics: Metrics, worker: FakeWorker) -> None:
    server = await serve_health(0, HOST, metrics, worker.readiness)
    port = server.port
    await server.cleanup()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=5).close()
