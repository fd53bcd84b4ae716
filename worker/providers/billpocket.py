"""Billpocket custom payment links (Mexico): `POST /v1/custom-link`.

The payload model follows the only documented request, the curl sample: no field is documented
as required, so only `amount` is (a link without an amount cannot be paid). `url_path` is our
dedupe handle: when the job has none we send `lw-<job id>`, so every attempt of a job asks for
the same path and a second link for it cannot silently appear.

Answers: 202 (200 and 201 accepted too) with `custom_link_path`, the full payable URL, and `id`.
Error bodies are not documented; we read `code`, `message` and an `errors` object of
`field: message` (or `field: [messages]`) when present, else quote the body. A 422 whose errors
say `url_path` is already taken is a ConflictError (code `url_path_taken`): the link is probably
ours, from an earlier attempt whose answer was lost. `lookup_request` and `parse_lookup` then
find it among the merchant's links (`GET /v1/custom-link?url_path=...`, a path inferred from the
docs' menu) and adopt it when its amount matches the job's, so a retry never makes a second link.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlencode

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from worker.errors import ConflictError, PermanentError, ProviderError
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
    link = _link(job)
    return common.json_request(PATH, job, _auth(billpocket), link)


def _link(job: Job) -> BillpocketLink:
    link = common.validate_payload(BillpocketLink, job.payload)
    if link.url_path is None:
        link.url_path = f"lw-{job.id}"  # assignment marks the field set, so it is dumped
    return link


def _auth(account: BillpocketAccount) -> dict[str, str]:
    return {
        "X-Api-Key": account.api_key.get_secret_value(),
        "BP-User-Token": account.user_token.get_secret_value(),
    }


def lookup_request(job: Job, account: LaneSettings) -> ProviderRequest:
    """The list request that finds the link holding this job's url_path (after a conflict)."""
    billpocket = common.require_account(NAME, account, BillpocketAccount)
    query = urlencode({"url_path": _link(job).url_path})
    headers = {"Accept": "application/json", **_auth(billpocket)}
    return ProviderRequest(method="GET", path=f"{PATH}?{query}", headers=headers, body=b"")


def parse_lookup(job: Job, status: int, headers: Mapping[str, str], body: bytes) -> LinkCreated:
    """Adopt the listed link with this job's url_path if its amount matches, else raise."""
    if status != 200:
        common.parse_answer(RULES, status, headers, body)  # raises the classified error
    link = _link(job)
    data = common.decode_json(common.decode_text(body))
    for entry in _entries(data):
        if entry.get("secondary_link") == link.url_path and common.is_link_url(
            entry.get("custom_link_path")
        ):
            return _adopt(link, entry)
    raise ConflictError(
        f"billpocket says url_path {link.url_path!r} is taken, but no link with it is listed: "
        "check the merchant's links before retrying",
        status=status,
        code="url_path_taken",
    )


def _entries(data: object) -> list[dict[str, Any]]:
    items = data.get("data") if isinstance(data, dict) else data
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _adopt(link: BillpocketLink, entry: dict[str, Any]) -> LinkCreated:
    if entry.get("amount") != link.amount:
        raise PermanentError(
            f"billpocket url_path {link.url_path!r} holds a link for amount "
            f"{entry.get('amount')!r}, not this job's {link.amount!r}: pick another url_path",
            code="url_path_conflict",
        )
    return LinkCreated(
        url=str(entry["custom_link_path"]),
        external_id=common.scalar(entry, "id"),
        response_json=json.dumps(entry, separators=(",", ":")),
    )


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
    taken = common.permanent(
        answer,
        "url_path_taken",
        message,
        "a link with this url_path already exists, possibly created by an earlier attempt of "
        "this job whose answer was lost: look it up among the merchant's links before retrying",
    )
    return ConflictError(
        taken.message, status=taken.status, code=taken.code, response_text=taken.response_text
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
