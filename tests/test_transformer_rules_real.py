"""The transformer-era rules on real training runs, each beside its healthy twin:
Adam's eps as large as a layer's gradients, and loss spikes judged at scale."""

from __future__ import annotations

import math

import pytest
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


# ---------------------------------------------------------- loss spikes at scale
SPIKE_AT, SPIKE_STEPS, STEPS = 70, 3, 110
#: x30 for 3 steps moved this run's noisy char-level loss by ~4 robust deviations only; x100 by 8.
LR_BOOST = 100.0


def train_tiny_gpt(lr_spike: bool) -> gv.Report:
    """A 2-layer GPT-2 built from its config (no download) on Python's own source text,
    AdamW lr 3e-3; ``lr_spike``: a scheduler multiplies the lr by LR_BOOST for 3 steps mid-run."""
    import argparse

    from transformers import GPT2Config, GPT2LMHeadModel

    with open(argparse.__file__, encoding="utf-8") as fh:
        text = fh.read()[:20000]
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    torch.manual_seed(0)
    T, B = 32, 16
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=T, n_embd=32, n_layer=2, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    boost = (lambda s: LR_BOOST if SPIKE_AT <= s < SPIKE_AT + SPIKE_STEPS else 1.0) if lr_spike else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, boost)
    gen = torch.Generator().manual_seed(0)
    with gv.watch(model, opt, autosave_s=None) as watch:
        for _ in range(STEPS):
            ix = torch.randint(len(data) - T - 1, (B,), generator=gen)
            x = torch.stack([data[i:i + T] for i in ix])
            y = torch.stack([data[i + 1:i + T + 1] for i in ix])
            loss = model(input_ids=x, labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return watch.diagnosis()


def test_an_lr_spike_in_a_tiny_gpt_is_a_loss_spike_with_its_first_jumping_layer():
    report = train_tiny_gpt(lr_spike=True)
    found = {f.code: f for f in report.findings}
    assert "loss_spike" in found, [f.code for f in report.findings]
    f = found["loss_spike"]
    scale = f.evidence["scale"]
    assert scale["window"] == 128 and scale["z_threshold"] == 6.0 and scale["loss_spikes"] >= 1
    ev = next(e for e in scale["events"] if e["loss_z"] is not None and e["loss_z"] >= 6)
    # the update of step SPIKE_AT shows in the loss of the next step
    assert SPIKE_AT < ev["step"] <= SPIKE_AT + SPIKE_STEPS + 1 and ev["loss_z"] >= 6
    layer = ev["first_layer"]
    assert layer in report.record.layers and f.layers == (layer,)
    assert SPIKE_AT < ev["first_layer_step"] <= ev["step"]
    if ev["recovered"]:
        assert ev["recovered_step"] > ev["end_step"]
    assert layer in f.summary and "jumped first" in f.summary
    # the first layer's own gradient norm did jump there (the record as the oracle)
    norms = {}
    for p in report.record.layers[layer].params:
        for st, v in zip(*report.record.series[f"grad_norm/{p}"].points()):
            norms[st] = norms.get(st, 0.0) + v * v
    before = sorted(norms[s] for s in range(SPIKE_AT - 20, SPIKE_AT))[10]
    assert norms[ev["first_layer_step"]] > 4 * before


def test_the_same_tiny_gpt_without_the_lr_spike_has_none():
    report = train_tiny_gpt(lr_spike=False)
    assert [f"{f.code}:{f.severity}" for f in report.findings if f.severity in PROBLEMS] == []
    assert "loss_spike" not in {f.code for f in report.findings}
    # log Z read inside HF's own loss (labels given to the model, ForCausalLMLoss): on the
    # scheduled steps; at step 0 the logits are ~0 (init std 0.02), so log Z ~ ln(vocabulary)
    steps, values = report.record.series["log_z_mean"].points()
    assert steps == list(range(0, STEPS, 25))
    vocab = report.record.params["transformer.wte.weight"].shape[0]
    assert abs(values[0] - math.log(vocab)) < 0.05
    assert "output_logit_divergence" not in {f.code for f in report.findings}


# --------------------------------------------------- output logit divergence
def _logit_drift_run(z_loss: float):
    """tests/realworld/logit_drift_gpt.py in-process: its tiny GPT, 200 steps."""
    import runpy
    from pathlib import Path

    case = runpy.run_path(str(Path(__file__).resolve().parent / "realworld" / "logit_drift_gpt.py"),
                          run_name="case")
    model, opt, data, vocab = case["setup"]()
    with gv.watch(model, opt, autosave_s=None) as watch:
        case["train"](model, opt, data, vocab, steps=200, z_loss=z_loss)
        return watch.diagnosis()



@pytest.mark.slow
def test_a_tiny_gpt_whose_logits_keep_growing_has_output_logit_divergence_and_z_loss_removes_it():
    report = _logit_drift_run(z_loss=0.0)
    found = {f.code: f for f in report.findings}
    assert "output_logit_divergence" in found, [f.code for f in report.findings]
    f = found["output_logit_divergence"]
    # growing while the loss still falls is info, once it no longer falls a warning; which
    # one this tiny run ends in is chance (see the script), the rule's edges are in
    # tests/rules/test_logits.py
    assert f.severity == ("info" if f.evidence["loss_still_falling"] else "warning")
    # the evidence is the record's log Z (torch's logsumexp of the logits, tests/recorder/test_log_z.py)
    steps, values = report.record.series["log_z_mean"].points()
    assert f.evidence["first"] == values[0] and f.evidence["last"] == values[-1]
    assert values[-1] - values[0] > 5 and f.step == next(s for s, v in zip(steps, values) if v >= 8.0)
    assert "torch.logsumexp(logits, dim=-1).pow(2).mean()" in f.advice
    # the twin: the same run with the z-loss term holds log Z near 0
    twin = _logit_drift_run(z_loss=1e-2)
    assert "output_logit_divergence" not in {g.code for g in twin.findings}
    assert [f"{g.code}:{g.severity}" for g in twin.findings if g.severity in PROBLEMS] == []
    _, twin_z = twin.record.series["log_z_mean"].points()
    assert abs(twin_z[-1]) < 3 < values[-1] - 5
