"""The pipeline runs one way: record -> diagnose (pure) -> report -> renderers.

diagnose writes nothing into the record; a rule another rule reads runs once per
diagnosis; renderers and fixes do not import the layers above them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from gradvitals import rules
from gradvitals.diagnose import diagnose
from gradvitals.record import Record
from gradvitals.report import Report
from gradvitals.rules import gradients, updates


FIXTURES = Path(__file__).parent / "fixtures"


def _nan_after_growth_record() -> Record:
    """A recorded run whose learning rate is too high: its gradients grow into a NaN,
    so both exploding_gradients and update_ratio_high have something to say."""
    return Report.load(FIXTURES / "lr_too_high_nan.json").record


@pytest.fixture
def failing_rule(monkeypatch):
    def broken_rule(record):
        raise RuntimeError("boom")

    monkeypatch.setattr(rules, "RULES", [*rules.RULES, broken_rule])
    return broken_rule


def test_diagnose_writes_nothing_into_the_record_and_returns_the_failed_rules(failing_rule):
    rec = _nan_after_growth_record()
    before = json.dumps(rec.to_json(), sort_keys=True)
    found = diagnose(rec)
    assert json.dumps(rec.to_json(), sort_keys=True) == before
    assert found.rule_errors == [{"rule": "broken_rule", "error": "RuntimeError('boom')"}]
    assert "nonfinite" in [f.code for f in found]  # the other rules' findings are kept


def test_the_report_writes_each_failed_rule_once_as_a_rule_error_event(failing_rule):
    rec = _nan_after_growth_record()
    diagnose(rec)  # an earlier diagnosis (the live status line, TensorBoard) leaves no trace
    data = Report.from_record(rec).to_json()
    errors = [e for e in data["run"]["events"] if e["type"] == "rule_error"]
    assert errors == [{"type": "rule_error", "rule": "broken_rule", "error": "RuntimeError('boom')"}]
    # loaded back, the saved report keeps them; re-diagnosed, the new diagnosis's replace them
    again = Report.from_json(json.loads(json.dumps(data)))
    assert [e for e in again.to_json()["run"]["events"] if e["type"] == "rule_error"] == errors
    fresh = Report.from_json(json.loads(json.dumps(data)), rediagnose=True)
    assert [e for e in fresh.to_json()["run"]["events"] if e["type"] == "rule_error"] == errors


def test_a_rule_another_rule_reads_runs_once_per_diagnosis(monkeypatch):
    calls = []
    original = gradients.exploding_gradients

    def counted(record):
        calls.append(record)
        return original(record)

    monkeypatch.setattr(gradients, "exploding_gradients", counted)
    monkeypatch.setattr(updates, "exploding_gradients", counted, raising=False)
    monkeypatch.setattr(rules, "RULES", [counted if r is original else r for r in rules.RULES])
    rec = _nan_after_growth_record()
    found = diagnose(rec)
    assert {"exploding_gradients", "update_ratio_high"} <= {f.code for f in found}
    assert len(calls) == 1
    # called on its own, outside a diagnosis, a rule still computes what it reads
    updates.update_ratio_high(rec)
    assert len(calls) == 2


def test_rich_prints_a_report_through_the_terminal_renderer():
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(Report.from_record(_nan_after_growth_record()))
    assert "BROKEN" in out.getvalue() and "nonfinite" in out.getvalue()


@pytest.mark.parametrize("code, absent", [
    # the HTML renderer draws a report; it never diagnoses
    ("import gradvitals.reports.html as h, gradvitals.report as r, gradvitals.record as c;"
     "h.render_html(r.Report(record=c.Record()).to_json())", "gradvitals.diagnose"),
    # a fix reads the topology probe, not the checkup above it
    ("import torch, gradvitals.fixes.init as f; m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU());"
     "f.init_(m, torch.randn(2, 3))", "gradvitals.preflight"),
])
def test_lower_layers_do_not_import_higher_ones(code, absent):
    out = subprocess.run([sys.executable, "-c", f"{code}; import sys; print({absent!r} in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


#: Layers from the bottom up; a module may import its own layer and those below, at
#: the top or inside a function (the package facade, ``gradvitals/__init__.py``, may
#: reach any layer lazily).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("record", "findings", "taxonomy", "torch_compat"),
    ("rules", "probes"),
    ("diagnose", "fixes", "coverage"),
    ("report", "importers", "compare"),
    ("reports",),
    ("distributed", "recorder", "preflight", "watcher", "runner", "autosave", "_autosave_writer",
     "integrations", "prescribe", "demo", "cli"),
)


def _layer(module: str) -> int | None:
    head = module.split(".")[0]
    return next((i for i, names in enumerate(LAYERS) if head in names), None)


def test_no_module_imports_a_layer_above_its_own():
    import ast

    src = Path(__file__).parents[1] / "src" / "gradvitals"
    wrong = []
    for path in sorted(src.rglob("*.py")):
        own = path.relative_to(src).with_suffix("").parts
        if own[-1] == "__init__":
            own = own[:-1]
        mine = _layer(".".join(own)) if own else None
        if mine is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            package = own if path.name == "__init__.py" else own[:-1]
            base = package[: max(len(package) - (node.level - 1), 0)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                wrong.append(f"{'.'.join(own)} imports {target} (line {node.lineno})")
    assert wrong == []
