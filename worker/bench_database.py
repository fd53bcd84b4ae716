"""The benchmark's database: its own throwaway database, bulk loading, and the two scenarios
that need no provider at all.

    enqueue   rows/s into link_jobs through each enqueue path (unnest INSERT, executemany,
              COPY, and the enqueue module's paths when it has them)
    queue     claim + write-back through the worker's own db.claim and db.record, against a
              bare `UPDATE ... SKIP LOCKED` claim + complete loop on a minimal table in the
              same database (the database ceiling); both run as two connections, one claiming
              and one completing, 200 rows a batch

The benchmark creates `linkworker_bench_<random>` on the server it is given, migrates it and
drops it at the end; nothing else on the server is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from worker import db
from worker.bench_processes import LANES, Child
from worker.bench_report import BenchError, Figure, ScenarioResult, Target
from worker.connection import SERVER_SETTINGS
from worker.enqueue import enqueue_many
from worker.jobs import Job, LinkCreated
from worker.migrations import migrate
from worker.outcomes import OutcomeLadder
from worker.providers import cheqpay
from worker.redaction import Scrubber
from worker.retry import RetryPolicy
from worker.samples import cheqpay_payload, mixed_jobs
from worker.simulator import Simulator, SimulatorConfig

Batch = TypeVar("Batch")
JobRow = tuple[str, str, str]  # provider, account, payload JSON

BATCH_ROWS = 200
UNNEST_BATCH_ROWS = 5_000
DISTINCT_PAYLOADS = 3_000  # bulk loads cycle through this many realistic payloads
COLUMNS = ["provider", "account", "payload"]


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at database `name`."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@contextlib.asynccontextmanager
async def bench_database(server_url: str) -> AsyncIterator[str]:
    """Create and migrate `linkworker_bench_<random>`; yields its URL; drops it afterwards."""
    name = f"linkworker_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def postgres_info(database_url: str) -> dict[str, str]:
    """The server's version and the settings that move queue figures most."""
    conn = await asyncpg.connect(database_url)
    try:
        names = ("server_version", "shared_buffers", "synchronous_commit", "fsync", "wal_level")
        return {name: str(await conn.fetchval(f"SHOW {name}")) for name in names}
    finally:
        await conn.close()


async def empty_queue(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE link_jobs RESTART IDENTITY")


def job_rows(count: int, lanes: Sequence[tuple[str, str]]) -> Iterator[JobRow]:
    """`count` rows over `lanes`, cycling through a few thousand realistic payloads."""
    distinct = [
        (provider, account, payload)
        for provider, account, payload, _ in mixed_jobs(min(count, DISTINCT_PAYLOADS), list(lanes))
    ]
    return itertools.islice(itertools.cycle(distinct), count)


async def load_jobs(conn: asyncpg.Connection, count: int, lanes: Sequence[tuple[str, str]]) -> None:
    """COPY `count` pending jobs into an empty queue, then ANALYZE it (as autovacuum would)."""
    await empty_queue(conn)
    await conn.copy_records_to_table("link_jobs", records=job_rows(count, lanes), columns=COLUMNS)
    await conn.execute("ANALYZE link_jobs")


# --- enqueue ------------------------------------------------------------------------------------

UNNEST_INSERT = """
INSERT INTO link_jobs (provider, account, payload)
SELECT provider, account, payload::jsonb
  FROM unnest($1::text[], $2::text[], $3::text[]) AS r(provider, account, payload)
"""
SINGLE_INSERT = "INSERT INTO link_jobs (provider, account, payload) VALUES ($1, $2, $3::jsonb)"


async def insert_unnest(conn: asyncpg.Connection, rows: Sequence[JobRow]) -> float:
    """INSERT ... SELECT FROM unnest(arrays), 5,000 rows a statement (and a transaction)."""
    started = time.perf_counter()
    for start in range(0, len(rows), UNNEST_BATCH_ROWS):
        chunk = rows[start : start + UNNEST_BATCH_ROWS]
        await conn.execute(UNNEST_INSERT, *(list(column) for column in zip(*chunk, strict=True)))
    return time.perf_counter() - started


async def insert_executemany(conn: asyncpg.Connection, rows: Sequence[JobRow]) -> float:
    """One single-row INSERT, executemany'd over every row (asyncpg pipelines it)."""
    started = time.perf_counter()
    await conn.executemany(SINGLE_INSERT, rows)
    return time.perf_counter() - started


async def insert_copy(conn: asyncpg.Connection, rows: Sequence[JobRow]) -> float:
    """COPY ... FROM STDIN (binary), all rows in one go."""
    started = time.perf_counter()
    await conn.copy_records_to_table("link_jobs", records=rows, columns=COLUMNS)
    return time.perf_counter() - started


async def insert_enqueue_many(conn: asyncpg.Connection, rows: Sequence[JobRow]) -> float:
    """worker.enqueue.enqueue_many with payload dicts: each checked as the worker would, COPY."""
    jobs = [
        {"provider": provider, "account": account, "payload": json.loads(payload)}
        for provider, account, payload in rows
    ]
    started = time.perf_counter()
    result = await enqueue_many(conn, jobs)
    if result.inserted != len(rows):
        raise BenchError(f"enqueue_many inserted {result.inserted} of {len(rows)} jobs")
    return time.perf_counter() - started


async def run_enqueue_command(rows: Sequence[JobRow], database_url: str, workdir: Path) -> float:
    """`linkworker enqueue FILE.jsonl` as a user runs it, process start-up included."""
    jobs = workdir / "jobs.jsonl"
    with jobs.open("w", encoding="utf-8") as handle:
        for provider, account, payload in rows:
            handle.write(
                f'{{"provider": "{provider}", "account": "{account}", "payload": {payload}}}\n'
            )
    config = workdir / "enqueue.toml"
    config.write_text(f"database_url = {json.dumps(database_url)}\n", encoding="utf-8")
    args = ["-m", "worker", "enqueue", str(jobs), "--config", str(config)]
    async with Child("enqueue_command", args, workdir) as child:
        return child.check(await child.wait(600)).wall_s


EnqueuePath = Callable[[Sequence[JobRow]], Awaitable[float]]


def enqueue_paths(
    conn: asyncpg.Connection, database_url: str, workdir: Path
) -> dict[str, EnqueuePath]:
    """Each way into the queue, by name: given the rows, the seconds it took."""
    return {
        "INSERT unnest": partial(insert_unnest, conn),
        "executemany": partial(insert_executemany, conn),
        "COPY": partial(insert_copy, conn),
        "enqueue_many": partial(insert_enqueue_many, conn),
        "linkworker enqueue FILE": partial(
            run_enqueue_command, database_url=database_url, workdir=workdir
        ),
    }


async def rows_per_s(conn: asyncpg.Connection, path: EnqueuePath, rows: Sequence[JobRow]) -> float:
    """Rows per second through `path` into an empty queue (checked by counting them)."""
    await empty_queue(conn)
    seconds = await path(rows)
    stored = await conn.fetchval("SELECT count(*) FROM link_jobs")
    if stored != len(rows):
        raise BenchError(f"enqueue stored {stored} of {len(rows)} rows")
    return len(rows) / seconds


async def enqueue_scenario(database_url: str, rows_wanted: int, workdir: Path) -> ScenarioResult:
    result = ScenarioResult("enqueue")
    rows = list(job_rows(rows_wanted, LANES))
    conn = await asyncpg.connect(database_url)
    try:
        paths = enqueue_paths(conn, database_url, workdir)
        rates = {name: await rows_per_s(conn, path, rows) for name, path in paths.items()}
        await empty_queue(conn)
    finally:
        await conn.close()
    ceiling = rates["COPY"]
    for name, rate in rates.items():
        result.add(Figure(f"{name} rows/s", rate, "rows/s", None if name == "COPY" else ceiling))
    result.details = {
        "rows": len(rows),
        "unnest_batch_rows": UNNEST_BATCH_ROWS,
        "enqueue_many": "payload dicts, each validated against the provider's model, then COPY",
        "linkworker enqueue FILE": "JSON Lines; process start-up, two passes over the file, COPY",
    }
    return result


# --- queue --------------------------------------------------------------------------------------


async def pipeline(
    database_url: str,
    claim: Callable[[asyncpg.Connection], Awaitable[list[Batch]]],
    complete: Callable[[asyncpg.Connection, list[Batch]], Awaitable[int]],
) -> tuple[int, float]:
    """Claim on one connection while completing on another until the claim finds nothing.

    Returns (rows completed, seconds).
    """
    # connected as the worker connects (worker.connection), for both loops alike
    claimer = await asyncpg.connect(database_url, server_settings=SERVER_SETTINGS)
    completer = await asyncpg.connect(database_url, server_settings=SERVER_SETTINGS)
    batches: asyncio.Queue[list[Batch]] = asyncio.Queue(maxsize=2)

    async def claim_all() -> None:
        while batch := await claim(claimer):
            await batches.put(batch)
        await batches.put([])

    async def complete_all() -> int:
        done = 0
        while batch := await batches.get():
            done += await complete(completer, batch)
        return done

    try:
        started = time.perf_counter()
        _, done = await asyncio.gather(claim_all(), complete_all())
        return done, time.perf_counter() - started
    finally:
        await claimer.close()
        await completer.close()


def simulated_link() -> LinkCreated:
    """A Cheqpay 201 answer from the simulator, parsed as the worker parses it."""
    simulator = Simulator(SimulatorConfig(seed=1))
    body = json.dumps({**cheqpay_payload(1), "reference": "bench-queue"}).encode()
    answer = simulator.decide_create(simulator.providers["cheqpay"], {"x-api-key": "bench"}, body)
    return cheqpay.parse_response(answer.status, {}, answer.body)


async def worker_queue_rate(database_url: str, rows: int) -> tuple[int, float]:
    """db.claim + db.record, as the worker calls them, over `rows` Cheqpay jobs."""
    link = simulated_link()
    ladder = OutcomeLadder(
        RetryPolicy(base_s=1, cap_s=300), on_unknown_outcome="retry", scrub=Scrubber([])
    )

    async def claim(conn: asyncpg.Connection) -> list[Job]:
        return await db.claim(
            conn,
            provider="cheqpay",
            account="default",
            limit=BATCH_ROWS,
            worker_id="bench",
            lease_s=60,
        )

    async def complete(conn: asyncpg.Connection, jobs: list[Job]) -> int:
        outcomes = [ladder.success(job, link) for job in jobs]
        return await db.record(conn, worker_id="bench", outcomes=outcomes)

    conn = await asyncpg.connect(database_url)
    try:
        await load_jobs(conn, rows, [("cheqpay", "default")])
    finally:
        await conn.close()
    return await pipeline(database_url, claim, complete)


BARE_TABLE = """
CREATE TABLE bench_bare_queue (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state text NOT NULL DEFAULT 'pending',
    payload jsonb NOT NULL
);
CREATE INDEX bench_bare_queue_pending ON bench_bare_queue (id) WHERE state = 'pending';
"""
BARE_CLAIM = """
WITH picked AS (
    SELECT id FROM bench_bare_queue WHERE state = 'pending' ORDER BY id LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE bench_bare_queue AS q SET state = 'running'
  FROM picked WHERE q.id = picked.id
RETURNING q.id, q.payload::text
"""
BARE_COMPLETE = "UPDATE bench_bare_queue SET state = 'succeeded' WHERE id = ANY($1::bigint[])"


async def bare_queue_rate(database_url: str, rows: int) -> tuple[int, float]:
    """The database ceiling: the least a batched SKIP LOCKED queue can do, on the same payloads."""

    async def claim(conn: asyncpg.Connection) -> list[int]:
        return [row["id"] for row in await conn.fetch(BARE_CLAIM, BATCH_ROWS)]

    async def complete(conn: asyncpg.Connection, ids: list[int]) -> int:
        status = await conn.execute(BARE_COMPLETE, ids)
        return int(status.split()[-1])

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS bench_bare_queue")
        await conn.execute(BARE_TABLE)
        payloads = ((payload,) for _, _, payload in job_rows(rows, [("cheqpay", "default")]))
        await conn.copy_records_to_table("bench_bare_queue", records=payloads, columns=["payload"])
        await conn.execute("ANALYZE bench_bare_queue")
    finally:
        await conn.close()
    try:
        return await pipeline(database_url, claim, complete)
    finally:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("DROP TABLE bench_bare_queue")
        finally:
            await conn.close()


async def queue_scenario(database_url: str, rows: int) -> ScenarioResult:
    result = ScenarioResult("queue")
    worker_done, worker_s = await worker_queue_rate(database_url, rows)
    bare_done, bare_s = await bare_queue_rate(database_url, rows)
    if worker_done != rows or bare_done != rows:
        raise BenchError(f"queue loops completed {worker_done} and {bare_done} of {rows} rows")
    bare_rate = bare_done / bare_s
    result.add(
        Figure(
            "claim+record rows/s",
            worker_done / worker_s,
            "rows/s",
            bare_rate,
            Target(">=", 0.5, "ratio"),
        )
    )
    result.add(Figure("bare SKIP LOCKED rows/s", bare_rate, "rows/s"))
    result.details = {
        "rows": rows,
        "batch_rows": BATCH_ROWS,
        "worker_s": worker_s,
        "bare_s": bare_s,
    }
    return result
