"""The NaN origin's replays (probes/nonfinite.py) on small hand-built models, torch as
the oracle: infinities made on purpose (attention masks) are not origins, and a
gradient born non-finite in the backward is traced to the op that made it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gradvitals.probes.nonfinite import replay_backward, replay_forward

T = 6


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n or "(root)" for n, m in model.named_modules()}


class MaskedAttention(nn.Module):
    """Scores masked with -inf the three ways scripts do it, then a LayerNorm that
    overflows when the input is huge."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.q = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("additive", torch.full((T, T), float("-inf")).triu(1))
        self.register_buffer("tril", torch.tril(torch.ones(T, T)))

    def forward(self, x, mask=None):
        q = self.q(x / x.abs().amax())  # small scores whatever the scale of x
        wei = q @ q.transpose(-2, -1)
        if self.how == "full":
            wei = wei + torch.full((T, T), float("-inf")).triu(1)
        elif self.how == "masked_fill":
            wei = wei.masked_fill(self.tril == 0, float("-inf"))
        elif self.how == "buffer":
            wei = wei + self.additive
        elif self.how == "input":
            wei = wei + mask
        elif self.how == "all_masked":  # a row with nothing to attend to: softmax makes NaN
            wei = wei.masked_fill(torch.ones(T, T, dtype=torch.bool), float("-inf"))
        return self.norm(F.softmax(wei, dim=-1) @ x)


def test_masks_by_design_are_not_origins():
    torch.manual_seed(0)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for how in ("full", "masked_fill", "buffer", "input"):
        model = MaskedAttention(how)
        sane = torch.randn(2, T, 4)
        assert replay_forward(model, _names(model), (sane, mask), {}) is None, how
        # Values of 1e30 overflow inside the LayerNorm (squared): the first NaN/Inf made
        # from finite values; torch as the oracle: its input is finite, its output not.
        huge = sane * 1e30
        seen = []
        h = model.norm.register_forward_hook(lambda m, a, o: seen.append(
            (bool(torch.isfinite(a[0]).all()), bool(torch.isfinite(o).all()))))
        with torch.no_grad():
            model(huge, mask)
        h.remove()
        assert seen == [(True, False)]
        found = replay_forward(model, _names(model), (huge, mask), {})
        assert found is not None and (found["module"], found["op"], found["kind"]) == (
            "norm", "layer_norm", "activation"), (how, found)


def test_a_nan_born_from_the_mask_is_an_origin():
    model = MaskedAttention("all_masked")
    found = replay_forward(model, _names(model), (torch.randn(2, T, 4),), {})
    assert found is not None and found["op"] == "softmax" and found["module"] == "(root)", found


def test_an_input_with_other_values_beside_its_inf_is_the_input():
    model = MaskedAttention("input")
    corrupt = torch.zeros(T, T)
    corrupt[0, 1], corrupt[2, 3] = float("-inf"), 0.5  # not a 0/-inf mask: data
    found = replay_forward(model, _names(model), (torch.randn(2, T, 4), corrupt), {})
    assert found is not None and found["kind"] == "input", found


class SqrtModel(nn.Module):
    """Finite forward, infinite backward: sqrt at 0 has an infinite derivative (the op
    that makes it), the product before it turns it into NaN (passes it on); the model
    returns its own loss, as GPT implementations do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.register_buffer("gate", torch.zeros(8))

    def forward(self, x, y):
        h = torch.sqrt(self.fc(x) * self.gate)
        return self.head(h), F.mse_loss(self.head(h).squeeze(-1), y)


def test_backward_replay_names_the_producer_not_the_propagators():
    torch.manual_seed(0)
    model = SqrtModel()
    x, y = torch.randn(16, 4), torch.randn(16)
    _, loss = model(x, y)
    loss.backward()
    assert torch.isfinite(loss) and not torch.isfinite(model.fc.weight.grad).all()  # torch: born in the backward
    before = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    checked, found = replay_backward(model, _names(model), (x, y), {})
    assert checked == "loss" and found == {"module": "(root)", "op": "sqrt", "backward_op": "SqrtBackward0",
                     "value": "inf", "kind": "gradient"}, found
    # .grad and the RNG state are left as they were
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num()) and torch.equal(p.grad.isnan(), g.isnan())
    assert torch.equal(torch.get_rng_state(), rng)


def test_backward_replay_of_a_finite_backward_finds_nothing():
    model = nn.Sequential(nn.Linear(4, 1)).requires_grad_(False)
    assert replay_backward(model, _names(model), (torch.randn(1, 4),), {}) == (None, None)  # nothing to differentiate
    model.requires_grad_(True)  # a batch of one: its one-element output is no loss, a surrogate seeds it
    assert replay_backward(model, _names(model), (torch.randn(1, 4),), {}) == ("surrogate", None)
    model = SqrtModel()
    model.gate.fill_(1.0)  # sqrt of values near 100: every gradient finite
    model.fc.bias.data.fill_(100.0)
    assert replay_backward(model, _names(model), (torch.randn(3, 4), torch.randn(3)), {}) == ("loss", None)


class GuardedDivision(nn.Module):
    """`torch.where(x == 0, 0, 1 / x)`: the 1/x is Inf where x is 0, and torch.where
    drops it; the NaN/Inf that reaches the output is born later, in the LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x, guarded=True):
        inv = 1 / x
        if guarded:
            inv = torch.where(x == 0, torch.zeros_like(x), inv)
        return self.norm(inv * 1e30)


def test_the_origin_is_the_first_nonfinite_value_that_reaches_the_output():
    model = GuardedDivision()
    x = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    seen = []
    h = model.norm.register_forward_hook(lambda m, a, o: seen.append(
        (bool(torch.isfinite(a[0]).all()), bool(torch.isfinite(o).all()))))
    with torch.no_grad():
        model(x)
    h.remove()
    assert seen == [(True, False)]  # torch: finite into the LayerNorm, not out of it
    found = replay_forward(model, _names(model), (x,), {})
    assert found is not None and (found["module"], found["op"]) == ("norm", "layer_norm"), found
    # With the division's Inf kept, it is the origin.
    found = replay_forward(model, _names(model), (x, False), {})
    assert found is not None and (found["module"], found["op"]) == ("(root)", "__rdiv__"), found


class LogitsModel(nn.Module):
    """Returns logits only (the loss is computed outside it, as most scripts do), with an
    op whose derivative is infinite where its input is 0 for rows that are all zero:
    the forward is finite, the backward is not. ``safe`` moves the epsilon inside."""

    def __init__(self, op: str, safe: bool = False) -> None:
        super().__init__()
        self.op, self.safe = op, safe
        self.fc = nn.Linear(4, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        eps = 1e-6 if self.safe else 0.0
        sq = h.pow(2).sum(-1, keepdim=True)
        if self.op == "sqrt":
            scale = torch.sqrt(sq + eps) + 1e-6
        elif self.op == "pow":
            scale = (sq + eps).pow(0.5) + 1e-6
        else:  # acos at 1: an angle feature
            scale = torch.acos(1 / (1 + sq + eps)) + 1.0
        return self.head(h / scale)


def _run_backward(model: nn.Module, x: Tensor, y: Tensor) -> bool:
    """The run's own step: cross_entropy outside the model; whether its gradients are finite."""
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("op,backward_op", [("sqrt", "SqrtBackward0"), ("pow", "PowBackward0"),
                                            ("acos", "AcosBackward0")])
def test_backward_replay_of_a_model_that_returns_logits_uses_a_surrogate_seed(op, backward_op):
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x[2] = 0.0  # an all-zero row (padding)
    model = LogitsModel(op)
    assert not _run_backward(model, x, y)  # torch: the run's backward made NaN/Inf
    seed, found = replay_backward(model, _names(model), (x,), {})
    assert seed == "surrogate" and found is not None, found
    assert (found["module"], found["op"], found["backward_op"], found["kind"]) == (
        "(root)", op, backward_op, "gradient"), found
    # The healthy twin (epsilon inside): the run's backward is finite, nothing is found.
    safe = LogitsModel(op, safe=True)
    safe.load_state_dict(model.state_dict())
    assert _run_backward(safe, x, y)
    assert replay_backward(safe, _names(safe), (x,), {}) == ("surrogate", None)


class AuxModel(nn.Module):
    """Logits and an auxiliary output the script's loss never uses; the auxiliary
    branch's backward makes NaN for an all-zero row, the logits' does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8, bias=False)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(1, 1)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h), self.aux(torch.sqrt(h.pow(2).sum(-1, keepdim=True)))


def test_a_surrogate_seed_does_not_invent_an_origin_the_run_did_not_have():
    """Seeding every output reaches a branch the real loss does not: its NaN is not
    the run's (the run's gradients were finite), so no origin is reported."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    x[1] = 0.0
    model = AuxModel()
    model.zero_grad()
    F.cross_entropy(model(x)[0], y).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or bool(torch.isfinite(g).all()) for g in grads.values())  # torch: finite
    assert replay_backward(model, _names(model), (x,), {}) == ("surrogate", None)
    # The same replay where the run's own gradients did go bad there: found.
    model.zero_grad()
    sum(o.sum() for o in model(x)).backward()
    seed, found = replay_backward(model, _names(model), (x,), {})
    assert seed == "surrogate" and found is not None and found["op"] == "sqrt", found


def test_a_model_whose_backward_replay_fails_does_not_hide_the_next_ones_origin(monkeypatch):
    """Two watched models (a GAN's generator and critic): the first one's replay raises,
    the second's backward makes the NaN: its origin is still found, the error noted."""
    from types import SimpleNamespace

    from gradvitals.record import Record
    from gradvitals.recorder import origin as origin_mod

    torch.manual_seed(0)
    first, second = nn.Linear(4, 2), SqrtModel()
    x, y = torch.randn(8, 4), torch.randn(8)
    models = [SimpleNamespace(module=m, names=_names(m), last_inputs=(a, {}))
              for m, a in ((first, (x,)), (second, (x, y)))]
    real = origin_mod.replay_backward

    def replay(module, *args):
        if module is first:
            raise RuntimeError("out of memory")
        return real(module, *args)

    monkeypatch.setattr(origin_mod, "replay_backward", replay)
    locator = origin_mod.OriginLocator(None, SimpleNamespace(models=models), Record(), enabled=True)
    event: dict = {}
    found = locator.replay_backward(event)
    assert found is not None and found["op"] == "sqrt", found
    assert event["backward_replay_error"] == "RuntimeError" and event["source"] == "replay"
