"""FSDP2 under torchrun (gloo/CPU): a NaN-origin replay made by every rank between the
backward and the optimizer step must leave the run's numbers exactly as they were.

The root keeps one Linear of its own (FSDP2 does not reshard the root's parameters after
a forward). ``--replay-step N`` replays the forward there, as gradvitals does when it
meets a NaN; ``--no-reshard`` skips putting the shards back afterwards (the version
without it: shows what the check catches).
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import digits, global_batch, make_model, rank_slice  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=4)
p.add_argument("--replay-step", type=int, default=-1)
p.add_argument("--no-reshard", action="store_true")
a = p.parse_args()

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

import gradvitals.probes.nonfinite as nonfinite  # noqa: E402

if a.no_reshard:
    nonfinite._reshard = lambda model: None

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = make_model()
mesh = init_device_mesh("cpu", (world,))
fully_shard(model[0], mesh=mesh)
fully_shard(model[2], mesh=mesh)
net = fully_shard(model, mesh=mesh)  # model[4] stays the root's own
opt = torch.optim.SGD(net.parameters(), lr=0.1)
names = {id(m): (n or "(root)") for n, m in net.named_modules()}
X, y = digits()
losses, replays = [], []
for step in range(a.steps):
    xb, yb = global_batch(X, y, step)
    xb, yb = rank_slice(xb, rank, world), rank_slice(yb, rank, world)
    loss = nn.functional.cross_entropy(net(xb), yb)
    opt.zero_grad()
    loss.backward()
    if step == a.replay_step:
        replays.append(nonfinite.replay_forward(net, names, (xb,), {}, collective=True))
        # The root's own Linear holds its shards again (DTensors), not the gathered copy.
        replays.append(all(hasattr(q, "placements") for q in net[4].parameters()))
    opt.step()
    losses.append(loss.item())
params = [p.full_tensor().double().sum().item() for p in net.parameters()]
if rank == 0:
    print(json.dumps({"losses": losses, "params": params, "replays": replays}))
# torch 2.13 + gloo: tearing the group down (or letting the interpreter do it at exit)
# with FSDP state around aborts now and then ("terminate called without an active
# exception"). Meet, then leave without running those destructors.
sys.stdout.flush()
dist.barrier()
os._exit(0)
