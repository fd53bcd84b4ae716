"""Billpocket custom payment links (Mexico): `POST /v1/custom-link`.

The payload model follows the only documented request, the curl sample: no field is documented
as required, so only `amount` is (a link without an amount cannot be paid). `url_path` is our
dedupe handle: when the job has none we send `lw-<job id>`, so every attempt of a job asks for
the same path and a second link for it cannot silently appear.

Answers: 202 (200 and 201 accepted too) with `custom_link_path`, the full payable URL, and `id`.
Error bodies are not documented; we read `code`, `message` and an `errors` object of
`field: message` (or `field: [messages]`) when present, else quote the body. A 422 whose errors
say `url_path` is already taken is a PermanentError with code `url_path_taken` for now: the link
may be ours from an earlier attempt (reconciling it as a success is a later change).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from worker.errors import ProviderError
from worker.jobs import Job, LinkCreated, ProviderRequest
from worker.providers import common
from worker.settings import BillpocketAccount, LaneSettings

NAME = "billpocket"
PATH = "/v1/custom-link"


def _months_as_text(value: object) -> object:
    # The request sample sends months as "12" and the response echoes 12: accept both, send text.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class BillpocketRate(BaseModel):
    """An instalment option, e.g. 12 months interest-free: {"months": "12", "type": "MSI"}."""

    model_config = common.STRICT

    months: Annotated[str, BeforeValidator(_months_as_text), Field(pattern=r"^[0-9]{1,3}$")]
    type: str = Field(min_length=1)


class BillpocketLink(BaseModel):
    """The body of a custom-link create, spelled as Billpocket spells it (snake_case).

    Unknown keys are refused, so a typo such as `ammount` fails here rather than at Billpocket.
    `expired_at` is sent as written; the docs show no UTC offset and do not say which zone.
    """

    model_config = common.STRICT

    url_path: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,100}$")
    expired_at: str | None = None
    amount: Annotated[common.Number, Field(gt=0)]
    type: int | None = None
    description: str | None = None
    rates: list[BillpocketRate] | None = None
    is_fixed_term: bool | None = None

    @field_validator("expired_at")
    @classmethod
    def _expired_at_is_a_datetime(cls, value: str | None) -> str | None:
        return common.check_iso_datetime(value, need_offset=False)


def build_request(job: Job, account: LaneSettings) -> ProviderRequest:
    """Validate the job's payload and build the create request (see the module docstring)."""
    billpocket = common.require_account(NAME, account, BillpocketAccount)
    link = common.validate_payload(BillpocketLink, job.payload)
    if link.url_path is None:
        link.url_path = f"lw-{job.id}"  # assignment marks the field set, so it is dumped
    auth = {
        "X-Api-Key": billpocket.api_key.get_secret_value(),
        "BP-User-Token": billpocket.user_token.get_secret_value(),
    }
    return common.json_request(PATH, job, auth, link)


def parse_response(status: int, headers: Mapping[str, str], body: bytes) -> LinkCreated:
    """A LinkCreated for a 2xx carrying `custom_link_path`, else the ProviderError to act on."""
    return common.parse_answer(RULES, status, headers, body)


def _error_fields(data: object) -> common.ErrorFields:
    message = common.scalar(data, "message")
    field_errors = _field_errors(data)
    if field_errors:
        message = f"{message} ({field_errors})" if message else field_errors
    return common.scalar(data, "code"), message


def _field_errors(data: object) -> str:
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, dict):
        return ""
    return "; ".join(f"{field}: {_as_text(problem)}" for field, problem in errors.items())


def _as_text(problem: object) -> str:
    if isinstance(problem, list):
        return ", ".join(str(item) for item in problem)
    return str(problem)


_TAKEN = re.compile(r"taken|exist|already|unique|duplicate|in use", re.IGNORECASE)


def _special(answer: common.Answer, code: str | None, message: str | None) -> ProviderError | None:
    if answer.status != 422 or not _url_path_taken(answer.data):
        return None
    return common.permanent(
        answer,
        "url_path_taken",
        message,
        "a link with this url_path already exists, possibly created by an earlier attempt of "
        "this job whose answer was lost: look it up among the merchant's links before retrying",
    )


def _url_path_taken(data: object) -> bool:
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, dict) or "url_path" not in errors:
        return False
    return bool(_TAKEN.search(_as_text(errors["url_path"])))


def _external_id(data: dict[str, Any], url: str) -> str | None:
    return common.scalar(data, "id")


RULES = common.ResponseRules(
    provider=NAME,
    success_statuses=frozenset({200, 201, 202}),
    url_field="custom_link_path",
    credential_keys=("api_key", "user_token"),
    error_fields=_error_fields,
    external_id=_external_id,
    special=_special,
)
