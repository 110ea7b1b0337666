# expect: saturated_activations
# forbid: nonfinite, dead_relu
"""Raw 0-255 pixel intensities fed straight into a sigmoid MLP (the forgotten
`/ 255`). Pre-activations have a standard deviation in the tens, so almost every
sigmoid output is pinned at 0 or 1 where its derivative is ~0: the first layer
barely learns. The fix: normalise the inputs (zero mean, unit variance)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X * 16.0, dtype=torch.float32)  # 0..16 -> 0..256, as raw 8-bit pixels
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.Sigmoid(), nn.Linear(128, 64), nn.Sigmoid(), nn.Linear(64, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
