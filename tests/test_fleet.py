"""Scale-out: several real `linkworker run` processes on one database share each lane's limits.

The simulator holds each account to a strict limit per one-second window, counted at arrival.
The fleet must stay under it (no window over, no 429) and still use it (at least 95% of it in
steady state), also when one replica is SIGKILLed mid-run. Then: a 429 seen by one worker
pauses all, an adaptive lane finds an unknown limit, and fair claims.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import (
    WorkerProcess,
    cli_env,
    queue_fault,
    run_cli,
    wait_until,
    write_config,
)
from worker import db
from worker.bench_processes import simulator_process
from worker.samples import mixed_jobs
from worker.simulator import SimulatorConfig, start_simulator

LIMIT = 100  # requests/s for the kushki account, at the simulator and in the lane's config
# The fleet's windows are shaped at the senders; 2% headroom leaves 10 ms for arrival jitter
# between several processes on a busy 2-core machine (a slot may go 10 ms late, the other half).
HEADROOM = 0.03
FAST = {
    "poll_interval_s": 0.05,
    "retry_base_s": 0.05,
    "retry_cap_s": 0.5,
    "lease_s": 4,
    "fleet_refresh_s": 0.5,
    "log_level": "info",
}


async def insert_kushki_jobs(conn: asyncpg.Connection, count: int, *, seed: int) -> None:
    jobs = mixed_jobs(count, [("kushki", "default")], bad_fraction=0, seed=seed)
    await conn.executemany(
        "INSERT INTO link_jobs (provider, account, payload) VALUES ($1, $2, $3::jsonb)",
        [(provider, account, payload) for provider, account, payload, _ in jobs],
    )


async def fetch_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        return await response.json()


def steady_rate(finished: list[float]) -> float:
    """Jobs per second between the 10th and the 90th percentile of finish times (start-up and
    tail left out)."""
    finished = sorted(finished)
    low, high = len(finished) // 10, len(finished) * 9 // 10
    return (high - low) / (finished[high] - finished[low])


async def run_fleet(
    conn: asyncpg.Connection,
    database_url: str,
    tmp_path: Path,
    *,
    replicas: int,
    jobs: int,
    kill_one_after: int | None = None,
) -> tuple[dict[str, Any], list[WorkerProcess]]:
    await insert_kushki_jobs(conn, jobs, seed=replicas)
    # the simulator in its own process: arrivals are stamped by a loop that does nothing else
    simulator = simulator_process(tmp_path, latency_ms=20, rate_per_s=LIMIT)
    async with simulator as url:
        config = write_config(
            tmp_path / "lw.toml",
            database_url,
            url,
            lanes={"rate_per_s": LIMIT, "max_in_flight": 20, "rate_headroom": HEADROOM},
            **FAST,
        )
        args = ("run", "--drain", "--config", str(config))
        fleet = [await WorkerProcess.start(*args, env=cli_env()) for _ in range(replicas)]
        try:
            if kill_one_after is not None:
                await wait_for_created(url, kill_one_after)
                await fleet[0].kill()
            codes = [await worker.finish(timeout_s=120) for worker in fleet[1:]]
        finally:
            for index, worker in enumerate(fleet):
                await worker.kill()
                (tmp_path / f"worker-{index}.log").write_text("".join(worker.lines))
        assert codes == [0] * (replicas - 1), [w.lines[-5:] for w in fleet]
        stats = await fetch_json(url + "/__stats")
    return stats, fleet


async def wait_for_created(url: str, count: int) -> None:
    """Wait until the simulator (another process) has created `count` links."""

    async def watch() -> None:
        # its counters offer no event to wait on: read them over HTTP, twenty times a second
        while (await fetch_json(url + "/__stats"))["created"] < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(watch(), 60)


def slot_use(fleet: list[WorkerProcess]) -> str:
    """What each worker did with its send slots (for a failure's message)."""
    return "\n".join(
        line.strip() for worker in fleet for line in worker.lines if "send_slots_used" in line
    )


async def assert_fleet_held_the_limit(
    conn: asyncpg.Connection, stats: dict[str, Any], fleet: list[WorkerProcess]
) -> float:
    rows = await conn.fetch("SELECT state, extract(epoch FROM finished_at) AS at FROM link_jobs")
    assert {row["state"] for row in rows} == {"succeeded"}
    (account,) = stats["accounts"].values()
    assert account["max_per_window"] <= LIMIT, account
    assert stats["throttled"] == 0, stats
    assert stats["duplicates"] == 0, stats
    rate = steady_rate([row["at"] for row in rows])
    assert rate >= 0.95 * LIMIT, f"the fleet reached {rate:.1f}/s of {LIMIT}/s\n{slot_use(fleet)}"
    return rate


@pytest.mark.parametrize("replicas", [3, 6])
async def test_a_fleet_keeps_and_uses_the_lane_limit(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path, replicas: int
) -> None:
    stats, fleet = await run_fleet(conn, database_url, tmp_path, replicas=replicas, jobs=1000)
    await assert_fleet_held_the_limit(conn, stats, fleet)
    # every replica took part: the limit is the fleet's, not one process's
    assert stats["requests"] >= 1000
    started = [worker for worker in fleet if not worker.saw('"error"')]
    assert len(started) == replicas
    limits = await conn.fetchrow("SELECT * FROM linkworker_lanes WHERE provider = 'kushki'")
    assert limits["rate_per_s"] == LIMIT and limits["throttles"] == 0
    # all of them stopped cleanly: none is left registered in the lane
    assert await conn.fetchval("SELECT count(*) FROM linkworker_lane_workers") == 0


async def test_the_fleet_keeps_the_limit_when_a_replica_is_killed(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    stats, fleet = await run_fleet(
        conn, database_url, tmp_path, replicas=3, jobs=1000, kill_one_after=300
    )
    await assert_fleet_held_the_limit(conn, stats, fleet)
    rescued = await conn.fetchval(
        'SELECT count(*) FROM link_jobs WHERE errors @> \'[{"kind": "lease_expired"}]\''
    )
    assert rescued > 0  # the killed replica held jobs; the others finished them


async def test_a_429_seen_by_one_worker_pauses_the_lane_for_all(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    await insert_kushki_jobs(conn, 400, seed=7)
    simulator = await start_simulator(SimulatorConfig(latency_ms=5, seed=5))
    try:
        await queue_fault(simulator.url, "kushki", "429", 1)
        config = write_config(
            tmp_path / "lw.toml",
            database_url,
            simulator.url,
            lanes={"rate_per_s": 100, "max_in_flight": 4},
            **FAST,
        )
        args = ("run", "--drain", "--config", str(config))
        fleet = [await WorkerProcess.start(*args, env=cli_env()) for _ in range(2)]
        try:
            codes = [await worker.finish(timeout_s=60) for worker in fleet]
        finally:
            for worker in fleet:
                await worker.kill()
    finally:
        await simulator.close()
    assert codes == [0, 0]
    lane = await conn.fetchrow("SELECT * FROM linkworker_lanes WHERE provider = 'kushki'")
    assert lane["throttles"] == 1  # one worker saw it, and wrote the pause for both
    # the pause (Retry-After: 1 s) held for the whole fleet: no request arrived inside it
    paused_until = lane["paused_until"].timestamp()
    inside = await conn.fetchval(
        "SELECT count(*) FROM link_jobs WHERE finished_at < to_timestamp($1)"
        " AND finished_at > to_timestamp($1) - interval '0.95 s'",
        paused_until,
    )
    assert inside <= 4, "jobs finished while the lane was paused"  # only calls already in flight
    assert await conn.fetchval("SELECT count(*) FROM link_jobs WHERE state <> 'succeeded'") == 0


async def test_an_adaptive_lane_finds_an_unknown_limit_and_keeps_under_it(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    true_limit = 60
    await insert_kushki_jobs(conn, 1500, seed=9)
    simulator = await start_simulator(SimulatorConfig(rate_per_s=true_limit, latency_ms=10, seed=5))
    try:
        config = write_config(
            tmp_path / "lw.toml",
            database_url,
            simulator.url,
            lanes={"rate_per_s": 150, "max_in_flight": 10, "adaptive": True},
            **FAST,
        )
        worker = await WorkerProcess.start("run", "--drain", "--config", str(config), env=cli_env())
        try:
            await wait_until(lambda: simulator.state.created >= 900, 60)
            throttled_then = simulator.state.throttled
            assert await worker.finish(timeout_s=120) == 0
        finally:
            await worker.kill()
        throttled_at_end = simulator.state.throttled
    finally:
        await simulator.close()
    assert throttled_then > 0  # it went over the limit it was not told ...
    assert throttled_at_end - throttled_then <= 2, "... and then kept under it"
    lane = await conn.fetchrow("SELECT * FROM linkworker_lanes WHERE provider = 'kushki'")
    assert lane["learned_per_s"] is not None
    assert 0.6 * true_limit <= lane["current_per_s"] <= true_limit
    rows = await conn.fetch(
        "SELECT extract(epoch FROM finished_at) AS at FROM link_jobs ORDER BY finished_at"
    )
    late = [row["at"] for row in rows[900:]]
    assert steady_rate(late) >= 0.75 * true_limit


# --- fair claims ------------------------------------------------------------------------------


async def insert_batch(
    conn: asyncpg.Connection, batch: str | None, count: int, *, priority: int = 0
) -> None:
    await conn.execute(
        "INSERT INTO link_jobs (provider, account, payload, batch_id, priority)"
        " SELECT 'cheqpay', 'default', '{}', $1, $2 FROM generate_series(1, $3)",
        batch,
        priority,
        count,
    )


async def claim(
    conn: asyncpg.Connection, limit: int, cursor: db.BatchCursor | None = None
) -> list[str | None]:
    jobs = await db.claim(
        conn,
        provider="cheqpay",
        account="default",
        limit=limit,
        worker_id="w",
        lease_s=30,
        cursor=cursor,
    )
    ids = [job.id for job in jobs]
    rows = await conn.fetch("SELECT batch_id FROM link_jobs WHERE id = ANY($1)", ids)
    return [row["batch_id"] for row in rows]


async def test_a_small_batch_is_served_beside_a_big_one(conn: asyncpg.Connection) -> None:
    await insert_batch(conn, "big", 5000)
    await insert_batch(conn, "small", 30)
    await insert_batch(conn, None, 10)  # jobs without a batch are one batch
    claimed = await claim(conn, 60)
    assert claimed.count("small") == 20 and claimed.count(None) == 10
    assert claimed.count("big") == 20
    second = await claim(conn, 60)
    assert second.count("small") == 10 and second.count("big") == 30


async def test_a_higher_priority_goes_first_whatever_its_age(conn: asyncpg.Connection) -> None:
    await insert_batch(conn, "nightly", 500)
    await insert_batch(conn, "urgent", 5, priority=10)
    assert await claim(conn, 50) == ["urgent"] * 5
    assert set(await claim(conn, 50)) == {"nightly"}


async def test_many_batches_are_served_in_turn(conn: asyncpg.Connection) -> None:
    names = [f"merchant-{n:03}" for n in range(80)]
    for name in names:
        await insert_batch(conn, name, 3)
    cursor = db.BatchCursor()
    first, second = await claim(conn, 32, cursor), await claim(conn, 32, cursor)
    # 32 batches a claim, one job of each: no batch is served twice before all are served once
    assert len(set(first + second)) == 64
    third = await claim(conn, 32, cursor)  # the last 16, two jobs each; then the round restarts
    assert set(first + second + third) == set(names)
    assert len(third) == 32 and len(set(third)) == 16
    assert cursor.after is None


async def test_status_shows_the_fleet_limits(
    conn: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    limits = db.LaneLimits(
        rate_per_s=40, burst=2, max_in_flight=8, rate_headroom=0.01, adaptive=False
    )
    changed, before = await db.configure_lane(
        conn, provider="kushki", account="default", limits=limits, worker_id="w1"
    )
    assert changed and before is None
    again = await db.configure_lane(
        conn, provider="kushki", account="default", limits=limits, worker_id="w2"
    )
    assert again == (False, None)  # the same limits: nothing written
    code, out, err = await run_cli(
        "status", "--json", env=cli_env(LINKWORKER_DATABASE_URL=database_url)
    )
    assert code == 0, err
    (lane,) = json.loads(out)["limits"]
    assert lane["lane"] == "kushki/default"
    assert (lane["rate_per_s"], lane["burst"], lane["max_in_flight"]) == (40, 2, 8)
    assert lane["workers"] == 0 and lane["throttles"] == 0


async def test_a_round_that_ends_on_the_last_batch_starts_again_at_once(
    conn: asyncpg.Connection,
) -> None:
    for n in range(db.CLAIM_BATCHES):
        await insert_batch(conn, f"b{n:02}", 3)
    cursor = db.BatchCursor()
    assert len(await claim(conn, db.CLAIM_BATCHES, cursor)) == db.CLAIM_BATCHES
    assert len(await claim(conn, db.CLAIM_BATCHES, cursor)) == db.CLAIM_BATCHES  # not empty


async def test_batches_with_nothing_due_take_no_place_in_a_round(conn: asyncpg.Connection) -> None:
    for n in range(40):
        await insert_batch(conn, f"later-{n:02}", 2)
    await conn.execute("UPDATE link_jobs SET run_at = now() + interval '1 hour'")
    await insert_batch(conn, "zz-due", 2)
    assert await claim(conn, 10, db.BatchCursor()) == ["zz-due", "zz-due"]
