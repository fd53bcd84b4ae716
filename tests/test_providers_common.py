"""The shared adapter parts: Retry-After, body decoding, error text, and the status ladder.

The ladder and the robustness property are checked against all three adapters at once, since
each one hands its non-special answers to the same `classify`.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from worker.errors import (
    PermanentError,
    ProviderError,
    RetryableError,
    ThrottledError,
    UnknownOutcomeError,
)
from worker.jobs import LinkCreated
from worker.providers import ADAPTERS, billpocket, cheqpay, common, kushki

ALL = [billpocket, cheqpay, kushki]
ids = [module.NAME for module in ALL]
NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_every_adapter_is_registered_under_its_name() -> None:
    assert {name: module.NAME for name, module in ADAPTERS.items()} == {
        "billpocket": "billpocket",
        "cheqpay": "cheqpay",
        "kushki": "kushki",
    }


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 120 ", 120.0), ("0", 0.0), ("1.5", 1.5), ("007", 7.0)],
)
def test_retry_after_reads_delta_seconds(value: str, expected: float) -> None:
    assert common.retry_after_seconds(value) == expected


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "-5", "1e3", "inf", "NaN", "3 s", "9" * 400, "Wed, 99 Foo 2026"],
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert common.retry_after_seconds(value, NOW) is None


def test_retry_after_http_date_is_measured_from_the_given_now() -> None:
    value = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert common.retry_after_seconds(value, NOW) == 90.0
    naive_now = NOW.replace(tzinfo=None)  # naive means UTC
    assert common.retry_after_seconds(value, naive_now) == 90.0


def test_retry_after_http_date_needs_a_now_and_past_dates_mean_now() -> None:
    future = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    past = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert common.retry_after_seconds(future) is None
    assert common.retry_after_seconds(past, NOW) == 0.0


# --- small helpers ----------------------------------------------------------------------------


def test_header_lookup_ignores_case_in_a_plain_dict() -> None:
    headers = {"retry-after": "4", "LOCATION": "https://x/"}
    assert common.header(headers, "Retry-After") == "4"
    assert common.header(headers, "Location") == "https://x/"
    assert common.header(headers, "X-Missing") is None


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"<html></html>", b"\xff\xfe\x00", b"[" * 100_000, b'{"a": 1'],
)
def test_decode_json_never_raises(body: bytes) -> None:
    assert common.decode_json(common.decode_text(body)) is None


def test_decode_json_reads_json_even_with_a_byte_order_mark() -> None:
    assert common.decode_json(common.decode_text(b'\xef\xbb\xbf{"a": [1, 2.5]}')) == {"a": [1, 2.5]}


def test_field_path_names_list_items_by_index() -> None:
    assert common.field_path(("products", 0, "price")) == "products[0].price"
    assert common.field_path(("totals", "total")) == "totals.total"
    assert common.field_path(()) == ""


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://uat.kshk.co/merchant-cl/3WHefILD-", "3WHefILD-"),
        ("https://uat.kshk.co/merchant-ec/nL_JmVeTk/", "nL_JmVeTk"),
        ("https://uat.kshk.co/m/abc?utm=1#top", "abc"),
        ("https://uat.kshk.co", None),
        ("https://[::1/x", None),
    ],
)
def test_last_path_segment(url: str, expected: str | None) -> None:
    assert common.last_path_segment(url) == expected


class _Amounts(BaseModel):
    model_config = common.STRICT

    amount: common.Number
    positive: list[common.Number] = Field(default_factory=list)


@pytest.mark.parametrize("text", ["55", "55.5", "55.0", "0", "12345678901234567890123"])
def test_numbers_round_trip_unchanged(text: str) -> None:
    model = _Amounts.model_validate_json(f'{{"amount": {text}}}')
    assert model.model_dump_json(exclude_unset=True) == f'{{"amount":{text}}}'


@pytest.mark.parametrize("text", ['"55"', "true", "null", "NaN", "Infinity", "[1]"])
def test_numbers_must_be_json_numbers(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        _Amounts.model_validate_json(f'{{"amount": {text}}}')
    assert common.describe_validation_error(caught.value) == (
        "payload is invalid: amount: Input should be a valid number"
    )


def test_validation_message_is_bounded_and_counts_the_rest() -> None:
    payload = json.dumps({"positive": ["x"] * 200, "amount": "y" * 10_000})
    with pytest.raises(ValidationError) as caught:
        _Amounts.model_validate_json(payload)
    message = common.describe_validation_error(caught.value)
    assert message.startswith("payload is invalid: amount: Input should be a valid number; ")
    assert len(message) <= common.PAYLOAD_MESSAGE_LIMIT + 30
    assert message.endswith("more problem(s)")
    assert "yyy" not in message  # values never appear


def test_require_account_refuses_another_providers_account() -> None:
    from worker.settings import CheqpayAccount

    with pytest.raises(TypeError, match="kushki needs a KushkiAccount, got CheqpayAccount"):
        kushki.build_request(None, CheqpayAccount(base_url="http://sim", api_key="k"))  # type: ignore[arg-type]


# --- the generic ladder, per adapter ----------------------------------------------------------

LADDER: list[tuple[int, type[ProviderError]]] = [
    (400, PermanentError),
    (404, PermanentError),
    (410, PermanentError),
    (412, PermanentError),
    (430, PermanentError),
    (401, PermanentError),
    (403, PermanentError),
    (408, RetryableError),
    (429, ThrottledError),
    (503, RetryableError),
    (500, UnknownOutcomeError),
    (502, UnknownOutcomeError),
    (504, UnknownOutcomeError),
    (599, UnknownOutcomeError),
    (100, UnknownOutcomeError),
    (301, UnknownOutcomeError),
    (308, UnknownOutcomeError),
    (0, UnknownOutcomeError),
    (999, UnknownOutcomeError),
    (204, UnknownOutcomeError),
]


@pytest.mark.parametrize("module", ALL, ids=ids)
@pytest.mark.parametrize(("status", "expected"), LADDER)
def test_status_ladder_on_an_unhelpful_body(
    module: ModuleType, status: int, expected: type[ProviderError]
) -> None:
    with pytest.raises(ProviderError) as caught:
        module.parse_response(status, {}, b"<html><h1>Oops</h1></html>")
    error = caught.value
    assert type(error) is expected
    assert error.status == status
    assert error.code is None
    assert error.response_text == "<html><h1>Oops</h1></html>"
    assert module.NAME in error.message
    assert "<html><h1>Oops</h1></html>" in error.message  # the excerpt stands in for a message


@pytest.mark.parametrize("module", ALL, ids=ids)
@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_name_the_config_keys(module: ModuleType, status: int) -> None:
    with pytest.raises(PermanentError, match="credentials were rejected") as caught:
        module.parse_response(status, {}, b"")
    assert f"providers.{module.NAME}." in caught.value.message
    assert "with an empty body" in caught.value.message


@pytest.mark.parametrize("module", ALL, ids=ids)
def test_429_carries_delta_seconds_retry_after(module: ModuleType) -> None:
    with pytest.raises(ThrottledError) as caught:
        module.parse_response(429, {"retry-after": "7"}, b"")
    assert caught.value.retry_after_s == 7.0
    assert "retry after 7 s" in caught.value.message


@pytest.mark.parametrize("module", ALL, ids=ids)
def test_503_carries_retry_after_but_ignores_dates(module: ModuleType) -> None:
    with pytest.raises(RetryableError) as caught:
        module.parse_response(503, {"Retry-After": "30"}, b"")
    assert caught.value.retry_after_s == 30.0
    date = format_datetime(NOW, usegmt=True)
    with pytest.raises(RetryableError) as dated:
        module.parse_response(503, {"Retry-After": date}, b"")
    assert dated.value.retry_after_s is None  # an adapter reads no clock


@pytest.mark.parametrize("module", ALL, ids=ids)
def test_redirect_names_its_location(module: ModuleType) -> None:
    with pytest.raises(UnknownOutcomeError, match=r"redirect to https://api\.example/x"):
        module.parse_response(301, {"location": "https://api.example/x"}, b"")


@pytest.mark.parametrize("module", ALL, ids=ids)
def test_response_text_is_bounded(module: ModuleType) -> None:
    body = ("é" * 5000).encode()
    with pytest.raises(PermanentError) as caught:
        module.parse_response(400, {}, body)
    assert caught.value.response_text == "é" * common.RESPONSE_TEXT_LIMIT
    assert len(caught.value.message) < 1000


@pytest.mark.parametrize("module", ALL, ids=ids)
@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"ok"', b"{}", b"<html>ok</html>", b"\xff"])
def test_a_2xx_without_a_usable_body_is_an_unknown_outcome(module: ModuleType, body: bytes) -> None:
    with pytest.raises(UnknownOutcomeError, match="the link may exist") as caught:
        module.parse_response(201, {}, body)
    assert caught.value.status == 201


# --- robustness: whatever comes back, a LinkCreated or a ProviderError ------------------------

_KEYS = [
    "error", "code", "message", "details", "errors", "field", "url", "id", "_id",
    "smartLinkUrl", "custom_link_path", "url_path",
]  # fmt: skip


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 10**30, 1.5, 1e308])
    if kind in (3, 4, 5):
        return rng.choice(["", "K002", "K004", "DUPLICATE", "https://x.example/a/b_c-", "http:/"])
    if kind in (6, 7):
        return {rng.choice(_KEYS): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def _random_body(rng: random.Random, url_field: str) -> bytes:
    kind = rng.randrange(5)
    if kind == 4:  # shaped like a success, with a random (often unusable) link and id
        shaped = {url_field: _random_json(rng), "id": _random_json(rng), "_id": "x"}
        return json.dumps(shaped).encode()
    if kind == 0:
        return rng.randbytes(rng.randrange(64))
    if kind == 1:
        text = json.dumps(_random_json(rng))
        cut = rng.randrange(len(text) + 1)  # sometimes truncated mid-value
        return text[: cut if rng.random() < 0.3 else len(text)].encode()
    if kind == 2:
        return b"<html><title>" + rng.randbytes(8) + b"</title></html>"
    return b"[" * rng.randrange(1, 5000)


@pytest.mark.parametrize("module", ALL, ids=ids)
def test_parse_response_only_returns_a_link_or_raises_a_provider_error(
    module: ModuleType,
) -> None:
    rng = random.Random(20260501)
    statuses = [200, 201, 202, 204, 301, 400, 401, 403, 408, 409, 422, 429, 500, 502, 503, 504]
    outcomes: set[str] = set()
    for _ in range(3000):
        status = rng.choice([*statuses, rng.randrange(-5, 1000)])
        headers = {rng.choice(["Retry-After", "retry-after", "Location"]): rng.choice(
            ["1", "x", "", "Wed, 21 Oct 2015 07:28:00 GMT", "9" * 50]
        )}  # fmt: skip
        body = _random_body(rng, module.RULES.url_field)
        try:
            result = module.parse_response(status, headers, body)
        except ProviderError as error:
            assert isinstance(error.message, str)
            assert error.message
            assert error.status == status
            assert error.response_text is not None
            assert len(error.response_text) <= common.RESPONSE_TEXT_LIMIT
            outcomes.add(type(error).__name__)
        else:
            assert isinstance(result, LinkCreated)
            assert 200 <= status < 300
            assert result.url.startswith(("http://", "https://"))
            outcomes.add("LinkCreated")
    # The generator is rich enough to reach every class, so the loop proved something.
    assert outcomes >= {
        "LinkCreated",
        "PermanentError",
        "RetryableError",
        "ThrottledError",
        "UnknownOutcomeError",
    }
