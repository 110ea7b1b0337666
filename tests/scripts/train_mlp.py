"""A plain training script: 4-layer ReLU MLP on digits. No gradvitals import."""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
from sklearn.datasets import load_digits

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--lr", type=float, default=1e-2)
p.add_argument("--fail", choices=["raise", "exit3", "sigint", "none"], default="none")
p.add_argument("--save", default=None)
a = p.parse_args()

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
opt = torch.optim.Adam(model.parameters(), lr=a.lr)
losses = []
for step in range(a.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step == a.steps // 2:
        if a.fail == "raise":
            raise RuntimeError("boom in the user's script")
        if a.fail == "exit3":
            sys.exit(3)
        if a.fail == "sigint":
            import signal
            os.kill(os.getpid(), signal.SIGINT)
if a.save:
    torch.save(model, a.save)
    torch.save(model.state_dict(), a.save + ".sd")
print(json.dumps({"final_loss": losses[-1], "name": __name__, "argv": sys.argv,
                  "path0": sys.path[0], "cwd": os.getcwd()}))
