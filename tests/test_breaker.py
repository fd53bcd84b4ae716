"""The circuit breaker's states, driven by an injected clock."""

from __future__ import annotations

from worker.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(threshold=3, clock=Clock())
    assert breaker.record_failure() is None and breaker.record_failure() is None
    assert breaker.record_success() is None  # a success resets the count
    assert [breaker.record_failure() for _ in range(3)] == [None, None, OPEN]
    assert not breaker.allow() and breaker.wait_s() == 2.0


def test_half_open_lets_one_probe_then_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown_s=2.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.5
    assert not breaker.allow() and breaker.wait_s() == 0.5
    clock.now += 0.5
    assert breaker.allow() and breaker.state == HALF_OPEN
    assert not breaker.allow()  # only the probe
    assert breaker.record_success() == CLOSED
    assert breaker.allow() and breaker.allow()


def test_failed_probe_reopens_with_a_longer_cooldown_up_to_the_cap() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=1, cooldown_s=2.0, max_cooldown_s=5.0, clock=clock)
    breaker.record_failure()
    for expected in (4.0, 5.0, 5.0):
        clock.now += breaker.wait_s()
        assert breaker.allow()
        assert breaker.record_failure() == OPEN
        assert breaker.wait_s() == expected
