"""Secrets out of text: what the worker stores, logs or sends is passed through a Scrubber."""

from __future__ import annotations

from collections.abc import Iterable


class Scrubber:
    """Replaces every known secret value in a text with `***`."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # longest first, so a secret containing another is replaced whole; very short values
        # are no secrets worth the false hits
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text
