"""HTML report: structure, self-containment, encoding, markers, size. No torch, no browser."""

from __future__ import annotations

import json
import math
import re
from html import escape as html_escape
import subprocess
import sys

from _report_records import clone_series, mlp_record, report_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradvitals.findings import Finding
from gradvitals.record import LayerInfo, ParamInfo, Record, Series
from gradvitals.reports.html import (
    decode_heatmap,
    depth_panels_data,
    heatmap_data,
    markers_data,
    render_gallery,
    render_html,
)


def _payload(page: str, i: int = 0) -> dict:
    m = re.search(rf'<script type="application/json" id="gv-data-{i}">(.*?)</script>', page, re.S)
    assert m, "embedded data blob missing"
    return json.loads(m.group(1))


def test_heatmap_rows_are_layers_in_forward_order_with_combined_param_norms():
    rec = mlp_record(depth=4, steps=6)
    hm = heatmap_data(report_of(rec))
    assert [l["name"] for l in hm["layers"]] == ["net.0", "net.2", "net.4", "net.6"]
    assert hm["steps"] == list(range(6))
    cells = decode_heatmap(hm)
    for i, row in enumerate(cells):
        w = 10.0 ** (i - 4)
        expected = math.hypot(w, w / 2)  # weight and bias norms combine as an L2 norm
        for v in row:
            assert math.isclose(v, expected, rel_tol=1e-3), (i, v, expected)
    # log scale spans the smallest to the largest layer norm
    assert math.isclose(hm["lo"], math.log10(math.hypot(1e-4, 5e-5)), abs_tol=1e-9)
    assert math.isclose(hm["hi"], math.log10(math.hypot(1e-1, 5e-2)), abs_tol=1e-9)


def test_heatmap_encodes_nan_inf_zero_and_missing_cells():
    def scale(layer, step):
        if layer == 0 and step == 3:
            return math.nan
        if layer == 1 and step == 3:
            return math.inf
        if layer == 2:
            return 0.0
        return 1.0 + step

    rec = mlp_record(depth=3, steps=5, scale=scale)
    rec.series["grad_norm/net.0.weight"].values[4] = math.inf  # NaN in the bias wins over Inf
    rec.series["grad_norm/net.0.bias"].values[4] = math.nan
    rec.add("grad_norm/net.4.weight", 7, 2.0)  # only one layer reaches step 7
    rep = report_of(rec)
    data = json.loads(json.dumps(rep))  # through JSON: non-finite values are strings there
    cells = decode_heatmap(heatmap_data(data))
    assert math.isnan(cells[0][3]) and math.isnan(cells[0][4])
    assert cells[1][3] == math.inf
    assert cells[2][0] == 0.0
    assert cells[0][-1] is None and cells[1][-1] is None  # step 7: not recorded for them
    assert math.isclose(cells[2][-1], 2.0, rel_tol=1e-3)


def test_long_run_bins_columns_keeping_max_and_nan():
    rec = Record()
    rec.layers["fc"] = LayerInfo(name="fc", kind="Linear", depth=0, params=["fc.weight"])
    rec.params["fc.weight"] = ParamInfo(name="fc.weight", layer="fc", shape=[4, 4], numel=16)
    for step in range(50):
        rec.add("grad_norm/fc.weight", step, math.nan if step == 33 else (100.0 if step == 10 else 1.0))
    hm = heatmap_data(report_of(rec), max_columns=10)
    assert len(hm["steps"]) == 10 and hm["ends"][-1] == 49
    row = decode_heatmap(hm)[0]
    assert math.isclose(row[2], 100.0, rel_tol=1e-3)  # the bin holding step 10 keeps the spike
    assert math.isnan(row[6])  # and the NaN at step 33 is not averaged away
    assert math.isclose(row[0], 1.0, rel_tol=1e-3)


def test_markers_come_from_finding_steps_and_evidence_steps():
    findings = [
        Finding(code="exploding_gradients", severity="critical", summary="s", advice="a", step=12,
                evidence={"visible_step": 7, "growth": 3.0, "nan_step": 12, "steps": [1, 2]}),
        Finding(code="nonfinite", severity="critical", summary="s", advice="a", step=12),
        Finding(code="loss_plateau", severity="warning", summary="s", advice="a", step=None),
    ]
    marks = markers_data(report_of(mlp_record(), findings))
    # nan_step equals the finding's own step: marked once; "steps" (a list) and "growth" are no steps
    assert [(m["step"], m["label"]) for m in marks] == [
        (7, "exploding_gradients: visible"), (12, "exploding_gradients"), (12, "nonfinite")]
    assert all(m["severity"] == "critical" for m in marks)


def test_depth_panels_first_and_last_step_by_depth():
    panels = {p["quantity"]: p for p in depth_panels_data(report_of(mlp_record(depth=4, steps=11)))}
    ur = panels["update_ratio"]
    assert ur["names"] == ["net.0", "net.2", "net.4", "net.6"]
    assert ur["first"] == [1e-3, 2e-3, 3e-3, 4e-3] and ur["first_step"] == 0 and ur["last_step"] == 10
    std = panels["act_std"]  # activation outputs (Sigmoid modules), in depth order
    assert std["names"] == ["net.1", "net.3", "net.5", "net.7"]
    assert std["last"] == [0.5, 0.25, 0.1667, 0.125]
    assert panels["dead_frac"]["names"] == []  # no ReLU-family output: nothing to call dead
    assert "ReLU" in panels["dead_frac"]["empty"]


def test_page_is_self_contained_and_renders_from_json_alone():
    rec = mlp_record()
    findings = [Finding(code="nonfinite", severity="critical", summary="NaN at `net.2`", step=3,
                        advice="Clip:\n```python\ntorch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)\n```",
                        layers=("net.2",), evidence={"module": "net.2", "value": "nan"})]
    live = render_html(report_of(rec, findings))
    saved = json.loads(json.dumps(report_of(rec, findings), allow_nan=False))
    assert render_html(saved) == live
    # nothing is fetched: no external scripts, styles, images or fonts
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', live)
    assert "@import" not in live and "url(http" not in live
    assert live.count("<script") == 3 and "<style>" in live  # error hook, renderer, data
    assert 'id="verdict"' in live and "BROKEN" in live
    assert 'data-code="nonfinite"' in live and "<code>net.2</code>" in live
    assert "<pre><code>torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)</code></pre>" in live
    assert "gradvitals run train.py --lr 0.1" in live and "2.13.0+cpu" in live and "cuda:0" in live
    assert "12.5 s" in live
    data = _payload(live)
    assert data["markers"] == [{"step": 3, "label": "nonfinite", "severity": "critical"}]
    assert set(data["curves"]["loss"]) == {"loss"} and "grad_norm_global" in data["curves"]["grad_norm"]


def test_hostile_names_cannot_break_out_of_the_page():
    rec = mlp_record(depth=1, steps=2)
    rec.layers["net.0"].kind = "</script><script>alert(1)</script>"
    rec.run["command"] = "<img src=x onerror=alert(1)>"
    page = render_html(report_of(rec))
    assert "<script>alert(1)" not in page and "<img src=x" not in page
    assert _payload(page)["heatmap"]["layers"][0]["kind"] == "</script><script>alert(1)</script>"


def test_empty_record_renders():
    page = render_html(report_of(Record()))
    assert _payload(page)["heatmap"]["layers"] == [] and "No findings" in page


def test_gallery_has_one_heatmap_per_entry():
    vanishing = report_of(mlp_record())
    healthy = report_of(mlp_record(scale=lambda layer, step: 1.0))
    page = render_gallery([("sigmoid, default init", vanishing), ("He init", healthy)])
    assert page.count('class="gv-report"') == 2
    assert "sigmoid, default init" in page and "He init" in page
    assert _payload(page, 1)["heatmap"]["lo"] < _payload(page, 1)["heatmap"]["hi"]


def long_run_report(layers: int = 100, steps: int = 100_000) -> dict:
    """A 100-layer, 100,000-step record: the series decimate to their cap of 1,000 points.
    One series per quantity is appended for real; the per-layer ones are scaled copies."""
    rec = mlp_record(depth=layers, steps=1)
    rec.series.clear()
    grad, sched = Series(), Series()
    for step in range(steps):
        grad.append(step, 1.0 + (step % 97) / 97)
        rec.add("loss", step, 2.3 / (1 + step / 1000))
        rec.add("grad_norm_global", step, 3.0 + math.sin(step / 500))
        if step % 25 == 0:
            sched.append(step, 1.0 + (step % 13) / 13)
    for i in range(layers):
        f = 10.0 ** (-8 + 8 * i / layers)
        rec.series[f"grad_norm/net.{2 * i}.weight"] = clone_series(grad, f)
        rec.series[f"grad_norm/net.{2 * i}.bias"] = clone_series(grad, f / 3)
        rec.series[f"update_ratio/net.{2 * i}.weight"] = clone_series(sched, 1e-3 * f)
        rec.series[f"act_std/net.{2 * i + 1}"] = clone_series(sched, 0.5)
        rec.series[f"act_sat_frac/net.{2 * i + 1}"] = clone_series(sched, 0.1)
    rec.steps = steps
    rec.run["steps"] = steps
    return report_of(rec, [Finding(code="vanishing_gradients", severity="warning", summary="s",
                                   advice="a", step=0, layers=("net.0",))])


#: The README states the size of this page; keep the two in step.
LONG_RUN_HTML_MAX_BYTES = 600_000


def test_long_run_page_size():
    rep = long_run_report()
    assert len(rep["series"]["grad_norm/net.0.weight"]["steps"]) <= 1001
    page = render_html(rep)
    size = len(page.encode("utf-8"))
    print(f"\nHTML report, 100 layers x 100,000 steps: {size:,} bytes ({size / 1024:.0f} KiB)")
    assert 100_000 < size < LONG_RUN_HTML_MAX_BYTES
    data = _payload(page)
    assert len(data["heatmap"]["layers"]) == 100 and 500 <= len(data["heatmap"]["steps"]) <= 1001


def test_reports_package_does_not_import_torch():
    code = ("import sys, gradvitals.reports.html, gradvitals.reports.terminal, gradvitals.reports.progress;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                    st.sampled_from([0.0, 5e-324, 1e308, -1.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(st.lists(_values, min_size=1, max_size=12), min_size=1, max_size=4),
       step=st.one_of(st.none(), st.integers(-5, 50)),
       evidence=st.dictionaries(st.sampled_from(["peak_step", "nan_step", "x", "growth_per_step"]),
                                st.one_of(st.integers(-3, 99), st.floats(), st.text(max_size=5), st.none())))
def test_any_record_renders_to_a_page_with_valid_embedded_json(values, step, evidence):
    """The renderer runs after the user's training: it must never fail on odd numbers."""
    rec = mlp_record(depth=len(values), steps=0)
    for i, row in enumerate(values):
        for s, v in enumerate(row):
            rec.add(f"grad_norm/net.{2 * i}.weight", s, v)
            rec.add("loss", s, v)
            rec.add(f"update_ratio/net.{2 * i}.weight", s, v)
    rec.steps = max(len(r) for r in values)
    finding = Finding(code="loss_spike", severity="warning", summary="s", advice="a", step=step, evidence=evidence)
    page = render_html(json.loads(json.dumps(report_of(rec, [finding]), allow_nan=False)))
    data = _payload(page)
    assert len(data["heatmap"]["layers"]) == len(values)
    rows = decode_heatmap(data["heatmap"])
    for row, expected in zip(rows, values):
        for got, v in zip(row, expected):  # bias absent: the layer norm is the weight's
            if v < 0:  # not a norm: only "renders" is asked of it
                continue
            if math.isnan(v):
                assert math.isnan(got)
            elif math.isinf(v):
                assert got == math.inf
            elif v == 0:
                assert got == 0.0
            else:
                assert math.isclose(got, v, rel_tol=0.05) or v < 1e-300


def test_log_z_curve_when_recorded_and_nothing_when_not():
    rec = mlp_record(depth=3, steps=6)
    plain = render_html(report_of(rec))
    div = '<div class="chart" data-role="log_z"></div>'
    assert div not in plain and "log_z" not in _payload(plain)["curves"]
    for s, v in ((0, 2.3), (2, 5.0), (4, math.nan)):
        rec.add("log_z_mean", s, v)
        rec.add("log_z_max", s, v + 1)
    page = render_html(report_of(rec))
    assert page.count(div) == 1
    curves = _payload(page)["curves"]["log_z"]
    assert set(curves) == {"log_z_mean", "log_z_max"}
    assert curves["log_z_mean"]["steps"] == [0, 2, 4] and curves["log_z_mean"]["values"][:2] == [2.3, 5.0]
    assert curves["log_z_max"]["values"][1] == 6.0


def test_an_imported_logs_page_says_what_was_checked_and_why_not(tmp_path):
    """`gradvitals diagnose` on a CSV of loss and global grad norm: the page lists the checks
    that ran and the coverage's reasons for the rest; a live run's page has no such section."""
    from gradvitals.cli import _diagnose_log

    log = tmp_path / "history.csv"
    log.write_text("step,loss,grad_norm\n" + "".join(f"{i},{2.3 - 0.01 * i},{1.0 + 0.01 * i}\n"
                                                        for i in range(0, 300, 10)))
    report = _diagnose_log(str(log), None).to_json()
    cov = report["coverage"]
    page = render_html(report)
    section = re.search(r'<section id="coverage-section">(.*?)</section>', page, re.S).group(1)
    assert f"{len(cov['ran'])} of {len(cov['checks'])} checks ran" in section and "loss_spike" in section
    assert cov["summary"] and all(html_escape(line) in section for line in cov["summary"])
    assert 'id="coverage-section"' not in render_html(report_of(mlp_record()))
