"""Numbers as the reports read and show them (the JSON contract's values in, text for
people out): the HTML report, the terminal summary and the live status line share
:func:`fmt`. No torch here.
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


def fmt(v: Any, sci: int = 3, plain: bool = True) -> str:
    """A number for people: integers as is, others to 4 significant digits between 1e-3
    and 1e4 (``plain``), in scientific notation with ``sci`` decimals elsewhere (and
    everywhere when not ``plain``: a column of norms spanning decades reads best so)."""
    if isinstance(v, (bool, int)):
        return str(v)
    x = num(v)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    if plain and (x == 0 or 1e-3 <= abs(x) < 1e4):
        return f"{x:.4g}"
    return f"{x:.{sci}e}"
