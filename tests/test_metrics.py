"""Metrics: the series each call moves, bounded labels, the queue snapshot on a real Postgres, and
the dashboard and alert rules naming only series the worker exposes."""

from __future__ import annotations

import asyncio
import json
import re

import asyncpg
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import ROOT
from worker.connection import PgConnection
from worker.metrics import (
    MAX_UNCONFIGURED_LANES,
    OTHER_ACCOUNT,
    LaneDepth,
    Metrics,
    queue_depth_snapshot,
    status_class,
    watch_queue,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "linkworker-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
BOUNDED_LABELS = {"provider", "account", "outcome", "status_class", "state", "le", "version"}
# the series a histogram or counter family exposes, by its type
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exposed_names(metrics: Metrics) -> set[str]:
    """Every series name the registry can expose, whether or not a child exists yet."""
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def test_lane_series_exist_at_zero_before_anything_happens() -> None:
    metrics = Metrics()
    metrics.lane("cheqpay", "acme")
    lane = {"provider": "cheqpay", "account": "acme"}
    for outcome in ("succeeded", "failed", "retried"):
        assert value(metrics, "linkworker_jobs_finished_total", **lane, outcome=outcome) == 0
    for name in ("throttled", "unknown_outcomes", "credentials_rejected"):
        assert value(metrics, f"linkworker_{name}_total", **lane) == 0
    count = "linkworker_provider_call_duration_seconds_count"
    assert value(metrics, count, **lane, status_class="transport") == 0
    assert value(metrics, "linkworker_lane_breaker_state", **lane, state="closed") == 1


def test_lane_calls_move_their_series() -> None:
    metrics = Metrics()
    lane = metrics.lane("kushki", "default")
    labels = {"provider": "kushki", "account": "default"}
    lane.job_finished("succeeded")
    lane.job_finished("succeeded")
    lane.job_finished("retried")
    lane.call_finished("2xx", 0.2)
    lane.call_finished("5xx", 3.0)
    lane.throttled(1.5)
    lane.throttled(0.5)
    lane.unknown_outcome()
    lane.credentials_rejected()
    lane.set_in_flight(4)
    lane.set_max_in_flight(50)
    lane.set_rate_limit(20.0)

    assert value(metrics, "linkworker_jobs_finished_total", **labels, outcome="succeeded") == 2
    assert value(metrics, "linkworker_jobs_finished_total", **labels, outcome="retried") == 1
    assert value(metrics, "linkworker_jobs_finished_total", **labels, outcome="failed") == 0
    histogram = "linkworker_provider_call_duration_seconds"
    assert value(metrics, f"{histogram}_count", **labels, status_class="2xx") == 1
    assert value(metrics, f"{histogram}_sum", **labels, status_class="5xx") == 3.0
    assert value(metrics, f"{histogram}_bucket", **labels, status_class="2xx", le="0.25") == 1
    assert value(metrics, f"{histogram}_bucket", **labels, status_class="2xx", le="0.1") == 0
    assert value(metrics, "linkworker_throttled_total", **labels) == 2
    assert value(metrics, "linkworker_throttle_retry_after_seconds_total", **labels) == 2.0
    assert value(metrics, "linkworker_unknown_outcomes_total", **labels) == 1
    assert value(metrics, "linkworker_credentials_rejected_total", **labels) == 1
    assert value(metrics, "linkworker_lane_in_flight", **labels) == 4
    assert value(metrics, "linkworker_lane_max_in_flight", **labels) == 50
    assert value(metrics, "linkworker_lane_rate_limit_requests_per_second", **labels) == 20


def test_breaker_state_is_one_state_at_a_time() -> None:
    metrics = Metrics()
    lane = metrics.lane("billpocket", "default")
    labels = {"provider": "billpocket", "account": "default"}
    lane.set_breaker_state("open")
    states = {
        state: value(metrics, "linkworker_lane_breaker_state", **labels, state=state)
        for state in ("closed", "open", "half_open")
    }
    assert states == {"closed": 0, "open": 1, "half_open": 0}
    lane.set_breaker_state("half_open")
    assert value(metrics, "linkworker_lane_breaker_state", **labels, state="half_open") == 1
    assert value(metrics, "linkworker_lane_breaker_state", **labels, state="open") == 0
    with pytest.raises(ValueError, match="broken"):
        lane.set_breaker_state("broken")


def test_lane_is_resolved_once() -> None:
    metrics = Metrics()
    assert metrics.lane("cheqpay", "default") is metrics.lane("cheqpay", "default")
    assert metrics.lane("cheqpay", "default") is not metrics.lane("cheqpay", "acme")


def test_worker_level_calls() -> None:
    metrics = Metrics()
    metrics.leases_rescued(3)
    metrics.leases_rescued(0)
    metrics.write_back(rows=500, fenced=2, seconds=0.004)
    metrics.write_back(rows=10, fenced=0, seconds=0.002)
    metrics.build_info("1.2.3")
    metrics.build_info("1.2.4")
    assert value(metrics, "linkworker_leases_rescued_total") == 3
    assert value(metrics, "linkworker_write_back_rows_total") == 510
    assert value(metrics, "linkworker_write_back_fenced_rows_total") == 2
    assert value(metrics, "linkworker_write_back_duration_seconds_count") == 2
    assert value(metrics, "linkworker_build_info", version="1.2.4") == 1
    assert value(metrics, "linkworker_build_info", version="1.2.3") is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [(None, "transport"), (201, "2xx"), (302, "3xx"), (429, "4xx"), (503, "5xx"), (999, "5xx")],
)
def test_status_class(status: int | None, expected: str) -> None:
    assert status_class(status) == expected


def test_queue_depth_zero_fills_configured_lanes_and_drops_vanished_ones() -> None:
    metrics = Metrics()
    metrics.lane("cheqpay", "default")
    metrics.queue_depth(
        [
            ("cheqpay", "default", "pending", 7),
            ("kushki", "stranger", "pending", 2),  # in the table, not configured here
        ]
    )
    jobs = "linkworker_queue_jobs"
    assert value(metrics, jobs, provider="cheqpay", account="default", state="pending") == 7
    assert value(metrics, jobs, provider="cheqpay", account="default", state="running") == 0
    assert value(metrics, jobs, provider="kushki", account="stranger", state="pending") == 2

    metrics.queue_depth([])
    assert value(metrics, jobs, provider="cheqpay", account="default", state="pending") == 0
    assert value(metrics, jobs, provider="kushki", account="stranger", state="pending") is None


def test_oldest_pending_age_zero_fills_and_drops_like_queue_depth() -> None:
    metrics = Metrics()
    metrics.lane("kushki", "default")
    age = "linkworker_queue_oldest_pending_age_seconds"
    metrics.oldest_pending_age([("kushki", "default", 12.5), ("cheqpay", "old", 99.0)])
    assert value(metrics, age, provider="kushki", account="default") == 12.5
    assert value(metrics, age, provider="cheqpay", account="old") == 99.0
    metrics.oldest_pending_age([])
    assert value(metrics, age, provider="kushki", account="default") == 0
    assert value(metrics, age, provider="cheqpay", account="old") is None


def test_unconfigured_lanes_past_the_cap_are_folded_into_one_series() -> None:
    metrics = Metrics()
    extra = MAX_UNCONFIGURED_LANES + 5
    accounts = [f"producer-made-{i:03d}" for i in range(extra)]
    metrics.queue_depth([("billpocket", account, "pending", 1) for account in accounts])
    metrics.oldest_pending_age(
        [("billpocket", account, float(i)) for i, account in enumerate(accounts)]
    )
    depth = [s for s in samples(metrics) if s.name == "linkworker_queue_jobs"]
    assert len(depth) == MAX_UNCONFIGURED_LANES + 1
    other = {"provider": "billpocket", "account": OTHER_ACCOUNT}
    assert value(metrics, "linkworker_queue_jobs", **other, state="pending") == 5
    age = "linkworker_queue_oldest_pending_age_seconds"
    assert value(metrics, age, **other) == float(extra - 1)


def test_every_label_is_bounded() -> None:
    metrics = Metrics()
    lane = metrics.lane("cheqpay", "acme")
    lane.job_finished("failed")
    lane.call_finished("transport", 30.0)
    metrics.queue_depth([("cheqpay", "acme", "running", 1)])
    metrics.oldest_pending_age([("cheqpay", "acme", 1.0)])
    metrics.write_back(rows=1, fenced=0, seconds=0.001)
    metrics.build_info("0.1.0")
    ours = [s for s in samples(metrics) if s.name.startswith("linkworker_")]
    assert ours
    for sample in ours:
        assert set(sample.labels) <= BOUNDED_LABELS, sample


def test_render_parses_as_prometheus_text() -> None:
    metrics = Metrics()
    metrics.lane("billpocket", "default").job_finished("succeeded")
    text = metrics.render().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    jobs = families["linkworker_jobs_finished"]
    assert jobs.type == "counter"
    succeeded = [s for s in jobs.samples if s.labels.get("outcome") == "succeeded"]
    assert [s.value for s in succeeded if s.name.endswith("_total")] == [1.0]
    assert families["linkworker_provider_call_duration_seconds"].type == "histogram"
    assert "process_resident_memory_bytes" in text  # process metrics ride along


def test_two_workers_in_one_process_do_not_collide_nor_touch_the_global_registry() -> None:
    first, second = Metrics(), Metrics()
    first.lane("kushki", "default").job_finished("failed")
    second.lane("kushki", "default")
    labels = {"provider": "kushki", "account": "default", "outcome": "failed"}
    assert value(first, "linkworker_jobs_finished_total", **labels) == 1
    assert value(second, "linkworker_jobs_finished_total", **labels) == 0
    assert REGISTRY.get_sample_value("linkworker_jobs_finished_total", labels) is None


async def insert(conn: asyncpg.Connection, provider: str, account: str, **columns: str) -> None:
    """A job whose columns are SQL expressions (run_at, state...)."""
    names = ["provider", "account", "payload", *columns]
    values = ["$1", "$2", "'{}'::jsonb", *columns.values()]
    sql = f"INSERT INTO link_jobs ({', '.join(names)}) VALUES ({', '.join(values)})"
    await conn.execute(sql, provider, account)


async def test_queue_depth_snapshot_counts_unfinished_jobs_per_lane(
    conn: asyncpg.Connection,
) -> None:
    for _ in range(3):
        await insert(conn, "cheqpay", "default")
    await insert(conn, "cheqpay", "default", run_at="now() - interval '90 seconds'")
    await insert(conn, "cheqpay", "default", run_at="now() + interval '1 hour'")
    await insert(conn, "cheqpay", "acme", state="'running'", attempts="1")
    await insert(conn, "kushki", "default", state="'succeeded'")
    await insert(conn, "kushki", "default", state="'failed'")

    depth, ages = await queue_depth_snapshot(conn)

    assert sorted(depth) == [
        LaneDepth("cheqpay", "acme", "pending", 0),
        LaneDepth("cheqpay", "acme", "running", 1),
        LaneDepth("cheqpay", "acme", "scheduled", 0),
        LaneDepth("cheqpay", "default", "pending", 4),
        LaneDepth("cheqpay", "default", "running", 0),
        LaneDepth("cheqpay", "default", "scheduled", 1),
    ]
    by_lane = {(age.provider, age.account): age.seconds for age in ages}
    assert by_lane.keys() == {("cheqpay", "default"), ("cheqpay", "acme")}
    assert 90 <= by_lane["cheqpay", "default"] < 90 + 60
    assert by_lane["cheqpay", "acme"] == 0


async def test_queue_depth_snapshot_of_an_empty_queue(conn: asyncpg.Connection) -> None:
    await insert(conn, "billpocket", "default", state="'succeeded'")
    assert await queue_depth_snapshot(conn) == ([], [])


async def test_watch_queue_sets_the_gauges_and_removes_stale_lanes(
    conn: asyncpg.Connection, database_url: str
) -> None:
    metrics = Metrics()
    metrics.lane("billpocket", "default")
    await insert(conn, "kushki", "gone-soon", run_at="now() - interval '10 seconds'")
    stop = asyncio.Event()
    stop.set()  # one snapshot, then return
    pg = PgConnection(database_url, "metrics")
    try:
        await watch_queue(metrics, pg, stop)
        stranger = {"provider": "kushki", "account": "gone-soon"}
        assert value(metrics, "linkworker_queue_jobs", **stranger, state="pending") == 1
        age = value(metrics, "linkworker_queue_oldest_pending_age_seconds", **stranger)
        assert age is not None and age >= 10
        assert value(metrics, "linkworker_queue_snapshot_timestamp_seconds") is not None

        await conn.execute("UPDATE link_jobs SET state = 'succeeded'")
        await watch_queue(metrics, pg, stop)
    finally:
        await pg.close()
    assert value(metrics, "linkworker_queue_jobs", **stranger, state="pending") is None
    assert value(metrics, "linkworker_queue_oldest_pending_age_seconds", **stranger) is None
    configured = {"provider": "billpocket", "account": "default"}
    assert value(metrics, "linkworker_queue_jobs", **configured, state="pending") == 0


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\blinkworker_[a-z0-9_]+", text))


def test_dashboard_panels_query_only_exposed_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    assert all(panel["targets"] for panel in panels)
    assert exprs and all(referenced_names(expr) for expr in exprs)
    unknown = referenced_names(DASHBOARD.read_text()) - exposed_names(Metrics())
    assert not unknown, f"the dashboard names series the worker does not expose: {unknown}"


def test_dashboard_covers_every_lane_metric() -> None:
    used = referenced_names(DASHBOARD.read_text())
    for family in ("jobs_finished", "throttled", "unknown_outcomes", "credentials_rejected"):
        assert f"linkworker_{family}_total" in used
    for gauge in ("lane_in_flight", "lane_max_in_flight", "lane_breaker_state", "queue_jobs"):
        assert f"linkworker_{gauge}" in used
    assert "linkworker_provider_call_duration_seconds_bucket" in used
    assert "linkworker_queue_oldest_pending_age_seconds" in used
    assert "linkworker_leases_rescued_total" in used


def test_alert_rules_name_only_exposed_series() -> None:
    text = ALERTS.read_text()
    unknown = referenced_names(text) - exposed_names(Metrics())
    assert not unknown, f"alerts.yml names series the worker does not expose: {unknown}"


def test_alert_rules_load_and_cover_the_operators_questions() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML checks the rules' structure")
    document = yaml.safe_load(ALERTS.read_text())
    rules = [rule for group in document["groups"] for rule in group["rules"]]
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        queried = referenced_names(rule["expr"]) or re.findall(r"\bup\{", rule["expr"])
        assert queried, f"{rule['alert']} queries nothing the worker (or its scrape) exposes"
    alerts = {rule["alert"] for rule in rules}
    assert {
        "LinkworkerDown",
        "LinkworkerLaneFailing",
        "LinkworkerQueueNotDraining",
        "LinkworkerCredentialsRejected",
        "LinkworkerOldestPendingTooOld",
    } <= alerts


def samples(metrics: Metrics) -> list[Sample]:
    return [sample for family in metrics.registry.collect() for sample in family.samples]
