"""The project's exception tree.

    LinkworkerError
    ├── ConfigError                 bad settings; the message names the key
    └── ProviderError               one provider call did not create a link
        ├── RetryableError          nothing was created; safe to send again (408, 503, refused)
        │   └── ThrottledError      429: the worker's fault, pauses the lane, costs no attempt
        ├── UnknownOutcomeError     the link may exist (timeout after sending, 500/502/504)
        └── PermanentError          fix the input or the credentials (other 4xx)
            ├── InvalidPayloadError the payload failed validation; no call was made
            └── ConflictError       the provider says this job's link exists already (an
                                    earlier attempt landed): look it up where the API allows

Every message is a sentence a person can act on and never holds a secret.
"""

from __future__ import annotations


class LinkworkerError(Exception):
    """Base of every error linkworker raises on purpose."""


class ConfigError(LinkworkerError):
    """Configuration is missing or wrong; raised at start, before any job is touched."""


class ProviderError(LinkworkerError):
    """A provider call that did not produce a link.

    `status` is the HTTP status when there was an answer, `code` the provider's own error code
    when its body carried one, and `response_text` the (bounded) body, kept on the row.
    """

    kind = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        response_text: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.response_text = response_text


class RetryableError(ProviderError):
    """Nothing was created; the same request may be sent again after `retry_after_s` (if given)."""

    kind = "retryable"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        status: int | None = None,
        code: str | None = None,
        response_text: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, response_text=response_text)
        self.retry_after_s = retry_after_s


class ThrottledError(RetryableError):
    """The provider answered 429: the lane pauses and the job keeps its attempt."""

    kind = "throttled"


class UnknownOutcomeError(ProviderError):
    """The request may have reached the provider and created a link we never heard about."""

    kind = "unknown"


class PermanentError(ProviderError):
    """Sending the same request again cannot succeed."""

    kind = "permanent"


class InvalidPayloadError(PermanentError):
    """The job's payload failed validation before any call was made."""

    kind = "invalid_payload"


class ConflictError(PermanentError):
    """The provider refused a create because the job's dedupe handle is taken (e.g. url_path)."""

    kind = "conflict"
