"""Retry timing is a pure function: checked with fixed random draws."""

from __future__ import annotations

from worker.retry import RetryPolicy


def test_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=8.0)
    assert [policy.delay_s(n, draw=lambda: 0.0) for n in (1, 2, 3, 4, 5, 6)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        4.0,
        4.0,
    ]
    assert [policy.delay_s(n, draw=lambda: 0.999999) for n in (1, 4, 9)] == [
        pytest_approx(1.0),
        pytest_approx(8.0),
        pytest_approx(8.0),
    ]


def test_retry_after_is_a_floor_within_bounds() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=8.0, max_retry_after_s=60)
    assert policy.delay_s(1, retry_after_s=30, draw=lambda: 0.5) == 30
    assert policy.delay_s(3, retry_after_s=0.1, draw=lambda: 0.0) == 2.0
    assert policy.delay_s(1, retry_after_s=86_400, draw=lambda: 0.0) == 60
    assert policy.delay_s(1, retry_after_s=-5, draw=lambda: 0.0) == 0.5


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, rel=1e-4)
