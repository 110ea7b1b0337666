"""What gradvitals costs a multi-process run: the wall time of a step under torchrun, watched
against plain, side by side in the same processes.

    python benchmarks/distributed.py                          # 4 ranks; DDP, FSDP2 and TP
    python benchmarks/distributed.py --ranks 2 --strategies ddp --rounds 3 --warmup 100
    python benchmarks/distributed.py --out benchmarks/results/cpu2-dist4.json

Started without torchrun, the script launches itself under ``torch.distributed.run
--nproc-per-node N`` (gloo, CPU, one torch thread per rank) and rank 0 prints the table.
Per strategy every rank builds ONE model and optimizer (as ``overhead.py`` does: separate
copies differ on their own by more than the effect measured) and trains it in blocks of
``--steps`` steps, alternately unwatched and under the default ``gv.watch`` (attached only
inside its blocks with ``pause``/``resume``; warmed up for ``--warmup`` steps first, so that
it is measured in the steady state of a long run: scheduled probes every 100 steps). Each
round is ``P G P``; the ratio is the watched block's time over the mean of the two plain
blocks around it, and the result is the median over rounds with its inter-quartile range.
A block's time is rank 0's wall time between two barriers, so it is the slowest rank's.

Strategies (each rank sees its slice of the same global batch of ``--batch`` rows):

- ``ddp``: a 12-layer MLP, width 256, in ``DistributedDataParallel``, Adam;
- ``fsdp2``: the same MLP with ``fully_shard`` on every Linear and the root, Adam;
- ``tp``: an embedding, 4 residual MLP blocks with fc1 column- and fc2 row-parallel
  (``parallelize_module``) and a head, every rank on the whole batch, AdamW.

No step calls ``loss.item()``: gradvitals' one host sync per step is charged to it in full.

What a recorded step costs beyond one process's watch is the merge: one small all-reduce,
started at the step's flush and waited for at the next one (at once on scheduled steps); one per
8 ordinary steps (a batch). Its CPU cost per rank is fixed per step, so the ratio
falls as the step grows (``--batch``) and rises when ranks outnumber cores.
``GRADVITALS_DIST_MERGE=0`` in the environment measures the same watch without the merge (each
rank records alone): the difference is the merge's; ``GRADVITALS_DIST_BATCH=1`` without batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("ddp", "fsdp2", "tp")
SEED = 0
BATCH_POOL = 8
VOCAB = 512
LEAD_IN = 2  # untimed steps at the start of a block: the previous block's hooks come off


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4, help="processes (torchrun --nproc-per-node); default 4")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--rounds", type=int, default=5, help="P G P rounds per strategy (default 5)")
    p.add_argument("--steps", type=int, default=100, help="steps per block (default 100: one scheduled step)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed watched steps first (default 1000: past the early schedule; "
                        "one block with --steady-from-start)")
    p.add_argument("--batch", type=int, default=128, help="global batch rows (default 128)")
    p.add_argument("--steady-from-start", action="store_true",
                   help="watch with late_after=0: the default's steady schedule (scheduled probes every 100 "
                        "steps, what a run past step 1000 has) from the first step; the warm-up defaults to one "
                        "block (--steps): a run's first steps do once-per-run work (layout checks, first merges)")
    p.add_argument("--out", help="write the results as JSON here (rank 0)")
    a = p.parse_args(argv)
    bad = [s for s in a.strategies.split(",") if s not in STRATEGIES]
    if bad:
        p.error(f"--strategies: unknown {', '.join(bad)} (choose from {', '.join(STRATEGIES)})")
    for name in ("ranks", "rounds", "steps", "batch"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.warmup is None:
        a.warmup = a.steps if a.steady_from_start else 1000
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if a.batch % a.ranks:
        p.error(f"--batch {a.batch} must be a multiple of --ranks {a.ranks} (each rank takes a slice)")
    return a


def _launch(a: argparse.Namespace) -> int:
    """Run this file under torchrun with the same arguments; rank 0's output is ours."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.call(cmd, env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------- workloads
def _mlp() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(10):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)


class _TPBlock(nn.Module):
    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.fc2(torch.relu(self.fc1(h)))


class _TPNet(nn.Module):
    def __init__(self, d: int = 128, blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(_TPBlock(d) for _ in range(blocks))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _build(strategy: str, batch: int, rank: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer,
                                                                     list[tuple[Tensor, Tensor]],
                                                                     Callable[[Tensor, Tensor], Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    ce = nn.functional.cross_entropy
    if strategy == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        model: nn.Module = _TPNet()
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            parallelize_module(block, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        seq = 16
        batches = []
        for _ in range(BATCH_POOL):  # every rank the whole batch (the same generator)
            tokens = torch.randint(0, VOCAB, (batch // 8, seq + 1), generator=g)
            batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, batches, lambda out, t: ce(out.reshape(-1, VOCAB), t.reshape(-1))
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    n = batch // world
    batches = []
    for _ in range(BATCH_POOL):
        idx = torch.randint(0, len(X), (batch,), generator=g)[rank * n:(rank + 1) * n]
        batches.append((X[idx], y[idx]))
    mlp = _mlp()
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(mlp)
    else:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        model = fully_shard(mlp, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), batches, ce


# ----------------------------------------------------------------- timing
def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def bench(strategy: str, a: argparse.Namespace, rank: int, world: int, log: Callable[[str], None]) -> dict[str, Any]:
    import gradvitals as gv

    model, opt, batches, loss_fn = _build(strategy, a.batch, rank, world)
    i = 0

    def step() -> None:
        nonlocal i
        x, t = batches[i % len(batches)]
        i += 1
        opt.zero_grad()
        loss_fn(model(x), t).backward()
        opt.step()

    def block(n: int) -> float:
        if n == 0:
            return 0.0
        for _ in range(LEAD_IN):
            step()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dist.barrier()
        return (time.perf_counter() - t0) / n

    block(a.steps)  # plain warm-up: allocator, first-step work
    watch = gv.watch(model, opt, **({"late_after": 0} if a.steady_from_start else {}))
    t0 = time.perf_counter()
    block(a.warmup)  # the watch's early schedule, untimed
    log(f"  {strategy}: watch warmed up over {a.warmup} steps in {time.perf_counter() - t0:.0f} s")
    watch.pause()
    plain: list[float] = []
    watched: list[float] = []
    ratios: list[float] = []
    try:
        before = block(a.steps)
        for r in range(a.rounds):
            watch.resume()
            w = block(a.steps)
            watch.pause()
            after = block(a.steps)
            plain += [before, after] if r == 0 else [after]
            watched.append(w)
            ratios.append(w / ((before + after) / 2))
            log(f"  {strategy} round {r + 1}/{a.rounds}: plain {1e3 * after:.2f} ms/step, "
                f"watched {1e3 * w:.2f} ms/step, ratio {ratios[-1]:.3f}")
            before = after
        info = dict(watch.record.run.get("distributed", {}))
    finally:
        watch.close()
    lo, hi = _quartiles(ratios)
    return {"plain_ms": 1e3 * statistics.median(plain), "watched_ms": 1e3 * statistics.median(watched),
            "ratio": statistics.median(ratios), "ratio_q1": lo, "ratio_q3": hi,
            "ratios": [round(r, 4) for r in ratios],
            "allreduce_bytes_max": info.get("allreduce_bytes_max"), "merged": info.get("merged", True),
            "strategy_reported": info.get("strategy")}


def main(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    results: dict[str, Any] = {"world_size": world, "rounds": a.rounds, "steps": a.steps, "warmup": a.warmup,
                               "steady_from_start": a.steady_from_start,
                               "merge": os.environ.get("GRADVITALS_DIST_MERGE", "1") != "0",
                               "batch_env": os.environ.get("GRADVITALS_DIST_BATCH"),
                               "batch": a.batch, "torch": torch.__version__, "machine": platform.machine(),
                               "cpus": os.cpu_count(), "strategies": {}}
    for s in a.strategies.split(","):
        results["strategies"][s] = bench(s, a, rank, world, log)
    if rank == 0:
        print(f"\n{world} ranks, gloo, CPU ({os.cpu_count()} cores), blocks of {a.steps} steps, "
              f"{a.rounds} rounds; ratio = watched / plain (median, IQR)")
        print(f"{'strategy':<9} {'plain ms':>9} {'watched ms':>11} {'ratio':>7}  {'IQR':<13} {'bytes/all-reduce max':>20}")
        for s, r in results["strategies"].items():
            print(f"{s:<9} {r['plain_ms']:>9.2f} {r['watched_ms']:>11.2f} {r['ratio']:>7.3f}  "
                  f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}  {r['allreduce_bytes_max']!s:>20}")
        if a.out:
            with open(a.out, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote {a.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    args = _args()
    if "LOCAL_RANK" not in os.environ:
        sys.exit(_launch(args))
    main(args)
