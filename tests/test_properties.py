"""Property-based tests of the torch-free layers: record -> rules -> report -> JSON.

Whatever the series hold (finite, NaN, +-Inf, huge, tiny, constant, decimated), the
rules never crash, the report is strict JSON (``allow_nan=False``) and it validates
against the shipped schema ``gradvitals.report/1``; a saved report loads back to the
same JSON.
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradvitals.diagnose import diagnose
from gradvitals.findings import CODES, SEVERITIES, Finding
from gradvitals.record import QUANTITIES, LayerInfo, ParamInfo, Record, Series
from gradvitals.report import Report, schema

VALIDATOR = jsonschema.Draft202012Validator(schema())

#: Hypothesis examples per property: enough to hit NaN/Inf/decimation mixes, cheap
#: on the shared 2-core machine (each example runs every rule once).
EXAMPLES = 60

# Values a measured quantity can take: ordinary, extreme, and non-finite.
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, -1e300, 1e-12, 1.0, math.nan, math.inf, -math.inf]),
)

KINDS = ["Linear", "ReLU", "Sigmoid", "Tanh", "Conv2d", "BatchNorm2d", "LayerNorm", "Embedding", "GELU",
         "LSTM", "Dropout", "MultiheadAttention"]
PER_LAYER = [name for name, q in QUANTITIES.items() if q.per != "run"]  # per layer or per parameter


@st.composite
def records(draw: st.DrawFn) -> Record:
    """A plausible record: layers with params, per-layer and run-level series, events."""
    cap = draw(st.sampled_from([16, 32, 1000]))
    rec = Record(cap=cap)
    n_layers = draw(st.integers(0, 6))
    steps = draw(st.integers(0, 120))
    rec.steps = steps
    rec.run["steps"] = steps
    names = []
    for i in range(n_layers):
        kind = draw(st.sampled_from(KINDS))
        name = str(i)
        has_params = kind not in ("ReLU", "Sigmoid", "Tanh", "GELU", "Dropout")
        params = [f"{name}.weight", f"{name}.bias"] if has_params else []
        rec.layers[name] = LayerInfo(
            name=name, kind=kind, depth=draw(st.one_of(st.none(), st.just(i))), params=params,
            activation_after=draw(st.one_of(st.none(), st.sampled_from(["relu", "ReLU", "sigmoid", "Tanh", "gelu"]))),
            out_features=draw(st.one_of(st.none(), st.integers(1, 64))),
        )
        for p in params:
            rec.params[p] = ParamInfo(name=p, layer=name, shape=[4, 4] if p.endswith("weight") else [4],
                                      numel=16 if p.endswith("weight") else 4,
                                      requires_grad=draw(st.booleans()),
                                      in_optimizer=draw(st.one_of(st.none(), st.booleans())),
                                      grad_seen=draw(st.booleans()))
            names.append(p)
        names.append(name)
    keys = ["loss", "grad_norm_global", "lr/opt.0", "clip_total_norm", "clip_clipped", "clip_max_norm"]
    keys += [f"{q}/{n}" for q in PER_LAYER for n in names]
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=12)) if keys else []
    for key in chosen:
        # A series is recorded every step, on a schedule, or from some step on.
        start = draw(st.integers(0, max(steps - 1, 0)))
        every = draw(st.sampled_from([1, 1, 5, 25]))
        pattern = draw(st.sampled_from(["random", "constant", "growing", "shrinking"]))
        base = draw(values)
        for step in range(start, steps, every):
            if pattern == "random":
                v = draw(values)
            elif pattern == "constant":
                v = base
            elif pattern == "growing":
                v = base * 1.5 ** (step - start) if math.isfinite(base) else base
            else:
                v = base * 0.5 ** (step - start) if math.isfinite(base) else base
            rec.add(key, step, v)
    for _ in range(draw(st.integers(0, 2))):
        rec.event("nonfinite_origin", step=draw(st.integers(0, max(steps, 0))),
                  module=draw(st.one_of(st.none(), st.sampled_from(names or ["x"]))),
                  kind=draw(st.sampled_from(["activation", "gradient", "loss", "weight"])),
                  value=draw(st.sampled_from(["nan", "inf"])), op=draw(st.sampled_from(["log", "linear", None])))
    if draw(st.booleans()):
        rec.event("probe_error", probe="activations", error="RuntimeError: x", step=0)
    return rec


def _strict(data: dict) -> str:
    return json.dumps(data, allow_nan=False)  # raises on a bare NaN/Inf


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_rules_never_crash_and_report_is_strict_valid_json(rec):
    findings = diagnose(rec)  # a rule that raises is returned as a rule error: forbid that
    assert not findings.rule_errors, findings.rule_errors
    assert all(isinstance(f, Finding) and f.code in CODES for f in findings)
    data = Report(record=rec, findings=findings).to_json()
    text = _strict(data)
    VALIDATOR.validate(json.loads(text))
    for key, s in data["series"].items():
        assert len(s["steps"]) == len(s["values"]), key
        assert s["steps"] == sorted(s["steps"]), key
        assert len(s["steps"]) <= rec.cap + 1, key  # bounded: cap kept points + the last one


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=records())
def test_saved_report_loads_back_to_the_same_json(rec, tmp_path_factory):
    report = Report.from_record(rec)
    path = tmp_path_factory.mktemp("rt") / "r.json"
    report.save(path)
    again = Report.load(path)
    first = json.loads(path.read_text())
    assert again.to_json() == first
    assert [f.code for f in again.findings] == report.codes
    # and the rules read a reloaded record without crashing either
    assert not diagnose(again.record).rule_errors


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(values, min_size=1, max_size=400), st.sampled_from([2, 3, 16, 64]))
def test_series_keeps_exact_summaries_under_decimation(vals, cap):
    s = Series(cap=cap)
    for i, v in enumerate(vals):
        s.append(i, v)
    fin = [(i, v) for i, v in enumerate(vals) if math.isfinite(v)]
    assert s.count == len(vals)
    assert len(s) < cap
    assert s.min == (min(v for _, v in fin) if fin else math.inf)
    assert s.max == (max(v for _, v in fin) if fin else -math.inf)
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    assert s.first_nonfinite_step == (bad[0] if bad else None)
    steps, points = s.points()
    assert steps[-1] == len(vals) - 1  # the last point is never decimated away
    assert steps[0] == 0
    data = s.to_json()
    _strict(data)
    VALIDATOR.validate({"schema": "gradvitals.report/1", "run": {"steps": len(vals), "events": []},
                        "layers": [], "series": {"x": data}, "findings": []})


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), values, st.text(max_size=8))
evidence = st.dictionaries(st.text(min_size=1, max_size=8),
                           st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
                               st.text(min_size=1, max_size=5), c, max_size=3), max_leaves=8), max_size=4)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(CODES), st.sampled_from(SEVERITIES), st.one_of(st.none(), st.integers(0, 10**9)),
       st.lists(st.text(min_size=1, max_size=10), max_size=3), evidence,
       st.one_of(st.none(), st.sampled_from(CODES)))
def test_any_finding_serialises_to_valid_strict_json(code, severity, step, layers, ev, caused_by):
    f = Finding(code=code, severity=severity, summary="s", advice="a", step=step, layers=tuple(layers),
                evidence=ev, caused_by=caused_by)
    data = Report(record=Record(), findings=[f]).to_json()
    VALIDATOR.validate(json.loads(_strict(data)))
    back = Finding.from_json(data["findings"][0])
    assert (back.code, back.severity, back.step, back.layers, back.caused_by) == (code, severity, step,
                                                                                 tuple(layers), caused_by)


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.update(schema="gradvitals.report/2"), "schema"),
    (lambda d: d["findings"].append({"code": "not_a_code", "severity": "critical", "step": 0, "layers": [],
                                     "summary": "x", "evidence": {}, "advice": ""}), "code"),
    (lambda d: d["findings"].append({"code": "nonfinite", "severity": "fatal", "step": 0, "layers": [],
                                     "summary": "x", "evidence": {}, "advice": ""}), "severity"),
    (lambda d: d["series"]["loss"]["values"].append("NaN"), "values"),
    (lambda d: d["series"]["loss"].pop("count"), "count"),
    (lambda d: d["run"].update(steps=-1), "steps"),
    (lambda d: d.pop("layers"), "layers"),
])
def test_schema_rejects_what_breaks_the_contract(mutate, where):
    rec = Record()
    for i in range(5):
        rec.add("loss", i, 1.0 / (i + 1))
    data = json.loads(_strict(Report.from_record(rec).to_json()))
    VALIDATOR.validate(data)
    data["extra_top_level"] = {"allowed": True}  # later issues may add top-level keys ("trials")
    VALIDATOR.validate(data)
    mutate(data)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(data)


def test_schema_nonfinite_phase_is_forward_or_backward():
    rec = Record()
    for i in range(5):
        rec.add("loss", i, 1.0 / (i + 1))
    data = json.loads(_strict(Report.from_record(rec).to_json()))
    finding = {"code": "nonfinite", "severity": "critical", "step": 3, "layers": ["blocks.1.ln1"],
               "summary": "x", "advice": "", "evidence": {"phase": "backward", "op": "layer_norm",
                                                         "backward_op": "NativeLayerNormBackward0"}}
    data["findings"] = [finding]
    VALIDATOR.validate(data)
    finding["evidence"] = {"step": 3}  # an older report: no phase
    VALIDATOR.validate(data)
    finding["evidence"] = {"phase": "optimizer"}
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(data)


def test_schema_is_shipped_as_package_data():
    from importlib import resources

    text = resources.files("gradvitals").joinpath("schema/report-1.json").read_text()
    assert json.loads(text)["title"] == "gradvitals.report/1"
    jsonschema.Draft202012Validator.check_schema(schema())
    assert set(schema()["$defs"]["code"]["enum"]) == set(CODES)


def test_the_contract_in_docs_lists_every_code():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| (\w+) \|", text, flags=re.M)
    assert [c for c in table if c != "code"] == list(CODES)
