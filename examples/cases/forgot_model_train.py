# expect: eval_mode_training
# forbid: nonfinite, no_gradient, grad_not_zeroed
"""A mid-epoch validation switches the model to eval mode and the loop never switches
it back (`model.train()` only at the top of the epoch): from then on until the next
epoch, training forwards run in eval mode. BatchNorm normalises with running
statistics it no longer updates and dropout is off, so half of every epoch trains a
different network than the one the author designed. The fix: `model.train()` right
after the validation block."""
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
Xtr, ytr, Xva, yva = X[:1400], y[:1400], X[1400:], y[1400:]

model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3),
                      nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

for epoch in range(6):
    model.train()
    for b in range(0, len(Xtr), 64):
        loss = nn.functional.cross_entropy(model(Xtr[b:b + 64]), ytr[b:b + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if b == 640:  # validation in the middle of the epoch...
            model.eval()
            with torch.no_grad():
                acc = (model(Xva).argmax(1) == yva).float().mean().item()
            # ...and no model.train() here
    print(f"epoch {epoch} loss {loss.item():.4f} val acc {acc:.3f}")
