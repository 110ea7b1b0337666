"""Tensor parallel, sequence parallel, FSDP2 x TP and HSDP, for torchrun with 4
processes (gloo, CPU): dist_common.TPTransformer trained 3 steps with SGD under
``gv.watch`` by each program below, one after the other in the same process group,
each report saved as ``<--out>/<program>.json``. The one-process run on the same
global batches is the oracle (tests/distributed/test_tp_mesh.py).

- ``tp``: a 1-D mesh of 4: the embedding row-parallel, q/k/v and fc1 column-parallel,
  o and fc2 row-parallel, the head column-parallel (its output gathered); the
  LayerNorms plain (every rank holds them whole). Every rank is fed the global batch.
- ``tp_sp``: as ``tp``, with ``SequenceParallel`` LayerNorms: the residual stream is
  split along the sequence between the blocks (their weights' gradients are partial
  sums on each rank), and ``clip_grad_norm_`` at ``SP_CLIP`` (it scales those partial
  sums in place before the optimizer step).
- ``fsdp_tp``: a 2 x 2 mesh ("dp", "tp"): the ``tp`` plan on "tp", ``fully_shard`` on
  "dp" (parameters sharded on both dimensions, nested: ``_StridedShard``); each "dp"
  rank is fed half the global batch.
- ``fsdp_tp_sp``: ``fsdp_tp`` with the ``tp_sp`` plan (no clipping): a LayerNorm's gradient
  is a partial sum over "tp" of a shard over "dp".
- ``hsdp``: ``fully_shard`` on a 2 x 2 mesh ("replicate", "shard"); each rank is fed a
  quarter of the global batch.
- ``tp_nan``: ``tp``, where a forward hook makes rank 1's fc1 output NaN from step 1 on.
- ``fsdp_tp_nan``: ``fsdp_tp`` with the same hook on rank 1 (its "tp" group: ranks 0 and 1;
  ranks 2 and 3, the other "dp" half, meet the NaN in their gradients, through FSDP's
  reduce-scatter).
- ``tp_batched``, ``tp_nan_batched``: ``tp`` and ``tp_nan`` (NaN from step
  ``BATCHED_NAN_STEP``) on the default schedule for ``BATCHED_STEPS`` steps with ``GRADVITALS_DIST_BATCH=4`` (ordinary steps merged 4 at a
  time: two batches fit the run); the report saved after
  ``close()``.

Rank 0 prints one JSON line per program: its ranks' losses.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_common import SP_CLIP, TPTransformer, rank_slice, transformer_batch  # noqa: E402

PROGRAMS = ["tp", "tp_sp", "fsdp_tp", "fsdp_tp_sp", "hsdp", "tp_nan", "fsdp_tp_nan", "tp_batched",
            "tp_nan_batched"]
STEPS = 3
BATCHED_STEPS = 10
BATCHED_NAN_STEP = 3  # an ordinary step (0 is scheduled, 1 carries its update ratios)
NAN_STEP = 1
p = argparse.ArgumentParser()
p.add_argument("--programs", default=",".join(PROGRAMS))
p.add_argument("--out", required=True, help="folder for the reports")
a = p.parse_args()

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402
from torch.distributed.tensor.parallel import (  # noqa: E402
    ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module)

import gradvitals as gv  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def tp_plan(sequence_parallel: bool) -> dict:
    if not sequence_parallel:
        return {"embed": RowwiseParallel(input_layouts=Replicate()),
                "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
                "attn.o": RowwiseParallel(), "fc1": ColwiseParallel(), "fc2": RowwiseParallel(),
                "head": ColwiseParallel(output_layouts=Replicate())}
    seq = Shard(1)
    return {"embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
            "norm1": SequenceParallel(), "norm2": SequenceParallel(), "norm3": SequenceParallel(),
            "attn.q": ColwiseParallel(input_layouts=seq), "attn.k": ColwiseParallel(input_layouts=seq),
            "attn.v": ColwiseParallel(input_layouts=seq), "attn.o": RowwiseParallel(output_layouts=seq),
            "fc1": ColwiseParallel(input_layouts=seq), "fc2": RowwiseParallel(output_layouts=seq),
            "head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate())}


def program(name: str) -> dict:
    torch.manual_seed(0)
    model = TPTransformer()
    part = (0, 1)  # (this rank's slice, slices) of the global batch
    batched = name.endswith("_batched")
    if batched:
        name = name[:-len("_batched")]
    if name in ("tp", "tp_sp", "tp_nan"):
        parallelize_module(model, init_device_mesh("cpu", (world,)), tp_plan(name == "tp_sp"))
    elif name in ("fsdp_tp", "fsdp_tp_sp", "fsdp_tp_nan"):
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], tp_plan(name == "fsdp_tp_sp"))
        fully_shard(model.attn, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        part = (mesh.get_local_rank("dp"), 2)
    elif name == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model.attn, mesh=mesh)
        fully_shard(model, mesh=mesh)
        part = (rank, world)
    at = {"step": 0}
    nan_step = BATCHED_NAN_STEP if batched else NAN_STEP
    if name in ("tp_nan", "fsdp_tp_nan") and rank == 1:  # the log of a negative number: NaN from finite values
        model.fc1.register_forward_hook(
            lambda m, args, out: (out - out.detach().abs().amax() - 1).log() if at["step"] >= nan_step else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if batched:
        os.environ["GRADVITALS_DIST_BATCH"] = "4"
    watch = gv.watch(model, opt, every=25 if batched else 1)
    losses = []
    for step in range(BATCHED_STEPS if batched else STEPS):
        at["step"] = step
        x, t = (rank_slice(v, *part) for v in transformer_batch(step))
        loss = nn.functional.cross_entropy(model(x).reshape(-1, TPTransformer.VOCAB), t.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if name == "tp_sp":
            torch.nn.utils.clip_grad_norm_(model.parameters(), SP_CLIP)
        opt.step()
        losses.append(loss.item())
    if batched:
        name += "_batched"
        watch.close()  # lands the last batch: the report saved after it holds every step merged
        os.environ.pop("GRADVITALS_DIST_BATCH")
    watch.save(os.path.join(a.out, f"{name}.json"))
    watch.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"losses": losses})
    return {"program": name, "ranks": gathered}


for name in a.programs.split(","):
    result = program(name)
    if rank == 0:
        print(json.dumps(result), flush=True)
# torch 2.13 + gloo: tearing the group down with FSDP state around aborts now and then
# (see fsdp_replay.py). Meet, then leave without running those destructors.
sys.stdout.flush()
dist.barrier()
os._exit(0)
