"""How reports write numbers: metrics to 3 decimals, bytes with thousands separators and
a KB/MB reading, seconds to 1 decimal, and a dash for what was not measured."""

from __future__ import annotations

import math
from typing import Any

MISSING = "-"


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (absent, NaN, a string such as "nan")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric(value: Any) -> str:
    """An evaluation or training figure (accuracy, loss, ROUGE-L): 3 decimals."""
    number = _number(value)
    return MISSING if number is None else f"{number:.3f}"


def seconds(value: Any) -> str:
    """A duration in seconds: 1 decimal."""
    number = _number(value)
    return MISSING if number is None else f"{number:.1f}"


def megabytes(value: Any) -> str:
    """A memory figure already in MB: whole megabytes."""
    number = _number(value)
    return MISSING if number is None else f"{number:,.0f}"


def count(value: Any) -> str:
    """An exact count (bytes, examples, parameters) with thousands separators."""
    number = _number(value)
    return MISSING if number is None else f"{number:,.0f}"


def size(value: Any) -> str:
    """A byte count for reading: `764,470 B (0.76 MB)`; KB and MB are 1,000 and 1,000,000
    bytes, as link speeds are."""
    number = _number(value)
    if number is None:
        return MISSING
    if number < 1e3:
        return f"{number:,.0f} B"
    unit, scale = ("MB", 1e6) if number >= 1e6 else ("KB", 1e3)
    return f"{number:,.0f} B ({number / scale:.2f} {unit})"
