"""The benchmark scenarios that run the real worker process against the simulator.

    throughput  N jobs over three lanes, no limit, no latency: links/s against the bare client
                (worker.bench_client) on the same simulator in the same run; worker CPU per link
    rate        three lanes with strict limits at the simulator and in the worker, 50 ms
                latency: the pace each lane holds as a fraction of its limit, 429s, and the
                busiest one-second window the simulator counted
    latency     an idle worker that only NOTIFY can wake (poll 10 s): from an INSERT's commit
                to the simulator receiving the request, one job at a time
    memory      peak RSS of a worker with a full in-flight window (200 ms latency) over a deep
                queue, against the same run over a shallow one

The worker's CPU time and peak RSS come from wait4 when it exits. CPU per link leaves out the
worker's start-up, measured as a drain of an empty queue. The simulator runs in its own process,
except in `latency`, where it runs in the benchmark's process (the worker still in its own) so
that the INSERT's commit and the request's arrival are read from one clock.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

from worker.bench_database import empty_queue, load_jobs
from worker.bench_processes import (
    LANES,
    Activity,
    Child,
    StatsPoller,
    Usage,
    activity,
    fetch_stats,
    lane_labels,
    run_bare_client,
    simulator_process,
    start_worker,
    write_worker_config,
)
from worker.bench_report import BenchError, Figure, ScenarioResult, Target
from worker.samples import good_payload
from worker.simulator import Simulator, SimulatorConfig

UNLIMITED_RATE = 1_000_000.0  # requests/s: the worker's limiter never waits
SAMPLE_S = 0.05  # how often /__stats is read
MEGABYTE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much each scenario does; `--quick` picks the tiny set."""

    throughput_jobs: int
    rate_limit_per_s: float
    rate_seconds: float
    latency_jobs: int
    enqueue_rows: int
    memory_deep_rows: int
    memory_shallow_rows: int
    memory_seconds: float
    queue_rows: int


FULL = Sizes(
    throughput_jobs=50_000,
    rate_limit_per_s=200,
    rate_seconds=15,
    latency_jobs=200,
    enqueue_rows=100_000,
    memory_deep_rows=1_000_000,
    memory_shallow_rows=10_000,
    memory_seconds=10,
    queue_rows=100_000,
)
QUICK = Sizes(
    throughput_jobs=2_000,
    rate_limit_per_s=50,
    rate_seconds=3,
    latency_jobs=20,
    enqueue_rows=5_000,
    memory_deep_rows=50_000,
    memory_shallow_rows=5_000,
    memory_seconds=3,
    queue_rows=5_000,
)


@dataclass(frozen=True, slots=True)
class Bench:
    """Where a scenario runs: the benchmark database, a directory for logs, the sizes."""

    database_url: str
    workdir: Path
    sizes: Sizes

    def directory(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


async def with_connection(
    database_url: str, work: Callable[[asyncpg.Connection], Awaitable[None]]
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await work(conn)
    finally:
        await conn.close()


async def count_succeeded(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM link_jobs WHERE state = 'succeeded'")
        return count
    finally:
        await conn.close()


async def drain(config: Path, workdir: Path, name: str, timeout_s: float) -> Usage:
    """Run `linkworker run --drain` to its end; what it cost."""
    async with start_worker(config, workdir, drain=True, name=name) as worker:
        return worker.check(await worker.wait(timeout_s))


# --- throughput ---------------------------------------------------------------------------------

CONCURRENCY_PER_LANE = 100
# the worker's total in flight, and a small pool (the bare client does better with fewer)
BARE_CONCURRENCIES = (CONCURRENCY_PER_LANE * len(LANES), 50)


async def reset_simulator(session: aiohttp.ClientSession, base_url: str) -> None:
    """Forget every link and counter (POST /__reset), so earlier load does not weigh on it."""
    async with session.post(base_url + "/__reset") as response:
        response.raise_for_status()


async def throughput_scenario(bench: Bench) -> ScenarioResult:
    jobs = bench.sizes.throughput_jobs
    workdir = bench.directory("throughput")
    timeout_s = 60 + jobs / 100
    async with simulator_process(workdir) as url, aiohttp.ClientSession() as session:
        config = write_worker_config(
            workdir / "worker.toml",
            database_url=bench.database_url,
            base_url=url,
            rate_per_s=UNLIMITED_RATE,
            max_in_flight=CONCURRENCY_PER_LANE,
        )
        await with_connection(bench.database_url, empty_queue)
        start_up = await drain(config, workdir, "worker_empty_queue", timeout_s)
        bare: dict[int, dict[str, float]] = {}
        for concurrency in BARE_CONCURRENCIES:
            await reset_simulator(session, url)  # each run meets an empty simulator
            bare[concurrency] = await run_bare_client(workdir, url, jobs, concurrency, timeout_s)
        await with_connection(bench.database_url, lambda conn: load_jobs(conn, jobs, LANES))
        await reset_simulator(session, url)
        async with StatsPoller(session, url, SAMPLE_S) as poller:
            usage = await drain(config, workdir, "worker", timeout_s)
    seen = activity(poller.samples, lane_labels().values())
    succeeded = await count_succeeded(bench.database_url)
    if seen.requests != jobs or succeeded != jobs:
        raise BenchError(f"{jobs} jobs made {seen.requests} requests and {succeeded} links")
    return _throughput_result(jobs, seen, usage, start_up, bare)


def _throughput_result(
    jobs: int,
    seen: Activity,
    usage: Usage,
    start_up: Usage,
    bare: dict[int, dict[str, float]],
) -> ScenarioResult:
    """Links/s counts a link once it is written: from the first request to the drain's end.

    The ceiling is the better of the bare client's runs: it is not the same at every
    concurrency, and a ceiling taken where the client does badly would flatter the worker.
    """
    result = ScenarioResult("throughput")
    ceiling = max(run["requests_per_s"] for run in bare.values())
    links_per_s = jobs / (usage.ended_s - seen.first_s)
    cpu_ms_per_link = max(usage.cpu_s - start_up.cpu_s, 0.0) * 1000 / jobs
    result.add(Figure("links/s", links_per_s, "links/s", ceiling, Target(">=", 0.7, "ratio")))
    result.add(Figure("requests/s", seen.overall_per_s, "req/s", ceiling))
    result.add(Figure("worker CPU per link", cpu_ms_per_link, "ms", target=Target("<", 0.5)))
    result.add(Figure("worker peak RSS", usage.peak_rss_bytes / MEGABYTE, "MiB"))
    result.add(Figure("bare client requests/s", ceiling, "req/s"))
    result.details = {
        "jobs": jobs,
        "concurrency_per_lane": CONCURRENCY_PER_LANE,
        "requests_busy_s": seen.span_s,
        "steady_requests_per_s": seen.steady_per_s,
        "written_after_last_request_s": usage.ended_s - seen.last_s,
        "worker_wall_s": usage.wall_s,
        "worker_cpu_s": usage.cpu_s,
        "start_up_cpu_s": start_up.cpu_s,
        "start_up_wall_s": start_up.wall_s,
        "bare_client_by_concurrency": bare,
        "sample_interval_s": SAMPLE_S,
    }
    return result


# --- rate ---------------------------------------------------------------------------------------

RATE_LATENCY_MS = 50
RATE_IN_FLIGHT = 50


async def rate_scenario(bench: Bench) -> ScenarioResult:
    limit = bench.sizes.rate_limit_per_s
    per_lane = round(limit * bench.sizes.rate_seconds)
    workdir = bench.directory("rate")
    simulator = simulator_process(workdir, latency_ms=RATE_LATENCY_MS, rate_per_s=limit)
    async with simulator as url, aiohttp.ClientSession() as session:
        config = write_worker_config(
            workdir / "worker.toml",
            database_url=bench.database_url,
            base_url=url,
            rate_per_s=limit,
            max_in_flight=RATE_IN_FLIGHT,
        )
        jobs = per_lane * len(LANES)
        await with_connection(bench.database_url, lambda conn: load_jobs(conn, jobs, LANES))
        async with StatsPoller(session, url, SAMPLE_S) as poller:
            usage = await drain(config, workdir, "worker", 120 + 4 * bench.sizes.rate_seconds)
        stats = await fetch_stats(session, url)
    result = ScenarioResult("rate")
    result.details = {"limit_per_s": limit, "jobs_per_lane": per_lane, "latency_ms": 50}
    started = poller.samples[0].at_s
    for provider, label in lane_labels().items():
        seen = activity(poller.samples, [label])
        account = stats["accounts"][label]
        lane = f"{provider}/default"
        fraction = Target(">=", 0.98, "ratio")
        result.add(Figure(f"{lane} rate", seen.steady_per_s, "req/s", limit, fraction))
        result.add(Figure(f"{lane} throttled", account["throttled"], "429s", None, Target("<=", 0)))
        window = Target("<=", 1.0, "ratio")
        result.add(Figure(f"{lane} busiest 1 s", account["max_per_window"], "req", limit, window))
        result.details[lane] = {
            "requests": account["requests"],
            "first_request_after_s": seen.first_s - started,
            "busy_s": seen.span_s,
            "overall_per_s": seen.overall_per_s,
        }
    result.details["worker_wall_s"] = usage.wall_s
    return result


# --- latency ------------------------------------------------------------------------------------

LATENCY_WARM_UP = 3  # one job per lane first: opens each lane's connection to the simulator
LATENCY_GAP_S = 0.03  # between jobs, so the worker is idle again when the next one lands
ARRIVAL_TIMEOUT_S = 30.0  # longer than the poll interval: a lost NOTIFY shows as ~10 s
INSERT_ONE = """
INSERT INTO link_jobs (provider, account, payload, idempotency_key)
VALUES ($1, 'default', $2::jsonb, $3)
"""


class Arrivals:
    """The simulator's request arrival times, by Idempotency-Key, stamped by a middleware."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}

    def expect(self, key: str) -> asyncio.Future[float]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        return future

    @web.middleware
    async def stamp(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        arrived = time.perf_counter()
        future = self.waiting.pop(request.headers.get("Idempotency-Key", ""), None)
        if future is not None and not future.done():
            future.set_result(arrived)
        return await handler(request)


async def latency_scenario(bench: Bench) -> ScenarioResult:
    workdir = bench.directory("latency")
    arrivals = Arrivals()
    app = Simulator(SimulatorConfig()).make_app()
    app.middlewares.append(arrivals.stamp)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        await with_connection(bench.database_url, empty_queue)
        latencies_ms = await _time_inserts(bench, workdir, url, arrivals)
    finally:
        await runner.cleanup()
    return _latency_result(latencies_ms)


async def _time_inserts(bench: Bench, workdir: Path, url: str, arrivals: Arrivals) -> list[float]:
    config = write_worker_config(
        workdir / "worker.toml",
        database_url=bench.database_url,
        base_url=url,
        rate_per_s=UNLIMITED_RATE,
        max_in_flight=10,
        poll_interval_s=10.0,
    )
    conn = await asyncpg.connect(bench.database_url)
    try:
        async with start_worker(config, workdir, drain=False) as worker:
            await worker.wait_for_output('"listening"', stream="stderr", timeout_s=30)
            latencies = await _insert_one_by_one(conn, arrivals, bench.sizes.latency_jobs)
            worker.check(await worker.stop())
    finally:
        await conn.close()
    return latencies[LATENCY_WARM_UP:]


async def _insert_one_by_one(
    conn: asyncpg.Connection, arrivals: Arrivals, jobs: int
) -> list[float]:
    draw = random.Random(5)
    payloads = {provider: _payload_text(provider) for provider, _ in LANES}
    latencies = []
    for number in range(LATENCY_WARM_UP + jobs):
        provider = LANES[number % len(LANES)][0]
        key = f"bench-latency-{number}"
        arrived = arrivals.expect(key)
        await conn.execute(INSERT_ONE, provider, payloads[provider], key)
        committed = time.perf_counter()  # the commit happened just before the answer came back
        try:
            latencies.append((await asyncio.wait_for(arrived, ARRIVAL_TIMEOUT_S) - committed) * 1e3)
        except TimeoutError:
            raise BenchError(
                f"job {key} reached no provider in {ARRIVAL_TIMEOUT_S:.0f} s"
            ) from None
        await asyncio.sleep(LATENCY_GAP_S * (1 + draw.random()))
    return latencies


def _payload_text(provider: str) -> str:
    return json.dumps(good_payload(provider, 1))


def _latency_result(latencies_ms: list[float]) -> ScenarioResult:
    result = ScenarioResult("latency")
    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    result.add(Figure("p50 commit to request", cuts[49], "ms", target=Target("<", 10)))
    result.add(Figure("p95 commit to request", cuts[94], "ms"))
    result.add(Figure("p99 commit to request", cuts[98], "ms"))
    result.details = {
        "jobs": len(latencies_ms),
        "warm_up_jobs": LATENCY_WARM_UP,
        "min_ms": min(latencies_ms),
        "mean_ms": statistics.fmean(latencies_ms),
        "max_ms": max(latencies_ms),
        "poll_interval_s": 10.0,
    }
    return result


# --- memory -------------------------------------------------------------------------------------

MEMORY_LATENCY_MS = 200
MEMORY_IN_FLIGHT = 50  # per lane: 3 x 50 / 0.2 s = 750 requests/s, under the shallow queue


@dataclass(frozen=True, slots=True)
class MemoryRun:
    rows: int
    usage: Usage
    first_request_after_s: float
    requests: int


async def memory_scenario(bench: Bench) -> ScenarioResult:
    sizes = bench.sizes
    workdir = bench.directory("memory")
    async with (
        simulator_process(workdir, latency_ms=MEMORY_LATENCY_MS) as url,
        aiohttp.ClientSession() as session,
    ):
        config = write_worker_config(
            workdir / "worker.toml",
            database_url=bench.database_url,
            base_url=url,
            rate_per_s=UNLIMITED_RATE,
            max_in_flight=MEMORY_IN_FLIGHT,
        )
        runs = [
            await _memory_run(bench, session, url, config, rows)
            for rows in (sizes.memory_shallow_rows, sizes.memory_deep_rows)
        ]
    await with_connection(bench.database_url, empty_queue)
    return _memory_result(*runs, seconds=sizes.memory_seconds)


async def _memory_run(
    bench: Bench, session: aiohttp.ClientSession, url: str, config: Path, rows: int
) -> MemoryRun:
    await with_connection(bench.database_url, lambda conn: load_jobs(conn, rows, LANES))
    labels = list(lane_labels().values())
    async with StatsPoller(session, url, SAMPLE_S) as poller:
        base = poller.samples[0].count(labels)
        name = f"worker_{rows}_rows"
        async with start_worker(
            config, bench.directory("memory"), drain=False, name=name
        ) as worker:
            first = await _first_request(poller, labels, base, worker)
            await asyncio.sleep(bench.sizes.memory_seconds)
            usage = worker.check(await worker.stop())
    requests = poller.samples[-1].count(labels) - base
    return MemoryRun(rows, usage, first - worker.started, requests)


async def _first_request(poller: StatsPoller, labels: list[str], base: int, worker: Child) -> float:
    """When the simulator first counted a request of the worker (sampled)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.process.poll() is None:
        latest = poller.samples[-1]
        if latest.count(labels) > base:
            return latest.at_s
        await asyncio.sleep(SAMPLE_S / 2)
    raise BenchError(f"the worker sent no request; the end of its log:\n{worker.stderr_tail()}")


def _memory_result(shallow: MemoryRun, deep: MemoryRun, *, seconds: float) -> ScenarioResult:
    result = ScenarioResult("memory")
    deep_mib = deep.usage.peak_rss_bytes / MEGABYTE
    shallow_mib = shallow.usage.peak_rss_bytes / MEGABYTE
    bounded = Target("<=", 1.1, "ratio")
    result.add(Figure("peak RSS, deep queue", deep_mib, "MiB", shallow_mib, bounded))
    result.add(Figure("peak RSS, shallow queue", shallow_mib, "MiB"))
    result.add(Figure("start-up, deep queue", deep.first_request_after_s, "s"))
    result.add(Figure("start-up, shallow queue", shallow.first_request_after_s, "s"))
    result.details = {
        run_name: {
            "pending_rows": run.rows,
            "requests": run.requests,
            "requests_per_s": run.requests / seconds,
            "worker_wall_s": run.usage.wall_s,
            "worker_cpu_s": run.usage.cpu_s,
        }
        for run_name, run in (("deep", deep), ("shallow", shallow))
    }
    result.details["run_seconds_after_first_request"] = seconds
    result.details["latency_ms"] = MEMORY_LATENCY_MS
    result.details["in_flight_per_lane"] = MEMORY_IN_FLIGHT
    return result
