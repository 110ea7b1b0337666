# expect: update_ratio_high
# forbid: nonfinite
"""SGD with momentum 0.9 at lr=1.0 on a tanh MLP, about a hundred times a sane rate.
Nothing overflows (tanh and cross-entropy keep everything bounded), but the first
steps move each weight matrix by a large part of its size: within 25 steps the logits
are huge, the tanh layers saturate and the loss sits at 100-300 instead of falling
from 2.3. (At lr=0.5 the same net is chaotic: whether the loss recovers depends on the
seed and on the CPU's rounding.) The chapter's yardstick: |dW|/|W| ~1e-3 per step;
lower the learning rate (or add warmup and decay)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)

for step in range(200):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
