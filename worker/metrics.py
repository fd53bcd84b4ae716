"""Prometheus metrics: one private registry per worker, and the calls the worker makes on it.

Every series is named `linkworker_...` with its unit in the name, and carries only bounded labels
(provider, account, outcome, status_class, state): never a job id or a batch id. `Metrics` owns
its own `CollectorRegistry`, never the global one, so several runners (and tests) can live in one
process. A lane's series are resolved once, by `Metrics.lane()`, and created at zero, so the hot
path is a dict lookup and an add, and `increase()` sees a lane's very first failure.

    per lane (provider, account)
      linkworker_jobs_finished_total{outcome}           succeeded | failed | retried
      linkworker_provider_call_duration_seconds{status_class}   2xx..5xx | transport (histogram)
      linkworker_throttled_total                        429 answers (the job is sent again)
      linkworker_throttle_retry_after_seconds_total     the pauses they asked for (Retry-After)
      linkworker_unknown_outcomes_total                 attempts whose outcome is unknown
      linkworker_credentials_rejected_total             401/403 answers
      linkworker_lane_in_flight, linkworker_lane_max_in_flight
      linkworker_lane_rate_limit_requests_per_second    the provider's limit as configured
      linkworker_lane_rate_requests_per_second          the fleet's current rate (adaptive lanes
                                                        lower it on 429s)
      linkworker_lane_send_slots_total{outcome}         fleet budget slots granted | lapsed
      linkworker_lane_breaker_state{state}              1 for the current state, 0 for the others
    per worker
      linkworker_leases_rescued_total                   expired leases returned to the queue
      linkworker_write_back_rows_total, linkworker_write_back_fenced_rows_total,
      linkworker_write_back_duration_seconds            the batched, fenced result writes
      linkworker_build_info{version}
    the queue (every worker reports the whole table: aggregate with max, not sum)
      linkworker_queue_jobs{state}                      pending (claimable now), scheduled
                                                        (pending, run_at later), running
      linkworker_queue_oldest_pending_age_seconds       how long the oldest claimable job has
                                                        waited past its run_at (0: none waits)
      linkworker_queue_snapshot_timestamp_seconds       when the gauges above were last read

The queue gauges come from `queue_depth_snapshot`, one cheap read-only SELECT that `watch_queue`
runs every QUEUE_SNAPSHOT_INTERVAL_S, never per scrape. Its SQL lives here rather than in
worker.db because it only feeds these gauges; like worker.db, no asyncpg.Record leaves the module.
Lanes found in the table but not configured in this worker are reported too, at most
MAX_UNCONFIGURED_LANES of them; past that they are summed under account OTHER_ACCOUNT, because
account names in the table come from producers and label values must stay bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import asyncpg
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from worker.connection import LostConnection, PgConnection, wait_for_event

JobOutcome = Literal["succeeded", "failed", "retried"]
StatusClass = Literal["2xx", "3xx", "4xx", "5xx", "transport"]
BreakerState = Literal["closed", "open", "half_open"]

JOB_OUTCOMES: tuple[JobOutcome, ...] = ("succeeded", "failed", "retried")
STATUS_CLASSES: tuple[StatusClass, ...] = ("2xx", "3xx", "4xx", "5xx", "transport")
BREAKER_STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")
SLOT_OUTCOMES = ("granted", "lapsed")
QUEUE_STATES = ("pending", "scheduled", "running")

# The exposition format generate_latest writes. prometheus-client >= 0.22 names a newer format
# CONTENT_TYPE_LATEST, which generate_latest does not write, so the type is spelled out here.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LANE_LABELS = ("provider", "account")
# provider calls: a fast API answers in tens of ms; the default lane timeout is 30 s
CALL_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# write-backs: one UPDATE of up to write_batch_size rows
WRITE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

QUEUE_SNAPSHOT_INTERVAL_S = 15.0
QUEUE_SNAPSHOT_TIMEOUT_S = 10.0
MAX_UNCONFIGURED_LANES = 20
OTHER_ACCOUNT = "_other"

Lane = tuple[str, str]


class LaneDepth(NamedTuple):
    provider: str
    account: str
    state: str
    jobs: int


class LaneAge(NamedTuple):
    provider: str
    account: str
    seconds: float


def status_class(status: int | None) -> StatusClass:
    """The bounded label for an HTTP status; None (no answer at all) is `transport`."""
    if status is None:
        return "transport"
    if 200 <= status < 300:
        return "2xx"
    if 300 <= status < 400:
        return "3xx"
    if 400 <= status < 500:
        return "4xx"
    return "5xx"  # 5xx, and anything no sound server sends as a final answer (1xx, 6xx+)


@dataclass(frozen=True, slots=True)
class _LaneFamilies:
    """The per-lane metric families, labelled (provider, account, ...)."""

    jobs: Counter
    call_seconds: Histogram
    throttled: Counter
    retry_after_seconds: Counter
    unknown: Counter
    credentials_rejected: Counter
    in_flight: Gauge
    max_in_flight: Gauge
    rate_limit: Gauge
    rate_now: Gauge
    breaker: Gauge
    send_slots: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> _LaneFamilies:
        lane = LANE_LABELS
        return cls(
            jobs=Counter(
                "linkworker_jobs_finished_total",
                "Job attempts that ended, by outcome (retried: scheduled to run again).",
                [*lane, "outcome"],
                registry=registry,
            ),
            call_seconds=Histogram(
                "linkworker_provider_call_duration_seconds",
                "Provider HTTP calls, from sending to the whole answer read, by status class.",
                [*lane, "status_class"],
                buckets=CALL_BUCKETS_S,
                registry=registry,
            ),
            throttled=Counter(
                "linkworker_throttled_total",
                "429 answers; the lane pauses and sends the job again, costing it no attempt.",
                lane,
                registry=registry,
            ),
            retry_after_seconds=Counter(
                "linkworker_throttle_retry_after_seconds_total",
                "Seconds of pause the 429 answers asked for (Retry-After, 1 s when absent).",
                lane,
                registry=registry,
            ),
            unknown=Counter(
                "linkworker_unknown_outcomes_total",
                "Attempts whose outcome is unknown: the link may exist (timeout after sending).",
                lane,
                registry=registry,
            ),
            credentials_rejected=Counter(
                "linkworker_credentials_rejected_total",
                "401 and 403 answers: the lane's credentials were refused.",
                lane,
                registry=registry,
            ),
            send_slots=Counter(
                "linkworker_lane_send_slots_total",
                "Send slots taken from the lane's fleet-wide budget (granted), and those this "
                "worker could not use in time (lapsed).",
                [*lane, "outcome"],
                registry=registry,
            ),
            **cls._gauges(registry),
        )

    @staticmethod
    def _gauges(registry: CollectorRegistry) -> dict[str, Gauge]:
        lane = LANE_LABELS
        return {
            "in_flight": Gauge(
                "linkworker_lane_in_flight", "Provider calls in flight.", lane, registry=registry
            ),
            "max_in_flight": Gauge(
                "linkworker_lane_max_in_flight",
                "This worker's part of the lane's in-flight cap (max_in_flight, for the fleet).",
                lane,
                registry=registry,
            ),
            "rate_limit": Gauge(
                "linkworker_lane_rate_limit_requests_per_second",
                "The provider's limit the lane keeps to (rate_per_s), in any one-second window.",
                lane,
                registry=registry,
            ),
            "rate_now": Gauge(
                "linkworker_lane_rate_requests_per_second",
                "The lane's current rate for the fleet: rate_per_s, or lower after 429s when "
                "adaptive.",
                lane,
                registry=registry,
            ),
            "breaker": Gauge(
                "linkworker_lane_breaker_state",
                "Circuit breaker: 1 for the lane's current state, 0 for the others.",
                [*lane, "state"],
                registry=registry,
            ),
        }


@dataclass(frozen=True, slots=True)
class _WorkerFamilies:
    """The worker-wide metric families, and the queue gauges."""

    leases_rescued: Counter
    write_rows: Counter
    write_fenced: Counter
    write_seconds: Histogram
    queue_jobs: Gauge
    oldest_pending: Gauge
    snapshot_time: Gauge
    build: Gauge

    @classmethod
    def register(cls, registry: CollectorRegistry) -> _WorkerFamilies:
        lane = LANE_LABELS
        return cls(
            leases_rescued=Counter(
                "linkworker_leases_rescued_total",
                "Running jobs whose lease ran out (their worker died) returned to the queue.",
                registry=registry,
            ),
            write_rows=Counter(
                "linkworker_write_back_rows_total",
                "Outcome rows sent in write-back batches (written or fenced).",
                registry=registry,
            ),
            write_fenced=Counter(
                "linkworker_write_back_fenced_rows_total",
                "Outcome rows not written: another worker had rescued the job, its attempt wins.",
                registry=registry,
            ),
            write_seconds=Histogram(
                "linkworker_write_back_duration_seconds",
                "One write-back statement.",
                buckets=WRITE_BUCKETS_S,
                registry=registry,
            ),
            queue_jobs=Gauge(
                "linkworker_queue_jobs",
                "Unfinished jobs in link_jobs: pending (claimable now), scheduled (pending, "
                "run_at later), running. Every worker reports the whole table: aggregate with max.",
                [*lane, "state"],
                registry=registry,
            ),
            oldest_pending=Gauge(
                "linkworker_queue_oldest_pending_age_seconds",
                "How long the lane's oldest claimable job has waited past its run_at (0: none).",
                lane,
                registry=registry,
            ),
            snapshot_time=Gauge(
                "linkworker_queue_snapshot_timestamp_seconds",
                "Unix time the queue gauges were last read from the database.",
                registry=registry,
            ),
            build=Gauge(
                "linkworker_build_info",
                "The running version (always 1).",
                ["version"],
                registry=registry,
            ),
        )


class LaneMetrics:
    """One lane's series, resolved once; every method is a lookup and an add."""

    __slots__ = (
        "_breaker",
        "_call_seconds",
        "_credentials_rejected",
        "_in_flight",
        "_jobs",
        "_max_in_flight",
        "_rate_limit",
        "_rate_now",
        "_retry_after_seconds",
        "_send_slots",
        "_throttled",
        "_unknown",
    )

    def __init__(self, families: _LaneFamilies, provider: str, account: str) -> None:
        lane = (provider, account)
        self._jobs = {outcome: families.jobs.labels(*lane, outcome) for outcome in JOB_OUTCOMES}
        self._call_seconds = {
            status: families.call_seconds.labels(*lane, status) for status in STATUS_CLASSES
        }
        self._throttled = families.throttled.labels(*lane)
        self._retry_after_seconds = families.retry_after_seconds.labels(*lane)
        self._unknown = families.unknown.labels(*lane)
        self._credentials_rejected = families.credentials_rejected.labels(*lane)
        self._in_flight = families.in_flight.labels(*lane)
        self._max_in_flight = families.max_in_flight.labels(*lane)
        self._rate_limit = families.rate_limit.labels(*lane)
        self._rate_now = families.rate_now.labels(*lane)
        self._send_slots = {
            outcome: families.send_slots.labels(*lane, outcome) for outcome in SLOT_OUTCOMES
        }
        self._breaker = {state: families.breaker.labels(*lane, state) for state in BREAKER_STATES}
        self.set_breaker_state("closed")

    def job_finished(self, outcome: JobOutcome) -> None:
        """An attempt ended: succeeded, failed for good, or retried (scheduled again)."""
        self._jobs[outcome].inc()

    def call_finished(self, status_class: StatusClass, seconds: float) -> None:
        """A provider call ended with an answer of this class, or `transport` (none)."""
        self._call_seconds[status_class].observe(seconds)

    def throttled(self, retry_after_s: float) -> None:
        """A 429: the lane pauses `retry_after_s`."""
        self._throttled.inc()
        self._retry_after_seconds.inc(retry_after_s)

    def unknown_outcome(self) -> None:
        self._unknown.inc()

    def credentials_rejected(self) -> None:
        """A 401 or 403 answer."""
        self._credentials_rejected.inc()

    def set_in_flight(self, n: int) -> None:
        self._in_flight.set(n)

    def set_max_in_flight(self, n: int) -> None:
        self._max_in_flight.set(n)

    def set_rate_limit(self, per_s: float) -> None:
        self._rate_limit.set(per_s)
        self._rate_now.set(per_s)

    def set_rate_now(self, per_s: float) -> None:
        self._rate_now.set(per_s)

    def send_slots(self, granted: int = 0, lapsed: int = 0) -> None:
        if granted:
            self._send_slots["granted"].inc(granted)
        if lapsed:
            self._send_slots["lapsed"].inc(lapsed)

    def set_breaker_state(self, state: BreakerState | str) -> None:
        """closed, open or half_open (worker.breaker's states); ValueError for anything else."""
        if state not in self._breaker:
            raise ValueError(f"unknown breaker state {state!r}: expected one of {BREAKER_STATES}")
        for name, child in self._breaker.items():
            child.set(1 if name == state else 0)


class Metrics:
    """The worker's metrics, on a registry of its own."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry()
        if process_metrics:  # process_* (memory, CPU, fds, start time) and python_info
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._lane_families = _LaneFamilies.register(self.registry)
        self._families = _WorkerFamilies.register(self.registry)
        self._lanes: dict[Lane, LaneMetrics] = {}
        self._depth_series: set[tuple[str, ...]] = set()
        self._age_series: set[tuple[str, ...]] = set()

    def lane(self, provider: str, account: str) -> LaneMetrics:
        """The series of one configured lane (the same object on every call)."""
        key = (provider, account)
        if key not in self._lanes:
            self._lanes[key] = LaneMetrics(self._lane_families, provider, account)
        return self._lanes[key]

    def leases_rescued(self, n: int) -> None:
        self._families.leases_rescued.inc(n)

    def write_back(self, rows: int, fenced: int, seconds: float) -> None:
        """One write-back statement: `rows` sent, `fenced` of them no longer ours."""
        self._families.write_rows.inc(rows)
        self._families.write_fenced.inc(fenced)
        self._families.write_seconds.observe(seconds)

    def queue_depth(self, rows: Iterable[tuple[str, str, str, int]]) -> None:
        """Set the queue gauges from (provider, account, state, jobs) rows.

        Configured lanes absent from `rows` read 0; other lanes that vanished are removed.
        """
        rows = list(rows)
        report_as = self._report_as({(provider, account) for provider, account, _, _ in rows})
        values: dict[tuple[str, ...], float] = {
            (*lane, state): 0.0 for lane in self._lanes for state in QUEUE_STATES
        }
        for provider, account, state, jobs in rows:
            key = (*report_as[provider, account], state)
            values[key] = values.get(key, 0.0) + jobs
        self._depth_series = _replace(self._families.queue_jobs, self._depth_series, values)

    def oldest_pending_age(self, rows: Iterable[tuple[str, str, float]]) -> None:
        """Set the oldest-pending gauges from (provider, account, seconds) rows (as queue_depth)."""
        rows = list(rows)
        report_as = self._report_as({(provider, account) for provider, account, _ in rows})
        values: dict[tuple[str, ...], float] = dict.fromkeys(self._lanes, 0.0)
        for provider, account, seconds in rows:
            key = report_as[provider, account]
            values[key] = max(values.get(key, 0.0), seconds)
        self._age_series = _replace(self._families.oldest_pending, self._age_series, values)

    def queue_snapshot_taken(self) -> None:
        self._families.snapshot_time.set_to_current_time()

    def build_info(self, version: str) -> None:
        self._families.build.clear()
        self._families.build.labels(version).set(1)

    def render(self) -> bytes:
        """The registry in Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)

    def _report_as(self, lanes: set[Lane]) -> dict[Lane, Lane]:
        """The lane each one is reported as: itself, or (provider, OTHER_ACCOUNT) past the cap."""
        unconfigured = sorted(lane for lane in lanes if lane not in self._lanes)
        folded = set(unconfigured[MAX_UNCONFIGURED_LANES:])
        return {lane: (lane[0], OTHER_ACCOUNT) if lane in folded else lane for lane in lanes}


def _replace(
    gauge: Gauge, previous: set[tuple[str, ...]], values: dict[tuple[str, ...], float]
) -> set[tuple[str, ...]]:
    """Set `gauge` to exactly `values`: remove the series of `previous` not in it."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    for labels in previous - values.keys():
        gauge.remove(*labels)
    return set(values)


QUEUE_SNAPSHOT = """
-- pending jobs per lane, from the claim's partial index: claimable now or scheduled later, and
-- how long the oldest claimable one has waited past its run_at
WITH pending AS (
    SELECT provider, account,
           count(*) FILTER (WHERE run_at <= now()) AS pending,
           count(*) FILTER (WHERE run_at > now()) AS scheduled,
           0::bigint AS running,
           extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8
               AS oldest_pending_s
      FROM link_jobs
     WHERE state = 'pending'
     GROUP BY provider, account
),
-- running jobs per lane, held by any worker, from the lease index
running AS (
    SELECT provider, account, 0::bigint, 0::bigint, count(*), NULL::float8
      FROM link_jobs
     WHERE state = 'running'
     GROUP BY provider, account
)
-- one row per lane with unfinished jobs
SELECT provider, account, sum(pending)::bigint AS pending, sum(scheduled)::bigint AS scheduled,
       sum(running)::bigint AS running, coalesce(max(oldest_pending_s), 0) AS oldest_pending_s
  FROM (SELECT * FROM pending UNION ALL SELECT * FROM running) AS lanes
 GROUP BY provider, account
"""


async def queue_depth_snapshot(
    conn: asyncpg.Connection,
) -> tuple[list[LaneDepth], list[LaneAge]]:
    """Unfinished jobs per lane and state, and each lane's oldest claimable wait, in one query."""
    rows = await conn.fetch(QUEUE_SNAPSHOT, timeout=QUEUE_SNAPSHOT_TIMEOUT_S)
    depth = [
        LaneDepth(row["provider"], row["account"], state, row[state])
        for row in rows
        for state in QUEUE_STATES
    ]
    ages = [LaneAge(row["provider"], row["account"], row["oldest_pending_s"]) for row in rows]
    return depth, ages


async def watch_queue(
    metrics: Metrics,
    conn: PgConnection,
    stop: asyncio.Event,
    *,
    interval_s: float = QUEUE_SNAPSHOT_INTERVAL_S,
) -> None:
    """Refresh the queue gauges now and every `interval_s`, until `stop`.

    While Postgres is away the gauges keep their last values; the snapshot timestamp says how old.
    """
    while True:
        try:
            depth, ages = await conn.run(queue_depth_snapshot, give_up=stop)
        except LostConnection:
            return
        metrics.queue_depth(depth)
        metrics.oldest_pending_age(ages)
        metrics.queue_snapshot_taken()
        if await wait_for_event(stop, interval_s):
            return
