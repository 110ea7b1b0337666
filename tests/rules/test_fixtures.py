"""The rules on small real runs recorded by ``gv.watch`` and saved as JSON
(``tests/fixtures``), re-diagnosed without torch: regression anchors for the
thresholds, calibrated on these very numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradvitals.diagnose import diagnose, verdict
from gradvitals.record import Record

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def findings(name: str) -> dict:
    record = Record.from_json(json.loads((FIXTURES / f"{name}.json").read_text()))
    found = diagnose(record)
    return {"all": found, "by_code": {f.code: f for f in found}, "verdict": verdict(found)}


def test_sigmoid_stack_vanishes_and_plateaus():
    r = findings("sigmoid8_vanishing")
    van = r["by_code"]["vanishing_gradients"]
    assert van.layers[0] == "0" and van.evidence["gap_orders"] > 3
    assert r["by_code"]["loss_plateau"].caused_by == "vanishing_gradients"


def test_learning_rate_too_high_warns_steps_before_the_nan():
    r = findings("lr_too_high_nan")
    exp, nan = r["by_code"]["exploding_gradients"], r["by_code"]["nonfinite"]
    assert exp.evidence["warning_steps"] == nan.step - exp.step > 0
    assert nan.caused_by == "exploding_gradients" and exp.caused_by == "update_ratio_high"
    assert r["all"][0].code == "update_ratio_high"
    assert r["verdict"].startswith("BROKEN: root cause update_ratio_high")


def test_negative_bias_kills_relus():
    r = findings("dead_relu6")
    assert r["all"][0].code == "dead_relu" and r["all"][0].severity == "critical"


@pytest.mark.parametrize("name", ["healthy_he6"])
def test_healthy_fixture_has_no_problem(name):
    r = findings(name)
    assert [f for f in r["all"] if f.severity != "info"] == [], r["verdict"]
