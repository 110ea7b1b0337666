"""The torch.amp recipe under DDP, as scripts write it: float16 autocast on the CPU, a
GradScaler whose first scale (2^24) overflows the first backward passes, so the scaler
skips those steps on every rank (the gradients are all-reduced first): expected, not a NaN.
Knows nothing of gradvitals; rank 0 prints how many steps the scaler skipped."""
import argparse

import torch
import torch.distributed as dist
import torch.nn as nn
from dist_common import digits, global_batch, rank_slice

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--init-scale", type=float, default=2.0 ** 24)
args = ap.parse_args()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
X, y = digits()
net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
model = nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scaler = torch.amp.GradScaler("cpu", init_scale=args.init_scale)
skipped = 0
for it in range(args.steps):
    xb, yb = global_batch(X, y, it)
    xb, yb = rank_slice(xb, rank, world), rank_slice(yb, rank, world)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(xb).float(), yb)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    skipped += scaler.get_scale() < scale
if rank == 0:
    print("skipped", skipped)
dist.destroy_process_group()
