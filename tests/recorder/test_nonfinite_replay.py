"""The NaN origin's replays (probes/nonfinite.py) on small hand-built models, torch as
the oracle: infinities made on purpose (attention masks) are not origins, and a
gradient born non-finite in the backward is traced to the op that made it."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    assert checked and found == {"module": "(root)", "op": "sqrt", "backward_op": "SqrtBackward0",
                     "value": "inf", "kind": "gradient"}, found
    # .grad and the RNG state are left as they were
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad.nan_to_num(), g.nan_to_num()) and torch.equal(p.grad.isnan(), g.isnan())
    assert torch.equal(torch.get_rng_state(), rng)


def test_backward_replay_without_a_returned_loss_finds_nothing():
    model = nn.Sequential(nn.Linear(4, 1))
    assert replay_backward(model, _names(model), (torch.randn(1, 4),), {}) == (False, None)  # a batch of one
    model = SqrtModel()
    model.gate.fill_(1.0)  # sqrt of values near 100: every gradient finite
    model.fc.bias.data.fill_(100.0)
    assert replay_backward(model, _names(model), (torch.randn(3, 4), torch.randn(3)), {}) == (True, None)


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
