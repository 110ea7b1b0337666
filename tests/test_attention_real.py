"""Attention logit growth and entropy collapse on a real run: a 2-layer GPT on Python's
own source text at a high learning rate (AdamW lr 0.1, Wortsman et al. 2023's recipe
for reproducing the instability in a small model), beside its healthy twin: the same
run with QK-layernorm."""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradvitals as gv

PROBLEMS = ("critical", "warning")
TEXT = inspect.getsource(os) + inspect.getsource(inspect)
VOCAB = sorted(set(TEXT))
DATA = torch.tensor([VOCAB.index(c) for c in TEXT])
D, T, B, NH, L = 32, 32, 16, 4, 2
STEPS, EVERY, LR = 80, 10, 0.1


class Attn(nn.Module):
    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(D // NH), nn.LayerNorm(D // NH)

    def heads(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(D, -1)
        q, k, v = (z.view(b, t, NH, D // NH).transpose(1, 2) for z in (q, k, v))
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x):
        q, k, v = self.heads(x)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attn(qk_norm)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, qk_norm: bool) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(len(VOCAB), D), nn.Embedding(T, D)
        self.blocks = nn.Sequential(*[Block(qk_norm) for _ in range(L)])
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, len(VOCAB))

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln_f(self.blocks(x)))


def batch(gen):
    ix = torch.randint(0, len(DATA) - T - 1, (B,), generator=gen)
    return torch.stack([DATA[j:j + T] for j in ix]), torch.stack([DATA[j + 1:j + T + 1] for j in ix])


def train(qk_norm: bool):
    torch.manual_seed(0)
    model = GPT(qk_norm)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    with gv.watch(model, opt, every=EVERY, autosave_s=None) as watch:
        for _ in range(STEPS):
            x, y = batch(gen)
            loss = F.cross_entropy(model(x).reshape(-1, len(VOCAB)), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return watch.diagnosis(), model


@pytest.fixture(scope="module")
def runs():
    return {"plain": train(False), "qk_norm": train(True)}


def attention_probs(model: GPT, layer: int) -> torch.Tensor:
    """torch as the oracle: the softmax rows of a layer on a fresh batch."""
    x, _ = batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.tok(x) + model.pos(torch.arange(T))
        for blk in model.blocks[:layer]:
            h = blk(h)
        q, k, _ = model.blocks[layer].attn.heads(model.blocks[layer].ln1(h))
        s = (q @ k.transpose(-2, -1)) / math.sqrt(D // NH)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        return torch.softmax(s, -1)


def test_high_lr_without_qk_norm_grows_attention_logits(runs):
    report, _ = runs["plain"]
    found = {f.code: f for f in report.findings}
    assert "attention_logit_growth" in found, [f.code for f in report.findings]
    f = found["attention_logit_growth"]
    assert set(f.layers) == {"blocks.0.attn", "blocks.1.attn"} and f.severity == "warning"
    rows = {r["layer"]: r for r in f.evidence["layers"]}
    series = report.record.series["attn_max_logit/blocks.0.attn"].points()
    assert rows["blocks.0.attn"]["last"] == [series[0][-1], pytest.approx(series[1][-1], rel=1e-3)]
    assert rows["blocks.0.attn"]["factor"] > 100 and f.step <= 30


def test_the_first_layer_collapses_to_one_key_and_torch_agrees(runs):
    report, model = runs["plain"]
    found = {f.code: f for f in report.findings}
    f = found.get("attention_entropy_collapse")
    assert f is not None and "blocks.0.attn" in f.layers and f.caused_by == "attention_logit_growth"
    # the oracle: most rows of that layer put nearly all their weight on one key; the twin's do not
    top = attention_probs(model, 0).amax(-1)[..., 4:]  # rows with >= 5 keys
    twin = attention_probs(runs["qk_norm"][1], 0).amax(-1)[..., 4:]
    assert top.median() > 0.99 and twin.median() < 0.9


def test_the_qk_layernorm_twin_is_clean(runs):
    report, _ = runs["qk_norm"]
    assert [f"{f.code}:{f.severity}" for f in report.findings if f.severity in PROBLEMS] == []
    peak = max(v for k, s in report.record.series.items() if k.startswith("attn_max_logit/") for v in s.points()[1])
    assert peak < 30
