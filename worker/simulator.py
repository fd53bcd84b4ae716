"""Provider simulator: one local aiohttp server speaking the three providers' link APIs.

It stands in for the real providers in tests, demos and load tests, with the request and answer
shapes documented in the providers' notes:

    Billpocket  POST /v1/custom-link                202 + link object (`custom_link_path`)
                GET  /v1/custom-link?url_path=X     200 {"data": [link...]} (path inferred)
    Cheqpay     POST /lps/payment-links             201 + payment-link entity (`url`)
                GET  /lps/payment-links/{id}        200 entity (by `id` or `_id`) or 404
    Kushki      POST /smartlink/v2/smart-link       201 {"smartLinkUrl": ...}
                GET  /smartlink/v2/smart-link/{id}  200 link object or 404

Every endpoint wants the provider's auth headers, non-empty; a credential starting with `invalid`
is refused (401) and a Billpocket one starting with `forbidden` is forbidden (403). Reads see
only the caller's own links and are neither counted nor rate limited. Behaviour the worker
relies on: Billpocket `url_path` is unique per account (422 "has already been taken"), Cheqpay
`reference` is not unique, and Kushki honours `Idempotency-Key` per account (a repeat replays
the first 201 and creates nothing, also after a fault spoiled the first answer).

A create request goes through these steps, all decided at arrival, before any waiting:

    auth -> rate limit -> queued fault, else random 503 -> validation -> create -> late fault
    then: latency (+ slow) -> answer

The rate limit is strict and per account (a hash of the credentials, see `account_label`): at
most `limit` arrivals in any sliding one-second window, every arrival counted, throttled ones
too; the rest get 429 with `Retry-After: 1`. Faults come from a per-provider FIFO queue filled
through `POST /__faults` (deterministic, for tests) or at random (`error_rate`, `slow_rate`).
Early faults (`500`, `502`, `503`, `504`, `408`, `400`, `429`, `html`, `reset`) answer without
creating; late ones (`500_after_create`, `timeout_after_create`, `malformed`, `no_url`) let the
create happen and spoil its success answer. A late fault meeting a request that fails on its
own (bad body, taken url_path) is spent and the real answer goes out.

Introspection: `GET /__stats`, `GET /__links`, `GET|POST|DELETE /__faults`, `POST /__reset`.

Handlers are plain dict checks over the stdlib json module: a create costs about 25 us of
simulator code, and one core serves about 8-9k creates a second. A created link costs about
1.2 KB (mostly the JSON a read-back returns), so 100k links hold about 120 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import re
import signal
import socket
import struct
import sys
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, NoReturn

from aiohttp import web

from worker.arguments import non_negative

__all__ = [
    "FAULTS",
    "PROVIDERS",
    "SIMULATOR_KEY",
    "AccountStats",
    "Answer",
    "Link",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "SimulatorState",
    "account_label",
    "add_arguments",
    "config_from_args",
    "create_app",
    "parse_fault_spec",
    "run_from_args",
    "running_simulator",
    "start_simulator",
]

PROVIDERS = ("billpocket", "cheqpay", "kushki")
# Faults answered at once, without reading the body or creating anything.
_EARLY_FAULTS = frozenset({"500", "502", "503", "504", "408", "400", "429", "reset", "html"})
# Faults that let the create happen and then spoil its success answer.
_LATE_FAULTS = frozenset({"500_after_create", "timeout_after_create", "malformed", "no_url"})
FAULTS = _EARLY_FAULTS | _LATE_FAULTS
TIMEOUT_AFTER_CREATE_S = 30.0
MAX_FAULT_COUNT = 1_000_000
WINDOW_S = 1.0

BILLPOCKET_DOMAIN = "https://test.pay.billpocket.com"
BILLPOCKET_MAIN_LINK = "linkworker"
CHEQPAY_CHECKOUT = "https://checkout.cheqpay.dev/pl/"
KUSHKI_LINK_HOST = "https://uat.kshk.co/"

_JSON = "application/json"
_RETRY_AFTER = {"Retry-After": "1"}
_URL_PATH = re.compile(r"[A-Za-z0-9_-]{1,100}")
_SLUG_UNSAFE = re.compile(r"[^a-z0-9]")
_DIGITS = re.compile(r"[0-9]{1,3}")
_KUSHKI_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
_MALFORMED_BODY = b'{"url": "ht'
_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_INVALID = object()  # what _parse_json returns for a body that is not JSON


# --- configuration ----------------------------------------------------------------------------


@dataclass
class SimulatorConfig:
    """How the simulator behaves; every field is checked at construction (ValueError)."""

    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0
    # Strict per-account limit: arrivals allowed in any sliding one-second window (None: none).
    rate_per_s: float | None = None
    # Limit per account label (see account_label), overriding rate_per_s.
    account_rates: dict[str, float] = field(default_factory=dict)
    # Fraction of create requests answered 503 without creating a link.
    error_rate: float = 0
    # Fraction of requests delayed by an extra slow_ms.
    slow_rate: float = 0
    slow_ms: float = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be from 0 to 65535, not {self.port}")
        for name in ("latency_ms", "slow_ms"):
            _check_non_negative(name, getattr(self, name))
        for name in ("error_rate", "slow_rate"):
            _check_fraction(name, getattr(self, name))
        if self.rate_per_s is not None:
            _check_limit("rate_per_s", self.rate_per_s)
        for label, limit in self.account_rates.items():
            _check_limit(f"account_rates[{label!r}]", limit)


def _check_non_negative(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction from 0 to 1, not {value!r}")


def _check_limit(name: str, value: float) -> None:
    # The window is one second, so a limit below 1 could only mean "refuse everything".
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name} must be a number >= 1 (requests per second), not {value!r}")


def account_label(provider: str, *credentials: str) -> str:
    """The account's name in stats: provider plus a short hash, so no credential is ever shown."""
    joined = "\x00".join(credentials).encode("utf-8", "surrogateescape")
    return f"{provider}:{hashlib.sha256(joined).hexdigest()[:12]}"


# --- state ------------------------------------------------------------------------------------


class Link(NamedTuple):
    """One created link. `entity` is the JSON a read-back returns (Kushki: the request body)."""

    provider: str
    account: str
    id: str
    url: str
    identity: str | None  # Idempotency-Key, else reference / url_path; None: never a duplicate
    entity: bytes


@dataclass(slots=True, eq=False)
class AccountStats:
    """One account's counters and its sliding window of arrival times."""

    label: str
    limit: float | None
    requests: int = 0
    created: int = 0
    throttled: int = 0
    max_per_window: int = 0
    arrivals: deque[float] = field(default_factory=deque, repr=False)
    identities: set[str] = field(default_factory=set, repr=False)

    def admit(self, now: float) -> bool:
        """Record an arrival at `now` (seconds); True when it is within the limit.

        Arrivals at or before `now - 1 s` leave the window and this one joins it, admitted or
        not, as a provider counts every call. A window's population peaks right after an
        arrival, so the largest population seen here is the busiest one-second window.
        """
        arrivals = self.arrivals
        horizon = now - WINDOW_S
        while arrivals and arrivals[0] <= horizon:
            arrivals.popleft()
        arrivals.append(now)
        population = len(arrivals)
        if population > self.max_per_window:
            self.max_per_window = population
        return self.limit is None or population <= self.limit


@dataclass(slots=True)
class _PendingFault:
    fault: str
    remaining: int


class SimulatorState:
    """Counters, accounts, created links and queued faults; read it in-process or at /__stats."""

    def __init__(self, rate_per_s: float | None, account_rates: Mapping[str, float]) -> None:
        self._rate_per_s = rate_per_s
        self._account_rates = dict(account_rates)
        self.requests = 0
        self.created = 0
        self.throttled = 0
        self.injected = 0
        self.duplicates = 0
        self.accounts: dict[str, AccountStats] = {}
        self.links: list[Link] = []
        self.links_by_id: dict[tuple[str, str], Link] = {}  # (provider, id or _id)
        self.billpocket_paths: dict[tuple[str, str], Link] = {}  # (account, url_path)
        self.kushki_replays: dict[tuple[str, str], bytes] = {}  # (account, key) -> 201 body
        self.faults: dict[str, deque[_PendingFault]] = {name: deque() for name in PROVIDERS}

    def reset(self) -> None:
        """Forget every request, account, link and queued fault."""
        self.requests = self.created = self.throttled = self.injected = self.duplicates = 0
        self.accounts.clear()
        self.links.clear()
        self.links_by_id.clear()
        self.billpocket_paths.clear()
        self.kushki_replays.clear()
        self.clear_faults()

    def account(self, label: str) -> AccountStats:
        """The account's stats, created on its first request with its configured limit."""
        account = self.accounts.get(label)
        if account is None:
            limit = self._account_rates.get(label, self._rate_per_s)
            account = self.accounts[label] = AccountStats(label, limit)
        return account

    @property
    def max_per_window(self) -> int:
        """The most create requests any one account sent in one second."""
        return max((account.max_per_window for account in self.accounts.values()), default=0)

    def record(self, account: AccountStats, link: Link, *aliases: str) -> None:
        """Store a created link; count it as a duplicate if its identity was used before."""
        self.created += 1
        account.created += 1
        if link.identity is not None:
            if link.identity in account.identities:
                self.duplicates += 1
            else:
                account.identities.add(link.identity)
        self.links.append(link)
        for link_id in (link.id, *aliases):
            self.links_by_id[(link.provider, link_id)] = link

    def queue_fault(self, provider: str, fault: str, count: int) -> int:
        """Queue `count` faults for the provider's next creates; returns how many are pending."""
        self.faults[provider].append(_PendingFault(fault, count))
        return sum(pending.remaining for pending in self.faults[provider])

    def pop_fault(self, provider: str) -> str | None:
        """The next queued fault for the provider, if any (FIFO)."""
        queue = self.faults[provider]
        if not queue:
            return None
        head = queue[0]
        head.remaining -= 1
        if head.remaining == 0:
            queue.popleft()
        return head.fault

    def clear_faults(self) -> int:
        """Drop every queued fault; returns how many there were."""
        dropped = sum(pending.remaining for queue in self.faults.values() for pending in queue)
        for queue in self.faults.values():
            queue.clear()
        return dropped

    def pending_faults(self) -> dict[str, list[dict[str, Any]]]:
        """Queued faults per provider, in the order they will be used."""
        return {
            provider: [{"fault": p.fault, "count": p.remaining} for p in queue]
            for provider, queue in self.faults.items()
        }

    def stats(self) -> dict[str, Any]:
        """The /__stats document."""
        return {
            "requests": self.requests,
            "created": self.created,
            "throttled": self.throttled,
            "injected": self.injected,
            "duplicates": self.duplicates,
            "max_per_window": self.max_per_window,
            "accounts": {label: _account_stats(a) for label, a in self.accounts.items()},
        }

    def links_document(self) -> list[dict[str, Any]]:
        """The /__links document: every created link, oldest first."""
        return [
            {
                "provider": link.provider,
                "account": link.account,
                "id": link.id,
                "url": link.url,
                "identity": link.identity,
            }
            for link in self.links
        ]


def _account_stats(account: AccountStats) -> dict[str, Any]:
    return {
        "requests": account.requests,
        "created": account.created,
        "throttled": account.throttled,
        "max_per_window": account.max_per_window,
        "limit": account.limit,
    }


# --- answers and request checks -----------------------------------------------------------------


class Answer(NamedTuple):
    """A decided answer; built at arrival, sent after the latency."""

    status: int
    body: bytes
    content_type: str = _JSON
    headers: Mapping[str, str] | None = None
    hold_s: float = 0.0  # extra wait before answering (timeout_after_create)
    drop: bool = False  # close the connection instead of answering (reset)


_DROP = Answer(0, b"", drop=True)


def _dumps(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _answer(status: int, document: object) -> Answer:
    return Answer(status, _dumps(document))


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _parse_json(raw: bytes) -> Any:
    """The parsed body, or _INVALID when it is not strict JSON (NaN and Infinity are not)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _INVALID


class _Rule(NamedTuple):
    """One field check: the dotted path, whether it must be present, and what a bad value is."""

    path: tuple[str, ...]
    required: bool
    accepts: Callable[[Any], bool]
    problem: str

    @property
    def name(self) -> str:
        return ".".join(self.path)


def _rule(name: str, required: bool, accepts: Callable[[Any], bool], problem: str) -> _Rule:
    return _Rule(tuple(name.split(".")), required, accepts, problem)


# (field, problem); a None problem means the field is missing.
Violation = tuple[str, str | None]


def _violations(body: dict[str, Any], rules: tuple[_Rule, ...]) -> list[Violation]:
    """Every rule broken by `body`; a field below a broken one is not checked again."""
    found: list[Violation] = []
    broken: set[tuple[str, ...]] = set()
    for rule in rules:
        if broken and any(rule.path[:end] in broken for end in range(1, len(rule.path) + 1)):
            continue
        value = _dig(body, rule.path)
        if value is None:
            if rule.required:
                found.append((rule.name, None))
                broken.add(rule.path)
        elif not rule.accepts(value):
            found.append((rule.name, rule.problem))
            broken.add(rule.path)
    return found


def _dig(body: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = body
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)  # bool is not a number here


def _is_positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_non_negative_number(value: Any) -> bool:
    return _is_number(value) and value >= 0


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_filled_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_object(value: Any) -> bool:
    return isinstance(value, dict)


def _is_array(value: Any) -> bool:
    return isinstance(value, list)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return type(value) is int


# --- providers ----------------------------------------------------------------------------------


class _CreateRequest(NamedTuple):
    account: AccountStats
    body: dict[str, Any]
    raw: bytes
    idempotency_key: str | None


class _Provider(ABC):
    """What differs between the APIs: paths, auth, error bodies, validation and the link."""

    name: ClassVar[str]
    create_path: ClassVar[str]
    read_path: ClassVar[str]
    success_status: ClassVar[int]
    url_field: ClassVar[str]
    status_bodies: ClassVar[dict[int, bytes]]  # 408, 429 and 5xx answers
    validation_fault_body: ClassVar[bytes]  # the "400" fault
    rules: ClassVar[tuple[_Rule, ...]]
    not_an_object: ClassVar[str]  # the problem with a body that is not a JSON object

    def __init__(self, state: SimulatorState, rng: random.Random) -> None:
        self.state = state
        self.rng = rng

    @abstractmethod
    def authenticate(self, headers: Mapping[str, str]) -> str | Answer:
        """The account label, or the refusal to send."""

    @abstractmethod
    def rejection(self, violations: list[Violation]) -> Answer:
        """The validation-error answer for a body breaking these rules."""

    @abstractmethod
    def create(self, request: _CreateRequest) -> Answer:
        """Create the link (or refuse to) and return the answer."""

    @abstractmethod
    def read(self, label: str, request: web.Request) -> Answer:
        """The read-back endpoint."""

    def validate(self, body: Any) -> Answer | None:
        """None for a valid body, else the provider's validation-error answer."""
        if not isinstance(body, dict):
            return self.rejection([("body", self.not_an_object)])
        violations = _violations(body, self.rules)
        return self.rejection(violations) if violations else None

    def status_error(self, status: int) -> Answer:
        headers = _RETRY_AFTER if status == 429 else None
        return Answer(status, self.status_bodies[status], headers=headers)

    def validation_fault(self) -> Answer:
        return Answer(400, self.validation_fault_body)

    def without_url(self, body: bytes) -> bytes:
        document = json.loads(body)
        document.pop(self.url_field, None)
        return _dumps(document)

    def hex_id(self, digits: int) -> str:
        return f"{self.rng.getrandbits(digits * 4):0{digits}x}"


def _coded_bodies(
    make: Callable[[str, str], object], texts: dict[int, tuple[str, str]]
) -> dict[int, bytes]:
    """Error bodies per status, from (code, message) pairs."""
    return {status: _dumps(make(code, message)) for status, (code, message) in texts.items()}


# Billpocket ----------------------------------------------------------------------------------


def _is_url_path(value: Any) -> bool:
    return isinstance(value, str) and _URL_PATH.fullmatch(value) is not None


def _is_local_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_rate(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    months = value.get("months")
    months_ok = _is_integer(months) or (isinstance(months, str) and _DIGITS.fullmatch(months))
    return bool(months_ok) and isinstance(value.get("type", ""), str)


def _is_rates(value: Any) -> bool:
    return isinstance(value, list) and all(_is_rate(item) for item in value)


class _Billpocket(_Provider):
    name = "billpocket"
    create_path = "/v1/custom-link"
    read_path = "/v1/custom-link"
    success_status = 202
    url_field = "custom_link_path"
    status_bodies = _coded_bodies(
        lambda _code, message: {"message": message},  # Laravel-style: a message, no code
        {
            408: ("", "Request Timeout"),
            429: ("", "Too Many Attempts."),
            500: ("", "Server Error"),
            502: ("", "Bad Gateway"),
            503: ("", "Service Unavailable"),
            504: ("", "Gateway Timeout"),
        },
    )
    validation_fault_body = _dumps(
        {"message": "The given data was invalid.", "errors": {"amount": ["The amount is invalid."]}}
    )
    # Laravel-style messages: "The <field> <problem>".
    rules = (
        _rule("amount", True, _is_positive_number, "must be a number greater than 0."),
        _rule("url_path", False, _is_url_path, "format is invalid."),
        _rule("description", False, _is_text, "must be a string."),
        _rule("type", False, _is_integer, "must be an integer."),
        _rule("expired_at", False, _is_local_datetime, "is not a valid date."),
        _rule("is_fixed_term", False, _is_bool, "field must be true or false."),
        _rule("rates", False, _is_rates, "must be a list of {months, type}."),
    )
    not_an_object = "must be a JSON object."
    _unauthenticated = _dumps({"message": "Unauthenticated."})
    _forbidden = _dumps({"message": "This action is unauthorized."})

    def authenticate(self, headers: Mapping[str, str]) -> str | Answer:
        api_key = headers.get("X-Api-Key", "")
        token = headers.get("BP-User-Token", "")
        if not api_key or not token or api_key.startswith("invalid") or token.startswith("invalid"):
            return Answer(401, self._unauthenticated)
        if api_key.startswith("forbidden") or token.startswith("forbidden"):
            return Answer(403, self._forbidden)
        return account_label(self.name, api_key, token)

    def rejection(self, violations: list[Violation]) -> Answer:
        errors: dict[str, list[str]] = {}
        for name, problem in violations:
            human = name.replace("_", " ")
            text = "field is required." if problem is None else problem
            errors.setdefault(name, []).append(f"The {human} {text}")
        return _answer(422, {"message": "The given data was invalid.", "errors": errors})

    def create(self, request: _CreateRequest) -> Answer:
        label = request.account.label
        sent_path = request.body.get("url_path")
        if sent_path is not None and (label, sent_path) in self.state.billpocket_paths:
            taken = "The url path has already been taken."
            return _answer(422, {"message": taken, "errors": {"url_path": [taken]}})
        url_path = sent_path or self._fresh_path(label)
        entity = self._entity(label, url_path, request.body)
        body = _dumps(entity)
        identity = request.idempotency_key or sent_path
        link = Link(self.name, label, entity["id"], entity["custom_link_path"], identity, body)
        self.state.record(request.account, link)
        self.state.billpocket_paths[(label, url_path)] = link
        return Answer(202, body)

    def _fresh_path(self, label: str) -> str:
        while True:
            url_path = f"link-{self.hex_id(16)}"
            if (label, url_path) not in self.state.billpocket_paths:
                return url_path

    def _entity(self, label: str, url_path: str, body: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        rates = [
            {"type": rate.get("type"), "months": int(rate["months"])}
            for rate in body.get("rates") or ()
        ]
        return {
            "description": body.get("description"),
            "link_type": body.get("type", 1),
            "user_id": int(label.partition(":")[2][:6], 16),
            "amount": body["amount"],
            "available_rates": rates,
            "expired_at": body.get("expired_at"),
            "custom_link_path": f"{BILLPOCKET_DOMAIN}/{BILLPOCKET_MAIN_LINK}/{url_path}",
            "purchase_id": None,
            "currency": "MXN",
            "domain": BILLPOCKET_DOMAIN,
            "created_at": now,
            "is_fixed_term": body.get("is_fixed_term", False),
            "status": 1,
            "updated_at": now,
            "extra_info": None,
            "id": self.hex_id(37),
            "main_link": BILLPOCKET_MAIN_LINK,
            "secondary_link": url_path,
        }

    def read(self, label: str, request: web.Request) -> Answer:
        url_path = request.query.get("url_path")
        if url_path is not None:
            found = self.state.billpocket_paths.get((label, url_path))
            entities = [found.entity] if found is not None else []
        else:
            entities = [
                link.entity
                for link in self.state.links
                if link.account == label and link.provider == self.name
            ]
        return Answer(200, b'{"data":[' + b",".join(entities) + b"]}")


# Cheqpay -------------------------------------------------------------------------------------


def _is_object_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, dict) for v in value)


def _is_card_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(v == "CARD" for v in value)


def _is_currency(value: Any) -> bool:
    return value in ("MXN", "USD")


def _is_payment_count(value: Any) -> bool:
    return _is_number(value) and value >= 1


def _is_cheqpay_type(value: Any) -> bool:
    return value in ("products_subscriptions", "customer_choice")


def _cheqpay_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# Optional request fields echoed in the entity when sent.
_CHEQPAY_ECHOES = ("numberOfPayments", "redirectUrl", "reference", "defaults", "expiresAt")


class _Cheqpay(_Provider):
    name = "cheqpay"
    create_path = "/lps/payment-links"
    read_path = "/lps/payment-links/{link_id}"
    success_status = 201
    url_field = "url"
    status_bodies = _coded_bodies(
        _cheqpay_error,
        {
            408: ("REQUEST_TIMEOUT", "Request timeout"),
            429: ("RATE_LIMIT_EXCEEDED", "Rate limit exceeded"),
            500: ("INTERNAL_ERROR", "Internal server error"),
            502: ("BAD_GATEWAY", "Bad gateway"),
            503: ("SERVICE_UNAVAILABLE", "Service unavailable"),
            504: ("GATEWAY_TIMEOUT", "Gateway timeout"),
        },
    )
    validation_fault_body = _dumps(
        {
            "error": {
                "code": "VALIDATION_ERROR",
                "message": "Validation failed",
                "details": [{"field": "totals.total", "message": "is invalid"}],
            }
        }
    )
    rules = (
        _rule("products", True, _is_object_list, "must be a non-empty array of objects"),
        _rule("totals", True, _is_object, "must be an object"),
        _rule("totals.total", True, _is_number, "must be a number"),
        _rule("paymentMethods", True, _is_card_list, 'must be a non-empty array of "CARD"'),
        _rule("currency", False, _is_currency, "must be one of MXN, USD"),
        _rule("type", False, _is_cheqpay_type, "must be products_subscriptions or customer_choice"),
        _rule("numberOfPayments", False, _is_payment_count, "must be a number >= 1"),
        _rule("isDraft", False, _is_bool, "must be a boolean"),
        _rule("isEnabled", False, _is_bool, "must be a boolean"),
        _rule("redirectUrl", False, _is_text, "must be a string"),
        _rule("reference", False, _is_text, "must be a string"),
        _rule("defaults", False, _is_object, "must be an object"),
        _rule("metadata", False, _is_object, "must be an object"),
        _rule("expiresAt", False, _is_local_datetime, "must be a date-time string"),
    )
    not_an_object = "must be a JSON object"
    _unauthorized = _dumps(_cheqpay_error("UNAUTHORIZED", "Invalid or missing API key"))
    _not_found = _dumps(_cheqpay_error("NOT_FOUND", "Payment link not found"))

    def authenticate(self, headers: Mapping[str, str]) -> str | Answer:
        api_key = headers.get("x-api-key", "")
        if not api_key or api_key.startswith("invalid"):
            return Answer(401, self._unauthorized)
        return account_label(self.name, api_key)

    def rejection(self, violations: list[Violation]) -> Answer:
        details = [
            {"field": name, "message": "is required" if problem is None else problem}
            for name, problem in violations
        ]
        error = {"code": "VALIDATION_ERROR", "message": "Validation failed", "details": details}
        return _answer(400, {"error": error})

    def create(self, request: _CreateRequest) -> Answer:
        label = request.account.label
        entity = self._entity(label, request.body)
        body = _dumps(entity)
        identity = request.idempotency_key or request.body.get("reference")
        link = Link(self.name, label, entity["id"], entity["url"], identity, body)
        self.state.record(request.account, link, entity["_id"])
        return Answer(201, body)

    def _entity(self, label: str, body: dict[str, Any]) -> dict[str, Any]:
        link_id = f"pl_{self.hex_id(24)}"
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        entity = {
            "_id": self.hex_id(24),
            "url": CHEQPAY_CHECKOUT + link_id,
            "id": link_id,
            "merchantId": f"mer_{label.partition(':')[2]}",
            "type": body.get("type") or "products_subscriptions",
            "products": body["products"],
            "currency": body.get("currency") or "MXN",
            "totals": body["totals"],
            "paymentMethods": body["paymentMethods"],
            "isDraft": body.get("isDraft", True),
            "isEnabled": body.get("isEnabled", True),
            "metadata": body.get("metadata") or {},
        }
        entity.update((key, body[key]) for key in _CHEQPAY_ECHOES if body.get(key) is not None)
        entity["createdAt"] = entity["updatedAt"] = stamp
        return entity

    def read(self, label: str, request: web.Request) -> Answer:
        link = self.state.links_by_id.get((self.name, request.match_info["link_id"]))
        if link is None or link.account != label:
            return Answer(404, self._not_found)
        entity = json.loads(link.entity)
        entity["merchant"] = {"name": "Simulated merchant", "country": "MX", "language": "es"}
        return _answer(200, entity)


# Kushki --------------------------------------------------------------------------------------


def _kushki_error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


def _kushki_slug(merchant_name: str) -> str:
    return _SLUG_UNSAFE.sub("-", merchant_name.lower())


_KUSHKI_INVALID_BODY = "El cuerpo de la petición es inválido."


class _Kushki(_Provider):
    name = "kushki"
    create_path = "/smartlink/v2/smart-link"
    read_path = "/smartlink/v2/smart-link/{link_id}"
    success_status = 201
    url_field = "smartLinkUrl"
    status_bodies = _coded_bodies(
        _kushki_error,
        {
            408: ("K408", "Request timeout"),
            429: ("K429", "Too many requests have been sent in a short period of time"),
            500: ("K002", "Ha ocurrido un error inesperado"),
            502: ("K502", "Bad gateway"),
            503: ("K503", "Service unavailable"),
            504: ("K504", "Gateway timeout"),
        },
    )
    validation_fault_body = _dumps({"code": "K001", "message": _KUSHKI_INVALID_BODY})
    rules = (
        _rule("publicMerchantId", True, _is_filled_text, "debe ser un texto no vacío"),
        _rule("merchantName", True, _is_filled_text, "debe ser un texto no vacío"),
        _rule("paymentConfig", True, _is_object, "debe ser un objeto"),
        _rule("paymentConfig.paymentType", True, _is_filled_text, "debe ser un texto no vacío"),
        _rule("paymentConfig.amount", True, _is_object, "debe ser un objeto"),
        _rule("paymentConfig.amount.subtotalIva", True, _is_non_negative_number, "debe ser >= 0"),
        _rule("paymentConfig.amount.subtotalIva0", True, _is_non_negative_number, "debe ser >= 0"),
        _rule("paymentConfig.amount.iva", True, _is_non_negative_number, "debe ser >= 0"),
        _rule("paymentConfig.amount.currency", True, _is_filled_text, "debe ser un texto"),
        _rule("generalConfig", True, _is_object, "debe ser un objeto"),
        _rule("styleAndStructure", True, _is_object, "debe ser un objeto"),
        _rule("contact", True, _is_object, "debe ser un objeto"),
        _rule("formConfig", True, _is_array, "debe ser un arreglo"),
    )
    not_an_object = "debe ser un objeto JSON"
    _invalid_merchant = _dumps({"code": "K004", "message": "Id de comercio no válido"})
    _not_found = _dumps({"code": "K404", "message": "Smartlink no encontrado"})

    def authenticate(self, headers: Mapping[str, str]) -> str | Answer:
        merchant_id = headers.get("Private-Merchant-Id", "")
        if not merchant_id or merchant_id.startswith("invalid"):
            return Answer(401, self._invalid_merchant)
        return account_label(self.name, merchant_id)

    def rejection(self, violations: list[Violation]) -> Answer:
        name, problem = violations[0]  # Kushki names the first bad field only
        why = "es requerido" if problem is None else problem
        return _answer(400, {"code": "K001", "message": f"{_KUSHKI_INVALID_BODY} {name} {why}"})

    def create(self, request: _CreateRequest) -> Answer:
        label, key = request.account.label, request.idempotency_key
        replay = self.state.kushki_replays.get((label, key)) if key is not None else None
        if replay is not None:
            return Answer(201, replay)
        link_id = self._fresh_id()
        url = f"{KUSHKI_LINK_HOST}{_kushki_slug(request.body['merchantName'])}/{link_id}"
        body = _dumps({"smartLinkUrl": url})
        self.state.record(request.account, Link(self.name, label, link_id, url, key, request.raw))
        if key is not None:
            # Kept even when a late fault spoils this answer: the link exists, so a retry with
            # the same key must find it rather than create a second one.
            self.state.kushki_replays[(label, key)] = body
        return Answer(201, body)

    def _fresh_id(self) -> str:
        while True:
            link_id = "".join(self.rng.choices(_KUSHKI_ID_ALPHABET, k=9))
            if (self.name, link_id) not in self.state.links_by_id:
                return link_id

    def read(self, label: str, request: web.Request) -> Answer:
        link = self.state.links_by_id.get((self.name, request.match_info["link_id"]))
        if link is None or link.account != label:
            return Answer(404, self._not_found)
        document = {**json.loads(link.entity), "id": link.id, "smartLinkUrl": link.url}
        return _answer(200, document)


# --- the server ---------------------------------------------------------------------------------

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    """The simulated providers: state, fault injection and the aiohttp handlers."""

    def __init__(
        self, config: SimulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.state = SimulatorState(config.rate_per_s, config.account_rates)
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._closing = asyncio.Event()
        providers = (_Billpocket, _Cheqpay, _Kushki)
        self.providers: dict[str, _Provider] = {
            provider.name: provider(self.state, self._rng) for provider in providers
        }

    def make_app(self) -> web.Application:
        """An application serving the provider endpoints and the /__ control endpoints."""
        app = web.Application()
        app[SIMULATOR_KEY] = self
        for provider in self.providers.values():
            app.router.add_post(provider.create_path, self._create_handler(provider))
            app.router.add_get(provider.read_path, self._read_handler(provider))
        app.router.add_get("/__stats", self._stats)
        app.router.add_get("/__links", self._links)
        app.router.add_get("/__faults", self._list_faults)
        app.router.add_post("/__faults", self._queue_faults)
        app.router.add_delete("/__faults", self._clear_faults)
        app.router.add_post("/__reset", self._reset)
        app.on_shutdown.append(self._on_shutdown)
        return app

    # create ---------------------------------------------------------------------------------

    def _create_handler(self, provider: _Provider) -> _Handler:
        async def create(request: web.Request) -> web.StreamResponse:
            raw = await request.read()
            return await self._send(request, self.decide_create(provider, request.headers, raw))

        return create

    def decide_create(self, provider: _Provider, headers: Mapping[str, str], raw: bytes) -> Answer:
        """Everything a create does at arrival: counting, limiting, faults and the create."""
        self.state.requests += 1
        label = provider.authenticate(headers)
        if isinstance(label, Answer):
            return label
        account = self.state.account(label)
        account.requests += 1
        if not account.admit(self._clock()):
            account.throttled += 1
            self.state.throttled += 1
            return provider.status_error(429)
        fault = self._next_fault(provider.name)
        if fault is not None and fault in _EARLY_FAULTS:
            self.state.injected += 1
            return _early_fault(provider, fault)
        answer = self._create(provider, account, headers, raw)
        return answer if fault is None else self._late_fault(provider, fault, answer)

    def _next_fault(self, provider: str) -> str | None:
        fault = self.state.pop_fault(provider)
        if fault is None and self.config.error_rate and self._rng.random() < self.config.error_rate:
            return "503"
        return fault

    def _create(
        self, provider: _Provider, account: AccountStats, headers: Mapping[str, str], raw: bytes
    ) -> Answer:
        body = _parse_json(raw)
        rejection = provider.validate(body)
        if rejection is not None:
            return rejection
        key = headers.get("Idempotency-Key") or None
        return provider.create(_CreateRequest(account, body, raw, key))

    def _late_fault(self, provider: _Provider, fault: str, answer: Answer) -> Answer:
        """Spoil a success answer; a request that failed on its own keeps its real answer."""
        if answer.status != provider.success_status:
            return answer
        self.state.injected += 1
        if fault == "500_after_create":
            return provider.status_error(500)
        if fault == "timeout_after_create":
            return answer._replace(hold_s=TIMEOUT_AFTER_CREATE_S)
        if fault == "malformed":
            return Answer(answer.status, _MALFORMED_BODY)
        return Answer(answer.status, provider.without_url(answer.body))  # no_url

    # read -----------------------------------------------------------------------------------

    def _read_handler(self, provider: _Provider) -> _Handler:
        async def read(request: web.Request) -> web.StreamResponse:
            label = provider.authenticate(request.headers)
            answer = label if isinstance(label, Answer) else provider.read(label, request)
            return await self._send(request, answer)

        return read

    # answering ------------------------------------------------------------------------------

    async def _send(self, request: web.Request, answer: Answer) -> web.StreamResponse:
        await self._pause()
        drop = answer.drop
        if answer.hold_s:
            drop = await self._hold(answer.hold_s)
        if drop:
            _drop_connection(request)
        return web.Response(
            status=answer.status or 500,
            body=answer.body,
            content_type=answer.content_type,
            headers=answer.headers,
        )

    async def _pause(self) -> None:
        delay_ms = self.config.latency_ms
        if self.config.slow_rate and self._rng.random() < self.config.slow_rate:
            delay_ms += self.config.slow_ms
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)

    async def _hold(self, seconds: float) -> bool:
        """Wait `seconds`; True (drop the connection) if the server shuts down meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._closing.set()

    # control --------------------------------------------------------------------------------

    async def _stats(self, _request: web.Request) -> web.StreamResponse:
        return _control(200, self.state.stats())

    async def _links(self, _request: web.Request) -> web.StreamResponse:
        return _control(200, self.state.links_document())

    async def _list_faults(self, _request: web.Request) -> web.StreamResponse:
        return _control(200, self.state.pending_faults())

    async def _queue_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            provider, fault, count = parse_fault_spec(await request.read())
        except ValueError as exc:
            return _control(400, {"error": str(exc)})
        pending = self.state.queue_fault(provider, fault, count)
        return _control(
            200, {"provider": provider, "fault": fault, "count": count, "pending": pending}
        )

    async def _clear_faults(self, _request: web.Request) -> web.StreamResponse:
        return _control(200, {"cleared": self.state.clear_faults()})

    async def _reset(self, _request: web.Request) -> web.StreamResponse:
        self.state.reset()
        return _control(200, {"reset": True})


SIMULATOR_KEY = web.AppKey("linkworker.simulator", Simulator)


def _early_fault(provider: _Provider, fault: str) -> Answer:
    if fault == "reset":
        return _DROP
    if fault == "html":
        return Answer(502, _HTML_502, content_type="text/html")
    if fault == "400":
        return provider.validation_fault()
    return provider.status_error(int(fault))


def _drop_connection(request: web.Request) -> None:
    """Close the connection with a TCP reset; aiohttp then skips the answer without logging."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _control(status: int, document: object) -> web.Response:
    return web.Response(status=status, body=_dumps(document), content_type=_JSON)


def parse_fault_spec(raw: bytes) -> tuple[str, str, int]:
    """(provider, fault, count) from a /__faults body; ValueError names the bad field."""
    spec = _parse_json(raw)
    if not isinstance(spec, dict):
        raise ValueError('body must be a JSON object like {"provider": "cheqpay", "fault": "503"}')
    unknown = sorted(set(spec) - {"provider", "fault", "count"})
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    provider, fault, count = spec.get("provider"), spec.get("fault"), spec.get("count", 1)
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if not isinstance(fault, str) or fault not in FAULTS:
        raise ValueError(f"fault must be one of {', '.join(sorted(FAULTS))}, not {fault!r}")
    if not _is_integer(count) or not 1 <= count <= MAX_FAULT_COUNT:
        raise ValueError(f"count must be an integer from 1 to {MAX_FAULT_COUNT}, not {count!r}")
    return provider, fault, count


def create_app(config: SimulatorConfig) -> web.Application:
    """A fresh simulator as an aiohttp application; its Simulator is at app[SIMULATOR_KEY]."""
    return Simulator(config).make_app()


# --- running it ---------------------------------------------------------------------------------


class RunningSimulator:
    """A simulator listening on a real socket; close() stops it (also an async context manager)."""

    def __init__(self, url: str, simulator: Simulator, runner: web.AppRunner) -> None:
        self.url = url
        self.simulator = simulator
        self._runner = runner
        self._closed = False

    @property
    def state(self) -> SimulatorState:
        return self.simulator.state

    async def close(self) -> None:
        """Stop listening and end held requests; safe to call twice."""
        if not self._closed:
            self._closed = True
            await self._runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def start_simulator(config: SimulatorConfig) -> RunningSimulator:
    """Start a simulator on config.host:config.port (0: a free port, read back from the socket)."""
    simulator = Simulator(config)
    # handler_cancellation: a client that gives up (e.g. on timeout_after_create) ends its handler.
    runner = web.AppRunner(
        simulator.make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=5.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return RunningSimulator(_base_url(config.host, port), simulator, runner)


@contextlib.asynccontextmanager
async def running_simulator(config: SimulatorConfig) -> AsyncIterator[RunningSimulator]:
    """`async with running_simulator(config) as sim:` starts and always stops a simulator."""
    running = await start_simulator(config)
    try:
        yield running
    finally:
        await running.close()


def _base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


# --- command line -------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = non_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction from 0 to 1, e.g. 0.05")
    return value


def _rate(text: str) -> float:
    value = non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be >= 1: the limit counts requests in a one-second window"
        )
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port from 0 to 65535")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to `parser` (see config_from_args)."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    add(
        "--port",
        type=_port,
        default=8099,
        help="TCP port; 0 picks a free one, shown on the first output line (default: %(default)s)",
    )
    add(
        "--latency-ms",
        type=non_negative,
        default=0.0,
        metavar="MS",
        help="delay added to every answer (default: 0)",
    )
    add(
        "--rate-per-s",
        type=_rate,
        default=None,
        metavar="N",
        help="strict limit per account: at most N create requests in any one-second window; "
        "the rest get 429 with Retry-After: 1 (default: unlimited)",
    )
    add(
        "--error-rate",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="fraction of create requests answered 503 without creating a link (default: 0)",
    )
    add(
        "--slow-rate",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="fraction of requests delayed by an extra --slow-ms (default: 0)",
    )
    add(
        "--slow-ms",
        type=non_negative,
        default=0.0,
        metavar="MS",
        help="extra delay of a slow request (default: 0)",
    )
    add("--seed", type=int, default=None, help="random seed, to repeat a run's faults and ids")


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The SimulatorConfig for options added by add_arguments."""
    return SimulatorConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        rate_per_s=args.rate_per_s,
        error_rate=args.error_rate,
        slow_rate=args.slow_rate,
        slow_ms=args.slow_ms,
        seed=args.seed,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean stop, 1 when the address cannot be used.

    The first line on stdout is `linkworker simulator listening on http://HOST:PORT`, flushed,
    so a parent process can read the port chosen for `--port 0`.
    """
    config = config_from_args(args)
    try:
        return asyncio.run(_serve(config))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(
            f"linkworker simulator: cannot listen on {config.host}:{config.port}: {reason}",
            file=sys.stderr,
        )
        return 1


async def _serve(config: SimulatorConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        async with running_simulator(config) as running:
            print(f"linkworker simulator listening on {running.url}", flush=True)
            await stop.wait()
            summary = running.state.stats()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    with contextlib.suppress(OSError):
        keys = ("requests", "created", "throttled", "injected", "duplicates", "max_per_window")
        print(
            "linkworker simulator stopped: " + ", ".join(f"{k}={summary[k]}" for k in keys),
            file=sys.stderr,
        )
    return 0
