"""`gradvitals diagnose` on logs written by the real libraries during real training:
an HF Trainer's trainer_state.json, Lightning's CSVLogger metrics.csv with per-parameter
grad_norm() columns, a torch SummaryWriter event file, and a gradvitals JSON report.
Each broken run beside its healthy twin (same model, same logging, a sane setting)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gradvitals.cli import main

pytestmark = pytest.mark.slow


def diagnose_cli(path, tmp_path, name="out.json"):
    out = tmp_path / name
    result = CliRunner().invoke(main, ["diagnose", str(path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.stderr


def problems(data):
    return {f["code"]: f for f in data["findings"] if f["severity"] in ("critical", "warning")}


def mlp(act: type[nn.Module], depth: int, width: int = 32, he: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    dims = [64] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims, dims[1:]):
        lin = nn.Linear(a, b)
        if he:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


# ------------------------------------------------------------------ HF Trainer
@pytest.fixture(scope="module")
def hf_logs(tmp_path_factory, digits):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

    class Config(PretrainedConfig):
        model_type = "gradvitals_test_mlp"

    class TinyMLP(PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.net = mlp(nn.ReLU, 2)

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    X, y = digits
    data = [{"x": X[i], "labels": y[i]} for i in range(512)]
    out = {}
    # SGD warmed up over 10 steps to lr 1000 blows up on the way; to 0.5 the same model learns.
    for name, lr in (("broken", 1000.0), ("healthy", 0.5)):
        d = tmp_path_factory.mktemp(f"hf_{name}")
        args = TrainingArguments(output_dir=str(d), report_to=[], use_cpu=True, disable_tqdm=True,
                                 dataloader_num_workers=0, seed=0, logging_steps=1, max_steps=25,
                                 per_device_train_batch_size=32, optim="sgd", learning_rate=lr,
                                 lr_scheduler_type="constant_with_warmup", warmup_steps=10, log_level="error",
                                 save_strategy="steps" if name == "broken" else "no", save_steps=25)
        trainer = Trainer(model=TinyMLP(Config()), args=args, train_dataset=data)
        trainer.train()
        if name == "healthy":
            trainer.save_state()  # output_dir/trainer_state.json (the other has checkpoint-25/)
        out[name] = (d, trainer.state.log_history)
    return out


def test_hf_trainer_state_names_the_spike_and_the_explosion(hf_logs, tmp_path):
    d, history = hf_logs["broken"]
    data, stderr = diagnose_cli(d, tmp_path)  # the output dir: its newest checkpoint's state
    assert data["coverage"]["source"]["path"].endswith("checkpoint-25/trainer_state.json")
    found = problems(data)
    assert {"loss_spike", "exploding_gradients"} <= set(found)
    # The Trainer's own numbers are the oracle: the spike is where its logged loss jumped.
    losses = [h["loss"] for h in history if "loss" in h]
    assert found["loss_spike"]["step"] == losses.index(next(l for l in losses if l > 3 * losses[0]))
    peak = max(h["grad_norm"] for h in history if "grad_norm" in h)
    assert found["exploding_gradients"]["evidence"]["peak_grad_norm"] == pytest.approx(peak)
    checks = data["coverage"]["checks"]
    assert checks["vanishing_gradients"]["ran"] is False
    assert checks["vanishing_gradients"]["why"] == "no per-layer gradient norms"
    assert "vanishing_gradients" in stderr and "not checked" in stderr


def test_hf_healthy_twin_no_warning(hf_logs, tmp_path):
    data, _ = diagnose_cli(hf_logs["healthy"][0], tmp_path)
    assert problems(data) == {}
    assert data["coverage"]["checks"]["loss_spike"]["ran"] is True


# ------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning_logs(tmp_path_factory, digits):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import grad_norm

    class Deep(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            xb, yb = batch
            loss = nn.functional.cross_entropy(self.net(xb), yb)
            self.log("train_loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.log_dict(grad_norm(self, norm_type=2))  # Lightning's documented recipe

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    X, y = digits
    out = {}
    # 10 sigmoid layers: the gradient shrinks <= 4x per layer; the twin: ReLU with He init.
    for name, net in (("broken", mlp(nn.Sigmoid, 10)), ("healthy", mlp(nn.ReLU, 10, he=True))):
        d = tmp_path_factory.mktemp(f"pl_{name}")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=15, logger=CSVLogger(str(d)),
                            log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(Deep(net), loader)
        out[name] = d
    return out


def test_lightning_per_parameter_columns_show_vanishing_in_the_early_layers(lightning_logs, tmp_path):
    data, _ = diagnose_cli(lightning_logs["broken"], tmp_path)  # the log dir: lightning_logs/version_0
    assert data["coverage"]["source"]["format"] == "lightning_csv"
    found = problems(data)
    assert "vanishing_gradients" in found
    assert found["vanishing_gradients"]["layers"][0] == "net.0"  # the first layer, not the head
    assert "net.20" not in found["vanishing_gradients"]["layers"]
    checks = data["coverage"]["checks"]
    assert checks["vanishing_gradients"]["ran"] and "grad_norm/*" in checks["vanishing_gradients"]["data"]
    assert checks["dead_relu"]["ran"] is False and checks["update_ratio_low"]["ran"] is False


def test_lightning_healthy_twin_no_warning(lightning_logs, tmp_path):
    data, _ = diagnose_cli(lightning_logs["healthy"], tmp_path)
    assert problems(data) == {}
    assert data["coverage"]["checks"]["vanishing_gradients"]["ran"] is True


# ------------------------------------------------------------------ SummaryWriter
@pytest.fixture(scope="module")
def tensorboard_logs(tmp_path_factory, digits):
    from torch.utils.tensorboard import SummaryWriter

    X, y = digits
    out = {}
    for name, lr in (("broken", 100.0), ("healthy", 0.5)):
        d = tmp_path_factory.mktemp(f"tb_{name}")
        net = mlp(nn.ReLU, 2)
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        writer = SummaryWriter(str(d / "runs" / "exp1"))
        g = torch.Generator().manual_seed(0)
        for step in range(20):
            idx = torch.randint(0, len(X), (32,), generator=g)
            loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            total = torch.nn.utils.clip_grad_norm_(net.parameters(), math.inf)  # measures, clips nothing
            opt.step()
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/grad_norm", total.item(), step)
            writer.add_scalar("val/accuracy", 0.5, step)
        writer.close()
        out[name] = d
    return out


def test_summarywriter_logs_show_the_explosion(tensorboard_logs, tmp_path):
    data, _ = diagnose_cli(tensorboard_logs["broken"], tmp_path)  # a parent dir of runs/exp1
    assert data["coverage"]["source"]["format"] == "tensorboard"
    assert data["coverage"]["source"]["read"] == {"loss": "train/loss", "grad_norm_global": "train/grad_norm"}
    assert "val/accuracy" in data["coverage"]["source"]["ignored"]
    assert {"exploding_gradients", "loss_spike"} & set(problems(data))
    assert data["coverage"]["checks"]["vanishing_gradients"]["ran"] is False


def test_event_file_cut_mid_record_is_read_up_to_the_cut(tensorboard_logs, tmp_path):
    (src,) = (tensorboard_logs["healthy"] / "runs" / "exp1").iterdir()
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[:-9])  # a run killed while writing its last scalar
    out = tmp_path / "cut.json"
    result = CliRunner().invoke(main, ["diagnose", str(cut), "--json", str(out)])
    assert result.exit_code == 0
    data = json.loads(out.read_text())
    assert data["coverage"]["source"]["truncated"] == [str(cut)]
    assert "last record was cut off" in result.stderr
    # the cut record was the last step's val/accuracy: every loss and norm before it is there
    assert data["series"]["grad_norm_global"]["count"] == data["series"]["loss"]["count"] == 20


def test_summarywriter_healthy_twin_no_warning(tensorboard_logs, tmp_path):
    data, _ = diagnose_cli(tensorboard_logs["healthy"], tmp_path)
    assert problems(data) == {}


def test_cli_process_corrupt_event_file_one_line_no_banner(tmp_path):
    bad = tmp_path / "events.out.tfevents.1700000000.host.1.0"
    bad.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "gradvitals", "diagnose", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"gradvitals: error: {bad}: not a TensorBoard event file, or corrupt at "
                                        "its first record (failed header crc32 check)"]
    assert proc.stdout == "" and not out.exists()


# ------------------------------------------------------------------ gradvitals JSON
def test_diagnose_on_a_gradvitals_report_gives_the_runs_findings(tmp_path, digits):
    import gradvitals as gv

    X, y = digits
    net = mlp(nn.Sigmoid, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "run.json"
    g = torch.Generator().manual_seed(0)
    with gv.watch(net, opt, path=path, every=5):
        for _ in range(40):
            idx = torch.randint(0, len(X), (64,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
    saved = json.loads(path.read_text())
    data, _ = diagnose_cli(path, tmp_path)
    assert saved["findings"], "the run should have findings to compare"
    assert [(f["code"], f["layers"]) for f in data["findings"]] == [(f["code"], f["layers"])
                                                                    for f in saved["findings"]]
    assert data["coverage"]["source"]["format"] == "gradvitals"
    assert data["coverage"]["checks"]["grad_not_zeroed"]["ran"] is True  # the live run's events are there
