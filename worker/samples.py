"""Realistic job payloads for each provider, for the demo, the tests and the benchmark.

Each is the provider's own documented request body, shaped like a real invoice or plan; the
`bad_payload` ones fail validation in a way a producer could really get wrong.
"""

from __future__ import annotations

import json
import random
from typing import Any

PLANS = (("Starter", 15000), ("Hogar", 24990), ("Pro", 49990))


def billpocket_payload(n: int) -> dict[str, Any]:
    return {
        "expired_at": "2030-05-22T15:20:34",
        "amount": 150 + (n % 50) * 10,
        "type": 2,
        "description": f"Factura {100000 + n}",
        "rates": [{"months": "3", "type": "MSI"}],
        "is_fixed_term": False,
    }


def cheqpay_payload(n: int) -> dict[str, Any]:
    price = 1000 + (n % 90) * 100
    return {
        "products": [
            {
                "id": f"sku-{n % 7}",
                "name": "Suscripción mensual",
                "qty": 1,
                "price": price,
                "total": price,
            }
        ],
        "totals": {"total": price, "taxes": 0, "shipping": 0, "fees": 0, "discounts": 0},
        "paymentMethods": ["CARD"],
        "currency": "MXN",
        "isDraft": False,
        "redirectUrl": "https://shop.example.mx/gracias",
        "metadata": {"invoice": f"F-{200000 + n}"},
    }


def kushki_payload(n: int) -> dict[str, Any]:
    plan, amount = PLANS[n % len(PLANS)]
    return {
        "merchantName": "Merchant CL",
        "paymentConfig": {
            "paymentType": "unique",
            "amount": {"currency": "CLP", "subtotalIva": 0, "subtotalIva0": amount, "iva": 0},
            "paymentMethod": ["credit-card"],
        },
        "generalConfig": {
            "productName": f"Plan {plan} #{n}",
            "description": "<p>Cobertura completa</p>",
            "productImage": "https://kushki-static.s3.amazonaws.com/smartlinks/product-image.png",
            "brandLogo": "https://kushki-static.s3.amazonaws.com/smartlinks/logo.png",
            "executionLimit": 1,
            "showTimer": False,
            "enabled": True,
            "termsAndConditions": "",
        },
        "styleAndStructure": {"structure": "checkout"},
        "contact": {"email": "soporte@example.cl", "phoneNumber": "988238833"},
        "formConfig": [
            {
                "label": "E-mail",
                "type": "input",
                "split": False,
                "required": True,
                "disabled": False,
                "name": "email",
                "placeholder": "E-mail",
                "value": "",
            }
        ],
    }


GOOD = {"billpocket": billpocket_payload, "cheqpay": cheqpay_payload, "kushki": kushki_payload}


def good_payload(provider: str, n: int) -> dict[str, Any]:
    return GOOD[provider](n)


def bad_payload(provider: str, n: int) -> tuple[dict[str, Any], str]:
    """A payload that fails validation, and the field its error must name."""
    payload = good_payload(provider, n)
    if provider == "billpocket":
        payload["ammount"] = payload.pop("amount")  # a typo
        return payload, "ammount"
    if provider == "cheqpay":
        payload["totals"]["total"] = "doscientos"
        return payload, "totals.total"
    del payload["merchantName"]
    return payload, "merchantName"


def mixed_jobs(
    count: int, lanes: list[tuple[str, str]], *, bad_fraction: float = 0.0, seed: int = 7
) -> list[tuple[str, str, str, str | None]]:
    """`count` jobs spread over `lanes`: (provider, account, payload JSON, field named if bad)."""
    draw = random.Random(seed)
    jobs: list[tuple[str, str, str, str | None]] = []
    for n in range(count):
        provider, account = lanes[n % len(lanes)]
        if draw.random() < bad_fraction:
            payload, field = bad_payload(provider, n)
            jobs.append((provider, account, json.dumps(payload), field))
        else:
            jobs.append((provider, account, json.dumps(good_payload(provider, n)), None))
    return jobs
