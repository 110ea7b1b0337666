"""The transformer-era rules on real training runs, each beside its healthy twin:
Adam's eps as large as a layer's gradients, and loss spikes judged at scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradvitals as gv

PROBLEMS = ("critical", "warning")


# ------------------------------------------------------------ Adam's eps
class SideHead(nn.Module):
    """A digit MLP with a second head whose output enters the logits scaled by 1e-3 (an
    auxiliary branch weighted down): that head's gradients are 1e-3 of the main head's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)
        self.side = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + 1e-3 * self.side(h)


def train_side_head(digits, eps: float, steps: int = 200) -> tuple[gv.Report, SideHead]:
    X, y = digits
    torch.manual_seed(0)
    model = SideHead()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=eps)
    gen = torch.Generator().manual_seed(0)
    with gv.watch(model, opt, autosave_s=None) as watch:
        for _ in range(steps):
            idx = torch.randint(0, len(X), (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        return watch.diagnosis(), model


def test_adam_eps_1e4_names_the_layer_whose_gradients_are_that_small(digits):
    report, _ = train_side_head(digits, eps=1e-4)
    found = {f.code: f for f in report.findings}
    assert "adam_epsilon_too_large" in found, [f.code for f in report.findings]
    f = found["adam_epsilon_too_large"]
    assert f.layers == ("side",) and f.severity == "warning"
    # the numbers are the record's: RMS = grad_norm / sqrt(numel), against the group's eps
    ev = {e["param"]: e for e in f.evidence["layers"]}
    assert set(ev) == {"side.weight", "side.bias"} and all(e["eps"] == 1e-4 for e in ev.values())
    assert all(e["rms_over_eps"] < 1 for e in ev.values())
    assert "eps=1e-08" in f.advice


def test_the_damped_layer_really_moves_less_and_eps_1e8_is_its_healthy_twin(digits):
    damped, _ = train_side_head(digits, eps=1e-4)
    healthy, _ = train_side_head(digits, eps=1e-8)
    assert [f"{f.code}:{f.severity}" for f in healthy.findings if f.severity in PROBLEMS] == []
    # torch as the oracle of "it stops learning": the update/weight ratio of side.weight
    # (recorded on scheduled steps) is several times smaller under eps=1e-4
    def late_ratio(report):
        steps, values = report.record.series["update_ratio/side.weight"].points()
        return sorted(values[len(values) // 2:])[len(values[len(values) // 2:]) // 2]
    assert late_ratio(damped) < 0.5 * late_ratio(healthy)
