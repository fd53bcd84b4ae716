"""The outcome ladder: every way an attempt can end, mapped to the one write for its row.

    LinkCreated            -> succeeded, with url, external_id and the provider's JSON
    PermanentError         -> failed at once, with the provider's code and message
    UnknownOutcomeError    -> on_unknown_outcome "retry": again later, counted on the row;
                              "fail": failed, so a person checks the provider first
    RetryableError         -> again after backoff (or Retry-After), until attempts run out
    anything else          -> failed, as a bug of ours (the traceback goes to the log)

(ThrottledError never reaches here: the lane pauses and sends the job again, attempt unused.)
Error text is scrubbed of every configured secret before it is stored or logged.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from worker.db import Outcome
from worker.errors import PermanentError, ProviderError, RetryableError, UnknownOutcomeError
from worker.jobs import Job, LinkCreated
from worker.redaction import Scrubber
from worker.retry import RetryPolicy

MAX_ERROR_CHARS = 2000


class OutcomeLadder:
    """Builds the Outcome of one attempt; one instance per lane."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        on_unknown_outcome: str,
        scrub: Scrubber,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.on_unknown_outcome = on_unknown_outcome
        self.scrub = scrub
        self.draw = draw

    def success(self, job: Job, created: LinkCreated) -> Outcome:
        return Outcome(
            job.id,
            job.attempt,
            "succeeded",
            url=created.url,
            external_id=created.external_id,
            response_json=created.response_json,
        )

    def failure(self, job: Job, error: ProviderError) -> Outcome:
        """The write for a provider error (never a ThrottledError)."""
        message = self._text(error.message)
        if isinstance(error, PermanentError):
            return self._failed(job, message, error.kind)
        if isinstance(error, UnknownOutcomeError):
            if self.on_unknown_outcome == "fail":
                text = f"{message} (on_unknown_outcome = fail: check the provider before retrying)"
                return self._failed(job, text, error.kind, unknown=True)
            return self._again(job, message, error.kind, None, unknown=True)
        retry_after = error.retry_after_s if isinstance(error, RetryableError) else None
        return self._again(job, message, error.kind, retry_after, unknown=False)

    def unexpected(self, job: Job, exc: BaseException, *, sent: bool) -> Outcome:
        """A bug of ours (or an adapter's): fail the job with what happened, keep the worker up.

        After the request was sent the link may exist: the unknown-outcome policy decides.
        """
        message = f"internal error in linkworker: {type(exc).__name__}: {exc}"
        if sent:
            return self.failure(job, UnknownOutcomeError(message))
        return self._failed(job, self._text(message), "internal")

    def interrupted(self, job: Job) -> Outcome:
        """The worker stopped while this job's request was in flight: the outcome is unknown."""
        error = UnknownOutcomeError(
            "the worker stopped while the request was in flight; the link may exist"
        )
        error.kind = "interrupted"
        return self.failure(job, error)

    def _again(
        self, job: Job, message: str, kind: str, retry_after_s: float | None, *, unknown: bool
    ) -> Outcome:
        if job.attempt >= job.max_attempts:
            text = f"gave up after {job.attempt} attempts; last error: {message}"
            return self._failed(job, text, kind, unknown=unknown)
        delay = self.policy.delay_s(job.attempt, retry_after_s, self.draw)
        return Outcome(
            job.id,
            job.attempt,
            "pending",
            error=message,
            error_kind=kind,
            retry_in_s=delay,
            unknown_outcome=unknown,
        )

    def _failed(self, job: Job, message: str, kind: str, *, unknown: bool = False) -> Outcome:
        return Outcome(
            job.id, job.attempt, "failed", error=message, error_kind=kind, unknown_outcome=unknown
        )

    def _text(self, message: str) -> str:
        return self.scrub(message)[:MAX_ERROR_CHARS]
