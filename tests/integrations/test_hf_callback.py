"""The Hugging Face Trainer callback on real CPU Trainers with tiny models built from
config (no download): the Trainer's own logged numbers are the oracle."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, Trainer  # noqa: E402

from gradvitals.integrations.hf import GradVitalsCallback  # noqa: E402
from gradvitals.report import schema  # noqa: E402

from integration_support import hf_args, problems  # noqa: E402


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def counting(n: int = 128) -> list[dict]:
    """Sequences that count up modulo the vocabulary: a task a tiny GPT-2 learns fast."""
    g = torch.Generator().manual_seed(0)
    ids = (torch.randint(0, 32, (n, 1), generator=g) + torch.arange(16)) % 32
    return [{"input_ids": r, "labels": r} for r in ids]


def logged(trainer: Trainer, key: str) -> list[float]:
    """The Trainer's own logged values (logging_steps=1). transformers < 4.38 logs no
    ``grad_norm``: there it is what the Trainer's clip call returned each step (the value
    later releases log), taken by wrapping that call."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    if key == "grad_norm":
        returned = [float(n) for n in trainer.clip_returned]
        if values:
            assert values == pytest.approx(returned, rel=1e-6)  # the two oracles agree
        return values or returned
    return values


def train(tmp_path, callback, model=None, dataset=None, **args) -> Trainer:
    args.setdefault("per_device_train_batch_size", 16)
    trainer = Trainer(model=model or tiny_gpt2(), args=hf_args(tmp_path, **args),
                      train_dataset=dataset or counting(), callbacks=[callback])
    trainer.clip_returned = []
    clip = trainer.accelerator.clip_grad_norm_

    def recording_clip(*a, **k):
        total = clip(*a, **k)
        trainer.clip_returned.append(total)
        return total

    trainer.accelerator.clip_grad_norm_ = recording_clip
    trainer.train()
    return trainer


def test_healthy_run_matches_the_trainers_own_numbers(tmp_path, capsys):
    cb = GradVitalsCallback(every=5)
    trainer = train(tmp_path, cb, max_steps=30, learning_rate=3e-3)

    report = cb.report
    assert problems(report) == []
    assert report.record.steps == trainer.state.global_step == 30
    steps, norms = report.record.series["grad_norm_global"].points()
    assert steps == list(range(30))
    # The Trainer logs clip_grad_norm_'s pre-clip total norm every step (logging_steps=1).
    assert norms == pytest.approx(logged(trainer, "grad_norm"), rel=1e-5)
    assert report.record.series["loss"].points()[1] == pytest.approx(logged(trainer, "loss"), abs=1e-3)
    saved = json.loads((tmp_path / "gradvitals.json").read_text())
    assert saved["run"]["steps"] == 30 and saved["run"]["integration"].startswith("transformers")
    jsonschema.validate(saved, schema())
    assert report.verdict in capsys.readouterr().err


def test_gradient_accumulation_records_real_optimizer_steps_only(tmp_path):
    cb = GradVitalsCallback(quiet=True)
    trainer = train(tmp_path, cb, max_steps=5, gradient_accumulation_steps=4, per_device_train_batch_size=4)

    record = cb.report.record
    assert record.steps == trainer.state.global_step == 5
    assert record.series["loss"].points()[0] == list(range(5))
    # The micro-batch losses add up to the step's loss, as the Trainer logs it.
    assert record.series["loss"].points()[1] == pytest.approx(logged(trainer, "loss"), abs=1e-3)
    assert record.series["grad_norm_global"].points()[1] == pytest.approx(logged(trainer, "grad_norm"), rel=1e-5)


def test_gradient_clipping_telemetry_and_norms_before_clipping(tmp_path):
    clip = 0.01  # far below the tiny GPT-2's gradient norms (~1): clips every step
    cb = GradVitalsCallback(quiet=True)
    trainer = train(tmp_path, cb, max_steps=6, max_grad_norm=clip)

    series = cb.report.record.series
    assert series["clip_clipped"].points() == (list(range(6)), [1.0] * 6)
    assert series["clip_max_norm"].points()[1] == [clip] * 6
    grad = series["grad_norm_global"].points()[1]
    assert grad == pytest.approx(logged(trainer, "grad_norm"), rel=1e-5)
    assert grad == pytest.approx(series["clip_total_norm"].points()[1], rel=1e-5)
    assert min(grad) > 10 * clip


def test_explosion_under_clipping_is_diagnosed_from_the_norms_before_clipping(tmp_path):
    # SGD at lr 30 under the Trainer's default max_grad_norm=1.0: the gradients grow to
    # 10-50x the threshold while clipping hides it from the update. Whichever order the
    # Trainer calls clipping and on_pre_optimizer_step in, the record holds the norms the
    # Trainer itself logs (before clipping), and the run is diagnosed from them.
    cb = GradVitalsCallback(quiet=True)
    trainer = train(tmp_path, cb, max_steps=30, learning_rate=30.0, optim="sgd", max_grad_norm=1.0,
                    lr_scheduler_type="constant")
    series = cb.report.record.series
    grad = series["grad_norm_global"].points()[1]
    assert grad == pytest.approx(logged(trainer, "grad_norm"), rel=1e-5)
    assert max(grad) > 10.0  # clipped to 1.0 before the step: only the pre-clip norms show it
    codes = {f.code for f in cb.report.findings if f.severity in ("critical", "warning")}
    assert codes & {"exploding_gradients", "loss_spike"}


def test_learning_rate_far_too_high_is_diagnosed_with_the_layer(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (64, 16), generator=g)
    data = [{"input_ids": r, "labels": int(r[0] > 32)} for r in ids]
    cb = GradVitalsCallback(quiet=True)
    train(tmp_path, cb, model=model, dataset=data, max_steps=6, learning_rate=1e20, optim="sgd",
          max_grad_norm=0.0, lr_scheduler_type="constant")

    report = cb.report
    nonfinite = [f for f in report.findings if f.code == "nonfinite"]
    assert nonfinite and nonfinite[0].severity == "critical"
    assert nonfinite[0].layers and nonfinite[0].layers[0] in {n for n, _ in model.named_modules()}
    assert report.verdict.startswith("BROKEN")


def test_without_step_events_the_optimizer_hooks_record_the_same(tmp_path):
    with_events, with_hooks = GradVitalsCallback(quiet=True), GradVitalsCallback(quiet=True)
    with_hooks._step_events = False  # what a transformers release without the events gets
    a = train(tmp_path / "a", with_events, max_steps=4)
    b = train(tmp_path / "b", with_hooks, max_steps=4)
    assert with_hooks.report.record.steps == b.state.global_step == 4
    hooks_steps, hooks_norms = with_hooks.report.record.series["grad_norm_global"].points()
    events_steps, events_norms = with_events.report.record.series["grad_norm_global"].points()
    assert hooks_steps == events_steps == [0, 1, 2, 3]
    assert hooks_norms == pytest.approx(events_norms, rel=1e-6)
    assert logged(a, "grad_norm") == pytest.approx(logged(b, "grad_norm"), rel=1e-6)


class Crashing(torch.nn.Module):
    """A model whose fourth forward fails, as a data or shape bug would."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_gpt2()
        self.calls = 0

    def forward(self, input_ids, labels=None):
        self.calls += 1
        if self.calls == 4:
            raise RuntimeError("shape mismatch in batch 3")
        return self.inner(input_ids=input_ids, labels=labels)


def test_crashed_training_still_gets_its_report(tmp_path):
    cb = GradVitalsCallback(quiet=True)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train(tmp_path, cb, model=Crashing(), max_steps=10)
    assert not (tmp_path / "gradvitals.json").exists()
    cb._at_exit()  # what atexit runs when the exception ends the process
    saved = json.loads((tmp_path / "gradvitals.json").read_text())
    assert saved["run"]["steps"] == 3
    assert "on_train_end" in saved["run"]["error"]
