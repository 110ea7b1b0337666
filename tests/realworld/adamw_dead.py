"""Issue 25: AdamW at lr 5e-2 with weight decay 0.5 on a ReLU MLP (digits). Every
step moves the weights by a few percent of their norm (~40x the ~1e-3 rule of
thumb), the loss jumps at step 1, and most units of a hidden ReLU layer die -- yet
the loss still falls. The dead units have a cause: the step size. `--lr 1e-3
--wd 0.01` is the healthy twin."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--lr", type=float, default=5e-2)
ap.add_argument("--wd", type=float, default=0.5)
args = ap.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 25 == 0 or step < 3:
        with torch.no_grad():  # the hidden layer's units over the whole data set
            h = torch.relu(nn.functional.linear(torch.relu(nn.functional.linear(X, model[0].weight, model[0].bias)),
                                                model[2].weight, model[2].bias))
            dead = (h.amax(0) <= 0).float().mean().item()
        print(f"step {step} loss {loss.item():.4f} dead units after model[3]: {dead:.0%}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
