"""The `linkworker` command (also `python -m worker`).

    linkworker migrate              apply the SQL migrations (safe to repeat, and concurrently)
    linkworker run [--drain]        work until SIGINT/SIGTERM, or until the queue is drained
    linkworker simulate [...]       the provider simulator, for tests, demos and load tests
    linkworker demo [...]           everything above on an embedded Postgres, in one command

Exit codes: 0 done, 1 unexpected error, 2 bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
from collections.abc import Sequence

import asyncpg

from worker import admin, bench, enqueue, reports, simulator
from worker.arguments import CONFIG_HELP, non_negative, positive_int
from worker.errors import ConfigError
from worker.logs import configure_logging, get_logger
from worker.migrations import migrate
from worker.runner import Runner
from worker.settings import Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    """The command line. Each command sets `handler(args) -> exit code` as its default."""
    parser = argparse.ArgumentParser(
        prog="linkworker",
        description="Create payment links in bulk from a PostgreSQL queue table.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate_cmd = commands.add_parser("migrate", help="apply the database migrations")
    migrate_cmd.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    migrate_cmd.set_defaults(handler=_migrate_command)

    run_cmd = commands.add_parser("run", help="process link jobs until stopped")
    run_cmd.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    run_cmd.add_argument(
        "--drain",
        action="store_true",
        help="exit 0 once no job is pending or running (retries included), printing a summary",
    )
    run_cmd.set_defaults(handler=_run_command)

    sim_cmd = commands.add_parser("simulate", help="run the provider simulator")
    simulator.add_arguments(sim_cmd)
    sim_cmd.set_defaults(handler=simulator.run_from_args)

    demo_cmd = commands.add_parser(
        "demo", help="see it work: embedded Postgres, simulator, a mixed batch, a summary"
    )
    demo_cmd.add_argument("--jobs", type=positive_int, default=3000, help="jobs (default 3000)")
    demo_cmd.add_argument(
        "--latency-ms", type=non_negative, default=30.0, help="simulated provider latency"
    )
    demo_cmd.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the embedded database in DIR to look at afterwards (default: delete it)",
    )
    demo_cmd.set_defaults(handler=_demo_command)
    # more commands register here: module.add_command(commands)
    bench.add_command(commands)
    enqueue.add_command(commands)
    reports.add_command(commands)
    admin.add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        print(f"linkworker: {exc}", file=sys.stderr)
        return 2


def load_for_command(args: argparse.Namespace) -> Settings:
    """Settings from `--config` (if the command has it) and the environment; logging set up."""
    settings = load_settings(getattr(args, "config", None))
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    return settings


def _migrate_command(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(load_for_command(args)))


# Every link allocates many short-lived objects (requests, answers, log events); with the
# default gen-0 threshold (700) the collector runs every few links. 20,000 saves about 8% of the
# worker's instructions per link (cachegrind, BENCHMARKS.md) and leaves peak memory flat.
GC_THRESHOLDS = (20_000, 50, 100)


def _run_command(args: argparse.Namespace) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    return asyncio.run(_run(load_for_command(args), drain=args.drain))


def _demo_command(args: argparse.Namespace) -> int:
    from worker.demo import run_demo  # the demo pulls in the simulator's server side

    return run_demo(args)


async def _migrate(settings: Settings) -> int:
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=15)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ConfigError(f"cannot connect to database_url: {type(exc).__name__}: {exc}") from None
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("schema is up to date")
    return 0


async def _run(settings: Settings, *, drain: bool) -> int:
    stop = asyncio.Event()
    runner = Runner(settings, drain=drain, stop=stop)
    _install_signal_handlers(stop, runner.hurry)
    summary = await runner.run()
    if drain:
        print(summary.line(), flush=True)
    return 0


def _install_signal_handlers(stop: asyncio.Event, hurry: asyncio.Event) -> None:
    """First SIGINT/SIGTERM: stop claiming and finish; second: cut the grace period short."""
    loop = asyncio.get_running_loop()
    log = get_logger()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("shutdown_hurried", signal=name)
            hurry.set()
        else:
            log.info("shutdown_requested", signal=name)
            stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
