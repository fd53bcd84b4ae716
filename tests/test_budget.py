"""The fleet budget in-process, against a real Postgres: slots from one lane row, shared by
several budgets (as several workers would), the pause, the adaptive rate, in-flight shares."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from worker import db
from worker.budget import FleetBudget, InFlightGate, drain_rate, lane_limits
from worker.connection import PgConnection
from worker.metrics import LaneMetrics, Metrics
from worker.settings import CheqpayAccount

LIMIT = 50.0


def lane_settings(**limits: object) -> CheqpayAccount:
    values: dict[str, object] = {"rate_per_s": LIMIT, "max_in_flight": 10, **limits}
    return CheqpayAccount(base_url="http://127.0.0.1:9", api_key="k" * 8, **values)


async def configure(conn: asyncpg.Connection, settings: CheqpayAccount) -> None:
    await db.configure_lane(
        conn, provider="cheqpay", account="default", limits=lane_limits(settings), worker_id="t"
    )


@pytest.fixture
async def connections(database_url: str) -> AsyncIterator[list[PgConnection]]:
    opened = [PgConnection(database_url, f"budget-{n}") for n in range(3)]
    yield opened
    for conn in opened:
        await conn.close()


def budget(
    conn: PgConnection,
    settings: CheqpayAccount,
    stop: asyncio.Event,
    metrics: LaneMetrics | None = None,
) -> FleetBudget:
    return FleetBudget(
        "cheqpay", "default", settings, conn, need=lambda: 1_000, give_up=stop, metrics=metrics
    )


def busiest_window(times: list[float]) -> int:
    times = sorted(times)
    start, most = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


async def test_budgets_sharing_a_lane_send_at_its_rate_together(
    conn: asyncpg.Connection, connections: list[PgConnection]
) -> None:
    settings = lane_settings()
    await configure(conn, settings)
    stop = asyncio.Event()
    metrics = Metrics(process_metrics=False)
    budgets = [
        budget(c, settings, stop, metrics.lane("cheqpay", f"w{n}"))
        for n, c in enumerate(connections)
    ]
    sends: list[float] = []
    deadline = time.monotonic() + 2.0

    async def send(lane: FleetBudget) -> None:
        while time.monotonic() < deadline:
            await lane.acquire()
            sends.append(time.monotonic())

    await asyncio.gather(*(send(lane) for lane in budgets))
    for lane in budgets:
        await lane.close()
    # three senders, one limit: no one-second window over it, and the limit used
    assert busiest_window(sends) <= LIMIT
    assert len(sends) >= 0.9 * drain_rate(settings) * 2.0
    assert all(lane.taken > 0 for lane in budgets)  # each of them sent some
    granted = metrics.registry.get_sample_value(
        "linkworker_lane_send_slots_total",
        {"provider": "cheqpay", "account": "w0", "outcome": "granted"},
    )
    assert granted == budgets[0].taken


async def test_a_pause_written_by_one_budget_holds_the_others(
    conn: asyncpg.Connection, connections: list[PgConnection]
) -> None:
    settings = lane_settings()
    await configure(conn, settings)
    stop = asyncio.Event()
    first, second = budget(connections[0], settings, stop), budget(connections[1], settings, stop)
    await second.acquire()
    first.throttled(0.5)
    await asyncio.gather(*first._background)  # the pause is written
    second.paused_elsewhere()  # the NOTIFY the runner would pass on
    asked = time.monotonic()
    await second.acquire()
    assert time.monotonic() - asked >= 0.45  # its next slot comes after the pause
    lane = await conn.fetchrow("SELECT throttles, adaptive, current_per_s FROM linkworker_lanes")
    assert lane["throttles"] == 1 and lane["current_per_s"] == LIMIT  # not adaptive: rate kept
    await first.close()
    await second.close()


async def test_an_adaptive_lane_lowers_its_rate_once_per_pause_and_climbs_back(
    conn: asyncpg.Connection, connections: list[PgConnection]
) -> None:
    settings = lane_settings(rate_per_s=100.0, adaptive=True)
    await configure(conn, settings)
    args = ("cheqpay", "default")
    assert await conn.fetchval("SELECT linkworker_lane_throttled($1, $2, 0.2)", *args) == 75
    # the calls in flight when it began come back 429 too: the rate is not lowered again
    assert await conn.fetchval("SELECT linkworker_lane_throttled($1, $2, 0.2)", *args) == 75
    lane = await conn.fetchrow("SELECT learned_per_s FROM linkworker_lanes")
    assert lane["learned_per_s"] == 100
    # a quiet second after the pause and a bit more: the rate climbs, not past 97% of 100
    await conn.execute(
        "UPDATE linkworker_lanes SET paused_until = now() - interval '5 s',"
        " rate_changed_at = now() - interval '3 s'"
    )
    slots = await conn.fetchrow("SELECT * FROM linkworker_take_slots($1, $2, 1)", *args)
    assert 75 < slots["rate_per_s"] <= 97


async def test_in_flight_parts_add_up_to_the_cap_and_a_newcomer_waits(
    conn: asyncpg.Connection,
) -> None:
    settings = lane_settings(max_in_flight=10)
    await configure(conn, settings)
    lanes = [("cheqpay", "default")]
    old = await db.lane_shares(conn, worker_id="old", lanes=lanes, ttl_s=6)
    assert old[lanes[0]].in_flight(3.0, serving=False) == 10  # alone: all of it at once
    new = await db.lane_shares(conn, worker_id="new", lanes=lanes, ttl_s=6)
    assert new[lanes[0]].in_flight(3.0, serving=False) == 0  # waits for "old" to shrink
    old = await db.lane_shares(conn, worker_id="old", lanes=lanes, ttl_s=6)
    assert old[lanes[0]].in_flight(3.0, serving=True) == 5
    await conn.execute("UPDATE linkworker_lane_workers SET joined_at = now() - interval '4 s'")
    new = await db.lane_shares(conn, worker_id="new", lanes=lanes, ttl_s=6)
    assert new[lanes[0]].in_flight(3.0, serving=False) == 5
    await db.leave_lanes(conn, worker_id="new")
    old = await db.lane_shares(conn, worker_id="old", lanes=lanes, ttl_s=6)
    assert old[lanes[0]].in_flight(3.0, serving=True) == 10
    # a worker not seen for the time to live is gone
    await db.lane_shares(conn, worker_id="dead", lanes=lanes, ttl_s=6)
    await conn.execute(
        "UPDATE linkworker_lane_workers SET alive_until = now() - interval '1 s'"
        " WHERE worker_id = 'dead'"
    )
    old = await db.lane_shares(conn, worker_id="old", lanes=lanes, ttl_s=6)
    assert old[lanes[0]].workers == 1


async def test_the_gate_follows_a_changed_limit() -> None:
    gate = InFlightGate(1)
    await gate.acquire()
    waiting = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.set_limit(2)  # a bigger part: the waiter goes at once
    await waiting
    gate.set_limit(1)
    gate.release()
    third = asyncio.ensure_future(gate.acquire())
    await asyncio.sleep(0)
    assert not third.done()  # 1 in use, limit 1
    gate.release()
    await third
    assert gate.used == 1


async def test_a_limit_lowered_in_the_table_holds_at_the_next_block(
    conn: asyncpg.Connection,
) -> None:
    await configure(conn, lane_settings())
    args = ("cheqpay", "default")
    first = await conn.fetchrow("SELECT * FROM linkworker_take_slots($1, $2, 1)", *args)
    assert first["rate_per_s"] == LIMIT
    await conn.execute("UPDATE linkworker_lanes SET rate_per_s = 10")  # an operator's change
    second = await conn.fetchrow("SELECT * FROM linkworker_take_slots($1, $2, 1)", *args)
    assert second["rate_per_s"] == 10
    assert second["spacing_s"] == pytest.approx(1.01 / 9.5)


async def test_an_adaptive_lane_cut_again_and_again_never_stalls(conn: asyncpg.Connection) -> None:
    await configure(conn, lane_settings(rate_per_s=20.0, burst=10, adaptive=True))
    args = ("cheqpay", "default")
    for _ in range(12):  # a 429 a second, twelve times: 20/s cut to 20 x 0.75^12 = 0.63/s
        await conn.execute(
            "UPDATE linkworker_lanes SET throttled_at = now() - interval '2 s',"
            " paused_until = now() - interval '1 s'"
        )
        await conn.fetchval("SELECT linkworker_lane_throttled($1, $2, 0)", *args)
    await conn.execute("UPDATE linkworker_lanes SET paused_until = '-infinity'")
    slots = await conn.fetchrow("SELECT * FROM linkworker_take_slots($1, $2, 3)", *args)
    # a burst of 10 at a rate under 1/s: the credit is cut to half the rate, the spacing finite
    rate = 20 * 0.75**12
    assert slots["rate_per_s"] == pytest.approx(rate, rel=0.05)  # it may have climbed a little
    assert slots["spacing_s"] == pytest.approx(1.01 / (slots["rate_per_s"] / 2))


async def test_a_burst_after_an_idle_spell_goes_at_once(
    conn: asyncpg.Connection, connections: list[PgConnection]
) -> None:
    settings = lane_settings(burst=5)
    await configure(conn, settings)
    stop = asyncio.Event()
    lane = budget(connections[0], settings, stop)
    asked = time.monotonic()
    for _ in range(5):
        await lane.acquire()
    # 4.5 slots of credit: the fifth waits at most one spacing (21 ms at 50/s)
    assert time.monotonic() - asked < 0.5
    assert lane.lapsed == 0  # the credit slots, dated before the grant, were not lapsed
    await lane.close()


async def test_a_pause_voids_the_slot_a_sender_is_waiting_for(
    conn: asyncpg.Connection, connections: list[PgConnection]
) -> None:
    settings = lane_settings(rate_per_s=2.0)  # slots half a second apart
    await configure(conn, settings)
    stop = asyncio.Event()
    first, second = budget(connections[0], settings, stop), budget(connections[1], settings, stop)
    await second.acquire()  # the lane's credit
    waiting = asyncio.ensure_future(second.acquire())  # sleeps towards its next slot
    await asyncio.sleep(0.05)
    first.throttled(1.0)
    await asyncio.gather(*first._background)
    paused_at = time.monotonic()
    second.paused_elsewhere()
    await waiting
    assert time.monotonic() - paused_at >= 0.9  # it went only after the pause
    await first.close()
    await second.close()


async def test_a_cancelled_wait_at_the_gate_is_forgotten() -> None:
    gate = InFlightGate(1)
    await gate.acquire()
    waiters = [asyncio.ensure_future(gate.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    gate.release()  # wakes past the cancelled waiter, to the next one
    await waiters[1]
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    assert gate.used == 1 and not gate._waiters
