"""A lane in-process: an adapter that crashes fails its job only; the rate shaping arithmetic."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import pytest

from worker.budget import bucket_capacity, drain_rate
from worker.db import Outcome
from worker.jobs import Job, LinkCreated, ProviderRequest
from worker.lanes import Lane
from worker.metrics import Metrics
from worker.outcomes import OutcomeLadder
from worker.redaction import Scrubber
from worker.retry import RetryPolicy
from worker.settings import CheqpayAccount, LaneSettings


class CrashingAdapter:
    NAME = "cheqpay"

    def build_request(self, job: Job, account: LaneSettings) -> ProviderRequest:
        raise RuntimeError(f"adapter bug on job {job.id}")

    def parse_response(self, status: int, headers: Mapping[str, str], body: bytes) -> LinkCreated:
        raise AssertionError("never reached")


def make_lane(settings: LaneSettings) -> Lane:
    ladder = OutcomeLadder(RetryPolicy(), on_unknown_outcome="retry", scrub=Scrubber(["k" * 8]))
    return Lane(
        "cheqpay",
        "default",
        settings,
        CrashingAdapter(),
        ladder,
        prefetch_s=2,
        lease_s=20,
        claim_batch_size=200,
        metrics=Metrics(process_metrics=False).lane("cheqpay", "default"),
    )


async def test_a_crashing_adapter_fails_its_job_and_the_lane_goes_on() -> None:
    lane = make_lane(CheqpayAccount(base_url="http://127.0.0.1:9", api_key="k" * 8))
    recorded: list[Outcome] = []
    stop = asyncio.Event()
    lane.buffer.extend(Job(i, "cheqpay", "default", "{}", 1, 5) for i in (1, 2))
    # a breaker whose cooldown is over: a job that fails before any call must not take the
    # half-open probe, or the lane would wait for its answer forever
    lane.breaker.state, lane.breaker.opened_at = "open", -1e9

    def record(outcome: Outcome) -> None:
        recorded.append(outcome)
        if len(recorded) == 2:
            stop.set()

    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(lane.dispatch(session, record, stop), 5)
    assert [(o.job_id, o.state, o.error_kind) for o in recorded] == [
        (1, "failed", "internal"),
        (2, "failed", "internal"),
    ]
    assert "RuntimeError: adapter bug on job 1" in (recorded[0].error or "")
    assert lane.counts.failed == 2
    assert not lane.breaker.probing


@pytest.mark.parametrize(
    ("limit", "burst", "headroom", "expected"),
    [
        (200, 1, 0.01, 199.5 / 1.01),
        (200, 5, 0.0, 195.5),
        (20, 1, 0.01, 19.5 / 1.01),
        (4, 10, 0.0, 2.0),  # a burst past half the rate is cut to half the rate
        (0.5, 1, 0.0, 0.25),  # under one a second: never stalls
    ],
)
def test_drain_rate_keeps_every_one_second_window_under_the_limit(
    limit: float, burst: int, headroom: float, expected: float
) -> None:
    settings = CheqpayAccount(
        base_url="http://x", api_key="k", rate_per_s=limit, burst=burst, rate_headroom=headroom
    )
    rate = drain_rate(settings)
    assert rate == pytest.approx(expected)
    # capacity - 1 + rate: the most a one-second window can hold
    assert bucket_capacity(settings) - 1 + rate <= limit
