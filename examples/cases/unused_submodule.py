# expect: no_gradient
# forbid: nonfinite, not_updated
"""A model that defines an auxiliary projection (`self.aux`) its forward never
calls (a refactoring leftover). Its parameters are trainable and in the optimizer
but never receive a gradient: dead weight in every checkpoint, and a sign the
graph is not what the author thinks (with DDP it would even raise). The fix:
use it or delete it (or set requires_grad=False if it is meant to be frozen)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.aux = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = Net()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
