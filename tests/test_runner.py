"""`gradvitals run` on unmodified scripts: reports, exit statuses, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SCRIPTS, gradvitals_cmd

pytestmark = pytest.mark.slow


def run(args, cwd=None, **kw):
    return subprocess.run([*gradvitals_cmd(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=240, **kw)


def load(path):
    return json.loads(Path(path).read_text())


def test_plain_script_yields_full_report(tmp_path):
    out = tmp_path / "r.json"
    p = run(["run", "--json", str(out), str(SCRIPTS / "train_mlp.py"), "--steps", "30"])
    assert p.returncode == 0, p.stderr
    script_out = json.loads(p.stdout.strip().splitlines()[-1])
    assert script_out["name"] == "__main__"
    assert script_out["argv"] == [str(SCRIPTS / "train_mlp.py"), "--steps", "30"]
    assert script_out["path0"] == str(SCRIPTS)
    rep = load(out)
    assert rep["schema"] == "gradvitals.report/1"
    assert set(rep) >= {"schema", "run", "layers", "series", "findings"}
    s = rep["series"]
    for name in ("0.weight", "0.bias", "2.weight", "4.weight"):
        assert len(s[f"grad_norm/{name}"]["steps"]) == 30
    assert len(s["loss"]["values"]) == 30
    assert s["loss"]["values"][-1] == pytest.approx(script_out["final_loss"], rel=1e-6)
    assert "act_std/1" in s and "dead_frac/0" in s
    assert [l["name"] for l in rep["layers"]][:3] == ["0", "1", "2"]
    assert rep["run"]["exit_status"] == 0 and rep["run"]["steps"] == 30
    assert "gradvitals" in p.stderr  # the summary goes to stderr, the script's stdout is untouched


def test_output_identical_to_plain_python(tmp_path):
    plain = subprocess.run([sys.executable, str(SCRIPTS / "train_mlp.py"), "--steps", "20"],
                           capture_output=True, text=True, timeout=240)
    watched = run(["run", "-q", str(SCRIPTS / "train_mlp.py"), "--steps", "20"])
    a, b = json.loads(plain.stdout), json.loads(watched.stdout)
    assert a["final_loss"] == b["final_loss"]  # bit-identical training
    assert watched.stderr == ""  # --quiet


def test_nan_script_names_origin(tmp_path):
    out = tmp_path / "nan.json"
    p = run(["run", "-q", "--json", str(out), str(ROOT / "examples" / "nan_mlp.py"), "--steps", "20"])
    assert p.returncode == 0
    rep = load(out)
    nf = [f for f in rep["findings"] if f["code"] == "nonfinite"]
    assert nf, rep["findings"]
    f = nf[0]
    assert f["severity"] == "critical"
    assert f["step"] == rep["series"]["grad_norm_global"]["first_nonfinite_step"]
    layer = f["layers"][0]
    assert layer in {l["name"] for l in rep["layers"]}
    assert f["evidence"]["source"] == "replay"


@pytest.mark.parametrize("fail,status", [("raise", 1), ("exit3", 3), ("sigint", 130)])
def test_report_written_when_script_ends_badly(tmp_path, fail, status):
    out = tmp_path / "r.json"
    p = run(["run", "-q", "--json", str(out), str(SCRIPTS / "train_mlp.py"), "--steps", "20", "--fail", fail])
    assert p.returncode == status, p.stderr
    rep = load(out)
    assert rep["run"]["exit_status"] == status
    assert rep["run"]["steps"] == 11  # it stopped after step 10
    if fail == "raise":
        assert "RuntimeError: boom in the user's script" in p.stderr
        assert "gradvitals" not in p.stderr.split("Traceback")[1].split("RuntimeError")[0]


def test_sigterm_writes_report(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([*gradvitals_cmd(), "run", "-q", "--json", str(out), str(SCRIPTS / "sleeper.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 143
    rep = load(out)
    assert rep["run"]["steps"] >= 5
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no half-written leftovers


def test_relative_paths_and_pickling(tmp_path):
    """The script runs in the user's cwd; torch.save(model) pickles no gradvitals object."""
    script = tmp_path / "train.py"
    script.write_text((SCRIPTS / "train_mlp.py").read_text())
    p = run(["run", "-q", "train.py", "--steps", "5", "--save", "model.pt"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["cwd"] == str(tmp_path)
    check = subprocess.run([sys.executable, "-c",
                            "import sys, torch; sys.path.insert(0, '.');"
                            "m = torch.load('model.pt', weights_only=False);"
                            "assert not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules());"
                            "torch.load('model.pt.sd', weights_only=True); print('ok')"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "ok", check.stderr
    assert b"gradvitals" not in (tmp_path / "model.pt").read_bytes()


def test_missing_script_one_line_exit_2(tmp_path):
    p = run(["run", str(tmp_path / "nope.py")])
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "script not found" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("cmd", ["run", "checkup"])
def test_unknown_option_before_the_script_is_named(tmp_path, cmd):
    """``gradvitals run --out r.json train.py``: the unknown option is named, with the
    closest real one, not reported as a missing script; nothing runs."""
    script = tmp_path / "s.py"
    script.write_text("open('ran', 'w').write('x')\n")
    p = run([cmd, "--jsn", "r.json", str(script)], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "no such option: --jsn" in p.stderr and "did you mean --json?" in p.stderr
    assert not (tmp_path / "ran").exists() and "Traceback" not in p.stderr
    p = run([cmd, "--out=r.json", str(script)], cwd=tmp_path)
    assert p.returncode == 2 and "no such option: --out;" in p.stderr


def test_syntax_error_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n    pass\n")
    p = run(["run", str(bad)])
    assert p.returncode == 2 and "syntax error" in p.stderr and "line 1" in p.stderr
    assert "Traceback" not in p.stderr


def test_unwritable_report_path_fails_before_running(tmp_path):
    marker = tmp_path / "ran"
    script = tmp_path / "s.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    p = run(["run", "--json", str(tmp_path / "no" / "such" / "dir" / "r.json"), str(script)])
    assert p.returncode == 2 and "--json" in p.stderr and "does not exist" in p.stderr
    assert not marker.exists()  # the script never started


def test_script_without_models_still_reports(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("print('hello')\n")
    out = tmp_path / "r.json"
    p = run(["run", "-q", "--json", str(out), str(script)])
    assert p.returncode == 0 and p.stdout == "hello\n"
    assert load(out)["run"]["steps"] == 0
    # Not "Healthy": nothing was trained (a script's --help, a data-prep or evaluation script)
    assert load(out)["run"]["verdict"].startswith("Nothing to diagnose: the script ran no backward()")
    script.write_text("import torch\nm = torch.nn.Linear(3, 3)\nprint(m(torch.randn(2, 3)).shape)\n")
    p = run(["run", "--json", str(out), str(script)])
    assert p.returncode == 0 and "Healthy" not in p.stderr
    assert "Nothing to diagnose: the script built a model but ran no backward() or optimizer step." in " ".join(p.stderr.split())
    assert load(out)["run"]["verdict"].startswith("Nothing to diagnose: the script built a model")


def test_report_command_rerenders_and_rejects_bad_input(tmp_path):
    out = tmp_path / "r.json"
    run(["run", "-q", "--json", str(out), str(SCRIPTS / "train_mlp.py"), "--steps", "5"])
    p = run(["report", str(out)])
    assert p.returncode == 0 and "Layers in forward order" in p.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    p = run(["report", str(junk)])
    assert p.returncode == 1 and "not JSON" in p.stderr  # unreadable input: 1, as for diagnose


def test_loss_event_findings_are_counted_per_fold(tmp_path):
    """k-fold under gradvitals run, each fold a fresh model ending in a softmax fed to
    cross_entropy: one loss_on_probabilities event per fold, each counting that fold's
    steps (the first fold's once also counted the next fold's first step)."""
    script = tmp_path / "kfold.py"
    script.write_text(
        "import torch, torch.nn as nn\n"
        "torch.manual_seed(0)\n"
        "x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))\n"
        "for fold in range(3):\n"
        "    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(1))\n"
        "    opt = torch.optim.SGD(m.parameters(), lr=0.01)\n"
        "    for _ in range(6):\n"
        "        opt.zero_grad()\n"
        "        nn.functional.cross_entropy(m(x), y).backward()\n"
        "        opt.step()\n")
    out = tmp_path / "r.json"
    p = run(["run", "-q", "--every", "1", "--json", str(out), str(script)])
    assert p.returncode == 0, p.stderr
    events = load(out)["run"]["events"]
    assert [e["step"] for e in events if e["type"] == "segment"] == [6, 12]
    assert [(e["step"], e["steps"]) for e in events if e["type"] == "loss_on_probabilities"] == [(0, 6), (6, 6), (12, 6)]


WRAPPED_OPTIMIZER = '''
import torch, torch.nn as nn
from sklearn.datasets import load_digits


class Wrapped(torch.optim.Optimizer):
    """A wrapper in the style of ZeroRedundancyOptimizer and Lookahead: its step runs an inner optimizer's."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.inner = torch.optim.Adam(self.param_groups[0]["params"], lr=lr)

    @torch.no_grad()
    def step(self, closure=None):
        return self.inner.step(closure)


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = Wrapped(model.parameters(), 1e-3)
for step in range(30):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
print("loss", repr(loss.item()))
'''


def test_an_optimizer_stepped_inside_another_is_not_watched_twice(tmp_path):
    """The zero-code run finds both optimizers a wrapper makes; the inner one only ever
    steps inside the wrapper's step, so it is one step, recorded once, as the wrapper's
    (its kind stays in ``run.optimizers``: it is the update rule)."""
    script = tmp_path / "wrapped.py"
    script.write_text(WRAPPED_OPTIMIZER)
    out = tmp_path / "r.json"
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    p = run(["run", "-q", "--json", str(out), str(script)])
    assert p.returncode == 0, p.stderr
    assert p.stdout == plain.stdout  # the same training, bit for bit
    rep = load(out)
    assert rep["run"]["steps"] == 30 and rep["series"]["loss"]["steps"] == list(range(30))
    assert rep["run"]["optimizers"] == ["Wrapped", "Adam"]
    assert sorted(k for k in rep["series"] if k.startswith("lr/")) == ["lr/opt.0"]
    assert not [f for f in rep["findings"] if f["severity"] in ("warning", "critical")], rep["findings"]
