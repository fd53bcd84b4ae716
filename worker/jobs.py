"""The values that flow between the queue, the lanes and the provider adapters.

The queue module builds `Job`s from rows; adapters turn a job into a `ProviderRequest` and an
answer into a `LinkCreated` (or raise a `ProviderError`). None of these know about each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed row of `link_jobs`.

    `payload` is the row's jsonb as JSON text, decoded once, by the adapter's pydantic model.
    `attempt` is this claim's attempt number (1 for the first); it fences the write-back.
    """

    id: int
    provider: str
    account: str
    payload: str
    attempt: int
    max_attempts: int
    idempotency_key: str | None = None

    @property
    def dedupe_key(self) -> str:
        """A key that is the same on every attempt of this job (sent as `Idempotency-Key`)."""
        return self.idempotency_key or f"linkworker-job-{self.id}"


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """A fully built HTTP request; `path` is joined to the lane's `base_url`."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class LinkCreated:
    """A parsed success: the payable URL, the provider's id (if any) and the raw JSON body."""

    url: str
    external_id: str | None
    response_json: str
