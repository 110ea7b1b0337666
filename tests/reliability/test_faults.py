"""Faults and bad input: a broken probe, a full record, several watches at once, a
report path that cannot be written, and every public entry point fed nonsense.

(Exit paths of ``gradvitals run`` -- exception, sys.exit, SIGINT, SIGTERM -- are in
tests/test_runner.py.)
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradvitals as gv
from gradvitals.probes import patches
from gradvitals.record import Record
from gradvitals.report import Report
from gradvitals.runner import ScriptRunner
from gradvitals.recorder import Options

MATRIX = Path(__file__).resolve().parent / "scripts" / "matrix.py"


def _result(capsys) -> dict:
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------- faults
def test_raising_probe_in_runner_mode_warns_once_and_training_is_unchanged(monkeypatch, capsys, caplog):
    argv = ["--case", "optimizer", "--opt", "adam", "--steps", "6"]
    plain = ScriptRunner(str(MATRIX), argv, Options(every=1)).run()
    assert plain.status == 0
    base = _result(capsys)
    from gradvitals.probes import activations

    def broken(*a, **k):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(activations, "row_stats", broken)
    with caplog.at_level(logging.WARNING, logger="gradvitals"):
        res = ScriptRunner(str(MATRIX), argv, Options(every=1)).run()
    assert res.status == 0 and res.error is None
    watched = _result(capsys)
    assert watched["digest"] == base["digest"] and watched["step_losses"] == base["step_losses"]
    errors = res.report.record.events_of("probe_error")
    assert len(errors) == 1 and "probe exploded" in errors[0]["error"]  # once, not once per step
    assert len([r for r in caplog.records if "probe exploded" in r.getMessage()]) == 1
    data = res.report.to_json()
    assert any(e["type"] == "probe_error" for e in data["run"]["events"])
    assert data["series"]["grad_norm/0.weight"]["count"] == 6  # the other probes kept working


def test_full_record_decimates_and_keeps_exact_summaries():
    """300 steps into a 16-point cap: bounded series, exact max/count, valid report."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    losses = []
    with gv.watch(model, opt, every=1, cap=16) as w:
        for _ in range(300):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    rec = w.record
    assert rec.steps == 300
    for key, s in rec.series.items():
        assert len(s) < 16, key
    s = rec.series["loss"]
    assert s.count == 300 and s.stride >= 32
    assert s.max == max(losses) and s.max_step == losses.index(max(losses))
    assert s.points()[0][-1] == 299 and s.points()[1][-1] == losses[-1]
    data = w.report()
    json.dumps(data, allow_nan=False)
    from gradvitals.report import schema
    import jsonschema

    jsonschema.validate(data, schema())


def test_an_open_watch_neither_steps_nor_hoards_losses_while_another_model_trains():
    """Regression: every backward() reached every watch, so a watch left open on a
    finished model kept each later loss in memory (unbounded) and, without an
    optimizer, counted the other model's backward passes as its own steps."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 1), nn.Linear(4, 1)
    x = torch.randn(8, 4)
    wa = gv.watch(a)  # backward mode: each of a's backward() is a step
    for _ in range(3):
        a(x).pow(2).mean().backward()
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    wb = gv.watch(b, opt)
    try:
        for _ in range(200):
            opt.zero_grad()
            b(x).pow(2).mean().backward()
            opt.step()
        assert wa.step == 3
        assert len(wa._recorder.losses.pending) == 0
        assert wb.step == 200 and wb.record.series["loss"].count == 200
    finally:
        wa.close()
        wb.close()
    assert patches.active() == []


def test_watch_save_is_atomic_and_names_a_bad_path(tmp_path, monkeypatch):
    model = nn.Linear(4, 2)
    with gv.watch(model) as w:
        model(torch.randn(3, 4)).sum().backward()
    out = tmp_path / "r.json"
    w.save(out)
    before = out.read_text()

    def broken(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Report, "to_json", broken)
    with pytest.raises(RuntimeError):
        w.save(out)
    monkeypatch.undo()
    assert out.read_text() == before  # the old report survives a failed save
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match=r"cannot write the report to .*no/such.*does not exist"):
        w.save(tmp_path / "no" / "such" / "r.json")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        w.save(tmp_path)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("options, argument", [
    ({"every": 0}, "every"), ({"every": "5"}, "every"), ({"every": True}, "every"), ({"every": 2.5}, "every"),
    ({"cap": 1}, "cap"), ({"cap": "x"}, "cap"),
    ({"full": "yes"}, "full"), ({"activations": "no"}, "activations"), ({"nonfinite_origin": 1}, "nonfinite_origin"),
    ({"name": 5}, "name"), ({"name": " "}, "name"), ({"tensorboard": 5}, "tensorboard"),
])
def test_watch_rejects_bad_option_values(options, argument):
    with pytest.raises(ValueError, match=rf"^{argument} must be .*got"):
        gv.watch(nn.Linear(2, 2), **options)
    assert patches.active() == []  # nothing left installed


def test_watch_rejects_unknown_options_and_wrong_objects():
    m = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="unknown watch option.*evry.*allowed: .*every"):
        gv.watch(m, evry=3)
    for bad in ("x", None, [], [m, "y"]):
        with pytest.raises(TypeError, match="model must be a torch.nn.*Module"):
            gv.watch(bad)
    for bad in ("adam", [torch.optim.SGD(m.parameters(), lr=0.1), 3]):
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.*Optimizer"):
            gv.watch(m, bad)
    assert patches.active() == []


@pytest.mark.parametrize("text, message", [
    ("", "is not JSON"),
    ("{not json", "is not JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{}", "schema=None"),
    (json.dumps({"schema": "gradvitals.report/2"}), "schema='gradvitals.report/2'"),
    (json.dumps({"schema": "gradvitals.report/1", "run": [], "layers": [], "series": {}, "findings": []}),
     "'run' must be a JSON object"),
    (json.dumps({"schema": "gradvitals.report/1", "run": {}, "layers": [{"oops": 1}], "series": {}, "findings": []}),
     "not a valid gradvitals.report/1 report"),
    (json.dumps({"schema": "gradvitals.report/1", "run": {}, "layers": [], "series": {},
                 "findings": [{"code": "bogus", "severity": "critical"}]}), "unknown finding code 'bogus'; allowed: "),
])
def test_report_load_rejects_what_is_not_a_report(tmp_path, text, message):
    p = tmp_path / "r.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Report.load(p)


def test_report_load_roundtrips_a_real_report(tmp_path):
    rec = Record()
    for i in range(20):
        rec.add("loss", i, 2.0 / (i + 1))
    rec.add("grad_norm_global", 19, math.nan)
    Report.from_record(rec).save(tmp_path / "r.json")
    back = Report.load(tmp_path / "r.json")
    assert back.record.series["loss"].count == 20
    assert back.record.series["grad_norm_global"].first_nonfinite_step == 19


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradvitals", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.slow
def test_cli_rejects_bad_arguments_with_one_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("print('ran')\n")
    notreport = tmp_path / "list.json"
    notreport.write_text("[1, 2]")
    good = tmp_path / "good.json"
    Report.from_record(Record()).save(good)
    cases = [
        (["run", "--every", "0", str(script)], "--every", "every must be a positive integer"),
        (["run", "--every", "abc", str(script)], "--every", "abc"),
        (["run", "--json", str(tmp_path), str(script)], "--json", "is a directory"),
        (["run", "--html", str(tmp_path / "no" / "r.html"), str(script)], "--html", "does not exist"),
        (["run", "--tensorboard", str(notreport), str(script)], "--tensorboard", "is not a folder"),
        (["run"], "SCRIPT", "Missing argument"),
        (["checkup", "--json", str(tmp_path / "no" / "r.json"), str(script)], "--json", "does not exist"),
        (["report", str(good), "--html", str(tmp_path / "no" / "r.html")], "--html", "does not exist"),
        (["report", str(tmp_path / "none.json")], "RUN.json", "no such file", 1),
        (["report", str(notreport)], "RUN.json", "expected a JSON object", 1),
        (["frobnicate"], "frobnicate", "No such command"),
    ]
    for args, argument, message, *code in cases:
        p = _cli(*args)
        # 2: a usage error; 1: a file given that cannot be read (as for diagnose and compare)
        assert p.returncode == (code[0] if code else 2), (args, p.stderr)
        assert argument in p.stderr and message in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr, (args, p.stderr)
        assert "ran" not in p.stdout  # the script never started
