"""The rules on real training runs: the chapter's 20-layer digit classifier (and a few
other small models) broken in one way each, and healthy. Each run takes ~1 s on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradvitals as gv
from gradvitals.diagnose import verdict

PROBLEMS = ("critical", "warning")


def mlp(depth: int = 20, width: int = 64, act: type[nn.Module] = nn.ReLU, init: str | None = None,
        bias: float | None = None, batchnorm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth - 1):
        lin = nn.Linear(fan_in, width)
        fan_in = width
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        elif init == "normal1":
            nn.init.normal_(lin.weight, 0.0, 1.0)
        if bias is not None:
            nn.init.constant_(lin.bias, bias)
        layers.append(lin)
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(act())
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def train(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, *, steps: int = 200,
          batch: int = 64, clip: float | None = None, accumulate: int = 1, **options) -> gv.Report:
    gen = torch.Generator().manual_seed(0)
    with gv.watch(model, opt, **options) as watch:
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(accumulate):
                idx = torch.randint(0, len(X), (batch,), generator=gen)
                (F.cross_entropy(model(X[idx]), y[idx]) / accumulate).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        return watch.diagnosis()


def by_code(report: gv.Report) -> dict:
    return {f.code: f for f in report.findings}


def problems(report: gv.Report) -> list[str]:
    return [f"{f.code}:{f.severity}" for f in report.findings if f.severity in PROBLEMS]


# ------------------------------------------------------------------ broken
def test_sigmoid_20_layers_vanishes_and_plateaus(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(act=nn.Sigmoid)
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.1), X, y)
    found = by_code(rep)
    van = found["vanishing_gradients"]
    assert van.severity == "critical" and van.layers[0] == "0"
    assert van.evidence["gap_orders"] > 6  # sigmoid' <= 0.25 over 19 layers
    assert "Sigmoid" in van.advice and "kaiming_normal_" in van.advice
    assert found["loss_plateau"].caused_by is not None
    assert rep.problems()[0].code in ("vanishing_gradients", "poor_initialization", "architecture_risk")


def test_relu_normal_init_explodes_into_nan(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(init="normal1")
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.01), X, y, steps=20)
    found = by_code(rep)
    exp = found["exploding_gradients"]
    assert exp.severity == "critical" and exp.step == 0 and exp.evidence["at_init"] is True
    assert found["nonfinite"].caused_by == "exploding_gradients"
    assert rep.problems()[0].code in ("exploding_gradients", "poor_initialization")


def test_a_nan_in_the_batch_is_blamed_on_the_data_not_a_layer(digits):
    X, y = digits
    X = X.clone()
    torch.manual_seed(0)
    model = mlp(depth=4, init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gv.watch(model, opt) as watch:
        for step in range(6):
            xb = X[step * 32:(step + 1) * 32].clone()
            if step == 3:
                xb[5, 7] = float("nan")  # one corrupt pixel
            opt.zero_grad()
            F.cross_entropy(model(xb), y[step * 32:(step + 1) * 32]).backward()
            opt.step()
        rep = watch.diagnosis()
    f = by_code(rep)["nonfinite"]
    assert f.step == 3 and f.evidence["kind"] == "input"
    assert "in the batch itself" in f.summary and "the model" in f.summary and "(root)" not in f.summary
    assert "isfinite(x)" in f.advice


def test_learning_rate_too_high_gives_early_warning_before_the_nan(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=6, init="he")
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), X, y, steps=60)
    found = by_code(rep)
    exp, nan = found["exploding_gradients"], found["nonfinite"]
    assert exp.step < nan.step
    assert exp.evidence["warning_steps"] == nan.step - exp.step >= 3
    assert f"{exp.evidence['warning_steps']} steps of warning" in exp.summary
    assert "update_ratio_high" in found and exp.caused_by == "update_ratio_high"
    assert rep.problems()[0].code == "update_ratio_high"


def test_large_negative_bias_kills_the_relus(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=8, init="he", bias=-3.0)
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.01), X, y)
    dead = by_code(rep)["dead_relu"]
    assert dead.severity == "critical" and dead.evidence["fully_dead_layers"]
    assert rep.problems()[0].code == "dead_relu"


def test_unnormalised_inputs_saturate_the_sigmoid(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=4, act=nn.Sigmoid, init="he")
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.1), X * 16, y)  # raw 0..16 pixels
    sat = by_code(rep)["saturated_activations"]
    assert sat.severity == "warning" and sat.layers[0] == "1"
    assert sat.evidence["preactivation_std"] > 5 and "not normalised" in sat.advice


def test_batchnorm_on_batches_of_two(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=6, batchnorm=True)
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.05), X, y, batch=2)
    bn = by_code(rep)["batchnorm_small_batch"]
    assert bn.evidence["batch_size_by_layer"]["1"] == 2
    assert rep.problems()[0].code == "batchnorm_small_batch"


def test_tiny_max_norm_clips_every_step(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=6, init="he")
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.05), X, y, clip=1e-3)
    clip = by_code(rep)["clipping_always_active"]
    assert clip.severity == "warning" and clip.evidence["clipped_fraction"] == 1.0
    assert clip.evidence["median_scale"] > 100


def test_parameter_missing_from_the_optimizer_and_a_disconnected_head(digits):
    X, y = digits

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(depth=4, init="he")
            self.aux_head = nn.Linear(10, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(0)
    model = TwoHeads()
    params = [p for n, p in model.named_parameters() if not n.startswith("body.2.")]
    rep = train(model, torch.optim.SGD(params, lr=0.05, momentum=0.9), X, y, steps=100)
    found = by_code(rep)
    assert found["not_updated"].layers == ("body.2",)
    assert found["no_gradient"].layers == ("aux_head",)


def test_learning_rate_far_too_low(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(depth=6, init="he")
    rep = train(model, torch.optim.SGD(model.parameters(), lr=1e-7), X, y)
    low = by_code(rep)["update_ratio_low"]
    assert low.severity == "warning" and low.evidence["fastest_update_ratio"] < 1e-6
    assert by_code(rep)["loss_plateau"].caused_by == "update_ratio_low"


# ------------------------------------------------------------------ healthy
def _he_mlp():
    model = mlp(init="he")
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), {}


def _bn_mlp():
    model = mlp(depth=10, batchnorm=True)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), {}


def _frozen_backbone():
    model = mlp(depth=6, init="he")
    for p in list(model.parameters())[:6]:
        p.requires_grad_(False)
    return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3), {}


def _accumulation():
    model = mlp(depth=6, init="he")
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), {"accumulate": 4, "batch": 16}


def _clipped_full():
    model = mlp(depth=6, init="he")
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), {"clip": 1.0, "full": True}


class _Residual(nn.Module):
    """x + block(x) with the block's last layer zero-initialised (the "zero-init residual" trick)."""

    def __init__(self, blocks: int = 12, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        for block in self.blocks:
            nn.init.zeros_(block[2].weight)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def _residual():
    model = _Residual()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), {"steps": 150}


@pytest.mark.parametrize("make", [_he_mlp, _bn_mlp, _frozen_backbone, _accumulation, _clipped_full, _residual],
                         ids=["he-mlp-20", "batchnorm-mlp", "frozen-backbone", "grad-accumulation",
                              "clipped-full-record", "zero-init-residual"])
def test_healthy_runs_have_no_problem(digits, make):
    X, y = digits
    torch.manual_seed(0)
    model, opt, kw = make()
    rep = train(model, opt, X, y, **kw)
    assert problems(rep) == [], verdict(rep.findings)


def test_healthy_cnn_with_batchnorm(digits):
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 16, 10))
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), X.reshape(-1, 1, 8, 8), y,
                steps=150)
    assert problems(rep) == [], verdict(rep.findings)


def test_healthy_lstm_language_model_with_clipping():
    """SGD at lr=1 with clip 0.25: update ratios ~1e-2..3e-2, and it learns."""
    torch.manual_seed(0)
    vocab, T, B = 50, 20, 16

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 32)
            self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
            self.head = nn.Linear(64, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(self.emb(x))[0])

    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(0)
    with gv.watch(model, opt) as watch:
        for _ in range(200):
            seq = (torch.randint(0, vocab, (B, 1), generator=gen) + torch.arange(T + 1)) % vocab
            loss = F.cross_entropy(model(seq[:, :-1]).reshape(-1, vocab), seq[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
        rep = watch.diagnosis()
    assert problems(rep) == [], verdict(rep.findings)


def test_chapter_mlp_on_raw_pixels_saturates_its_first_sigmoid(digits):
    X, y = digits
    torch.manual_seed(0)
    model = mlp(act=nn.Sigmoid)  # the chapter's 20 layers, PyTorch's default init
    rep = train(model, torch.optim.SGD(model.parameters(), lr=0.1), X * 16, y, steps=100)
    found = by_code(rep)
    assert found["saturated_activations"].layers[0] == "1"
    assert found["saturated_activations"].severity == "warning"
    assert found["vanishing_gradients"].caused_by is not None
