"""The JSON log line: its fields, its timestamp, and values JSON cannot hold."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from worker.logs import UtcTimestamper, configure_logging, get_logger

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def logged(capsys: pytest.CaptureFixture[str], emit: Callable[[], None]) -> list[dict[str, Any]]:
    """The JSON lines `emit` writes at level info (configured here: capsys swaps stderr
    between a fixture's setup and the test)."""
    configure_logging("info", "json", ["cq-secret-123"])
    try:
        emit()
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()  # the configuration holds pytest's capture stream
    return [json.loads(line) for line in err.splitlines()]


def test_a_line_is_one_json_object_with_bound_and_given_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def emit() -> None:
        log = get_logger(provider="cheqpay", account="default")
        log.info("lane_progress", succeeded=7, failed=1)

    [line] = logged(capsys, emit)
    assert line == {
        "provider": "cheqpay",
        "account": "default",
        "succeeded": 7,
        "failed": 1,
        "event": "lane_progress",
        "level": "info",
        "timestamp": line["timestamp"],
    }
    assert ISO_UTC.fullmatch(line["timestamp"])


def test_values_json_cannot_hold_are_written_as_their_repr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    [line] = logged(
        capsys, lambda: get_logger().warning("odd_value", value={1}, text="key cq-secret-123")
    )
    assert line["value"] == "{1}"
    assert line["text"] == "key ***"


def test_lines_below_the_level_are_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    assert logged(capsys, lambda: get_logger().debug("job_detail", job_id=1)) == []


def test_the_timestamp_is_the_current_utc_time() -> None:
    stamp = UtcTimestamper()
    before = datetime.now(UTC)
    first = stamp(None, "info", {})["timestamp"]
    second = stamp(None, "info", {})["timestamp"]  # the same second's prefix, reused
    after = datetime.now(UTC)
    for value in (first, second):
        assert ISO_UTC.fullmatch(value)
        assert before.replace(microsecond=0) <= datetime.fromisoformat(value) <= after
    assert first <= second
