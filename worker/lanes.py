"""A lane: one provider account, with its own rate, in-flight cap and buffer of claimed jobs.

Rate shaping is the lane's budget (worker/budget.py): by default one shared by every worker on
the database, kept in Postgres, or this process's own leaky bucket. Either way no one-second
window holds more than `rate_per_s`, with `rate_headroom` kept free for network jitter. The
in-flight cap is a gate whose limit is this worker's part of the lane's `max_in_flight`.

Rate and concurrency are separate knobs, and both are held only around the HTTP call: a job is
validated and built before it waits for a slot, so a bad payload never spends one.

A lane claims only what it can start soon (`prefetch_s` of its rate plus its in-flight cap, and
never more than it can start in half a lease), so a slow lane neither hoards jobs nor starves
others. A 429 pauses the whole lane (for every worker) for Retry-After (1 s if absent) and puts
the job back at the front of the buffer: the throttle is not the job's fault, and costs it no
attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from worker import http
from worker.breaker import CircuitBreaker
from worker.budget import Budget, FleetBudget, InFlightGate, ProcessBudget, drain_rate
from worker.connection import LostConnection, PgConnection, first_set, wait_for_event
from worker.db import Outcome
from worker.errors import (
    ConflictError,
    InvalidPayloadError,
    PermanentError,
    ProviderError,
    ThrottledError,
)
from worker.jobs import Job, LinkCreated, ProviderRequest
from worker.logs import get_logger
from worker.metrics import LaneMetrics, status_class
from worker.outcomes import OutcomeLadder
from worker.providers import LOOKUPS, LinkLookup, ProviderAdapter
from worker.settings import LaneSettings

Claim = Callable[[int], Awaitable[list[Job]]]
Record = Callable[[Outcome], None]


LATENCY_SAMPLES = 10_000


@dataclass(slots=True)
class LaneCounts:
    """What a lane did in this run (for the summary and the progress display)."""

    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    throttled: int = 0
    unknown: int = 0
    # the latest calls only: a million-link run must not grow memory
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))


class Lane:
    def __init__(
        self,
        provider: str,
        account: str,
        settings: LaneSettings,
        adapter: ProviderAdapter,
        ladder: OutcomeLadder,
        *,
        prefetch_s: float,
        lease_s: float,
        claim_batch_size: int,
        metrics: LaneMetrics,
    ) -> None:
        self.provider, self.account, self.settings = provider, account, settings
        self.name = f"{provider}/{account}"
        self.adapter, self.ladder = adapter, ladder
        rate = drain_rate(settings)
        self.budget: Budget = ProcessBudget(settings)
        self.slots = InFlightGate(settings.max_in_flight)
        self.timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, sock_connect=settings.connect_timeout_s
        )
        self._sizing = (rate, prefetch_s, lease_s, claim_batch_size)
        self.target = self._claim_target(1, settings.max_in_flight)
        self.buffer: deque[Job] = deque()
        self.in_flight: dict[asyncio.Task[None], Job] = {}
        self.starting: Job | None = None  # popped, waiting for a slot and a token
        self.paused_until = 0.0
        self.breaker = CircuitBreaker(
            threshold=settings.breaker_threshold, cooldown_s=settings.breaker_cooldown_s
        )
        self.breaker_changed = asyncio.Event()
        self.wake = asyncio.Event()  # jobs may be claimable (NOTIFY, poll, retry)
        self.has_jobs = asyncio.Event()
        self.exhausted = False  # the last claim found nothing
        self.counts = LaneCounts()
        self.metrics = metrics
        metrics.set_rate_limit(settings.rate_per_s)
        metrics.set_max_in_flight(settings.max_in_flight)
        self.log = get_logger(provider=provider, account=account)

    def _claim_target(self, workers: int, in_flight: int) -> int:
        """How many jobs to hold: what this worker can start within `prefetch_s` (its part of
        the lane's rate, and its in-flight slots), never more than it starts in half a lease."""
        rate, prefetch_s, lease_s, claim_batch_size = self._sizing
        rate /= max(1, workers)
        soon = math.ceil(rate * prefetch_s) + in_flight
        return max(1, min(claim_batch_size, soon, math.floor(rate * lease_s / 2)))

    def set_share(self, workers: int, in_flight: int) -> None:
        """This worker's part of the lane: `workers` serve it, `in_flight` calls are ours."""
        self.budget.set_fleet_size(workers)
        self.slots.set_limit(in_flight)
        self.target = self._claim_target(workers, in_flight)
        self.metrics.set_max_in_flight(in_flight)

    def share_with_fleet(self, conn: PgConnection, give_up: asyncio.Event) -> None:
        """Take the rate from the lane's budget in Postgres, shared by every worker, and the
        in-flight cap from this worker's part of it (none until the runner has it)."""
        self.slots.set_limit(0)
        self.budget = FleetBudget(
            self.provider,
            self.account,
            self.settings,
            conn,
            need=lambda: min(len(self.buffer), self.slots.free),
            give_up=give_up,
            metrics=self.metrics,
        )

    @property
    def idle(self) -> bool:
        """Nothing buffered, nothing in flight, and the queue had nothing for it."""
        return self.exhausted and not self.buffer and not self.in_flight

    def held_job_ids(self) -> list[int]:
        """Jobs this lane holds a lease on: buffered and in flight (for the heartbeat)."""
        held = [job.id for job in self.buffer] + [job.id for job in self.in_flight.values()]
        return held if self.starting is None else [*held, self.starting.id]

    async def feed(self, claim: Claim, stop: asyncio.Event, poll_interval_s: float) -> None:
        """Keep the buffer topped up from the queue until `stop`."""
        while not stop.is_set():
            if self.slots.limit == 0:  # more workers than in-flight slots: others serve it
                self.exhausted = not self.buffer
                await wait_for_event(stop, poll_interval_s)
                continue
            if len(self.buffer) > self.target // 2:
                await wait_for_event(self.wake, poll_interval_s)
                if len(self.buffer) > self.target // 2:
                    self.wake.clear()  # the dispatcher sets it again when the buffer runs low
                continue
            # cleared before the claim: a NOTIFY that lands while it runs must not be lost
            self.wake.clear()
            jobs = await claim(self.target - len(self.buffer))
            if stop.is_set():
                self.buffer.extend(jobs)  # handed back by the runner's shutdown
                return
            self.exhausted = not jobs and not self.buffer
            if jobs:
                self.buffer.extend(jobs)
                self.has_jobs.set()
            else:
                await wait_for_event(self.wake, poll_interval_s)

    async def dispatch(
        self, session: aiohttp.ClientSession, record: Record, stop: asyncio.Event
    ) -> None:
        """Start buffered jobs, never faster than the lane's rate and in-flight cap."""
        while not stop.is_set():
            if not self.buffer:
                self.has_jobs.clear()
                self.wake.set()
                await first_set(self.has_jobs, stop)
                continue
            await self._wait_unpaused(stop)
            job = self.buffer.popleft()
            if len(self.buffer) <= self.target // 2:
                self.wake.set()
            request = self._build(job, record)
            if request is None:
                continue  # failed without a call: no slot, token or breaker probe spent
            self.starting = job
            try:
                sent = await self._clear_to_send(job, stop)
            finally:
                self.starting = None
            if not sent:
                self.buffer.appendleft(job)  # stopping: handed back unsent
                return
            self._start(session, job, request, record)

    async def _clear_to_send(self, job: Job, stop: asyncio.Event) -> bool:
        """Breaker, in-flight slot, send slot, and the pause once more (a 429 may have come
        meanwhile: then a new send slot, after the pause)."""
        await self._wait_breaker(stop)
        if stop.is_set():
            return False
        while True:
            try:
                await self._acquire(job)
            except LostConnection:  # stopping while Postgres is away: no slot for it
                return False
            if stop.is_set():
                self.slots.release()
                return False
            if self.paused_until <= time.monotonic():
                return True
            # a 429 came while this job waited: its send slot, from before the pause, is void
            # (sent after the pause it would bunch with the slots granted for then)
            self.slots.release()
            await self._wait_unpaused(stop)

    async def _acquire(self, job: Job) -> None:
        """Take an in-flight slot, then a send slot; if cancelled, the job goes back unsent."""
        await _or_put_back(self.slots.acquire(), job, self.buffer)
        try:
            await _or_put_back(self.budget.acquire(), job, self.buffer)
        except (asyncio.CancelledError, LostConnection):
            self.slots.release()
            raise

    def _build(self, job: Job, record: Record) -> ProviderRequest | None:
        try:
            return self.adapter.build_request(job, self.settings)
        except InvalidPayloadError as exc:
            self._finish(job, self.ladder.failure(job, exc), record, 0.0)
        except Exception as exc:
            self.log.exception("adapter_crashed", job_id=job.id)
            self._finish(job, self.ladder.unexpected(job, exc, sent=False), record, 0.0)
        return None

    def _start(
        self, session: aiohttp.ClientSession, job: Job, request: ProviderRequest, record: Record
    ) -> None:
        task = asyncio.create_task(self._attempt(session, job, request, record))
        self.in_flight[task] = job
        self.metrics.set_in_flight(len(self.in_flight))
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(task, None)
        self.metrics.set_in_flight(len(self.in_flight))

    async def _attempt(
        self, session: aiohttp.ClientSession, job: Job, request: ProviderRequest, record: Record
    ) -> None:
        """Send one job and record its outcome; the one place an attempt ends."""
        started = time.perf_counter()
        try:
            created = await self._create(session, job, request)
            outcome = self.ladder.success(job, created)
            self._provider_health(ok=True)
        except ThrottledError as exc:
            self._provider_health(ok=True)
            self._throttled(job, exc)
            return
        except ProviderError as exc:
            self._provider_health(ok=isinstance(exc, PermanentError))
            if exc.status in (401, 403):
                self.metrics.credentials_rejected()
            outcome = self.ladder.failure(job, exc)
        except asyncio.CancelledError:
            self._finish(job, self.ladder.interrupted(job), record, started)
            raise
        except Exception as exc:
            self.log.exception("attempt_crashed", job_id=job.id)
            self._provider_health(ok=False)  # also frees a half-open probe
            outcome = self.ladder.unexpected(job, exc, sent=True)
        finally:
            self.slots.release()
        self._finish(job, outcome, record, started)

    async def _create(
        self, session: aiohttp.ClientSession, job: Job, request: ProviderRequest
    ) -> LinkCreated:
        answer = await self._send(session, request)
        try:
            return self.adapter.parse_response(answer.status, answer.headers, answer.body)
        except ConflictError:
            lookup = LOOKUPS.get(self.provider)
            if lookup is None:
                raise
            return await self._look_up(session, job, lookup)

    async def _look_up(
        self, session: aiohttp.ClientSession, job: Job, lookup: LinkLookup
    ) -> LinkCreated:
        """After a conflict, find the link an earlier attempt created (a rate-limited call too)."""
        await self.budget.acquire()
        request = lookup.lookup_request(job, self.settings)
        answer = await self._send(session, request)
        created = lookup.parse_lookup(job, answer.status, answer.headers, answer.body)
        self.log.info("job_reconciled", job_id=job.id, attempt=job.attempt)
        return created

    async def _send(self, session: aiohttp.ClientSession, request: ProviderRequest) -> http.Answer:
        """One HTTP call, timed for the latency figures and the metrics."""
        started = time.perf_counter()
        try:
            answer = await http.send(session, self.settings.base_url, request, self.timeout)
        except ProviderError:
            self.metrics.call_finished("transport", time.perf_counter() - started)
            raise
        elapsed = time.perf_counter() - started
        self.counts.latencies_ms.append(elapsed * 1000)
        self.metrics.call_finished(status_class(answer.status), elapsed)
        return answer

    def _throttled(self, job: Job, exc: ThrottledError) -> None:
        pause_s = exc.retry_after_s if exc.retry_after_s is not None else 1.0
        self.paused_until = max(self.paused_until, time.monotonic() + pause_s)
        self.budget.throttled(pause_s)
        self.buffer.appendleft(job)
        self.has_jobs.set()
        self.counts.throttled += 1
        self.metrics.throttled(pause_s)
        self.log.warning("lane_throttled", job_id=job.id, pause_s=pause_s)

    def _finish(self, job: Job, outcome: Outcome, record: Record, started: float) -> None:
        record(outcome)
        duration_ms = round((time.perf_counter() - started) * 1000, 1) if started else 0.0
        counts = self.counts
        if outcome.unknown_outcome:
            counts.unknown += 1
            self.metrics.unknown_outcome()
        self.metrics.job_finished("retried" if outcome.state == "pending" else outcome.state)
        if outcome.state == "succeeded":
            counts.succeeded += 1
            # A line per success only at debug: at thousands of links a second it cost 7 % of
            # the worker's CPU. Info gets the lane's first link, then a line per 1,000 links.
            self.log.debug(
                "job_succeeded", job_id=job.id, attempt=job.attempt, duration_ms=duration_ms
            )
            if counts.succeeded % 1000 == 0 or counts.succeeded == 1:
                self.log.info(
                    "lane_progress",
                    succeeded=counts.succeeded,
                    failed=counts.failed,
                    retried=counts.retried,
                    throttled=counts.throttled,
                    unknown=counts.unknown,
                )
        elif outcome.state == "failed":
            counts.failed += 1
            self.log.warning(
                "job_failed",
                job_id=job.id,
                attempt=job.attempt,
                duration_ms=duration_ms,
                kind=outcome.error_kind,
                error=outcome.error,
            )
        else:
            counts.retried += 1
            self.log.info(
                "job_retry_scheduled",
                job_id=job.id,
                attempt=job.attempt,
                duration_ms=duration_ms,
                kind=outcome.error_kind,
                retry_in_s=round(outcome.retry_in_s, 2),
                error=outcome.error,
            )

    def _provider_health(self, *, ok: bool) -> None:
        """Feed the breaker: any sane answer (a 4xx too) is health; 5xx and timeouts are not."""
        changed = self.breaker.record_success() if ok else self.breaker.record_failure()
        if changed is None:
            return
        self.metrics.set_breaker_state(changed)
        self.breaker_changed.set()
        if changed == "open":
            self.log.warning(
                "breaker_opened", failures=self.breaker.failures, cooldown_s=self.breaker.cooldown_s
            )
        else:
            self.log.info("breaker_closed")

    async def _wait_breaker(self, stop: asyncio.Event) -> None:
        """Hold the lane while its breaker is open (or its half-open probe is out)."""
        if self.breaker.state == "closed":
            return  # the hot path: nothing to wait for
        while not stop.is_set() and not self.breaker.allow():
            self.metrics.set_breaker_state(self.breaker.state)
            self.breaker_changed.clear()
            await _first_or_timeout(self.breaker_changed, stop, max(self.breaker.wait_s(), 0.01))
        self.metrics.set_breaker_state(self.breaker.state)

    async def _wait_unpaused(self, stop: asyncio.Event) -> None:
        remaining = self.paused_until - time.monotonic()
        if remaining > 0:
            await wait_for_event(stop, remaining)

    async def finish(self, grace_s: float, hurry: asyncio.Event) -> None:
        """Let in-flight calls end within `grace_s` (or until `hurry`), then cancel the rest.

        A cancelled call is recorded as interrupted: retried, with its outcome unknown.
        """
        if self.in_flight:
            calls = asyncio.gather(*self.in_flight, return_exceptions=True)
            await _first_done(calls, hurry, grace_s)
        for task in list(self.in_flight):
            task.cancel()
        if self.in_flight:
            await asyncio.wait(set(self.in_flight))

    def drop(self, job_ids: set[int]) -> int:
        """Forget buffered jobs whose lease this worker lost; returns how many."""
        kept = [job for job in self.buffer if job.id not in job_ids]
        dropped = len(self.buffer) - len(kept)
        if dropped:
            self.buffer = deque(kept)
        return dropped

    def take_buffer(self) -> list[Job]:
        """Remove and return the claimed jobs that were never started (to hand back)."""
        jobs = list(self.buffer)
        self.buffer.clear()
        return jobs


async def _or_put_back(waiting: Awaitable[object], job: Job, buffer: deque[Job]) -> None:
    try:
        await waiting
    except asyncio.CancelledError:
        buffer.appendleft(job)
        raise


async def _first_done(work: asyncio.Future[Any], hurry: asyncio.Event, timeout_s: float) -> None:
    """Wait for `work`, at most `timeout_s`, and not past `hurry` being set."""
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({work, hurried}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()


async def _first_or_timeout(event: asyncio.Event, stop: asyncio.Event, timeout_s: float) -> None:
    """Wait until `event` or `stop` is set, at most `timeout_s`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first_set(event, stop), timeout_s)
