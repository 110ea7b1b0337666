"""The one number formatter the reports share (HTML, terminal summary, status line)."""
from __future__ import annotations

import math

import pytest

from gradvitals.reports.html_format import fmt


@pytest.mark.parametrize("value, kwargs, text", [
    (3, {}, "3"),
    (True, {}, "True"),
    (0.0, {}, "0"),
    (0.5, {}, "0.5"),
    (1e-3, {}, "0.001"),
    (9.99e-4, {}, "9.990e-04"),
    (12345.0, {}, "1.234e+04"),
    (12345.0, {"sci": 2}, "1.23e+04"),
    (0.5, {"sci": 2, "plain": False}, "5.00e-01"),
    (math.nan, {}, "NaN"),
    ("nan", {}, "NaN"),
    (None, {}, "NaN"),
    ("-inf", {"plain": False}, "-Inf"),
    (math.inf, {"sci": 2}, "Inf"),
])
def test_fmt_at_its_edges(value, kwargs, text):
    assert fmt(value, **kwargs) == text
