"""Batch webhooks against a real Postgres and a local receiver: once, signed, retried, fenced."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog.testing
from aiohttp import web

from worker.connection import PgConnection
from worker.retry import RetryPolicy
from worker.webhooks import (
    Answer,
    Delivery,
    WebhookDeliverer,
    WebhookOutcome,
    build_request,
    claim,
    decide,
    deliver_webhooks,
    event_body,
    origin,
    public_url,
    record,
    sign,
)

SECRET = "whsec-test-0123456789"
TOKEN = "tok-in-the-query-8c1f"
NO_WAIT = RetryPolicy(base_s=0.0, cap_s=0.0)  # a failed webhook is due again at once
TINY = RetryPolicy(base_s=0.05, cap_s=0.1)
WAIT_S = 10.0


# --- a local receiver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.body)
        return decoded

    def signed_with(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("X-Linkworker-Signature", ""), expected)


@dataclass
class Receiver:
    """Records every POST and answers with `statuses` in turn, then 200."""

    base_url: str = ""
    statuses: list[int] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)

    def url(self, path: str = "/hook", query: str = "") -> str:
        return self.base_url + path + (f"?{query}" if query else "")

    async def handle(self, request: web.Request) -> web.Response:
        received = Received(
            request.path,
            request.query_string,
            dict(request.headers),
            await request.read(),
            asyncio.get_running_loop().time(),
        )
        self.requests.append(received)
        self.arrived.put_nowait(received)
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    async def next(self) -> Received:
        """The next request, waiting for it (bounded)."""
        return await asyncio.wait_for(self.arrived.get(), WAIT_S)

    async def take(self, count: int) -> list[Received]:
        return [await self.next() for _ in range(count)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/{path:.*}", found.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    found.base_url = f"http://127.0.0.1:{port}"
    yield found
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[PgConnection]:
    connection = PgConnection(database_url, "webhooks")
    yield connection
    await connection.close()


# --- rows -----------------------------------------------------------------------------------


async def add_jobs(conn: asyncpg.Connection, batch_id: str, states: Sequence[str]) -> None:
    await conn.execute(
        """
        INSERT INTO link_jobs (provider, payload, batch_id, state, finished_at)
        SELECT 'cheqpay', '{}', $1, s,
               CASE WHEN s IN ('succeeded', 'failed', 'cancelled') THEN now() END
          FROM unnest($2::text[]) AS s
        """,
        batch_id,
        list(states),
    )


async def finish(conn: asyncpg.Connection, batch_id: str, state: str = "succeeded") -> None:
    await conn.execute(
        "UPDATE link_jobs SET state = $2, finished_at = now() "
        "WHERE batch_id = $1 AND state IN ('pending', 'running')",
        batch_id,
        state,
    )


async def register(conn: asyncpg.Connection, batch_id: str, url: str) -> None:
    await conn.execute(
        "INSERT INTO link_batch_webhooks (batch_id, url) VALUES ($1, $2)", batch_id, url
    )


async def webhook(conn: asyncpg.Connection, batch_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM link_batch_webhooks WHERE batch_id = $1", batch_id)
    assert row is not None
    return row


def deliverer(
    pg: PgConnection,
    session: aiohttp.ClientSession,
    *,
    worker_id: str = "w1",
    secret: str | None = SECRET,
    retry: RetryPolicy = NO_WAIT,
    max_attempts: int = 12,
) -> WebhookDeliverer:
    return WebhookDeliverer(
        pg, session, worker_id=worker_id, secret=secret, retry=retry, max_attempts=max_attempts
    )


class Loop:
    """`deliver_webhooks` running in the background; `stop()` waits for its round to end."""

    def __init__(self, pg: PgConnection, session: aiohttp.ClientSession, **options: Any) -> None:
        self.stop_event = asyncio.Event()
        self.wake = asyncio.Event()
        options = {"worker_id": "w1", "secret": SECRET, "poll_interval_s": 0.01, **options}
        self.task = asyncio.create_task(
            deliver_webhooks(pg, session, stop=self.stop_event, wake=self.wake, **options)
        )

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, WAIT_S)


# --- the pure parts -------------------------------------------------------------------------


def test_sign_is_hmac_sha256_hex() -> None:
    # RFC 4231, test case 2
    assert sign("Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_request_headers_and_body() -> None:
    event = {"total": 3, "event": "batch.finished", "batch_id": "lote 7/ñ:x", "succeeded": 2}
    first = build_request(Delivery("lote 7/ñ:x", "https://h/x", 1, event), SECRET)
    again = build_request(
        Delivery("lote 7/ñ:x", "https://h/x", 2, dict(reversed(event.items()))), SECRET
    )
    assert first.body == again.body == event_body(event)
    assert list(json.loads(first.body)) == [
        "event", "batch_id", "total", "succeeded", "failed", "cancelled", "finished_at"
    ]  # fmt: skip
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["X-Linkworker-Event"] == "batch.finished"
    assert first.headers["X-Linkworker-Delivery"] == "lote%207%2F%C3%B1%3Ax:1"
    assert again.headers["X-Linkworker-Delivery"].endswith(":2")
    assert first.headers["X-Linkworker-Signature"] == sign(SECRET, first.body)
    unsigned = build_request(Delivery("b", "https://h/x", 1, event), None)
    assert "X-Linkworker-Signature" not in unsigned.headers


def test_urls_lose_user_info_query_and_fragment() -> None:
    url = f"https://user:pw@Hooks.Example:8443/in/abc?token={TOKEN}#frag"
    assert public_url(url) == "https://hooks.example:8443/in/abc"
    assert origin(url) == "https://hooks.example:8443"
    assert public_url(f"http://h:99999/x?token={TOKEN}") == "(an invalid URL)"


def test_the_ladder() -> None:
    delivery = Delivery("b1", f"https://h/hook?token={TOKEN}", 2, {})
    options: dict[str, Any] = {
        "max_attempts": 3,
        "retry": RetryPolicy(base_s=4),
        "draw": lambda: 0.5,
    }
    assert decide(delivery, Answer(204), **options) == WebhookOutcome("b1", 2, "delivered", 204)
    again = decide(delivery, Answer(500), **options)
    assert (again.state, again.status, again.retry_in_s) == ("waiting", 500, 6.0)
    assert again.error == "attempt 2: POST https://h/hook answered HTTP 500"
    last = dataclasses.replace(delivery, attempt=3)
    failed = decide(last, Answer(None, "no answer within 10 s"), **options)
    assert (failed.state, failed.status) == ("failed", None)
    assert failed.error == (
        "gave up after 3 attempts; last error: attempt 3: POST https://h/hook failed: "
        "no answer within 10 s"
    )
    assert decide(delivery, Answer(302), **options).state == "waiting"  # redirects not followed


async def test_lease_must_outlast_the_post(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="lease_s"):
        WebhookDeliverer(
            PgConnection("postgresql://unused", "webhooks"),
            session,
            worker_id="w1",
            secret=None,
            lease_s=10,
            timeout_s=10,
        )


# --- the table ------------------------------------------------------------------------------


async def test_the_table_refuses_bad_urls_and_blank_batches(conn: asyncpg.Connection) -> None:
    for batch_id, url in [
        ("b1", "ftp://h/x"),
        ("b2", "https:///x"),
        ("b3", "h/x"),
        ("", "http://h"),
    ]:
        with pytest.raises(asyncpg.CheckViolationError):
            await register(conn, batch_id, url)
    await register(conn, "ok", "https://h.example/x?token=1")
    row = await webhook(conn, "ok")
    assert (row["state"], row["attempts"], row["payload"]) == ("waiting", 0, None)


# --- delivery -------------------------------------------------------------------------------


async def test_nothing_is_sent_until_the_batch_is_done_then_once(
    conn: asyncpg.Connection,
    pg: PgConnection,
    session: aiohttp.ClientSession,
    receiver: Receiver,
) -> None:
    await register(conn, "early", receiver.url())  # registered before its jobs: waits for them
    await add_jobs(conn, "b1", ["succeeded", "failed", "cancelled", "running", "pending"])
    await register(conn, "b1", receiver.url())
    sender = deliverer(pg, session)
    assert await sender.run_round() == 0
    await finish(conn, "b1", "succeeded")
    assert await sender.run_round() == 1
    assert await sender.run_round() == 0
    [request] = receiver.requests
    assert request.signed_with(SECRET)
    assert request.headers["X-Linkworker-Delivery"] == "b1:1"
    assert request.headers["X-Linkworker-Event"] == "batch.finished"
    rows = await conn.fetch(
        "SELECT state, count(*) AS jobs FROM link_jobs WHERE batch_id = 'b1' GROUP BY state"
    )
    counts: dict[str, int] = {row["state"]: row["jobs"] for row in rows}
    last = await conn.fetchval("SELECT max(finished_at) FROM link_jobs WHERE batch_id = 'b1'")
    event = request.event
    assert event == {
        "event": "batch.finished",
        "batch_id": "b1",
        "total": sum(counts.values()),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "cancelled": counts["cancelled"],
        "finished_at": event["finished_at"],
    }
    assert (event["total"], event["succeeded"]) == (5, 3)
    assert datetime.fromisoformat(event["finished_at"]) == last
    row = await webhook(conn, "b1")
    assert (row["state"], row["attempts"], row["response_status"]) == ("delivered", 1, 200)
    assert (row["locked_by"], row["locked_until"], row["last_error"]) == (None, None, None)
    assert row["delivered_at"] is not None
    assert json.loads(row["payload"]) == event
    assert (await webhook(conn, "early"))["state"] == "waiting"


async def test_the_batch_done_notify_wakes_the_loop(
    conn: asyncpg.Connection,
    database_url: str,
    pg: PgConnection,
    session: aiohttp.ClientSession,
    receiver: Receiver,
) -> None:
    await add_jobs(conn, "b1", ["succeeded", "running"])
    await register(conn, "b1", receiver.url())
    loop = Loop(pg, session, poll_interval_s=60)  # only the NOTIFY can bring the round in time
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("linkworker_batch_done", lambda *_: loop.wake.set())
    try:
        await finish(conn, "b1")
        request = await receiver.next()
    finally:
        await loop.stop()
        await listener.close()
    assert request.event["batch_id"] == "b1"
    assert len(receiver.requests) == 1
    assert (await webhook(conn, "b1"))["state"] == "delivered"


async def test_two_deliverers_racing_on_one_finished_batch_send_once(
    conn: asyncpg.Connection,
    database_url: str,
    session: aiohttp.ClientSession,
    receiver: Receiver,
) -> None:
    await add_jobs(conn, "b1", ["succeeded"])
    await register(conn, "b1", receiver.url())
    pgs = [PgConnection(database_url, "webhooks"), PgConnection(database_url, "webhooks")]
    try:
        senders = [deliverer(p, session, worker_id=f"w{i}") for i, p in enumerate(pgs)]
        await asyncio.gather(*(p.run(lambda c: c.execute("SELECT 1")) for p in pgs))  # connected
        claimed = await asyncio.gather(*(sender.run_round() for sender in senders))
    finally:
        for p in pgs:
            await p.close()
    assert sorted(claimed) == [0, 1]
    assert len(receiver.requests) == 1


async def test_two_workers_finishing_last_jobs_together_two_loops_one_post_each(
    conn: asyncpg.Connection,
    database_url: str,
    session: aiohttp.ClientSession,
    receiver: Receiver,
) -> None:
    batches = [f"b{i}" for i in range(25)]
    for batch_id in batches:
        await add_jobs(conn, batch_id, ["running", "running"])
        await register(conn, batch_id, receiver.url())
    pgs = [PgConnection(database_url, "webhooks") for _ in range(2)]
    loops = [Loop(p, session, worker_id=f"w{i}") for i, p in enumerate(pgs)]
    writers = [await asyncpg.connect(database_url) for _ in range(2)]

    async def finish_one_each(writer: asyncpg.Connection) -> None:
        for batch_id in batches:  # each writer finishes one of the batch's two last jobs
            await writer.execute(
                "UPDATE link_jobs SET state = 'succeeded', finished_at = now() WHERE id = ("
                "  SELECT id FROM link_jobs WHERE batch_id = $1 AND state = 'running'"
                "   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)",
                batch_id,
            )
            for loop in loops:
                loop.wake.set()

    try:
        await asyncio.gather(*(finish_one_each(writer) for writer in writers))
        await receiver.take(len(batches))
    finally:
        for loop in loops:
            await loop.stop()  # its round is recorded before it returns
        for writer in writers:
            await writer.close()
        for p in pgs:
            await p.close()
    assert await conn.fetchval("SELECT count(*) FROM link_jobs WHERE state <> 'succeeded'") == 0
    assert sorted(r.event["batch_id"] for r in receiver.requests) == sorted(batches)
    rows = await conn.fetch("SELECT state, attempts FROM link_batch_webhooks")
    assert {(row["state"], row["attempts"]) for row in rows} == {("delivered", 1)}
    assert all(r.event["succeeded"] == 2 for r in receiver.requests)


async def test_a_failing_receiver_gets_the_same_body_again_after_backoff(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    await add_jobs(conn, "b1", ["succeeded", "failed"])
    await register(conn, "b1", receiver.url())
    loop = Loop(pg, session, retry=TINY)
    try:
        requests = await receiver.take(3)
    finally:
        await loop.stop()
    assert [r.headers["X-Linkworker-Delivery"] for r in requests] == ["b1:1", "b1:2", "b1:3"]
    assert len({r.body for r in requests}) == 1
    assert all(r.signed_with(SECRET) for r in requests)
    # equal jitter: never sooner than half the backoff (0.05 s, then 0.1 s)
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(requests)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05, gaps
    row = await webhook(conn, "b1")
    assert (row["state"], row["attempts"], row["response_status"]) == ("delivered", 3, 200)
    assert row["last_error"] is None
    assert len(receiver.requests) == 3


async def test_a_retry_waits_for_its_time(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [500]
    await add_jobs(conn, "b1", ["succeeded"])
    await register(conn, "b1", receiver.url())
    sender = deliverer(pg, session, retry=RetryPolicy(base_s=3600, cap_s=3600))
    assert await sender.run_round() == 1
    row = await webhook(conn, "b1")
    assert (row["state"], row["response_status"]) == ("waiting", 500)
    wait_s = await conn.fetchval(
        "SELECT extract(epoch FROM next_attempt_at - now()) FROM link_batch_webhooks"
    )
    assert 1700 < wait_s <= 3600
    assert await sender.run_round() == 0


async def test_a_dead_workers_delivery_is_taken_over_with_its_stored_body(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    stored = {
        "event": "batch.finished",
        "batch_id": "dead",
        "total": 7,
        "succeeded": 7,
        "failed": 0,
        "cancelled": 0,
        "finished_at": "2026-01-02T03:04:05.000000Z",
    }
    for batch_id, lease_s in [("dead", -1.0), ("alive", 3600.0)]:
        await add_jobs(conn, batch_id, ["succeeded"])
        await conn.execute(
            "INSERT INTO link_batch_webhooks"
            " (batch_id, url, state, attempts, locked_by, locked_until, payload)"
            " VALUES ($1, $2, 'delivering', 1, 'gone',"
            "         now() + make_interval(secs => $3), $4::jsonb)",
            batch_id,
            receiver.url(),
            lease_s,
            json.dumps(stored),
        )
    assert await deliverer(pg, session, worker_id="w2").run_round() == 1
    [request] = receiver.requests
    assert request.event == stored  # the body of the first attempt, not counted again
    assert request.headers["X-Linkworker-Delivery"] == "dead:2"
    row = await webhook(conn, "dead")
    assert (row["state"], row["attempts"], row["locked_by"]) == ("delivered", 2, None)
    alive = await webhook(conn, "alive")
    assert (alive["state"], alive["locked_by"]) == ("delivering", "gone")


async def test_a_stale_deliverer_cannot_overwrite_the_next_attempt(
    conn: asyncpg.Connection,
) -> None:
    await add_jobs(conn, "b1", ["succeeded"])
    await register(conn, "b1", "https://h.example/x")
    [old] = await claim(conn, worker_id="old", limit=5, lease_s=0.001)
    await conn.execute("SELECT pg_sleep(0.01)")  # the lease is a database time; let it pass
    [new] = await claim(conn, worker_id="new", limit=5, lease_s=30)
    assert (old.attempt, new.attempt) == (1, 2)
    assert old.event == new.event
    stale = WebhookOutcome("b1", old.attempt, "failed", error="late")
    assert not await record(conn, worker_id="old", outcome=stale)
    assert await record(conn, worker_id="new", outcome=WebhookOutcome("b1", 2, "delivered", 204))
    assert not await record(conn, worker_id="new", outcome=WebhookOutcome("b1", 2, "failed"))
    row = await webhook(conn, "b1")
    assert (row["state"], row["response_status"], row["last_error"]) == ("delivered", 204, None)


async def test_max_attempts_fail_the_webhook_without_leaking_tokens_or_the_secret(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.statuses = [500] * 10
    await add_jobs(conn, "b1", ["succeeded"])
    await register(conn, "b1", receiver.url("/in/hook", f"token={TOKEN}"))
    with structlog.testing.capture_logs() as logs:
        sender = deliverer(pg, session, max_attempts=3)
        for _ in range(4):
            await sender.run_round()
    assert len(receiver.requests) == 3
    assert receiver.requests[0].query == f"token={TOKEN}"  # the receiver does get its token
    row = await webhook(conn, "b1")
    assert (row["state"], row["attempts"], row["response_status"]) == ("failed", 3, 500)
    assert row["last_error"] == (
        f"gave up after 3 attempts; last error: attempt 3: POST {receiver.base_url}/in/hook "
        "answered HTTP 500"
    )
    assert [entry["event"] for entry in logs if entry["event"].startswith("webhook")] == [
        "webhook_retry_scheduled", "webhook_retry_scheduled", "webhook_failed"
    ]  # fmt: skip
    assert logs[-1]["endpoint"] == receiver.base_url
    assert TOKEN not in repr(logs) and SECRET not in repr(logs)


async def test_an_unreachable_receiver_is_described_without_the_query(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook?token={TOKEN}"
    await add_jobs(conn, "b1", ["succeeded"])
    await register(conn, "b1", url)
    with structlog.testing.capture_logs() as logs:
        assert await deliverer(pg, session, max_attempts=1).run_round() == 1
    row = await webhook(conn, "b1")
    assert (row["state"], row["response_status"]) == ("failed", None)
    assert row["last_error"].startswith(
        f"gave up after 1 attempts; last error: attempt 1: POST http://127.0.0.1:{port}/hook "
        "failed: could not connect ("
    )
    assert TOKEN not in row["last_error"] and TOKEN not in repr(logs)


async def test_without_a_secret_webhooks_go_unsigned_with_one_warning(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    for batch_id in ("b1", "b2"):
        await add_jobs(conn, batch_id, ["succeeded"])
        await register(conn, batch_id, receiver.url())
    with structlog.testing.capture_logs() as logs:
        loop = Loop(pg, session, secret=None)
        try:
            requests = await receiver.take(2)
        finally:
            await loop.stop()
    assert all("X-Linkworker-Signature" not in r.headers for r in requests)
    assert [entry["event"] for entry in logs].count("webhooks_unsigned") == 1
    assert [entry["event"] for entry in logs].count("webhook_delivered") == 2


async def test_run_until_idle_delivers_everything_due(
    conn: asyncpg.Connection, pg: PgConnection, session: aiohttp.ClientSession, receiver: Receiver
) -> None:
    for batch_id in ("b1", "b2", "b3", "b4", "b5"):
        await add_jobs(conn, batch_id, ["succeeded"])
        await register(conn, batch_id, receiver.url())
    sender = WebhookDeliverer(pg, session, worker_id="w1", secret=SECRET, batch_size=2)
    assert await sender.run_until_idle() == 5
    assert len(receiver.requests) == 5
    assert await sender.run_until_idle() == 0
