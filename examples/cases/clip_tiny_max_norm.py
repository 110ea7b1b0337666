# expect: clipping_always_active
# forbid: nonfinite, exploding_gradients
"""`clip_grad_norm_(model.parameters(), max_norm=0.01)`: a threshold copied from
an unrelated config. The gradient norm is ~0.2-0.3 on every step, so every step is
clipped to a few percent of its size: clipping has silently become a learning-rate cut.
The chapter's advice: max_norm ~1.0 (it should fire only on rare spikes)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
