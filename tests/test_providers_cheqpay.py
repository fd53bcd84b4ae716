"""Cheqpay payment links: request building and answer parsing against recorded bodies."""

from __future__ import annotations

import json
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
from worker.providers import cheqpay
from worker.settings import CheqpayAccount

FIXTURES = Path(__file__).parent / "fixtures" / "cheqpay"
ACCOUNT = CheqpayAccount(base_url="http://sim", api_key="k-secret")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sample_request() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fixture("request.json"))
    return loaded


def make_job(payload: Any, *, idempotency_key: str | None = None) -> Job:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return Job(
        id=7,
        provider="cheqpay",
        account="default",
        payload=text,
        attempt=1,
        max_attempts=5,
        idempotency_key=idempotency_key,
    )


def build(payload: Any, **job_fields: Any) -> tuple[ProviderRequest, dict[str, Any]]:
    request = cheqpay.build_request(make_job(payload, **job_fields), ACCOUNT)
    return request, json.loads(request.body)


def invalid(payload: Any) -> str:
    with pytest.raises(InvalidPayloadError) as caught:
        cheqpay.build_request(make_job(payload), ACCOUNT)
    return caught.value.message


def error_for(status: int, name_or_body: str | bytes, headers: dict[str, str] | None = None) -> Any:
    body = fixture(name_or_body) if isinstance(name_or_body, str) else name_or_body
    with pytest.raises(Exception) as caught:
        cheqpay.parse_response(status, headers or {}, body)
    return caught.value


# --- build_request ----------------------------------------------------------------------------


def test_request_is_a_post_with_api_key_and_idempotency_headers() -> None:
    request, _ = build(sample_request())
    assert (request.method, request.path) == ("POST", "/lps/payment-links")
    assert dict(request.headers) == {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "x-api-key": "k-secret",
        "Idempotency-Key": "linkworker-job-7",
    }


def test_body_is_the_payload_plus_reference_and_is_draft_false() -> None:
    payload = sample_request()
    assert "reference" not in payload
    assert "isDraft" not in payload
    _, body = build(payload)
    assert body == {**payload, "reference": "linkworker-job-7", "isDraft": False}


def test_reference_follows_the_jobs_idempotency_key() -> None:
    _, body = build(sample_request(), idempotency_key="import-2026-05-row-3")
    assert body["reference"] == "import-2026-05-row-3"


def test_null_reference_and_is_draft_are_filled_too() -> None:
    _, body = build({**sample_request(), "reference": None, "isDraft": None})
    assert (body["reference"], body["isDraft"]) == ("linkworker-job-7", False)


def test_given_reference_and_is_draft_are_kept() -> None:
    payload = {**sample_request(), "reference": "order-9", "isDraft": True}
    _, body = build(payload)
    assert body == payload


def test_body_keeps_numbers_and_metadata_as_written() -> None:
    request, body = build(sample_request())
    assert b'"taxes":0.32' in request.body
    assert b'"qty":2,' in request.body
    assert body["metadata"] == {"jobBatch": "2026-05", "nested": {"a": [1, 2.5, None]}}


def test_a_minimal_payload() -> None:
    payload = {"products": [{"name": "x"}], "totals": {"total": 100}, "paymentMethods": ["CARD"]}
    _, body = build(payload)
    assert body == {**payload, "reference": "linkworker-job-7", "isDraft": False}


def test_customer_choice_type_is_accepted() -> None:
    _, body = build({**sample_request(), "type": "customer_choice"})
    assert body["type"] == "customer_choice"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"products": []}, "products: List should have at least 1 item"),
        ({"products": None}, "products: Input should be a valid array"),
        ({"products": [{"price": "1"}]}, "products[0].price: Input should be a valid number"),
        ({"products": [{"price": -1}]}, "products[0].price: Input should be greater than or equal"),
        ({"products": [{"qty": 0}]}, "products[0].qty: Input should be greater than 0"),
        ({"products": [{"nmae": "x"}]}, "products[0].nmae: unknown field"),
        ({"totals": {"total": "100"}}, "totals.total: Input should be a valid number"),
        ({"totals": {"taxes": 1}}, "totals.total: Field required"),
        ({"paymentMethods": []}, "paymentMethods: List should have at least 1 item"),
        ({"paymentMethods": ["CASH"]}, "paymentMethods[0]: Input should be 'CARD'"),
        ({"currency": "EUR"}, "currency: Input should be 'MXN' or 'USD'"),
        ({"type": "subscription"}, "type: Input should be 'products_subscriptions'"),
        ({"numberOfPayments": 0}, "numberOfPayments: Input should be greater than or equal to 1"),
        ({"isDraft": "false"}, "isDraft: Input should be a valid boolean"),
        ({"redirectUrl": "shop.example.com"}, "redirectUrl: String should match pattern"),
        ({"expiresAt": "2030-11-07T05:31:56"}, "expiresAt: Date-time should carry a UTC offset"),
        ({"expiresAt": "soon"}, "expiresAt: Input should be an ISO 8601 date-time"),
        ({"metadata": []}, "metadata: Input should be an object"),
        ({"reference": ""}, "reference: String should have at least 1 character"),
        ({"refrence": "x"}, "refrence: unknown field"),
        ({"defaults": {"billingAddress": {"zip": "1"}}}, "defaults.billingAddress.zip: unknown"),
        (
            {"defaults": {"shippingAddress": {"isSameAsShipping": True}}},
            "defaults.shippingAddress.isSameAsShipping: unknown field",
        ),
    ],
)
def test_invalid_payload_names_the_field(change: dict[str, Any], expected: str) -> None:
    message = invalid({**sample_request(), **change})
    assert message.startswith("payload is invalid: ")
    assert expected in message


def test_several_problems_are_all_named() -> None:
    payload = {**sample_request(), "totals": {"total": "x"}, "paymentMethods": []}
    assert invalid(payload) == (
        "payload is invalid: totals.total: Input should be a valid number; "
        "paymentMethods: List should have at least 1 item after validation, not 0"
    )


@pytest.mark.parametrize("field", ["products", "totals", "paymentMethods"])
def test_missing_required_field_is_named(field: str) -> None:
    payload = sample_request()
    del payload[field]
    assert invalid(payload) == f"payload is invalid: {field}: Field required"


def test_not_an_object() -> None:
    assert invalid('["CARD"]') == "payload is invalid: Input should be an object"


# --- parse_response ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201])
def test_success(status: int) -> None:
    body = fixture("created.json")
    link = cheqpay.parse_response(status, {}, body)
    assert link.url == "https://pay.cheqpay.dev/l/pl_7Hq2xK9"
    assert link.external_id == "pl_7Hq2xK9"
    assert link.response_json == body.decode()


def test_external_id_falls_back_to_underscore_id() -> None:
    created = json.loads(fixture("created.json"))
    del created["id"]
    link = cheqpay.parse_response(201, {}, json.dumps(created).encode())
    assert link.external_id == "6650f0c2a1b2c3d4e5f60718"


def test_the_docs_placeholder_sample_has_no_usable_url() -> None:
    # The documented sample body says "url": "<string>": a 201 like that is not a link.
    error = error_for(201, "created_doc_sample.json")
    assert type(error) is UnknownOutcomeError
    assert "201 without a url" in error.message


def test_202_is_not_a_documented_success() -> None:
    error = error_for(202, "created.json")
    assert type(error) is UnknownOutcomeError
    assert "does not document" in error.message


def test_400_validation_error_carries_code_message_and_details() -> None:
    error = error_for(400, "error_400_validation.json")
    assert type(error) is PermanentError
    assert error.code == "VALIDATION_ERROR"
    assert error.status == 400
    assert (
        "400 VALIDATION_ERROR: Invalid request parameters (products[0].price: must be a "
        "positive number; totals.total: is required)"
    ) in error.message


def test_401_names_the_api_key_setting_never_its_value() -> None:
    error = error_for(401, "error_401.json")
    assert type(error) is PermanentError
    assert error.code == "UNAUTHORIZED"
    assert "credentials were rejected" in error.message
    assert "providers.cheqpay.api_key" in error.message
    assert "k-secret" not in error.message


def test_409_duplicate_says_the_link_may_already_exist() -> None:
    error = error_for(409, "error_409_duplicate.json")
    assert type(error) is PermanentError
    assert error.code == "DUPLICATE"
    assert "a link with this reference may already exist" in error.message


def test_409_with_another_code_is_an_ordinary_rejection() -> None:
    body = json.dumps({"error": {"code": "CONFLICT", "message": "Busy"}}).encode()
    error = error_for(409, body)
    assert type(error) is PermanentError
    assert "may already exist" not in error.message
    assert "CONFLICT: Busy" in error.message


def test_429_is_throttled_with_retry_after() -> None:
    error = error_for(429, "error_429.json", {"Retry-After": "2"})
    assert type(error) is ThrottledError
    assert (error.code, error.retry_after_s) == ("RATE_LIMIT_EXCEEDED", 2.0)


def test_429_without_retry_after() -> None:
    error = error_for(429, "error_429.json")
    assert type(error) is ThrottledError
    assert error.retry_after_s is None


def test_500_internal_error_is_an_unknown_outcome() -> None:
    error = error_for(500, "error_500.json")
    assert type(error) is UnknownOutcomeError
    assert error.code == "INTERNAL_ERROR"
    assert "An unexpected error occurred" in error.message


def test_503_is_retryable() -> None:
    error = error_for(503, "error_503.json")
    assert type(error) is RetryableError
    assert error.code == "SERVICE_UNAVAILABLE"


def test_a_gateway_shaped_body_still_gives_its_message() -> None:
    error = error_for(403, b'{"message": "Forbidden"}')
    assert type(error) is PermanentError
    assert "403 Forbidden;" in error.message
    assert error.code is None


@pytest.mark.parametrize(
    "details", [None, "oops", [1, None, {"field": 5}], [{"message": "no field"}]]
)
def test_odd_details_do_not_break_the_message(details: Any) -> None:
    body = json.dumps({"error": {"code": "VALIDATION_ERROR", "details": details}}).encode()
    error = error_for(400, body)
    assert type(error) is PermanentError
    assert error.code == "VALIDATION_ERROR"
