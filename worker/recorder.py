"""Batched, fenced write-back of job outcomes.

Lanes hand outcomes to `add` (no I/O, no await); one loop writes them in batches of up to
`batch_size` rows per statement, waiting at most `flush_interval_s` to fill a batch. If Postgres
is away, or merely slower than the providers, the outcomes wait here and `room` is cleared once
BACKLOG_BATCHES batches are waiting: the lanes stop claiming until it is set again, so memory
stays bounded by the lanes' buffers plus this backlog. The leases of the jobs waiting here are
kept alive by the heartbeat.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

import asyncpg

from worker import db
from worker.connection import PgConnection, wait_for_event
from worker.db import Outcome
from worker.logs import get_logger
from worker.metrics import Metrics

BACKLOG_BATCHES = 2


class Recorder:
    def __init__(
        self,
        conn: PgConnection,
        *,
        worker_id: str,
        batch_size: int,
        flush_interval_s: float,
        metrics: Metrics,
    ) -> None:
        self.conn = conn
        self.worker_id = worker_id
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.pending: list[Outcome] = []
        self.writing: list[Outcome] = []
        self.has_items = asyncio.Event()
        self.room = asyncio.Event()  # set while the backlog is small enough to claim more
        self.room.set()
        self.high_water = BACKLOG_BATCHES * batch_size
        self.full = asyncio.Event()
        self.written = 0
        self.fenced = 0
        self.metrics = metrics
        self.log = get_logger()

    @property
    def empty(self) -> bool:
        return not self.pending and not self.writing

    def add(self, outcome: Outcome) -> None:
        self.pending.append(outcome)
        self.has_items.set()
        if len(self.pending) >= self.batch_size:
            self.full.set()
            if len(self.pending) >= self.high_water:
                self.room.clear()

    def held_job_ids(self) -> list[int]:
        """Jobs finished here but not yet written: their leases must be kept alive."""
        return [o.job_id for o in self.pending] + [o.job_id for o in self.writing]

    async def run(self, stop: asyncio.Event) -> None:
        """Write outcomes as they come, until `stop`; the final flush is `flush()`."""
        while not stop.is_set():
            await wait_for_event(self.has_items, self.flush_interval_s * 10)
            if not self.pending:
                continue
            if len(self.pending) < self.batch_size:
                await wait_for_event(self.full, self.flush_interval_s)
            await self.flush(give_up=None)

    async def flush(self, *, give_up: asyncio.Event | None) -> None:
        """Write everything pending now."""
        while self.pending:
            self.writing = self.pending[: self.batch_size]
            self.pending = self.pending[self.batch_size :]
            if not self.pending:
                self.has_items.clear()
            self.full.clear()
            batch = self.writing
            try:
                stored = await self.conn.run(partial(self._write, batch), give_up=give_up)
            except BaseException:  # cancelled or given up: the batch waits for the next flush
                self.pending[:0] = batch
                self.writing = []
                raise
            self.writing = []
            self._count(len(batch), stored)
            if len(self.pending) < self.high_water:
                self.room.set()

    async def _write(self, batch: list[Outcome], conn: asyncpg.Connection) -> int:
        started = time.perf_counter()
        stored = await db.record(conn, worker_id=self.worker_id, outcomes=batch)
        self.metrics.write_back(len(batch), len(batch) - stored, time.perf_counter() - started)
        return stored

    def _count(self, sent: int, stored: int) -> None:
        self.written += stored
        if stored < sent:
            # another worker rescued these jobs after our lease ran out; its attempt wins
            self.fenced += sent - stored
            self.log.warning("write_back_fenced", rows=sent - stored)
