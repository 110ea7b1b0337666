"""DDP with torch's ZeroRedundancyOptimizer (ZeRO-1: each rank keeps the Adam state of
its own part of the parameters, steps that part, and broadcasts it), as scripts write
it. ZeroRedundancyOptimizer builds an inner Adam over this rank's part and calls its
step inside its own. ``--plain``: the same run with a plain Adam (the same numbers).
Knows nothing of gradvitals; rank 0 prints the last loss."""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from dist_common import digits, global_batch, rank_slice
from torch.distributed.optim import ZeroRedundancyOptimizer

ap = argparse.ArgumentParser()
ap.add_argument("--plain", action="store_true")
ap.add_argument("--steps", type=int, default=30)
args = ap.parse_args()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
X, y = digits()
net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
model = nn.parallel.DistributedDataParallel(net)
if args.plain:
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
else:
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=1e-3)
for step in range(args.steps):
    xb, yb = global_batch(X, y, step)
    loss = nn.functional.cross_entropy(model(rank_slice(xb, rank, world)), rank_slice(yb, rank, world))
    opt.zero_grad()
    loss.backward()
    opt.step()
if rank == 0:
    print("loss", loss.item())
dist.destroy_process_group()
