"""`linkworker demo`: the whole product in one command, on nothing but this package.

    embedded Postgres ─▶ migrate ─▶ enqueue a mixed batch ─▶ worker (drain) ─▶ summary
                                    (checked, COPY; a few      │  live progress per lane,
                                     bad ones by SQL)          ▼  from the lanes' counters
                                              provider simulator (strict limits, 503s, 429s)

The good jobs go in through `enqueue_many`, the path of `linkworker enqueue` (checked, then
COPY); a few jobs with bad payloads go in through the SQL function `linkworker_enqueue`, as a
producer that skips the checks would, so the worker's own errors show. The progress display
is animated only on a terminal; elsewhere a line is printed every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker.embedded import embedded_postgres
from worker.enqueue import EnqueueResult, JobSpec, enqueue_many
from worker.lanes import Lane, LaneCounts
from worker.logs import configure_logging
from worker.migrations import migrate
from worker.reports import age, bar
from worker.runner import Runner, RunSummary
from worker.samples import bad_payload, good_payload
from worker.settings import load_settings
from worker.simulator import SimulatorConfig, start_simulator

DEMO_RATE = 100  # requests/s per account, at the simulator and in the worker
LANES = [
    ("billpocket", "default"),
    ("cheqpay", "default"),
    ("cheqpay", "acme"),
    ("kushki", "default"),
]
BAD_EVERY = 100  # one job in a hundred has a bad payload
ERROR_RATE = 0.02  # calls the simulator answers 503 (nothing created: the worker retries)
THROTTLES = 3  # 429s the simulator answers cheqpay with, to show a lane pausing
LIVE_EVERY_S = 0.25  # refresh of the display on a terminal
LINE_EVERY_S = 3.0  # a progress line elsewhere


def run_demo(args: argparse.Namespace) -> int:
    """Start everything, run the batch, print the summary; 0 when it ran to the end."""
    configure_logging("error", "auto")
    keep = Path(args.keep).resolve() if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a log: wide enough that the tables do not wrap
    say(console, "starting an embedded PostgreSQL ...")
    with embedded_postgres(keep) as database_url:
        batch_id = datetime.now(UTC).strftime("demo-%Y%m%d-%H%M%S")
        asyncio.run(_demo(console, database_url, batch_id, args.jobs, args.latency_ms))
        _print_next_steps(console, keep, batch_id)
    return 0


async def _demo(
    console: Console, database_url: str, batch_id: str, jobs: int, latency_ms: float
) -> None:
    simulator = await start_simulator(
        SimulatorConfig(rate_per_s=DEMO_RATE, error_rate=ERROR_RATE, latency_ms=latency_ms, seed=1)
    )
    try:
        simulator.state.queue_fault("cheqpay", "429", THROTTLES)
        conn = await asyncpg.connect(database_url)
        try:
            await migrate(conn)
            await _enqueue(console, conn, batch_id, jobs)
            settings = load_settings(None, **_demo_settings(database_url, simulator.url))
            say(
                console,
                f"simulator at {simulator.url}: at most {DEMO_RATE} requests/s per account, "
                f"{ERROR_RATE:.0%} of calls answered 503; running the worker ...",
            )
            runner = Runner(settings, drain=True, stop=asyncio.Event())
            summary = await _run_with_progress(console, runner, lane_totals(jobs))
            console.print(summary_table(summary, runner.lanes))
            say(console, summary.line())
            await _print_samples(console, conn, batch_id)
        finally:
            await conn.close()
    finally:
        await simulator.close()


# --- the batch --------------------------------------------------------------------------------


def _is_bad(n: int) -> bool:
    # one per hundred, on a different lane each hundred
    return n % BAD_EVERY == 13 + (n // BAD_EVERY) % len(LANES)


def good_jobs(count: int, batch_id: str) -> Iterator[JobSpec]:
    """The well-formed jobs of the batch, spread over the lanes in turn."""
    for n in range(count):
        provider, account = LANES[n % len(LANES)]
        if not _is_bad(n):
            yield JobSpec(
                provider=provider,
                account=account,
                payload=good_payload(provider, n),
                idempotency_key=f"{batch_id}-{n}",
            )


def bad_jobs(count: int, batch_id: str) -> list[tuple[str, str, str, str]]:
    """(provider, payload JSON, account, batch) of the jobs whose payload the worker refuses."""
    jobs = []
    for n in range(count):
        provider, account = LANES[n % len(LANES)]
        if _is_bad(n):
            payload, _field = bad_payload(provider, n)
            jobs.append((provider, json.dumps(payload), account, batch_id))
    return jobs


def lane_totals(count: int) -> Counter[str]:
    """How many jobs each lane ('provider/account') gets."""
    return Counter("/".join(LANES[n % len(LANES)]) for n in range(count))


ENQUEUE_UNCHECKED = """
-- a producer in another system: the SQL function, which cannot check a provider's payload
SELECT linkworker_enqueue($1, $2::jsonb, account => $3, batch_id => $4)
"""


async def _enqueue(console: Console, conn: asyncpg.Connection, batch_id: str, count: int) -> None:
    result: EnqueueResult = await enqueue_many(conn, good_jobs(count, batch_id), batch_id=batch_id)
    say(console, f"{result.line()}, checked and copied as `linkworker enqueue` does")
    bad = bad_jobs(count, batch_id)
    await conn.executemany(ENQUEUE_UNCHECKED, bad)
    say(
        console,
        f"enqueued {len(bad)} jobs with bad payloads through SQL (linkworker_enqueue), "
        "unchecked: the worker fails them, naming the field",
    )


def _demo_settings(database_url: str, sim_url: str) -> dict[str, object]:
    limits = {"base_url": sim_url, "rate_per_s": DEMO_RATE, "max_in_flight": 20}
    return {
        "database_url": database_url,
        "log_level": "error",
        "retry_base_s": 0.2,
        "poll_interval_s": 0.1,
        "providers": {
            "billpocket": {**limits, "api_key": "demo-bp-key", "user_token": "demo-bp-user"},
            "cheqpay": {
                **limits,
                "api_key": "demo-cq-key",
                "accounts": {"acme": {"api_key": "demo-cq-acme"}},
            },
            "kushki": {
                **limits,
                "private_merchant_id": "demo-ku-private",
                "public_merchant_id": "demo-ku-public",
            },
        },
    }


# --- progress ---------------------------------------------------------------------------------


def _eta(left: int, rate: float) -> str:
    if left <= 0:
        return "done"
    return age(left / rate) if rate > 0 else "-"


def progress_table(lanes: list[Lane], totals: Counter[str], elapsed_s: float) -> Table:
    """Per lane: done of total, achieved rate against the lane's limit, retries, failures, ETA."""
    table = Table(title=f"progress, {elapsed_s:.1f} s")
    table.add_column("lane")
    table.add_column("", no_wrap=True)
    for heading in ("done", "rate/s", "retries", "429s", "failed", "ETA"):
        table.add_column(heading, justify="right")
    for lane in lanes:
        counts, total = lane.counts, totals[lane.name]
        done = counts.succeeded + counts.failed
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        table.add_row(
            lane.name,
            bar(done / total if total else 1.0),
            f"{done}/{total}",
            f"{rate:.0f} of {lane.settings.rate_per_s:g}",
            str(counts.retried),
            str(counts.throttled),
            str(counts.failed),
            _eta(total - done, rate),
        )
    return table


def progress_line(lanes: list[Lane], totals: Counter[str], elapsed_s: float) -> str:
    """All lanes in one line, for a log."""
    done = sum(lane.counts.succeeded + lane.counts.failed for lane in lanes)
    total = sum(totals.values())
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    retries = sum(lane.counts.retried for lane in lanes)
    failed = sum(lane.counts.failed for lane in lanes)
    return (
        f"{elapsed_s:5.1f} s: {done}/{total} done ({100 * done / max(total, 1):.0f}%), "
        f"{rate:.0f} jobs/s, {retries} retries, {failed} failed, ETA {_eta(total - done, rate)}"
    )


async def _follow(task: asyncio.Task[RunSummary], every_s: float, show: Callable[[], None]) -> None:
    """Call `show` every `every_s` while the task runs, and once more when it ends."""
    while not task.done():
        await asyncio.wait({task}, timeout=every_s)
        show()


async def _run_with_progress(console: Console, runner: Runner, totals: Counter[str]) -> RunSummary:
    """Run the worker to the end of the queue, showing its lanes' counters as it goes."""
    started = time.monotonic()
    task = asyncio.create_task(runner.run())
    loop = asyncio.get_running_loop()
    # Ctrl-C: stop claiming and finish (the summary still prints); twice: cut the grace short
    loop.add_signal_handler(signal.SIGINT, _interrupt, runner)
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                await _follow(
                    task,
                    LIVE_EVERY_S,
                    lambda: live.update(
                        progress_table(runner.lanes, totals, time.monotonic() - started),
                        refresh=True,
                    ),
                )
        else:
            await _follow(task, LINE_EVERY_S, lambda: _print_line(console, runner, totals, started))
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _interrupt(runner: Runner) -> None:
    (runner.hurry if runner.stop.is_set() else runner.stop).set()


def _print_line(console: Console, runner: Runner, totals: Counter[str], started: float) -> None:
    say(console, progress_line(runner.lanes, totals, time.monotonic() - started))


def say(console: Console, text: str) -> None:
    """A line of prose or data: no markup read into it, no colours guessed, never wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


# --- the summary ------------------------------------------------------------------------------


def percentiles(values: Sequence[float]) -> tuple[float, float]:
    """(p50, p95) of the values; (0, 0) when there are none."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    cuts = statistics.quantiles(values, n=100)
    return cuts[49], cuts[94]


def _summary_row(name: str, counts: LaneCounts, limit: float, elapsed_s: float) -> list[str]:
    done = counts.succeeded + counts.failed
    p50, p95 = percentiles(counts.latencies_ms)
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    return [
        name,
        str(counts.succeeded),
        str(counts.failed),
        str(counts.retried),
        str(counts.throttled),
        f"{rate:.1f}",
        f"{limit:g}",
        f"{p50:.1f}",
        f"{p95:.1f}",
    ]


def summary_table(summary: RunSummary, lanes: list[Lane]) -> Table:
    """Per lane: succeeded, failed, retries, 429s, achieved rate and limit, p50/p95 latency."""
    table = Table(title="summary")
    table.add_column("lane")
    headings = ("succeeded", "failed", "retries", "429s", "rate/s", "limit/s", "p50 ms", "p95 ms")
    for heading in headings:
        table.add_column(heading, justify="right")
    limits = {lane.name: lane.settings.rate_per_s for lane in lanes}
    for name, counts in summary.lanes.items():
        table.add_row(*_summary_row(name, counts, limits[name], summary.elapsed_s))
    return table


SAMPLE_LINKS = """
-- one link per provider, to click
SELECT DISTINCT ON (provider) provider, url
  FROM link_jobs
 WHERE batch_id = $1 AND state = 'succeeded'
 ORDER BY provider, id
"""

FIRST_FAILURE = """
-- the batch's first failed job, and why it failed
SELECT id, last_error FROM link_jobs WHERE batch_id = $1 AND state = 'failed' ORDER BY id LIMIT 1
"""


async def _print_samples(console: Console, conn: asyncpg.Connection, batch_id: str) -> None:
    console.print("\nsample links:")
    for row in await conn.fetch(SAMPLE_LINKS, batch_id):
        console.print(f"  {row['provider']:<11} {row['url']}", highlight=False, soft_wrap=True)
    failed = await conn.fetchrow(FIRST_FAILURE, batch_id)
    if failed is not None:
        console.print(f"\na failed job (#{failed['id']}): {failed['last_error']}", highlight=False)


def _print_next_steps(console: Console, keep: Path | None, batch_id: str) -> None:
    query = (  # printed for a person to run, never executed here
        "SELECT id, provider, account, state, url, last_error FROM link_jobs "  # noqa: S608
        f"WHERE batch_id = '{batch_id}' ORDER BY id LIMIT 20"
    )
    say(console, f"\nthe rows, in SQL:\n  {query};\n  SELECT * FROM link_batches;")  # noqa: S608
    if keep is None:
        say(console, "(run with --keep DIR to keep the database and look at it afterwards)")
        return
    url = f"postgresql://postgres@/postgres?host={keep}"
    say(
        console,
        f"\nthe database is kept in {keep}. Start it again with\n"
        f'  python -c "from pgserver import postgres_server as p; '
        f"p.get_server('{keep}', cleanup_mode=None)\"\n"
        f"then:\n"
        f'  psql "{url}" -c "{query}"\n'
        f'  LINKWORKER_DATABASE_URL="{url}" linkworker status --batch {batch_id}\n'
        f'  LINKWORKER_DATABASE_URL="{url}" linkworker export --batch {batch_id} --state failed',
    )
