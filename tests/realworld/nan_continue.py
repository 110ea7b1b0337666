"""Pattern 10: a script that keeps training after its loss went NaN and exits 0
(no check, no early stop). A LayerNorm-free attention block divides by a learned
temperature that crosses zero at `--nan-at`: `temp` produces the first Inf."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--nan-at", type=int, default=15)
args = ap.parse_args()


class Temperature(nn.Module):
    """Divides logits by a learned temperature (a calibration layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x / self.t


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), Temperature())
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for step in range(args.steps):
    if step == args.nan_at:
        with torch.no_grad():
            model[3].t.zero_()  # e.g. a bad checkpoint surgery / an annealing schedule hitting 0
    idx = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0:
        print(f"step {step} loss {loss.item():.5f}")
print("done")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
