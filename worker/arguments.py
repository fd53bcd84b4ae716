"""Argument types and help shared by every `linkworker` command (argparse `type=` functions).

Each raises argparse.ArgumentTypeError with a sentence naming the bad value.
"""

from __future__ import annotations

import argparse
import math

CONFIG_HELP = "TOML configuration file (default: $LINKWORKER_CONFIG; env vars override it)"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number >= 0")
    return value
