"""The Lightning callback on real CPU Trainers: steps, gradients (torch as the oracle),
accumulation, clipping, the logger, the report file and a broken run."""

from __future__ import annotations

import csv
import json
import math

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

from gradvitals.integrations.lightning import GradVitalsCallback  # noqa: E402
from gradvitals.report import schema  # noqa: E402

from integration_support import lightning_trainer, problems  # noqa: E402


class DigitsMLP(L.LightningModule):
    """A small ReLU MLP on digits that records torch's own numbers for the tests."""

    def __init__(self, lr: float = 3e-3, hidden: int = 32, depth: int = 1, sgd: bool = False,
                 fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(64, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, 10))
        self.lr, self.sgd, self.fail_at = lr, sgd, fail_at
        self.micro_losses: list[float] = []  # every training_step's loss
        self.oracle_norms: list[float] = []  # global gradient norm at each optimizer step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("data loader hiccup")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.micro_losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # The module's hook runs after the callbacks' and before Lightning clips.
        norms = torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None])
        self.oracle_norms.append(torch.linalg.vector_norm(norms).item())

    def configure_optimizers(self):
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(digits, batch_size: int = 64):
    X, y = digits
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size)


def test_healthy_run_records_every_optimizer_step_and_logs_layer_norms(tmp_path, digits, capsys):
    from lightning.pytorch.loggers import CSVLogger

    model, cb = DigitsMLP(), GradVitalsCallback(every=5, log_every_n_steps=10)
    trainer = lightning_trainer(tmp_path, cb, max_steps=40, logger=CSVLogger(str(tmp_path / "logs")),
                                log_every_n_steps=10)
    trainer.fit(model, loader(digits))

    report = cb.report
    assert problems(report) == []
    assert report.record.steps == trainer.global_step == 40
    steps, norms = report.record.series["grad_norm_global"].points()
    assert steps == list(range(40))
    assert norms == pytest.approx(model.oracle_norms, rel=1e-5)
    steps, losses = report.record.series["loss"].points()
    assert losses == pytest.approx(model.micro_losses, rel=1e-5)
    # The report lands in the logger's folder and the verdict is printed.
    saved = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "gradvitals.json").read_text())
    assert saved["run"]["steps"] == 40 and saved["run"]["verdict"] == report.verdict
    jsonschema.validate(saved, schema())
    html = (tmp_path / "logs" / "lightning_logs" / "version_0" / "gradvitals.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html")
    assert report.verdict in capsys.readouterr().err
    # Per-layer norms went to the trainer's logger every 10 steps, from the record's values.
    rows = list(csv.DictReader(open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv")))
    logged = [(int(r["step"]), float(r["gradvitals/grad_norm/net.0"])) for r in rows
              if r.get("gradvitals/grad_norm/net.0")]
    assert [s for s, _ in logged] == [0, 10, 20, 30]
    gw, gb = report.record.series["grad_norm/net.0.weight"], report.record.series["grad_norm/net.0.bias"]
    w, b = dict(zip(*gw.points())), dict(zip(*gb.points()))
    for step, value in logged:
        assert value == pytest.approx(math.hypot(w[step], b[step]), rel=1e-6)


def test_gradient_accumulation_records_real_optimizer_steps_only(tmp_path, digits):
    model, cb = DigitsMLP(), GradVitalsCallback(quiet=True)
    trainer = lightning_trainer(tmp_path, cb, max_steps=6, accumulate_grad_batches=4)
    trainer.fit(model, loader(digits))

    record = cb.report.record
    assert len(model.micro_losses) == 24
    assert record.steps == trainer.global_step == 6
    steps, losses = record.series["loss"].points()
    assert steps == list(range(6))
    # Lightning divides each micro-batch loss by 4 before backward: the record holds the
    # step's mean micro-batch loss, as training_step returned it.
    expected = [sum(model.micro_losses[4 * i:4 * i + 4]) / 4 for i in range(6)]
    assert losses == pytest.approx(expected, rel=1e-5)
    assert record.series["grad_norm_global"].points()[1] == pytest.approx(model.oracle_norms, rel=1e-5)


def test_gradient_clipping_telemetry_and_norms_before_clipping(tmp_path, digits):
    clip = 0.01  # far below this model's gradient norms (~0.3): clips every step
    model, cb = DigitsMLP(), GradVitalsCallback(quiet=True)
    trainer = lightning_trainer(tmp_path, cb, max_steps=8, gradient_clip_val=clip)
    trainer.fit(model, loader(digits))

    series = cb.report.record.series
    assert series["clip_total_norm"].points()[0] == list(range(8))
    assert series["clip_clipped"].points()[1] == [1.0] * 8
    assert series["clip_max_norm"].points()[1] == [clip] * 8
    grad = series["grad_norm_global"].points()[1]
    # Recorded before clipping: torch's own pre-clip norm (clip_grad_norm_'s return value).
    assert grad == pytest.approx(model.oracle_norms, rel=1e-5)
    assert grad == pytest.approx(series["clip_total_norm"].points()[1], rel=1e-5)
    assert min(grad) > 10 * clip


def test_learning_rate_far_too_high_is_diagnosed_with_the_layer(tmp_path, digits):
    model, cb = DigitsMLP(lr=50.0, depth=4, sgd=True), GradVitalsCallback(quiet=True)
    trainer = lightning_trainer(tmp_path, cb, max_steps=15)
    trainer.fit(model, loader(digits))

    report = cb.report
    blowup = [f for f in report.findings if f.severity == "critical"
              and f.code in ("nonfinite", "exploding_gradients")]
    assert blowup, report.codes
    names = {n for n, _ in model.named_modules()}
    assert blowup[0].layers and blowup[0].layers[0] in names
    assert report.verdict.startswith("BROKEN")


def test_exception_still_writes_the_report_and_propagates(tmp_path, digits):
    model, cb = DigitsMLP(fail_at=5), GradVitalsCallback(quiet=True)
    trainer = lightning_trainer(tmp_path, cb, max_steps=20)
    with pytest.raises(RuntimeError, match="data loader hiccup"):
        trainer.fit(model, loader(digits))
    saved = json.loads((tmp_path / "gradvitals.json").read_text())
    assert saved["run"]["steps"] == 5
    assert "data loader hiccup" in saved["run"]["error"]


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers stepped in one training_step (GAN-like)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.encoder = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        opt_enc, opt_head = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt_enc.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_head.step()
        opt_enc.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.encoder.parameters(), lr=0.1),
                torch.optim.SGD(self.head.parameters(), lr=0.1)]


def test_several_optimizers_in_one_step_count_once(tmp_path, digits):
    model, cb = TwoOptimizers(), GradVitalsCallback(quiet=True)
    trainer = lightning_trainer(tmp_path, cb, max_steps=12)  # Lightning counts 6 batches x 2 optimizers
    trainer.fit(model, loader(digits))

    record = cb.report.record
    assert record.steps == 6
    for key in ("grad_norm/encoder.weight", "grad_norm/head.weight"):
        assert record.series[key].points()[0] == list(range(6))


def test_bad_options_fail_when_the_callback_is_built():
    with pytest.raises(TypeError, match="unknown watch option"):
        GradVitalsCallback(evry=5)
    with pytest.raises(ValueError, match="every"):
        GradVitalsCallback(every=0)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        GradVitalsCallback(log_every_n_steps=-1)


def test_amp_loss_and_gradients_are_recorded_unscaled(tmp_path, digits):
    try:
        from lightning.pytorch.plugins import MixedPrecision
    except ImportError:  # lightning < 2.2 names it MixedPrecisionPlugin
        from lightning.pytorch.plugins import MixedPrecisionPlugin as MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # a real loss scale, on CPU
    model, cb = DigitsMLP(), GradVitalsCallback(quiet=True)
    trainer = lightning_trainer(tmp_path, cb, max_steps=5, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(model, loader(digits))

    assert scaler.get_scale() >= 1024.0
    series = cb.report.record.series
    assert series["loss"].points()[1] == pytest.approx(model.micro_losses, rel=1e-5)
    # The module's hook sees the gradients Lightning unscaled before on_before_optimizer_step.
    assert series["grad_norm_global"].points()[1] == pytest.approx(model.oracle_norms, rel=1e-5)
