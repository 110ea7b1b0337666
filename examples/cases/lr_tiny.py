# expect: update_ratio_low, loss_plateau
# forbid: nonfinite, vanishing_gradients
"""SGD at lr=1e-7 (a scientific-notation typo for 1e-2). Gradients are healthy,
but each step changes the weights by ~1e-8 of their size, so after hundreds of
steps the loss has not moved. The chapter's yardstick: per-step |dW|/|W| near
1e-3; raise the learning rate."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=1e-7, momentum=0.9)

for step in range(200):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
