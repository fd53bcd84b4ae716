"""Kushki Smartlinks v2: request building and answer parsing against recorded bodies."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from worker.errors import (
    InvalidPayloadError,
    PermanentError,
    RetryableError,
    ThrottledError,
    UnknownOutcomeError,
)
from worker.jobs import Job, ProviderRequest
from worker.providers import kushki
from worker.settings import KushkiAccount

FIXTURES = Path(__file__).parent / "fixtures" / "kushki"
ACCOUNT = KushkiAccount(
    base_url="http://sim", private_merchant_id="priv-secret", public_merchant_id="pub-from-config"
)
NO_PUBLIC_ID = KushkiAccount(base_url="http://sim", private_merchant_id="priv-secret")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sample_request() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fixture("request.json"))
    return loaded


def make_job(payload: Any) -> Job:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return Job(id=7, provider="kushki", account="default", payload=text, attempt=1, max_attempts=5)


def build(payload: Any, account: KushkiAccount = ACCOUNT) -> tuple[ProviderRequest, dict[str, Any]]:
    request = kushki.build_request(make_job(payload), account)
    return request, json.loads(request.body)


def invalid(payload: Any, account: KushkiAccount = ACCOUNT) -> str:
    with pytest.raises(InvalidPayloadError) as caught:
        kushki.build_request(make_job(payload), account)
    return caught.value.message


def edited(edit: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """The sample request after `edit` changed it in place."""
    payload = sample_request()
    edit(payload)
    return payload


def error_for(status: int, name_or_body: str | bytes) -> Any:
    body = fixture(name_or_body) if isinstance(name_or_body, str) else name_or_body
    with pytest.raises(Exception) as caught:
        kushki.parse_response(status, {}, body)
    return caught.value


# --- build_request ----------------------------------------------------------------------------


def test_request_is_a_post_with_private_merchant_id_and_idempotency_headers() -> None:
    request, body = build(sample_request())
    assert (request.method, request.path) == ("POST", "/smartlink/v2/smart-link")
    assert dict(request.headers) == {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Private-Merchant-Id": "priv-secret",
        "Idempotency-Key": "linkworker-job-7",
    }
    assert body == sample_request()  # the docs' sample goes out unchanged


def test_body_keeps_numbers_as_written() -> None:
    request, _ = build(sample_request())
    assert b'"subtotalIva0":15000,' in request.body
    assert b'"executionLimit":0,' in request.body


@pytest.mark.parametrize("absent", ["missing", "null"])
def test_public_merchant_id_is_filled_from_the_account(absent: str) -> None:
    def drop(payload: dict[str, Any]) -> None:
        if absent == "missing":
            del payload["publicMerchantId"]
        else:
            payload["publicMerchantId"] = None

    _, body = build(edited(drop))
    assert body == {**sample_request(), "publicMerchantId": "pub-from-config"}


def test_public_merchant_id_in_the_payload_wins_over_the_account() -> None:
    _, body = build(sample_request())
    assert body["publicMerchantId"] == "{{CL-Public-Merchant-Id}}"


def test_missing_public_merchant_id_without_config_names_both_places() -> None:
    message = invalid(edited(lambda p: p.pop("publicMerchantId")), NO_PUBLIC_ID)
    assert message.startswith("payload is invalid: publicMerchantId: missing")
    assert "providers.kushki.public_merchant_id" in message


def test_unknown_keys_in_open_objects_pass_through() -> None:
    def extend(payload: dict[str, Any]) -> None:
        payload["generalConfig"]["buyButtonText"] = "Pagar"
        payload["generalConfig"]["futureOption"] = {"x": 1}
        payload["formConfig"].append({"type": "select", "name": "plan", "options": ["a", "b"]})

    payload = edited(extend)
    _, body = build(payload)
    assert body == payload


def test_payment_method_may_be_a_list_and_other_currencies_may_have_cents() -> None:
    def unique_usd(payload: dict[str, Any]) -> None:
        config = payload["paymentConfig"]
        config.update(paymentType="unique", paymentMethod=["credit-card", "cash"])
        config["amount"] = {"currency": "USD", "subtotalIva": 1, "subtotalIva0": 0, "iva": 0.14}
        config["amount"].update(ice=0, extraTaxes={"propina": 0.5})
        del config["subscriptionOptions"]

    payload = edited(unique_usd)
    request, body = build(payload)
    assert body == payload
    assert b'"iva":0.14' in request.body


def test_clp_whole_numbers_written_as_floats_are_accepted() -> None:
    payload = edited(lambda p: p["paymentConfig"]["amount"].update(subtotalIva0=15000.0))
    _, body = build(payload)
    assert body["paymentConfig"]["amount"]["subtotalIva0"] == 15000.0


def _amount(payload: dict[str, Any]) -> dict[str, Any]:
    amount: dict[str, Any] = payload["paymentConfig"]["amount"]
    return amount


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda p: _amount(p).update(subtotalIva0=10.5),
            "paymentConfig.amount.subtotalIva0: CLP amounts must be whole pesos",
        ),
        (
            lambda p: p["paymentConfig"]["subscriptionOptions"]["amount"].update(iva=0.19),
            "paymentConfig.subscriptionOptions.amount.iva: CLP amounts must be whole pesos",
        ),
        (
            lambda p: _amount(p).update(extraTaxes={"propina": 1.5}),
            "paymentConfig.amount.extraTaxes: CLP amounts must be whole pesos",
        ),
        (
            lambda p: _amount(p).update(iva=-1),
            "paymentConfig.amount.iva: Input should be greater than or equal to 0",
        ),
        (
            lambda p: _amount(p).update(iva="0"),
            "paymentConfig.amount.iva: Input should be a valid number",
        ),
        (
            lambda p: _amount(p).pop("subtotalIva"),
            "paymentConfig.amount.subtotalIva: Field required",
        ),
        (
            lambda p: _amount(p).update(currency="clp"),
            "paymentConfig.amount.currency: String should",
        ),
        (lambda p: _amount(p).update(tip=1), "paymentConfig.amount.tip: unknown field"),
        (
            lambda p: p["paymentConfig"].update(paymentMethod=[]),
            "paymentConfig.paymentMethod: Input should be a string or a non-empty list of strings",
        ),
        (
            lambda p: p["paymentConfig"].update(paymentMethod=["credit-card", 3]),
            "paymentConfig.paymentMethod: Input should be a string or a non-empty list of strings",
        ),
        (
            lambda p: p["paymentConfig"].pop("paymentType"),
            "paymentConfig.paymentType: Field required",
        ),
        (
            lambda p: p["paymentConfig"]["subscriptionOptions"].update(startDate="12/03/2030"),
            "paymentConfig.subscriptionOptions.startDate: Input should be a date",
        ),
        (
            lambda p: p["generalConfig"].update(productImage="http://cdn.example/p.png"),
            "generalConfig.productImage: URL should start with https://",
        ),
        (
            lambda p: p["generalConfig"].update(brandLogo="logo.png"),
            "generalConfig.brandLogo: URL should start with https://",
        ),
        (
            lambda p: p["generalConfig"].update(executionLimit=-1),
            "generalConfig.executionLimit: Input should be greater than or equal to 0",
        ),
        (
            lambda p: p["formConfig"][1].update(type="textarea"),
            "formConfig[1].type: Input should be 'input', 'select', 'date', 'area', 'checkbox'",
        ),
        (
            lambda p: p["formConfig"][0].update(required="yes"),
            "formConfig[0].required: Input should be a valid boolean",
        ),
        (lambda p: p["contact"].update(phoneNumber=988238833), "contact.phoneNumber: Input should"),
        (
            lambda p: p.update(merchantName=""),
            "merchantName: String should have at least 1 character",
        ),
        (lambda p: p.update(metadata={"jobId": 7}), "metadata: unknown field"),
    ],
)
def test_invalid_payload_names_the_field(
    edit: Callable[[dict[str, Any]], object], expected: str
) -> None:
    message = invalid(edited(edit))
    assert message.startswith("payload is invalid: ")
    assert expected in message


@pytest.mark.parametrize(
    "field",
    [
        "merchantName",
        "paymentConfig",
        "generalConfig",
        "styleAndStructure",
        "contact",
        "formConfig",
    ],
)
def test_every_top_level_field_is_required(field: str) -> None:
    assert invalid(edited(lambda p: p.pop(field))) == f"payload is invalid: {field}: Field required"


def test_invalid_json() -> None:
    assert invalid('{"merchantName": ').startswith("payload is invalid: Invalid JSON")


# --- parse_response ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 200])
def test_success(status: int) -> None:
    body = fixture("created_201.json")
    link = kushki.parse_response(status, {}, body)
    assert link.url == "https://uat.kshk.co/merchant-cl/3WHefILD-"
    assert link.external_id == "3WHefILD-"
    assert link.response_json == body.decode()


def test_ids_with_underscores_come_whole() -> None:
    body = b'{"smartLinkUrl": "https://uat.kshk.co/merchant-ec/nL_JmVeTk"}'
    assert kushki.parse_response(201, {}, body).external_id == "nL_JmVeTk"


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"smartLinkUrl": ""}', b'{"smartLinkUrl": ["https://x/y"]}', b'{"url": "https://x"}'],
)
def test_201_without_a_smart_link_url_is_an_unknown_outcome(body: bytes) -> None:
    error = error_for(201, body)
    assert type(error) is UnknownOutcomeError
    assert error.message.startswith("kushki answered 201 without a smartLinkUrl")
    assert "the link may exist" in error.message


def test_400_k001_is_permanent_with_code_and_message() -> None:
    error = error_for(400, "error_400_k001.json")
    assert type(error) is PermanentError
    assert (error.status, error.code) == (400, "K001")
    assert "400 K001: Cuerpo de petición inválido." in error.message


def test_k004_means_the_merchant_ids_are_wrong() -> None:
    error = error_for(400, "error_400_k004.json")
    assert type(error) is PermanentError
    assert error.code == "K004"
    assert "credentials were rejected" in error.message
    assert "providers.kushki.private_merchant_id" in error.message
    assert "priv-secret" not in error.message


@pytest.mark.parametrize("status", [500, 400, 503, 429])
def test_k002_is_an_unknown_outcome_on_any_status(status: int) -> None:
    error = error_for(status, "error_500_k002.json")
    assert type(error) is UnknownOutcomeError
    assert error.code == "K002"
    assert "Ha ocurrido un error inesperado." in error.message


def test_429_is_throttled() -> None:
    error = error_for(429, "error_429.json")
    assert type(error) is ThrottledError
    assert "Too many requests" in error.message


def test_409_is_permanent() -> None:
    error = error_for(409, b'{"code": "SL009", "message": "Conflict"}')
    assert type(error) is PermanentError
    assert "SL009: Conflict" in error.message


def test_503_with_a_plain_code_is_retryable() -> None:
    error = error_for(503, b'{"code": "K010", "message": "Try later"}')
    assert type(error) is RetryableError
    assert error.code == "K010"
