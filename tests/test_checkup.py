"""gv.checkup and `gradvitals checkup`: step-0 diagnosis of the chapter's configurations,
the model left bit-identical, every batch form, and the same report contract as a run."""

from __future__ import annotations

import copy
import json
import runpy
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import gradvitals as gv
from gradvitals.cli import main as cli
from gradvitals.probes import patches
from gradvitals.report import Report

#: The done-when budget per configuration on a CPU (interpreter start not included).
CHECKUP_SECONDS = 5.0

CHAPTER_SCRIPT = textwrap.dedent('''
    """The chapter's configurations as one plain training script (no gradvitals import)."""
    import argparse

    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits


    def mlp(act, init=None, depth=20, width=64):
        layers, d = [], 64
        for _ in range(depth):
            lin = nn.Linear(d, width)
            if init == "n01":
                nn.init.normal_(lin.weight, 0.0, 1.0)
            elif init == "zero":
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            elif init == "he":
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                nn.init.zeros_(lin.bias)
            layers += [lin, act()]
            d = width
        head = nn.Linear(d, 10)
        if init == "zero":
            nn.init.zeros_(head.weight)
        return nn.Sequential(*layers, head)


    class Transformer(nn.Module):
        def __init__(self, norm_first, depth=12):
            super().__init__()
            self.proj = nn.Linear(8, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=norm_first)
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.encoder(self.proj(x.view(-1, 8, 8))).mean(1))


    class RNN(nn.Module):
        def __init__(self, radius):
            super().__init__()
            self.rnn = nn.RNN(8, 32, batch_first=True)
            self.head = nn.Linear(32, 10)
            with torch.no_grad():
                q, _ = torch.linalg.qr(torch.randn(32, 32))
                self.rnn.weight_hh_l0.copy_(q * radius)

        def forward(self, x):
            return self.head(self.rnn(x.view(-1, 8, 8))[0][:, -1])


    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            )
            self.head = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x):
            return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


    BUILD = {
        "sigmoid_plain": lambda: mlp(nn.Sigmoid),
        "relu_n01": lambda: mlp(nn.ReLU, "n01"),
        "zero_init": lambda: mlp(nn.ReLU, "zero"),
        "post_ln": lambda: Transformer(False),
        "rnn_radius_1.5": lambda: RNN(1.5),
        "he_relu": lambda: mlp(nn.ReLU, "he"),
        "pre_ln": lambda: Transformer(True),
        "cnn_bn": CNN,
    }

    if __name__ == "__main__":
        p = argparse.ArgumentParser()
        p.add_argument("config", choices=sorted(BUILD))
        p.add_argument("--steps", type=int, default=100)
        p.add_argument("--no-optimizer", action="store_true")
        p.add_argument("--fail-before-step", action="store_true")
        p.add_argument("--no-backward", action="store_true")
        a = p.parse_args()
        torch.manual_seed(0)
        X, y = load_digits(return_X_y=True)
        X = torch.tensor(X / 16.0, dtype=torch.float32)
        y = torch.tensor(y)
        model = BUILD[a.config]()
        opt = None if a.no_optimizer else torch.optim.SGD(model.parameters(), lr=0.05)
        if a.fail_before_step:
            raise RuntimeError("data loader exploded")
        for step in range(a.steps):
            idx = torch.randint(0, len(X), (64,))
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            if a.no_backward:
                continue
            if opt is not None:
                opt.zero_grad()
            loss.backward()
            if opt is not None:
                opt.step()
            else:
                with torch.no_grad():
                    for prm in model.parameters():
                        prm -= 0.05 * prm.grad
                        prm.grad = None
            print("step", step, "done")
        print("finished all steps")
''')

#: config -> codes that must be among the warning/critical findings (None: healthy, none at all).
EXPECTED: dict[str, set[str] | None] = {
    "sigmoid_plain": {"vanishing_gradients", "poor_initialization", "architecture_risk"},
    "relu_n01": {"poor_initialization"},
    "zero_init": {"symmetric_weights"},
    "post_ln": {"architecture_risk"},
    "rnn_radius_1.5": {"architecture_risk"},
    "he_relu": None,
    "pre_ln": None,
    "cnn_bn": None,
}


@pytest.fixture(scope="module")
def chapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("chapter") / "chapter.py"
    path.write_text(CHAPTER_SCRIPT)
    return path


@pytest.fixture(scope="module")
def build(chapter):
    return runpy.run_path(str(chapter), run_name="chapter")["BUILD"]


def problems(report: Report) -> set[str]:
    return {f.code for f in report.problems()}


# ----------------------------------------------------------------- diagnosis
@pytest.mark.parametrize("config", list(EXPECTED))
def test_chapter_configuration_diagnosed_at_step_0(config, build, digits):
    X, y = digits
    torch.manual_seed(0)
    model = build[config]()
    t0 = time.perf_counter()
    report = gv.checkup(model, (X[:64], y[:64]))
    elapsed = time.perf_counter() - t0
    assert elapsed < CHECKUP_SECONDS
    expected = EXPECTED[config]
    if expected is None:
        assert problems(report) == set(), [f.summary for f in report.problems()]
        assert all(f.severity == "info" for f in report.findings)
    else:
        assert expected <= problems(report), [(f.code, f.severity, f.summary) for f in report.findings]
    # the step-0 record behind it: one loss, one gradient norm per parameter, activations in order
    rec = report.record
    assert rec.get("loss").count == 1
    assert all(rec.get(f"grad_norm/{name}").count == 1 for name, p in model.named_parameters())
    assert rec.run["mode"] == "checkup" and rec.run["checkup_loss"] == "cross_entropy"
    assert len(rec.events_of("init_audit")) == 1


def test_findings_point_at_the_right_layers(build, digits):
    X, y = digits
    torch.manual_seed(0)
    zero = gv.checkup(build["zero_init"](), (X[:64], y[:64]))
    sym = next(f for f in zero.findings if f.code == "symmetric_weights")
    assert sym.severity == "critical" and sym.layers[0] == "0" and "40" not in sym.layers
    rnn = gv.checkup(build["rnn_radius_1.5"](), (X[:64], y[:64]))
    arch = next(f for f in rnn.findings if f.code == "architecture_risk")
    assert arch.layers == ("rnn",) and arch.evidence["spectral_radius"] == pytest.approx(1.5, rel=1e-4)
    # torch is the oracle for the radius
    post = gv.checkup(build["post_ln"](), (X[:64], y[:64]))
    arch = next(f for f in post.findings if f.code == "architecture_risk")
    assert arch.evidence["post_ln_layers"] == 12 and arch.layers[0] == "encoder.layers.0"


def test_init_audit_facts_match_torch(build, digits):
    X, y = digits
    torch.manual_seed(0)
    model = build["relu_n01"]()
    rec = gv.checkup(model, (X[:64], y[:64])).record
    for name in ("0", "20", "40"):
        w = dict(model.named_modules())[name].weight.detach().double()
        extra = rec.layers[name].extra
        assert extra["weight_std"] == pytest.approx(w.std(correction=0).item(), rel=1e-9)
        assert (extra["fan_in"], extra["fan_out"]) == (w.shape[1], w.shape[0])
        assert extra["identical_rows"] is False
    assert rec.layers["0"].activation_after.lower() == "relu" and rec.layers["40"].activation_after is None
    act = rec.get("act_std/38")
    x = X[:64]
    with torch.no_grad():
        for layer in list(model)[:39]:
            x = layer(x)
    assert act.values[0] == pytest.approx(x.std(correction=0).item(), rel=1e-4)


def test_residual_paths_are_found_in_the_traced_forward(digits):
    X, y = digits

    class ResSigmoid(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, 64)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.Sigmoid()) for _ in range(20))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.inp(x)
            for block in self.blocks:
                x = x + block(x)
            return self.head(x)

    torch.manual_seed(0)
    report = gv.checkup(ResSigmoid(), (X[:64], y[:64]))
    rec = report.record
    assert all(rec.layers[f"blocks.{i}.0"].extra.get("residual_bypass") for i in range(20))
    assert not rec.layers["inp"].extra.get("residual_bypass") and not rec.layers["head"].extra.get("residual_bypass")
    assert rec.events_of("init_audit")[0]["residual_adds"] == 20
    assert "architecture_risk" not in report.codes  # the same sigmoids, with a gradient highway


def test_the_last_layer_of_each_residual_branch_is_told_apart(digits):
    """x = x + fc2(relu(fc1(x))) with every weight zero: both layers are bypassed, only
    fc2 (the layer a Fixup/ReZero init may start at zero) ends its branch; fc1's zero
    rows are a symmetry nothing breaks. With only fc2 zero: nothing to report."""
    X, y = digits

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(64, 64)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
                                        for _ in range(3))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.inp(x)
            for block in self.blocks:
                x = x + block(x)
            return self.head(x)

    for zero_first in (True, False):
        torch.manual_seed(0)
        model = Res()
        for block in model.blocks:
            nn.init.zeros_(block[2].weight)
            if zero_first:
                nn.init.zeros_(block[0].weight)
        report = gv.checkup(model, (X[:64], y[:64]))
        ex = {n: report.record.layers[n].extra for n in ("blocks.0.0", "blocks.0.2")}
        assert ex["blocks.0.0"]["residual_branch_last"] is False and ex["blocks.0.2"]["residual_branch_last"] is True
        sym = [f for f in report.findings if f.code == "symmetric_weights"]
        if zero_first:
            assert sym and set(sym[0].layers) == {"blocks.0.0", "blocks.1.0", "blocks.2.0"}, sym
            assert "model.blocks[0][2]" in sym[0].advice
        else:
            assert not sym, sym[0].summary


# ------------------------------------------------------- leaves no trace
class Messy(nn.Module):
    """BatchNorm running stats, dropout (RNG), spectral norm (writes buffers in forward)."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.spectral_norm(nn.Linear(64, 32))
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.3)
        self.frozen_bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.frozen_bn(self.drop(F.relu(self.bn(self.a(x))))))


def test_checkup_leaves_the_model_bit_identical(digits):
    X, y = digits
    torch.manual_seed(0)
    model = Messy()
    model.frozen_bn.eval()  # a deliberately frozen BatchNorm keeps its flag
    model.head(torch.randn(3, 32)).sum().backward()  # grads already accumulated by the user
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    grad_values = {n: None if g is None else g.clone() for n, g in grads.items()}
    flags = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    backward = torch.Tensor.backward

    report = gv.checkup(model, (X[:64], y[:64]))

    assert report.record.get("loss").count == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert p.grad is grads[n]  # the user's own gradient tensors, untouched
        if p.grad is not None:
            assert torch.equal(p.grad, grad_values[n])
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.Tensor.backward is backward and not patches.active()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_checkup_of_an_eval_model_runs_it_in_training_mode_and_restores_eval(digits):
    X, y = digits
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)).eval()
    report = gv.checkup(model, (X[:64], y[:64]))
    assert report.record.get("act_std/1") is not None  # traced: train-mode forward
    assert report.record.get("bn_batch/1").values[0] == 64
    assert not any(m.training for m in model.modules())


def test_training_after_a_checkup_is_bit_identical_to_training_without(digits):
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.2), nn.ReLU(), nn.Linear(32, 10))
    twin = copy.deepcopy(model)

    def losses(m):
        torch.manual_seed(1)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        out = []
        for i in range(5):
            loss = F.cross_entropy(m(X[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    torch.manual_seed(1)
    gv.checkup(model, (X[:64], y[:64]))
    assert losses(model) == losses(twin)


# -------------------------------------------------------------- batch forms
class Dictish(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.out = nn.Linear(16, 20)

    def forward(self, input_ids, labels=None):
        logits = self.out(self.emb(input_ids))
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1))
        return {"loss": loss, "logits": logits}


def test_batch_forms_and_default_losses():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5)
    x = torch.randn(6, 8)
    cls = torch.randint(0, 5, (6,))
    assert gv.checkup(lin, x).record.run["checkup_loss"] == "mean of output"
    assert gv.checkup(lin, (x,)).record.run["checkup_loss"] == "mean of output"
    assert gv.checkup(lin, (x, cls)).record.run["checkup_loss"] == "cross_entropy"
    assert gv.checkup(lin, [x, torch.randn(6, 5)]).record.run["checkup_loss"] == "mean of output"
    assert gv.checkup(lin, (x, cls + 5)).record.run["checkup_loss"] == "mean of output"  # not its classes
    rep = gv.checkup(lin, (x, cls))
    assert rep.record.get("loss").values[0] == pytest.approx(F.cross_entropy(lin(x), cls).item(), rel=1e-6)

    ids = torch.randint(0, 20, (3, 7))
    model = Dictish()
    assert gv.checkup(model, {"input_ids": ids, "labels": ids}).record.run["checkup_loss"] == "output.loss"
    # (N, L, V) logits with (N, L) targets: classes on the last dim
    seq = gv.checkup(model, ({"input_ids": ids}, ids))
    assert seq.record.run["checkup_loss"] == "cross_entropy"
    assert seq.record.get("loss").values[0] == pytest.approx(
        F.cross_entropy(model(ids)["logits"].reshape(-1, 20), ids.reshape(-1)).item(), rel=1e-6)

    two_inputs = nn.Bilinear(4, 3, 2)
    seen = []

    def loss_fn(out, targets):
        seen.append(targets)
        return (out - targets).pow(2).mean()

    t = torch.randn(5, 2)
    rep = gv.checkup(two_inputs, ((torch.randn(5, 4), torch.randn(5, 3)), t), loss_fn=loss_fn)
    assert rep.record.run["checkup_loss"] == "loss_fn" and seen[0] is t


def test_bad_input_is_named():
    lin = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gv.checkup(lambda x: x, torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"batch must be a tensor, a dict, \(inputs,\) or \(inputs, targets\); got int"):
        gv.checkup(lin, 3)
    with pytest.raises(ValueError, match="got a tuple of length 3"):
        gv.checkup(lin, (torch.randn(2, 3), torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="empty dict"):
        gv.checkup(lin, {})
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gv.checkup(lin, torch.randn(2, 3), loss_fn="mse")
    with pytest.raises(ValueError, match="loss must be a scalar tensor"):
        gv.checkup(lin, torch.randn(2, 3), loss_fn=lambda out, t: out)
    # a failed checkup still leaves no hooks or patches behind
    assert not patches.active() and not lin._forward_hooks and not lin._forward_pre_hooks


# ------------------------------------------------- the same lint in a watched run
def test_a_watched_run_reports_the_same_architecture_lint(build, digits):
    X, y = digits
    torch.manual_seed(0)
    model = build["sigmoid_plain"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gv.watch(model, opt) as watch:
        for i in range(3):
            loss = F.cross_entropy(model(X[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    codes = {f.code for f in watch.diagnosis().findings}
    assert {"architecture_risk", "poor_initialization"} <= codes


def test_the_audit_does_not_change_a_watched_runs_numbers(build, digits):
    X, y = digits

    def run(watched):
        torch.manual_seed(0)
        model = build["post_ln"]()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        w = gv.watch(model, opt, every=1) if watched else None
        out = []
        for i in range(3):
            loss = F.cross_entropy(model(X[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        if w is not None:
            w.close()
            assert w.record.events_of("init_audit") and not w.record.events_of("probe_error")
        return out, [p.detach().clone() for p in model.parameters()]

    (l1, p1), (l2, p2) = run(False), run(True)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_report_contract_and_rediagnosis(build, digits):
    X, y = digits
    torch.manual_seed(0)
    report = gv.checkup(build["sigmoid_plain"](), (X[:64], y[:64]))
    data = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert data["schema"] == "gradvitals.report/1"
    assert {"run", "layers", "series", "findings"} <= set(data)
    again = Report.from_json(data, rediagnose=True)
    assert sorted(again.codes) == sorted(report.codes)


# ----------------------------------------------------------------------- CLI
def invoke(*args):
    return CliRunner().invoke(cli, ["checkup", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("config", list(EXPECTED))
def test_cli_checkup_on_the_unmodified_script(config, chapter, tmp_path):
    out = tmp_path / "checkup.json"
    t0 = time.perf_counter()
    res = invoke("--json", out, chapter, config, "--steps", "50")
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert elapsed < CHECKUP_SECONDS
    assert "step 0 done" not in res.output and "finished all steps" not in res.output  # stopped at the first step
    data = json.loads(out.read_text())
    assert data["schema"] == "gradvitals.report/1"
    assert data["series"]["loss"]["count"] == 1
    assert data["run"]["command"].startswith("gradvitals checkup") and data["run"]["mode"] == "checkup"
    found = {f["code"] for f in data["findings"] if f["severity"] in ("critical", "warning")}
    expected = EXPECTED[config]
    assert found == set() if expected is None else expected <= found


def test_cli_checkup_without_an_optimizer_stops_after_the_first_backward(chapter, tmp_path):
    out = tmp_path / "c.json"
    res = invoke("--json", out, chapter, "sigmoid_plain", "--no-optimizer")
    assert res.exit_code == 0, res.output
    assert "step 0 done" not in res.output
    data = json.loads(out.read_text())
    assert data["series"]["loss"]["count"] == 1 and "architecture_risk" in {f["code"] for f in data["findings"]}


def test_cli_checkup_of_a_closure_optimizer_diagnoses_its_first_evaluation(tmp_path):
    """LBFGS steps with a closure: the step's gradient comes from the closure's first
    backward, after the optimizer's pre-hook. checkup stops there (it stopped at the
    pre-hook, before any backward, and said both "Healthy" and "nothing to diagnose")."""
    script = Path(__file__).resolve().parent / "realworld" / "lbfgs.py"
    out = tmp_path / "c.json"
    res = invoke("--json", out, script)
    assert res.exit_code == 0, res.output
    assert "nothing to diagnose" not in res.output
    data = json.loads(out.read_text())
    assert data["series"]["loss"]["count"] == 1 and data["run"]["steps"] <= 1
    grads = [k for k in data["series"] if k.startswith("grad_norm/")]
    assert grads and all(data["series"][k]["count"] == 1 for k in grads)


def test_cli_checkup_exit_statuses(chapter, tmp_path):
    res = invoke(chapter, "he_relu", "--fail-before-step")
    assert res.exit_code == 1 and "data loader exploded" in res.output
    res = invoke(chapter, "he_relu", "--no-backward", "--steps", "2")
    assert res.exit_code == 1 and "ended before its first backward()" in res.output
    assert "Healthy" not in res.output  # no verdict on a run that computed no gradient
    res = invoke("--json", tmp_path / "missing" / "r.json", chapter, "he_relu")
    assert res.exit_code == 2 and "--json" in res.output
    res = invoke(tmp_path / "nope.py")
    assert res.exit_code == 2 and "script not found" in res.output


def test_audit_trace_survives_a_forward_that_raises():
    """The user's exception comes through unchanged, the function mode is gone, and the
    recorder's close removes the root hook that had to stay during torch's hook loop."""
    from torch.overrides import _get_current_function_mode_stack

    from gradvitals.probes import init_audit
    from gradvitals.recorder import Recorder

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            x = self.lin(x)
            raise RuntimeError("boom in forward")

    model = Boom()
    rec = Recorder()
    try:
        entry = rec.add_model(model, local_hooks=False)
        init_audit.start(rec, entry)
        with pytest.raises(RuntimeError, match="boom in forward"):
            model(torch.randn(2, 4))
        assert _get_current_function_mode_stack() == []
        assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks
        assert rec.record.layers["lin"].extra["fan_in"] == 4
    finally:
        rec.close()
    assert not model._forward_hooks and not patches.active()


def test_a_failing_audit_is_reported_through_the_recorders_public_fail(monkeypatch):
    """The audit reports its own failure once, as a probe_error, and the checkup goes on."""
    from gradvitals.probes import init_audit

    def broken_write(self):
        raise RuntimeError("audit broke")

    monkeypatch.setattr(init_audit._SkipTrace, "_write", broken_write)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    report = gv.checkup(model, (torch.randn(16, 4), torch.randint(0, 2, (16,))))
    errors = [e for e in report.record.events_of("probe_error") if e.get("probe") == "init_audit"]
    assert len(errors) == 1 and "audit broke" in errors[0]["error"]
    assert report.record.get("grad_norm/0.weight") is not None  # the rest of the checkup ran
