"""A NaN born in the backward pass on one rank, under DDP, as real code makes it:
``torch.where(x >= 0, torch.sqrt(x + 1), 0)`` guards the forward (the masked rows'
NaN is never selected), but the backward multiplies the mask's zero by sqrt's NaN
gradient. At ``--nan-step`` one row of rank ``--nan-rank``'s batch goes below the
guard: the forward and the loss stay finite on every rank, the first layer's gradient
is NaN on that rank, and DDP's all-reduce spreads it to every rank. ``--safe``: the
same program with the where's dropped input made valid: no NaN.
Knows nothing of gradvitals."""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from sklearn.datasets import load_digits


class GuardedSqrt(nn.Module):
    """Adds a feature sqrt(x0 + 1) where x0 >= 0, else 0 (``--safe``: sqrt's input is
    made valid where the where drops it, so its derivative there is finite)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x[:, :1]
        inner = torch.where(x0 >= 0, x0 + 1, torch.ones_like(x0)) if args.safe else x0 + 1
        return torch.cat([x, torch.where(x0 >= 0, torch.sqrt(inner), torch.zeros_like(x0))], 1)


ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--nan-step", type=int, default=3)
ap.add_argument("--nan-rank", type=int, default=1)
ap.add_argument("--safe", action="store_true")
args = ap.parse_args()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
net = nn.Sequential(nn.Linear(64, 64), GuardedSqrt(), nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 10))
with torch.no_grad():  # unit 0 of the first Linear: positive on the digits' pixels (all >= 0)
    net[0].weight[0].fill_(0.01)
    net[0].bias[0] = 0.1
model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
g = torch.Generator().manual_seed(1)
n = 64 // world
losses = []
for step in range(args.steps):
    idx = torch.randint(0, len(X), (64,), generator=g)[rank * n:(rank + 1) * n]
    xb = X[idx].clone()
    if step == args.nan_step and rank == args.nan_rank:
        xb[0] = -50.0  # unit 0 of the first Linear goes below the guard on this row
    loss = nn.functional.cross_entropy(model(xb), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
if rank == 0:
    print("losses", losses)
dist.destroy_process_group()
