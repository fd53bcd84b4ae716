"""Putting jobs right after the fact: `linkworker retry` and `linkworker cancel`.

`retry` sends failed jobs back to the queue, chosen by batch, provider, account or error text:
`pending` now, with their attempts reset (the `errors` history stays, so what went wrong before
is still on the row). Workers wake at once (the table's NOTIFY trigger). It refuses to run
without a filter unless `--all` says so.

`cancel` stops a batch's pending jobs: `cancelled`, with `finished_at` set. Running jobs are in
a provider call already and finish as they will.

Both print what they changed per lane, in one statement each (so the counts are what happened,
even with workers running); `--dry-run` counts the same rows and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from worker.arguments import CONFIG_HELP
from worker.enqueue import connected


@dataclass(frozen=True, slots=True)
class LaneCount:
    """How many jobs of one lane a command changed (or would change)."""

    provider: str
    account: str
    jobs: int

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.account}"


@dataclass(frozen=True, slots=True)
class RetryFilter:
    """Which failed jobs to retry; None matches anything. `error_like` is an ILIKE pattern
    matched anywhere in `last_error` (so plain text is a case-insensitive substring)."""

    batch_id: str | None = None
    provider: str | None = None
    account: str | None = None
    error_like: str | None = None

    @property
    def empty(self) -> bool:
        return all(
            value is None for value in (self.batch_id, self.provider, self.account, self.error_like)
        )

    def arguments(self) -> tuple[str | None, ...]:
        return (self.batch_id, self.provider, self.account, self.error_like)


RETRY_PREVIEW = """
-- the failed jobs the filters match, counted per lane; nothing is changed
SELECT provider, account, count(*) AS jobs
  FROM link_jobs
 WHERE state = 'failed'
   AND ($1::text IS NULL OR batch_id = $1)
   AND ($2::text IS NULL OR provider = $2)
   AND ($3::text IS NULL OR account = $3)
   AND ($4::text IS NULL OR last_error ILIKE '%' || $4 || '%')
 GROUP BY provider, account
 ORDER BY provider, account
"""

RETRY = """
-- the failed jobs the filters match, back to pending now with a fresh set of attempts; the
-- errors history stays, and a row a concurrent retry took already no longer matches
WITH retried AS (
    UPDATE link_jobs
       SET state = 'pending',
           attempts = 0,
           run_at = now(),
           finished_at = NULL,
           updated_at = now()
     WHERE state = 'failed'
       AND ($1::text IS NULL OR batch_id = $1)
       AND ($2::text IS NULL OR provider = $2)
       AND ($3::text IS NULL OR account = $3)
       AND ($4::text IS NULL OR last_error ILIKE '%' || $4 || '%')
    RETURNING provider, account
)
-- what changed, per lane
SELECT provider, account, count(*) AS jobs
  FROM retried
 GROUP BY provider, account
 ORDER BY provider, account
"""


async def retry_failed(
    conn: asyncpg.Connection, where: RetryFilter, *, dry_run: bool = False
) -> list[LaneCount]:
    """Re-queue the failed jobs `where` matches (or only count them); per-lane counts."""
    rows = await conn.fetch(RETRY_PREVIEW if dry_run else RETRY, *where.arguments())
    return [LaneCount(row["provider"], row["account"], row["jobs"]) for row in rows]


CANCEL_PREVIEW = """
-- the batch's pending jobs, counted per lane; nothing is changed
SELECT provider, account, count(*) AS jobs
  FROM link_jobs
 WHERE batch_id = $1 AND state = 'pending'
 GROUP BY provider, account
 ORDER BY provider, account
"""

CANCEL = """
-- the batch's pending jobs, final now; a job a worker claimed meanwhile is running, not pending,
-- and is left to finish
WITH cancelled AS (
    UPDATE link_jobs
       SET state = 'cancelled',
           finished_at = now(),
           updated_at = now()
     WHERE batch_id = $1 AND state = 'pending'
    RETURNING provider, account
)
-- what changed, per lane
SELECT provider, account, count(*) AS jobs
  FROM cancelled
 GROUP BY provider, account
 ORDER BY provider, account
"""


async def cancel_pending(
    conn: asyncpg.Connection, batch_id: str, *, dry_run: bool = False
) -> list[LaneCount]:
    """Cancel a batch's pending jobs (or only count them); per-lane counts."""
    rows = await conn.fetch(CANCEL_PREVIEW if dry_run else CANCEL, batch_id)
    return [LaneCount(row["provider"], row["account"], row["jobs"]) for row in rows]


BATCH_JOBS = """
-- the batch's size, and its jobs in a provider call now (a cancel leaves those alone)
SELECT count(*) AS total, count(*) FILTER (WHERE state = 'running') AS running
  FROM link_jobs
 WHERE batch_id = $1
"""


async def batch_jobs(conn: asyncpg.Connection, batch_id: str) -> tuple[int, int]:
    """(jobs in the batch, of which running)."""
    row = await conn.fetchrow(BATCH_JOBS, batch_id)
    assert row is not None  # an aggregate always returns one row
    return row["total"], row["running"]


# --- printing ---------------------------------------------------------------------------------


def report(counts: Sequence[LaneCount], *, verb: str, past: str, what: str, dry_run: bool) -> str:
    """'retried 12 failed jobs:' and a line per lane; a dry run says it changed nothing."""
    total = sum(count.jobs for count in counts)
    if total == 0:
        return f"no {what} jobs match: nothing to {verb}"
    if dry_run:
        head = f"would {verb} {total} {what} jobs (dry run: nothing was changed):"
    else:
        head = f"{past} {total} {what} jobs:"
    width = max(len(count.name) for count in counts)
    lines = [f"  {count.name:<{width}}  {count.jobs:>7}" for count in counts]
    return "\n".join([head, *lines])


# --- the commands -----------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`linkworker retry` and `linkworker cancel`."""

    retry = commands.add_parser(
        "retry",
        help="send failed jobs back to the queue (attempts reset, errors history kept)",
        description="Failed jobs matching every filter given become pending now with their "
        "attempts reset; their errors history stays. At least one filter, or --all.",
    )
    retry.add_argument("--batch", metavar="ID", help="only this batch")
    retry.add_argument("--provider", help="only this provider")
    retry.add_argument("--account", help="only this account")
    retry.add_argument(
        "--error-like",
        metavar="TEXT",
        help="only jobs whose last_error contains TEXT (case-insensitive; %% and _ are wildcards)",
    )
    retry.add_argument("--all", action="store_true", help="every failed job, no filter")
    retry.add_argument("--dry-run", action="store_true", help="count them, change nothing")
    retry.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    retry.set_defaults(handler=_retry_command)

    cancel = commands.add_parser(
        "cancel",
        help="cancel a batch's pending jobs",
        description="The batch's pending jobs become cancelled; running ones finish as they will.",
    )
    cancel.add_argument("--batch", metavar="ID", required=True, help="the batch")
    cancel.add_argument("--dry-run", action="store_true", help="count them, change nothing")
    cancel.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    cancel.set_defaults(handler=_cancel_command)


def _retry_command(args: argparse.Namespace) -> int:
    from worker.cli import load_for_command

    where = RetryFilter(args.batch, args.provider, args.account, args.error_like)
    if where.empty and not args.all:
        print(
            "linkworker: retry needs a filter (--batch, --provider, --account, --error-like), "
            "or --all to retry every failed job",
            file=sys.stderr,
        )
        return 2
    settings = load_for_command(args)
    counts = asyncio.run(_retry(settings.database_url, where, dry_run=args.dry_run))
    print(report(counts, verb="retry", past="retried", what="failed", dry_run=args.dry_run))
    return 0


async def _retry(database_url: str, where: RetryFilter, *, dry_run: bool) -> list[LaneCount]:
    async with connected(database_url) as conn:
        return await retry_failed(conn, where, dry_run=dry_run)


def _cancel_command(args: argparse.Namespace) -> int:
    from worker.cli import load_for_command

    settings = load_for_command(args)
    return asyncio.run(_cancel(settings.database_url, args.batch, dry_run=args.dry_run))


async def _cancel(database_url: str, batch_id: str, *, dry_run: bool) -> int:
    async with connected(database_url) as conn:
        total, _ = await batch_jobs(conn, batch_id)
        if total == 0:
            print(f"linkworker: no jobs in batch {batch_id!r}", file=sys.stderr)
            return 2
        counts = await cancel_pending(conn, batch_id, dry_run=dry_run)
        _, running = await batch_jobs(conn, batch_id)
    print(report(counts, verb="cancel", past="cancelled", what="pending", dry_run=dry_run))
    if running:
        print(f"{running} running jobs of batch {batch_id} finish as they will")
    return 0
