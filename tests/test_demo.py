"""`linkworker demo` as a new user runs it: embedded Postgres, simulator, worker, summary."""

from __future__ import annotations

import re

from tests.conftest import cli_env, run_cli
from worker.demo import BAD_EVERY, LANES, bad_jobs, good_jobs, lane_totals


def test_the_batch_mixes_lanes_and_a_few_bad_payloads() -> None:
    good = list(good_jobs(400, "b"))
    bad = bad_jobs(400, "b")

    assert len(good) + len(bad) == 400
    assert len(bad) == 400 // BAD_EVERY
    assert {(provider, account) for provider, _, account, _ in bad} == set(LANES)
    assert sum(lane_totals(400).values()) == 400


async def test_demo_runs_a_batch_and_prints_a_summary() -> None:
    code, out, err = await run_cli(
        "demo", "--jobs", "200", "--latency-ms", "1", env=cli_env(), timeout_s=110
    )

    assert code == 0, err[-3000:]
    assert "\x1b[" not in out  # not a terminal: no animation, no colour codes
    assert re.search(r"enqueued 198 jobs \(0 already present\) in batch demo-\d{8}-\d{6}", out)
    assert "enqueued 2 jobs with bad payloads through SQL" in out
    drained = re.search(r"drained in [\d.]+ s: (\d+) succeeded, (\d+) failed", out)
    assert drained is not None, out
    assert (int(drained[1]), int(drained[2])) == (198, 2)
    summary = out[out.index("summary") :]
    for provider, account in LANES:
        row = re.search(
            rf"{provider}/{account}\W+(\d+)\W+(\d+)\W+(\d+)\W+(\d+)\W+([\d.]+)", summary
        )
        assert row is not None, summary
        succeeded, failed = int(row[1]), int(row[2])
        assert succeeded + failed == 50
        assert 0 < float(row[5]) <= 100  # achieved rate within the lane's limit
    assert "p95 ms" in summary
    assert re.search(r"sample links:\n  billpocket +https://", out)
    assert re.search(r"a failed job \(#\d+\): payload is invalid: ", out)
    assert "SELECT id, provider, account, state, url, last_error FROM link_jobs" in out
