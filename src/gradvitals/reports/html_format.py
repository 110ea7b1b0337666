"""Numbers as the HTML report reads and shows them (the JSON contract's values in,
text for people out). No torch here.
"""

from __future__ import annotations

import math
from typing import Any


def num(value: Any) -> float:
    """A series value from the JSON contract (number, "nan", "inf", "-inf", null)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fmt(v: Any) -> str:
    """A number for people: integers as is, others to 4 significant digits."""
    if isinstance(v, (bool, int)):
        return str(v)
    x = num(v)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.3e}"
