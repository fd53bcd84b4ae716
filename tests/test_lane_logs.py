"""What a lane logs per outcome: successes at debug plus a progress line, failures per job."""

from __future__ import annotations

import structlog

from worker.db import Outcome
from worker.jobs import Job, LinkCreated
from worker.lanes import Lane
from worker.metrics import Metrics
from worker.outcomes import OutcomeLadder
from worker.providers import cheqpay
from worker.redaction import Scrubber
from worker.retry import RetryPolicy
from worker.settings import CheqpayAccount

CREATED = LinkCreated(url="https://pay.example/l/1", external_id="l1", response_json="{}")


def make_lane() -> Lane:
    ladder = OutcomeLadder(RetryPolicy(), on_unknown_outcome="retry", scrub=Scrubber([]))
    return Lane(
        "cheqpay",
        "default",
        CheqpayAccount(base_url="http://127.0.0.1:9", api_key="k" * 8),
        cheqpay,
        ladder,
        prefetch_s=2,
        lease_s=20,
        claim_batch_size=200,
        metrics=Metrics(process_metrics=False).lane("cheqpay", "default"),
    )


def finish(lane: Lane, job_id: int, outcome: Outcome) -> None:
    job = Job(job_id, "cheqpay", "default", "{}", 1, 5)
    lane._finish(job, outcome, lambda _outcome: None, 0.0)


def test_successes_log_at_debug_with_a_progress_line_for_the_first_and_every_1000th() -> None:
    lane = make_lane()
    with structlog.testing.capture_logs() as logs:
        for job_id in range(1, 2001):
            job = Job(job_id, "cheqpay", "default", "{}", 1, 5)
            finish(lane, job_id, lane.ladder.success(job, CREATED))
    per_job = [entry for entry in logs if entry["event"] == "job_succeeded"]
    assert len(per_job) == 2000
    assert {entry["log_level"] for entry in per_job} == {"debug"}
    progress = [entry for entry in logs if entry["log_level"] != "debug"]
    assert [(e["event"], e["log_level"], e["succeeded"]) for e in progress] == [
        ("lane_progress", "info", 1),
        ("lane_progress", "info", 1000),
        ("lane_progress", "info", 2000),
    ]
    assert progress[-1] | {"succeeded": 0} == {
        "provider": "cheqpay",
        "account": "default",
        "event": "lane_progress",
        "log_level": "info",
        "succeeded": 0,
        "failed": 0,
        "retried": 0,
        "throttled": 0,
        "unknown": 0,
    }


def test_failures_and_retries_stay_one_line_per_job() -> None:
    lane = make_lane()
    with structlog.testing.capture_logs() as logs:
        finish(lane, 1, Outcome(1, 1, "failed", error="bad payload", error_kind="invalid"))
        finish(lane, 2, Outcome(2, 1, "pending", error="503", error_kind="retryable"))
    assert [(e["event"], e["log_level"], e["job_id"]) for e in logs] == [
        ("job_failed", "warning", 1),
        ("job_retry_scheduled", "info", 2),
    ]
