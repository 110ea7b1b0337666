# expect: symmetric_weights
# forbid: nonfinite, dead_relu
"""Hidden weights all set to the same constant (0.05) with zero biases: unlike
all-zero init, gradients flow, but every unit of a layer gets the same gradient,
so the units move in lockstep and stay copies of each other. The network trains a
little (its output layer differs per class) yet each hidden layer is worth one
neuron. The fix: random init scaled for the activation."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
for lin in (model[0], model[2]):
    nn.init.constant_(lin.weight, 0.05)
    nn.init.zeros_(lin.bias)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(100):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f}")
w0, w2 = model[0].weight, model[2].weight
print("units of layer 0 identical:", bool(torch.allclose(w0, w0[0].expand_as(w0))))
print("inputs of layer 2 identical:", bool(torch.allclose(w2, w2[:, :1].expand_as(w2))))
