"""Done-when of the integrations: one broken model, four ways in (``gradvitals run`` on a
plain script, ``gv.watch``, the Lightning callback, the HF callback), one diagnosis."""

from __future__ import annotations

import json

import pytest
import torch

L = pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradvitals as gv  # noqa: E402
from gradvitals.report import Report  # noqa: E402

from integration_support import BROKEN_SCRIPT, hf_args, lightning_trainer, load_broken  # noqa: E402

STEPS = 6


def via_cli(tmp_path) -> Report:
    from click.testing import CliRunner

    from gradvitals.cli import main

    out = tmp_path / "run.json"
    result = CliRunner().invoke(main, ["run", "--json", str(out), "-q", str(BROKEN_SCRIPT), "--steps", str(STEPS)])
    assert result.exit_code == 0, result.output
    return Report.from_json(json.loads(out.read_text()))


def via_watch(broken) -> Report:
    x, y = broken.digits()
    model = broken.BrokenMLP()
    opt = torch.optim.SGD(model.parameters(), lr=broken.LR)
    with gv.watch(model, opt) as watch:
        for _ in range(STEPS):
            loss = model(x, y)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    return watch.diagnosis()


def via_lightning(tmp_path, broken) -> Report:
    from gradvitals.integrations.lightning import GradVitalsCallback

    class LitBroken(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = broken.build_net()  # same module paths as BrokenMLP: net.0, net.1, ...

        def forward(self, x, labels=None):
            return broken.forward(self, x, labels)

        def training_step(self, batch, batch_idx):
            return self(*batch)["loss"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=broken.LR)

    x, y = broken.digits()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    cb = GradVitalsCallback(quiet=True)
    lightning_trainer(tmp_path, cb, max_steps=STEPS).fit(LitBroken(), data)
    return cb.report


def via_hf(tmp_path, broken) -> Report:
    from transformers import Trainer

    from gradvitals.integrations.hf import GradVitalsCallback

    x, y = broken.digits()
    model = broken.BrokenMLP()
    cb = GradVitalsCallback(quiet=True)
    args = hf_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=len(x), max_grad_norm=0.0,
                   lr_scheduler_type="constant", logging_steps=100)
    trainer = Trainer(model=model, args=args, callbacks=[cb],
                      train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)],
                      optimizers=(torch.optim.SGD(model.parameters(), lr=broken.LR), None))
    trainer.train()
    return cb.report


def signature(report: Report) -> tuple:
    critical = sorted({f.code for f in report.findings if f.severity == "critical"})
    origin = next((f.layers[0] if f.layers else None, f.step) for f in report.findings if f.code == "nonfinite")
    return tuple(critical), origin


def test_one_broken_model_one_diagnosis_four_ways(tmp_path):
    broken = load_broken()
    reports = {
        "gradvitals run": via_cli(tmp_path),
        "gv.watch": via_watch(broken),
        "lightning": via_lightning(tmp_path / "lightning", broken),
        "hf": via_hf(tmp_path / "hf", broken),
    }
    signatures = {way: signature(r) for way, r in reports.items()}
    codes, (layer, step) = signatures["gv.watch"]
    assert "nonfinite" in codes
    assert layer in {n for n, _ in broken.BrokenMLP().named_modules() if n}
    assert all(sig == signatures["gv.watch"] for sig in signatures.values()), signatures
    assert all(r.record.steps == STEPS for r in reports.values())
