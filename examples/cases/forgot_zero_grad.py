# expect: grad_not_zeroed
# forbid: no_gradient, not_updated
"""The training loop never clears the gradients: `optimizer.zero_grad()` is missing,
so every `loss.backward()` adds the new gradient to all the earlier ones and each
SGD step follows their running sum: the steps grow with the run and the loss stops
improving, then climbs. The fix: `optimizer.zero_grad()` once per step, before
`loss.backward()` (or right after `optimizer.step()`)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    loss.backward()  # the missing optimizer.zero_grad() belongs before this line
    optimizer.step()
    if step % 25 == 0:
        print(f"step {step} loss {loss.item():.4f}")
