# healthy: true
# forbid: vanishing_gradients, exploding_gradients, dead_relu, nonfinite, poor_initialization
"""The chapter's fix for the 20-layer digit classifier: ReLU with He (Kaiming)
init, Var(W) = 2/fan_in, zero biases. The signal keeps its scale through all 20
layers, gradients reach the first layer, and the loss falls."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

layers = []
for i in range(20):
    lin = nn.Linear(64, 64)
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)
    layers += [lin, nn.ReLU()]
head = nn.Linear(64, 10)
nn.init.xavier_normal_(head.weight)
nn.init.zeros_(head.bias)
model = nn.Sequential(*layers, head)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

for step in range(200):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
with torch.no_grad():
    acc = (model(X).argmax(1) == y).float().mean().item()
print(f"train accuracy {acc:.3f}")
