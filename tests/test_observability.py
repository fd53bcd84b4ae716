"""The worker's HTTP endpoint in a real run: /metrics agrees with the database, /readyz follows
Postgres."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import WorkerProcess, cli_env, write_config
from tests.pgproxy import PgProxy
from worker.samples import mixed_jobs
from worker.simulator import RunningSimulator, SimulatorConfig, start_simulator

LANES = [("billpocket", "default"), ("cheqpay", "default"), ("kushki", "default")]
FAST = {"poll_interval_s": 0.05, "retry_base_s": 0.02, "retry_cap_s": 0.2}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorConfig(error_rate=0.05, seed=2))
    yield running
    await running.close()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_metrics_agree_with_the_database(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    jobs = mixed_jobs(300, LANES, bad_fraction=0.1, seed=4)
    await conn.executemany(
        "INSERT INTO link_jobs (provider, account, payload) VALUES ($1, $2, $3::jsonb)",
        [job[:3] for job in jobs],
    )
    port = free_port()
    config = write_config(
        tmp_path / "lw.toml",
        database_url,
        sim.url,
        metrics_port=port,
        metrics_host="127.0.0.1",
        **FAST,
    )
    worker = await WorkerProcess.start("run", "--config", str(config), env=cli_env())
    try:
        good = sum(1 for job in jobs if job[3] is None)
        await worker.wait_for(lambda w: w.successes >= good)
        await worker.wait_for(
            lambda w: w.lines[-1:] != [] and _all_failed_logged(w, len(jobs) - good)
        )
        status, text = await get(f"http://127.0.0.1:{port}/metrics")
    finally:
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.finish() == 0
    assert status == 200
    finished = samples(text, "linkworker_jobs_finished_total")
    by_db = dict(
        await conn.fetch("SELECT provider || '/' || state, count(*) FROM link_jobs GROUP BY 1")
    )
    for provider, _ in LANES:
        for outcome in ("succeeded", "failed"):
            key = (("account", "default"), ("outcome", outcome), ("provider", provider))
            assert finished[key] == by_db.get(f"{provider}/{outcome}", 0), (provider, outcome)
    retried = sum(v for k, v in finished.items() if ("outcome", "retried") in k)
    assert retried == sim.state.injected > 0
    calls = samples(text, "linkworker_provider_call_duration_seconds_count")
    assert sum(calls.values()) == sim.state.requests


def _all_failed_logged(worker: WorkerProcess, bad: int) -> bool:
    return sum('"job_failed"' in line for line in worker.lines) >= bad


async def test_readyz_follows_postgres(
    database_url: str, server_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    proxy = PgProxy(server_url)
    await proxy.start()
    port = free_port()
    config = write_config(
        tmp_path / "lw.toml",
        proxy.url(database_url),
        sim.url,
        metrics_port=port,
        metrics_host="127.0.0.1",
        poll_interval_s=0.05,
        lease_s=3,
    )
    worker = await WorkerProcess.start("run", "--config", str(config), env=cli_env())
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        await worker.wait_for_log('"listening"')
        assert (await get(url))[0] == 200
        assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
        proxy.cut()
        _, body = await until_status(url, 503)
        assert "unreachable" in body or '"listen": "down"' in body
        proxy.restore()
        await until_status(url, 200)
    finally:
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.finish() == 0
        await proxy.close()


async def until_status(url: str, wanted: int, timeout_s: float = 30) -> tuple[int, str]:
    """Ask `url` until it answers `wanted` (the worker notices Postgres within a second)."""

    async def ask() -> tuple[int, str]:
        # the endpoint is what is under test: asking it again is the only way to observe it
        while (answer := await get(url))[0] != wanted:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return answer

    return await asyncio.wait_for(ask(), timeout_s)
