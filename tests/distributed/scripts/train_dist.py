"""A plain distributed training script (DDP or FSDP2 on gloo/CPU), for torchrun.
``--strategy local``: every rank trains its own plain model (no gradient is shared).

Each rank trains on its slice of the same global batch. ``--watch PATH`` uses
``gv.watch`` inside the script; otherwise the script knows nothing of gradvitals.
"""
import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import digits, global_batch, make_model, rank_slice  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--strategy", choices=["ddp", "fsdp", "local"], default="ddp")
p.add_argument("--steps", type=int, default=4)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--nan-rank", type=int, default=-1)
p.add_argument("--nan-step", type=int, default=-1)
p.add_argument("--corrupt", choices=["nan", "huge", "grad"], default="nan",
               help="nan/huge: the rank's batch; grad: one element of the rank's own gradient (shard), "
                    "after the backward: only that rank sees it")
p.add_argument("--raise-rank", type=int, default=-1)
p.add_argument("--raise-step", type=int, default=-1)
p.add_argument("--raise-where", choices=["after_step", "before_step"], default="after_step",
               help="before_step: the other ranks are already in the optimizer step (gradvitals' merge)")
p.add_argument("--watch", default=None, help="use gv.watch and save its report here")
p.add_argument("--every", type=int, default=1)
p.add_argument("--watch-ranks", default="all", choices=["all", "0"], help="which ranks call gv.watch")
p.add_argument("--clip", type=float, default=None, help="clip_grad_norm_ to this max_norm")
p.add_argument("--peek-step", type=int, default=-1, help="rank 0 alone looks at watch.report() after this step")
p.add_argument("--peek-out", default=None, help="and writes what it saw here (JSON)")
p.add_argument("--closed-out", default=None, help="also save the report after watch.close() here")
p.add_argument("--eval-rank0", type=int, default=0,
               help="every this many steps rank 0 alone evaluates the inner model (eval(), no_grad) on held-out "
                    "rows, as scripts that evaluate on the main process do")
p.add_argument("--checkpoint", action="store_true",
               help="activation checkpointing of the middle Linear (torch.utils.checkpoint, non-reentrant): "
                    "its forward runs again in the backward")
p.add_argument("--accum", type=int, default=1,
               help="micro-batches per optimizer step (gradient accumulation): the global batch in this many "
                    "chunks, each rank its slice of each, loss / accum; gradients synchronised on the last only "
                    "(DDP no_sync, FSDP2 set_requires_gradient_sync)")
a = p.parse_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = make_model()
if a.checkpoint:
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    model[2].forward = partial(checkpoint, model[2].forward, use_reentrant=False)
if a.strategy == "ddp":
    net = nn.parallel.DistributedDataParallel(model)
elif a.strategy == "local":
    net = model
else:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    net = fully_shard(model, mesh=mesh)
opt = torch.optim.SGD(net.parameters(), lr=a.lr)
watch = None
if a.watch and (a.watch_ranks == "all" or rank == 0):
    import gradvitals as gv

    watch = gv.watch(net, opt, every=a.every)
X, y = digits()
losses = []
for step in range(a.steps):
    xb, yb = global_batch(X, y, step)
    xb, yb = rank_slice(xb, rank, world).clone(), rank_slice(yb, rank, world)
    if step == a.nan_step and rank == a.nan_rank and a.corrupt != "grad":  # one rank's data is corrupt
        if a.corrupt == "nan":
            xb[0, 5] = float("nan")
        else:  # finite but huge: the first Linear overflows to inf
            xb[0, :] = 3e38
    opt.zero_grad()
    if a.accum == 1:
        loss = nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
    else:  # as accumulation recipes write it: no gradient sync until the last micro-batch
        loss = torch.zeros(())
        n = xb.shape[0] // a.accum
        for k in range(a.accum):
            last = k == a.accum - 1
            micro = nn.functional.cross_entropy(net(xb[k * n:(k + 1) * n]), yb[k * n:(k + 1) * n]) / a.accum
            if a.strategy == "fsdp":
                net.set_requires_gradient_sync(last)
            with net.no_sync() if a.strategy == "ddp" and not last else contextlib.nullcontext():
                micro.backward()
            loss = loss + micro.detach()
    if step == a.nan_step and rank == a.nan_rank and a.corrupt == "grad":
        g = next(iter(net.parameters())).grad
        with torch.no_grad():
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("nan")
    if a.clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), a.clip)
    if step == a.raise_step and rank == a.raise_rank and a.raise_where == "before_step":
        raise RuntimeError(f"rank {rank} fails at step {step}")
    opt.step()
    losses.append(loss.item())
    if a.eval_rank0 and rank == 0 and step % a.eval_rank0 == 0:
        inner = net.module if a.strategy == "ddp" else net
        inner.eval()
        with torch.no_grad():
            val = nn.functional.cross_entropy(inner(X[-256:]), y[-256:]).item()
        inner.train()
    if step == a.peek_step and rank == 0 and watch is not None:
        seen = watch.report()  # a mid-run look, on rank 0 only
        if a.peek_out:
            with open(a.peek_out, "w") as f:
                json.dump(seen, f)
    if step == a.raise_step and rank == a.raise_rank and a.raise_where == "after_step":
        raise RuntimeError(f"rank {rank} fails at step {step}")
if watch is not None:
    watch.save(a.watch)
    watch.close()
    if a.closed_out:
        watch.save(a.closed_out)
# A group the user makes after gradvitals made its own: torch numbers groups in
# creation order, so this hangs if gradvitals desynchronised that numbering.
users_group = dist.new_group(timeout=__import__("datetime").timedelta(seconds=30))
ones = torch.ones(1)
dist.all_reduce(ones, group=users_group)
if rank == 0:
    print(json.dumps({"losses": losses, "world": world, "users_group_sum": ones.item()}))
# torch 2.13 + gloo: a rank that tears its group down while its peer is still
# finishing aborts now and then ("terminate called without an active exception"),
# with or without gradvitals; meeting at a barrier first avoids it.
del net, opt
dist.barrier()
dist.destroy_process_group()
