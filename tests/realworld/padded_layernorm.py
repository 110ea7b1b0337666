"""A character-level tagger with a hand-written LayerNorm, trained on Python's own
source text, as scripts write it before they reach for nn.LayerNorm:
`(x - mean) / (torch.sqrt(var) + eps)`, the epsilon outside the square root. Padded
positions are zeroed (`h * mask`) so that they carry nothing; the last batch of the
epoch is padded to the full batch size with empty rows (static shapes). The model
returns logits; the loss (`cross_entropy`, padding ignored) is computed outside it.

An all-zero row has variance 0: the forward is finite (0 / eps), but the square root's
derivative at 0 is infinite and its backward makes NaN, which reaches the weights
below it. `--eps-inside` writes `torch.sqrt(var + eps)` (nn.LayerNorm's form): healthy.
"""
import argparse
import math
import random as _random

import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--eps-inside", action="store_true")
ap.add_argument("--epochs", type=int, default=2)
args = ap.parse_args()

torch.manual_seed(0)
with open(_random.__file__, encoding="utf-8") as f:
    text = f.read()[:3100]
chars = sorted(set(text))
PAD = 0
stoi = {ch: i + 1 for i, ch in enumerate(chars)}
V, D, T, B = len(chars) + 1, 32, 24, 16
ids = torch.tensor([stoi[c] for c in text])
windows = [ids[i:i + T + 1] for i in range(0, len(ids) - T - 1, T)]


def batches():
    order = torch.randperm(len(windows)).tolist()
    for i in range(0, len(order), B):
        rows = torch.stack([windows[j] for j in order[i:i + B]])
        if len(rows) < B:  # pad the last batch with empty rows: every batch has one shape
            rows = torch.cat([rows, torch.full((B - len(rows), T + 1), PAD)])
        x, y = rows[:, :-1], rows[:, 1:].clone()
        y[x == PAD] = -100
        yield x, y


class LayerNorm(nn.Module):
    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        std = torch.sqrt(var + self.eps) if args.eps_inside else torch.sqrt(var) + self.eps
        return self.gain * (x - mean) / std + self.bias


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D, bias=False)
        self.norm = LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, V)

    def forward(self, x):
        mask = (x != PAD).unsqueeze(-1).float()
        h = self.norm(self.proj(self.emb(x)) * mask)
        return self.head(h + self.mlp(h))


model = Tagger()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
step = 0
for epoch in range(args.epochs):
    for x, y in batches():
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 4 == 0 or not math.isfinite(loss.item()):
            print(f"step {step}: loss {loss.item():.4f}")
        step += 1
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
