"""A plain training script (no gradvitals import): a 20-layer ReLU MLP on digits with
N(0, 1) weights and a high learning rate. Its loss goes NaN."""
import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=50)
p.add_argument("--lr", type=float, default=0.1)
a = p.parse_args()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X, dtype=torch.float32)
y = torch.tensor(y)
layers = []
for i in range(20):
    lin = nn.Linear(64, 64)
    nn.init.normal_(lin.weight, 0.0, 1.0)
    layers += [lin, nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=a.lr)
for step in range(a.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(f"step {step} loss {loss.item():.4g}")
