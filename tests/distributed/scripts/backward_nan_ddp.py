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
from dist_common import digits, global_batch, rank_slice


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
X, y = digits()
net = nn.Sequential(nn.Linear(64, 64), GuardedSqrt(), nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 10))
with torch.no_grad():  # unit 0 of the first Linear: positive on the digits' pixels (all >= 0)
    net[0].weight[0].fill_(0.01)
    net[0].bias[0] = 0.1
model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
losses = []
for step in range(args.steps):
    xb, yb = global_batch(X, y, step)
    xb, yb = rank_slice(xb, rank, world).clone(), rank_slice(yb, rank, world)
    if step == args.nan_step and rank == args.nan_rank:
        xb[0] = -50.0  # unit 0 of the first Linear goes below the guard on this row
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
if rank == 0:
    print("losses", losses)
dist.destroy_process_group()
