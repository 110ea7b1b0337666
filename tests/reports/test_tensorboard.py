"""TensorBoard output of ``watch(..., tensorboard=DIR)``, read back with EventAccumulator;
torch is the oracle for every logged number."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradvitals as gv

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(logdir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_and_findings_round_trip(tmp_path, digits):
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, nan_step = 6, 4
    grad_norms: dict[str, list[float]] = {n: [] for n, _ in model.named_parameters()}
    ratios: dict[str, list[float]] = {n: [] for n, _ in model.named_parameters()}
    losses = []
    with gv.watch(model, opt, tensorboard=str(tmp_path), every=1) as w:
        for step in range(steps):
            xb = X[step * 32:(step + 1) * 32].clone()
            if step == nan_step:
                xb[0, 0] = math.inf  # a corrupt sample: the loss and gradients go NaN
            loss = nn.functional.cross_entropy(model(xb), y[step * 32:(step + 1) * 32])
            opt.zero_grad()
            loss.backward()
            losses.append(loss.item())
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            for n, p in model.named_parameters():
                grad_norms[n].append(p.grad.norm().item())
            if step < nan_step:
                opt.step()
                for n, p in model.named_parameters():
                    ratios[n].append(((p.detach() - before[n]).norm() / before[n].norm()).item())
            else:
                opt.step()
    assert w.step == steps
    acc = _read(tmp_path)
    tags = acc.Tags()["scalars"]
    loss_events = acc.Scalars("gradvitals/loss")
    # finite values are logged, NaN ones are left out (TensorBoard would break its axis)
    assert [e.step for e in loss_events] == list(range(nan_step))
    for e in loss_events:
        assert math.isclose(e.value, losses[e.step], rel_tol=1e-5)
    assert [e.step for e in acc.Scalars("gradvitals/grad_norm_global")] == list(range(nan_step))
    for name in grad_norms:
        tag = f"gradvitals/grad_norm/{name}"
        assert tag in tags, tags
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(nan_step))
        for e in events:
            assert math.isclose(e.value, grad_norms[name][e.step], rel_tol=1e-4), (name, e.step)
        ur = acc.Scalars(f"gradvitals/update_ratio/{name}")
        assert [e.step for e in ur] == list(range(nan_step))
        for e in ur:
            assert math.isclose(e.value, ratios[name][e.step], rel_tol=1e-3), (name, e.step)
    texts = acc.Tags()["tensors"]
    assert "gradvitals/nonfinite/text_summary" in texts, texts
    text = acc.Tensors("gradvitals/nonfinite/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("**critical**") and f"step {nan_step}" in text


def test_one_scalar_per_step_on_a_finite_run(tmp_path, digits):
    """The last step's update ratios arrive in a later fetch: its loss must not be logged twice."""
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt, tensorboard=str(tmp_path), every=1):
        for step in range(3):
            loss = nn.functional.cross_entropy(model(X[:32]), y[:32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = _read(tmp_path)
    for tag in ("gradvitals/loss", "gradvitals/grad_norm_global", "gradvitals/grad_norm/0.weight",
                "gradvitals/update_ratio/0.weight"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 1, 2], tag


def test_two_findings_of_one_code_get_a_tag_each(tmp_path):
    """Two recurrent layers whose W_hh has spectral radius > 1: two architecture_risk
    findings, each readable under its own TensorBoard text tag."""

    class TwoRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn_a = nn.RNN(8, 16, batch_first=True)
            self.rnn_b = nn.RNN(16, 16, batch_first=True)
            self.head = nn.Linear(16, 1)
            with torch.no_grad():
                for rnn in (self.rnn_a, self.rnn_b):
                    nn.init.orthogonal_(rnn.weight_hh_l0)
                    rnn.weight_hh_l0.mul_(1.6)  # spectral radius 1.6

        def forward(self, x):
            return self.head(self.rnn_b(self.rnn_a(x)[0])[0][:, -1])

    torch.manual_seed(0)
    model = TwoRNN()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 12, 8), torch.randn(16, 1)
    with gv.watch(model, opt, tensorboard=str(tmp_path)) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    from gradvitals.diagnose import diagnose

    codes = [f.code for f in diagnose(w.record) if f.evidence.get("kind") == "recurrent_spectral_radius"]
    assert len(codes) == 2, codes
    texts = set(_read(tmp_path).Tags()["tensors"])
    assert "gradvitals/architecture_risk/text_summary" in texts, texts
    assert "gradvitals/architecture_risk/rnn_b/text_summary" in texts, texts


def test_per_layer_gradient_norms_as_the_help_promises(tmp_path, digits):
    """`--tensorboard` promises per-layer scalars: each layer's gradient norm (weight and
    bias together) every step, equal to torch's norm of the layer's gradients."""
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want: dict[str, list[float]] = {"0": [], "2": []}
    with gv.watch(model, opt, tensorboard=str(tmp_path)):
        for step in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[step * 32:(step + 1) * 32]), y[step * 32:(step + 1) * 32]).backward()
            for name in want:
                layer = model[int(name)]
                want[name].append(torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()]).norm().item())
            opt.step()
    acc = _read(tmp_path)
    for name, values in want.items():
        events = acc.Scalars(f"gradvitals/layer_grad_norm/{name}")
        assert [e.step for e in events] == [0, 1, 2, 3]
        for e in events:
            assert math.isclose(e.value, values[e.step], rel_tol=1e-4), (name, e.step)
    assert "gradvitals/layer_grad_norm/1" not in acc.Tags()["scalars"]  # ReLU: no parameters
