"""A plain training script (no gradvitals import) that explodes over several steps: a
tanh MLP regressing the digit's value (MSE) with SGD at lr=0.1, far above what this
loss tolerates. Each step overshoots further: the gradient norm grows ~20x per step
for about ten steps before the loss overflows to Inf and then NaN."""
import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=24)
a = p.parse_args()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
target = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(a.steps):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.mse_loss(model(X[idx]), target[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
