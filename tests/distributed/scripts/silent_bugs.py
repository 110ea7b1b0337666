"""Silent distributed bugs and their correct twins, for torchrun (2 processes, gloo, CPU).

``--bugs`` lists the programs to run, one after the other in the same process group
(each with its own model, optimizer and ``gv.watch``, its report saved as
``<--out>/<bug>.json``):

- ``clip_local``: FSDP2; the clip norm is computed on each rank's local shard
  (``get_total_norm`` of ``p.grad.to_local()``) and handed to ``clip_grads_with_norm_``:
  every rank clips with its own shard's norm, not the model's.
- ``clip_ok``: the same, with ``clip_grad_norm_`` on the DTensor gradients (the global norm).
- ``replica_drift``: DDP; after each step rank 1 scales a LayerNorm weight in place,
  outside the optimizer: the replicas stop being identical.
- ``replica_ok``: the same change on every rank: the replicas stay identical.
- ``opt_before_shard``: FSDP2; the optimizer is built before ``fully_shard``, from the
  plain tensors ``fully_shard`` then replaces with DTensors: nothing it steps is trained.
- ``opt_after_shard``: the optimizer built after ``fully_shard``.
- ``pipeline``: not supported, must not break: a 2-stage pipeline
  (``torch.distributed.pipelining``, GPipe, 2 micro-batches), each rank watching its own
  stage; ranks record different modules, so merging stops at the first step and each
  rank records its own stage (rank 1 saves its own with ``diagnosis().save``).
  ``pipeline_plain``: the same, unwatched (the numbers must be identical).
- ``expert_skipped``: DDP (find_unused_parameters) with an "expert" branch that rank 1
  skips at step 2 only (no token routed to it): at that scheduled step the ranks hold
  different statistics; merging must stop there, not abort the run.

Each program knows gradvitals only through ``gv.watch``. Rank 0 prints one JSON line per
program: its ranks' losses and the clip norms they used.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import digits, global_batch, rank_slice  # noqa: E402

BUGS = ["clip_local", "clip_ok", "replica_drift", "replica_ok", "opt_before_shard", "opt_after_shard",
        "pipeline", "pipeline_plain", "expert_skipped"]
p = argparse.ArgumentParser()
p.add_argument("--bugs", default=",".join(BUGS))
p.add_argument("--steps", type=int, default=6)
p.add_argument("--max-norm", type=float, default=1.0)
p.add_argument("--out", required=True, help="folder for the reports")
a = p.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
X, y = digits()


def shard(m: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def pipeline(watched: bool) -> dict:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    import gradvitals as gv

    torch.manual_seed(0)
    full = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    stage_module = [full[:2], full[2:]][rank]
    schedule = ScheduleGPipe(PipelineStage(stage_module, stage_index=rank, num_stages=world,
                                           device=torch.device("cpu")),
                             n_microbatches=2, loss_fn=nn.functional.cross_entropy)
    opt = torch.optim.SGD(stage_module.parameters(), lr=0.1)
    watch = gv.watch(stage_module, opt, every=2) if watched else None
    losses = []
    for step in range(a.steps):
        xb, yb = global_batch(X, y, step)
        opt.zero_grad()
        if rank == 0:
            schedule.step(xb)
        else:
            micro: list = []
            schedule.step(target=yb, losses=micro)
            losses.append(float(sum(m.item() for m in micro) / len(micro)))
        opt.step()
    digest = float(sum(p.detach().double().sum() for p in stage_module.parameters()))
    if watch is not None:
        watch.diagnosis().save(os.path.join(a.out, f"pipeline_stage{rank}.json"))  # each stage its own
        watch.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"losses": losses, "digest": digest})
    return {"bug": "pipeline" if watched else "pipeline_plain", "ranks": gathered}


class _Routed(nn.Module):
    """An MLP with an "expert" branch run unless the batch routes nothing to it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.expert, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.route = True

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if self.route:
            h = h + torch.relu(self.expert(h))
        return self.out(h)


def expert_skipped() -> dict:
    import gradvitals as gv

    torch.manual_seed(0)
    model = _Routed()
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    watch = gv.watch(net, opt, every=2)
    losses = []
    for step in range(a.steps):
        model.route = not (rank == 1 and step == 2)
        xb, yb = global_batch(X, y, step)
        xb, yb = rank_slice(xb, rank, world), rank_slice(yb, rank, world)
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    watch.save(os.path.join(a.out, "expert_skipped.json"))
    watch.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"losses": losses})
    return {"bug": "expert_skipped", "ranks": gathered}


def program(bug: str) -> dict:
    if bug.startswith("pipeline"):
        return pipeline(watched=bug == "pipeline")
    if bug == "expert_skipped":
        return expert_skipped()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 33), nn.LayerNorm(33), nn.ReLU(), nn.Linear(33, 10))
    if bug.startswith("replica"):
        net = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
    elif bug == "opt_before_shard":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        net = shard(model)
    else:
        net = shard(model)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    import gradvitals as gv

    watch = gv.watch(net, opt, every=2)  # scheduled probes (weights) at steps 0, 2, 4
    out = {"bug": bug, "losses": [], "clip_norms": [], "true_norms": []}
    for step in range(a.steps):
        xb, yb = global_batch(X, y, step)
        xb, yb = rank_slice(xb, rank, world), rank_slice(yb, rank, world)
        loss = nn.functional.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        if bug == "clip_local":
            params = [q for q in net.parameters() if q.grad is not None]
            norm = torch.nn.utils.get_total_norm([q.grad.to_local() for q in params])
            out["true_norms"].append(torch.nn.utils.get_total_norm([q.grad for q in params]).full_tensor().item())
            torch.nn.utils.clip_grads_with_norm_(params, a.max_norm, norm)
            out["clip_norms"].append(norm.item())
        elif bug == "clip_ok":
            total = torch.nn.utils.clip_grad_norm_(net.parameters(), a.max_norm)
            out["clip_norms"].append(total.full_tensor().item())
        opt.step()
        if bug.startswith("replica"):
            with torch.no_grad():  # an in-place change outside the optimizer
                if bug == "replica_ok" or rank == 1:
                    model[1].weight.mul_(1.01)
        out["losses"].append(loss.item())
    watch.save(os.path.join(a.out, f"{bug}.json"))
    watch.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return {"bug": bug, "ranks": gathered}


for bug in a.bugs.split(","):
    result = program(bug)
    if rank == 0:
        print(json.dumps(result), flush=True)
dist.barrier()
dist.destroy_process_group()
