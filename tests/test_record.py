"""Record and Series: bounded, exact summaries, JSON round trip. No torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gradvitals.record import SCHEMA, LayerInfo, ParamInfo, Record, Series


def test_series_keeps_all_points_below_cap():
    s = Series(cap=100)
    for i in range(50):
        s.append(i, float(i))
    assert list(s.steps) == list(range(50))
    assert s.stride == 1 and s.count == 50


def test_series_decimates_and_stays_bounded():
    s = Series(cap=64)
    for i in range(100_000):
        s.append(i, float(i % 7))
    assert len(s) < 64
    assert s.count == 100_000
    steps = list(s.steps)
    assert steps == sorted(steps)
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert gaps == {s.stride}  # evenly decimated


def test_series_summary_survives_decimation():
    s = Series(cap=16)
    for i in range(10_000):
        v = 1e6 if i == 4321 else (math.nan if i == 7777 else 1.0)
        s.append(i, v)
    assert s.max == 1e6 and s.max_step == 4321
    assert s.first_nonfinite_step == 7777
    assert 4321 not in list(s.steps)  # the spike was decimated away, the summary kept it


def test_points_include_last_point():
    s = Series(cap=16)
    for i in range(1001):
        s.append(i, float(i))
    steps, values = s.points()
    assert steps[-1] == 1000 and values[-1] == 1000.0


def test_series_rejects_tiny_cap():
    with pytest.raises(ValueError, match="cap"):
        Series(cap=1)


def test_record_json_roundtrip_with_nonfinite_values():
    rec = Record()
    rec.layers["fc"] = LayerInfo(name="fc", kind="Linear", depth=0, params=["fc.weight"])
    rec.params["fc.weight"] = ParamInfo(name="fc.weight", layer="fc", shape=[2, 2], numel=4)
    for i, v in enumerate([1.0, math.inf, -math.inf, math.nan]):
        rec.add("grad_norm/fc.weight", i, v)
    rec.event("nonfinite_origin", step=1, module="fc", value="inf")
    data = rec.to_json()
    text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN literals
    back = Record.from_json(json.loads(text))
    assert data["schema"] == SCHEMA
    vals = back.series["grad_norm/fc.weight"].values
    assert vals[0] == 1.0 and vals[1] == math.inf and vals[2] == -math.inf and math.isnan(vals[3])
    assert back.series["grad_norm/fc.weight"].first_nonfinite_step == 1
    assert back.layers["fc"].params == ["fc.weight"]
    assert back.events_of("nonfinite_origin")[0]["module"] == "fc"


def test_from_json_rejects_other_schema():
    with pytest.raises(ValueError, match="gradvitals.report/1"):
        Record.from_json({"schema": "something/2"})


def test_pure_layers_do_not_import_torch():
    code = ("import sys, gradvitals.record, gradvitals.rules, gradvitals.diagnose, gradvitals.report, "
            "gradvitals.findings; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _state(s: Series) -> tuple:
    return (list(s.steps), [repr(v) for v in s.values], s.stride, s.count, s.min, s.max, s.max_step,
            s.first_nonfinite_step, s.last_step, repr(s.last_value))


@pytest.mark.parametrize("cap", [4, 16, 1000])
def test_extend_is_exactly_a_run_of_appends(cap):
    """Bulk extend (a ring of recent steps) == one append per value, through
    decimations, NaN/Inf, ties at the max, and a chunk that starts on a replaced step."""
    import random

    rng = random.Random(cap)
    a, b = Series(cap), Series(cap)
    step = 0
    for chunk in range(60):
        n = rng.randint(1, 40)
        steps = list(range(step, step + n))
        values = [rng.choice([rng.random(), 5.0, -1.0, math.nan, math.inf]) if rng.random() < 0.1
                  else rng.random() for _ in range(n)]
        if chunk % 7 == 3:  # a statistic that does not apply: NaN throughout
            values = [math.nan] * n
        elif chunk % 7 == 5:  # the max tied inside a chunk that also holds a NaN
            values = [math.nan] + [5.0] * (n - 1)
        if chunk == 30:  # the first step repeats the last one: a replacement
            steps = [step - 1] + steps[:-1]
        for st, v in zip(steps, values):
            a.append(st, v)
        b.extend(steps, values)
        assert _state(a) == _state(b), chunk
        step = steps[-1] + 1


# -------------------------------------------------- per-layer gradient norms
def _layered(*layers: tuple[str, int | None, list[str]]) -> Record:
    rec = Record()
    for name, depth, params in layers:
        rec.layers[name] = LayerInfo(name=name, kind="Linear", depth=depth, params=list(params))
        for p in params:
            rec.params[p] = ParamInfo(name=p, layer=name, shape=[1], numel=1)
    return rec


def test_layer_grad_norm_of_a_one_parameter_layer_is_that_parameters():
    rec = _layered(("fc", 0, ["fc.weight"]))
    for step, v in ((0, 3.0), (1, -4.0), (2, 0.0)):
        rec.add("grad_norm/fc.weight", step, v)
    assert rec.layer_grad_norms() == {"fc": ([0, 1, 2], [3.0, 4.0, 0.0])}


def test_layer_grad_norms_combine_parameters_at_each_step_in_forward_order():
    rec = _layered(("head", 1, ["head.weight"]), ("body", 0, ["body.weight", "body.bias"]),
                   ("unused", None, ["unused.weight"]))
    rec.add("grad_norm/body.weight", 0, 3.0)
    rec.add("grad_norm/body.bias", 0, 4.0)
    rec.add("grad_norm/body.weight", 1, 6.0)  # the bias has no gradient at step 1
    rec.add("grad_norm/body.bias", 2, 8.0)  # nor the weight at step 2
    rec.add("grad_norm/head.weight", 1, 1e200)  # squares would overflow: the norm does not
    rec.add("grad_norm/head.weight", 2, 1e200)
    rec.add("loss", 0, 1.0)
    norms = rec.layer_grad_norms()
    assert list(norms) == ["body", "head"]  # forward order; a layer without gradients is absent
    assert norms["body"] == ([0, 1, 2], [5.0, 6.0, 8.0])
    assert norms["head"] == ([1, 2], [1e200, 1e200])


@pytest.mark.parametrize("a, b, want", [(math.nan, math.inf, math.nan), (math.inf, math.nan, math.nan),
                                        (math.inf, 2.0, math.inf), (-math.inf, 0.0, math.inf),
                                        (math.nan, 1.0, math.nan)])
def test_layer_grad_norm_is_nonfinite_when_a_parameter_is_nan_winning_over_inf(a, b, want):
    rec = _layered(("fc", 0, ["fc.weight", "fc.bias"]))
    rec.add("grad_norm/fc.weight", 0, a)
    rec.add("grad_norm/fc.bias", 0, b)
    got = rec.layer_grad_norms()["fc"][1][0]
    assert (math.isnan(got) if math.isnan(want) else got == want), got


def test_layer_grad_norms_of_an_empty_record_and_of_parameters_without_layer_info():
    assert Record().layer_grad_norms() == {}
    assert _layered(("fc", 0, ["fc.weight"])).layer_grad_norms() == {}
    rec = Record()  # a logger's record before the layers are known: the name says the layer
    rec.add("grad_norm/enc.0.weight", 0, 3.0)
    rec.add("grad_norm/enc.0.bias", 0, 4.0)
    rec.add("grad_norm/w", 0, 2.0)
    assert rec.layer_grad_norms() == {"enc.0": ([0], [5.0]), "w": ([0], [2.0])}


def test_layer_grad_norms_at_one_step_read_that_step_alone():
    rec = _layered(("fc", 0, ["fc.weight", "fc.bias"]), ("out", 1, ["out.weight"]))
    for step in range(10):
        rec.add("grad_norm/fc.weight", step, 3.0 * (step + 1))
        rec.add("grad_norm/fc.bias", step, 4.0 * (step + 1))
    rec.add("grad_norm/out.weight", 4, 7.0)
    assert rec.layer_grad_norms(9) == {"fc": ([9], [50.0])}  # out: not measured at step 9
    assert rec.layer_grad_norms(4) == {"fc": ([4], [25.0]), "out": ([4], [7.0])}
    assert rec.layer_grad_norms(12) == {}
    whole = rec.layer_grad_norms()
    assert all(rec.layer_grad_norms(s)["fc"][1] == [v] for s, v in zip(*whole["fc"]))
