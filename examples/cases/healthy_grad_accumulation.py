# healthy: true
# forbid: not_updated, no_gradient, update_ratio_high, loss_spike
"""Gradient accumulation: 4 micro-batches of 16 per optimizer step (an effective
batch of 64 on a memory budget), the loss divided by 4, `optimizer.step()` and
`zero_grad()` every 4th backward. Steps are optimizer steps; the four backward
passes between them are one step's worth of gradient, not four steps."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
ACCUM = 4

for step in range(80):
    for micro in range(ACCUM):
        idx = torch.randint(0, len(X), (16,))
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx]) / ACCUM
        loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 20 == 0:
        print(f"step {step} loss {loss.item() * ACCUM:.4f}")
