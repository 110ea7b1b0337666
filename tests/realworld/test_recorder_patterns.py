"""In-process checks (fast, torch as the oracle) of how the recorder measures the
issue-12 patterns: closure optimizers, GradScaler, updates without an optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradvitals as gv


def _values(watch, key):
    s = watch.record.series[key]
    return list(s.steps), [float(v) for v in s.values]


def test_lbfgs_step_gradient_and_loss_are_the_first_closure_evaluation():
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 64).unsqueeze(1)
    target = torch.sin(2 * x)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=10)
    first_grads, returned = [], []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        if len(first_grads) == len(returned):  # first evaluation of this step
            first_grads.append(model[0].weight.grad.norm().item())
        return loss

    with gv.watch(model, opt, every=1) as w:
        for _ in range(4):
            returned.append(opt.step(closure).item())
    steps, gnorm = _values(w, "grad_norm/0.weight")
    assert steps == [0, 1, 2, 3]
    assert gnorm == pytest.approx(first_grads, rel=1e-6)
    assert _values(w, "loss")[1] == pytest.approx(returned, rel=1e-6)


def _scaler_step(scaler, opt) -> bool:
    """``scaler.step(opt); scaler.update()``; False when the scaler skipped the step."""
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() >= scale


def test_gradscaler_loss_unscaled_and_skipped_steps_dropped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)  # the first fp16 backwards overflow
    losses, skipped = [], 0
    with gv.watch(model, opt, every=1) as w:
        for _ in range(12):
            x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            if _scaler_step(scaler, opt):
                losses.append(loss.item())
            else:
                skipped += 1
    assert skipped >= 1
    assert w.record.steps == 12 - skipped
    _, recorded = _values(w, "loss")
    assert recorded == pytest.approx(losses, rel=1e-5)
    assert all(math.isfinite(v) for v in _values(w, "grad_norm_global")[1])


def test_gradscaler_scale_that_overflows_the_scaled_loss_is_no_nan(digits):
    """A scale so large that ``loss * scale`` is Inf in float32 while the scaled gradients
    stay finite: the step is taken (not skipped); the loss recorded is the user's finite
    loss and nothing is reported non-finite. Also skipped steps and clipping after
    ``unscale_``, the usual AMP recipe."""
    from gradvitals.diagnose import diagnose

    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 3.0)  # losses ~200: loss * 2**127 overflows
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=10**6)
    losses, skipped, inf_scaled = [], 0, 0
    with gv.watch(model, opt) as w:
        for step in range(20):
            xb, yb = X[step * 32:(step + 1) * 32], y[step * 32:(step + 1) * 32]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            scaled = scaler.scale(loss)
            scaled.backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if _scaler_step(scaler, opt):
                losses.append(loss.item())
                inf_scaled += not math.isfinite(scaled.item())
            else:
                skipped += 1
    assert skipped >= 1 and inf_scaled >= 1  # both cases really happened
    _, recorded = _values(w, "loss")
    assert recorded == pytest.approx(losses, rel=1e-6)
    assert all(math.isfinite(v) for v in recorded)
    assert [f.code for f in diagnose(w.record) if f.code == "nonfinite"] == []


def test_update_ratio_without_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    lr, expected = 0.1, []
    with gv.watch(model, every=2) as w:
        for step in range(5):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            model.zero_grad()
            loss.backward()
            before = model[0].weight.detach().clone()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-lr)
            expected.append(((model[0].weight - before).norm() / before.norm()).item())
        model(torch.randn(16, 8)).pow(2).mean().backward()  # the next backward closes step 4
    steps, ratios = _values(w, "update_ratio/0.weight")
    assert steps == [0, 2, 4]
    assert ratios == pytest.approx([expected[s] for s in steps], rel=1e-5)
