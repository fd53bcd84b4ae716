"""`linkworker demo`: the whole product in one command, on nothing but this package.

An embedded Postgres, the provider simulator (strict per-account limits, some 5xx), a mixed
batch over three providers and two accounts with a few bad payloads, the worker in drain mode,
then a summary per lane and a few links.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from pathlib import Path

import asyncpg

from worker.embedded import embedded_postgres
from worker.lanes import LaneCounts
from worker.logs import configure_logging
from worker.migrations import migrate
from worker.runner import Runner
from worker.samples import mixed_jobs
from worker.settings import load_settings
from worker.simulator import SimulatorConfig, start_simulator

SAMPLE_QUERY = "SELECT id, provider, account, state, url, last_error FROM link_jobs LIMIT 20"
DEMO_RATE = 100  # requests/s per account, at the simulator and in the worker
LANES = [
    ("billpocket", "default"),
    ("cheqpay", "default"),
    ("cheqpay", "acme"),
    ("kushki", "default"),
]


def run_demo(args: argparse.Namespace) -> int:
    configure_logging("error", "auto")
    keep = Path(args.keep) if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    print("starting an embedded PostgreSQL ...", flush=True)
    with embedded_postgres(keep) as database_url:
        asyncio.run(_demo(database_url, jobs=args.jobs, latency_ms=args.latency_ms))
        if keep is not None:
            print(
                f"\nthe database is kept in {keep}. To look at it, start it again with\n"
                f'  python -c "from pgserver import postgres_server as p; '
                f"print(p.get_server('{keep}', cleanup_mode=None).get_uri())\"\n"
                f'and run against the printed URL:\n  psql URL -c "{SAMPLE_QUERY}"'
            )
    return 0


async def _demo(database_url: str, *, jobs: int, latency_ms: float) -> None:
    simulator = await start_simulator(
        SimulatorConfig(rate_per_s=DEMO_RATE, error_rate=0.02, latency_ms=latency_ms, seed=1)
    )
    try:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate(conn)
            await _enqueue(conn, jobs)
            settings = load_settings(None, **_demo_settings(database_url, simulator.url))
            print(
                f"simulator at {simulator.url}, limit {DEMO_RATE} requests/s per account; "
                f"running the worker on {jobs} jobs ...",
                flush=True,
            )
            summary = await Runner(settings, drain=True, stop=asyncio.Event()).run()
            _print_summary(summary.lanes, summary.elapsed_s)
            print("\n" + summary.line())
            await _print_samples(conn)
        finally:
            await conn.close()
    finally:
        await simulator.close()


async def _enqueue(conn: asyncpg.Connection, count: int) -> None:
    rows = [(p, a, payload) for p, a, payload, _ in mixed_jobs(count, LANES, bad_fraction=0.01)]
    await conn.copy_records_to_table(
        "link_jobs", records=rows, columns=["provider", "account", "payload"]
    )
    print(f"enqueued {count} jobs over {len(LANES)} lanes (about 1% with bad payloads)")


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


def _print_summary(lanes: dict[str, LaneCounts], elapsed_s: float) -> None:
    header = f"{'lane':<20}{'ok':>7}{'failed':>8}{'retries':>9}{'429s':>6}{'rate/s':>9}"
    print("\n" + header + f"{'p50 ms':>9}{'p95 ms':>9}")
    for name, counts in lanes.items():
        done = counts.succeeded + counts.failed
        p50, p95 = _percentiles(counts.latencies_ms)
        print(
            f"{name:<20}{counts.succeeded:>7}{counts.failed:>8}{counts.retried:>9}"
            f"{counts.throttled:>6}{done / elapsed_s:>9.1f}{p50:>9.1f}{p95:>9.1f}"
        )


def _percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    cuts = statistics.quantiles(values, n=100)
    return cuts[49], cuts[94]


async def _print_samples(conn: asyncpg.Connection) -> None:
    print("\nsample links:")
    for row in await conn.fetch(
        "SELECT DISTINCT ON (provider) provider, url FROM link_jobs "
        "WHERE state = 'succeeded' ORDER BY provider, id"
    ):
        print(f"  {row['provider']:<11} {row['url']}")
    failed = await conn.fetchrow(
        "SELECT id, last_error FROM link_jobs WHERE state = 'failed' ORDER BY id LIMIT 1"
    )
    if failed is not None:
        print(f"\na failed job (#{failed['id']}): {failed['last_error']}")
