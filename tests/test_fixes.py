"""The fixes: activation-aware init (gv.init_) and adaptive gradient clipping (gv.clip_grad_agc_)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradvitals as gv
from gradvitals.fixes.init import trace_activations
from models import mlp


# ------------------------------------------------------------------------- AGC
def reference_agc(params, clipping, eps):
    """The paper's rule written out one unit at a time (slow, obvious)."""
    clipped = 0
    for p in params:
        if p.grad is None:
            continue
        w = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(1, -1)
        g = p.grad.reshape(w.shape)  # a view: edits p.grad
        for i in range(w.shape[0]):
            max_norm = clipping * max(w[i].norm().item(), eps)
            gn = g[i].norm().item()
            if gn > max_norm:
                g[i] *= max_norm / max(gn, 1e-6)
                clipped += 1
    return clipped


def _params_with_grads(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (16,), (4, 3, 3, 3), (4,), (5, 2, 3), ()]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.05
    with torch.no_grad():
        params[1].zero_()  # zero weights: eps decides their threshold
        params[0].grad[3] = 0.0  # a unit with zero gradient stays zero
    params.append(nn.Parameter(torch.randn(3, 3, generator=g)))  # no grad: skipped
    return params


@pytest.mark.parametrize("clipping,eps", [(0.01, 1e-3), (0.05, 1e-3), (0.02, 0.5), (10.0, 1.0)])
def test_agc_matches_the_reference_implementation(clipping, eps):
    ours, ref = _params_with_grads(1), _params_with_grads(1)
    n = gv.clip_grad_agc_(ours, clipping=clipping, eps=eps)
    n_ref = reference_agc(ref, clipping, eps)
    assert n == n_ref
    for a, b in zip(ours, ref):
        if a.grad is None:
            assert b.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    if clipping == 10.0:
        assert n == 0  # nothing exceeds 10x max(|W|, 1): gradients untouched, bit for bit
        torch.testing.assert_close(ours[0].grad, _params_with_grads(1)[0].grad, rtol=0, atol=0)
    else:
        assert n > 0


def test_agc_bounds_every_unit_and_keeps_directions():
    params = _params_with_grads(2)
    before = [p.grad.clone() for p in params if p.grad is not None]
    gv.clip_grad_agc_(params, clipping=0.01, eps=1e-3)
    for p, g0 in zip([p for p in params if p.grad is not None], before):
        w = p.detach().reshape(p.shape[0], -1) if p.dim() > 1 else p.detach().reshape(1, -1)
        g = p.grad.reshape(w.shape)
        limit = 0.01 * w.norm(dim=1).clamp_min(1e-3)
        assert (g.norm(dim=1) <= limit * (1 + 1e-5)).all()
        cos = F.cosine_similarity(g.flatten(), g0.flatten(), dim=0)
        assert g0.abs().sum() == 0 or cos > 0.5  # scaled per unit, never flipped


def test_agc_keeps_nan_in_its_own_unit():
    p = nn.Parameter(torch.ones(3, 4))
    p.grad = torch.ones(3, 4)
    p.grad[1, 2] = float("nan")
    n = gv.clip_grad_agc_([p], clipping=0.01)
    assert torch.isnan(p.grad[1]).all() and torch.isfinite(p.grad[[0, 2]]).all()
    assert n == 2  # the finite units were clipped; the NaN one is not counted


def test_agc_accepts_a_single_tensor_and_a_generator():
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    m(torch.randn(2, 4)).sum().mul(100).backward()
    ref = [nn.Parameter(p.detach().clone()) for p in m.parameters()]
    for r, p in zip(ref, m.parameters()):
        r.grad = p.grad.clone()
    assert gv.clip_grad_agc_(m.weight) == 3 == reference_agc(ref[:1], 0.01, 1e-3)
    assert gv.clip_grad_agc_(p for p in [m.bias]) == 1 == reference_agc(ref[1:], 0.01, 1e-3)
    torch.testing.assert_close(m.bias.grad, ref[1].grad)


@pytest.mark.parametrize("kwargs,match", [
    ({"clipping": 0}, "clipping must be a positive finite number"),
    ({"clipping": -0.01}, "clipping must be a positive finite number"),
    ({"clipping": float("nan")}, "clipping must be a positive finite number"),
    ({"clipping": "0.01"}, "clipping must be a positive finite number"),
    ({"clipping": True}, "clipping must be a positive finite number"),
    ({"eps": 0.0}, "eps must be a positive finite number"),
    ({"eps": float("inf")}, "eps must be a positive finite number"),
])
def test_agc_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gv.clip_grad_agc_(nn.Linear(2, 2).parameters(), **kwargs)


def test_agc_rejects_bad_parameters():
    with pytest.raises(TypeError, match="parameters must be a tensor or an iterable"):
        gv.clip_grad_agc_(3)
    with pytest.raises(TypeError, match="parameters must contain tensors"):
        gv.clip_grad_agc_([torch.ones(2), "w"])
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        gv.clip_grad_agc_(emb.parameters())


def _train(model, X, y, lr, steps, agc=None):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, clipped = [], 0
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=g)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if agc is not None:
            clipped += gv.clip_grad_agc_(model.parameters(), clipping=agc)
        opt.step()
        losses.append(loss.item())
    return losses, clipped


def test_agc_keeps_a_too_high_learning_rate_run_finite(digits):
    X, y = digits
    torch.manual_seed(0)
    plain, _ = _train(mlp(depth=4, width=64), X, y, lr=3.0, steps=40)
    torch.manual_seed(0)
    clipped_run, clipped = _train(mlp(depth=4, width=64), X, y, lr=3.0, steps=40, agc=0.01)
    assert not all(math.isfinite(v) for v in plain)  # plain SGD at lr=3 diverges to NaN
    assert all(math.isfinite(v) for v in clipped_run)
    assert clipped > 0


# ---------------------------------------------------------------------- init_
class Mixed(nn.Module):
    """Functional activations in forward (invisible to names and registration order)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 128)
        self.conv = nn.Conv1d(1, 64, 5)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = F.gelu(self.b(h))
        h = F.relu(self.conv(h.unsqueeze(1))).mean(-1)
        return self.head(h)


def test_init_picks_he_or_xavier_by_the_traced_activation():
    torch.manual_seed(0)
    m = Mixed()
    done = {d["layer"]: d for d in gv.init_(m, torch.randn(4, 256))}
    assert {k: (d["activation"], d["init"]) for k, d in done.items()} == {
        "a": ("tanh", "xavier_normal"), "b": ("gelu", "he_normal"),
        "conv": ("relu", "he_normal"), "head": (None, "xavier_normal")}
    assert all(d["source"] == "traced" and d["bias"] == "zeros" for d in done.values())
    expected = {"a": math.sqrt(2 / 512), "b": math.sqrt(2 / 256), "conv": math.sqrt(2 / 5),
                "head": math.sqrt(2 / 74)}
    for name, std in expected.items():
        mod = getattr(m, name)
        assert done[name]["std"] == pytest.approx(std)
        assert mod.weight.std().item() == pytest.approx(std, rel=0.12)
        assert torch.count_nonzero(mod.bias) == 0
    assert (done["conv"]["fan_in"], done["conv"]["fan_out"]) == (5, 320)  # receptive field counted


def test_init_given_activations_override_and_fallback_order():
    m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match="registration order"):
        done = gv.init_(m)
    assert [(d["activation"], d["init"], d["source"]) for d in done] == [
        ("Tanh", "xavier_normal", "module order"), ("ReLU", "he_normal", "module order"),
        (None, "xavier_normal", "module order")]
    done = gv.init_(m, activations={"0": "relu"})
    assert (done[0]["init"], done[0]["source"]) == ("he_normal", "given")
    assert [d["init"] for d in gv.init_(m, activations="gelu")] == ["he_normal"] * 3


def test_init_rejects_bad_input():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        gv.init_("model")
    with pytest.raises(ValueError, match="not an activation gradvitals knows"):
        gv.init_(m, activations="swishy")
    with pytest.raises(ValueError, match="not Linear/Conv layers of the model: 1; allowed: 0, 2"):
        gv.init_(m, activations={"1": "relu"})
    with pytest.raises(TypeError, match="activations must be"):
        gv.init_(m, activations=3)


def test_trace_leaves_buffers_and_rng_alone():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(8, 6)
    buffers = [b.clone() for b in m.buffers()]
    rng = torch.get_rng_state()
    assert trace_activations(m, x) == {"0": "relu"}
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(buffers, m.buffers()))


def _n01_mlp():
    torch.manual_seed(0)
    m = mlp(depth=20, width=64)
    for layer in m:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 1.0)
    return m


def test_init_turns_the_exploding_digit_mlp_into_a_training_one(digits):
    X, y = digits
    broken = _n01_mlp()
    report = gv.checkup(broken, (X[:64], y[:64]))
    assert "poor_initialization" in report.codes and report.problems()
    losses, _ = _train(broken, X, y, lr=0.02, steps=10)
    assert not all(math.isfinite(v) for v in losses) or max(losses) > 1e6  # N(0,1): explodes

    fixed = _n01_mlp()
    gv.init_(fixed, X[:32])
    clean = gv.checkup(fixed, (X[:64], y[:64]))
    assert clean.problems() == [], [f.summary for f in clean.problems()]
    # lr 0.01: the loss falls steadily (2.3 -> 0.6-1.0 over init seeds 0-5); at 0.02 this 20-layer
    # net sits on a plateau near 2.0 for a CPU-dependent number of steps before it falls.
    losses, _ = _train(fixed, X, y, lr=0.01, steps=150)
    assert all(math.isfinite(v) for v in losses)
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < start - 0.5, (start, end)
