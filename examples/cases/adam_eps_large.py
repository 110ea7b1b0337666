# expect: adam_epsilon_too_large
# forbid: nonfinite, no_gradient, loss_spike
"""A residual branch scaled down by a fixed factor of 1e-3 (a layer scale), trained with
Adam at eps=1e-4 (a value copied from a mixed-precision recipe). The branch's gradients
are 1e-3 of the trunk's, ~1e-5 RMS: below eps, so Adam's step m / (sqrt(v) + eps) is
divided by eps instead of the gradient's scale and the branch barely moves. The fix:
eps=1e-8 (PyTorch's default), where Adam normalises the branch's step like the others."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(64, 64)
        self.branch = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        h = h + 1e-3 * self.branch(h)  # layer scale 1e-3, fixed
        return self.head(h)


model = Net()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)

for step in range(200):
    idx = torch.randint(0, len(X), (64,))
    loss = F.cross_entropy(model(X[idx]), y[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
