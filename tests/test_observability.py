"""The worker's HTTP endpoint in a real run: /metrics agrees with the database, /readyz follows
Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import WorkerProcess, cli_env, run_cli, write_config
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
        log_level="debug",  # job_succeeded lines, counted by WorkerProcess
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
        await until_status(url, 200)  # every connection up (the claim one may come just after)
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


async def test_two_draining_workers_deliver_a_batchs_webhook_once_signed(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    received: list[tuple[bytes, str]] = []
    got_one = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers["X-Linkworker-Signature"]))
        got_one.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    jobs = mixed_jobs(200, LANES, bad_fraction=0.05, seed=8)
    await conn.executemany(
        "INSERT INTO link_jobs (provider, account, payload, batch_id) "
        "VALUES ($1, $2, $3::jsonb, 'nightly-1')",
        [job[:3] for job in jobs],
    )
    await conn.execute(
        "INSERT INTO link_batch_webhooks (batch_id, url) VALUES ('nightly-1', $1)",
        f"http://127.0.0.1:{port}/hook?token=abc",
    )
    config = write_config(
        tmp_path / "lw.toml", database_url, sim.url, webhook_secret="whsec-test-0001", **FAST
    )
    try:
        results = await asyncio.gather(
            *(run_cli("run", "--drain", "--config", str(config), env=cli_env()) for _ in range(2))
        )
        assert all(code == 0 for code, _, _ in results), results
        await asyncio.wait_for(got_one.wait(), 30)
    finally:
        await runner.cleanup()
    assert len(received) == 1
    raw, signature = received[0]
    expected = hmac.new(b"whsec-test-0001", raw, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(signature, "sha256=" + expected)
    body = json.loads(raw)
    assert await conn.fetchval("SELECT state FROM link_batch_webhooks") == "delivered"
    counts = dict(
        await conn.fetch(
            "SELECT state, count(*) FROM link_jobs WHERE batch_id = 'nightly-1' GROUP BY 1"
        )
    )
    assert body["succeeded"] == counts["succeeded"] and body["failed"] == counts["failed"]
    assert body["total"] == 200 and body["batch_id"] == "nightly-1"
