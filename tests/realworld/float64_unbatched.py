"""Looks bad, is normal: a float64 model (scientific computing) trained online on
unbatched 1-D samples (`model(x)` with x of shape (64,), no batch dimension), and a
2-layer fused GRU forecaster whose gates saturate inside the fused kernel."""
import math

import torch
import torch.nn as nn
from digits_data import load_digits

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float64)
y = torch.tensor(y)
mlp = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
opt = torch.optim.SGD(mlp.parameters(), lr=0.02)
for step in range(150):
    i = step % len(X)
    loss = nn.functional.cross_entropy(mlp(X[i]), y[i])  # one unbatched sample per step
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(f"mlp step {step} loss {loss.item():.6f}")


class Forecaster(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(1, 32, num_layers=2, batch_first=True)
        self.out = nn.Linear(32, 1)

    def forward(self, x):
        h, _ = self.gru(x)
        return self.out(h[:, -1])


t = torch.arange(0, 400, dtype=torch.float32) * 0.1
series = torch.sin(t) + 0.5 * torch.sin(3.1 * t)
windows = series.unfold(0, 21, 1)
net = Forecaster()
opt2 = torch.optim.Adam(net.parameters(), lr=5e-3)
for step in range(60):
    idx = torch.randint(0, len(windows), (32,))
    w = windows[idx]
    loss = nn.functional.mse_loss(net(w[:, :20, None]), w[:, 20:])
    opt2.zero_grad()
    loss.backward()
    opt2.step()
    if step % 20 == 0:
        print(f"gru step {step} loss {loss.item():.6f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in mlp.state_dict().values())),
      repr(sum(float(v.double().sum()) for v in net.state_dict().values())))
