"""gv.watch on real training: measures what torch measures, changes nothing, leaves nothing behind."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from torch import nn

import gradvitals as gv
from gradvitals.probes import patches
from models import FACTORIES, mlp, train


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_watched_run_is_bit_identical(kind, digits):
    X, y = digits
    torch.manual_seed(0)
    base = FACTORIES[kind]()
    twin = copy.deepcopy(base)
    torch.manual_seed(1)
    plain_losses, _ = train(base, X, y)
    plain_rng = torch.get_rng_state()
    torch.manual_seed(1)
    with gv.watch(twin, every=1) as w:  # every probe on every step: the most intrusive setting
        watched_losses, _ = train(twin, X, y)
    watched_rng = torch.get_rng_state()
    assert plain_losses == watched_losses
    assert torch.equal(plain_rng, watched_rng)  # the RNG stream is untouched (dropout etc.)
    a, b = _state(base), _state(twin)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert w.step == 12  # backward mode without an optimizer: one step per backward


def test_grad_norms_match_torch_and_loss_is_captured(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    with gv.watch(model, opt) as w:
        for i in range(5):
            loss = nn.functional.cross_entropy(model(X[:64]), y[:64])
            opt.zero_grad()
            loss.backward()
            expected.append({n: p.grad.norm().item() for n, p in model.named_parameters()} | {"loss": loss.item()})
            opt.step()
    rec = w.record
    assert rec.steps == 5
    for step, exp in enumerate(expected):
        assert rec.series["loss"].values[step] == pytest.approx(exp["loss"], rel=1e-6)
        for name, norm in exp.items():
            if name != "loss":
                assert rec.series[f"grad_norm/{name}"].values[step] == pytest.approx(norm, rel=1e-5)
        glob = math.sqrt(sum(v * v for k, v in exp.items() if k != "loss"))
        assert rec.series["grad_norm_global"].values[step] == pytest.approx(glob, rel=1e-5)


@pytest.mark.parametrize("normalise", ["divide", "multiply", "none", "other_divisor"])
def test_accumulated_step_loss_is_the_loss_the_user_knows(digits, normalise):
    """Gradient accumulation, 4 micro-batches per step. Each micro-batch's loss divided
    by 4 (or multiplied by 1/4), as accumulation loops do: the step's loss is their sum,
    the mean of the undivided losses (what such scripts print), not a quarter of it.
    Not divided, or divided by something else than the number of micro-batches: the
    mean of what went into backward."""
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    expected = []
    with gv.watch(model, opt) as w:
        for step in range(4):
            opt.zero_grad()
            backed = []
            for i in range(4):
                sl = slice(64 * (4 * step + i), 64 * (4 * step + i + 1))
                raw = nn.functional.cross_entropy(model(X[sl]), y[sl])
                loss = {"divide": raw / 4, "multiply": raw * 0.25, "none": raw, "other_divisor": raw / 3}[normalise]
                loss.backward()
                backed.append(loss.item())
            opt.step()
            expected.append(sum(backed) if normalise in ("divide", "multiply") else sum(backed) / 4)
    assert w.record.series["loss"].values == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("accum,divide", [(1, False), (2, False), (2, True)])
def test_backwards_after_one_forward_are_one_objective(digits, accum, divide):
    """``ce.backward(retain_graph=True); reg.backward()``: two terms of one forward's
    objective, the step's loss is their sum (it was their mean, half the loss the
    script prints). With gradient accumulation over such micro-batches: the sum per
    micro-batch, then the accumulation rule across them (mean; sum when divided)."""
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    expected = []
    with gv.watch(model, opt) as w:
        for step in range(4):
            opt.zero_grad()
            objective = []
            for i in range(accum):
                sl = slice(64 * (accum * step + i), 64 * (accum * step + i + 1))
                logits = model(X[sl])
                ce = nn.functional.cross_entropy(logits, y[sl])
                reg = 0.1 * logits.pow(2).mean()
                if divide:
                    ce, reg = ce / accum, reg / accum
                ce.backward(retain_graph=True)
                reg.backward()
                objective.append(ce.item() + reg.item())
            opt.step()
            expected.append(sum(objective) if divide or accum == 1 else sum(objective) / accum)
    assert w.record.series["loss"].values == pytest.approx(expected, rel=1e-6)


def test_loss_differentiated_by_autograd_grad(digits):
    """Loops that call ``torch.autograd.grad(loss, params)`` and set ``p.grad``
    themselves run no backward: their loss is the one differentiated (no loss was
    recorded). A step that also runs a backward (a meta-learning outer loss after an
    inner ``autograd.grad`` step) keeps the backward's loss."""
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    expected = []
    with gv.watch(model, opt) as w:
        for step in range(4):
            loss = nn.functional.cross_entropy(model(X[64 * step:64 * step + 64]), y[64 * step:64 * step + 64])
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
            expected.append(loss.item())
    assert w.record.series["loss"].values == pytest.approx(expected, rel=1e-6)
    expected = []
    with gv.watch(model, opt) as w:
        for step in range(3):
            xs, ys = X[64 * step:64 * step + 32], y[64 * step:64 * step + 32]
            inner = nn.functional.cross_entropy(model(xs), ys)
            grads = torch.autograd.grad(inner, params, create_graph=True)
            fast = [p - 0.1 * g for p, g in zip(params, grads)]
            h = torch.relu(X[64 * step + 32:64 * step + 64] @ fast[0].T + fast[1])
            for i in range(2, len(fast) - 2, 2):
                h = torch.relu(h @ fast[i].T + fast[i + 1])
            outer = nn.functional.cross_entropy(h @ fast[-2].T + fast[-1], y[64 * step + 32:64 * step + 64])
            opt.zero_grad()
            outer.backward()
            opt.step()
            expected.append(outer.item())
    assert w.record.series["loss"].values == pytest.approx(expected, rel=1e-6)


def test_backward_of_a_list_of_losses_records_their_sum(digits):
    """Multi-task loops call torch.autograd.backward([loss_a, loss_b]): the applied
    gradient is that of their sum, so the step's loss is their sum (no loss at all was
    recorded). Seeded with one-element grad_tensors: their weighted sum."""
    X, y = digits
    torch.manual_seed(0)
    body, head_a, head_b = nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10), nn.Linear(32, 1)
    opt = torch.optim.SGD([*body.parameters(), *head_a.parameters(), *head_b.parameters()], lr=0.05)
    expected = []
    with gv.watch([body, head_a, head_b], opt) as w:
        for step in range(4):
            h = body(X[32 * step:32 * step + 32])
            la = nn.functional.cross_entropy(head_a(h), y[32 * step:32 * step + 32])
            lb = head_b(h).pow(2).mean()
            opt.zero_grad()
            torch.autograd.backward([la, 0.5 * lb])
            opt.step()
            expected.append(la.item() + 0.5 * lb.item())
    assert w.record.series["loss"].values == pytest.approx(expected, rel=1e-6)
    expected = []
    with gv.watch([body, head_a, head_b], opt) as w:
        for step in range(3):
            h = body(X[:32])
            la, lb = nn.functional.cross_entropy(head_a(h), y[:32]), head_b(h).pow(2).mean()
            opt.zero_grad()
            torch.autograd.backward([la, lb], grad_tensors=[torch.tensor(1.0), torch.tensor(0.1)])
            opt.step()
            expected.append(la.item() + 0.1 * lb.item())
    assert w.record.series["loss"].values == pytest.approx(expected, rel=1e-6)


def test_update_ratio_matches_oracle(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with gv.watch(model, opt, every=1) as w:
        loss = nn.functional.cross_entropy(model(X[:64]), y[:64])
        opt.zero_grad()
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    for n, p in model.named_parameters():
        oracle = ((p.detach() - before[n]).norm() / before[n].norm()).item()
        assert w.record.series[f"update_ratio/{n}"].values[0] == pytest.approx(oracle, rel=1e-4)
        assert w.record.series[f"weight_norm/{n}"].values[0] == pytest.approx(before[n].norm().item(), rel=1e-5)


def test_activation_stats_match_oracle(digits):
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt) as w:
        out = model(X[:50])
        nn.functional.cross_entropy(out, y[:50]).backward()
        opt.step()
    s = w.record.series
    assert s["act_std/1"].values[0] > 0
    assert 0 <= s["act_sat_frac/1"].values[0] <= 1
    assert math.isnan(s["act_sat_frac/0"].values[0])  # Linear: not a saturating module
    assert s["dead_frac/0"].values[0] >= 0
    layers = w.record.layers
    assert layers["0"].depth < layers["1"].depth < layers["2"].depth
    from gradvitals.taxonomy import activation_family

    assert activation_family(layers["0"].activation_after) == "sigmoid"


def test_activation_stats_oracle_values(digits):
    X, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    x = X[:40]
    with torch.no_grad():
        pre = model[0](x)
        post = torch.relu(pre)
    with gv.watch(model) as w:
        model(x).sum().backward()
    s = w.record.series
    assert s["act_mean/1"].values[0] == pytest.approx(post.mean().item(), rel=1e-5)
    assert s["act_std/1"].values[0] == pytest.approx(post.std(unbiased=False).item(), rel=1e-5)
    assert s["act_zero_frac/1"].values[0] == pytest.approx((post == 0).float().mean().item())
    never = ((pre > 0).sum(0) == 0).float().mean().item()
    assert s["dead_frac/0"].values[0] == pytest.approx(never)


class _FunctionalActs(nn.Module):
    """Activations called as functions (no module to hook): torch.tanh, torch.sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.sigmoid(self.b(torch.tanh(self.a(x)))))


def test_functional_tanh_and_sigmoid_saturation_match_oracle(digits):
    """issue 25: the saturation of a functional activation is measured on the weight
    layer feeding it; torch's own tanh/sigmoid outputs are the oracle."""
    X, y = digits
    torch.manual_seed(0)
    model = _FunctionalActs()
    with torch.no_grad():
        model.a.weight.mul_(8.0)  # a part of the tanh's outputs past 0.99
        model.b.weight.mul_(20.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: one oracle for every step
    x = X[:50]
    with gv.watch(model, opt, every=1) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y[:50]).backward()
            opt.step()
    with torch.no_grad():
        t = torch.tanh(model.a(x))
        sg = torch.sigmoid(model.b(t))
    tanh_sat = (t.abs() > 0.99).float().mean().item()
    sig_sat = ((sg - 0.5).abs() > 0.49).float().mean().item()
    assert 0.05 < tanh_sat < 0.95 and 0.05 < sig_sat < 0.95  # the oracle is not trivial
    s = w.record.series
    assert w.record.layers["a"].activation_after == "tanh"
    assert s["act_sat_frac/a"].values[-1] == pytest.approx(tanh_sat, abs=1e-6)
    assert s["act_sat_frac/b"].values[-1] == pytest.approx(sig_sat, abs=1e-6)
    assert math.isnan(s["act_sat_frac/head"].values[-1])  # nothing saturating after the head


def test_functional_activations_are_told_from_a_module_calling_the_same_function():
    from gradvitals.probes.topology import functional_activations

    # nn.Sigmoid's forward calls torch.sigmoid: its module event follows the call
    module = [("module", "0", "Linear"), ("func", "sigmoid", ""), ("module", "1", "Sigmoid"),
              ("module", "2", "Linear")]
    assert functional_activations(module) == set()
    # torch.tanh(self.a(x)) then a Linear: a function of the user's
    function = [("module", "a", "Linear"), ("func", "tanh", ""), ("module", "b", "Linear"),
                ("func", "sigmoid", ""), ("module", "head", "Linear")]
    assert functional_activations(function) == {"a", "b"}
    # a LayerNorm or a dropout in between: the Linear's output is not the pre-activation
    for between in ("LayerNorm", "Dropout"):
        assert functional_activations([("module", "a", "Linear"), ("module", "n", between),
                                       ("func", "tanh", "")]) == set()


def test_close_removes_every_hook_and_patch():
    model = mlp(depth=2)
    opt = torch.optim.Adam(model.parameters())
    backward_before = torch.Tensor.backward
    clip_before = torch.nn.utils.clip_grad_norm_
    clip_with_norm_before = torch.nn.utils.clip_grads_with_norm_
    w = gv.watch(model, opt, every=1)
    assert torch.Tensor.backward is not backward_before
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    w.close()
    w.close()  # idempotent
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert torch.Tensor.backward is backward_before
    assert torch.nn.utils.clip_grad_norm_ is clip_before
    assert torch.nn.utils.clip_grads_with_norm_ is clip_with_norm_before
    assert patches.active() == []


def test_several_optimizers_and_clipping(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    head = list(model[4].parameters())
    opt_a, opt_b = torch.optim.SGD(body, lr=0.1), torch.optim.Adam(head, lr=1e-3)
    with gv.watch(model, [opt_a, opt_b]) as w:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(X[:32]), y[:32])
            opt_a.zero_grad(), opt_b.zero_grad()
            loss.backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt_a.step()
            opt_b.step()
    rec = w.record
    assert rec.steps == 4
    assert len(rec.series["grad_norm/0.weight"]) == 4
    assert len(rec.series["grad_norm/4.weight"]) == 4
    assert rec.series["clip_total_norm"].values[-1] == pytest.approx(total.item(), rel=1e-6)
    assert rec.series["clip_clipped"].values[-1] == float(total.item() > 0.5)
    # recorded before clipping: the global norm equals clip's total, not max_norm
    assert rec.series["grad_norm_global"].values[-1] == pytest.approx(total.item(), rel=1e-5)


def test_clipping_by_a_norm_taken_apart_is_seen_before_it_scales(digits):
    # accelerate >= 1.x (and code written like it) takes the total norm itself and then
    # calls clip_grads_with_norm_: the record must hold the norms before that scaling.
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:32]), y[:32]).backward()
            grads = [p.grad for p in model.parameters()]
            total = torch.nn.utils.get_total_norm(grads)
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.05, total)
            opt.step()
    rec = w.record
    assert total.item() > 0.05  # it clipped
    assert rec.series["grad_norm_global"].values[-1] == pytest.approx(total.item(), rel=1e-5)
    assert rec.series["clip_total_norm"].values == pytest.approx(rec.series["grad_norm_global"].values, rel=1e-5)
    assert list(rec.series["clip_clipped"].values) == [1.0, 1.0, 1.0]
    assert list(rec.series["clip_max_norm"].values) == [0.05] * 3


def test_probe_error_does_not_stop_training(digits, monkeypatch):
    X, y = digits
    from gradvitals.probes import activations

    def broken(*a, **k):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(activations, "row_stats", broken)
    torch.manual_seed(0)
    model = mlp(depth=2)
    with gv.watch(model, every=1) as w:
        losses, _ = train(model, X, y, steps=5)
    assert len(losses) == 5
    errors = w.record.events_of("probe_error")
    assert len(errors) == 1 and "probe exploded" in errors[0]["error"]
    assert len(w.record.series["grad_norm_global"]) == 5  # the other probes kept working
    assert any(e["type"] == "probe_error" for e in w.report()["run"]["events"])


def test_nonfinite_origin_names_the_module(digits):
    X, y = digits
    torch.manual_seed(0)

    class Bad(nn.Module):
        def forward(self, x):
            return torch.log(x - 10.0)  # NaN for every input below 10

    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), Bad(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt) as w:
        train_loop_losses = []
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(X[:16]), y[:16])
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_loop_losses.append(loss.item())
    report = w.report()
    nonfinite = [f for f in report["findings"] if f["code"] == "nonfinite"]
    assert nonfinite and nonfinite[0]["layers"][0] == "2" and nonfinite[0]["step"] == 0
    assert nonfinite[0]["evidence"]["op"] == "log"
    assert math.isnan(train_loop_losses[0])


def test_bad_options_are_rejected():
    model = mlp(depth=1)
    with pytest.raises(ValueError, match="every"):
        gv.watch(model, every=0)
    with pytest.raises(TypeError, match="unknown watch option.*evry"):
        gv.watch(model, evry=3)
    with pytest.raises(TypeError, match="model must be"):
        gv.watch("not a model")
    assert patches.active() == []


def test_memory_is_bounded_on_long_run():
    """200,000 steps of a 3-layer model: the record stays at its cap."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4)
    with gv.watch(model, opt, cap=64, every=1000) as w:
        for _ in range(3000):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    gc.collect()
    for key, s in w.record.series.items():
        assert len(s) < 64 or key.startswith(("act_", "dead_", "weight_", "update_")), key
    assert w.record.series["loss"].count == 3000
    assert len(w.record.series["loss"]) < 64


def test_two_optimizers_on_one_model_either_order(digits):
    """Regression: the head's optimizer stepping first must still measure the head, the
    global norm covers both optimizers, and nothing is wrongly `not_updated`."""
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    body = [p for n, p in model.named_parameters() if not n.startswith("4.")]
    opt_body = torch.optim.SGD(body, lr=0.1)
    opt_head = torch.optim.Adam(model[4].parameters(), lr=0.1)
    with gv.watch(model, [opt_body, opt_head], every=1) as w:
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(X[:32]), y[:32])
            opt_body.zero_grad(), opt_head.zero_grad()
            loss.backward()
            total = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()))
            opt_head.step()  # the higher-index optimizer first
            opt_body.step()
    rec = w.record
    assert rec.steps == 3
    assert len(rec.series["grad_norm_global"]) == 3
    assert rec.series["grad_norm_global"].values[-1] == pytest.approx(total, rel=1e-5)
    assert rec.series["update_ratio/4.weight"].values[-1] > 0
    assert all(p.in_optimizer for p in rec.params.values())
    assert "not_updated" not in [f["code"] for f in w.report()["findings"]]
    assert rec.run["optimizers"] == ["SGD", "Adam"]  # their kinds, for the rules


def test_exception_in_traced_forward_is_the_users_own():
    """Regression: an error raised inside a traced forward reaches the user unchanged
    (it once became 'OrderedDict mutated during iteration')."""

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            raise ValueError("user's own error")

    model = Boom()
    with gv.watch(model, every=1) as w:
        with pytest.raises(ValueError, match="user's own error"):
            model(torch.randn(2, 4))
        out = model.fc(torch.randn(2, 4))  # still usable afterwards
    assert out.shape == (2, 4)
    assert not model._forward_hooks and not model.fc._forward_hooks
    assert w.record.events_of("probe_error") == []


def test_forward_that_raises_leaves_no_statistics_and_the_retry_is_traced(digits):
    """gv.watch: the model's forward raises on a corrupt batch (NaN features) during a
    traced step and the loop skips it: no NaN statistics of that forward (no false
    `nonfinite`), and the step's next forward is the one measured."""
    X, y = digits

    class Rejecting(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            h = self.body(x)
            if not torch.isfinite(h).all():
                raise ValueError("batch rejected")
            return self.head(h)

    torch.manual_seed(0)
    model = Rejecting()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gv.watch(model, opt) as w:
        for it in range(6):
            xb = X[32 * it:32 * it + 32].clone()
            if it == 0:
                xb[0, 0] = float("nan")
            try:
                loss = nn.functional.cross_entropy(model(xb), y[32 * it:32 * it + 32])
            except ValueError:
                continue
            opt.zero_grad()
            loss.backward()
            opt.step()
    rec = w.record
    assert rec.steps == 5
    assert list(rec.series["act_mean/head"].steps) == [0]  # the retry at step 0
    assert math.isfinite(rec.series["act_mean/body.0"].values[0])
    assert not [f for f in w.diagnosis().findings if f.code == "nonfinite"]


def test_nan_born_in_the_loss_functions_backward_is_not_blamed_on_the_model():
    """An RMSE loss (`sqrt(mse)`) outside the model at a perfect fit: the square root's
    backward at 0 makes the NaN, before any of the model's ops. The model returns its
    output only, so its backward is replayed with a surrogate seed: finite (torch: the
    model's own backward from a finite seed is finite) while the run's gradients hold
    NaN, so no module is named: the loss's backward made it (``from_loss``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    nn.init.zeros_(model[2].weight), nn.init.zeros_(model[2].bias)
    x, target = torch.randn(32, 8), torch.zeros(32, 1)  # the zero head fits it exactly
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt) as w:
        loss = torch.sqrt(nn.functional.mse_loss(model(x), target))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and not torch.isfinite(model[2].weight.grad).all()
        opt.step()
    ev = w.record.events_of("nonfinite_origin")[0]
    assert (ev["backward_checked"], ev["backward_seed"], ev["source"], ev["op"], ev["phase"]) == (
        True, "surrogate", "replay", None, "backward"), ev
    assert (ev["from_loss"], ev["module"], ev["kind"]) == (True, None, "gradient"), ev


def test_clip_with_infinite_max_norm_is_not_clipping_telemetry():
    model = mlp(depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt) as w:
        model(torch.randn(4, 64)).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
    assert "clip_max_norm" not in w.record.series and "clip_clipped" not in w.record.series


def test_gradient_norm_overflow_is_not_called_a_nan():
    """Finite gradients whose float32 norm overflows are named as such (not 'NaN in backward')."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with gv.watch(model, opt) as w:
        model(torch.ones(2, 4)).sum().backward()
        with torch.no_grad():
            model[0].weight.grad.fill_(1e38)  # every element finite; the norm is not
        opt.step()
    ev = w.record.events_of("nonfinite_origin")[0]
    assert ev["kind"] == "norm_overflow" and ev["module"] == "0"
    f = [f for f in w.report()["findings"] if f["code"] == "nonfinite"][0]
    assert "overflows" in f["summary"]


def test_pause_detaches_everything_and_resume_carries_on(digits):
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    backward_before = torch.Tensor.backward

    def step(i: int) -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
        opt.step()

    w = gv.watch(model, opt, every=1)
    step(0)
    step(1)
    with w.paused():
        assert w.is_paused
        assert torch.Tensor.backward is backward_before
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        for i in range(2, 5):
            step(i)
        assert w.step == 2  # nothing counted while paused
    assert not w.is_paused
    opt.zero_grad()
    nn.functional.cross_entropy(model(X[160:192]), y[160:192]).backward()
    expected = model[0].weight.grad.norm().item()
    opt.step()
    w.close()
    s = w.record.series["grad_norm/0.weight"]
    assert list(s.steps) == [0, 1, 2]
    assert s.values[-1] == pytest.approx(expected, rel=1e-6)  # measured anew after resuming
    assert w.record.series["act_mean/0"].steps[-1] == 2


def test_pause_and_resume_are_idempotent_and_harmless_after_close():
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gv.watch(model, opt)
    w.pause()
    w.pause()
    w.resume()
    w.resume()
    assert len(opt._optimizer_step_pre_hooks) == 1
    w.close()
    w.resume()  # closed: stays detached
    assert not opt._optimizer_step_pre_hooks


@pytest.mark.parametrize("loop", ["never", "before_backward", "in_place", "after_step", "set_none",
                                  "model_zero_grad", "accumulate", "two_players", "autograd_grad", "lbfgs"])
def test_gradients_never_cleared_between_steps_are_seen(digits, loop):
    """Only a loop that never clears its gradients steps on the earlier ones (a
    grad_not_zeroed event counting those steps); every way of clearing them is seen as
    clearing: zero_grad before the backward or after the step, in place, p.grad = None,
    model.zero_grad, accumulation over micro-batches, a second player's backward into
    this optimizer's parameters before its own zero_grad (GANs), autograd.grad loops
    and LBFGS closures."""
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=2)
    other = mlp(depth=1)
    params = list(model.parameters())
    opt = (torch.optim.LBFGS(params, lr=0.1, max_iter=3) if loop == "lbfgs"
           else torch.optim.SGD(params, lr=0.01))
    opt2 = torch.optim.SGD(other.parameters(), lr=0.01)
    steps = 6

    def loss_on(i, net=model):
        return nn.functional.cross_entropy(net(X[32 * i:32 * i + 32]), y[32 * i:32 * i + 32])

    with gv.watch([model, other], [opt, opt2]) as w:
        for i in range(steps):
            if loop == "never":
                loss_on(i).backward()
            elif loop == "before_backward":
                opt.zero_grad()
                loss_on(i).backward()
            elif loop == "in_place":
                opt.zero_grad(set_to_none=False)
                loss_on(i).backward()
            elif loop in ("after_step", "accumulate"):
                for k in range(4 if loop == "accumulate" else 1):
                    (loss_on(4 * i + k) / 4).backward()
            elif loop == "set_none":
                for p in params:
                    p.grad = None
                loss_on(i).backward()
            elif loop == "model_zero_grad":
                model.zero_grad()
                loss_on(i).backward()
            elif loop == "two_players":
                # the other player's loss flows through this model too (like G's through D)
                (loss_on(i, other) + model(X[:8]).mean()).backward()
                opt2.step()
                opt2.zero_grad()
                opt.zero_grad()
                loss_on(i).backward()
            elif loop == "autograd_grad":
                for p, g in zip(params, torch.autograd.grad(loss_on(i), params)):
                    p.grad = g
            if loop == "lbfgs":
                def closure():
                    opt.zero_grad()
                    loss = loss_on(i)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.step()
            if loop in ("after_step", "accumulate"):
                opt.zero_grad()
    events = w.record.events_of("grad_not_zeroed")
    if loop == "never":
        assert [(e["step"], e["steps"], e["optimizer"]) for e in events] == [(1, steps - 1, "opt")]
        assert "grad_not_zeroed" in [f["code"] for f in w.report()["findings"]]
    else:
        assert events == [], events


@pytest.mark.parametrize("loop", ["forgot_train", "train_after_eval", "eval_throughout", "eval_with_grad",
                                  "teacher", "evaluated_first_forgot_train", "evaluated_first_train"])
def test_training_in_eval_mode_after_train_mode_is_seen(digits, loop):
    """A validation block's model.eval() with no model.train() after it: the steps that
    follow train in eval mode (an eval_mode_training event counts them). Switching back,
    a model fine-tuned in eval mode from the start, and validation forwards with
    gradients enabled that nothing backpropagates are not that. An evaluation before
    the first step (estimate_loss() at iteration 0) with no model.train() after it
    trains every step in eval mode: that is it too (the model never trained in train
    mode, but an evaluation, not the script's intent, put it in eval mode)."""
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if loop == "eval_throughout":
        model.eval()
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt_student = torch.optim.SGD(student.parameters(), lr=0.05)
    with gv.watch([model, student], [opt, opt_student]) as w:
        for i in range(10):
            if i == 0 and loop.startswith("evaluated_first"):
                model.eval()  # estimate_loss() at iteration 0
                with torch.no_grad():
                    model(X[-64:])
                if loop == "evaluated_first_train":
                    model.train()
            if loop == "teacher" and i >= 4:
                # distillation from the model trained above, now a frozen teacher in eval
                # mode, its forward not under no_grad and the last before the backward
                xs = X[32 * i:32 * i + 32]
                s_logits = student(xs)
                model.eval()
                t_logits = model(xs)
                loss = nn.functional.kl_div(s_logits.log_softmax(1), t_logits.detach().softmax(1),
                                            reduction="batchmean")
                opt_student.zero_grad()
                loss.backward()
                opt_student.step()
                continue
            loss = nn.functional.cross_entropy(model(X[32 * i:32 * i + 32]), y[32 * i:32 * i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i == 3 and loop in ("forgot_train", "train_after_eval", "eval_with_grad"):
                model.eval()
                if loop == "eval_with_grad":
                    nn.functional.cross_entropy(model(X[-64:]), y[-64:]).item()  # no no_grad, no backward
                else:
                    with torch.no_grad():
                        model(X[-64:])
                if loop in ("train_after_eval", "eval_with_grad"):
                    model.train()
    events = w.record.events_of("eval_mode_training")
    if loop in ("forgot_train", "evaluated_first_forgot_train"):
        first = loop.startswith("evaluated_first")
        assert [(e["step"], e["steps"], e["evaluated_first"]) for e in events] == [(0, 10, True) if first
                                                                                   else (4, 6, False)]
        assert "eval_mode_training" in [f["code"] for f in w.report()["findings"]]
    else:
        assert events == [], events


@pytest.mark.parametrize("case", ["softmax_ce_module", "softmax_ce_reshaped", "softmax_nll", "sigmoid_bce_logits",
                                  "logits_ce", "log_softmax_nll", "softmax_metric_only"])
def test_loss_given_what_it_computes_itself(digits, case):
    """A softmax into cross_entropy (also through nn.CrossEntropyLoss and a reshape), a
    softmax into nll_loss, a sigmoid into BCE-with-logits: counted at every step a
    backward runs through such a loss. Logits into cross_entropy, log_softmax into
    nll_loss, and a cross_entropy on probabilities computed aside as a metric (never
    backpropagated) are not. Read off the loss's graph on the scheduled steps (here
    every step), with nothing patched."""
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F = nn.functional
    with gv.watch(model, opt, every=1) as w:
        for i in range(5):
            xs, ys = X[32 * i:32 * i + 32], y[32 * i:32 * i + 32]
            logits = model(xs)
            if case == "softmax_ce_module":
                loss = nn.CrossEntropyLoss()(nn.Softmax(dim=1)(logits), ys)
            elif case == "softmax_ce_reshaped":
                loss = F.cross_entropy(logits.softmax(1).unsqueeze(1).reshape(32, 10), ys)
            elif case == "softmax_nll":
                loss = F.nll_loss(logits.softmax(1), ys)
            elif case == "sigmoid_bce_logits":
                loss = F.binary_cross_entropy_with_logits(torch.sigmoid(logits), F.one_hot(ys, 10).float())
            elif case == "log_softmax_nll":
                loss = F.nll_loss(logits.log_softmax(1), ys)
            else:
                loss = F.cross_entropy(logits, ys)
                if case == "softmax_metric_only":
                    F.cross_entropy(logits.softmax(1), ys).item()  # logged, never backpropagated
            opt.zero_grad()
            loss.backward()
            opt.step()
    events = w.record.events_of("loss_on_probabilities")
    wrong = {"softmax_ce_module": "cross_entropy", "softmax_ce_reshaped": "cross_entropy",
             "softmax_nll": "nll_loss", "sigmoid_bce_logits": "binary_cross_entropy_with_logits"}
    if case in wrong:
        assert [(e["loss"], e["step"], e["steps"], e["checked"]) for e in events] == [(wrong[case], 0, 5, 5)]
        assert "loss_on_probabilities" in [f["code"] for f in w.report()["findings"]]
    else:
        assert events == [], events


# torch 2.13 deprecates torch.jit.script itself; users' scripted code must still work under a watch.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_scripted_losses_still_compile_under_watch(digits):
    """torch.jit.script of nn.CrossEntropyLoss, of a function calling F.cross_entropy and
    F.nll_loss, and of a gradient penalty calling torch.autograd.grad, inside a watch:
    TorchScript compiles them (gradvitals patches no loss function, and its wrapped
    autograd.grad/backward are registered as the builtins they wrap; before, scripting
    failed) and the losses are the same as without the watch."""
    X, y = digits

    def losses(watch: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp(depth=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        w = gv.watch(model, opt, every=1) if watch else None
        try:
            crit = torch.jit.script(nn.CrossEntropyLoss())

            @torch.jit.script
            def both(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                return (nn.functional.cross_entropy(logits, target)
                        + nn.functional.nll_loss(nn.functional.log_softmax(logits, 1), target))

            @torch.jit.script
            def penalty(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                g = torch.autograd.grad([out.sum()], [x], create_graph=True)[0]
                assert g is not None
                return g.pow(2).mean()

            out = []
            for i in range(3):
                x = X[32 * i:32 * i + 32].clone().requires_grad_()
                logits = model(x)
                loss = (crit(logits, y[32 * i:32 * i + 32]) + both(logits, y[32 * i:32 * i + 32])
                        + penalty(logits, x))
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(loss.item())
            return out
        finally:
            if w is not None:
                w.close()

    assert losses(True) == losses(False)
