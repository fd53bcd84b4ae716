"""The SQL contract against a real Postgres: claims, fenced write-backs, leases, wake-ups."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tests.conftest import cli_env, run_cli
from worker import db
from worker.db import Outcome
from worker.errors import ConfigError
from worker.migrations import latest_version, require_current_schema, schema_version

PAYLOAD = json.dumps({"amount": 10})


async def add(conn: asyncpg.Connection, count: int, **columns: object) -> list[int]:
    names = ["provider", "payload", *columns]
    values = ["billpocket", PAYLOAD, *columns.values()]
    sql = (
        f"INSERT INTO link_jobs ({', '.join(names)}) "
        f"SELECT {', '.join(f'${i + 1}' for i in range(len(values)))} "
        f"FROM generate_series(1, {count}) RETURNING id"
    )
    return [row["id"] for row in await conn.fetch(sql, *values)]


async def claim(conn: asyncpg.Connection, limit: int, worker: str = "w1", lease_s: float = 30):
    return await db.claim(
        conn,
        provider="billpocket",
        account="default",
        limit=limit,
        worker_id=worker,
        lease_s=lease_s,
    )


async def test_claim_takes_priority_order_and_counts_the_attempt(conn: asyncpg.Connection) -> None:
    low = await add(conn, 3)
    high = await add(conn, 2, priority=5)
    jobs = await claim(conn, 4)
    assert {job.id for job in jobs} == set(high)  # the highest priority only, then the next
    assert {job.id for job in await claim(conn, 4, worker="w2")} == set(low)
    assert all(job.attempt == 1 and job.payload == PAYLOAD for job in jobs)
    row = await conn.fetchrow("SELECT state, locked_by FROM link_jobs WHERE id = $1", high[0])
    assert (row["state"], row["locked_by"]) == ("running", "w1")


async def test_two_workers_never_claim_the_same_job(database_url: str) -> None:
    setup = await asyncpg.connect(database_url)
    await add(setup, 500)
    conns = [await asyncpg.connect(database_url) for _ in range(4)]

    async def take_all(c: asyncpg.Connection, worker: str) -> list[int]:
        taken: list[int] = []
        while jobs := await claim(c, 37, worker=worker):
            taken += [job.id for job in jobs]
        return taken

    results = await asyncio.gather(*(take_all(c, f"w{i}") for i, c in enumerate(conns)))
    everything = [job_id for taken in results for job_id in taken]
    assert len(everything) == len(set(everything)) == 500
    for c in [setup, *conns]:
        await c.close()


async def test_write_back_is_fenced_by_holder_and_attempt(conn: asyncpg.Connection) -> None:
    [job_id] = await add(conn, 1)
    [job] = await claim(conn, 1, worker="old", lease_s=0.001)
    assert await db.rescue_expired(conn) == 1
    [again] = await claim(conn, 1, worker="new")
    assert again.attempt == 2
    stale = Outcome(job_id, job.attempt, "succeeded", url="https://stale")
    assert await db.record(conn, worker_id="old", outcomes=[stale]) == 0
    fresh = Outcome(
        job_id,
        again.attempt,
        "succeeded",
        url="https://fresh",
        external_id="x1",
        response_json='{"ok": true}',
    )
    assert await db.record(conn, worker_id="new", outcomes=[fresh]) == 1
    row = await conn.fetchrow("SELECT * FROM link_jobs WHERE id = $1", job_id)
    assert (row["state"], row["url"], row["external_id"]) == ("succeeded", "https://fresh", "x1")
    assert row["unknown_outcomes"] == 1 and row["finished_at"] is not None
    assert json.loads(row["errors"])[0]["kind"] == "lease_expired"


async def test_jobs_touched_by_id_are_looked_up_by_primary_key(conn: asyncpg.Connection) -> None:
    """With statistics from when every job was pending, the write-back, heartbeat and hand-back
    must not read every running job through the lease index (their cost would grow with the
    jobs in flight across the fleet)."""
    # statistics of the pending queue only: no auto-analyze of this test's own database after
    # the claim (it would let the old plan pass)
    await conn.execute("ALTER TABLE link_jobs SET (autovacuum_enabled = off)")
    await add(conn, 3000)
    await conn.execute("ANALYZE link_jobs")
    jobs = await claim(conn, 2000)
    ids = [job.id for job in jobs[:2]]
    outcomes = [Outcome(job.id, job.attempt, "succeeded", url="https://u") for job in jobs[:2]]
    record_args = [
        [o.job_id for o in outcomes],
        [o.attempt for o in outcomes],
        [o.state for o in outcomes],
        *([[None, None]] * 5),
        [0.0, 0.0],
        [False, False],
        [False, False],
    ]
    plans = {
        "record": await conn.fetch("EXPLAIN " + db.RECORD, "w1", *record_args),
        "heartbeat": await conn.fetch("EXPLAIN " + db.EXTEND_LEASES, "w1", ids, 30.0),
        "release": await conn.fetch("EXPLAIN " + db.RELEASE, "w1", ids),
    }
    for name, rows in plans.items():
        plan = "\n".join(row[0] for row in rows)
        assert "link_jobs_pkey" in plan and "link_jobs_lease" not in plan, f"{name}:\n{plan}"


async def test_retry_outcome_keeps_history_and_pushes_run_at(conn: asyncpg.Connection) -> None:
    [job_id] = await add(conn, 1)
    [job] = await claim(conn, 1)
    retry = Outcome(
        job_id,
        job.attempt,
        "pending",
        error="cheqpay answered 503",
        error_kind="retryable",
        retry_in_s=60,
    )
    assert await db.record(conn, worker_id="w1", outcomes=[retry]) == 1
    row = await conn.fetchrow(
        "SELECT state, attempts, last_error, errors, run_at > now() + interval '50 s' AS later "
        "FROM link_jobs WHERE id = $1",
        job_id,
    )
    assert row["state"] == "pending" and row["attempts"] == 1 and row["later"]
    assert row["last_error"] == "cheqpay answered 503"
    assert json.loads(row["errors"])[0]["error"] == "cheqpay answered 503"
    assert await claim(conn, 1) == []  # not before its run_at


async def test_release_gives_the_attempt_back(conn: asyncpg.Connection) -> None:
    ids = await add(conn, 3)
    await claim(conn, 3)
    assert await db.release(conn, worker_id="w1", job_ids=ids) == 3
    rows = await conn.fetch("SELECT state, attempts, locked_by FROM link_jobs")
    assert {(r["state"], r["attempts"], r["locked_by"]) for r in rows} == {("pending", 0, None)}


async def test_heartbeat_extends_only_the_given_jobs(conn: asyncpg.Connection) -> None:
    ids = await add(conn, 2)
    await claim(conn, 2, lease_s=0.001)
    assert await db.extend_leases(conn, worker_id="w1", job_ids=ids, lease_s=60) == set(ids)
    assert await db.extend_leases(conn, worker_id="w2", job_ids=ids, lease_s=60) == set()
    await conn.execute("UPDATE link_jobs SET locked_until = now() - interval '1 s'")
    assert await db.extend_leases(conn, worker_id="w1", job_ids=ids[:1], lease_s=60) == {ids[0]}
    assert await db.rescue_expired(conn) == 1
    states = dict(await conn.fetch("SELECT id, state FROM link_jobs"))
    assert states == {ids[0]: "running", ids[1]: "pending"}


async def test_rescue_fails_jobs_out_of_attempts(conn: asyncpg.Connection) -> None:
    [job_id] = await add(conn, 1, max_attempts=1)
    await claim(conn, 1, lease_s=0.001)
    assert await db.rescue_expired(conn) == 1
    row = await conn.fetchrow("SELECT state, last_error FROM link_jobs WHERE id = $1", job_id)
    assert row["state"] == "failed" and "stopped renewing its lease" in row["last_error"]


async def test_unconfigured_accounts_fail_with_a_clear_error(conn: asyncpg.Connection) -> None:
    await add(conn, 2, account="ghost")
    await add(conn, 1)
    failed = await db.fail_unconfigured(
        conn, providers=["billpocket"], lanes=["billpocket/default"]
    )
    assert failed == 2
    row = await conn.fetchrow("SELECT last_error FROM link_jobs WHERE account = 'ghost' LIMIT 1")
    assert "[providers.billpocket.accounts.ghost]" in row["last_error"]


async def test_insert_notifies_once_per_statement_with_the_lanes(
    conn: asyncpg.Connection, database_url: str
) -> None:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(db.NOTIFY_CHANNEL, lambda *args: received.put_nowait(args[-1]))
    await add(conn, 100)
    await add(conn, 1, account="acme")
    assert await asyncio.wait_for(received.get(), 5) == "billpocket/default"
    assert await asyncio.wait_for(received.get(), 5) == "billpocket/acme"
    await add(
        conn,
        1,
        run_at=__import__("datetime").datetime(
            2100, 1, 1, tzinfo=__import__("datetime").timezone.utc
        ),
    )
    await add(conn, 1, account="last")
    assert await asyncio.wait_for(received.get(), 5) == "billpocket/last"  # no NOTIFY for later
    await listener.close()


async def test_producer_idempotency_key(conn: asyncpg.Connection) -> None:
    sql = (
        "INSERT INTO link_jobs (provider, payload, idempotency_key) VALUES ('cheqpay', $1, $2) "
        "ON CONFLICT (provider, account, idempotency_key) DO NOTHING RETURNING id"
    )
    assert await conn.fetchval(sql, PAYLOAD, "inv-1") is not None
    assert await conn.fetchval(sql, PAYLOAD, "inv-1") is None
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO link_jobs (provider, payload) VALUES ('paypal', '{}')")


async def test_migrate_twice_and_concurrently(empty_database_url: str) -> None:
    env = cli_env(LINKWORKER_DATABASE_URL=empty_database_url)
    first, second = await asyncio.gather(run_cli("migrate", env=env), run_cli("migrate", env=env))
    assert first[0] == 0 and second[0] == 0, (first, second)
    outputs = sorted([first[1], second[1]])
    assert outputs[0].startswith("applied 0001_create_link_jobs")
    assert outputs[1] == "schema is up to date\n"
    conn = await asyncpg.connect(empty_database_url)
    assert await schema_version(conn) == latest_version()
    await conn.close()


async def test_worker_refuses_an_unmigrated_database(empty_database_url: str) -> None:
    conn = await asyncpg.connect(empty_database_url)
    with pytest.raises(ConfigError, match="run `linkworker migrate` first"):
        await require_current_schema(conn)
    await conn.close()
