"""A per-lane circuit breaker, so a provider that is down is not hammered.

    closed ──(threshold consecutive failures)──▶ open ──(cooldown)──▶ half_open
      ▲                                            ▲                      │ one probe
      └──────────────── probe succeeds ────────────┼──── probe fails ─────┘ (cooldown doubles)

A failure is an answer that says the provider is unwell (5xx, timeout, connection error); a
4xx is a healthy provider refusing one request. Waiting behind an open breaker sends nothing,
so it costs no job an attempt. `clock` is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown_s: float = 2.0,
        max_cooldown_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.cooldown_s = cooldown_s
        self.opened_at = 0.0
        self.probing = False

    def wait_s(self) -> float:
        """Seconds before a request may be sent (0: now). In half-open, while the probe is out."""
        if self.state == OPEN:
            return max(0.0, self.opened_at + self.cooldown_s - self.clock())
        if self.state == HALF_OPEN and self.probing:
            return self.cooldown_s
        return 0.0

    def allow(self) -> bool:
        """May a request go now? In half-open, only one (the probe) until it is answered."""
        if self.state == OPEN and self.wait_s() == 0.0:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN:
            if self.probing:
                return False
            self.probing = True
        return self.state != OPEN

    def record_success(self) -> str | None:
        """The provider answered sanely; returns the new state if it changed."""
        self.failures = 0
        self.probing = False
        if self.state == CLOSED:
            return None
        self.state, self.cooldown_s = CLOSED, self.base_cooldown_s
        return CLOSED

    def record_failure(self) -> str | None:
        """The provider looked unwell; returns the new state if it changed."""
        self.failures += 1
        if self.state == HALF_OPEN:
            self.probing = False
            self.cooldown_s = min(self.max_cooldown_s, self.cooldown_s * 2)
            return self._open()
        if self.state == CLOSED and self.failures >= self.threshold:
            return self._open()
        return None

    def _open(self) -> str:
        self.state, self.opened_at = OPEN, self.clock()
        return OPEN
