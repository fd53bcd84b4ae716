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
import signal
import sys
from collections.abc import Sequence

import asyncpg

from worker import simulator
from worker.errors import ConfigError
from worker.logs import configure_logging, get_logger
from worker.migrations import migrate
from worker.runner import Runner
from worker.settings import Settings, load_settings


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkworker",
        description="Create payment links in bulk from a PostgreSQL queue table.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "TOML configuration file (default: $LINKWORKER_CONFIG; env vars override it)"

    migrate_cmd = commands.add_parser("migrate", help="apply the database migrations")
    migrate_cmd.add_argument("--config", metavar="PATH", help=config_help)

    run_cmd = commands.add_parser("run", help="process link jobs until stopped")
    run_cmd.add_argument("--config", metavar="PATH", help=config_help)
    run_cmd.add_argument(
        "--drain",
        action="store_true",
        help="exit 0 once no job is pending or running (retries included), printing a summary",
    )

    sim_cmd = commands.add_parser("simulate", help="run the provider simulator")
    simulator.add_arguments(sim_cmd)

    demo_cmd = commands.add_parser(
        "demo", help="see it work: embedded Postgres, simulator, a mixed batch, a summary"
    )
    demo_cmd.add_argument("--jobs", type=_positive_int, default=3000, help="jobs (default 3000)")
    demo_cmd.add_argument(
        "--latency-ms", type=_non_negative, default=30.0, help="simulated provider latency"
    )
    demo_cmd.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the embedded database in DIR to look at afterwards (default: delete it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return simulator.run_from_args(args)
        if args.command == "demo":
            from worker.demo import run_demo

            return run_demo(args)
        settings = load_settings(args.config)
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        return asyncio.run(_run(settings, drain=args.drain))
    except ConfigError as exc:
        print(f"linkworker: {exc}", file=sys.stderr)
        return 2


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
