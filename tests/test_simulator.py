"""The provider simulator, spoken to over real sockets with an aiohttp client."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest

from worker import simulator
from worker.simulator import (
    AccountStats,
    RunningSimulator,
    Simulator,
    SimulatorConfig,
    account_label,
    running_simulator,
    start_simulator,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

BILLPOCKET_HEADERS = {"X-Api-Key": "bp-api-key-1", "BP-User-Token": "bp-user-token-1"}
CHEQPAY_HEADERS = {"x-api-key": "cheqpay-key-1"}
KUSHKI_HEADERS = {"Private-Merchant-Id": "kushki-private-1"}


def billpocket_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "url_path": "job-1",
        "expired_at": "2028-05-22T15:20:34",
        "amount": 55,
        "type": 2,
        "description": "Test link",
        "rates": [{"months": "12", "type": "MSI"}],
        "is_fixed_term": False,
    }
    return {**body, **changes}


def cheqpay_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "products": [{"id": "p1", "name": "Plan", "qty": 1, "price": 150, "total": 150}],
        "totals": {"total": 150, "taxes": 0, "shipping": 0, "fees": 0, "discounts": 0},
        "paymentMethods": ["CARD"],
        "currency": "MXN",
        "reference": "job-1",
        "metadata": {"jobId": "1"},
    }
    return {**body, **changes}


def kushki_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "publicMerchantId": "kushki-public-1",
        "merchantName": "Merchant CL",
        "paymentConfig": {
            "paymentType": "unique",
            "amount": {"currency": "CLP", "subtotalIva": 0, "subtotalIva0": 15000, "iva": 0},
            "paymentMethod": ["credit-card"],
        },
        "generalConfig": {"productName": "Plan Hogar", "enabled": True, "executionLimit": 1},
        "styleAndStructure": {"structure": "checkout"},
        "contact": {"email": "soporte@example.com", "phoneNumber": "988238833"},
        "formConfig": [{"label": "Nombre", "type": "input", "name": "nombre", "required": True}],
    }
    return {**body, **changes}


class Api(NamedTuple):
    path: str
    headers: Mapping[str, str]
    body: Callable[..., dict[str, Any]]
    success: int
    url_field: str


APIS = {
    "billpocket": Api(
        "/v1/custom-link", BILLPOCKET_HEADERS, billpocket_body, 202, "custom_link_path"
    ),
    "cheqpay": Api("/lps/payment-links", CHEQPAY_HEADERS, cheqpay_body, 201, "url"),
    "kushki": Api("/smartlink/v2/smart-link", KUSHKI_HEADERS, kushki_body, 201, "smartLinkUrl"),
}


class Reply(NamedTuple):
    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with running_simulator(SimulatorConfig(seed=7)) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    async with http.request(method, url, json=body, data=data, headers=headers) as response:
        return Reply(response.status, response.headers, await response.text())


async def create(
    http: aiohttp.ClientSession,
    sim: RunningSimulator,
    provider: str,
    body: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    api = APIS[provider]
    payload = api.body() if body is None else body
    sent = api.headers if headers is None else headers
    return await call(http, "POST", sim.url + api.path, body=payload, headers=sent)


async def stats(http: aiohttp.ClientSession, sim: RunningSimulator) -> dict[str, Any]:
    reply = await call(http, "GET", sim.url + "/__stats")
    assert reply.status == 200
    document: dict[str, Any] = reply.json()
    return document


async def links(http: aiohttp.ClientSession, sim: RunningSimulator) -> list[dict[str, Any]]:
    reply = await call(http, "GET", sim.url + "/__links")
    assert reply.status == 200
    document: list[dict[str, Any]] = reply.json()
    return document


async def queue_fault(
    http: aiohttp.ClientSession, sim: RunningSimulator, provider: str, fault: str, count: int = 1
) -> None:
    spec = {"provider": provider, "fault": fault, "count": count}
    reply = await call(http, "POST", sim.url + "/__faults", body=spec)
    assert reply.status == 200, reply.text


# --- labels and configuration ------------------------------------------------------------------


def test_account_label_is_a_short_hash_of_the_credentials() -> None:
    label = account_label("billpocket", "key", "token")
    assert re.fullmatch(r"billpocket:[0-9a-f]{12}", label)
    assert "key" not in label and "token" not in label
    assert label == account_label("billpocket", "key", "token")
    assert account_label("billpocket", "ke", "ytoken") != label  # the separator counts


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"slow_rate": -0.1}, "slow_rate"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"slow_ms": float("nan")}, "slow_ms"),
        ({"rate_per_s": 0.5}, "rate_per_s"),
        ({"account_rates": {"cheqpay:abc": 0}}, "account_rates"),
        ({"port": 70000}, "port"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SimulatorConfig(**changes)


# --- successful creates ------------------------------------------------------------------------


async def test_billpocket_create_answers_202_with_the_documented_link(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    reply = await create(http, sim, "billpocket")

    assert reply.status == 202
    link = reply.json()
    assert link["custom_link_path"] == "https://test.pay.billpocket.com/linkworker/job-1"
    assert link["domain"] == "https://test.pay.billpocket.com"
    assert (link["main_link"], link["secondary_link"]) == ("linkworker", "job-1")
    assert re.fullmatch(r"[0-9a-f]+", link["id"])
    assert link["available_rates"] == [{"type": "MSI", "months": 12}]
    assert (link["status"], link["currency"], link["link_type"]) == (1, "MXN", 2)
    assert (link["amount"], link["description"]) == (55, "Test link")
    assert (link["purchase_id"], link["extra_info"], link["is_fixed_term"]) == (None, None, False)
    assert link["expired_at"] == "2028-05-22T15:20:34"
    assert isinstance(link["user_id"], int)
    for stamp in (link["created_at"], link["updated_at"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", stamp)  # no offset


async def test_billpocket_generates_a_url_path_when_none_is_sent(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    body = billpocket_body()
    del body["url_path"]

    first = (await create(http, sim, "billpocket", body)).json()
    second = (await create(http, sim, "billpocket", body)).json()

    assert first["secondary_link"] != second["secondary_link"]
    assert first["custom_link_path"].endswith("/" + first["secondary_link"])
    assert (await stats(http, sim))["created"] == 2


async def test_cheqpay_create_answers_201_with_the_payment_link_entity(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    reply = await create(http, sim, "cheqpay")

    assert reply.status == 201
    entity = reply.json()
    assert entity["id"].startswith("pl_")
    assert entity["url"] == f"https://checkout.cheqpay.dev/pl/{entity['id']}"
    assert entity["_id"] and entity["_id"] != entity["id"]
    assert entity["merchantId"]
    assert entity["isDraft"] is True  # the documented default
    assert entity["isEnabled"] is True
    assert entity["reference"] == "job-1"
    assert entity["totals"]["total"] == 150
    assert entity["paymentMethods"] == ["CARD"]
    assert entity["type"] == "products_subscriptions"
    assert entity["createdAt"].endswith("Z") and entity["updatedAt"] == entity["createdAt"]


async def test_cheqpay_echoes_an_explicit_is_draft(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    reply = await create(http, sim, "cheqpay", cheqpay_body(isDraft=False, currency="USD"))

    assert reply.status == 201
    assert (reply.json()["isDraft"], reply.json()["currency"]) == (False, "USD")


async def test_kushki_create_answers_201_with_only_the_smartlink_url(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    reply = await create(http, sim, "kushki", kushki_body(merchantName="Tienda Ñandú 2"))

    assert reply.status == 201
    document = reply.json()
    assert list(document) == ["smartLinkUrl"]
    assert re.fullmatch(
        r"https://uat\.kshk\.co/tienda--and--2/[A-Za-z0-9_-]{9}", document["smartLinkUrl"]
    )


async def test_the_same_seed_gives_the_same_ids(http: aiohttp.ClientSession) -> None:
    urls = []
    for _ in range(2):
        async with running_simulator(SimulatorConfig(seed=42)) as running:
            urls.append((await create(http, running, "kushki")).json()["smartLinkUrl"])

    assert urls[0] == urls[1]


# --- auth and validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "headers", "status", "expected"),
    [
        ("billpocket", {}, 401, {"message": "Unauthenticated."}),
        ("billpocket", {"X-Api-Key": "k"}, 401, {"message": "Unauthenticated."}),
        ("billpocket", {"X-Api-Key": "invalid-k", "BP-User-Token": "t"}, 401, None),
        ("billpocket", {"X-Api-Key": "k", "BP-User-Token": "invalid-t"}, 401, None),
        ("billpocket", {"X-Api-Key": "forbidden-k", "BP-User-Token": "t"}, 403, None),
        ("billpocket", {"X-Api-Key": "k", "BP-User-Token": "forbidden-t"}, 403, None),
        (
            "cheqpay",
            {},
            401,
            {"error": {"code": "UNAUTHORIZED", "message": "Invalid or missing API key"}},
        ),
        (
            "cheqpay",
            {"x-api-key": "invalid-key"},
            401,
            {"error": {"code": "UNAUTHORIZED", "message": "Invalid or missing API key"}},
        ),
        ("kushki", {}, 401, {"code": "K004", "message": "Id de comercio no válido"}),
        (
            "kushki",
            {"Private-Merchant-Id": "invalid-id"},
            401,
            {"code": "K004", "message": "Id de comercio no válido"},
        ),
    ],
)
async def test_bad_credentials_are_refused_and_create_nothing(
    sim: RunningSimulator,
    http: aiohttp.ClientSession,
    provider: str,
    headers: dict[str, str],
    status: int,
    expected: dict[str, Any] | None,
) -> None:
    reply = await create(http, sim, provider, headers=headers)

    assert reply.status == status
    if expected is not None:
        assert reply.json() == expected
    counts = await stats(http, sim)
    assert (counts["requests"], counts["created"]) == (1, 0)


async def test_billpocket_validation_errors_are_422_with_laravel_style_errors(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    body = billpocket_body(url_path="no spaces/allowed", description=5)
    del body["amount"]

    reply = await create(http, sim, "billpocket", body)

    assert reply.status == 422
    assert reply.json() == {
        "message": "The given data was invalid.",
        "errors": {
            "amount": ["The amount field is required."],
            "url_path": ["The url path format is invalid."],
            "description": ["The description must be a string."],
        },
    }


@pytest.mark.parametrize("amount", [0, -5, "55", True])
async def test_billpocket_amount_must_be_a_positive_number(
    sim: RunningSimulator, http: aiohttp.ClientSession, amount: object
) -> None:
    reply = await create(http, sim, "billpocket", billpocket_body(amount=amount))

    assert reply.status == 422
    assert list(reply.json()["errors"]) == ["amount"]


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"totals": {"total": "150"}}, "totals.total", "must be a number"),
        ({"totals": None}, "totals", "is required"),
        ({"products": []}, "products", "must be a non-empty array of objects"),
        ({"paymentMethods": ["CASH"]}, "paymentMethods", 'must be a non-empty array of "CARD"'),
        ({"currency": "EUR"}, "currency", "must be one of MXN, USD"),
    ],
)
async def test_cheqpay_validation_errors_are_400_with_details(
    sim: RunningSimulator,
    http: aiohttp.ClientSession,
    changes: dict[str, Any],
    field: str,
    message: str,
) -> None:
    reply = await create(http, sim, "cheqpay", cheqpay_body(**changes))

    assert reply.status == 400
    assert reply.json() == {
        "error": {
            "code": "VALIDATION_ERROR",
            "message": "Validation failed",
            "details": [{"field": field, "message": message}],
        }
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda body: body.pop("formConfig"), "formConfig"),
        (lambda body: body.pop("publicMerchantId"), "publicMerchantId"),
        (lambda body: body["paymentConfig"].pop("paymentType"), "paymentConfig.paymentType"),
        (
            lambda body: body["paymentConfig"]["amount"].update(iva="0"),
            "paymentConfig.amount.iva",
        ),
        (lambda body: body.update(generalConfig=[]), "generalConfig"),
    ],
)
async def test_kushki_validation_errors_are_400_k001_naming_the_field(
    sim: RunningSimulator,
    http: aiohttp.ClientSession,
    change: Callable[[dict[str, Any]], object],
    field: str,
) -> None:
    body = kushki_body()
    change(body)

    reply = await create(http, sim, "kushki", body)

    assert reply.status == 400
    document = reply.json()
    assert document["code"] == "K001"
    assert document["message"].startswith("El cuerpo de la petición es inválido. " + field + " ")


@pytest.mark.parametrize(
    ("provider", "status", "shape"),
    [
        ("billpocket", 422, lambda doc: doc["message"] == "The given data was invalid."),
        ("cheqpay", 400, lambda doc: doc["error"]["code"] == "VALIDATION_ERROR"),
        ("kushki", 400, lambda doc: doc["code"] == "K001"),
    ],
)
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"amount": NaN}', b"\xff\xfe"])
async def test_a_body_that_is_not_a_json_object_gets_the_providers_error(
    sim: RunningSimulator,
    http: aiohttp.ClientSession,
    provider: str,
    status: int,
    shape: Callable[[Any], bool],
    raw: bytes,
) -> None:
    api = APIS[provider]
    headers = {**api.headers, "Content-Type": "application/json"}

    reply = await call(http, "POST", sim.url + api.path, data=raw, headers=headers)

    assert reply.status == status
    assert shape(reply.json())
    assert (await stats(http, sim))["requests"] == 1


# --- dedupe behaviour --------------------------------------------------------------------------


async def test_billpocket_url_path_is_unique_per_account(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    first = await create(http, sim, "billpocket")
    second = await create(http, sim, "billpocket")
    other_account = {"X-Api-Key": "bp-api-key-2", "BP-User-Token": "bp-user-token-2"}
    third = await create(http, sim, "billpocket", headers=other_account)

    assert first.status == 202
    assert second.status == 422
    taken = "The url path has already been taken."
    assert second.json() == {"message": taken, "errors": {"url_path": [taken]}}
    assert third.status == 202
    counts = await stats(http, sim)
    assert (counts["created"], counts["duplicates"]) == (2, 0)


async def test_billpocket_list_finds_the_accounts_link_by_url_path(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    created = (await create(http, sim, "billpocket")).json()
    url = sim.url + "/v1/custom-link"

    found = await call(http, "GET", url + "?url_path=job-1", headers=BILLPOCKET_HEADERS)
    missing = await call(http, "GET", url + "?url_path=job-2", headers=BILLPOCKET_HEADERS)
    stranger = {"X-Api-Key": "bp-api-key-2", "BP-User-Token": "bp-user-token-2"}
    other = await call(http, "GET", url + "?url_path=job-1", headers=stranger)
    unauthenticated = await call(http, "GET", url + "?url_path=job-1")

    assert found.status == 200
    assert found.json() == {"data": [created]}
    assert missing.json() == {"data": []}
    assert other.json() == {"data": []}
    assert unauthenticated.status == 401


async def test_kushki_honours_idempotency_key(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    keyed = {**KUSHKI_HEADERS, "Idempotency-Key": "job-1"}

    first = await create(http, sim, "kushki", headers=keyed)
    replay = await create(http, sim, "kushki", headers=keyed)
    new_key = await create(http, sim, "kushki", headers={**keyed, "Idempotency-Key": "job-2"})

    assert first.status == replay.status == 201
    assert replay.json() == first.json()
    assert new_key.json() != first.json()
    counts = await stats(http, sim)
    assert (counts["requests"], counts["created"], counts["duplicates"]) == (3, 2, 0)


async def test_kushki_without_idempotency_key_creates_every_time_without_duplicates(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    first = await create(http, sim, "kushki")
    second = await create(http, sim, "kushki")

    assert first.json() != second.json()
    counts = await stats(http, sim)
    assert (counts["created"], counts["duplicates"]) == (2, 0)


async def test_cheqpay_reference_is_not_unique_and_repeats_count_as_duplicates(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    first = await create(http, sim, "cheqpay")
    second = await create(http, sim, "cheqpay")
    other_reference = await create(http, sim, "cheqpay", cheqpay_body(reference="job-2"))

    assert first.status == second.status == other_reference.status == 201
    assert first.json()["id"] != second.json()["id"]
    counts = await stats(http, sim)
    assert (counts["created"], counts["duplicates"]) == (3, 1)
    assert [link["identity"] for link in await links(http, sim)] == ["job-1", "job-1", "job-2"]


async def test_idempotency_key_is_the_dedupe_identity_when_sent(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    keyed = {**BILLPOCKET_HEADERS, "Idempotency-Key": "job-9"}

    await create(http, sim, "billpocket", billpocket_body(url_path="a"), headers=keyed)
    await create(http, sim, "billpocket", billpocket_body(url_path="b"), headers=keyed)

    counts = await stats(http, sim)
    assert (counts["created"], counts["duplicates"]) == (2, 1)
    assert {link["identity"] for link in await links(http, sim)} == {"job-9"}


async def test_cheqpay_get_reads_a_link_by_id_or_underscore_id(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    entity = (await create(http, sim, "cheqpay")).json()
    base = sim.url + "/lps/payment-links/"

    by_id = await call(http, "GET", base + entity["id"], headers=CHEQPAY_HEADERS)
    by_underscore_id = await call(http, "GET", base + entity["_id"], headers=CHEQPAY_HEADERS)
    unknown = await call(http, "GET", base + "pl_nope", headers=CHEQPAY_HEADERS)
    stranger = await call(http, "GET", base + entity["id"], headers={"x-api-key": "other"})

    assert by_id.status == by_underscore_id.status == 200
    assert by_id.json()["url"] == entity["url"]
    assert by_underscore_id.json()["id"] == entity["id"]
    assert unknown.status == stranger.status == 404
    assert unknown.json()["error"]["code"] == "NOT_FOUND"


async def test_kushki_get_reads_a_link_by_the_id_in_its_url(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    url = (await create(http, sim, "kushki")).json()["smartLinkUrl"]
    base = sim.url + "/smartlink/v2/smart-link/"

    found = await call(http, "GET", base + url.rsplit("/", 1)[1], headers=KUSHKI_HEADERS)
    missing = await call(http, "GET", base + "nope", headers=KUSHKI_HEADERS)

    assert found.status == 200
    assert found.json()["smartLinkUrl"] == url
    assert found.json()["merchantName"] == "Merchant CL"
    assert missing.status == 404
    assert missing.json()["code"] == "K404"


# --- rate limit --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "throttled_body"),
    [
        ("billpocket", {"message": "Too Many Attempts."}),
        ("cheqpay", {"error": {"code": "RATE_LIMIT_EXCEEDED", "message": "Rate limit exceeded"}}),
        (
            "kushki",
            {
                "code": "K429",
                "message": "Too many requests have been sent in a short period of time",
            },
        ),
    ],
)
async def test_rate_limit_is_strict_per_account(
    http: aiohttp.ClientSession, provider: str, throttled_body: dict[str, Any]
) -> None:
    api = APIS[provider]
    async with running_simulator(SimulatorConfig(rate_per_s=5)) as sim:
        replies = await asyncio.gather(
            *(create(http, sim, provider, api.body(url_path=f"job-{n}")) for n in range(8))
        )
        counts = await stats(http, sim)

    statuses = sorted(reply.status for reply in replies)
    assert statuses == [api.success] * 5 + [429] * 3
    for reply in replies:
        if reply.status == 429:
            assert reply.headers["Retry-After"] == "1"
            assert reply.json() == throttled_body
    assert (counts["requests"], counts["created"], counts["throttled"]) == (8, 5, 3)
    assert counts["max_per_window"] == 8
    (account,) = counts["accounts"].values()
    assert (account["limit"], account["throttled"], account["max_per_window"]) == (5, 3, 8)


async def test_account_rates_override_the_default_limit(http: aiohttp.ClientSession) -> None:
    slow_label = account_label("cheqpay", "slow-key")
    config = SimulatorConfig(account_rates={slow_label: 1})
    async with running_simulator(config) as sim:
        slow = [await create(http, sim, "cheqpay", headers={"x-api-key": "slow-key"}) for _ in "ab"]
        fast = [await create(http, sim, "cheqpay") for _ in "abc"]
        counts = await stats(http, sim)

    assert [reply.status for reply in slow] == [201, 429]
    assert [reply.status for reply in fast] == [201, 201, 201]
    assert counts["accounts"][slow_label]["limit"] == 1
    assert counts["accounts"][account_label("cheqpay", "cheqpay-key-1")]["limit"] is None
    assert counts["max_per_window"] == 3  # tracked without a limit too


def test_window_slides_and_counts_throttled_arrivals() -> None:
    account = AccountStats("cheqpay:test", limit=2)

    admitted = [account.admit(now) for now in (0.0, 0.5, 0.9, 1.0, 1.6, 2.1)]

    # 0.9 is a third arrival within a second; at 1.0 the arrival at 0.0 has left the window
    # but the throttled one at 0.9 still counts; by 2.1 only 1.6 remains.
    assert admitted == [True, True, False, False, False, True]
    assert account.max_per_window == 3
    assert list(account.arrivals) == [1.6, 2.1]  # memory holds one second of arrivals


def test_simulator_clock_is_injectable() -> None:
    now = [100.0]
    sim = Simulator(SimulatorConfig(rate_per_s=1), clock=lambda: now[0])
    provider = sim.providers["cheqpay"]
    raw = json.dumps(cheqpay_body()).encode()

    statuses = []
    for moment in (100.0, 100.5, 101.0, 101.5):
        now[0] = moment
        statuses.append(sim.decide_create(provider, CHEQPAY_HEADERS, raw).status)

    assert statuses == [201, 429, 429, 429]  # each arrival keeps the window full
    assert sim.state.throttled == 3


# --- random faults and latency -----------------------------------------------------------------


async def test_error_rate_one_answers_every_create_with_503(http: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(error_rate=1, seed=1)) as sim:
        replies = [await create(http, sim, "cheqpay") for _ in range(3)]
        counts = await stats(http, sim)

    assert [reply.status for reply in replies] == [503, 503, 503]
    assert replies[0].json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert (counts["created"], counts["injected"]) == (0, 3)


@pytest.mark.parametrize(
    "config",
    [SimulatorConfig(latency_ms=150), SimulatorConfig(slow_rate=1, slow_ms=150)],
    ids=["latency", "slow"],
)
async def test_latency_and_slow_requests_delay_the_answer(
    http: aiohttp.ClientSession, config: SimulatorConfig
) -> None:
    async with running_simulator(config) as sim:
        started = time.monotonic()
        reply = await create(http, sim, "kushki")
        elapsed = time.monotonic() - started

    assert reply.status == 201
    assert elapsed >= 0.15


# --- deterministic faults ----------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["billpocket", "cheqpay", "kushki"])
@pytest.mark.parametrize("fault", ["500", "502", "503", "504", "408", "400", "429"])
async def test_status_faults_answer_in_the_providers_shape_and_create_nothing(
    sim: RunningSimulator, http: aiohttp.ClientSession, provider: str, fault: str
) -> None:
    await queue_fault(http, sim, provider, fault)

    faulted = await create(http, sim, provider)
    after = await create(http, sim, provider)

    assert faulted.status == int(fault)
    document = faulted.json()
    if provider == "billpocket":
        assert isinstance(document["message"], str)
    elif provider == "cheqpay":
        assert document["error"]["code"]
    else:
        assert re.fullmatch(r"K\d{3}", document["code"])
    assert (faulted.headers.get("Retry-After") == "1") is (fault == "429")
    assert after.status == APIS[provider].success  # the fault was used once
    counts = await stats(http, sim)
    assert (counts["created"], counts["injected"], counts["throttled"]) == (1, 1, 0)


@pytest.mark.parametrize("provider", ["billpocket", "cheqpay", "kushki"])
async def test_500_after_create_creates_the_link(
    sim: RunningSimulator, http: aiohttp.ClientSession, provider: str
) -> None:
    await queue_fault(http, sim, provider, "500_after_create")

    reply = await create(http, sim, provider)

    assert reply.status == 500
    assert APIS[provider].url_field not in reply.text
    assert len(await links(http, sim)) == 1


async def test_kushki_replays_a_key_whose_first_answer_was_lost(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    keyed = {**KUSHKI_HEADERS, "Idempotency-Key": "job-1"}
    await queue_fault(http, sim, "kushki", "500_after_create")

    lost = await create(http, sim, "kushki", headers=keyed)
    retry = await create(http, sim, "kushki", headers=keyed)

    assert (lost.status, retry.status) == (500, 201)
    assert retry.json()["smartLinkUrl"] == (await links(http, sim))[0]["url"]
    counts = await stats(http, sim)
    assert (counts["created"], counts["duplicates"]) == (1, 0)


async def test_timeout_after_create_creates_the_link_and_never_answers_in_time(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await queue_fault(http, sim, "cheqpay", "timeout_after_create")
    api = APIS["cheqpay"]
    timeout = aiohttp.ClientTimeout(total=1)

    with pytest.raises(TimeoutError):
        await http.post(sim.url + api.path, json=api.body(), headers=api.headers, timeout=timeout)

    assert len(await links(http, sim)) == 1
    started = time.monotonic()
    await sim.close()
    assert time.monotonic() - started < 5


async def test_close_ends_a_request_held_by_timeout_after_create(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = await start_simulator(SimulatorConfig())
    arrived = asyncio.Event()
    decide = sim.simulator.decide_create

    def decide_and_tell(*args: Any) -> simulator.Answer:
        answer = decide(*args)
        arrived.set()
        return answer

    monkeypatch.setattr(sim.simulator, "decide_create", decide_and_tell)
    await queue_fault(http, sim, "kushki", "timeout_after_create")
    held = asyncio.create_task(create(http, sim, "kushki"))
    await asyncio.wait_for(arrived.wait(), 10)

    await asyncio.wait_for(sim.close(), 10)

    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await held
    assert sim.state.created == 1


async def test_reset_drops_the_connection_without_creating_or_logging(
    sim: RunningSimulator, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await queue_fault(http, sim, "billpocket", "reset")

    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await create(http, sim, "billpocket")
    after = await create(http, sim, "billpocket")

    assert after.status == 202  # the server carries on
    assert [link["provider"] for link in await links(http, sim)] == ["billpocket"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("provider", ["billpocket", "cheqpay", "kushki"])
async def test_malformed_answers_truncated_json_after_creating(
    sim: RunningSimulator, http: aiohttp.ClientSession, provider: str
) -> None:
    await queue_fault(http, sim, provider, "malformed")

    reply = await create(http, sim, provider)

    assert reply.status == APIS[provider].success
    assert reply.text == '{"url": "ht'
    with pytest.raises(json.JSONDecodeError):
        reply.json()
    assert (await stats(http, sim))["created"] == 1


async def test_html_answers_a_502_page_without_creating(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await queue_fault(http, sim, "cheqpay", "html")

    reply = await create(http, sim, "cheqpay")

    assert reply.status == 502
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reply.text.startswith("<html>")
    assert (await stats(http, sim))["created"] == 0


@pytest.mark.parametrize("provider", ["billpocket", "cheqpay", "kushki"])
async def test_no_url_answers_success_without_the_url_field(
    sim: RunningSimulator, http: aiohttp.ClientSession, provider: str
) -> None:
    await queue_fault(http, sim, provider, "no_url")

    reply = await create(http, sim, provider)

    assert reply.status == APIS[provider].success
    assert isinstance(reply.json(), dict)
    assert APIS[provider].url_field not in reply.json()
    assert (await stats(http, sim))["created"] == 1


async def test_faults_are_fifo_per_provider(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await queue_fault(http, sim, "cheqpay", "500")
    await queue_fault(http, sim, "cheqpay", "503", count=2)

    other_provider = await create(http, sim, "kushki")
    statuses = [(await create(http, sim, "cheqpay")).status for _ in range(4)]

    assert other_provider.status == 201
    assert statuses == [500, 503, 503, 201]


async def test_faults_apply_after_auth_and_the_rate_limit(http: aiohttp.ClientSession) -> None:
    async with running_simulator(SimulatorConfig(rate_per_s=1)) as sim:
        await create(http, sim, "cheqpay")  # fills this second's window
        await queue_fault(http, sim, "cheqpay", "502")

        refused = await create(http, sim, "cheqpay", headers={"x-api-key": "invalid"})
        throttled = await create(http, sim, "cheqpay")
        pending = (await call(http, "GET", sim.url + "/__faults")).json()
        faulted = await create(http, sim, "cheqpay", headers={"x-api-key": "second-account"})

    assert (refused.status, throttled.status, faulted.status) == (401, 429, 502)
    assert pending["cheqpay"] == [{"fault": "502", "count": 1}]


async def test_a_late_fault_is_spent_on_a_request_that_fails_on_its_own(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await queue_fault(http, sim, "cheqpay", "500_after_create")

    invalid = await create(http, sim, "cheqpay", cheqpay_body(products=[]))
    valid = await create(http, sim, "cheqpay")

    assert (invalid.status, valid.status) == (400, 201)
    assert (await stats(http, sim))["injected"] == 0


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (b"not json", "body"),
        (b'["cheqpay"]', "body"),
        (b'{"provider": "stripe", "fault": "500"}', "provider"),
        (b'{"fault": "500"}', "provider"),
        (b'{"provider": "cheqpay", "fault": "418"}', "fault"),
        (b'{"provider": "cheqpay", "fault": ["500"]}', "fault"),
        (b'{"provider": "cheqpay", "fault": "500", "count": 0}', "count"),
        (b'{"provider": "cheqpay", "fault": "500", "count": "2"}', "count"),
        (b'{"provider": "cheqpay", "fault": "500", "count": true}', "count"),
        (b'{"provider": "cheqpay", "fault": "500", "times": 2}', "times"),
    ],
)
async def test_bad_fault_specs_are_400_naming_the_field(
    sim: RunningSimulator, http: aiohttp.ClientSession, spec: bytes, field: str
) -> None:
    reply = await call(http, "POST", sim.url + "/__faults", data=spec)

    assert reply.status == 400
    assert field in reply.json()["error"]
    assert (await call(http, "GET", sim.url + "/__faults")).json()["cheqpay"] == []


async def test_delete_faults_clears_the_queues(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await queue_fault(http, sim, "cheqpay", "503", count=3)
    await queue_fault(http, sim, "kushki", "reset")

    cleared = await call(http, "DELETE", sim.url + "/__faults")
    reply = await create(http, sim, "cheqpay")

    assert cleared.json() == {"cleared": 4}
    assert reply.status == 201


# --- stats and reset ---------------------------------------------------------------------------


async def test_stats_count_per_account_and_never_show_credentials(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await create(http, sim, "billpocket")
    await create(http, sim, "cheqpay")
    await create(http, sim, "cheqpay", headers={"x-api-key": "invalid"})

    reply = await call(http, "GET", sim.url + "/__stats")
    counts = reply.json()

    assert {key: counts[key] for key in ("requests", "created", "throttled", "injected")} == {
        "requests": 3,
        "created": 2,
        "throttled": 0,
        "injected": 0,
    }
    billpocket = account_label("billpocket", "bp-api-key-1", "bp-user-token-1")
    assert counts["accounts"][billpocket] == {
        "requests": 1,
        "created": 1,
        "throttled": 0,
        "max_per_window": 1,
        "limit": None,
    }
    assert set(counts["accounts"]) == {billpocket, account_label("cheqpay", "cheqpay-key-1")}
    for secret in ("bp-api-key-1", "bp-user-token-1", "cheqpay-key-1"):
        assert secret not in reply.text
    assert sim.state.stats() == counts


async def test_links_lists_created_links(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    url = (await create(http, sim, "kushki")).json()["smartLinkUrl"]

    (link,) = await links(http, sim)

    assert link == {
        "provider": "kushki",
        "account": account_label("kushki", "kushki-private-1"),
        "id": url.rsplit("/", 1)[1],
        "url": url,
        "identity": None,
    }


async def test_reset_clears_stats_links_and_faults(
    sim: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    await create(http, sim, "billpocket")
    await queue_fault(http, sim, "billpocket", "503")

    reply = await call(http, "POST", sim.url + "/__reset")
    counts = await stats(http, sim)
    again = await create(http, sim, "billpocket")  # same url_path: free again, no fault left

    assert reply.status == 200
    assert counts == {
        "requests": 0,
        "created": 0,
        "throttled": 0,
        "injected": 0,
        "duplicates": 0,
        "max_per_window": 0,
        "accounts": {},
    }
    assert again.status == 202
    assert len(await links(http, sim)) == 1


# --- command line ------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulator.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_defaults() -> None:
    config = simulator.config_from_args(parse([]))

    assert config == SimulatorConfig(port=8099)


def test_cli_options_build_the_config() -> None:
    argv = ["--port", "0", "--latency-ms", "5", "--rate-per-s", "20", "--error-rate", "0.1"]
    argv += ["--slow-rate", "0.5", "--slow-ms", "300", "--seed", "3", "--host", "localhost"]

    config = simulator.config_from_args(parse(argv))

    assert config == SimulatorConfig(
        host="localhost",
        port=0,
        latency_ms=5,
        rate_per_s=20,
        error_rate=0.1,
        slow_rate=0.5,
        slow_ms=300,
        seed=3,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--error-rate", "1.5"], "fraction from 0 to 1"),
        (["--slow-rate", "-0.1"], "must be a number >= 0"),
        (["--latency-ms", "abc"], "is not a number"),
        (["--slow-ms", "inf"], "must be a number >= 0"),
        (["--rate-per-s", "0.5"], "must be >= 1"),
        (["--port", "99999"], "port from 0 to 65535"),
    ],
)
def test_cli_refuses_bad_values_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse(argv)

    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert argv[0] in error and message in error


CLI_SCRIPT = (
    "import argparse, sys; from worker import simulator; p = argparse.ArgumentParser(); "
    "simulator.add_arguments(p); "
    "sys.exit(simulator.run_from_args(p.parse_args(['--port', '0'])))"
)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
async def test_cli_prints_its_url_serves_and_stops_cleanly_on_a_signal(
    http: aiohttp.ClientSession, stop_signal: signal.Signals
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLI_SCRIPT,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first_line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        match = re.fullmatch(
            r"linkworker simulator listening on (http://127\.0\.0\.1:\d+)\n", first_line
        )
        assert match, first_line
        reply = await call(
            http,
            "POST",
            match[1] + "/lps/payment-links",
            body=cheqpay_body(),
            headers=CHEQPAY_HEADERS,
        )
        process.send_signal(stop_signal)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert reply.status == 201
    assert process.returncode == 0
    assert "Traceback" not in stderr.decode()
    assert "requests=1, created=1" in stderr.decode()


async def test_cli_reports_a_port_in_use(sim: RunningSimulator) -> None:
    port = sim.url.rsplit(":", 1)[1]
    script = CLI_SCRIPT.replace("'0'", repr(port))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 20)

    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr.decode()
