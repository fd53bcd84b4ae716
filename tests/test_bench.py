"""`linkworker bench --quick`: the benchmark command keeps working (a smoke run, no timings).

Every scenario runs once, in one invocation, on the test server (`--database-url`: the bench
makes and drops its own database there). Only the shape of the results is checked: every
figure is there, finite, and positive where a zero would mean nothing was measured. How fast
anything is, is for BENCHMARKS.md, not for a test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import asyncpg

from tests.conftest import cli_env, run_cli

LANES = ("billpocket/default", "cheqpay/default", "kushki/default")
FIGURES = {
    "throughput": [
        "links/s",
        "requests/s",
        "worker CPU per link",
        "worker peak RSS",
        "bare client requests/s",
    ],
    "rate": [f"{lane} {name}" for lane in LANES for name in ("rate", "throttled", "busiest 1 s")],
    "latency": ["p50 commit to request", "p95 commit to request", "p99 commit to request"],
    "enqueue": [
        "INSERT unnest rows/s",
        "executemany rows/s",
        "COPY rows/s",
        "enqueue_many rows/s",
        "linkworker enqueue FILE rows/s",
    ],
    "memory": [
        "peak RSS, deep queue",
        "peak RSS, shallow queue",
        "start-up, deep queue",
        "start-up, shallow queue",
    ],
    "queue": ["claim+record rows/s", "bare SKIP LOCKED rows/s"],
}
MAY_BE_ZERO = ("throttled",)  # a count whose target is zero


async def test_quick_run_reports_every_figure(server_url: str, tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    databases_before = await _bench_databases(server_url)
    code, out, err = await run_cli(
        "bench",
        "--quick",
        "--database-url",
        server_url,
        "--json",
        str(results),
        *(argument for name in FIGURES for argument in ("--scenario", name)),
        env=cli_env(),
        timeout_s=110,
    )
    assert code == 0, out[-3000:] + err[-3000:]
    document = json.loads(results.read_text())
    assert document["errors"] == {}
    assert document["quick"] is True
    assert document["machine"]["cores"] >= 1
    assert document["postgres"]["server_version"]
    assert set(document["scenarios"]) == set(FIGURES)
    for scenario, names in FIGURES.items():
        figures = document["scenarios"][scenario]["figures"]
        assert sorted(figures) == sorted(names), scenario
        for name, figure in figures.items():
            value = figure["value"]
            assert math.isfinite(value), (scenario, name, value)
            assert value > 0 or (value == 0 and name.endswith(MAY_BE_ZERO)), (scenario, name)
            if figure["ceiling"] is not None:
                assert figure["ceiling"] > 0 and math.isfinite(figure["ratio"]), (scenario, name)
    throughput = document["scenarios"]["throughput"]["figures"]
    assert throughput["links/s"]["ceiling"] == throughput["bare client requests/s"]["value"] > 0
    for scenario in FIGURES:
        assert scenario in out  # the table names every scenario it ran
    assert await _bench_databases(server_url) == databases_before, "it drops its database"


async def _bench_databases(server_url: str) -> set[str]:
    conn = await asyncpg.connect(server_url)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'linkworker_bench_%'"
        )
    finally:
        await conn.close()
    return {row["datname"] for row in rows}


async def test_unknown_scenario_is_refused_with_the_valid_names() -> None:
    code, _, err = await run_cli("bench", "--scenario", "speed", env=cli_env(), timeout_s=30)
    assert code == 2
    assert "invalid choice: 'speed'" in err
    for name in FIGURES:
        assert name in err
