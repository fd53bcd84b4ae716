"""All SQL the worker runs, one named statement above the one typed function that runs it.

Rows become `Job`s here; no asyncpg.Record leaves this module. Every statement is batched:
a claim takes up to N rows in one `FOR UPDATE SKIP LOCKED`, a write-back records N outcomes in
one `UPDATE ... FROM unnest(...)`, fenced by lease holder and attempt so that a stale worker can
never overwrite a newer attempt.
"""

from __future__ import annotations

import json
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
-- the priority: the highest one with a job due in this lane
WITH RECURSIVE top AS (
    SELECT priority FROM link_jobs
     WHERE state = 'pending' AND provider = $1 AND account = $2 AND run_at <= now()
     ORDER BY priority DESC LIMIT 1
),
-- its batches with a job due, in key order after the lane's cursor: a loose index scan
batches AS (
    SELECT first.batch, 1 AS n
      FROM top,
           LATERAL (SELECT coalesce(j.batch_id, '') AS batch FROM link_jobs AS j
                     WHERE j.state = 'pending' AND j.provider = $1 AND j.account = $2
                       AND j.priority = top.priority AND j.run_at <= now()
                       AND ($6::text IS NULL OR coalesce(j.batch_id, '') > $6)
                     ORDER BY coalesce(j.batch_id, '') LIMIT 1) AS first
    UNION ALL
    SELECT next.batch, b.n + 1
      FROM batches AS b, top,
           LATERAL (SELECT coalesce(j.batch_id, '') AS batch FROM link_jobs AS j
                     WHERE j.state = 'pending' AND j.provider = $1 AND j.account = $2
                       AND j.priority = top.priority AND coalesce(j.batch_id, '') > b.batch
                       AND j.run_at <= now()
                     ORDER BY coalesce(j.batch_id, '') LIMIT 1) AS next
     WHERE b.n < $7
),
-- the rows: an equal share from each batch, oldest first, skipping rows other workers hold
picked AS (
    SELECT p.id
      FROM batches AS b, top,
           LATERAL (SELECT j.id FROM link_jobs AS j
                     WHERE j.state = 'pending' AND j.provider = $1 AND j.account = $2
                       AND j.priority = top.priority AND coalesce(j.batch_id, '') = b.batch
                       AND j.run_at <= now()
                     ORDER BY j.run_at, j.id
                     LIMIT (SELECT ceil($3::float8 / count(*))::int FROM batches)
                       FOR UPDATE SKIP LOCKED) AS p
     LIMIT $3
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
RETURNING j.id, j.payload::text AS payload, j.attempts, j.max_attempts, j.idempotency_key,
          (SELECT count(*) FROM batches) AS batches, (SELECT max(batch) FROM batches) AS last_batch
"""

# batches one claim serves at most; more are served in turn by the following claims
CLAIM_BATCHES = 32


@dataclass(slots=True)
class BatchCursor:
    """Where a lane's round of its batches stands: the last batch key a claim reached."""

    after: str | None = None


async def claim(
    conn: asyncpg.Connection,
    *,
    provider: str,
    account: str,
    limit: int,
    worker_id: str,
    lease_s: float,
    cursor: BatchCursor | None = None,
) -> list[Job]:
    """Lease up to `limit` claimable jobs of one lane to this worker.

    Fair: only the highest priority that has a job due, and within it an equal share of each
    batch (jobs without a batch are one batch). With `cursor`, a lane that has more batches
    than one claim serves takes them in turn; without one, each claim starts from the first.
    """
    after = cursor.after if cursor is not None else None
    batches = max(1, min(limit, CLAIM_BATCHES))
    rows = await conn.fetch(CLAIM, provider, account, limit, worker_id, lease_s, after, batches)
    if not rows and after is not None:  # the round had reached the last batch: start again
        rows = await conn.fetch(CLAIM, provider, account, limit, worker_id, lease_s, None, batches)
    if cursor is not None:
        # the walk stopped at its cap: go on after its last batch; it reached the end: start over
        full = bool(rows) and rows[0]["batches"] >= batches
        cursor.after = rows[0]["last_batch"] if full else None
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


# The statements that touch given jobs by id (write-back, heartbeat, hand-back) test
# `state || '' = 'running'`, not `state = 'running'`: the plain test matches the lease index's
# predicate, and with statistics taken while the jobs were pending the planner expects one
# running row and reads every running row through that index instead of looking up each id
# (measured: a write-back of 200 with 20,000 jobs running took 11.8 ms that way, 3.6 ms by
# primary key, the same as with 400 running).

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
 WHERE j.id = r.id AND j.state || '' = 'running' AND j.locked_by = $1 AND j.attempts = r.attempt
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
 WHERE id = ANY($2::bigint[]) AND state || '' = 'running' AND locked_by = $1
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
 WHERE id = ANY($2::bigint[]) AND state || '' = 'running' AND locked_by = $1
"""


async def release(conn: asyncpg.Connection, *, worker_id: str, job_ids: Sequence[int]) -> int:
    """Return claimed-but-unstarted jobs to pending without using up their attempt."""
    status = await conn.execute(RELEASE, worker_id, list(job_ids))
    return int(status.split()[-1])


# The (provider, account) pairs with pending jobs, by a loose index scan over link_jobs_claim_fair:
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


# --- fleet lanes: limits and rate budget shared by every worker (sql/0004_fleet_lanes.sql) ---


@dataclass(frozen=True, slots=True)
class LaneLimits:
    """A lane's limits as the fleet keeps them in `linkworker_lanes`."""

    rate_per_s: float
    burst: int
    max_in_flight: int
    rate_headroom: float
    adaptive: bool


CONFIGURE_LANE = """
-- the row as it was, to say what changed
WITH old AS (
    SELECT rate_per_s, burst, max_in_flight, rate_headroom, adaptive, configured_by
      FROM linkworker_lanes WHERE provider = $1 AND account = $2
)
-- this worker's configuration becomes the lane's limits, for every worker
INSERT INTO linkworker_lanes AS l
       (provider, account, rate_per_s, burst, max_in_flight, rate_headroom, adaptive,
        configured_by, current_per_s)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $3)
ON CONFLICT (provider, account) DO UPDATE
   SET rate_per_s = excluded.rate_per_s,
       burst = excluded.burst,
       max_in_flight = excluded.max_in_flight,
       rate_headroom = excluded.rate_headroom,
       adaptive = excluded.adaptive,
       configured_by = excluded.configured_by,
       configured_at = now(),
       -- an adaptive lane keeps what it learned, under the new ceiling
       current_per_s = CASE WHEN l.adaptive AND excluded.adaptive
                            THEN least(l.current_per_s, excluded.rate_per_s)
                            ELSE excluded.rate_per_s END,
       learned_per_s = CASE WHEN l.adaptive AND excluded.adaptive THEN l.learned_per_s END,
       rate_changed_at = now()
 WHERE (l.rate_per_s, l.burst, l.max_in_flight, l.rate_headroom, l.adaptive)
       IS DISTINCT FROM (excluded.rate_per_s, excluded.burst, excluded.max_in_flight,
                         excluded.rate_headroom, excluded.adaptive)
RETURNING (SELECT row_to_json(old)::text FROM old) AS previous
"""


async def configure_lane(
    conn: asyncpg.Connection, *, provider: str, account: str, limits: LaneLimits, worker_id: str
) -> tuple[bool, dict[str, object] | None]:
    """Write a lane's limits; returns (changed, the limits it had before, if it existed)."""
    row = await conn.fetchrow(
        CONFIGURE_LANE,
        provider,
        account,
        limits.rate_per_s,
        limits.burst,
        limits.max_in_flight,
        limits.rate_headroom,
        limits.adaptive,
        worker_id,
    )
    if row is None:
        return False, None
    previous = row["previous"]
    return True, (json.loads(previous) if previous is not None else None)


@dataclass(frozen=True, slots=True)
class Slots:
    """Send slots granted to this worker: `granted` of them, the first due at `first_at`, the
    others every `spacing_s`. Times are the server's clock (epoch seconds); `now_at` is when
    it granted them."""

    first_at: float
    now_at: float
    spacing_s: float
    granted: int
    rate_per_s: float


async def take_slots(
    conn: asyncpg.Connection, *, provider: str, account: str, wanted: int
) -> Slots:
    """Take `wanted` send slots from a lane's fleet-wide budget."""
    row = await conn.fetchrow(
        "SELECT * FROM linkworker_take_slots($1, $2, $3)", provider, account, wanted
    )
    assert row is not None  # a function with OUT parameters returns one row
    return Slots(
        row["first_at"], row["now_at"], row["spacing_s"], row["granted"], row["rate_per_s"]
    )


async def lane_throttled(
    conn: asyncpg.Connection, *, provider: str, account: str, pause_s: float
) -> float | None:
    """Pause a lane for every worker (and NOTIFY them); returns the lane's rate after it."""
    rate: float | None = await conn.fetchval(
        "SELECT linkworker_lane_throttled($1, $2, $3)", provider, account, pause_s
    )
    return rate


LANES_CHANNEL = "linkworker_lanes"  # NOTIFY 'provider/account': the lane was paused by a 429

JOIN_LANES = """
-- this worker serves these lanes, for the time to live; it keeps the place it joined at (the
-- order of in-flight parts), also when it comes back after an outage
WITH here AS (
    INSERT INTO linkworker_lane_workers AS w (provider, account, worker_id, alive_until)
    SELECT provider, account, $1, now() + make_interval(secs => $4)
      FROM unnest($2::text[], $3::text[]) AS l(provider, account)
    ON CONFLICT (provider, account, worker_id) DO UPDATE SET alive_until = excluded.alive_until
    RETURNING w.provider
)
-- workers gone for a minute are forgotten
DELETE FROM linkworker_lane_workers WHERE alive_until < now() - interval '60 seconds'
"""

LANE_WORKERS = """
-- each lane's live workers, oldest first: the oldest take the in-flight remainder
SELECT w.provider, w.account, l.max_in_flight, w.worker_id,
       count(*) OVER lane AS workers,
       (row_number() OVER (lane ORDER BY w.joined_at, w.worker_id) - 1)::int AS rank,
       extract(epoch FROM now() - w.joined_at)::float8 AS member_for_s
  FROM linkworker_lane_workers AS w
  JOIN linkworker_lanes AS l USING (provider, account)
 WHERE (w.provider, w.account) IN (SELECT * FROM unnest($1::text[], $2::text[]))
   AND w.alive_until > now()
WINDOW lane AS (PARTITION BY w.provider, w.account)
"""


@dataclass(frozen=True, slots=True)
class LaneShare:
    """This worker's place among the live workers of a lane."""

    max_in_flight: int
    workers: int
    rank: int
    member_for_s: float

    def in_flight(self, settle_s: float, *, serving: bool) -> int:
        """This worker's part of the lane's in-flight cap. One that is not `serving` yet waits
        `settle_s` after joining a lane others serve, for them to see it and shrink their
        parts, so the parts never add up to more than the cap."""
        if not serving and self.workers > 1 and self.member_for_s < settle_s:
            return 0
        share, extra = divmod(self.max_in_flight, self.workers)
        return share + (1 if self.rank < extra else 0)


async def lane_shares(
    conn: asyncpg.Connection, *, worker_id: str, lanes: Sequence[tuple[str, str]], ttl_s: float
) -> dict[tuple[str, str], LaneShare]:
    """Say this worker is alive in its lanes; returns its share of each."""
    providers = [provider for provider, _ in lanes]
    accounts = [account for _, account in lanes]
    await conn.execute(JOIN_LANES, worker_id, providers, accounts, ttl_s)
    rows = await conn.fetch(LANE_WORKERS, providers, accounts)
    return {
        (row["provider"], row["account"]): LaneShare(
            row["max_in_flight"], row["workers"], row["rank"], row["member_for_s"]
        )
        for row in rows
        if row["worker_id"] == worker_id
    }


async def leave_lanes(conn: asyncpg.Connection, *, worker_id: str) -> None:
    """This worker stops: the others take its share of the in-flight caps at once."""
    await conn.execute("DELETE FROM linkworker_lane_workers WHERE worker_id = $1", worker_id)


@dataclass(frozen=True, slots=True)
class LaneState:
    """A lane's row in `linkworker_lanes`, for `linkworker status`."""

    provider: str
    account: str
    rate_per_s: float
    current_per_s: float
    burst: int
    max_in_flight: int
    adaptive: bool
    paused_for_s: float
    throttles: int
    workers: int


LANE_STATES = """
SELECT l.provider, l.account, l.rate_per_s, l.current_per_s, l.burst, l.max_in_flight,
       l.adaptive, l.throttles,
       CASE WHEN l.paused_until > now() THEN extract(epoch FROM l.paused_until - now())::float8
            ELSE 0.0 END AS paused_for_s,
       (SELECT count(*) FROM linkworker_lane_workers AS w
         WHERE w.provider = l.provider AND w.account = l.account
           AND w.alive_until > now())::int AS workers
  FROM linkworker_lanes AS l
 ORDER BY l.provider, l.account
"""


async def lane_states(conn: asyncpg.Connection) -> list[LaneState]:
    """Every lane's limits and budget state, with how many live workers serve it."""
    return [LaneState(**dict(row)) for row in await conn.fetch(LANE_STATES)]
