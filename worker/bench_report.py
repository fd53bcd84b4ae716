"""What a benchmark run found: figures, their ceilings and targets, as a table and as JSON.

A figure is one measured number with its unit. A figure with a ceiling (the same thing done by
the simplest possible code on the same machine in the same run) also has a ratio to it, since
absolute numbers vary from machine to machine while ratios travel. A target, from issue 5, is
a bound on the value or on the ratio; `met` says whether this run reached it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Relation = Literal[">=", "<=", "<"]


class BenchError(Exception):
    """A scenario could not be measured; the message says why (and where the logs are)."""


@dataclass(frozen=True, slots=True)
class Target:
    """A bound on a figure's value, or on its ratio to its ceiling."""

    relation: Relation
    bound: float
    on: Literal["value", "ratio"] = "value"

    def met(self, number: float) -> bool:
        if self.relation == ">=":
            return number >= self.bound
        if self.relation == "<=":
            return number <= self.bound
        return number < self.bound

    def text(self) -> str:
        subject = "ratio " if self.on == "ratio" else ""
        return f"{subject}{self.relation} {format_number(self.bound)}"


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number, with what it is compared with."""

    name: str
    value: float
    unit: str
    ceiling: float | None = None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None or self.ceiling == 0:
            return None
        return self.value / self.ceiling

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        number = self.ratio if self.target.on == "ratio" else self.value
        return None if number is None else self.target.met(number)

    def to_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "unit": self.unit,
            "ceiling": self.ceiling,
            "ratio": self.ratio,
            "target": self.target.text() if self.target else None,
            "met": self.met,
        }


@dataclass(slots=True)
class ScenarioResult:
    """The figures of one scenario, plus the raw numbers behind them (`details`)."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)

    def to_json(self) -> dict[str, Any]:
        return {
            "elapsed_s": self.elapsed_s,
            "figures": {figure.name: figure.to_json() for figure in self.figures},
            "details": self.details,
        }


def format_number(number: float) -> str:
    """Readable at a glance: thousands separated, few decimals for small numbers."""
    if not math.isfinite(number):
        return str(number)
    size = abs(number)
    if size >= 100 or number == int(number):
        return f"{number:,.0f}"
    if size >= 1:
        return f"{number:.2f}"
    return f"{number:.3f}"


HEADER = ("scenario", "figure", "value", "ceiling", "ratio", "target", "met")


def table(results: Sequence[ScenarioResult]) -> str:
    """A plain-text table of every figure, one line each."""
    rows: list[tuple[str, ...]] = [HEADER]
    for result in results:
        for figure in result.figures:
            rows.append(_row(result.name, figure))
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _row(scenario: str, figure: Figure) -> tuple[str, ...]:
    ratio = figure.ratio
    met = figure.met
    return (
        scenario,
        figure.name,
        f"{format_number(figure.value)} {figure.unit}",
        "" if figure.ceiling is None else format_number(figure.ceiling),
        "" if ratio is None else f"{ratio:.3f}",
        figure.target.text() if figure.target else "",
        {True: "yes", False: "NO", None: ""}[met],
    )
