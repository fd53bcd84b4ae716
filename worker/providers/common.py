"""What the three provider adapters share: payload validation, request framing and answer triage.

Building: `validate_payload` turns a job's JSON text into the provider's pydantic model (raising
InvalidPayloadError that names every bad field, never its value) and `json_request` encodes the
model once and frames it with the headers every provider gets.

Parsing: `parse_answer` decodes a body without ever raising, hands a 2xx to the provider's
success rule and anything else to `classify`, after the provider's special cases had their say:

    status                     class                    why
    2xx with a usable URL      LinkCreated
    other 2xx                  UnknownOutcomeError      something happened; we cannot see what
    401, 403                   PermanentError           the lane's credentials are wrong
    408                        RetryableError           the provider gave up before processing
    429                        ThrottledError           the lane is too fast; Retry-After honoured
    other 4xx                  PermanentError           the provider's code and message say why
    503                        RetryableError           unavailable before processing
    500, 502, 504, other 5xx   UnknownOutcomeError      may have failed after saving the link
    anything else (1xx, 3xx)   UnknownOutcomeError      not an answer a create should get; a
                                                        redirect usually means a wrong base_url

Everything here is pure: no I/O, no clock. `Retry-After` as an HTTP-date needs "now", so
`parse_answer` honours only delta-seconds; a caller holding a clock may call
`retry_after_seconds(value, now)` itself.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, TypeGuard, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, GetPydanticSchema, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError, core_schema

from worker.errors import (
    InvalidPayloadError,
    PermanentError,
    ProviderError,
    RetryableError,
    ThrottledError,
    UnknownOutcomeError,
)
from worker.jobs import Job, LinkCreated, ProviderRequest

RESPONSE_TEXT_LIMIT = 2000
PAYLOAD_MESSAGE_LIMIT = 500
_CODE_LIMIT = 100
_DETAIL_LIMIT = 300
_EXCERPT_LIMIT = 200

# --- payload models ---------------------------------------------------------------------------

# Strict, so the body we send holds exactly the JSON types the job gave: lax mode would turn
# "55" into 55 or "yes" into true, and the provider would get something nobody wrote.
STRICT = ConfigDict(strict=True, extra="forbid")
CAMEL_STRICT = ConfigDict(strict=True, extra="forbid", alias_generator=to_camel)
# For nested objects documented only by a sample: check what we know, pass the rest through.
CAMEL_OPEN = ConfigDict(strict=True, extra="allow", alias_generator=to_camel)

# A JSON number kept as it came: an int stays an int (55, not 55.0) and a float a float.
# One union with one error message, so a bad value reads "Input should be a valid number"
# once instead of once per union member; NaN and Infinity are refused.
Number = Annotated[
    int | float,
    GetPydanticSchema(
        lambda _source, _handler: core_schema.union_schema(
            [
                core_schema.int_schema(strict=True),
                core_schema.float_schema(strict=True, allow_inf_nan=False),
            ],
            custom_error_type="number_type",
            custom_error_message="Input should be a valid number",
        )
    ),
]


def check_https(value: str | None) -> str | None:
    """Field validator body: an image URL the payer's browser will load must be https."""
    if value is not None and not value.startswith("https://"):
        raise PydanticCustomError("https_url", "URL should start with https://")
    return value


def check_iso_datetime(value: str | None, *, need_offset: bool) -> str | None:
    """Field validator body: an ISO 8601 date-time, kept as written (only its shape is checked)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError(
            "datetime_format", "Input should be an ISO 8601 date-time like 2028-05-22T15:20:34"
        ) from None
    if need_offset and parsed.tzinfo is None:
        raise PydanticCustomError(
            "datetime_offset", "Date-time should carry a UTC offset, e.g. 2028-05-22T15:20:34Z"
        )
    return value


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_payload(model: type[ModelT], payload: str) -> ModelT:
    """Validate a job's JSON text straight into `model` (no intermediate json.loads)."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise InvalidPayloadError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One bounded sentence naming every bad field by its path; input values are never shown."""
    problems = [_describe_problem(item) for item in exc.errors(include_input=False)]
    return payload_problems(problems)


def payload_problems(problems: list[str]) -> str:
    """'payload is invalid: a: ...; b: ...', cut near PAYLOAD_MESSAGE_LIMIT, counting the rest."""
    text = "payload is invalid: " + (problems[0] if problems else "no detail given")
    for shown, problem in enumerate(problems[1:], start=1):
        if len(text) + 2 + len(problem) > PAYLOAD_MESSAGE_LIMIT:
            return f"{text}; and {len(problems) - shown} more problem(s)"
        text += "; " + problem
    return text


def _describe_problem(item: Any) -> str:
    message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
    path = field_path(item["loc"])
    return shorten(f"{path}: {message}" if path else message, _DETAIL_LIMIT)


def field_path(loc: Iterable[int | str]) -> str:
    """('products', 0, 'price') -> 'products[0].price'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path


def require_account(provider: str, account: object, expected: type[ModelT]) -> ModelT:
    """Narrow the lane settings to the provider's account class; a mismatch is a wiring bug."""
    if not isinstance(account, expected):
        raise TypeError(f"{provider} needs a {expected.__name__}, got {type(account).__name__}")
    return account


_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def json_request(
    path: str, job: Job, auth_headers: Mapping[str, str], payload: BaseModel
) -> ProviderRequest:
    """A POST of `payload`, encoded once in the provider's spelling, with the common headers.

    exclude_unset keeps the body to what the job wrote plus the fields the adapter filled.
    """
    headers = {**_JSON_HEADERS, **auth_headers, "Idempotency-Key": job.dedupe_key}
    body = payload.model_dump_json(by_alias=True, exclude_unset=True).encode()
    return ProviderRequest(method="POST", path=path, headers=headers, body=body)


# --- answers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One provider answer, decoded once: `data` is the JSON body, or None when it is not JSON."""

    provider: str
    status: int
    headers: Mapping[str, str]
    text: str
    data: object


ErrorFields = tuple[str | None, str | None]


@dataclass(frozen=True, slots=True)
class ResponseRules:
    """What one provider contributes to `parse_answer`.

    `error_fields` pulls (code, message) out of a decoded error body (any JSON value).
    `external_id` picks the provider's id out of a success body, given the link URL.
    `special` may return an error for an answer the generic ladder would get wrong, else None.
    `credential_keys` are the account's config keys, named when the provider rejects them.
    """

    provider: str
    success_statuses: frozenset[int]
    url_field: str
    credential_keys: tuple[str, ...]
    error_fields: Callable[[object], ErrorFields]
    external_id: Callable[[dict[str, Any], str], str | None]
    special: Callable[[Answer, str | None, str | None], ProviderError | None] | None = None


def parse_answer(
    rules: ResponseRules, status: int, headers: Mapping[str, str], body: bytes
) -> LinkCreated:
    """Turn an answer into a LinkCreated or raise the ProviderError that says what to do next."""
    text = decode_text(body)
    answer = Answer(rules.provider, status, headers, text, decode_json(text))
    if 200 <= status < 300:
        return _created(rules, answer)
    code, message = rules.error_fields(answer.data)
    special = rules.special(answer, code, message) if rules.special else None
    raise special or classify(answer, code, message, rules.credential_keys)


def _created(rules: ResponseRules, answer: Answer) -> LinkCreated:
    data = answer.data
    url = data.get(rules.url_field) if isinstance(data, dict) else None
    if not isinstance(data, dict) or not is_link_url(url):
        raise _unusable_success(rules, answer)
    if answer.status not in rules.success_statuses:
        raise unknown(
            answer, *rules.error_fields(data), "a success status it does not document for a create"
        )
    return LinkCreated(url=url, external_id=rules.external_id(data, url), response_json=answer.text)


def _unusable_success(rules: ResponseRules, answer: Answer) -> UnknownOutcomeError:
    code, message = rules.error_fields(answer.data)
    what = "a JSON object" if not isinstance(answer.data, dict) else f"a {rules.url_field}"
    return UnknownOutcomeError(
        f"{answer.provider} answered {answer.status} without {what} "
        f"({detail(answer, code, message)}); the link may exist, reconcile before sending again",
        status=answer.status,
        code=code,
        response_text=response_text(answer.text),
    )


def is_link_url(value: object) -> TypeGuard[str]:
    """A payable link is an absolute http(s) URL."""
    return isinstance(value, str) and value[:8].lower().startswith(("https://", "http://"))


def last_path_segment(url: str) -> str | None:
    """The id at the end of a link URL ('https://x/merchant/3WH_e-' -> '3WH_e-'); None if none."""
    try:
        path = urlsplit(url).path
    except ValueError:  # e.g. a malformed IPv6 host; the URL itself is still the link
        return None
    return path.rstrip("/").rsplit("/", 1)[-1] or None


def classify(
    answer: Answer, code: str | None, message: str | None, credential_keys: tuple[str, ...]
) -> ProviderError:
    """The generic status ladder (see the module docstring) for an answer that is not a success."""
    status = answer.status
    if status in (401, 403):
        return credentials_rejected(answer, code, message, credential_keys)
    if status == 408:
        return retryable(answer, code, message, "the request timed out before it was processed")
    if status == 429:
        return _throttled(answer, code, message)
    if status == 503:
        return retryable(answer, code, message, "the provider is unavailable")
    if 400 <= status < 500:
        return permanent(answer, code, message)
    if 500 <= status < 600:
        return unknown(answer, code, message, "a server error, possibly after the link was saved")
    return unknown(answer, code, message, _odd_status(answer))


def _odd_status(answer: Answer) -> str:
    if 300 <= answer.status < 400:
        location = shorten(header(answer.headers, "Location") or "nowhere", _EXCERPT_LIMIT)
        return f"a redirect to {location}, not an answer to the create (check the lane's base_url)"
    return "a status a create should never get"


def _throttled(answer: Answer, code: str | None, message: str | None) -> ThrottledError:
    delay = retry_after_seconds(header(answer.headers, "Retry-After"))
    wait = f"retry after {delay:g} s" if delay is not None else "no Retry-After given"
    return ThrottledError(
        f"{answer.provider} answered 429 {detail(answer, code, message)}; the lane is sending "
        f"too fast and should slow down ({wait})",
        retry_after_s=delay,
        status=answer.status,
        code=code,
        response_text=response_text(answer.text),
    )


def retryable(answer: Answer, code: str | None, message: str | None, why: str) -> RetryableError:
    """Nothing was created (`why` says how we know); Retry-After is honoured when present."""
    return RetryableError(
        f"{answer.provider} answered {answer.status} {detail(answer, code, message)}; {why}, so "
        "nothing was created and the same request may be sent again",
        retry_after_s=retry_after_seconds(header(answer.headers, "Retry-After")),
        status=answer.status,
        code=code,
        response_text=response_text(answer.text),
    )


def unknown(
    answer: Answer, code: str | None, message: str | None, what: str
) -> UnknownOutcomeError:
    """The provider may have created the link: `what` says why the answer cannot be trusted."""
    return UnknownOutcomeError(
        f"{answer.provider} answered {answer.status} {detail(answer, code, message)}; {what}: "
        "the link may exist, reconcile before sending again",
        status=answer.status,
        code=code,
        response_text=response_text(answer.text),
    )


def permanent(
    answer: Answer,
    code: str | None,
    message: str | None,
    advice: str = "fix the job's payload; sending it again unchanged cannot succeed",
) -> PermanentError:
    """The provider refused the request for a reason that resending will not change."""
    return PermanentError(
        f"{answer.provider} rejected the request with {answer.status} "
        f"{detail(answer, code, message)}; {advice}",
        status=answer.status,
        code=code,
        response_text=response_text(answer.text),
    )


def credentials_rejected(
    answer: Answer, code: str | None, message: str | None, keys: tuple[str, ...]
) -> PermanentError:
    """The lane's credentials are wrong: every job on it will fail until someone fixes them."""
    section = f"providers.{answer.provider}"
    names = " and ".join(f"{section}.{key}" for key in keys)
    return permanent(
        answer,
        code,
        message,
        f"the account's credentials were rejected: check {names} (for a named account, "
        f"{section}.accounts.<account>.*); every job on this lane fails until they are fixed",
    )


# --- reading bodies and headers ---------------------------------------------------------------


def decode_text(body: bytes) -> str:
    """The body as text; bytes that are not UTF-8 become U+FFFD rather than an exception."""
    return body.decode("utf-8", errors="replace")


def decode_json(text: str) -> object:
    """The JSON value of `text`, or None when it is not JSON (never raises)."""
    try:
        return json.loads(text.removeprefix("\ufeff"))
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None


def scalar(data: object, key: str) -> str | None:
    """data[key] as text when data is an object and the value a string or number, else None."""
    if not isinstance(data, dict):
        return None
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value) or None


def response_text(text: str) -> str:
    """The body text as kept on the row: at most RESPONSE_TEXT_LIMIT characters."""
    return text[:RESPONSE_TEXT_LIMIT]


def shorten(text: str, limit: int) -> str:
    """Whitespace collapsed and cut to `limit` characters, marking the cut."""
    flat = " ".join(text[: limit * 4].split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def detail(answer: Answer, code: str | None, message: str | None) -> str:
    """The provider's own words: 'CODE: message', or a body excerpt when it gave neither."""
    if code and message:
        return f"{shorten(code, _CODE_LIMIT)}: {shorten(message, _DETAIL_LIMIT)}"
    if code or message:
        return shorten(code or message or "", _DETAIL_LIMIT)
    excerpt = shorten(answer.text, _EXCERPT_LIMIT)
    return f"with body {excerpt!r}" if excerpt else "with an empty body"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name, from a CIMultiDict or a plain dict alike."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        matches = (v for k, v in headers.items() if isinstance(k, str) and k.lower() == lowered)
        value = next(matches, None)
    return value if isinstance(value, str) else None


_DELTA_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After value; None when absent or garbage.

    Delta-seconds are read as they are. An HTTP-date is measured from `now` (aware, or naive
    UTC) and is None without it, since adapters must not read a clock. Dates in the past give 0.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    if now is None:
        return None
    return _seconds_until(value, now)


def _seconds_until(value: str, now: datetime) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    now = now if now.tzinfo else now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())
