"""Provider adapters: one pure module per provider, looked up by the queue's `provider` name.

An adapter knows its provider's API and nothing of the queue or of HTTP clients:
`build_request(job, account)` validates the payload and builds the request (raising
InvalidPayloadError, with the bad field named, before any call), and
`parse_response(status, headers, body)` turns an answer into a LinkCreated or raises the
ProviderError subclass that says what may be done next (see worker.errors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from worker.jobs import Job, LinkCreated, ProviderRequest
from worker.providers import billpocket, cheqpay, kushki
from worker.settings import LaneSettings


class ProviderAdapter(Protocol):
    NAME: str

    def build_request(self, job: Job, account: LaneSettings) -> ProviderRequest: ...

    def parse_response(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> LinkCreated: ...


class LinkLookup(Protocol):
    """A provider whose API can find the link an earlier attempt created (after a conflict)."""

    def lookup_request(self, job: Job, account: LaneSettings) -> ProviderRequest: ...

    def parse_lookup(
        self, job: Job, status: int, headers: Mapping[str, str], body: bytes
    ) -> LinkCreated: ...


ADAPTERS: Mapping[str, ProviderAdapter] = {
    module.NAME: module  # a module satisfies the protocol structurally
    for module in (billpocket, cheqpay, kushki)
}
PROVIDER_NAMES: tuple[str, ...] = tuple(ADAPTERS)
# Only Billpocket can list links by our dedupe handle; Cheqpay and Kushki have no such lookup.
LOOKUPS: Mapping[str, LinkLookup] = {billpocket.NAME: billpocket}
