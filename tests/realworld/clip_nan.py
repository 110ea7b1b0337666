"""Pattern 7: `clip_grad_norm_` spreads one NaN to every gradient. The features are
L2-normalised by hand (`h / (sqrt(sum h^2) + 1e-6)`); at `--nan-at` a batch holds a
blank image, whose (bias-free) features are exactly zero: the forward is finite,
but the backward of sqrt at 0 is inf * 0 = NaN in `encoder.2` and below, while the
head's gradient is still finite. The
clip's total norm is then NaN and multiplies *every* gradient by NaN: only the
gradients before clipping show where it began. `--max-norm 0` is the other
trap: every gradient is silently scaled to zero and nothing ever trains."""
import argparse

import torch
import torch.nn as nn
from digits_data import load_digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--nan-at", type=int, default=-1)
ap.add_argument("--max-norm", type=float, default=1.0)
args = ap.parse_args()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.encoder(x)
        h = 4.0 * h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-6)
        return self.head(h)


torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)
model = Net()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(args.steps):
    idx = torch.randint(0, len(X), (32,))
    xb = X[idx].clone()
    if step == args.nan_at:
        xb[0] = 0.0  # a blank image
    loss = nn.functional.cross_entropy(model(xb), y[idx])
    opt.zero_grad()
    loss.backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=args.max_norm)
    opt.step()
    if step % 10 == 0 or step == args.nan_at:
        print(f"step {step} loss {loss.item():.5f} grad norm {total.item():.4g}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
