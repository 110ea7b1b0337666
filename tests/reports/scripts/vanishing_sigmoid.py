"""A plain training script (no gradvitals import) whose gradients vanish: 12 Linear
layers with a sigmoid after each, PyTorch's default init, plain SGD on digits. Each
sigmoid passes at most 0.25 of the backward signal, so the first layers' gradient
norms sit orders of magnitude below the last layers'."""
import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
a = p.parse_args()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
layers = []
for i in range(12):
    layers += [nn.Linear(64 if i == 0 else 32, 32), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(a.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
