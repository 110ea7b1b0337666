"""A digits classifier with power normalisation, the signed square root of bilinear-
pooling code, written with torch.where as such scripts often write it:
`torch.where(h >= 0, torch.sqrt(h), -torch.sqrt(-h))`. The forward is finite (where
keeps the valid branch), but torch.where computes both branches everywhere: sqrt of a
negative is NaN, and the backward multiplies the dropped branch's zero gradient by
sqrt's NaN derivative there, so NaN reaches every weight below from the first step.
`--safe` clamps each branch's input into sqrt's domain first: healthy.
"""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--safe", action="store_true")
ap.add_argument("--steps", type=int, default=30)
args = ap.parse_args()


class SignedSqrt(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos, neg = (h.clamp_min(1e-12), (-h).clamp_min(1e-12)) if args.safe else (h, -h)
        return torch.where(h >= 0, torch.sqrt(pos), -torch.sqrt(neg))


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), SignedSqrt(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.4f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
