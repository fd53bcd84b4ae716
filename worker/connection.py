"""A dedicated Postgres connection that comes back by itself after Postgres goes away.

The worker holds a few long-lived connections, one per role (claims, write-backs, upkeep,
LISTEN), instead of a pool: a pool resets a connection on every release, which doubles the
round trips of small statements. `run(op)` runs `op` on the connection; if the connection is
lost it reconnects with capped exponential backoff and runs `op` again, so `op` must be safe to
repeat: every statement in worker.db is (claims re-lease, write-backs are fenced).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from worker.logs import get_logger

T = TypeVar("T")

# After five runs Postgres may switch a prepared statement to a generic plan; for the unnest
# write-back that plan rereads the whole batch for every running row (measured: 1.1 s instead of
# 14 ms per 500 rows with 5,000 running). Every statement here is planned with its values.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan"}

# What a lost or unreachable server looks like to asyncpg.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    ConnectionError,
    OSError,
    TimeoutError,
)


class LostConnection(Exception):
    """Raised by `run` when asked to give up (the stop event) while Postgres is away."""


class PgConnection:
    def __init__(
        self,
        dsn: str,
        role: str,
        *,
        on_connect: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
        max_backoff_s: float = 5.0,
        command_timeout_s: float = 60.0,
    ) -> None:
        self.dsn = dsn
        self.role = role
        self.on_connect = on_connect
        self.max_backoff_s = max_backoff_s
        self.command_timeout_s = command_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._log = get_logger(connection=role)
        self.healthy = False

    async def run(
        self,
        op: Callable[[asyncpg.Connection], Awaitable[T]],
        *,
        give_up: asyncio.Event | None = None,
    ) -> T:
        """Run `op`, reconnecting (and running it again) until it completes or `give_up` is set."""
        async with self._lock:
            backoff = 0.1
            while True:
                try:
                    conn = await self._connected()
                    return await op(conn)
                except asyncpg.TransactionRollbackError as exc:
                    # a deadlock or serialization failure: the statement is safe to run again
                    self._log.warning("postgres_statement_retried", error=type(exc).__name__)
                except CONNECTION_ERRORS as exc:
                    await self._lost(exc)
                if give_up is not None and give_up.is_set():
                    raise LostConnection(f"postgres unreachable ({self.role})")
                await _wait(give_up, backoff)
                backoff = min(self.max_backoff_s, backoff * 2)

    async def _connected(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            # command_timeout: a silently dead network raises (and reconnects) instead of hanging
            self._conn = await asyncpg.connect(
                self.dsn,
                timeout=10,
                command_timeout=self.command_timeout_s,
                server_settings=SERVER_SETTINGS,
            )
            if self.on_connect is not None:
                await self.on_connect(self._conn)
            if not self.healthy:
                self._log.info("postgres_connected")
            self.healthy = True
        return self._conn

    async def _lost(self, exc: BaseException) -> None:
        if self.healthy:
            self._log.warning("postgres_connection_lost", error=type(exc).__name__)
        self.healthy = False
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            try:
                await asyncio.wait_for(self._conn.close(), timeout=5)
            except Exception:  # closing politely failed; the socket goes anyway
                self._conn.terminate()
        self._conn = None


async def _wait(event: asyncio.Event | None, seconds: float) -> None:
    """Sleep `seconds`, or less if `event` is set meanwhile."""
    if event is None:
        await asyncio.sleep(seconds)
    else:
        await wait_for_event(event, seconds)


async def wait_for_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


async def first_set(event: asyncio.Event, other: asyncio.Event) -> None:
    """Wait until `event` or `other` is set."""
    if event.is_set() or other.is_set():
        return
    waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(other.wait())}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this wait is itself cancelled (a timeout around it)
        for waiter in waiters:
            waiter.cancel()
