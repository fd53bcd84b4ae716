"""`linkworker retry` and `linkworker cancel` as a user runs them: what they change, what they
print, and that `--dry-run` changes nothing."""

from __future__ import annotations

import json

import asyncpg

from tests.conftest import cli_env, run_cli
from worker.enqueue import enqueue_many
from worker.samples import good_payload

FAIL = """
UPDATE link_jobs
   SET state = 'failed', attempts = 5, last_error = $2, finished_at = now(),
       errors = jsonb_build_array(jsonb_build_object('attempt', 5, 'kind', 'permanent',
                                                     'error', $2::text))
 WHERE id = $1
"""


async def add(
    conn: asyncpg.Connection, provider: str, account: str, batch_id: str, count: int
) -> list[int]:
    jobs = [
        {"provider": provider, "account": account, "payload": good_payload(provider, n)}
        for n in range(count)
    ]
    await enqueue_many(conn, jobs, batch_id=batch_id)
    rows = await conn.fetch(
        "SELECT id FROM link_jobs WHERE provider = $1 AND account = $2 AND batch_id = $3 "
        "ORDER BY id",
        provider,
        account,
        batch_id,
    )
    return [row["id"] for row in rows]


async def snapshot(conn: asyncpg.Connection) -> list[tuple[object, ...]]:
    rows = await conn.fetch("SELECT * FROM link_jobs ORDER BY id")
    return [tuple(row.values()) for row in rows]


async def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    return await run_cli(*args, env=cli_env(LINKWORKER_DATABASE_URL=database_url))


async def failed_batch(conn: asyncpg.Connection) -> dict[str, list[int]]:
    """Batch 'inv': cheqpay/default 3 failed (2 with a 400) + 1 pending, kushki/default 2
    failed (401); batch 'other': cheqpay/default 1 failed (400)."""
    jobs = {
        "cheqpay": await add(conn, "cheqpay", "default", "inv", 4),
        "kushki": await add(conn, "kushki", "default", "inv", 2),
        "other": await add(conn, "cheqpay", "default", "other", 1),
    }
    bad_request = "cheqpay rejected the request with 400 VALIDATION_ERROR: totals.total"
    for job_id in [*jobs["cheqpay"][:2], *jobs["other"]]:
        await conn.execute(FAIL, job_id, bad_request)
    await conn.execute(FAIL, jobs["cheqpay"][2], "gave up after 5 attempts; last error: 503")
    for job_id in jobs["kushki"]:
        await conn.execute(FAIL, job_id, "kushki rejected the request with 401 K004")
    return jobs


async def test_retry_dry_run_counts_and_changes_nothing(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await failed_batch(conn)
    before = await snapshot(conn)

    code, out, err = await cli(database_url, "retry", "--batch", "inv", "--dry-run")

    assert code == 0, err
    assert out.splitlines() == [
        "would retry 5 failed jobs (dry run: nothing was changed):",
        "  cheqpay/default        3",
        "  kushki/default         2",
    ]
    assert await snapshot(conn) == before


async def test_retry_requeues_failed_jobs_with_fresh_attempts_and_their_history(
    conn: asyncpg.Connection, database_url: str
) -> None:
    jobs = await failed_batch(conn)

    code, out, err = await cli(database_url, "retry", "--batch", "inv")

    assert code == 0, err
    assert out.splitlines()[0] == "retried 5 failed jobs:"
    rows = await conn.fetch(
        "SELECT id, state, attempts, finished_at, run_at <= now() AS due, errors "
        "FROM link_jobs ORDER BY id"
    )
    retried = {*jobs["cheqpay"][:3], *jobs["kushki"]}
    for row in rows:
        if row["id"] in retried:
            assert (row["state"], row["attempts"], row["finished_at"], row["due"]) == (
                "pending",
                0,
                None,
                True,
            )
            assert len(json.loads(row["errors"])) == 1  # what went wrong is still there
        else:
            assert row["state"] == ("pending" if row["id"] == jobs["cheqpay"][3] else "failed")


async def test_retry_filters_by_provider_account_and_error_text(
    conn: asyncpg.Connection, database_url: str
) -> None:
    jobs = await failed_batch(conn)

    lane = ["--provider", "cheqpay", "--account", "default"]
    code, out, err = await cli(database_url, "retry", *lane, "--error-like", "400 validation")

    assert code == 0, err
    assert out.splitlines() == ["retried 3 failed jobs:", "  cheqpay/default        3"]
    pending = await conn.fetch("SELECT id FROM link_jobs WHERE state = 'pending' ORDER BY id")
    assert [row["id"] for row in pending] == sorted(
        [*jobs["cheqpay"][:2], jobs["cheqpay"][3], *jobs["other"]]
    )


async def test_retry_with_nothing_to_do_says_so(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await failed_batch(conn)

    code, out, err = await cli(database_url, "retry", "--error-like", "no such error")

    assert code == 0, err
    assert out == "no failed jobs match: nothing to retry\n"


async def test_retry_needs_a_filter_or_all(conn: asyncpg.Connection, database_url: str) -> None:
    await failed_batch(conn)
    before = await snapshot(conn)

    refused = await cli(database_url, "retry")
    assert refused[0] == 2
    assert "retry needs a filter" in refused[2]
    assert await snapshot(conn) == before

    code, out, err = await cli(database_url, "retry", "--all")
    assert code == 0, err
    assert out.splitlines()[0] == "retried 6 failed jobs:"


async def test_cancel_dry_run_counts_and_changes_nothing(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await add(conn, "cheqpay", "default", "inv", 3)
    await add(conn, "kushki", "default", "inv", 1)
    before = await snapshot(conn)

    code, out, err = await cli(database_url, "cancel", "--batch", "inv", "--dry-run")

    assert code == 0, err
    assert out.splitlines() == [
        "would cancel 4 pending jobs (dry run: nothing was changed):",
        "  cheqpay/default        3",
        "  kushki/default         1",
    ]
    assert await snapshot(conn) == before


async def test_cancel_stops_pending_jobs_and_leaves_the_rest(
    conn: asyncpg.Connection, database_url: str
) -> None:
    ids = await add(conn, "cheqpay", "default", "inv", 4)
    other = await add(conn, "cheqpay", "default", "other", 1)
    await conn.execute("UPDATE link_jobs SET state = 'running' WHERE id = $1", ids[0])
    await conn.execute("UPDATE link_jobs SET state = 'succeeded' WHERE id = $1", ids[1])

    code, out, err = await cli(database_url, "cancel", "--batch", "inv")

    assert code == 0, err
    assert out.splitlines() == [
        "cancelled 2 pending jobs:",
        "  cheqpay/default        2",
        "1 running jobs of batch inv finish as they will",
    ]
    rows = await conn.fetch("SELECT id, state, finished_at IS NOT NULL AS f FROM link_jobs")
    states = {row["id"]: (row["state"], row["f"]) for row in rows}
    assert states == {
        ids[0]: ("running", False),
        ids[1]: ("succeeded", False),
        ids[2]: ("cancelled", True),
        ids[3]: ("cancelled", True),
        other[0]: ("pending", False),
    }


async def test_cancel_of_an_unknown_batch_is_an_error(database_url: str) -> None:
    code, out, err = await cli(database_url, "cancel", "--batch", "nope")

    assert code == 2
    assert out == ""
    assert "no jobs in batch 'nope'" in err
