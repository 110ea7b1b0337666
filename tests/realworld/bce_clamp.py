"""Looks bad, is normal: `nn.BCELoss` on probabilities that start pinned at exactly
0 or 1 for some samples (an over-confident pretrained head, float32 sigmoid
rounding to 1.0). BCELoss clamps log(0) to -100, so those samples contribute a
constant 100 to the loss instead of Inf; training pulls them back."""
import torch
import torch.nn as nn
from digits_data import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
target = torch.tensor(y % 2, dtype=torch.float32)  # odd vs even
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
with torch.no_grad():
    model[2].weight.mul_(400.0)  # over-confident start: some outputs are exactly 0.0 or 1.0
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
crit = nn.BCELoss()
for step in range(100):
    idx = torch.randint(0, len(X), (128,))
    p = model(X[idx]).squeeze(1)
    loss = crit(p, target[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0:
        pinned = ((p == 0) | (p == 1)).float().mean().item()
        print(f"step {step} loss {loss.item():.4f} pinned {pinned:.3f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
