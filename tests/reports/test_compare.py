"""``gradvitals compare``: the pure comparison on hand-built records and findings at
its edges, the CLI's errors, and a real broken run against its try-fixes winner
(the same loop with ``optimizer.zero_grad()``, the remedy ``--try-fixes`` picks for
it) rendered to the terminal, JSON and an HTML page opened in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from gradvitals.cli import main
from gradvitals.compare import (Pair, Run, at_common_step, compare, finding_changes, grad_ratio, labels_for,
                                load_run, verdict_line)
from gradvitals.findings import Finding
from gradvitals.record import Record
from gradvitals.report import Report

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _f(code: str, severity: str = "critical", *layers: str) -> Finding:
    return Finding(code=code, severity=severity, summary="s", advice="a", layers=tuple(layers))


def _run(label: str, findings: list[Finding], record: Record | None = None) -> Run:
    return Run(label, f"{label}.json", Report(record=record or Record(), findings=findings))


# ------------------------------------------------------------ findings that changed
def test_changes_are_keyed_by_code_and_layer_and_grouped():
    a = [_f("vanishing_gradients", "critical", "l0", "l1", "l2"), _f("loss_plateau", "warning")]
    b = [_f("vanishing_gradients", "critical", "l0"), _f("loss_plateau", "critical"), _f("nonfinite", "critical", "l3")]
    got = [c.to_json() for c in finding_changes(a, b)]
    assert got == [
        {"code": "vanishing_gradients", "change": "removed", "before": "critical", "after": None, "layers": ["l1", "l2"]},
        {"code": "loss_plateau", "change": "severity", "before": "warning", "after": "critical", "layers": []},
        {"code": "nonfinite", "change": "added", "before": None, "after": "critical", "layers": ["l3"]},
    ]


def test_the_same_findings_in_another_order_change_nothing():  # the healthy twin
    a = [_f("dead_relu", "warning", "fc1", "fc2"), _f("loss_spike", "critical", "fc2")]
    b = [_f("loss_spike", "critical", "fc2"), _f("dead_relu", "warning", "fc2", "fc1")]
    assert finding_changes(a, b) == []
    pair = Pair(_run("a", a), _run("b", b), changes=[], at_step=[], ratio=None)
    assert verdict_line(pair) == "b still has dead_relu, loss_spike"
    clean = Pair(_run("a", []), _run("b", [_f("dead_relu", "info", "fc1")]), changes=[], at_step=[], ratio=None)
    assert verdict_line(clean) == "b: no problem findings in either run"  # info is not a problem


def test_verdict_names_fixed_and_new_codes_and_the_loss_at_the_last_common_step():
    ra, rb = Record(), Record()
    for s in range(301):
        ra.add("loss", s, 2.31)
    for s in range(0, 500, 7):  # logged every 7 steps, longer: read at A's last step, the value before it
        rb.add("loss", s, 0.42 if s <= 300 else 9.0)
    a = _run("A", [_f("vanishing_gradients", "critical", "l0")], ra)
    b = _run("B", [_f("dead_relu", "warning", "l1"), _f("vanishing_gradients", "info", "l0")], rb)
    (pair,) = compare([a, b]).pairs
    assert pair.at_step[0].step == 300 and pair.at_step[0].a == 2.31 and pair.at_step[0].b == 0.42
    assert pair.verdict == "B fixed vanishing_gradients; introduced dead_relu; loss at step 300 2.31 → 0.42"
    assert [c.change for c in pair.changes] == ["severity", "added"]


def test_no_common_series_no_number_and_fewer_than_two_runs_is_an_error():
    assert at_common_step(Record(), Record(), "loss") is None
    with pytest.raises(ValueError, match="at least 2"):
        compare([_run("a", [])])
    assert labels_for(["x/run.json", "y/run.json", "z/fixed.json"]) == ["x/run.json", "y/run.json", "fixed"]


# ------------------------------------------------------------- gradient-norm ratio
def test_grad_ratio_bins_steps_and_keeps_a_nan_or_a_missing_run():
    a, b = Record(), Record()
    for s in range(10):
        a.add("grad_norm/enc.0.weight", s, 1.0)
        b.add("grad_norm/enc.0.weight", s, 100.0 if s < 5 else math.nan)
        a.add("grad_norm/enc.1.weight", s, 4.0)
        b.add("grad_norm/enc.1.weight", s, 2.0 if s % 2 else 8.0)  # geometric mean 4: ratio 1
    a.add("grad_norm/head.weight", 0, 1.0)  # B has no head: its row is left out
    got = grad_ratio(a, b, max_bins=5)
    assert got["layers"] == ["enc.0", "enc.1"]
    assert got["bins"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    row0, row1 = got["ratio"]
    assert row0[:2] == [pytest.approx(100.0)] * 2 and math.isnan(row0[2]) and math.isnan(row0[4])
    assert row1 == [pytest.approx(1.0)] * 5
    assert grad_ratio(a, Record()) is None  # no per-layer norms in B: no heatmap


# ------------------------------------------------------------------------ the CLI
def _one_line_error(result, status: int = 1) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == status and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out.html"
    good = str(FIXTURES / "healthy_he6.json")
    assert "at least two runs" in _one_line_error(runner.invoke(main, ["compare", good, "--html", str(out)]), 2)
    assert "--map objective" in _one_line_error(runner.invoke(main, ["compare", good, good, "--map", "objective"]), 2)
    junk = tmp_path / "junk.json"
    junk.write_bytes(bytes(range(256)) * 4)
    cut = tmp_path / "cut.json"
    cut.write_text((FIXTURES / "healthy_he6.json").read_text()[:500])
    other = tmp_path / "other.json"
    other.write_text('{"schema": "something/2"}')
    for bad, why in ((junk, "not a text file"), (cut, "JSON"), (other, "gradvitals report"),
                     (tmp_path / "missing.json", "no such file"), (tmp_path, "no log found")):
        line = _one_line_error(runner.invoke(main, ["compare", good, str(bad), "--html", str(out), "--json",
                                                    str(tmp_path / "out.json")]))
        assert line.startswith(f"gradvitals: error: {bad}") and why in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.json", "junk.json", "other.json"]


def test_cli_compares_logs_that_are_not_reports(tmp_path):
    """Any log diagnose reads: two CSV logs (loss and global norm per step), one renamed with --map."""
    (tmp_path / "before.csv").write_text("step,loss,grad_norm\n" + "".join(
        f"{s},{2.3 - 0.001 * s},{0.5}\n" for s in range(0, 200, 10)))
    (tmp_path / "after.csv").write_text("step,objective,grad_norm\n" + "".join(
        f"{s},{2.3 * 0.98 ** s},{0.5}\n" for s in range(0, 150, 10)))
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "before.csv"), str(tmp_path / "after.csv"),
                                       "--map", "objective=loss", "--json", str(tmp_path / "c.json"),
                                       "--html", str(tmp_path / "c.html")])
    assert result.exit_code == 0, result.output
    (pair,) = json.loads((tmp_path / "c.json").read_text())["pairs"]
    loss = pair["at_step"][0]
    assert loss["quantity"] == "loss" and loss["step"] == 140
    assert loss["a"] == pytest.approx(2.3 - 0.14) and loss["b"] == pytest.approx(2.3 * 0.98 ** 140)
    assert pair["grad_ratio"] is None  # no per-layer norms in a loss/global-norm log
    page = (tmp_path / "c.html").read_text()
    assert "No layer has gradient norms recorded in both runs" in page and 'class="gv-ratio"' not in page
    assert page.count("<polyline") == 4  # loss and global norm of both logs


def test_cli_on_saved_records_rediagnoses_those_without_findings(tmp_path):
    result = CliRunner().invoke(main, ["compare", str(FIXTURES / "sigmoid8_vanishing.json"),
                                       str(FIXTURES / "healthy_he6.json"), "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["schema"] == "gradvitals.compare/1"
    assert "vanishing_gradients" in data["runs"][0]["problems"] and data["runs"][1]["problems"] == []
    assert data["pairs"][0]["verdict"].startswith("healthy_he6 fixed vanishing_gradients")
    assert data["pairs"][0]["verdict"] in result.output.splitlines()


# -------------------------------------------- a real broken run and its winner
STEPS = 80


def _train(path: Path, zero_grad: bool) -> Report:
    """examples/cases/forgot_zero_grad.py's loop (digits MLP, SGD momentum), shortened;
    ``zero_grad``: the remedy --try-fixes picks for it, applied."""
    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits

    import gradvitals as gv

    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with gv.watch(model, opt) as w:
        for _ in range(STEPS):
            idx = torch.randint(0, len(X), (64,))
            if zero_grad:
                opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        return w.save(path)


@pytest.fixture(scope="module")
def broken_and_fixed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    broken, fixed = _train(tmp / "forgot_zero_grad.json", False), _train(tmp / "zero_grad.json", True)
    assert "grad_not_zeroed" in broken.codes and not fixed.problems()
    result = CliRunner().invoke(main, ["compare", str(tmp / "forgot_zero_grad.json"), str(tmp / "zero_grad.json"),
                                       "--html", str(tmp / "compare.html"), "--json", str(tmp / "compare.json")])
    assert result.exit_code == 0, result.output
    return tmp, broken, fixed, result.output


def test_compare_of_a_real_run_and_its_fix_shows_the_removed_findings(broken_and_fixed):
    tmp, broken, fixed, output = broken_and_fixed
    (pair,) = json.loads((tmp / "compare.json").read_text())["pairs"]
    removed = {c["code"] for c in pair["findings"] if c["change"] == "removed"}
    assert removed == {f.code for f in broken.problems()} and "grad_not_zeroed" in removed
    loss_a, loss_b = broken.record.get("loss").last_value, fixed.record.get("loss").last_value
    assert loss_b < loss_a
    step_loss = pair["at_step"][0]
    assert step_loss == {"quantity": "loss", "step": STEPS - 1, "a": loss_a, "b": loss_b}
    assert pair["verdict"].startswith("zero_grad fixed grad_not_zeroed")
    assert re.search(rf"loss at step {STEPS - 1} \S+ → \S+$", pair["verdict"])
    assert pair["verdict"] in output.splitlines()
    rows = [l.split() for l in output.splitlines()]
    assert {r[0] for r in rows if len(r) > 1 and r[1] == "gone"} == removed  # the terminal's table
    ratio = pair["grad_ratio"]
    assert ratio["layers"] == ["0", "2", "4"] and len(ratio["bins"]) == 40
    # the accumulated gradient grows with the run: the fixed run's is far smaller late
    assert all(r[-1] < 0.5 for r in ratio["ratio"]), ratio["ratio"]


class _Svg(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def test_compare_html_overlays_both_runs_curves_and_draws_the_ratio(broken_and_fixed):
    tmp, broken, _, _ = broken_and_fixed
    page = (tmp / "compare.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # self-contained
    tags = _Svg(page).tags
    curves = [a for t, a in tags if t == "svg" and a.get("class", "").startswith("gv-compare-")]
    assert [a["class"] for a in curves] == ["gv-compare-loss", "gv-compare-grad_norm_global"]
    assert page.count("<polyline") == 4  # two runs on each chart
    (ratio,) = [a for t, a in tags if t == "svg" and a.get("class") == "gv-ratio"]
    assert (int(ratio["data-rows"]), int(ratio["data-cols"])) == (3, 40)
    assert len([1 for t, a in tags if t == "tr" and a.get("data-change") == "removed"]) == len(broken.problems())


@pytest.mark.browser
@pytest.mark.slow
def test_compare_html_opens_offline_in_chromium_without_errors(broken_and_fixed):
    from test_browser import CHROMIUM_FLAGS, VIRTUAL_TIME_MS, _chromium, _Dom

    chromium = _chromium()
    tmp = broken_and_fixed[0]
    dump = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}",
                           f"--virtual-time-budget={VIRTUAL_TIME_MS}", "--dump-dom",
                           (tmp / "compare.html").resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = _Dom(dump.stdout)
    body = dom.find("body")[0]
    assert body.get("data-gv-rendered") == "0/0" and "data-gv-errors" not in body, body
    assert "Uncaught" not in dump.stderr, dump.stderr[-2000:]
    assert len(dom.find("rect")) >= 3 * 40 and len(dom.find("polyline")) == 4
