"""Billpocket custom links: request building and answer parsing against recorded bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.errors import InvalidPayloadError, PermanentError, UnknownOutcomeError
from worker.jobs import Job, ProviderRequest
from worker.providers import billpocket
from worker.settings import BillpocketAccount

FIXTURES = Path(__file__).parent / "fixtures" / "billpocket"
ACCOUNT = BillpocketAccount(base_url="http://sim", api_key="api-k", user_token="user-t")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sample_request() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(fixture("request.json"))
    return loaded


def make_job(payload: Any, *, attempt: int = 1, idempotency_key: str | None = None) -> Job:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return Job(
        id=7,
        provider="billpocket",
        account="default",
        payload=text,
        attempt=attempt,
        max_attempts=5,
        idempotency_key=idempotency_key,
    )


def build(payload: Any, **job_fields: Any) -> tuple[ProviderRequest, dict[str, Any]]:
    request = billpocket.build_request(make_job(payload, **job_fields), ACCOUNT)
    return request, json.loads(request.body)


def invalid(payload: Any) -> str:
    with pytest.raises(InvalidPayloadError) as caught:
        billpocket.build_request(make_job(payload), ACCOUNT)
    return caught.value.message


# --- build_request ----------------------------------------------------------------------------


def test_request_is_a_post_to_custom_link_with_auth_and_idempotency_headers() -> None:
    request, body = build(sample_request())
    assert (request.method, request.path) == ("POST", "/v1/custom-link")
    assert dict(request.headers) == {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "X-Api-Key": "api-k",
        "BP-User-Token": "user-t",
        "Idempotency-Key": "linkworker-job-7",
    }
    assert body == sample_request()  # url_path given, so nothing is filled


def test_body_keeps_numbers_as_written() -> None:
    request, _ = build(sample_request())
    assert b'"amount":55,' in request.body
    request, _ = build({**sample_request(), "amount": 55.5})
    assert b'"amount":55.5,' in request.body


def test_url_path_is_derived_from_the_job_id_when_absent_and_stable_across_attempts() -> None:
    payload = sample_request()
    del payload["url_path"]
    first, first_body = build(payload)
    second, _ = build(payload, attempt=3)
    assert first_body == {**payload, "url_path": "lw-7"}
    assert first.body == second.body


def test_idempotency_key_comes_from_the_job() -> None:
    request, _ = build(sample_request(), idempotency_key="batch-42-row-9")
    assert request.headers["Idempotency-Key"] == "batch-42-row-9"


def test_rate_months_given_as_a_number_are_sent_as_text() -> None:
    payload = {**sample_request(), "rates": [{"months": 6, "type": "MSI"}]}
    _, body = build(payload)
    assert body["rates"] == [{"months": "6", "type": "MSI"}]


def test_a_minimal_payload_needs_only_an_amount() -> None:
    _, body = build({"amount": 10})
    assert body == {"amount": 10, "url_path": "lw-7"}


def test_wrong_account_class_is_a_type_error() -> None:
    from worker.settings import CheqpayAccount

    with pytest.raises(TypeError, match="BillpocketAccount"):
        billpocket.build_request(make_job({}), CheqpayAccount(base_url="http://sim", api_key="k"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"amount": None}, "amount: Input should be a valid number"),
        ({"amount": "55"}, "amount: Input should be a valid number"),
        ({"amount": 0}, "amount: Input should be greater than 0"),
        ({"ammount": 5}, "ammount: unknown field"),
        ({"url_path": "has space"}, "url_path: String should match pattern"),
        ({"url_path": "x" * 101}, "url_path: String should match pattern"),
        ({"expired_at": "next week"}, "expired_at: Input should be an ISO 8601 date-time"),
        ({"type": "2"}, "type: Input should be a valid integer"),
        ({"is_fixed_term": "no"}, "is_fixed_term: Input should be a valid boolean"),
        ({"rates": [{"months": "twelve", "type": "MSI"}]}, "rates[0].months: String should match"),
        ({"rates": [{"months": "12"}]}, "rates[0].type: Field required"),
        ({"rates": [{"months": "12", "type": "MSI", "x": 1}]}, "rates[0].x: unknown field"),
    ],
)
def test_invalid_payload_names_the_field(change: dict[str, Any], expected: str) -> None:
    message = invalid({**sample_request(), **change})
    assert message.startswith("payload is invalid: ")
    assert expected in message


def test_missing_amount_is_named() -> None:
    payload = sample_request()
    del payload["amount"]
    assert invalid(payload) == "payload is invalid: amount: Field required"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("", "payload is invalid: Invalid JSON"),
        ("{'amount': 5}", "payload is invalid: Invalid JSON"),
        ("[1, 2]", "payload is invalid: Input should be an object"),
        ("55", "payload is invalid: Input should be an object"),
    ],
)
def test_payload_that_is_not_a_json_object(payload: str, expected: str) -> None:
    assert invalid(payload).startswith(expected)


def test_error_message_never_echoes_input_values() -> None:
    message = invalid({**sample_request(), "description": "SECRET" * 1000, "amount": "SECRET"})
    assert "SECRET" not in message


# --- parse_response ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [202, 200, 201])
def test_documented_success(status: int) -> None:
    body = fixture("created_202.json")
    link = billpocket.parse_response(status, {}, body)
    assert link.url == "https://test.pay.billpocket.com/mylink/customLink"
    assert link.external_id == "61529dc5fee00754d48088ec51da557ae578f"
    assert link.response_json == body.decode()


def test_success_without_an_id_still_gives_the_link() -> None:
    body = json.dumps({"custom_link_path": "https://pay.billpocket.com/m/lw-7"}).encode()
    link = billpocket.parse_response(202, {}, body)
    assert (link.url, link.external_id) == ("https://pay.billpocket.com/m/lw-7", None)


@pytest.mark.parametrize(
    "body",
    [
        {"id": "abc"},
        {"custom_link_path": None, "id": "abc"},
        {"custom_link_path": "/mylink/customLink", "id": "abc"},
        {"custom_link_path": 5},
    ],
)
def test_202_without_a_usable_link_is_an_unknown_outcome(body: dict[str, Any]) -> None:
    with pytest.raises(UnknownOutcomeError, match="202 without a custom_link_path"):
        billpocket.parse_response(202, {}, json.dumps(body).encode())


def test_undocumented_2xx_with_a_link_is_an_unknown_outcome() -> None:
    with pytest.raises(UnknownOutcomeError, match="does not document"):
        billpocket.parse_response(206, {}, fixture("created_202.json"))


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_name_both_keys(status: int) -> None:
    with pytest.raises(PermanentError) as caught:
        billpocket.parse_response(status, {}, fixture("error_401.json"))
    message = caught.value.message
    assert "Invalid user token" in message
    assert "providers.billpocket.api_key" in message
    assert "providers.billpocket.user_token" in message
    assert "api-k" not in message


def test_422_validation_lists_each_field() -> None:
    with pytest.raises(PermanentError) as caught:
        billpocket.parse_response(422, {}, fixture("error_422_validation.json"))
    error = caught.value
    assert type(error) is PermanentError
    assert error.code is None
    assert "The given data was invalid." in error.message
    assert "amount: The amount must be at least 1." in error.message
    assert "expired_at: The expired at must be a date after now." in error.message
    assert error.response_text == fixture("error_422_validation.json").decode()


def test_422_url_path_taken_has_its_own_code() -> None:
    with pytest.raises(PermanentError) as caught:
        billpocket.parse_response(422, {}, fixture("error_422_url_path_taken.json"))
    assert caught.value.code == "url_path_taken"
    assert "already exists" in caught.value.message
    assert "url_path: The url path has already been taken." in caught.value.message


def test_url_path_taken_also_read_from_a_plain_string() -> None:
    body = json.dumps({"errors": {"url_path": "url_path is already in use"}}).encode()
    with pytest.raises(PermanentError) as caught:
        billpocket.parse_response(422, {}, body)
    assert caught.value.code == "url_path_taken"


def test_other_url_path_errors_are_plain_validation_errors() -> None:
    body = json.dumps({"errors": {"url_path": ["The url path format is invalid."]}}).encode()
    with pytest.raises(PermanentError) as caught:
        billpocket.parse_response(422, {}, body)
    assert caught.value.code is None
    assert "url_path: The url path format is invalid." in caught.value.message


def test_provider_code_is_kept_when_given() -> None:
    body = json.dumps({"code": 1042, "message": "Merchant not configured"}).encode()
    with pytest.raises(PermanentError) as caught:
        billpocket.parse_response(400, {}, body)
    assert caught.value.code == "1042"
    assert "1042: Merchant not configured" in caught.value.message
