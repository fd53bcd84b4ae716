"""`linkworker bench`: how fast linkworker is on this machine, and how close to the limits.

    linkworker bench [--scenario NAME ...] [--json FILE] [--quick] [--database-url URL]

Scenarios (issue 5; each is described in the module that runs it):

    throughput  links/s against the bare aiohttp client ceiling, and worker CPU per link
    rate        each lane's pace as a fraction of its strict limit, 429s, busiest window
    latency     INSERT commit to provider request in an idle worker, p50/p95/p99
    enqueue     rows/s through unnest INSERT, executemany, COPY, enqueue_many and the CLI
    memory      worker peak RSS over a deep queue against a shallow one
    queue       claim + write-back rows/s against a bare SKIP LOCKED loop (database ceiling)

The worker, the simulator and the bare client each run in their own process. Postgres is an
embedded server unless `--database-url` names one; either way the benchmark works in a database
of its own (`linkworker_bench_<random>`) that it drops at the end. It prints the machine, then a
table (figure, value, ceiling, ratio, target); `--json FILE` writes all of it with the raw
numbers behind each figure. Exit codes: 0 done, 1 a scenario failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from worker.bench_database import bench_database, enqueue_scenario, postgres_info, queue_scenario
from worker.bench_fleet import fleet_scenario
from worker.bench_report import ScenarioResult, table
from worker.bench_scenarios import (
    FULL,
    QUICK,
    Bench,
    latency_scenario,
    memory_scenario,
    rate_scenario,
    throughput_scenario,
)
from worker.logs import configure_logging

Scenario = Callable[[Bench], Awaitable[ScenarioResult]]


async def _enqueue(bench: Bench) -> ScenarioResult:
    return await enqueue_scenario(
        bench.database_url, bench.sizes.enqueue_rows, bench.directory("enqueue")
    )


async def _queue(bench: Bench) -> ScenarioResult:
    return await queue_scenario(bench.database_url, bench.sizes.queue_rows)


SCENARIOS: dict[str, Scenario] = {
    "throughput": throughput_scenario,
    "rate": rate_scenario,
    "latency": latency_scenario,
    "enqueue": _enqueue,
    "memory": memory_scenario,
    "queue": _queue,
    "fleet": fleet_scenario,
}


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `linkworker bench` on the CLI's sub-commands."""
    bench = commands.add_parser(
        "bench",
        help="measure throughput, rate accuracy, latency, enqueue, memory and queue speed",
        description="Run the benchmark scenarios and print a table of figures.",
    )
    bench.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)} (default: all)",
    )
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    bench.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, < 60 s)")
    bench.add_argument(
        "--database-url",
        metavar="URL",
        help="a Postgres server to use; the benchmark creates and drops its own database there "
        "(default: an embedded server)",
    )
    bench.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """The `bench` command: 0 when every scenario ran, 1 when one failed."""
    configure_logging("warning", "auto")
    names = list(dict.fromkeys(args.scenario or SCENARIOS))  # in order, each once
    with tempfile.TemporaryDirectory(prefix="lw-bench-") as workdir:
        run = BenchRun(names, quick=args.quick, workdir=Path(workdir), json_path=args.json)
        if args.database_url:
            return asyncio.run(run.run(args.database_url, embedded=False))
        from worker.embedded import embedded_postgres  # only now: it starts a server

        print("starting an embedded PostgreSQL ...", flush=True)
        with embedded_postgres() as server_url:
            return asyncio.run(run.run(server_url, embedded=True))


class BenchRun:
    """One benchmark run: the scenarios in order, the header, the table and the JSON."""

    def __init__(
        self, names: list[str], *, quick: bool, workdir: Path, json_path: Path | None
    ) -> None:
        self.names = names
        self.quick = quick
        self.sizes = QUICK if quick else FULL
        self.workdir = workdir
        self.json_path = json_path
        self.results: list[ScenarioResult] = []
        self.errors: dict[str, str] = {}

    async def run(self, server_url: str, *, embedded: bool) -> int:
        async with bench_database(server_url) as database_url:
            machine = machine_info()
            postgres = {**await postgres_info(database_url), "embedded": embedded}
            print(header(machine, postgres, quick=self.quick), flush=True)
            for name in self.names:
                await self._scenario(name, Bench(database_url, self.workdir, self.sizes))
        print("\n" + table(self.results), flush=True)
        if self.json_path is not None:
            self._write_json(machine, postgres)
        for name, error in self.errors.items():
            print(f"\nscenario {name} failed: {error}", flush=True)
        return 1 if self.errors else 0

    async def _scenario(self, name: str, bench: Bench) -> None:
        print(f"running {name} ...", flush=True)
        load = os.getloadavg()[0]  # other work on the machine moves every figure
        started = time.perf_counter()
        try:
            result = await SCENARIOS[name](bench)
        except Exception as exc:  # one scenario's failure must not hide others
            self.errors[name] = "".join(traceback.format_exception_only(exc)).strip()
            return
        result.elapsed_s = time.perf_counter() - started
        result.details["load_average_1m_at_start"] = load
        print(f"  done in {result.elapsed_s:.1f} s", flush=True)
        self.results.append(result)

    def _write_json(self, machine: dict[str, Any], postgres: dict[str, Any]) -> None:
        assert self.json_path is not None
        document = {
            "quick": self.quick,
            "machine": machine,
            "postgres": postgres,
            "scenarios": {result.name: result.to_json() for result in self.results},
            "errors": self.errors,
        }
        self.json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def machine_info() -> dict[str, Any]:
    """What the figures depend on: cores, CPU, memory, Python and the client libraries."""
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_memory_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "asyncpg": asyncpg.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def header(machine: dict[str, Any], postgres: dict[str, Any], *, quick: bool) -> str:
    server = "embedded" if postgres["embedded"] else "given server"
    return (
        f"linkworker bench{' --quick' if quick else ''}: {machine['cores']} cores, "
        f"{machine['cpu_model']}, {machine['memory_gib']} GiB, Python {machine['python']}, "
        f"PostgreSQL {postgres['server_version']} ({server}, synchronous_commit="
        f"{postgres['synchronous_commit']}, shared_buffers={postgres['shared_buffers']})"
    )
