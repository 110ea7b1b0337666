# expect: update_ratio_high
# forbid: nonfinite
"""SGD with momentum 0.9 at lr=0.5 on a tanh MLP, about fifty times a sane rate.
Nothing overflows (tanh and cross-entropy keep everything bounded), but every
step moves each weight matrix by 2-10% of its size: the loss jumps between 0.1
and 3.5 instead of settling, and ends worse than it was after 60 steps. The chapter's yardstick: |dW|/|W| ~1e-3 per step; lower the
learning rate (or add warmup and decay)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

for step in range(200):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
