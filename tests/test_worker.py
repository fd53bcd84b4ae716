"""The worker process's behaviour on each kind of answer, on signals and on NOTIFY.

Each test runs the real `linkworker run` process against the simulator over real sockets and a
real Postgres; faults are queued deterministically through the simulator's /__faults.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import WorkerProcess, cli_env, queue_fault, run_cli, write_config
from worker.samples import good_payload
from worker.simulator import RunningSimulator, SimulatorConfig, start_simulator

FAST = {"poll_interval_s": 0.05, "retry_base_s": 0.02, "retry_cap_s": 0.2}
SECRETS = ("bp-key-0001", "bp-user-0001", "cq-key-default", "cq-key-acme", "ku-private-0001")


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimulatorConfig(seed=5))
    yield running
    await running.close()


async def add_job(conn: asyncpg.Connection, provider: str, **columns: object) -> int:
    names = ["provider", "payload", *columns]
    values = [provider, json.dumps(good_payload(provider, 1)), *columns.values()]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(values)))
    sql = f"INSERT INTO link_jobs ({', '.join(names)}) VALUES ({placeholders}) RETURNING id"
    job_id: int = await conn.fetchval(sql, *values)
    return job_id


async def drain(database_url: str, sim: RunningSimulator, tmp_path: Path, **tuning: object):
    config = write_config(tmp_path / "lw.toml", database_url, sim.url, **{**FAST, **tuning})
    code, out, err = await run_cli("run", "--drain", "--config", str(config), env=cli_env())
    assert code == 0, err[-3000:]
    return out, err


async def row(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record:
    record = await conn.fetchrow("SELECT * FROM link_jobs WHERE id = $1", job_id)
    assert record is not None
    return record


async def test_throttle_pauses_the_lane_and_costs_no_attempt(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    job_id = await add_job(conn, "cheqpay", max_attempts=1)
    await queue_fault(sim.url, "cheqpay", "429", count=2)
    _, err = await drain(database_url, sim, tmp_path)
    job = await row(conn, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 1
    assert json.loads(job["errors"]) == []
    assert err.count('"lane_throttled"') == 2


async def test_permanent_error_fails_at_once_with_the_providers_message(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    job_id = await add_job(conn, "cheqpay")
    await queue_fault(sim.url, "cheqpay", "400")
    await drain(database_url, sim, tmp_path)
    job = await row(conn, job_id)
    assert job["state"] == "failed" and job["attempts"] == 1
    assert "400" in job["last_error"] and "VALIDATION_ERROR" in job["last_error"]


async def test_retryable_errors_until_attempts_run_out(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    job_id = await add_job(conn, "kushki", max_attempts=3)
    await queue_fault(sim.url, "kushki", "503", count=3)
    await drain(database_url, sim, tmp_path)
    job = await row(conn, job_id)
    assert job["state"] == "failed" and job["attempts"] == 3
    assert job["last_error"].startswith("gave up after 3 attempts; last error:")
    history = json.loads(job["errors"])
    assert [entry["attempt"] for entry in history] == [1, 2, 3]


async def test_unknown_outcome_is_retried_and_counted_on_the_row(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    job_id = await add_job(conn, "billpocket")
    await queue_fault(sim.url, "billpocket", "502")
    await drain(database_url, sim, tmp_path)
    job = await row(conn, job_id)
    assert job["state"] == "succeeded" and job["attempts"] == 2
    assert job["unknown_outcomes"] == 1
    assert json.loads(job["errors"])[0]["kind"] == "unknown"


async def test_unknown_outcome_policy_fail(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    job_id = await add_job(conn, "cheqpay")
    await queue_fault(sim.url, "cheqpay", "500")
    await drain(database_url, sim, tmp_path, lanes={"on_unknown_outcome": "fail"})
    job = await row(conn, job_id)
    assert job["state"] == "failed" and job["unknown_outcomes"] == 1
    assert "on_unknown_outcome = fail" in job["last_error"]


async def test_malformed_and_urlless_success_bodies_never_crash(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    ids = [await add_job(conn, "kushki") for _ in range(3)]
    await queue_fault(sim.url, "kushki", "malformed")
    await queue_fault(sim.url, "kushki", "no_url")
    await queue_fault(sim.url, "kushki", "html")
    await drain(database_url, sim, tmp_path)
    jobs = [await row(conn, job_id) for job_id in ids]
    assert all(job["state"] == "succeeded" for job in jobs)
    kinds = sorted(json.loads(job["errors"])[0]["kind"] for job in jobs)
    assert kinds == ["unknown", "unknown", "unknown"]


async def test_bad_credentials_fail_with_the_key_named_and_no_secret_anywhere(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    job_id = await add_job(conn, "cheqpay", account="acme")
    config = write_config(tmp_path / "lw.toml", database_url, sim.url, **FAST)
    env = cli_env(
        LINKWORKER_PROVIDERS__CHEQPAY__ACCOUNTS__ACME__API_KEY="invalid-cq-secret-77",
        LINKWORKER_LOG_LEVEL="debug",
    )
    code, out, err = await run_cli("run", "--drain", "--config", str(config), env=env)
    assert code == 0, err[-2000:]
    job = await row(conn, job_id)
    assert job["state"] == "failed" and "401" in job["last_error"]
    assert "providers.cheqpay" in job["last_error"]
    stored = json.dumps([dict(r) for r in await conn.fetch("SELECT * FROM link_jobs")], default=str)
    for secret in (*SECRETS, "invalid-cq-secret-77"):
        assert secret not in out + err + stored


async def test_notify_wakes_an_idle_worker_and_sigterm_stops_it(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "lw.toml", database_url, sim.url, poll_interval_s=60, log_level="debug"
    )
    worker = await WorkerProcess.start("run", "--config", str(config), env=cli_env())
    try:
        await worker.wait_for_log('"listening"')
        job_id = await add_job(conn, "billpocket")
        await worker.wait_for_log('"job_succeeded"', timeout_s=30)  # long before the 60 s poll
        assert any(f'"job_id": {job_id}' in line for line in worker.lines)
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.finish(timeout_s=30) == 0
    finally:
        await worker.kill()
    assert (await row(conn, job_id))["state"] == "succeeded"


async def draining_with_a_later_job(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> tuple[WorkerProcess, Path, int]:
    """A job of batch 'later' due in an hour, and a draining worker that has said it waits."""
    job_id = await conn.fetchval(
        "INSERT INTO link_jobs (provider, payload, run_at, batch_id)"
        " VALUES ('cheqpay', $1::jsonb, now() + interval '1 hour', 'later') RETURNING id",
        json.dumps(good_payload("cheqpay", 1)),
    )
    config = write_config(tmp_path / "lw.toml", database_url, sim.url, **FAST)
    worker = await WorkerProcess.start("run", "--drain", "--config", str(config), env=cli_env())
    try:
        await worker.wait_for_log('"drain_waiting"')
    except BaseException:
        await worker.kill()
        raise
    assert worker.saw('"jobs_due_later": 1')
    return worker, config, job_id


async def test_drain_waits_for_a_later_job_and_sees_it_made_due_sooner(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    """A job due in an hour keeps a draining worker waiting; made due now by its producer, it
    is sent and the worker exits, instead of sleeping out the hour."""
    worker, _, job_id = await draining_with_a_later_job(conn, database_url, sim, tmp_path)
    try:
        await conn.execute("UPDATE link_jobs SET run_at = now() WHERE id = $1", job_id)
        assert await worker.finish(timeout_s=30) == 0
    finally:
        await worker.kill()
    assert (await row(conn, job_id))["state"] == "succeeded"
    assert sim.state.created == 1


async def test_drain_stops_waiting_for_a_later_job_that_is_cancelled(
    conn: asyncpg.Connection, database_url: str, sim: RunningSimulator, tmp_path: Path
) -> None:
    worker, config, job_id = await draining_with_a_later_job(conn, database_url, sim, tmp_path)
    try:
        code, _, err = await run_cli(
            "cancel", "--batch", "later", "--config", str(config), env=cli_env()
        )
        assert code == 0, err
        assert await worker.finish(timeout_s=30) == 0
    finally:
        await worker.kill()
    assert (await row(conn, job_id))["state"] == "cancelled"
    assert sim.state.requests == 0
