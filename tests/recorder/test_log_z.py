"""log Z (logsumexp of the logits that enter cross_entropy) on real runs, against
torch's own logsumexp of the same logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradvitals as gv
from gradvitals.probes.log_z import CHUNK_NUMEL, log_z_stats

V, T, B = 13, 6, 4


class TinyLM(nn.Module):
    """Embedding + head; returns the logits (B, T, V), or (logits, loss) when given
    targets (nanoGPT's shape); ``classes_first``: (B, V, T) as a seq2seq head might."""

    def __init__(self, classes_first: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)
        self.classes_first = classes_first
        with torch.no_grad():
            self.head.bias.fill_(2.5)  # log Z far from log V, so a wrong offset shows

    def forward(self, idx, targets=None):
        logits = self.head(self.emb(idx))
        if self.classes_first:
            logits = logits.transpose(1, 2)
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :4] = -100  # padding: left out of log Z
    y[2, -1] = -100
    return x, y


def _expected(logits, y, dim):
    lz = torch.logsumexp(logits.detach().double(), dim=dim)
    kept = lz[y != -100]
    return kept.mean().item(), kept.max().item()


def _run(model, loss_fn, steps=5, every=2, watch=True):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = _data()
    seen = {}
    w = gv.watch(model, opt, every=every, autosave_s=None) if watch else None
    for step in range(steps):
        opt.zero_grad()
        logits, loss = loss_fn(model, x, y)
        seen[step] = logits.detach().clone()
        loss.backward()
        opt.step()
    report = None
    if w is not None:
        report = w.report()
        w.close()
    return report, seen, [p.detach().clone() for p in model.parameters()]


def _outside(model, x, y):
    logits = model(x)
    return logits, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def test_log_z_of_logits_given_to_cross_entropy_outside_the_model_matches_torch_and_leaves_the_run_alone():
    torch.manual_seed(1)
    report, seen, params = _run(TinyLM(), _outside)
    y = _data()[1]
    s_mean, s_max = report["series"]["log_z_mean"], report["series"]["log_z_max"]
    assert s_mean["steps"] == [0, 2, 4] == s_max["steps"]  # scheduled steps only
    for i, step in enumerate(s_mean["steps"]):
        mean, peak = _expected(seen[step], y, -1)
        assert s_mean["values"][i] == pytest.approx(mean, rel=1e-5)
        assert s_max["values"][i] == pytest.approx(peak, rel=1e-5)
    # the padded tokens count: with them the mean would differ
    all_mean = torch.logsumexp(seen[0].double(), -1).mean().item()
    assert abs(all_mean - s_mean["values"][0]) > 1e-3
    torch.manual_seed(1)
    _, _, plain = _run(TinyLM(), _outside, watch=False)
    assert all(torch.equal(a, b) for a, b in zip(params, plain))  # the run's numbers unchanged


def test_log_z_when_the_model_computes_the_loss_itself_with_its_own_ignore_index():
    def inside(model, x, y):
        y = y.masked_fill(y == -100, -1)
        return model(x, y)

    report, seen, _ = _run(TinyLM(), inside, steps=1)
    y = _data()[1]
    mean, peak = _expected(seen[0], y, -1)
    assert report["series"]["log_z_mean"]["values"] == [pytest.approx(mean, rel=1e-5)]
    assert report["series"]["log_z_max"]["values"] == [pytest.approx(peak, rel=1e-5)]


def test_log_z_over_the_class_dim_when_classes_come_first():
    report, seen, _ = _run(TinyLM(classes_first=True), lambda m, x, y: (m(x), F.cross_entropy(m(x), y)), steps=1)
    # two forwards: the second one (the one the loss saw) has the same weights, the same logits
    mean, peak = _expected(seen[0], _data()[1], 1)
    assert report["series"]["log_z_mean"]["values"] == [pytest.approx(mean, rel=1e-5)]
    assert report["series"]["log_z_max"]["values"] == [pytest.approx(peak, rel=1e-5)]


def test_no_log_z_without_cross_entropy_on_the_models_logits():
    def mse(model, x, y):
        logits = model(x)
        return logits, logits.pow(2).mean()

    def on_probabilities(model, x, y):  # softmax then cross_entropy: not the logits
        logits = model(x)
        return logits, F.cross_entropy(logits.softmax(-1).reshape(-1, V), y.reshape(-1))

    for fn in (mse, on_probabilities):
        report, _, _ = _run(TinyLM(), fn, steps=1)
        assert "log_z_mean" not in report["series"]


def test_log_z_stats_in_chunks_equals_one_pass_and_counts_no_ignored_token():
    torch.manual_seed(0)
    rows = CHUNK_NUMEL // 50 * 2 + 7  # three chunks of a 50-class logit matrix
    x = torch.randn(rows, 50) * 4
    keep = torch.rand(rows) > 0.3
    lz = torch.logsumexp(x.double(), -1)
    got = log_z_stats(x, -1, keep)
    assert got[0].item() == pytest.approx(lz[keep].mean().item(), rel=1e-5)
    assert got[1].item() == pytest.approx(lz[keep].max().item(), rel=1e-6)
    none = log_z_stats(x[:3], -1, torch.zeros(3, dtype=torch.bool))
    assert all(math.isnan(v) for v in none.tolist())
    # classes not innermost (a non-viewable layout): per slice, the same numbers
    y = torch.randn(3, 50, 5)
    got = log_z_stats(y, 1)
    ref = torch.logsumexp(y.double(), 1)
    assert got.tolist() == pytest.approx([ref.mean().item(), ref.max().item()], rel=1e-5)
