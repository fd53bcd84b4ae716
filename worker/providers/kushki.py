"""Kushki Smartlinks v2: `POST /smartlink/v2/smart-link`, authenticated with `Private-Merchant-Id`.

The payload model is the documented body: every top-level field is required, except that
`publicMerchantId` is filled from `providers.kushki.public_merchant_id` when the job has none.
Nested objects the docs only show by example accept extra keys; the amount object, which Kushki
documents as a model, does not. Amounts are decimal major units; CLP has no minor unit, so CLP
amounts must be whole numbers. Image URLs must be https.

Answers: 201 (200 accepted too) with `{"smartLinkUrl": ...}` and nothing else; the id is the
URL's last path segment (ids contain `-` and `_`). Errors are `{"code": "K001", "message": ...}`.
`K002` ("unexpected error") on any status is an unknown outcome, since the link may have been
saved; `K004` (invalid merchant id) means the lane's credentials are wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, GetPydanticSchema, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError, core_schema

from worker.errors import InvalidPayloadError, ProviderError
from worker.jobs import Job, LinkCreated, ProviderRequest
from worker.providers import common
from worker.settings import KushkiAccount, LaneSettings

NAME = "kushki"
PATH = "/smartlink/v2/smart-link"

NonNegative = Annotated[common.Number, Field(ge=0)]

# The docs conflict: the subscription sample sends "subscription", other integrations send
# ["credit-card"]. Accept either; one error message for both shapes.
PaymentMethod = Annotated[
    str | list[str],
    GetPydanticSchema(
        lambda _source, _handler: core_schema.union_schema(
            [
                core_schema.str_schema(strict=True, min_length=1),
                core_schema.list_schema(core_schema.str_schema(strict=True), min_length=1),
            ],
            custom_error_type="payment_method_type",
            custom_error_message="Input should be a string or a non-empty list of strings",
        )
    ),
]


class KushkiAmount(BaseModel):
    """Kushki's amount model: the total is the sum of the parts, each in major units."""

    model_config = common.CAMEL_STRICT

    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    subtotal_iva: NonNegative
    subtotal_iva0: NonNegative
    iva: NonNegative
    ice: NonNegative | None = None
    extra_taxes: dict[str, NonNegative] | None = None

    @field_validator("subtotal_iva", "subtotal_iva0", "iva", "ice", "extra_taxes")
    @classmethod
    def _whole_pesos_for_clp(cls, value: Any, info: ValidationInfo) -> Any:
        # currency is declared first, so it is already in info.data when valid.
        if info.data.get("currency") != "CLP":
            return value
        parts = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(part, float) and not part.is_integer() for part in parts):
            raise PydanticCustomError("clp_fraction", "CLP amounts must be whole pesos")
        return value


def _check_start_date(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        date.fromisoformat(value)
    except ValueError:
        raise PydanticCustomError("date_format", "Input should be a date like 2030-03-12") from None
    return value


class KushkiSubscriptionOptions(BaseModel):
    """The recurring charge of a subscription link; `startDate` is YYYY-MM-DD."""

    model_config = common.CAMEL_OPEN

    amount: KushkiAmount | None = None
    periodicity: str | None = None
    plan_name: str | None = None
    start_date: str | None = None
    terms: str | None = None

    @field_validator("start_date")
    @classmethod
    def _start_date_is_a_date(cls, value: str | None) -> str | None:
        return _check_start_date(value)


class KushkiMixedOptions(BaseModel):
    """Instalment settings of a mixed link (seen in integrations, not in the docs)."""

    model_config = common.CAMEL_OPEN

    number_of_fees: Annotated[int, Field(ge=1)] | None = None
    subscription_day: int | None = None
    periodicity: str | None = None


class KushkiPaymentConfig(BaseModel):
    """What is charged and how: `paymentType` is e.g. "unique" or "subscription"."""

    model_config = common.CAMEL_OPEN

    payment_type: Annotated[str, Field(min_length=1)]
    amount: KushkiAmount
    payment_method: PaymentMethod
    subscription_options: KushkiSubscriptionOptions | None = None
    mixed_options: KushkiMixedOptions | None = None


class KushkiGeneralConfig(BaseModel):
    """What the payer sees; the docs are incomplete, so unknown keys pass through."""

    model_config = common.CAMEL_OPEN

    product_name: str | None = None
    description: str | None = None
    product_image: str | None = None
    brand_logo: str | None = None
    execution_limit: Annotated[int, Field(ge=0)] | None = None
    show_timer: bool | None = None
    enabled: bool | None = None
    terms_and_conditions: str | None = None
    promotional_text: str | None = None
    buy_button_text: str | None = None

    @field_validator("product_image", "brand_logo")
    @classmethod
    def _images_are_https(cls, value: str | None) -> str | None:
        return common.check_https(value)


class KushkiStyle(BaseModel):
    """Page structure and colours."""

    model_config = common.CAMEL_OPEN

    structure: str | None = None
    primary_color: str | None = None
    secondary_color: str | None = None


class KushkiContact(BaseModel):
    """The merchant's contact shown to the payer."""

    model_config = common.CAMEL_OPEN

    email: str | None = None
    phone_number: str | None = None


class KushkiFormField(BaseModel):
    """One field of the payer form; select and radio fields may carry undocumented options."""

    model_config = common.CAMEL_OPEN

    label: str | None = None
    type: Literal["input", "select", "date", "area", "checkbox", "radio"] | None = None
    split: bool | None = None
    required: bool | None = None
    disabled: bool | None = None
    name: str | None = None
    placeholder: str | None = None
    value: str | None = None


class KushkiSmartlink(BaseModel):
    """The body of a Smartlink v2 create. Unknown top-level keys are refused."""

    model_config = common.CAMEL_STRICT

    public_merchant_id: Annotated[str, Field(min_length=1)] | None = None
    merchant_name: Annotated[str, Field(min_length=1)]
    payment_config: KushkiPaymentConfig
    general_config: KushkiGeneralConfig
    style_and_structure: KushkiStyle
    contact: KushkiContact
    form_config: list[KushkiFormField]


def build_request(job: Job, account: LaneSettings) -> ProviderRequest:
    """Validate the job's payload and build the create request (see the module docstring)."""
    kushki = common.require_account(NAME, account, KushkiAccount)
    link = common.validate_payload(KushkiSmartlink, job.payload)
    if link.public_merchant_id is None:
        if not kushki.public_merchant_id:
            raise InvalidPayloadError(
                common.payload_problems(
                    [
                        "publicMerchantId: missing, and providers.kushki.public_merchant_id "
                        "(or the account's public_merchant_id) is not set to fill it"
                    ]
                )
            )
        link.public_merchant_id = kushki.public_merchant_id  # assignment marks it set
    auth = {"Private-Merchant-Id": kushki.private_merchant_id.get_secret_value()}
    return common.json_request(PATH, job, auth, link)


def parse_response(status: int, headers: Mapping[str, str], body: bytes) -> LinkCreated:
    """A LinkCreated for a 200/201 carrying `smartLinkUrl`, else the ProviderError to act on."""
    return common.parse_answer(RULES, status, headers, body)


def _error_fields(data: object) -> common.ErrorFields:
    return common.scalar(data, "code"), common.scalar(data, "message")


def _special(answer: common.Answer, code: str | None, message: str | None) -> ProviderError | None:
    if code == "K002":
        return common.unknown(
            answer, code, message, "Kushki's 'unexpected error', possibly after the link was saved"
        )
    if code == "K004":
        return common.credentials_rejected(
            answer, code, message, ("private_merchant_id", "public_merchant_id")
        )
    return None


def _external_id(data: dict[str, Any], url: str) -> str | None:
    return common.last_path_segment(url)


RULES = common.ResponseRules(
    provider=NAME,
    success_statuses=frozenset({200, 201}),
    url_field="smartLinkUrl",
    credential_keys=("private_merchant_id",),
    error_fields=_error_fields,
    external_id=_external_id,
    special=_special,
)
