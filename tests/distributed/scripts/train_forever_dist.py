"""DDP on gloo/CPU that trains until killed (for torchrun). Each rank appends
"<rank> <pid> <steps done>" to --progress after every optimizer step. Rank 1's batch
is scaled by --scale, so its gradients differ from rank 0's: a merged record is not
rank 0's own."""
import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--progress", required=True)
p.add_argument("--scale", type=float, default=3.0)
p.add_argument("--sleep", type=float, default=0.01)
a = p.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
net = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(net.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(rank)
x = torch.randn(32, 16, generator=g) * (a.scale if rank == 1 else 1.0)
y = torch.randint(0, 4, (32,), generator=g)
fd = os.open(a.progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
step = 0
while True:
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    step += 1
    os.write(fd, f"{rank} {os.getpid()} {step}\n".encode())
    time.sleep(a.sleep)
