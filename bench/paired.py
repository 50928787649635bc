"""Paired comparisons for the benchmark programs: rotated run order, per-run ratios.

On a shared machine the load drifts between runs far more than the sides of
one comparison differ. So every program here runs each side once per
repetition, in an order that rotates from repetition to repetition (no side
always goes first, or always follows a heavy one), and compares sides within
a repetition: run i of A over run i of B. The ratio reported is the median
of those per-run ratios, with their min, max and every run, never a ratio
of two medians (which pairs figures measured at different times).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: The keys of every paired figure (`paired_ratio`, `spread`).
PAIRED_KEYS = ("median", "min", "max", "runs")


def rotated(order: Sequence[T], rep: int) -> list[T]:
    """`order` started at position `rep` (mod its length): repetition `rep`'s run order."""
    if not order:
        return []
    k = rep % len(order)
    return [*order[k:], *order[:k]]


def spread(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max and every value of `values` (non-empty), rounded."""
    if not values:
        raise ValueError("no runs")
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Run i's numerator over run i's denominator for every i, as `spread` gives it.

    Both sequences hold one figure per repetition, in repetition order (the
    two sides measured in the same repetition share an index).
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"unpaired runs: {len(numerators)} against {len(denominators)}")
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    if not all(math.isfinite(r) and r > 0 for r in ratios):
        raise ValueError(f"a run gave no figure: {ratios}")
    return spread(ratios)


def format_paired(ratio: dict[str, Any]) -> str:
    """One line: `median (min-max, n runs)`."""
    return f"{ratio['median']} ({ratio['min']}-{ratio['max']}, {len(ratio['runs'])} runs)"
