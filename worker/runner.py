"""The worker: lanes fed from the queue, a write-back loop, LISTEN, and upkeep, supervised.

    stop event ──▶ every loop ends; in-flight calls get `shutdown_grace_s` (a second signal
                   cuts it short), unstarted claims go back to pending at once, every known
                   outcome is written, then `run` returns.

All background loops run in one TaskGroup: if one dies, the worker stops loudly instead of
running half-alive. In drain mode the worker sets its own stop event once no job of its lanes
is pending or running (retries included).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import asyncpg

from worker import __version__, db, http, webhooks
from worker.budget import lane_limits
from worker.connection import LostConnection, PgConnection, first_set, wait_for_event
from worker.errors import ConfigError
from worker.health import HealthServer, serve_health
from worker.jobs import Job
from worker.lanes import Claim, Lane, LaneCounts
from worker.logs import get_logger
from worker.metrics import Metrics, watch_queue
from worker.migrations import require_current_schema
from worker.outcomes import OutcomeLadder
from worker.providers import ADAPTERS
from worker.recorder import Recorder
from worker.redaction import Scrubber
from worker.retry import RetryPolicy
from worker.settings import Settings

DRAIN_CHECK_S = 0.05
DRAIN_LOOK_MAX_S = 30.0  # the longest a draining worker waits between looks at jobs due later


@dataclass(frozen=True, slots=True)
class RunSummary:
    lanes: dict[str, LaneCounts]
    elapsed_s: float
    drained: bool

    def total(self, field: str) -> int:
        return sum(int(getattr(counts, field)) for counts in self.lanes.values())

    def line(self) -> str:
        done = self.total("succeeded") + self.total("failed")
        rate = done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        verb = "drained" if self.drained else "stopped"
        return (
            f"{verb} in {self.elapsed_s:.1f} s: {self.total('succeeded')} succeeded, "
            f"{self.total('failed')} failed, {self.total('retried')} retries scheduled, "
            f"{self.total('throttled')} throttled, {self.total('unknown')} unknown outcomes "
            f"({rate:.1f} jobs/s)"
        )


BUDGET_LOCK_TIMEOUT = "2s"


async def _budget_session(conn: asyncpg.Connection) -> None:
    await conn.execute(f"SET lock_timeout = '{BUDGET_LOCK_TIMEOUT}'")


def build_lanes(settings: Settings, metrics: Metrics) -> list[Lane]:
    """One lane per configured (provider, account)."""
    scrub = Scrubber(settings.secrets())
    policy = RetryPolicy(base_s=settings.retry_base_s, cap_s=settings.retry_cap_s)
    return [
        Lane(
            provider,
            account,
            lane_settings,
            ADAPTERS[provider],
            OutcomeLadder(policy, on_unknown_outcome=lane_settings.on_unknown_outcome, scrub=scrub),
            prefetch_s=settings.prefetch_s,
            lease_s=settings.lease_s,
            claim_batch_size=settings.claim_batch_size,
            metrics=metrics.lane(provider, account),
        )
        for provider, account, lane_settings in settings.lanes()
    ]


class Runner:
    def __init__(
        self,
        settings: Settings,
        *,
        drain: bool,
        stop: asyncio.Event,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.metrics.build_info(__version__)
        self.drain = drain
        self.stop = stop
        self.hurry = asyncio.Event()  # a second signal: cut the grace period short
        self.drained = False
        dsn = settings.database_url
        # a statement stuck longer than a third of a lease is a dead link: reconnect
        timeout_s = max(5.0, settings.lease_s / 3)
        self.claims = PgConnection(dsn, "claim", command_timeout_s=timeout_s)
        self.upkeep = PgConnection(dsn, "upkeep", command_timeout_s=timeout_s)
        self.listen = PgConnection(dsn, "listen")
        self.webhooks = PgConnection(dsn, "webhooks")
        self.snapshots = PgConnection(dsn, "metrics")  # never holds up the heartbeat
        # a lane row locked by someone else (an operator's open transaction) must not hold up
        # every lane's sends: the take fails after BUDGET_LOCK_TIMEOUT and is tried again
        self.fleet = PgConnection(
            dsn, "budget", on_connect=_budget_session, command_timeout_s=timeout_s
        )
        self.batch_done = asyncio.Event()  # NOTIFY linkworker_batch_done: a webhook may be due
        self.recorder = Recorder(
            PgConnection(dsn, "write", command_timeout_s=timeout_s),
            worker_id=settings.worker_id,
            batch_size=settings.write_batch_size,
            flush_interval_s=settings.flush_interval_s,
            metrics=self.metrics,
        )
        self.lanes = build_lanes(settings, self.metrics)
        self.by_name = {lane.name: lane for lane in self.lanes}
        self.shared = settings.rate_limit_scope == "fleet"
        if self.shared:
            for lane in self.lanes:
                lane.share_with_fleet(self.fleet, stop)
        self.log = get_logger(worker_id=settings.worker_id)

    async def run(self) -> RunSummary:
        """Work until the stop event (or, in drain mode, until nothing is left)."""
        if not self.lanes:
            raise ConfigError("no provider is configured: add a [providers.<name>] section")
        started = time.monotonic()
        health = await self._serve_health()
        try:
            await self.upkeep.run(self._check_database, give_up=self.stop)
            if self.shared:
                await self.upkeep.run(self._configure_lanes, give_up=self.stop)
                await self.upkeep.run(self._refresh_shares, give_up=self.stop)
            self.log.info(
                "worker_started",
                lanes=list(self.by_name),
                drain=self.drain,
                rate_limit_scope=self.settings.rate_limit_scope,
            )
            session = http.create_session(sum(lane.settings.max_in_flight for lane in self.lanes))
            # webhooks get their own connections: a slow receiver never holds a provider's
            webhook_session = http.create_session(webhooks.DEFAULT_BATCH_SIZE)
            async with session, webhook_session:
                await self._supervise(session, webhook_session)
        finally:
            for lane in self.lanes:
                await lane.budget.close()
            connections = (
                *(self.claims, self.upkeep, self.listen, self.webhooks, self.snapshots),
                self.fleet,
            )
            for conn in (*connections, self.recorder.conn):
                await conn.close()
            if health is not None:
                await health.cleanup()
        summary = RunSummary(
            {lane.name: lane.counts for lane in self.lanes},
            time.monotonic() - started,
            self.drained,
        )
        self.log.info("worker_stopped", summary=summary.line())
        return summary

    async def _serve_health(self) -> HealthServer | None:
        """/metrics, /healthz and /readyz on `metrics_port`, up before Postgres is reached."""
        port = self.settings.metrics_port
        if not port:
            return None
        server = await serve_health(port, self.settings.metrics_host, self.metrics, self.readiness)
        self.log.info("health_listening", host=self.settings.metrics_host, port=server.port)
        return server

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready: Postgres reachable, LISTEN alive, not stopping. From state held, no query."""
        database = self.claims.healthy and self.upkeep.healthy
        checks = {
            "database": "ok" if database else "unreachable",
            "listen": "ok" if self.listen.healthy else "down",
            "draining": "yes" if self.stop.is_set() else "no",
        }
        return database and self.listen.healthy and not self.stop.is_set(), checks

    async def _check_database(self, conn: asyncpg.Connection) -> None:
        await require_current_schema(conn)
        configured = {lane.provider for lane in self.lanes}
        missing = sorted(await db.pending_providers(conn) - configured)
        if missing:
            name = missing[0]
            raise ConfigError(
                f"jobs are waiting for provider {name!r} but providers.{name} is not configured: "
                f"add a [providers.{name}] section with its credentials "
                f"(or LINKWORKER_PROVIDERS__{name.upper()}__... variables)"
            )

    def _webhook_options(self) -> dict[str, Any]:
        settings = self.settings
        secret = settings.webhook_secret
        return {
            "worker_id": settings.worker_id,
            "secret": secret.get_secret_value() if secret else None,
            "timeout_s": settings.webhook_timeout_s,
            "lease_s": max(30.0, 3 * settings.webhook_timeout_s),
            "retry": RetryPolicy(
                base_s=settings.webhook_retry_base_s, cap_s=settings.webhook_retry_cap_s
            ),
            "max_attempts": settings.webhook_max_attempts,
        }

    async def _supervise(
        self, session: aiohttp.ClientSession, webhook_session: aiohttp.ClientSession
    ) -> None:
        stop = self.stop
        async with asyncio.TaskGroup() as group:
            background = [
                group.create_task(self.recorder.run(stop)),
                group.create_task(self._listen()),
                group.create_task(self._upkeep()),
                group.create_task(watch_queue(self.metrics, self.snapshots, stop)),
            ]
            feeders = [
                group.create_task(
                    lane.feed(self._claimer(lane), stop, self.settings.poll_interval_s)
                )
                for lane in self.lanes
            ]
            dispatchers = [
                group.create_task(lane.dispatch(session, self.recorder.add, stop))
                for lane in self.lanes
            ]
            if self.drain:
                background.append(group.create_task(self._watch_drain()))
            if self.shared:
                background.append(group.create_task(self._stay_in_fleet()))
            # not in `background`: it ends its round on stop (cancelling a POST would send it
            # again after the lease), and the group waits for it
            group.create_task(
                webhooks.deliver_webhooks(
                    self.webhooks,
                    webhook_session,
                    stop=stop,
                    wake=self.batch_done,
                    **self._webhook_options(),
                )
            )
            try:
                await stop.wait()
            finally:  # also when a background task died: hand back and write what is known
                stop.set()
                await self._shut_down(feeders, dispatchers, background)
            if self.drained:  # the last batch just finished: its webhook goes out before exit
                deliverer = webhooks.WebhookDeliverer(
                    self.webhooks, webhook_session, **self._webhook_options()
                )
                await deliverer.run_until_idle(give_up=self.hurry)

    async def _shut_down(
        self,
        feeders: list[asyncio.Task[None]],
        dispatchers: list[asyncio.Task[None]],
        background: list[asyncio.Task[None]],
    ) -> None:
        self.log.info("worker_stopping", in_flight=sum(len(lane.in_flight) for lane in self.lanes))
        for task in dispatchers:
            task.cancel()
        for lane in self.lanes:
            lane.wake.set()  # feeders leave their waits now
        await asyncio.gather(*feeders, *dispatchers, return_exceptions=True)
        grace = 0.0 if self.hurry.is_set() else self.settings.shutdown_grace_s
        await asyncio.gather(*(lane.finish(grace, self.hurry) for lane in self.lanes))
        # the loops may be retrying against a Postgres that is away, holding their connections:
        # stop them first (a write cut short keeps its batch), then hand back and flush
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._hand_back()
        if self.shared:
            await self._leave_fleet()
        try:
            await self.recorder.flush(give_up=self.hurry)
        except LostConnection:
            self.log.error("results_not_written", jobs=len(self.recorder.held_job_ids()))

    async def _hand_back(self) -> None:
        job_ids = [job.id for lane in self.lanes for job in lane.take_buffer()]
        if not job_ids:
            return
        try:
            released = await self.upkeep.run(
                lambda c: db.release(c, worker_id=self.settings.worker_id, job_ids=job_ids),
                give_up=self.hurry,
            )
            self.log.info("jobs_handed_back", jobs=released)
        except LostConnection:
            self.log.error("jobs_not_handed_back", jobs=len(job_ids))

    def _claimer(self, lane: Lane) -> Claim:
        settings = self.settings
        cursor = db.BatchCursor()  # the lane's round of its batches

        async def claim(limit: int) -> list[Job]:
            if (
                not self.recorder.room.is_set()
            ):  # write-back lags: claim no more until it catches up
                await first_set(self.recorder.room, self.stop)
                if self.stop.is_set():
                    return []
            try:
                return await self.claims.run(
                    lambda c: db.claim(
                        c,
                        provider=lane.provider,
                        account=lane.account,
                        limit=limit,
                        worker_id=settings.worker_id,
                        lease_s=settings.lease_s,
                        cursor=cursor,
                    ),
                    give_up=self.stop,
                )
            except LostConnection:
                # stopping while Postgres is away. A claim that committed but whose answer was
                # lost leaves its rows to the rescuer after their lease (counted as an attempt)
                return []

        return claim

    async def _listen(self) -> None:
        """LISTEN for new jobs; after every (re)connect, wake all lanes (NOTIFYs may be lost)."""

        def on_notify(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            named = [self.by_name.get(name) for name in str(payload).split(",")]
            lanes = [lane for lane in named if lane is not None]
            for lane in lanes if len(lanes) == len(named) else self.lanes:
                lane.wake.set()

        def on_batch_done(*_: object) -> None:
            self.batch_done.set()

        def on_lane_paused(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            lane = self.by_name.get(str(payload))
            if lane is not None:
                lane.budget.paused_elsewhere()

        async def listen(conn: asyncpg.Connection) -> None:
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def on_terminate(_conn: object) -> None:
                if not lost.done():
                    lost.set_result(None)

            conn.add_termination_listener(on_terminate)
            await conn.add_listener(db.NOTIFY_CHANNEL, on_notify)
            await conn.add_listener(webhooks.BATCH_DONE_CHANNEL, on_batch_done)
            await conn.add_listener(db.LANES_CHANNEL, on_lane_paused)
            self.batch_done.set()  # batches may have finished while we were not listening
            self.log.info("listening", channel=db.NOTIFY_CHANNEL)
            for lane in self.lanes:
                lane.wake.set()
            await lost
            raise ConnectionError("the LISTEN connection was closed")

        await self.listen.run(listen)

    async def _configure_lanes(self, conn: asyncpg.Connection) -> None:
        """Write this worker's lane limits to `linkworker_lanes`, which every worker obeys."""
        for lane in self.lanes:
            limits = lane_limits(lane.settings)
            changed, before = await db.configure_lane(
                conn,
                provider=lane.provider,
                account=lane.account,
                limits=limits,
                worker_id=self.settings.worker_id,
            )
            if changed and before is not None:
                self.log.warning(
                    "lane_limits_changed",
                    lane=lane.name,
                    before={k: v for k, v in before.items() if k != "configured_by"},
                    after=asdict(limits),
                    previously_by=before.get("configured_by"),
                )

    def _fleet_ttl_s(self) -> float:
        return 3 * self.settings.fleet_refresh_s

    async def _refresh_shares(self, conn: asyncpg.Connection) -> None:
        """Say we are alive in our lanes; take our part of each one's in-flight cap."""
        shares = await db.lane_shares(
            conn,
            worker_id=self.settings.worker_id,
            lanes=[(lane.provider, lane.account) for lane in self.lanes],
            ttl_s=self._fleet_ttl_s(),
        )
        settle_s = 1.5 * self.settings.fleet_refresh_s
        for lane in self.lanes:
            share = shares.get((lane.provider, lane.account))
            serving = lane.slots.limit > 0
            limit = share.in_flight(settle_s, serving=serving) if share is not None else 0
            workers = share.workers if share is not None else 1
            changed = limit != lane.slots.limit
            lane.set_share(workers, limit)  # also the fleet size, which moves on its own
            if not changed:
                continue
            self.log.info("lane_share_changed", lane=lane.name, in_flight=limit, workers=workers)
            if limit == 0 and lane.buffer:  # others serve the lane now: hand our jobs back
                job_ids = [job.id for job in lane.take_buffer()]
                released = await db.release(
                    conn, worker_id=self.settings.worker_id, job_ids=job_ids
                )
                self.log.info("jobs_handed_back", lane=lane.name, jobs=released)
            lane.wake.set()

    async def _stay_in_fleet(self) -> None:
        while not self.stop.is_set():
            await wait_for_event(self.stop, self.settings.fleet_refresh_s)
            if not self.stop.is_set():
                await self.upkeep.run(self._refresh_shares)

    async def _leave_fleet(self) -> None:
        worker_id = self.settings.worker_id
        with contextlib.suppress(LostConnection):  # if not, our rows age out (3 x refresh)
            await self.upkeep.run(
                lambda c: db.leave_lanes(c, worker_id=worker_id), give_up=self.hurry
            )

    async def _upkeep(self) -> None:
        """Heartbeat our leases, rescue expired ones, fail jobs of unconfigured accounts."""
        interval = self.settings.lease_s / 3
        while not self.stop.is_set():
            await self.upkeep.run(self._upkeep_once)
            await wait_for_event(self.stop, interval)

    async def _upkeep_once(self, conn: asyncpg.Connection) -> None:
        held = [job_id for lane in self.lanes for job_id in lane.held_job_ids()]
        held += self.recorder.held_job_ids()
        worker_id, lease_s = self.settings.worker_id, self.settings.lease_s
        if held:
            kept = await db.extend_leases(conn, worker_id=worker_id, job_ids=held, lease_s=lease_s)
            self._drop_lost(set(held) - kept)
        rescued = await db.rescue_expired(conn)
        self.metrics.leases_rescued(rescued)
        if rescued:
            self.log.warning("leases_rescued", jobs=rescued)
        if self.settings.fail_unconfigured_accounts:
            providers = sorted({lane.provider for lane in self.lanes})
            failed = await db.fail_unconfigured(conn, providers=providers, lanes=list(self.by_name))
            if failed:
                self.log.warning("unconfigured_account_jobs_failed", jobs=failed)

    def _drop_lost(self, lost: set[int]) -> None:
        """Leases that ran out (Postgres away too long, a stalled loop): another worker may be
        sending those jobs now, so unsent ones leave the buffers; results of the others are
        fenced out at write-back. (Jobs written back while the heartbeat ran are in `lost` too,
        harmlessly: they are in no buffer.)"""
        dropped = sum(lane.drop(lost) for lane in self.lanes)
        if dropped:
            self.log.warning("leases_lost", unsent_jobs_dropped=dropped)

    async def _watch_drain(self) -> None:
        """Set the stop event once no job of our lanes is pending or running anywhere. Jobs due
        later (retries, scheduled runs) are waited for, looking again from poll pace up to every
        DRAIN_LOOK_MAX_S (the count reads every pending row): a producer may make them due
        sooner, which the lanes see at once by NOTIFY, or cancel them."""
        told_waiting = 0  # the number of jobs due later last logged
        look_s = self.settings.poll_interval_s  # while only jobs due later are left
        while not self.stop.is_set():
            await wait_for_event(self.stop, DRAIN_CHECK_S)
            if not all(lane.idle for lane in self.lanes) or not self.recorder.empty:
                told_waiting, look_s = 0, self.settings.poll_interval_s
                continue
            left = await self.upkeep.run(lambda c: db.backlog(c, lanes=list(self.by_name)))
            if left.empty:
                self.drained = True
                self.stop.set()
            elif left.ready:
                for lane in self.lanes:
                    lane.wake.set()
            elif left.running:
                # held by another worker, or a claim whose answer was lost with the connection:
                # wait at poll pace, rescuing leases that run out meanwhile
                await wait_for_event(self.stop, self.settings.poll_interval_s)
                await self.upkeep.run(self._upkeep_once)
            elif left.next_run_in_s is not None:
                if left.waiting != told_waiting:
                    told_waiting = left.waiting
                    self.log.info(
                        "drain_waiting",
                        jobs_due_later=left.waiting,
                        next_due_in_s=round(max(0.0, left.next_run_in_s), 1),
                    )
                await wait_for_event(self.stop, min(max(0.0, left.next_run_in_s), look_s))
                look_s = max(look_s, min(2 * look_s, DRAIN_LOOK_MAX_S))
                continue
            told_waiting, look_s = 0, self.settings.poll_interval_s
