# expect: symmetric_weights
# forbid: nonfinite, dead_relu
"""Every weight and bias initialised to zero (`nn.init.zeros_`), a tanh MLP.
All hidden units of a layer compute the same function and receive the same
gradient, so they stay identical forever: the layer is worth one neuron. The
chapter's fix: random init scaled for the activation (Xavier for tanh)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
for p in model.parameters():
    nn.init.zeros_(p)
opt = torch.optim.SGD(model.parameters(), lr=0.5)

for step in range(100):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f}")
w = model[2].weight
print("rows of layer 2 identical:", bool((w == w[0]).all()))
