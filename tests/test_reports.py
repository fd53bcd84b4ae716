"""`linkworker status` and `linkworker export` as a user runs them, the `link_batches` view, and
the `linkworker_batch_done` NOTIFY (once per batch, even when two transactions finish it)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import cli_env, run_cli, start_cli
from worker.enqueue import enqueue_many
from worker.samples import good_payload

FINISH = "UPDATE link_jobs SET state = $2, finished_at = now() WHERE id = ANY($1::bigint[])"


async def seed(
    conn: asyncpg.Connection, batch_id: str, lanes: dict[tuple[str, str], list[str]]
) -> list[int]:
    """Jobs of a batch, per lane in the given states; returns their ids in order."""
    ids: list[int] = []
    for (provider, account), states in lanes.items():
        jobs = [
            {"provider": provider, "account": account, "payload": good_payload(provider, n)}
            for n in range(len(states))
        ]
        await enqueue_many(conn, jobs, batch_id=batch_id)
        rows = await conn.fetch(
            "SELECT id FROM link_jobs WHERE batch_id = $1 AND provider = $2 AND account = $3 "
            "ORDER BY id",
            batch_id,
            provider,
            account,
        )
        for row, state in zip(rows, states, strict=True):
            if state != "pending":
                await conn.execute(FINISH, [row["id"]], state)
        ids += [row["id"] for row in rows]
    return ids


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    return await run_cli(*args, env=cli_env(LINKWORKER_DATABASE_URL=database_url))


# --- status ----------------------------------------------------------------------------------


async def test_status_json_counts_jobs_per_lane_and_batch(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await seed(
        conn,
        "inv",
        {
            ("cheqpay", "default"): ["succeeded", "failed", "pending"],
            ("kushki", "default"): ["succeeded", "cancelled"],
        },
    )
    await seed(conn, "other", {("cheqpay", "acme"): ["running"]})

    code, out, err = await cli(database_url, "status", "--json")

    assert code == 0, err
    status = json.loads(out)
    lanes = {lane["lane"]: lane for lane in status["lanes"]}
    assert set(lanes) == {"cheqpay/acme", "cheqpay/default", "kushki/default"}
    cheqpay = lanes["cheqpay/default"]
    assert [cheqpay[s] for s in ("pending", "running", "succeeded", "failed")] == [1, 0, 1, 1]
    assert cheqpay["oldest_pending_s"] >= 0
    assert lanes["kushki/default"]["oldest_pending_s"] is None  # nothing waiting
    batches = {batch["batch_id"]: batch for batch in status["batches"]}
    assert batches["inv"]["total"] == 5 and batches["inv"]["done"] is False
    assert batches["other"]["running"] == 1
    assert status["batches"][0]["done"] is False  # unfinished batches first


async def test_status_of_one_batch_counts_only_its_jobs(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await seed(conn, "inv", {("cheqpay", "default"): ["succeeded", "failed"]})
    await seed(conn, "other", {("cheqpay", "default"): ["pending"]})

    code, out, err = await cli(database_url, "status", "--batch", "inv", "--json")

    assert code == 0, err
    status = json.loads(out)
    assert [(lane["pending"], lane["succeeded"]) for lane in status["lanes"]] == [(0, 1)]
    assert [batch["batch_id"] for batch in status["batches"]] == ["inv"]
    assert status["batches"][0]["done"] is True


async def test_status_prints_tables_with_progress(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await seed(conn, "inv-11", {("billpocket", "default"): ["succeeded", "succeeded", "pending"]})

    code, out, err = await cli(database_url, "status")

    assert code == 0, err
    assert "billpocket/default" in out
    assert "inv-11" in out
    assert "2/3 (67%)" in out
    assert "\x1b[" not in out  # no colour codes when stdout is not a terminal


async def test_status_of_an_unknown_batch_is_an_error(database_url: str) -> None:
    code, out, err = await cli(database_url, "status", "--batch", "nope")

    assert code == 2
    assert out == ""
    assert "no jobs in batch 'nope'" in err


async def test_watch_of_a_batch_ends_when_it_is_done(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await seed(conn, "inv", {("cheqpay", "default"): ["succeeded", "cancelled"]})

    code, out, err = await cli(database_url, "status", "--batch", "inv", "--watch")

    assert code == 0, err
    assert out.endswith(
        "batch inv: 2/2 finished (100.0%): 0 pending, 0 running, 1 succeeded, 0 failed, "
        "1 cancelled\n"
    )


async def test_watch_refreshes_until_ctrl_c(conn: asyncpg.Connection, database_url: str) -> None:
    await seed(conn, "inv", {("cheqpay", "default"): ["pending"]})
    env = cli_env(LINKWORKER_DATABASE_URL=database_url)
    process = await start_cli("status", "--watch", "--json", "--interval", "0.05", env=env)
    assert process.stdout is not None

    lines = [json.loads(await process.stdout.readline()) for _ in range(2)]  # two refreshes
    process.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(process.wait(), 30)

    assert code == 0
    assert [line["lanes"][0]["pending"] for line in lines] == [1, 1]
    assert lines[0]["at"] < lines[1]["at"]


# --- export ----------------------------------------------------------------------------------


async def test_export_streams_a_batch_as_csv(conn: asyncpg.Connection, database_url: str) -> None:
    jobs = [
        {"provider": "cheqpay", "payload": good_payload("cheqpay", n), "idempotency_key": f"k{n}"}
        for n in range(3000)
    ]
    await enqueue_many(conn, jobs, batch_id="big")
    await conn.execute(
        "UPDATE link_jobs SET state = 'succeeded', url = 'https://pay.example/' || id, "
        "finished_at = now() WHERE id % 2 = 0"
    )
    await seed(conn, "other", {("kushki", "default"): ["succeeded"]})

    code, out, err = await cli(database_url, "export", "--batch", "big")

    assert code == 0, err
    assert "exported 3000 jobs of batch big" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == [
        "id",
        "provider",
        "account",
        "idempotency_key",
        "state",
        "url",
        "external_id",
        "last_error",
        "attempts",
        "created_at",
        "finished_at",
    ]
    assert [row["idempotency_key"] for row in rows] == [f"k{n}" for n in range(3000)]
    for row in rows:
        succeeded = int(row["id"]) % 2 == 0
        assert row["state"] == ("succeeded" if succeeded else "pending")
        assert row["url"] == (f"https://pay.example/{row['id']}" if succeeded else "")
        assert bool(row["finished_at"]) == succeeded


async def test_export_filters_states_into_a_jsonl_file(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    ids = await seed(
        conn, "inv", {("cheqpay", "default"): ["succeeded", "failed", "pending", "cancelled"]}
    )
    target = tmp_path / "out.jsonl"

    states = ["--state", "failed", "cancelled"]
    code, out, err = await cli(
        database_url, "export", "--batch", "inv", "--format", "jsonl", *states, "-o", str(target)
    )

    assert code == 0, err
    assert out == ""
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(row["id"], row["state"]) for row in rows] == [
        (ids[1], "failed"),
        (ids[3], "cancelled"),
    ]
    assert rows[0]["url"] is None
    assert files_in(tmp_path) == ["out.jsonl"]  # no partial file left behind


async def test_export_of_an_unknown_batch_is_an_error(database_url: str, tmp_path: Path) -> None:
    code, out, err = await cli(
        database_url, "export", "--batch", "nope", "--output", str(tmp_path / "x.csv")
    )

    assert code == 2
    assert out == ""
    assert "no jobs in batch 'nope'" in err
    assert files_in(tmp_path) == []


# --- the view --------------------------------------------------------------------------------


async def test_link_batches_counts_each_batch(conn: asyncpg.Connection) -> None:
    await seed(conn, "a", {("cheqpay", "default"): ["succeeded", "failed", "running"]})
    await seed(conn, "b", {("kushki", "default"): ["succeeded", "cancelled"]})
    await conn.execute("SELECT linkworker_enqueue('kushki', '{}')")  # no batch: not in the view

    rows = await conn.fetch(
        "SELECT batch_id, total, pending, running, succeeded, failed, cancelled, done, "
        "last_finished_at IS NOT NULL AS finished FROM link_batches ORDER BY batch_id"
    )

    assert [tuple(row.values()) for row in rows] == [
        ("a", 3, 0, 1, 1, 1, 0, False, True),
        ("b", 2, 0, 0, 1, 0, 1, True, True),
    ]


# --- the batch-done NOTIFY -------------------------------------------------------------------


class Listener:
    """Notifications on linkworker_batch_done, read up to a sentinel so none can be missed."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[str] = asyncio.Queue()

    async def start(self) -> None:
        await self.conn.add_listener(
            "linkworker_batch_done", lambda _c, _p, _ch, payload: self.queue.put_nowait(payload)
        )

    async def received(self) -> list[dict[str, object]]:
        """Every notification committed so far (a sentinel sent now arrives after them all)."""
        await self.conn.execute("SELECT pg_notify('linkworker_batch_done', 'sentinel')")
        messages = []
        while (payload := await asyncio.wait_for(self.queue.get(), 10)) != "sentinel":
            messages.append(json.loads(payload))
        return messages


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    conn = await asyncpg.connect(database_url)
    listening = Listener(conn)
    await listening.start()
    yield listening
    await conn.close()


async def test_the_last_job_of_a_batch_notifies_once(
    conn: asyncpg.Connection, listener: Listener
) -> None:
    ids = await seed(conn, "inv", {("cheqpay", "default"): ["pending", "pending", "pending"]})
    await seed(conn, "other", {("cheqpay", "default"): ["pending"]})
    await conn.execute("SELECT linkworker_enqueue('kushki', '{}')")  # no batch

    await conn.execute(FINISH, ids[:2], "succeeded")
    assert await listener.received() == []  # one job left
    await conn.execute("UPDATE link_jobs SET state = 'failed' WHERE batch_id IS NULL")
    await conn.execute("UPDATE link_jobs SET state = 'running' WHERE id = $1", ids[2])
    assert await listener.received() == []  # running is not finished
    await conn.execute(FINISH, [ids[2]], "failed")
    await conn.execute(FINISH, ids[:2], "succeeded")  # already final: not a second finish

    assert await listener.received() == [
        {"batch_id": "inv", "succeeded": 2, "failed": 1, "cancelled": 0}
    ]


async def test_a_cancel_that_ends_a_batch_notifies(
    conn: asyncpg.Connection, database_url: str, listener: Listener
) -> None:
    await seed(conn, "inv", {("cheqpay", "default"): ["succeeded", "pending"]})

    code, _, err = await cli(database_url, "cancel", "--batch", "inv")

    assert code == 0, err
    assert await listener.received() == [
        {"batch_id": "inv", "succeeded": 1, "failed": 0, "cancelled": 1}
    ]


async def _blocked_on_a_lock(conn: asyncpg.Connection, pid: int, task: asyncio.Task[str]) -> None:
    """Until the backend `pid` waits for a lock (or its statement ended: then it never will)."""
    # Postgres offers no event for "this backend now waits"; a bounded poll of pg_stat_activity
    while not task.done():
        waiting = await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.01)


async def test_two_transactions_finishing_the_last_jobs_notify_exactly_once(
    conn: asyncpg.Connection, database_url: str, listener: Listener
) -> None:
    ids = await seed(conn, "inv", {("cheqpay", "default"): ["succeeded", "running", "running"]})
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        first_tx, second_tx = first.transaction(), second.transaction()
        await first_tx.start()
        await second_tx.start()
        # the first finishes one job: it sees the other still running, and holds the batch lock
        await first.execute(FINISH, [ids[1]], "succeeded")
        # the second finishes the last job while the first has not committed: without the lock
        # it would see the first's job still running too, and nobody would notify
        finishing = asyncio.create_task(second.execute(FINISH, [ids[2]], "failed"))
        await asyncio.wait_for(_blocked_on_a_lock(conn, second.get_server_pid(), finishing), 10)
        assert not finishing.done()  # it waits for the first's lock
        await first_tx.commit()
        await finishing
        await second_tx.commit()
    finally:
        await first.close()
        await second.close()

    assert await listener.received() == [
        {"batch_id": "inv", "succeeded": 2, "failed": 1, "cancelled": 0}
    ]
