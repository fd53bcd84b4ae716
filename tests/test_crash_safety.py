"""Crash safety with real processes, real signals, a real Postgres and the simulator: nothing is
lost, and a link is created twice only where the provider's outcome was truly unknown."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import (
    WorkerProcess,
    cli_env,
    queue_fault,
    run_cli,
    wait_until,
    write_config,
)
from tests.pgproxy import PgProxy
from worker.samples import good_payload, mixed_jobs
from worker.simulator import RunningSimulator, SimulatorConfig, start_simulator

FAST = {"poll_interval_s": 0.05, "retry_base_s": 0.02, "retry_cap_s": 0.2}
LANES = [
    ("billpocket", "default"),
    ("cheqpay", "default"),
    ("cheqpay", "acme"),
    ("kushki", "default"),
]


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorConfig(seed=9))
    yield running
    await running.close()


async def add_jobs(conn: asyncpg.Connection, provider: str, count: int) -> list[int]:
    payloads = [json.dumps(good_payload(provider, n)) for n in range(count)]
    rows = await conn.fetch(
        "INSERT INTO link_jobs (provider, payload) SELECT $1, p::jsonb FROM unnest($2::text[]) p "
        "RETURNING id",
        provider,
        payloads,
    )
    return [row["id"] for row in rows]


async def states(conn: asyncpg.Connection) -> Counter[str]:
    return Counter(dict(await conn.fetch("SELECT state, count(*) FROM link_jobs GROUP BY 1")))


async def test_sigterm_finishes_in_flight_and_hands_back_the_rest_at_once(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    sim = await start_simulator(SimulatorConfig(latency_ms=400))
    try:
        await add_jobs(conn, "cheqpay", 40)
        config = write_config(
            tmp_path / "lw.toml", database_url, sim.url, lanes={"max_in_flight": 2}, **FAST
        )
        worker = await WorkerProcess.start("run", "--config", str(config), env=cli_env())
        await wait_until(lambda: sim.state.requests >= 2)
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.finish() == 0
    finally:
        await sim.close()
    assert worker.saw('"jobs_handed_back"')
    rows = await conn.fetch("SELECT state, attempts, locked_by, last_error FROM link_jobs")
    done = [r for r in rows if r["state"] == "succeeded"]
    waiting = [r for r in rows if r["state"] == "pending"]
    assert len(done) + len(waiting) == 40
    assert len(done) == sim.state.created >= 2  # the in-flight calls were let finish
    assert all(r["attempts"] == 0 and r["locked_by"] is None for r in waiting)


async def test_second_signal_cuts_the_grace_short_and_still_writes(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    sim = await start_simulator(SimulatorConfig(latency_ms=20_000))
    try:
        await add_jobs(conn, "kushki", 3)
        config = write_config(tmp_path / "lw.toml", database_url, sim.url, **FAST)
        worker = await WorkerProcess.start("run", "--config", str(config), env=cli_env())
        await wait_until(lambda: sim.state.requests >= 3)
        worker.process.send_signal(signal.SIGTERM)
        await worker.wait_for_log('"worker_stopping"')
        worker.process.send_signal(signal.SIGINT)
        assert await worker.finish(timeout_s=15) == 0  # not the 30 s grace
    finally:
        await sim.close()
    assert worker.saw('"shutdown_hurried"')
    rows = await conn.fetch("SELECT state, attempts, unknown_outcomes, errors FROM link_jobs")
    for row in rows:
        assert (row["state"], row["attempts"], row["unknown_outcomes"]) == ("pending", 1, 1)
        assert json.loads(row["errors"])[0]["kind"] == "interrupted"


async def test_billpocket_conflict_after_a_lost_answer_is_adopted_not_duplicated(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    [job_id] = await add_jobs(conn, "billpocket", 1)
    await queue_fault(sim.url, "billpocket", "500_after_create")
    config = write_config(tmp_path / "lw.toml", database_url, sim.url, **FAST)
    code, _, err = await run_cli("run", "--drain", "--config", str(config), env=cli_env())
    assert code == 0, err[-2000:]
    row = await conn.fetchrow("SELECT * FROM link_jobs WHERE id = $1", job_id)
    assert row["state"] == "succeeded" and row["attempts"] == 2 and row["unknown_outcomes"] == 1
    [link] = sim.state.links
    assert row["url"] == link.url and link.identity == f"linkworker-job-{job_id}"
    assert sim.state.created == 1 and sim.state.duplicates == 0
    assert '"job_reconciled"' in err


async def test_breaker_opens_on_a_5xx_storm_without_using_waiting_jobs_attempts(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    await add_jobs(conn, "cheqpay", 20)
    await add_jobs(conn, "kushki", 20)
    await queue_fault(sim.url, "cheqpay", "503", count=8)
    lanes = {"max_in_flight": 1, "breaker_threshold": 3, "breaker_cooldown_s": 0.05}
    config = write_config(tmp_path / "lw.toml", database_url, sim.url, lanes=lanes, **FAST)
    code, _, err = await run_cli("run", "--drain", "--config", str(config), env=cli_env())
    assert code == 0, err[-2000:]
    assert err.count('"breaker_opened"') >= 2 and '"breaker_closed"' in err
    rows = await conn.fetch("SELECT provider, state, attempts FROM link_jobs")
    assert {r["state"] for r in rows} == {"succeeded"}
    # every attempt beyond the first is one of the 8 injected 503s: none was spent waiting
    cheqpay_retries = sum(r["attempts"] - 1 for r in rows if r["provider"] == "cheqpay")
    assert cheqpay_retries == 8
    assert all(r["attempts"] == 1 for r in rows if r["provider"] == "kushki")


async def test_postgres_outage_mid_run_loses_nothing(
    conn: asyncpg.Connection, database_url: str, server_url: str, tmp_path: Path
) -> None:
    sim = await start_simulator(SimulatorConfig(latency_ms=5))
    proxy = PgProxy(server_url)
    await proxy.start()
    jobs = mixed_jobs(800, LANES)
    await conn.executemany(
        "INSERT INTO link_jobs (provider, account, payload) VALUES ($1, $2, $3::jsonb)",
        [job[:3] for job in jobs],
    )
    config = write_config(
        tmp_path / "lw.toml",
        proxy.url(database_url),
        sim.url,
        lanes={"rate_per_s": 60},
        lease_s=4,
        log_level="debug",  # job_succeeded lines, counted by WorkerProcess
        **FAST,
    )
    try:
        worker = await WorkerProcess.start("run", "--drain", "--config", str(config), env=cli_env())
        await worker.wait_for(lambda w: w.successes >= 100)
        proxy.cut()
        cut_at = time.monotonic()
        await worker.wait_for_log('"postgres_connection_lost"')
        await worker.wait_for(lambda w: w.successes >= 250)  # links go on being made
        # the outage itself (not a wait for anything): longer than the 4 s lease, so every
        # lease held runs out while Postgres is away
        await asyncio.sleep(max(0.0, cut_at + 6 - time.monotonic()))
        proxy.restore()
        assert await worker.finish(timeout_s=120) == 0
    finally:
        await proxy.close()
        await sim.close()
    assert await states(conn) == {"succeeded": 800}
    assert sim.state.duplicates == 0 and sim.state.created == 800
    lost_at = next(i for i, line in enumerate(worker.lines) if "postgres_connection_lost" in line)
    assert any('"postgres_connected"' in line for line in worker.lines[lost_at:])


async def test_sigkill_chaos_loses_nothing_and_duplicates_only_unknown_outcomes(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    """Two workers, killed with SIGKILL at random points and restarted, under 5xx storms,
    timeouts after sending and malformed answers; then a drain finishes the queue."""
    sim = await start_simulator(SimulatorConfig(latency_ms=10, error_rate=0.03, seed=21))
    jobs = mixed_jobs(2000, LANES, seed=5)
    # the storms hit a few fast-retrying jobs again and again, and a job claimed by a worker
    # that is then killed spends that attempt (nobody can know it was not sent): room for both
    await conn.executemany(
        "INSERT INTO link_jobs (provider, account, payload, max_attempts) "
        "VALUES ($1, $2, $3::jsonb, 20)",
        [job[:3] for job in jobs],
    )
    for provider, name, count in (
        ("billpocket", "500_after_create", 40),
        ("kushki", "malformed", 20),
        ("kushki", "500_after_create", 20),
        ("cheqpay", "timeout_after_create", 8),
        ("cheqpay", "502", 20),
    ):
        await queue_fault(sim.url, provider, name, count)
    # a wide window between the provider's answer and the write-back, where kills hurt most
    config = write_config(
        tmp_path / "lw.toml",
        database_url,
        sim.url,
        # the limits are the two workers' together (fleet-wide); a restarted worker takes its
        # part of the in-flight caps after 1.5 x fleet_refresh_s, and its kills must come
        # before the survivor has drained the queue alone
        # the storms must not open the breakers here (their own test is above): an open breaker
        # spends a storm one probe at a time, with its cool-down doubling each time
        lanes={
            "rate_per_s": 200,
            "max_in_flight": 20,
            "timeout_s": 1.0,
            "breaker_threshold": 1000,
        },
        fleet_refresh_s=0.25,
        lease_s=3,
        flush_interval_s=0.25,
        log_level="debug",  # job_succeeded lines, counted by WorkerProcess
        **FAST,
    )
    draw = random.Random(13)
    try:
        workers = [
            await WorkerProcess.start("run", "--config", str(config), env=cli_env())
            for _ in range(2)
        ]
        for round_ in range(4):
            # the victim is killed once the two have made 40 to 160 more links (the victim may
            # have made none of them: a worker restarted a moment ago still holds claims)
            victim = draw.randrange(2)
            target = sum(worker.successes for worker in workers) + draw.randrange(40, 160)
            try:
                await wait_until(lambda t=target: sum(w.successes for w in workers) >= t, 60)
            except TimeoutError:
                for n, worker in enumerate(workers):  # for the failure's report
                    (tmp_path / f"round{round_}-worker{n}.log").write_text("".join(worker.lines))
                raise
            await workers[victim].kill()
            workers[victim] = await WorkerProcess.start(
                "run", "--config", str(config), env=cli_env()
            )
        for worker in workers:
            await worker.kill()
        code, _, err = await run_cli("run", "--drain", "--config", str(config), env=cli_env())
        assert code == 0, err[-3000:]
    finally:
        await sim.close()

    assert await states(conn) == {"succeeded": 2000}  # nothing lost, nothing stuck
    rows = await conn.fetch("SELECT id, provider, url, unknown_outcomes, errors FROM link_jobs")
    assert len({row["url"] for row in rows}) == 2000
    assert any(
        entry["kind"] == "lease_expired" for row in rows for entry in json.loads(row["errors"])
    )  # kills really left leases behind to rescue
    created = Counter((link.provider, link.identity) for link in sim.state.links)
    duplicates = Counter(provider for (provider, _), n in created.items() for _ in range(n - 1))
    unknown = sum(row["unknown_outcomes"] for row in rows)
    assert duplicates["billpocket"] == 0 and duplicates["kushki"] == 0
    assert sum(duplicates.values()) == sim.state.duplicates <= unknown
    assert sum(duplicates.values()) > 0 or unknown > 0
