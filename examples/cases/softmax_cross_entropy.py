# expect: loss_on_probabilities
# forbid: nonfinite, no_gradient, grad_not_zeroed
"""The classifier ends in `nn.Softmax` and is trained with `nn.CrossEntropyLoss`, which
applies log_softmax itself: the model trains through two softmaxes. The loss cannot go
below log(1 + 9/e) = 1.46 with 10 classes, and its gradient shrinks as the outputs
saturate, so training crawls. The fix: return logits (drop the final softmax)."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10), nn.Softmax(dim=1))
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for step in range(200):
    idx = torch.randint(0, len(X), (64,))
    loss = criterion(model(X[idx]), y[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
