"""What the queue holds and what a batch produced: `linkworker status` and `linkworker export`.

`status` counts jobs per lane (provider/account) and state, how long the longest-waiting
claimable job has been due, and each batch's progress (from the `link_batches` view). It prints
tables, one JSON document (`--json`), or keeps refreshing (`--watch`: a live display on a
terminal, one plain line per refresh otherwise, JSON lines with `--json`) until Ctrl-C or,
with `--batch`, until the batch is done.

`export` streams one batch's results as CSV or JSON Lines through a server-side cursor, so a
batch of a million rows is never held in memory, here or in Postgres' answer.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table

from worker import db
from worker.arguments import CONFIG_HELP, non_negative
from worker.connection import wait_for_event
from worker.enqueue import connected
from worker.errors import LinkworkerError

STATES = ("pending", "running", "succeeded", "failed", "cancelled")
RECENT_BATCHES = 10
WATCH_INTERVAL_S = 2.0
EXPORT_PREFETCH = 2000
EXPORT_COLUMNS = (
    "id",
    "provider",
    "account",
    "idempotency_key",
    "state",
    "url",
    "external_id",
    "last_error",
    "attempts",
    "created_at",
    "finished_at",
)


class ReportError(LinkworkerError):
    """The report cannot be made (e.g. no such batch); the message says why."""


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """One lane's jobs by state; `oldest_pending_s`: how long the longest-waiting claimable job
    has been due (None when nothing is claimable)."""

    provider: str
    account: str
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    oldest_pending_s: float | None

    @property
    def name(self) -> str:
        return f"{self.provider}/{self.account}"


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """One row of the `link_batches` view."""

    batch_id: str
    total: int
    pending: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    first_created_at: datetime
    last_finished_at: datetime | None
    done: bool

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled


@dataclass(frozen=True, slots=True)
class Status:
    at: datetime
    batch_id: str | None
    lanes: list[LaneStatus]
    batches: list[BatchStatus]
    limits: list[db.LaneState]

    def total(self, state: str) -> int:
        return sum(int(getattr(lane, state)) for lane in self.lanes)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "batch_id": self.batch_id,
            "lanes": [{"lane": lane.name, **asdict(lane)} for lane in self.lanes],
            "batches": [_json_batch(batch) for batch in self.batches],
            "limits": [
                {"lane": f"{limit.provider}/{limit.account}", **asdict(limit)}
                for limit in self.limits
            ],
        }


def _json_batch(batch: BatchStatus) -> dict[str, Any]:
    document = asdict(batch)
    document["first_created_at"] = batch.first_created_at.isoformat()
    last = batch.last_finished_at
    document["last_finished_at"] = last.isoformat() if last else None
    return document


LANE_STATUS = """
-- per lane: jobs in each state, and how long the longest-waiting claimable job has been due
-- (retries scheduled for later are not late); all jobs, or one batch's
SELECT provider, account,
       count(*) FILTER (WHERE state = 'pending') AS pending,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       extract(epoch FROM now() - min(run_at) FILTER (WHERE state = 'pending'
                                                       AND run_at <= now()))::float8
           AS oldest_pending_s
  FROM link_jobs
 WHERE $1::text IS NULL OR batch_id = $1
 GROUP BY provider, account
 ORDER BY provider, account
"""

BATCH_STATUS = """
-- the batch asked for, else unfinished batches first, then the newest
SELECT batch_id, total, pending, running, succeeded, failed, cancelled, first_created_at,
       last_finished_at, done
  FROM link_batches
 WHERE $1::text IS NULL OR batch_id = $1
 ORDER BY done, first_created_at DESC, batch_id
 LIMIT $2
"""


async def fetch_status(conn: asyncpg.Connection, batch_id: str | None) -> Status:
    """Counts per lane and per batch (one batch's, or every lane's and the recent batches)."""
    lanes = [LaneStatus(**dict(row)) for row in await conn.fetch(LANE_STATUS, batch_id)]
    rows = await conn.fetch(BATCH_STATUS, batch_id, RECENT_BATCHES)
    batches = [BatchStatus(**dict(row)) for row in rows]
    if batch_id is not None and not batches:
        raise ReportError(f"no jobs in batch {batch_id!r}")
    limits = await db.lane_states(conn)
    return Status(datetime.now(UTC), batch_id, lanes, batches, limits)


# --- showing a status -------------------------------------------------------------------------


def age(seconds: float | None) -> str:
    """'-', '4.2 s', '3 min', '2.5 h'."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def lane_table(status: Status) -> Table:
    """Jobs per lane and state."""
    table = Table(title="lanes" if status.batch_id is None else f"lanes, batch {status.batch_id}")
    table.add_column("lane")
    for state in STATES:
        table.add_column(state, justify="right")
    table.add_column("oldest pending", justify="right")
    for lane in status.lanes:
        counts = [str(getattr(lane, state)) for state in STATES]
        table.add_row(lane.name, *counts, age(lane.oldest_pending_s))
    if not status.lanes:
        table.add_row("(no jobs)", *[""] * (len(STATES) + 1))
    return table


def bar(fraction: float, width: int = 20) -> str:
    """A progress bar as text (rich markup), so it shows in a log as well as on a terminal."""
    filled = round(max(0.0, min(fraction, 1.0)) * width)
    return f"[green]{'█' * filled}[/green][bright_black]{'░' * (width - filled)}[/bright_black]"


def batch_table(batches: Sequence[BatchStatus]) -> Table:
    """A progress bar per batch: finished (succeeded, failed or cancelled) of total."""
    table = Table(title="batches")
    table.add_column("batch")
    table.add_column("progress", no_wrap=True)
    for heading in ("finished", "succeeded", "failed", "cancelled", "left", "state"):
        table.add_column(heading, justify="right")
    for batch in batches:
        percent = 100 * batch.finished / batch.total if batch.total else 100.0
        table.add_row(
            batch.batch_id,
            bar(batch.finished / batch.total if batch.total else 1.0),
            f"{batch.finished}/{batch.total} ({percent:.0f}%)",
            str(batch.succeeded),
            str(batch.failed),
            str(batch.cancelled),
            str(batch.pending + batch.running),
            "done" if batch.done else "running",
        )
    return table


def limits_table(limits: Sequence[db.LaneState]) -> Table:
    """Each lane's limits as every worker obeys them (`linkworker_lanes`), and who serves it."""
    table = Table(title="lane limits (for all workers together)")
    table.add_column("lane")
    for heading in ("rate/s", "now/s", "burst", "in flight", "adaptive", "workers", "429s"):
        table.add_column(heading, justify="right")
    table.add_column("paused", justify="right")
    for lane in limits:
        table.add_row(
            f"{lane.provider}/{lane.account}",
            f"{lane.rate_per_s:g}",
            f"{lane.current_per_s:.4g}",
            str(lane.burst),
            str(lane.max_in_flight),
            "yes" if lane.adaptive else "no",
            str(lane.workers),
            str(lane.throttles),
            age(lane.paused_for_s) if lane.paused_for_s > 0 else "-",
        )
    return table


def status_view(status: Status) -> RenderableType:
    parts: list[RenderableType] = [lane_table(status)]
    if status.limits:
        parts.append(limits_table(status.limits))
    if status.batches:
        parts.append(batch_table(status.batches))
    return Group(*parts)


def status_line(status: Status) -> str:
    """One plain line per refresh, for logs and pipes."""
    counts = ", ".join(f"{status.total(state)} {state}" for state in STATES)
    finished = sum(status.total(state) for state in ("succeeded", "failed", "cancelled"))
    total = finished + status.total("pending") + status.total("running")
    percent = 100 * finished / total if total else 100.0
    scope = f"batch {status.batch_id}" if status.batch_id else "all jobs"
    when = status.at.strftime("%H:%M:%S")
    return f"{when} {scope}: {finished}/{total} finished ({percent:.1f}%): {counts}"


def make_console() -> Console:
    """stdout; when it is no terminal, wide enough that tables do not wrap in a log."""
    console = Console()
    return console if console.is_terminal else Console(width=140)


Show = Callable[[Status], None]


async def watch(conn: asyncpg.Connection, batch_id: str | None, show: Show, every_s: float) -> int:
    """Show the status every `every_s` until Ctrl-C (SIGINT or SIGTERM: the refresh under way
    ends first) or the batch asked for is done."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        while not stop.is_set():
            status = await fetch_status(conn, batch_id)
            show(status)
            if batch_id is not None and all(batch.done for batch in status.batches):
                return 0
            await wait_for_event(stop, every_s)
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def print_json(status: Status) -> None:
    print(json.dumps(status.as_json()), flush=True)


def print_line(status: Status) -> None:
    print(status_line(status), flush=True)


async def run_status(database_url: str, args: argparse.Namespace) -> int:
    """`linkworker status`: once, or refreshed (a live display only on a terminal)."""
    console = make_console()
    async with connected(database_url) as conn:
        if not args.watch:
            status = await fetch_status(conn, args.batch)
            if args.json:
                print_json(status)
            else:
                console.print(status_view(status))
            return 0
        if args.json or not console.is_terminal:
            show = print_json if args.json else print_line
            return await watch(conn, args.batch, show, args.interval)
        with Live(console=console, auto_refresh=False) as live:
            return await watch(
                conn,
                args.batch,
                lambda status: live.update(status_view(status), refresh=True),
                args.interval,
            )


# --- export -----------------------------------------------------------------------------------

BATCH_EXISTS = """
-- does the batch exist at all (an export of none of its rows is then not a typo)
SELECT EXISTS (SELECT 1 FROM link_jobs WHERE batch_id = $1)
"""

EXPORT = """
-- one batch's results, oldest first, optionally only some states; read through a cursor
SELECT id, provider, account, idempotency_key, state, url, external_id, last_error, attempts,
       created_at, finished_at
  FROM link_jobs
 WHERE batch_id = $1 AND ($2::text[] IS NULL OR state = ANY($2::text[]))
 ORDER BY id
"""


async def require_batch(conn: asyncpg.Connection, batch_id: str) -> None:
    """ReportError unless some job has this batch_id (an export of nothing is likely a typo)."""
    if not await conn.fetchval(BATCH_EXISTS, batch_id):
        raise ReportError(f"no jobs in batch {batch_id!r}")


async def export_rows(
    conn: asyncpg.Connection, batch_id: str, states: Sequence[str] | None
) -> AsyncIterator[tuple[object, ...]]:
    """The batch's rows (EXPORT_COLUMNS), fetched EXPORT_PREFETCH at a time."""
    async with conn.transaction():  # a server-side cursor lives in a transaction
        async for row in conn.cursor(
            EXPORT, batch_id, list(states) if states else None, prefetch=EXPORT_PREFETCH
        ):
            yield tuple(row.values())


def _text(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


class CsvWriter:
    """A header, then one line per job; empty cells for NULLs."""

    def __init__(self, out: TextIO) -> None:
        self.writer = csv.writer(out, lineterminator="\n")
        self.writer.writerow(EXPORT_COLUMNS)

    def write(self, row: tuple[object, ...]) -> None:
        self.writer.writerow(_text(value) for value in row)


class JsonLinesWriter:
    """One JSON object per job, keyed by column name; null for NULLs."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, row: tuple[object, ...]) -> None:
        document = {name: _text(value) for name, value in zip(EXPORT_COLUMNS, row, strict=True)}
        self.out.write(json.dumps(document, ensure_ascii=False) + "\n")


@contextmanager
def output(path: str | None) -> Iterator[TextIO]:
    """stdout, or FILE written as FILE.part and renamed only when the export is complete."""
    if path is None:
        yield sys.stdout
        return
    target = Path(path)
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("w", encoding="utf-8", newline="") as handle:
            yield handle
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


async def run_export(database_url: str, args: argparse.Namespace) -> int:
    """`linkworker export`: the batch's rows to stdout or a file, then a count on stderr."""
    states = sorted(set(args.state)) if args.state else None
    exported = 0
    async with connected(database_url) as conn:
        await require_batch(conn, args.batch)
        with output(args.output) as out:
            writer = CsvWriter(out) if args.format == "csv" else JsonLinesWriter(out)
            async for row in export_rows(conn, args.batch, states):
                writer.write(row)
                exported += 1
    where = f" to {args.output}" if args.output else ""
    print(f"exported {exported} jobs of batch {args.batch}{where}", file=sys.stderr)
    return 0


# --- the commands -----------------------------------------------------------------------------


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`linkworker status` and `linkworker export`."""

    status = commands.add_parser(
        "status",
        help="jobs per lane and state, and batch progress",
        description="Jobs per lane (provider/account) and state, how long the longest-waiting "
        "claimable job has been due, and a progress bar per batch (unfinished first).",
    )
    status.add_argument("--batch", metavar="ID", help="only this batch's jobs")
    status.add_argument("--json", action="store_true", help="one JSON document (per refresh)")
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh until Ctrl-C (with --batch: until the batch is done)",
    )
    status.add_argument(
        "--interval",
        type=non_negative,
        default=WATCH_INTERVAL_S,
        metavar="SECONDS",
        help=f"between refreshes with --watch (default {WATCH_INTERVAL_S:g})",
    )
    status.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    status.set_defaults(handler=_status_command)

    export = commands.add_parser(
        "export",
        help="stream a batch's results as CSV or JSON Lines",
        description=f"Columns: {', '.join(EXPORT_COLUMNS)}; streamed, so any batch size fits.",
    )
    export.add_argument("--batch", metavar="ID", required=True, help="the batch to export")
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv", help="default csv")
    export.add_argument(
        "--state",
        choices=STATES,
        nargs="+",
        metavar="STATE",
        help=f"only jobs in these states ({', '.join(STATES)})",
    )
    export.add_argument("-o", "--output", metavar="FILE", help="write FILE instead of stdout")
    export.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    export.set_defaults(handler=_export_command)


def _status_command(args: argparse.Namespace) -> int:
    from worker.cli import load_for_command

    settings = load_for_command(args)
    try:
        return asyncio.run(run_status(settings.database_url, args))
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how --watch ends
    except ReportError as exc:
        print(f"linkworker: {exc}", file=sys.stderr)
        return 2


def _export_command(args: argparse.Namespace) -> int:
    from worker.cli import load_for_command

    settings = load_for_command(args)
    try:
        return asyncio.run(run_export(settings.database_url, args))
    except ReportError as exc:
        print(f"linkworker: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`export ... | head`); keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
