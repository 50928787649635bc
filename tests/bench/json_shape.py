"""Checks of the benchmark programs' JSON shape, shared by the smoke tests here."""

from __future__ import annotations

import math
from typing import Any

PAIRED_KEYS = {"median", "min", "max", "runs"}


def assert_positive(where: object, *values: float) -> None:
    """Every value is a finite number above zero."""
    for v in values:
        assert isinstance(v, int | float), (where, v)
        assert math.isfinite(v), (where, v)
        assert v > 0, (where, v)


def assert_paired(name: str, ratio: dict[str, Any], runs: int) -> None:
    """A paired ratio (bench/paired.py): one finite positive ratio per run, summarised."""
    assert set(ratio) == PAIRED_KEYS, (name, ratio)
    assert len(ratio["runs"]) == runs, (name, ratio)
    assert_positive(name, ratio["median"], ratio["min"], ratio["max"], *ratio["runs"])
    assert ratio["min"] == min(ratio["runs"]), (name, ratio)
    assert ratio["max"] == max(ratio["runs"]), (name, ratio)
    assert ratio["min"] <= ratio["median"] <= ratio["max"], (name, ratio)
