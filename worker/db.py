"""All SQL the worker runs, one named statement above the one typed function that runs it.

Rows become `Job`s here; no asyncpg.Record leaves this module. Every statement is batched:
a claim takes up to N rows in one `FOR UPDATE SKIP LOCKED`, a write-back records N outcomes in
one `UPDATE ... FROM unnest(...)`, fenced by lease holder and attempt so that a stale worker can
never overwrite a newer attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from worker.jobs import Job

NOTIFY_CHANNEL = "linkworker_jobs"

FinalState = Literal["succeeded", "failed", "pending"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt of one job ended in, as it will be written to its row.

    state `pending` is a retry after `retry_in_s`; `refund_attempt` gives the attempt back (the
    job was never sent: throttled, or handed back at shutdown). `error_kind` and `error` go to
    the row's errors history.
    """

    job_id: int
    attempt: int
    state: FinalState
    url: str | None = None
    external_id: str | None = None
    response_json: str | None = None
    error: str | None = None
    error_kind: str | None = None
    retry_in_s: float = 0.0
    unknown_outcome: bool = False
    refund_attempt: bool = False


CLAIM = """
-- the rows: one lane's claimable jobs, in priority order, skipping rows other workers hold
WITH picked AS (
    SELECT id
      FROM link_jobs
     WHERE state = 'pending' AND provider = $1 AND account = $2 AND run_at <= now()
     ORDER BY priority DESC, run_at, id
     LIMIT $3
       FOR UPDATE SKIP LOCKED
)
-- the lease: mark them running for this worker, counting the attempt
UPDATE link_jobs AS j
   SET state = 'running',
       attempts = j.attempts + 1,
       locked_by = $4,
       locked_until = now() + make_interval(secs => $5),
       updated_at = now()
  FROM picked
 WHERE j.id = picked.id
RETURNING j.id, j.payload::text AS payload, j.attempts, j.max_attempts, j.idempotency_key
"""


async def claim(
    conn: asyncpg.Connection,
    *,
    provider: str,
    account: str,
    limit: int,
    worker_id: str,
    lease_s: float,
) -> list[Job]:
    """Lease up to `limit` claimable jobs of one lane to this worker."""
    rows = await conn.fetch(CLAIM, provider, account, limit, worker_id, lease_s)
    jobs = [
        Job(
            id=row["id"],
            provider=provider,
            account=account,
            payload=row["payload"],
            attempt=row["attempts"],
            max_attempts=row["max_attempts"],
            idempotency_key=row["idempotency_key"],
        )
        for row in rows
    ]
    jobs.sort(key=lambda job: job.id)  # RETURNING has no order; keep the claim's rough order
    return jobs


RECORD = """
-- the outcomes, one array per column
WITH results AS (
    SELECT *
      FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[],
                  $8::text[], $9::text[], $10::float8[], $11::bool[], $12::bool[])
        AS r(id, attempt, state, url, external_id, response, error, error_kind, retry_in_s,
             unknown_outcome, refund_attempt)
)
-- the write, fenced: only rows this worker still holds at this attempt
UPDATE link_jobs AS j
   SET state = r.state,
       url = coalesce(r.url, j.url),
       external_id = coalesce(r.external_id, j.external_id),
       response = coalesce(r.response::jsonb, j.response),
       last_error = CASE WHEN r.state = 'succeeded' THEN NULL
                         ELSE coalesce(r.error, j.last_error) END,
       errors = CASE WHEN r.error IS NULL THEN j.errors
                ELSE j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', r.attempt, 'at', now(), 'kind', r.error_kind, 'error', r.error))
                END,
       attempts = j.attempts - r.refund_attempt::int,
       unknown_outcomes = j.unknown_outcomes + r.unknown_outcome::int,
       run_at = CASE WHEN r.state = 'pending'
                     THEN now() + make_interval(secs => r.retry_in_s) ELSE j.run_at END,
       locked_by = NULL,
       locked_until = NULL,
       updated_at = now(),
       finished_at = CASE WHEN r.state IN ('succeeded', 'failed') THEN now() END
  FROM results AS r
 WHERE j.id = r.id AND j.state = 'running' AND j.locked_by = $1 AND j.attempts = r.attempt
"""


async def record(conn: asyncpg.Connection, *, worker_id: str, outcomes: Sequence[Outcome]) -> int:
    """Write a batch of outcomes in one statement; returns how many rows were still ours."""
    # rows are locked in id order, as the heartbeat locks them, so the two cannot deadlock
    outcomes = sorted(outcomes, key=lambda outcome: outcome.job_id)
    # the status ("UPDATE n") counts the rows written: no RETURNING rows to send and decode
    status = await conn.execute(
        RECORD,
        worker_id,
        [o.job_id for o in outcomes],
        [o.attempt for o in outcomes],
        [o.state for o in outcomes],
        [o.url for o in outcomes],
        [o.external_id for o in outcomes],
        [o.response_json for o in outcomes],
        [o.error for o in outcomes],
        [o.error_kind for o in outcomes],
        [o.retry_in_s for o in outcomes],
        [o.unknown_outcome for o in outcomes],
        [o.refund_attempt for o in outcomes],
    )
    return int(status.rsplit(" ", 1)[1])


EXTEND_LEASES = """
-- the heartbeat: the running jobs this worker holds keep their lease (by id, so a claim whose
-- answer was lost with the connection is not kept alive forever: its lease runs out)
UPDATE link_jobs
   SET locked_until = now() + make_interval(secs => $3)
 WHERE id = ANY($2::bigint[]) AND state = 'running' AND locked_by = $1
RETURNING id
"""


async def extend_leases(
    conn: asyncpg.Connection, *, worker_id: str, job_ids: Sequence[int], lease_s: float
) -> set[int]:
    """Push back the lease of the given jobs this worker holds; returns the ids still ours."""
    rows = await conn.fetch(EXTEND_LEASES, worker_id, list(job_ids), lease_s)
    return {row["id"] for row in rows}


RESCUE_EXPIRED = """
-- the expired: running rows whose holder stopped renewing them
WITH expired AS (
    SELECT id
      FROM link_jobs
     WHERE state = 'running' AND locked_until < now()
     ORDER BY locked_until
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
-- back to pending (or failed when out of attempts); the holder may have sent the request
UPDATE link_jobs AS j
   SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'pending' END,
       last_error = 'the worker ' || coalesce(j.locked_by, '?') || ' stopped renewing its lease'
                    || ' during attempt ' || j.attempts || '; the link may have been created',
       errors = j.errors || jsonb_build_array(jsonb_build_object(
           'attempt', j.attempts, 'at', now(), 'kind', 'lease_expired',
           'error', 'lease of ' || coalesce(j.locked_by, '?') || ' expired')),
       unknown_outcomes = j.unknown_outcomes + 1,
       run_at = now(),
       locked_by = NULL,
       locked_until = NULL,
       updated_at = now(),
       finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END
  FROM expired
 WHERE j.id = expired.id
RETURNING j.id
"""


async def rescue_expired(conn: asyncpg.Connection, *, limit: int = 1000) -> int:
    """Return up to `limit` jobs with an expired lease to the queue; returns how many."""
    return len(await conn.fetch(RESCUE_EXPIRED, limit))


RELEASE = """
-- hand back jobs this worker claimed but never sent: pending at once, the attempt given back
UPDATE link_jobs
   SET state = 'pending',
       attempts = attempts - 1,
       locked_by = NULL,
       locked_until = NULL,
       updated_at = now()
 WHERE id = ANY($2::bigint[]) AND state = 'running' AND locked_by = $1
"""


async def release(conn: asyncpg.Connection, *, worker_id: str, job_ids: Sequence[int]) -> int:
    """Return claimed-but-unstarted jobs to pending without using up their attempt."""
    status = await conn.execute(RELEASE, worker_id, list(job_ids))
    return int(status.split()[-1])


# The (provider, account) pairs with pending jobs, by a loose index scan over link_jobs_claim:
# one index probe per lane, so the cost follows the number of lanes, not of rows.
PENDING_LANES = """
WITH RECURSIVE lanes AS (
    (SELECT provider, account FROM link_jobs
      WHERE state = 'pending' ORDER BY provider, account LIMIT 1)
    UNION ALL
    SELECT next.provider, next.account
      FROM lanes,
           LATERAL (SELECT provider, account FROM link_jobs
                     WHERE state = 'pending'
                       AND (provider, account) > (lanes.provider, lanes.account)
                     ORDER BY provider, account LIMIT 1) AS next
)
"""

FAIL_UNCONFIGURED = (
    PENDING_LANES  # noqa: S608 - two constants joined; every value is $n-bound
    + """
-- the lanes of configured providers whose account this worker has no credentials for
, unconfigured AS (
    SELECT provider, account FROM lanes
     WHERE provider = ANY($1::text[]) AND NOT ((provider || '/' || account) = ANY($2::text[]))
)
-- their claimable jobs fail, saying which section to add
UPDATE link_jobs AS j
   SET state = 'failed',
       last_error = 'account ''' || j.account || ''' is not configured for provider '
                    || j.provider || ': add [providers.' || j.provider || '.accounts.'
                    || j.account || '] with its credentials, then retry the job',
       errors = j.errors || jsonb_build_array(jsonb_build_object(
           'attempt', j.attempts, 'at', now(), 'kind', 'unconfigured_account',
           'error', 'account ' || j.account || ' is not configured')),
       updated_at = now(),
       finished_at = now()
  FROM unconfigured AS u
 WHERE j.state = 'pending' AND j.run_at <= now()
   AND j.provider = u.provider AND j.account = u.account
"""
)


async def fail_unconfigured(
    conn: asyncpg.Connection, *, providers: Sequence[str], lanes: Sequence[str]
) -> int:
    """Fail pending jobs of configured providers whose account is unknown ('provider/account')."""
    status = await conn.execute(FAIL_UNCONFIGURED, list(providers), list(lanes))
    return int(status.split()[-1])


PENDING_PROVIDERS = (
    PENDING_LANES
    + """
-- which providers have work waiting or held, for the start-up check of credentials
SELECT provider FROM lanes
 UNION
SELECT DISTINCT provider FROM link_jobs WHERE state = 'running'
"""
)


async def pending_providers(conn: asyncpg.Connection) -> set[str]:
    """Providers that have pending or running jobs."""
    return {row["provider"] for row in await conn.fetch(PENDING_PROVIDERS)}


@dataclass(frozen=True, slots=True)
class Backlog:
    """What is left for a set of lanes: claimable now, waiting (retries), held by any worker."""

    ready: int
    waiting: int
    running: int
    next_run_in_s: float | None

    @property
    def empty(self) -> bool:
        return self.ready == 0 and self.waiting == 0 and self.running == 0


BACKLOG = """
-- unfinished jobs of the given lanes ('provider/account'), split by whether they can run now
SELECT count(*) FILTER (WHERE state = 'pending' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE state = 'pending' AND run_at > now()) AS waiting,
       count(*) FILTER (WHERE state = 'running') AS running,
       extract(epoch FROM min(run_at) FILTER (WHERE state = 'pending') - now())::float8
           AS next_run_in_s
  FROM link_jobs
 WHERE state IN ('pending', 'running') AND (provider || '/' || account) = ANY($1::text[])
"""


async def backlog(conn: asyncpg.Connection, *, lanes: Sequence[str]) -> Backlog:
    """Count the unfinished jobs of these lanes (the drain mode's exit test)."""
    row = await conn.fetchrow(BACKLOG, list(lanes))
    assert row is not None  # an aggregate always returns one row
    return Backlog(
        ready=row["ready"],
        waiting=row["waiting"],
        running=row["running"],
        next_run_in_s=row["next_run_in_s"],
    )
