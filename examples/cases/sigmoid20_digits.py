# expect: vanishing_gradients, loss_plateau, architecture_risk
# forbid: nonfinite, exploding_gradients, dead_relu, saturated_activations
"""The chapter's 20-layer digit classifier: sigmoid after every layer, PyTorch's
default init, plain SGD. Each sigmoid multiplies the backward signal by at most
0.25, so the first layers get gradients ~10^-10 of the last one's and the loss sits
at ln(10) = 2.30. The chapter's fix: ReLU with He init (see healthy_he_relu20_digits.py)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

layers = [nn.Linear(64, 64), nn.Sigmoid()]
for _ in range(18):
    layers += [nn.Linear(64, 64), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
