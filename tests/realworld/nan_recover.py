"""A script with its own NaN handling: after a step whose weights are no longer
finite it restores the last good checkpoint (kept every 10 steps), rebuilds the
optimizer at half the learning rate and trains on. `--bad-at K`: a sample of batch K
holds NaN (a corrupt record); `--bad-at -1`: none."""
import argparse
import copy

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=120)
ap.add_argument("--bad-at", type=int, default=50)
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
lr = 0.1
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
good = copy.deepcopy(model.state_dict())
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    xb = X[idx].clone()
    if step == args.bad_at:
        xb[0, 0] = float("nan")
    loss = nn.functional.cross_entropy(model(xb), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        print(f"step {step}: non-finite weights, restoring the last good checkpoint")
        model.load_state_dict(good)
        lr /= 2
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif step % 10 == 0:
        good = copy.deepcopy(model.state_dict())
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
