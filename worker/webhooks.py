"""Batch-completion webhooks: POST a signed event once a batch's last job has finished.

    waiting ──batch has jobs, none pending or running, next_attempt_at due──▶ delivering
    delivering ──2xx──▶ delivered
    delivering ──other status or transport error──▶ waiting, next_attempt_at = now + backoff
                                                 └─▶ failed, once attempts reach max_attempts
    delivering whose lease ran out (its worker died) ──▶ delivering again, by any worker

A claim is one `FOR UPDATE SKIP LOCKED` statement that also moves the row to `delivering`, so
two workers looking at one finished batch at the same moment (say both finished its last jobs)
POST it once: the second skips the locked row or, once the first committed, no longer finds it
due. Every write after the POST is fenced by deliverer and attempt, so a deliverer whose lease
ran out cannot overwrite a newer attempt.

Delivery is exactly once in normal runs and at least once across a crash: a worker that dies
(or is cut off from Postgres longer than the lease) between the POST and recording it leaves
the row `delivering`; when the lease runs out another worker POSTs again, with the same body
(the event is stored at the first claim). Receivers dedupe on batch_id.

The request (built by a pure function, sent by another):

    POST <url>                              no redirects followed; a 3xx is a failed attempt
    Content-Type: application/json
    X-Linkworker-Event: batch.finished
    X-Linkworker-Delivery: <batch_id, percent-encoded>:<attempt>
    X-Linkworker-Signature: sha256=<hex HMAC-SHA256 of the body>   (absent without a secret)
    {"event": "batch.finished", "batch_id": ..., "total": n, "succeeded": n, "failed": n,
     "cancelled": n, "finished_at": "2026-11-01T12:00:00.000000Z"}

Never logged or stored: the secret, and the URL's query string and user info (tokens live
there). `last_error` shows scheme, host and path; logs show only scheme and host, since many
webhook URLs carry a token in their path as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import aiohttp
import asyncpg

from worker.connection import LostConnection, PgConnection
from worker.logs import get_logger
from worker.redaction import Scrubber
from worker.retry import RetryPolicy

EVENT = "batch.finished"
BODY_KEYS = ("event", "batch_id", "total", "succeeded", "failed", "cancelled", "finished_at")
DEFAULT_RETRY = RetryPolicy(base_s=5.0, cap_s=3600.0)
DEFAULT_MAX_ATTEMPTS = 12
DEFAULT_BATCH_SIZE = 20
BATCH_DONE_CHANNEL = "linkworker_batch_done"  # sql/0002: NOTIFY when a batch's last job ends
MAX_ERROR_CHARS = 1000

WebhookState = Literal["delivered", "waiting", "failed"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One claimed webhook: where to POST, which attempt this is, and the event as stored."""

    batch_id: str
    url: str
    attempt: int
    event: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    url: str
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a POST came to: the status received, or why there was none (no URL in it)."""

    status: int | None
    problem: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """The one write for one attempt: delivered, waiting again after `retry_in_s`, or failed."""

    batch_id: str
    attempt: int
    state: WebhookState
    status: int | None = None
    error: str | None = None
    retry_in_s: float = 0.0


# --- the request, pure --------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event_body(event: Mapping[str, Any]) -> bytes:
    """The stored event as the body's bytes, keys in a fixed order (the same on every retry)."""
    return json.dumps({key: event.get(key) for key in BODY_KEYS}, separators=(",", ":")).encode()


def build_request(delivery: Delivery, secret: str | None) -> WebhookRequest:
    """The POST for one delivery; signed when a secret is configured."""
    body = event_body(delivery.event)
    headers = {
        "Content-Type": "application/json",
        "X-Linkworker-Event": EVENT,
        # percent-encoded: a batch id is any text, a header value only printable ASCII
        "X-Linkworker-Delivery": f"{quote(delivery.batch_id, safe='')}:{delivery.attempt}",
    }
    if secret:
        headers["X-Linkworker-Signature"] = sign(secret, body)
    return WebhookRequest(delivery.url, body, headers)


def public_url(url: str) -> str:
    """Scheme, host, port and path: the URL without user info, query string or fragment."""
    return _origin(url, with_path=True)


def origin(url: str) -> str:
    """Scheme, host and port only, for logs."""
    return _origin(url, with_path=False)


def _origin(url: str, *, with_path: bool) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(an invalid URL)"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path if with_path else ''}"


# --- sending ------------------------------------------------------------------------------


async def post(session: aiohttp.ClientSession, request: WebhookRequest, timeout_s: float) -> Answer:
    """Send one webhook; a transport failure becomes an Answer without status."""
    try:
        async with session.post(
            request.url,
            data=request.body,
            headers=dict(request.headers),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as response:
            return Answer(response.status)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        return Answer(None, problem(exc, timeout_s))


def problem(exc: BaseException, timeout_s: float) -> str:
    """A transport failure in a few words. Never str(exc): aiohttp's messages may hold the URL."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"could not connect within {timeout_s:g} s"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.InvalidURL):
        return "the URL is not valid"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return f"the connection failed ({type(exc).__name__})"
    return f"the request could not be sent ({type(exc).__name__})"


# --- what an attempt comes to, pure --------------------------------------------------------


def decide(
    delivery: Delivery,
    answer: Answer,
    *,
    max_attempts: int,
    retry: RetryPolicy,
    draw: Callable[[], float] = random.random,
) -> WebhookOutcome:
    """Delivered on a 2xx; otherwise waiting again after backoff, or failed at `max_attempts`."""
    batch_id, attempt = delivery.batch_id, delivery.attempt
    if answer.delivered:
        return WebhookOutcome(batch_id, attempt, "delivered", status=answer.status)
    error = _error_text(delivery, answer)
    if attempt >= max_attempts:
        error = f"gave up after {attempt} attempts; last error: {error}"
        return WebhookOutcome(batch_id, attempt, "failed", status=answer.status, error=error)
    delay = retry.delay_s(attempt, None, draw)
    return WebhookOutcome(
        batch_id, attempt, "waiting", status=answer.status, error=error, retry_in_s=delay
    )


def _error_text(delivery: Delivery, answer: Answer) -> str:
    where = f"attempt {delivery.attempt}: POST {public_url(delivery.url)}"
    if answer.status is not None:
        return f"{where} answered HTTP {answer.status}"
    return f"{where} failed: {answer.problem}"


# --- the database ---------------------------------------------------------------------------

CLAIM = """
-- the due webhooks: waiting ones whose time has come, and delivering ones whose deliverer
-- let its lease run out (it died, or lost Postgres)
WITH due AS (
    SELECT w.batch_id
      FROM link_batch_webhooks AS w
     WHERE w.state IN ('waiting', 'delivering')
       AND w.next_attempt_at <= now()
       AND (w.state = 'waiting' OR w.locked_until < now())
       -- the batch has jobs (a webhook registered before its jobs waits for them) ...
       AND EXISTS (SELECT 1 FROM link_jobs AS j WHERE j.batch_id = w.batch_id)
       -- ... and none is left to do (both probes use the link_jobs_batch index)
       AND NOT EXISTS (
           SELECT 1 FROM link_jobs AS j
            WHERE j.batch_id = w.batch_id AND j.state IN ('pending', 'running'))
     ORDER BY w.next_attempt_at
     LIMIT $1
       -- another deliverer's row is skipped; once it commits, the re-check finds it not due
       FOR UPDATE OF w SKIP LOCKED
)
-- the lease: delivering for this worker, counting the attempt; the event is taken once, here,
-- so every retry sends the same body
UPDATE link_batch_webhooks AS w
   SET state = 'delivering',
       attempts = w.attempts + 1,
       locked_by = $2,
       locked_until = now() + make_interval(secs => $3),
       payload = coalesce(w.payload, (
           SELECT jsonb_build_object(
                      'event', $4::text,
                      'batch_id', w.batch_id,
                      'total', count(*),
                      'succeeded', count(*) FILTER (WHERE j.state = 'succeeded'),
                      'failed', count(*) FILTER (WHERE j.state = 'failed'),
                      'cancelled', count(*) FILTER (WHERE j.state = 'cancelled'),
                      'finished_at', to_char(max(coalesce(j.finished_at, j.updated_at))
                                             AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
             FROM link_jobs AS j
            WHERE j.batch_id = w.batch_id)),
       updated_at = now()
  FROM due
 WHERE w.batch_id = due.batch_id
RETURNING w.batch_id, w.url, w.attempts, w.payload::text AS payload
"""


async def claim(
    conn: asyncpg.Connection, *, worker_id: str, limit: int, lease_s: float
) -> list[Delivery]:
    """Lease up to `limit` due webhooks of finished batches to this worker."""
    rows = await conn.fetch(CLAIM, limit, worker_id, lease_s, EVENT)
    return [
        Delivery(row["batch_id"], row["url"], row["attempts"], json.loads(row["payload"]))
        for row in rows
    ]


RECORD = """
-- the attempt's result, fenced: only if this worker still holds the row at this attempt
UPDATE link_batch_webhooks
   SET state = $4,
       response_status = $5,
       last_error = $6,
       next_attempt_at = CASE WHEN $4 = 'waiting'
                              THEN now() + make_interval(secs => $7) ELSE next_attempt_at END,
       delivered_at = CASE WHEN $4 = 'delivered' THEN now() END,
       locked_by = NULL,
       locked_until = NULL,
       updated_at = now()
 WHERE batch_id = $1 AND state = 'delivering' AND locked_by = $2 AND attempts = $3
"""


async def record(conn: asyncpg.Connection, *, worker_id: str, outcome: WebhookOutcome) -> bool:
    """Write one attempt's outcome; False if the row was no longer ours (lease lost)."""
    status = await conn.execute(
        RECORD,
        outcome.batch_id,
        worker_id,
        outcome.attempt,
        outcome.state,
        outcome.status,
        outcome.error,
        outcome.retry_in_s,
    )
    return status.split()[-1] == "1"


# --- the loop -------------------------------------------------------------------------------


class WebhookDeliverer:
    """Claims due webhooks and delivers them, one round at a time."""

    def __init__(
        self,
        conn: PgConnection,
        session: aiohttp.ClientSession,
        *,
        worker_id: str,
        secret: str | None,
        lease_s: float = 30.0,
        timeout_s: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if lease_s < 2 * timeout_s:
            # the lease must outlast the POST and the write after it, or a slow receiver gets
            # the same event twice from two workers
            raise ValueError(
                f"lease_s ({lease_s:g}) must be at least twice timeout_s ({timeout_s:g})"
            )
        self.conn = conn
        self.session = session
        self.worker_id = worker_id
        self.secret = secret or None
        self.warned_unsigned = False
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.retry = retry
        self.max_attempts = max_attempts
        self.batch_size = batch_size
        self.scrub = Scrubber([secret] if secret else [])
        self.log = get_logger(worker_id=worker_id)

    async def run_round(self, give_up: asyncio.Event | None = None) -> int:
        """Claim up to `batch_size` due webhooks and deliver them concurrently; how many."""
        try:
            claimed = await self.conn.run(
                lambda c: claim(
                    c, worker_id=self.worker_id, limit=self.batch_size, lease_s=self.lease_s
                ),
                give_up=give_up,
            )
        except LostConnection:
            return 0  # stopping while Postgres is away: nothing was claimed
        async with asyncio.TaskGroup() as group:
            for delivery in claimed:
                group.create_task(self.deliver(delivery, give_up))
        return len(claimed)

    async def run_until_idle(self, give_up: asyncio.Event | None = None) -> int:
        """Rounds until none is full: every webhook due now delivered or rescheduled (drain)."""
        total = 0
        while (claimed := await self.run_round(give_up)) == self.batch_size:
            total += claimed
        return total + claimed

    async def deliver(
        self, delivery: Delivery, give_up: asyncio.Event | None = None
    ) -> WebhookOutcome:
        """POST one claimed webhook and record what came of it."""
        answer = await self._send(delivery)
        outcome = decide(delivery, answer, max_attempts=self.max_attempts, retry=self.retry)
        if outcome.error is not None:
            error = self.scrub(outcome.error)[:MAX_ERROR_CHARS]
            outcome = dataclasses.replace(outcome, error=error)
        try:
            ours = await self.conn.run(
                lambda c: record(c, worker_id=self.worker_id, outcome=outcome), give_up=give_up
            )
        except LostConnection:
            # the row stays delivering; when its lease runs out it is POSTed again
            self.log.error("webhook_result_not_written", **self._fields(delivery, answer))
            return outcome
        self._log_outcome(delivery, answer, outcome, ours=ours)
        return outcome

    async def _send(self, delivery: Delivery) -> Answer:
        if self.secret is None and not self.warned_unsigned:
            # said once, and only to a worker that really sends one (most use no webhooks)
            self.warned_unsigned = True
            self.log.warning("webhooks_unsigned", hint="set webhook_secret to sign webhooks")
        try:
            return await post(self.session, build_request(delivery, self.secret), self.timeout_s)
        except Exception as exc:  # a bug (ours or aiohttp's): one row must not stop the worker
            # the type only: exception texts and tracebacks may hold the URL and its query
            kind = type(exc).__name__
            self.log.error("webhook_internal_error", batch_id=delivery.batch_id, error_type=kind)
            return Answer(None, f"internal error in linkworker ({kind})")

    def _log_outcome(
        self, delivery: Delivery, answer: Answer, outcome: WebhookOutcome, *, ours: bool
    ) -> None:
        fields = self._fields(delivery, answer)
        if not ours:
            self.log.warning("webhook_lease_lost", **fields)
        elif outcome.state == "delivered":
            self.log.info("webhook_delivered", **fields)
        elif outcome.state == "waiting":
            self.log.warning("webhook_retry_scheduled", retry_in_s=outcome.retry_in_s, **fields)
        else:
            self.log.error("webhook_failed", **fields)

    def _fields(self, delivery: Delivery, answer: Answer) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "batch_id": delivery.batch_id,
            "attempt": delivery.attempt,
            "status": answer.status,
            "endpoint": origin(delivery.url),
        }
        if answer.problem is not None:
            fields["problem"] = answer.problem
        return fields


async def deliver_webhooks(
    conn: PgConnection,
    session: aiohttp.ClientSession,
    *,
    worker_id: str,
    secret: str | None,
    stop: asyncio.Event,
    wake: asyncio.Event | None = None,
    poll_interval_s: float = 2.0,
    lease_s: float = 30.0,
    timeout_s: float = 10.0,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:
    """Deliver batch webhooks until `stop`: a round on every `wake` (a batch finished) or poll.

    After `stop`, the round under way finishes (its POSTs take at most `timeout_s`) and is
    recorded; cancelling this task instead leaves its rows to be POSTed again after `lease_s`.
    """
    deliverer = WebhookDeliverer(
        conn,
        session,
        worker_id=worker_id,
        secret=secret,
        lease_s=lease_s,
        timeout_s=timeout_s,
        retry=retry,
        max_attempts=max_attempts,
        batch_size=batch_size,
    )
    while not stop.is_set():
        if wake is not None:
            wake.clear()  # before the claim: a batch finishing while it runs must not be lost
        claimed = await deliverer.run_round(give_up=stop)
        if claimed < batch_size:  # a full round: more may be due at once
            await _pause(stop, wake, poll_interval_s)


async def _pause(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    """Wait `seconds`, or less if `stop` or `wake` is set meanwhile."""
    waiters = [asyncio.create_task(event.wait()) for event in (stop, wake) if event is not None]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
