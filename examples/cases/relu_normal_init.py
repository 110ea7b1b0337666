# expect: nonfinite, exploding_gradients, poor_initialization
# origin: oracle
"""A 20-layer ReLU MLP initialised with N(0, 1) weights (the tutorial-blog mistake:
`nn.init.normal_(w)` instead of He's std = sqrt(2/fan_in)). Every layer multiplies
the signal by ~sqrt(64/2) = 5.7, so activations and gradients grow ~10^15 over the
stack; the first SGD step blows the weights up and the next forward overflows.
The chapter's fix: He init for ReLU."""
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
    nn.init.normal_(lin.weight, 0.0, 1.0)
    layers += [lin, nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)

for step in range(30):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.4g}")
