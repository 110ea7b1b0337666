# expect: dead_relu, loss_plateau
# forbid: nonfinite, saturated_activations
"""ReLU layers whose biases start at -3 (a "make it sparse" idea gone wrong).
Pre-activations are almost all negative, so most units output zero on every
sample and receive no gradient: they never come back. The chapter's fix: zero
biases with He init, LeakyReLU/GELU, or a lower learning rate."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
for lin in (model[0], model[2]):
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.constant_(lin.bias, -3.0)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
