"""When to try a job again: a pure function of the attempt, Retry-After and a random draw.

Exponential backoff (`base_s * 2**(attempt-1)`, capped at `cap_s`) with "equal jitter": half
the backoff is fixed and half is random, so retries of a failed batch spread out instead of
arriving together, yet never come back sooner than half the backoff. A provider's Retry-After
is a floor (it knows best), bounded by `max_retry_after_s` so a bogus header cannot park a job
for days.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_s: float = 1.0
    cap_s: float = 300.0
    max_retry_after_s: float = 3600.0

    def delay_s(
        self,
        attempt: int,
        retry_after_s: float | None = None,
        draw: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before attempt `attempt + 1`; `draw` returns a float in [0, 1)."""
        backoff = min(self.cap_s, self.base_s * 2.0 ** max(0, attempt - 1))
        jittered = backoff / 2 + draw() * backoff / 2
        if retry_after_s is None:
            return jittered
        return max(jittered, min(max(0.0, retry_after_s), self.max_retry_after_s))
