"""Pattern 1: no optimizer object. The update is written by hand (micrograd/
nanoGPT-tutorial style): `p.data.add_(p.grad, alpha=-lr)`, `model.zero_grad()`,
the learning rate in a plain variable. Steps come from backward calls."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--lr", type=float, default=0.1)
ap.add_argument("--steps", type=int, default=60)
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
lr = args.lr
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.6f}")
print("CHECKSUM", repr(sum(float(p.double().sum()) for p in model.state_dict().values())))
