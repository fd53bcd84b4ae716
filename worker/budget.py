"""A lane's rate budget and in-flight cap, for this process alone or for the whole fleet.

`rate_limit_scope = "fleet"` (the default): the budget lives in Postgres, in the lane's row of
`linkworker_lanes`, as a GCRA (the time of its next free slot). The lane takes a block of send
slots, about `BLOCK_S` of its rate, with one call of `linkworker_take_slots`, and sends each job
at its slot's time, so the database is touched once per block whatever the number of workers.
Slots are handed out in sequence to the whole fleet, spaced as the process limiter would space
them, so every one-second window stays under the limit however many workers share the lane.
A slot this worker could not use within a quarter of `rate_headroom` seconds of its time (half,
when it serves the lane alone) lapses: sending it later could bunch with the next ones; the rest
of the headroom is for the workers' clocks and the jitter on the way. A dead worker's slots
lapse within its last block.
A block is no bigger than what the lane can send at once: its buffered jobs, its free
in-flight slots.
The next block is taken while half of the current one is left, so a round trip to Postgres
never leaves a gap.

A 429 pauses the lane for every worker: the pause is written to the lane's row (no slot is
granted before its end) and NOTIFYed, and each worker drops the slots it held.

While its connection to Postgres is lost, a worker goes on sending the jobs it holds, paced on
its own at the lane's rate divided by the workers it last saw on the lane (all of them are cut
off in an outage), and goes back to shared slots at the first grant. A slow grant is waited
for: pacing alone while the others are not would add this worker's part to theirs.

`rate_limit_scope = "process"`: an aiolimiter bucket in this process, no round trip; each
replica must then be given its share of the provider's limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from aiolimiter import AsyncLimiter

from worker import db
from worker.connection import LostConnection, PgConnection
from worker.logs import get_logger
from worker.metrics import LaneMetrics
from worker.settings import LaneSettings

BLOCK_S = 0.1  # seconds of a lane's rate one block of slots covers, at most
FALLBACK_AFTER_S = 1.0  # how often a worker waiting for a grant checks its connection
SQL_ERROR_BACKOFF_S = 1.0  # after a grant failed with an SQL error (not a lost connection)
SLACK = 0.5  # requests of slack in the bucket on top of `burst`: a late send is made up


def burst_credit(settings: LaneSettings) -> float:
    """Slots a lane may send at once after an idle spell: its burst and the slack, never more
    than half its rate (so that credit + one second's drain stays under the limit)."""
    return min(settings.burst - 1 + SLACK, settings.rate_per_s / 2)


def bucket_capacity(settings: LaneSettings) -> float:
    return burst_credit(settings) + 1


def drain_rate(settings: LaneSettings) -> float:
    """Requests per second the lane's bucket lets out, so no one-second window exceeds the limit
    (the same formula as linkworker_lane_spacing in sql/0004)."""
    return (settings.rate_per_s - burst_credit(settings)) / (1 + settings.rate_headroom)


def lane_limits(settings: LaneSettings) -> db.LaneLimits:
    """The limits a worker writes to its lane's row from its configuration."""
    return db.LaneLimits(
        rate_per_s=settings.rate_per_s,
        burst=settings.burst,
        max_in_flight=settings.max_in_flight,
        rate_headroom=settings.rate_headroom,
        adaptive=settings.adaptive,
    )


class Budget(Protocol):
    async def acquire(self) -> None:
        """Wait for this lane's next send slot. Raises LostConnection if told to give up."""

    def throttled(self, pause_s: float) -> None:
        """The provider said 429: no send for `pause_s`."""

    def paused_elsewhere(self) -> None:
        """Another worker saw a 429 on this lane."""

    def set_fleet_size(self, workers: int) -> None:
        """How many workers serve the lane, as last seen."""

    async def close(self) -> None:
        """Stop what runs in the background."""


class ProcessBudget:
    """The lane's limit for this process alone: a leaky bucket (aiolimiter)."""

    def __init__(self, settings: LaneSettings) -> None:
        capacity = bucket_capacity(settings)
        self.limiter = AsyncLimiter(capacity, capacity / drain_rate(settings))

    async def acquire(self) -> None:
        await self.limiter.acquire()

    def throttled(self, pause_s: float) -> None:
        pass  # the lane holds its own pause

    def paused_elsewhere(self) -> None:
        pass

    def set_fleet_size(self, workers: int) -> None:
        pass

    async def close(self) -> None:
        pass


@dataclass(slots=True)
class Block:
    """Slots granted at once: the `used`-th is due at `start + used * spacing` (monotonic), or
    at `granted_at` if that is later (burst credit: slots dated before the grant)."""

    start: float
    spacing: float
    count: int
    granted_at: float
    local: bool = False  # paced here while Postgres is away
    used: int = 0
    lapsed: int = 0

    def due(self) -> float:
        return max(self.start + self.used * self.spacing, self.granted_at)

    def lapse_before(self, moment: float) -> int:
        """Skip the slots due before `moment`; returns how many lapsed."""
        if self.spacing <= 0 or moment <= self.granted_at:
            return 0
        first_kept = max(self.used, math.ceil((moment - self.start) / self.spacing))
        first_kept = min(first_kept, self.count)
        lapsed, self.used = first_kept - self.used, first_kept
        self.lapsed += lapsed
        return lapsed

    @property
    def left(self) -> int:
        return self.count - self.used


class FleetBudget:
    """The lane's limit for every worker sharing the database (see the module's docstring)."""

    def __init__(
        self,
        provider: str,
        account: str,
        settings: LaneSettings,
        conn: PgConnection,
        *,
        need: Callable[[], int],
        give_up: asyncio.Event,
        metrics: LaneMetrics | None = None,
    ) -> None:
        self.provider, self.account = provider, account
        self.conn = conn
        self.need = need  # jobs the lane could send right after this one (buffered, slots free)
        self.metrics = metrics
        self.give_up = give_up
        self.settings = settings
        self.tolerance_s = self._tolerance(1)
        self.rate = settings.rate_per_s  # the lane's rate as Postgres last said (adaptive: lower)
        self.blocks: deque[Block] = deque()
        self.block_cap = self._full_block()  # shrinks while slots lapse, grows while used
        self.clock = ServerClock()
        self.fleet_size = 1  # workers serving the lane, as last seen (for pacing alone)
        self.local_since: float | None = None  # pacing alone since (Postgres away)
        self.local_next = 0.0
        self.lapsed = 0
        self.taken = 0
        self._lock = asyncio.Lock()
        self._taking: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()
        self._own_pause_at = -math.inf
        self.pauses = 0  # 429s seen (here or elsewhere): slots taken before one are void
        self.log = get_logger(provider=provider, account=account)

    def _full_block(self) -> int:
        return max(1, math.ceil(self.rate * BLOCK_S))

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                block = self._current(now)
                if block is None:
                    await self._take_now()
                    continue
                due = block.due()
                block.used += 1
                if due > now:
                    pauses = self.pauses
                    try:
                        await asyncio.sleep(due - now)
                    except asyncio.CancelledError:
                        block.used -= 1  # not spent: a later acquire may use it
                        raise
                    if self.pauses != pauses:  # a 429 meanwhile: this slot is void
                        continue
                    if time.monotonic() - due > self.tolerance_s:  # woke too late to use it
                        block.lapsed += 1
                        self._lapsed(1)
                        continue
                self._take_ahead()
                return

    def _current(self, now: float) -> Block | None:
        """The block holding the next slot still usable, dropping lapsed ones."""
        while self.blocks:
            block = self.blocks[0]
            lapsed = block.lapse_before(now - self.tolerance_s)
            if lapsed:
                self._lapsed(lapsed)
            if block.left:
                return block
            self.blocks.popleft()
            if not block.lapsed:  # all of it was used: the next may be bigger
                self.block_cap = min(self._full_block(), self.block_cap * 2)
        return None

    def _lapsed(self, slots: int) -> None:
        self.lapsed += slots
        self.block_cap = max(1, self.block_cap // 2)
        if self.metrics is not None:
            self.metrics.send_slots(lapsed=slots)

    def _block_for(self, jobs: int) -> int:
        return max(1, min(self.block_cap, jobs, self._full_block()))

    async def _take_now(self) -> None:
        """No slot left for this job: take a block for it and the jobs ready after it. While
        the budget's connection is lost (not merely slow), pace this worker on its own."""
        taking = self._taking
        if taking is None:
            taking = self._start_take(self._block_for(self.need() + 1))
        while self.local_since is None:
            # not cancelled with this acquire: a block in flight must not be lost
            done, _ = await asyncio.wait({taking}, timeout=FALLBACK_AFTER_S)
            if done:
                if not self.blocks and self.give_up.is_set():
                    raise LostConnection(f"no send slot for {self.provider}/{self.account}")
                return
            if not self.conn.healthy:
                break
        if self.give_up.is_set():
            raise LostConnection(f"Postgres away: no send slot for {self.provider}/{self.account}")
        self._pace_alone()

    def _pace_alone(self) -> None:
        """A block of slots paced here, at this worker's share of the lane's rate (the rate
        over the number of workers last seen), while Postgres cannot grant any."""
        now = time.monotonic()
        if self.local_since is None:
            self.local_since = now
            self.log.warning(
                "send_slots_paced_locally",
                reason="the connection to postgres is lost",
                rate_per_s=round(self.rate / self.fleet_size, 2),
                workers=self.fleet_size,
            )
        count = self._block_for(self.need() + 1)
        shaped = max(self.rate - (self.settings.burst - 0.5), 0.01) / (
            1 + self.settings.rate_headroom
        )
        spacing = self.fleet_size / shaped
        start = max(self.local_next, now)
        self.blocks.append(Block(start, spacing, count, granted_at=now, local=True))
        self.local_next = start + count * spacing

    def set_fleet_size(self, workers: int) -> None:
        self.fleet_size = max(1, workers)
        self.tolerance_s = self._tolerance(self.fleet_size)

    def _tolerance(self, workers: int) -> float:
        """How late a slot may still be used. Alone on a lane: half the headroom (the other
        half for jitter on the way). With others: a quarter, the rest also covering how their
        clocks map onto each other (measured: a fleet of 3 at 200/s went one over with half)."""
        share = 2 if workers == 1 else 4
        return max(self.settings.rate_headroom / share, 0.001)

    def _take_ahead(self) -> None:
        """Take the next block while half of this one is left, for the ready jobs that have no
        slot yet (none taken for jobs that are not there: those slots would go unused)."""
        if self._taking is not None:
            return
        left = sum(block.left for block in self.blocks)
        uncovered = self.need() - left
        if uncovered > 0 and left <= self.block_cap // 2:
            self._start_take(self._block_for(uncovered))

    def _start_take(self, wanted: int) -> asyncio.Task[None]:
        self._taking = asyncio.create_task(self._take(wanted))
        self._taking.add_done_callback(self._report)
        return self._taking

    def _report(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("send_slots_not_taken", error=repr(task.exception()))

    async def _take(self, wanted: int) -> None:
        async def take(conn: asyncpg.Connection) -> tuple[db.Slots, float]:
            slots = await db.take_slots(
                conn, provider=self.provider, account=self.account, wanted=wanted
            )
            return slots, time.monotonic()

        pauses = self.pauses
        try:
            slots, received = await self.conn.run(take, give_up=self.give_up)
        except LostConnection:
            return  # stopping while Postgres is away: nothing more is sent
        except asyncpg.PostgresError as exc:  # e.g. the lane's row is gone: not in a hot loop
            self.log.error("send_slots_not_taken", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(SQL_ERROR_BACKOFF_S)
            return
        finally:
            self._taking = None  # here, not in a done callback: a waiter must not see it done
        self.clock.sample(slots.now_at, received)
        if self.metrics is not None:
            self.metrics.send_slots(granted=slots.granted)
            if slots.rate_per_s != self.rate:
                self.metrics.set_rate_now(slots.rate_per_s)
        self.rate = slots.rate_per_s
        if self.local_since is not None:
            away_s = round(time.monotonic() - self.local_since, 1)
            self.local_since = None
            self.blocks = deque(block for block in self.blocks if not block.local)
            self.log.info("send_slots_shared_again", paced_locally_s=away_s)
        start = self.clock.local(slots.first_at)
        if slots.granted and self.pauses == pauses:  # a block asked for before a 429 is void
            self.blocks.append(Block(start, slots.spacing_s, slots.granted, granted_at=received))
            self.taken += slots.granted
        self.log.debug(
            "send_slots_taken",
            wanted=wanted,
            granted=slots.granted,
            first_in_s=round(start - received, 4),
            spacing_s=slots.spacing_s,
            lapsed_so_far=self.lapsed,
        )

    def throttled(self, pause_s: float) -> None:
        self.pauses += 1
        self.blocks.clear()  # slots inside the pause are void
        self._own_pause_at = time.monotonic()
        self._spawn(self._tell_fleet(pause_s))

    def paused_elsewhere(self) -> None:
        if time.monotonic() - self._own_pause_at > 1.0:  # not the echo of our own 429
            self.pauses += 1
            self.blocks.clear()

    async def _tell_fleet(self, pause_s: float) -> None:
        try:
            rate = await self.conn.run(
                lambda c: db.lane_throttled(
                    c, provider=self.provider, account=self.account, pause_s=pause_s
                ),
                give_up=self.give_up,
            )
        except (LostConnection, asyncpg.PostgresError) as exc:
            self.log.error("lane_pause_not_shared", error=f"{type(exc).__name__}: {exc}")
            return
        if rate is not None and rate < self.rate * 0.99:
            self.log.warning("lane_rate_lowered", rate_per_s=round(rate, 2))

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[object] = asyncio.create_task(work)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self.taken:
            self.log.info("send_slots_used", taken=self.taken, lapsed=self.lapsed)
        tasks = [*self._background, *([self._taking] if self._taking else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ServerClock:
    """Maps the server's clock onto this process's monotonic clock, erring late, never early.

    A grant carries the server's time of the grant, which happened before its answer was read
    here: `server time - time read` is at most the true offset between the clocks, and closest
    to it for the answer that came back quickest. The largest such value of the grants of the
    last SAMPLE_AGE_S is kept, so a slot is not sent before its time and a slow answer (this
    loop or the server busy) does not shift a block of slots. Samples age out, so that a clock
    that drifts or steps (a failover to another server) is followed.
    """

    SAMPLE_AGE_S = 10.0

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()  # (read at, offset)
        self.offset = 0.0  # server time minus monotonic time

    def sample(self, server_at: float, received: float) -> None:
        samples = self.samples
        samples.append((received, server_at - received))
        while samples[0][0] < received - self.SAMPLE_AGE_S:
            samples.popleft()
        self.offset = max(offset for _, offset in samples)

    def local(self, server_at: float) -> float:
        return server_at - self.offset


class InFlightGate:
    """A semaphore whose limit can change: the lane's part of its fleet-wide in-flight cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted as we were cancelled: pass it on
            elif waiter in self._waiters:  # (a wake-up may have dropped it already)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)
