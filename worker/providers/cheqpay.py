"""Cheqpay payment links (Mexico): `POST /lps/payment-links`, authenticated with `x-api-key`.

The payload model is the documented request body, camelCase as Cheqpay spells it. Two fields
are filled when the job leaves them out (or null): `reference` = the job's dedupe key, the only
handle an operator has to find a link whose answer was lost, and `isDraft` = false.

Answers: 200 or 201 with the link entity: `url` is the payable link, `id` (else `_id`) its id.
Errors are `{"error": {"code", "message", "details": [{"field", "message"}]}}`. A 409
`DUPLICATE` is a PermanentError for now: a link with this reference may already exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from worker.errors import ProviderError
from worker.jobs import Job, LinkCreated, ProviderRequest
from worker.providers import common
from worker.settings import CheqpayAccount, LaneSettings

NAME = "cheqpay"
PATH = "/lps/payment-links"

# The amount unit of links is not documented (orders use cents); numbers are sent as given.
NonNegative = Annotated[common.Number, Field(ge=0)]


class CheqpayProduct(BaseModel):
    """One product line; the docs mark none of its fields required."""

    model_config = common.CAMEL_STRICT

    id: str | None = None
    name: str | None = None
    description: str | None = None
    image_url: str | None = None
    qty: Annotated[common.Number, Field(gt=0)] | None = None
    price: NonNegative | None = None
    total: NonNegative | None = None
    is_qty_adjustable: bool | None = None
    min_qty: NonNegative | None = None
    max_qty: NonNegative | None = None


class CheqpayTotals(BaseModel):
    """The link's totals; `total` is what the payer is charged, so it is required."""

    model_config = common.CAMEL_STRICT

    total: NonNegative
    taxes: NonNegative | None = None
    shipping: NonNegative | None = None
    fees: NonNegative | None = None
    discounts: NonNegative | None = None


class CheqpayAddress(BaseModel):
    """A prefilled shipping address for customer-choice links."""

    model_config = common.CAMEL_STRICT

    first_name: str | None = None
    last_name: str | None = None
    organization_name: str | None = None
    email: str | None = None
    phone: str | None = None
    address_line1: str | None = None
    address_line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None


class CheqpayBillingAddress(CheqpayAddress):
    """A prefilled billing address; it may say it is the same as the shipping one."""

    is_same_as_shipping: bool | None = None


class CheqpayDefaults(BaseModel):
    """Default customer data for customer-choice links."""

    model_config = common.CAMEL_STRICT

    billing_address: CheqpayBillingAddress | None = None
    shipping_address: CheqpayAddress | None = None


class CheqpayPaymentLink(BaseModel):
    """The body of a payment-link create.

    `isDraft` defaults to true at Cheqpay, and a draft link is probably not payable, so we send
    false unless the job says otherwise. `type` accepts `customer_choice` as well: the request
    enum lists only `products_subscriptions`, but `defaults` exists for customer-choice links
    and the response enum has both. `expiresAt` must carry a UTC offset (a bare local time is
    ambiguous); that it lies in the future is not checked here, as adapters read no clock.
    """

    model_config = common.CAMEL_STRICT

    products: list[CheqpayProduct] = Field(min_length=1)
    totals: CheqpayTotals
    payment_methods: list[Literal["CARD"]] = Field(min_length=1)
    type: Literal["products_subscriptions", "customer_choice"] | None = None
    currency: Literal["MXN", "USD"] | None = None
    number_of_payments: Annotated[int, Field(ge=1)] | None = None
    is_draft: bool | None = None
    is_enabled: bool | None = None
    redirect_url: Annotated[str, Field(pattern=r"^https?://")] | None = None
    reference: Annotated[str, Field(min_length=1)] | None = None
    defaults: CheqpayDefaults | None = None
    metadata: dict[str, Any] | None = None
    expires_at: str | None = None

    @field_validator("expires_at")
    @classmethod
    def _expires_at_has_an_offset(cls, value: str | None) -> str | None:
        return common.check_iso_datetime(value, need_offset=True)


def build_request(job: Job, account: LaneSettings) -> ProviderRequest:
    """Validate the job's payload and build the create request (see the module docstring)."""
    cheqpay = common.require_account(NAME, account, CheqpayAccount)
    link = common.validate_payload(CheqpayPaymentLink, job.payload)
    # Assignment (not model_copy) marks the fields set, so exclude_unset still dumps them.
    if link.reference is None:
        link.reference = job.dedupe_key
    if link.is_draft is None:
        link.is_draft = False
    auth = {"x-api-key": cheqpay.api_key.get_secret_value()}
    return common.json_request(PATH, job, auth, link)


def parse_response(status: int, headers: Mapping[str, str], body: bytes) -> LinkCreated:
    """A LinkCreated for a 200/201 carrying `url`, else the ProviderError to act on."""
    return common.parse_answer(RULES, status, headers, body)


def _error_fields(data: object) -> common.ErrorFields:
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        # Not Cheqpay's shape: perhaps a gateway in front of it; take what is recognisable.
        return common.scalar(data, "code"), common.scalar(data, "message")
    message = common.scalar(error, "message")
    details = _details(error.get("details"))
    if details:
        message = f"{message} ({details})" if message else details
    return common.scalar(error, "code"), message


def _details(details: object) -> str:
    if not isinstance(details, list):
        return ""
    parts = (
        f"{common.scalar(item, 'field') or '?'}: {common.scalar(item, 'message') or '?'}"
        for item in details
        if isinstance(item, dict)
    )
    return "; ".join(parts)


def _special(answer: common.Answer, code: str | None, message: str | None) -> ProviderError | None:
    if answer.status != 409 or code != "DUPLICATE":
        return None
    return common.permanent(
        answer,
        code,
        message,
        "a link with this reference may already exist, perhaps from an earlier attempt of this "
        "job whose answer was lost: look the job's reference up in the Cheqpay dashboard",
    )


def _external_id(data: dict[str, Any], url: str) -> str | None:
    return common.scalar(data, "id") or common.scalar(data, "_id")


RULES = common.ResponseRules(
    provider=NAME,
    success_statuses=frozenset({200, 201}),
    url_field="url",
    credential_keys=("api_key",),
    error_fields=_error_fields,
    external_id=_external_id,
    special=_special,
)
