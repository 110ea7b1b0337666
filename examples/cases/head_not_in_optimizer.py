# expect: not_updated
# forbid: nonfinite, no_gradient
"""The optimizer is built from `model.encoder.parameters()` only (left over from a
fine-tuning script); the classifier head gets gradients every step but is never
updated, so it stays at its random init and caps the accuracy. The fix: pass
`model.parameters()` (or every group you mean) to the optimizer."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(x))


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = Classifier()
opt = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)

for step in range(150):
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"step {step} loss {loss.item():.4f}")
