"""A digits classifier trained with an entropy term in the loss, computed outside the
model as scripts write it: `p * log(p)` guarded with torch.where so that p = 0 counts 0.
The logits are sharpened (x 200, a low temperature), so some probabilities underflow to
exactly 0 after the first step: the forward stays finite, but torch.where computes
p * log(p) = 0 x -inf = NaN there and its backward multiplies the dropped branch's zero
gradient by log's infinite derivative: NaN enters the model from the loss. `--safe`
takes log p from the logits, `p * F.log_softmax(logits, -1)`: finite where p underflows
(its value and its gradient), healthy.
"""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--safe", action="store_true")
ap.add_argument("--steps", type=int, default=30)
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    logits = model(X[idx]) * 200
    p = logits.softmax(-1)
    if args.safe:
        plogp = p * nn.functional.log_softmax(logits, -1)
    else:
        plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    loss = nn.functional.cross_entropy(logits, y[idx]) + 0.01 * plogp.sum(-1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step}: loss {loss.item():.4f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
