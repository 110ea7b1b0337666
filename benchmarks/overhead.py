"""What gradvitals costs a training step, measured side by side with a plain step.

    python benchmarks/overhead.py                 # all four workloads, PASS/FAIL vs budgets
    python benchmarks/overhead.py --quick         # smoke run (seconds)
    python benchmarks/overhead.py --workloads W1,W3 --rounds 20 --steps 25

One process, CPU, float32, ``torch.set_num_threads(2)``, fixed seeds. Every method
trains the same model and optimizer (one shared instance: separate copies differ by
5-20% on their own, an allocator-placement effect larger than the budgets), each
method attaching its instrumentation only for its own blocks. Methods run in rounds;
in each round every method's block is bracketed by plain blocks (P A P B P C ... P), the
methods in a fresh seeded-random order each round, so machine drift cancels and no
method always follows the same neighbour. The gradvitals default is warmed up past step 1000 (its steady
state: scheduled probes every 100 steps); ``gv_early`` measures its first 1000 steps.

A *step* is ``zero_grad, forward, loss, backward, optimizer.step``. No method calls
``loss.item()`` (a real loop often does): the plain step then has no host sync of its
own, so gradvitals' one sync per step is charged to it in full.

Time per step: one round times a block of ``--steps`` consecutive steps of a method
(default 100 = the default schedule's late interval, so each block holds exactly one
scheduled step and the scheduled probes are counted at their real rate), after
``LEAD_IN`` untimed steps; the reported ms/step is the median over rounds of the block
mean; the ratio is the median over rounds of the block time divided by the mean of the
two plain blocks around it (paired, so slow phases of the shared machine cancel). The
``plain_twin`` control is the plain step measured as a method: its ratio is what the
machine's noise alone makes of identical work. ``spread`` is the ratio's inter-quartile
range.

Peak RSS: the process's resident set after each block of the method, highest seen (all
methods share one process, so this is an upper bound of what the method itself holds).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

import gradvitals as gv
from gradvitals.record import Record

THREADS = 2  # the reference machines have 2 cores
SEED = 0
#: Where models and batches live (--device); the reference numbers are CPU ones.
DEVICE = torch.device("cpu")
BATCH_POOL = 8  # pre-built batches cycled through, so data loading costs nothing
VOCAB = 1000  # synthetic LM vocabulary (W3, W4): small, so the model part dominates less

#: Budgets (issue 7): median step time of gradvitals relative to the plain step.
BUDGET_DEFAULT = 1.02  # default watch on W2-W4
BUDGET_DEFAULT_W1 = 1.03  # W1's fused norm pass alone is ~1.15% of its step
BUDGET_FULL = 1.30  # every probe every step
#: "No measurable steady-state cost" of NaN-origin capture: default vs
#: nonfinite_origin=False within 1%, below what this machine can resolve in a step.
BUDGET_ORIGIN = 1.01
BUDGET_RECORD_MB = 100.0  # a 1,000,000-step run over 100 layers
BUDGET_SYNCS_PER_STEP = 1  # host<->device synchronisations per optimizer step, default mode

#: Untimed steps at the start of each block: the switch from the previous method (its
#: hooks coming off, ours going on, caches holding the other method's data) settles.
#: Any 100 consecutive steps still hold exactly one step of the default late schedule.
LEAD_IN = 2
#: glibc malloc pinned (``--malloc pinned``, the default): with its dynamic mmap
#: threshold, whether a freed 100 KB-10 MB buffer goes back to the kernel depends on the
#: allocation history, so the same plain W2 step measured ~0 or ~900 page faults per
#: step from one block to the next (2.1 vs 3.1 ms), and a method that allocates a few
#: small tensors came out 7% *faster* than plain (a bare _foreach_norm: 0.93x). Pinned
#: thresholds keep freed memory in the heap: no faults after warm-up, the same for
#: every method, so the ratios measure work rather than the allocator's state.
MALLOC_PINNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                 "MALLOC_TOP_PAD_": str(1 << 28)}
RECORD_STEPS = 1_000_000
#: Untimed steps of each gradvitals method before the rounds: its default schedule runs
#: the scheduled probes every 25 steps up to step 1000 (Options.late_after), every 100
#: after; a long run spends its time past that. gv_early measures the first phase.
GV_WARMUP = 1000
RECORD_LAYERS = 100


# ---------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    title: str
    build: Callable[[], nn.Module]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    batches: list[tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


def _digit_batches(batch: int, image: bool) -> list[tuple[Tensor, Tensor]]:
    X, y = _digits()
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(BATCH_POOL):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        x = X[idx].view(-1, 1, 8, 8) if image else X[idx]
        out.append((x.contiguous(), y[idx]))
    return out


def _token_batches(batch: int, seq: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(BATCH_POOL):
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, 256), nn.ReLU()]
    for _ in range(18):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    layers.append(nn.Linear(256, 10))
    return nn.Sequential(*layers)  # 20 Linear layers


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


class PreLNTransformerLM(nn.Module):
    def __init__(self, d_model: int = 128, heads: int = 4, layers: int = 4, seq: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.blocks(h, mask=self.mask, is_causal=True)
        return self.head(self.norm(h))


class LSTMLM(nn.Module):
    def __init__(self, hidden: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def _lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def workloads() -> dict[str, Callable[[], Workload]]:
    return {
        "W1": lambda: Workload("W1", "20-layer MLP w256 ReLU, digits b128, Adam", _mlp,
                               lambda p: torch.optim.Adam(p, lr=1e-3), _digit_batches(128, image=False),
                               nn.functional.cross_entropy),
        "W2": lambda: Workload("W2", "CNN+BatchNorm, 8x8 digits b128, SGD momentum", _cnn,
                               lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                               _digit_batches(128, image=True), nn.functional.cross_entropy),
        "W3": lambda: Workload("W3", "Pre-LN transformer LM 4x d128 h4, seq 64 b32, AdamW", PreLNTransformerLM,
                               lambda p: torch.optim.AdamW(p, lr=3e-4), _token_batches(32, 64), _lm_loss),
        "W4": lambda: Workload("W4", "2-layer LSTM LM h256, seq 70 b20, SGD", LSTMLM,
                               lambda p: torch.optim.SGD(p, lr=1.0), _token_batches(20, 70), _lm_loss),
        # W3 scaled up to a step an accelerator is busy with (issue 7 asks for it on a GPU):
        # no budget of its own, run by name (--workloads W3L).
        "W3L": lambda: Workload("W3L", "Pre-LN transformer LM 6x d768 h12, seq 256 b16, AdamW (W3 scaled up)",
                                lambda: PreLNTransformerLM(d_model=768, heads=12, layers=6, seq=256),
                                lambda p: torch.optim.AdamW(p, lr=3e-4), _token_batches(16, 256), _lm_loss),
        # Not one of issue 7's workloads (no budget): a toy-size step, where gradvitals'
        # fixed per-step cost shows. Run it by name (--workloads W0).
        "W0": lambda: Workload("W0", "2-layer MLP w64, digits b64, Adam (toy step: fixed cost)", _tiny,
                               lambda p: torch.optim.Adam(p, lr=1e-3), _digit_batches(64, image=False),
                               nn.functional.cross_entropy),
    }


#: The issue's reference workloads: the default run and the ratio budgets.
REFERENCE = ("W1", "W2", "W3", "W4")


# ------------------------------------------------------------------ methods
class Method:
    """One way of running a step. ``enter``/``exit`` bracket each timed block so
    process-wide state (gradvitals' backward patch) is live only for its own block."""

    name = "plain"
    label = "plain step"
    #: Untimed steps before the rounds (None: one block).
    warmup: int | None = None

    def __init__(self, wl: Workload, shared: tuple[nn.Module, torch.optim.Optimizer]) -> None:
        self.wl = wl
        self.model, self.opt = shared  # every method trains the same model (see bench_workload)
        self.i = 0
        self.setup()

    def setup(self) -> None:
        pass

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass

    def close(self) -> None:
        pass

    def forward_backward(self, x: Tensor, y: Tensor) -> None:
        loss = self.wl.loss(self.model(x), y)
        loss.backward()

    def after_backward(self) -> None:
        pass

    def step(self) -> None:
        x, y = self.wl.batches[self.i % len(self.wl.batches)]
        self.i += 1
        self.opt.zero_grad()
        self.forward_backward(x, y)
        self.after_backward()
        self.opt.step()


class PlainTwin(Method):
    """The plain step again, as a second method: the control. Its ratio to plain is
    the measurement floor (what the machine's noise alone makes of identical work),
    to read every other ratio against."""

    name = "plain_twin"
    label = "plain step again (control)"


class GradvitalsMethod(Method):
    name = "gv_default"
    label = "gradvitals watch (default), steady state (past step late_after=1000)"
    options: dict[str, Any] = {}
    warmup = GV_WARMUP  # the steady state a long run spends its time in (see --gv-warmup)

    def setup(self) -> None:
        self.watch = gv.watch(self.model, self.opt, **self.options)
        self.watch.pause()  # attached only inside this method's blocks (hooks and patches)

    def enter(self) -> None:
        self.watch.resume()

    def exit(self) -> None:
        self.watch.pause()

    def close(self) -> None:
        self.watch.close()


class GradvitalsNoOrigin(GradvitalsMethod):
    name = "gv_no_origin"
    label = "gradvitals, nonfinite_origin=False"
    options = {"nonfinite_origin": False}


class GradvitalsEarly(GradvitalsMethod):
    name = "gv_early"
    label = "gradvitals watch (default), its first 1000 steps (scheduled probes every 25)"
    options = {"late_after": 10**12}
    warmup = None


class GradvitalsFull(GradvitalsMethod):
    name = "gv_full"
    label = "gradvitals full=True (every probe every step)"
    options = {"full": True}
    warmup = None  # one rate throughout


class GradvitalsFullNoAttention(GradvitalsMethod):
    """``gv_full`` without the attention probes: every step of full=True is a scheduled
    (traced) step, so gv_full / this, per round, is what the attention probes add to a
    scheduled step (_attention_on_scheduled_step)."""

    name = "gv_full_no_attn"
    label = "gradvitals full=True, attention probes off"
    options = {"full": True}
    warmup = None

    def setup(self) -> None:
        super().setup()
        self.watch._recorder.tracer.attention = None


class GradvitalsAutosave(GradvitalsMethod):
    """The default watch given a report path: it autosaves every ``autosave_s`` (default
    60 s; the record is snapshotted on the training thread, diagnosed and written by a
    background thread). Against ``gv_default`` (no path, no autosave) per round."""

    name = "gv_autosave"
    label = "gradvitals watch (default) with path=: autosave every 60 s (the default)"

    def setup(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="gv-bench-autosave-")
        self.watch = gv.watch(self.model, self.opt, path=os.path.join(self._dir, "run.json"), **self.options)
        self.watch.pause()

    def close(self) -> None:
        saver = self.watch._recorder.autosave
        self.saves = saver.saves if saver is not None else 0
        self.watch.close()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


class GradvitalsAutosave1s(GradvitalsAutosave):
    name = "gv_autosave_1s"
    label = "gradvitals watch (default) with path=, autosave_s=1 (60x the default's rate: an upper bound)"
    options = {"autosave_s": 1.0}


class NaiveItem(Method):
    name = "naive_item"
    label = "per-parameter p.grad.norm().item() loop"

    def after_backward(self) -> None:
        self.norms = [p.grad.norm().item() for p in self.model.parameters() if p.grad is not None]


class NormFloor(Method):
    name = "norm_floor"
    label = "the floor: one torch._foreach_norm over all gradients (kept on the device)"

    def after_backward(self) -> None:
        self.norms = torch._foreach_norm([p.grad for p in self.model.parameters() if p.grad is not None])


class NormFetch(Method):
    """The floor of any tool that records every layer's gradient norm every step and
    looks at the values (to catch a NaN the step it appears): the fused norms, stacked
    and fetched to the host once (on a GPU: the one sync)."""

    name = "norm_fetch"
    label = "the floor, fetched: torch._foreach_norm + one stack + .tolist() per step"

    def after_backward(self) -> None:
        self.norms = torch.stack(torch._foreach_norm([p.grad for p in self.model.parameters()
                                                      if p.grad is not None])).tolist()


class ClipTotal(Method):
    name = "clip_total"
    label = "clip_grad_norm_ total norm (never clips)"

    def after_backward(self) -> None:
        self.total = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1e30)


class DetectAnomaly(Method):
    name = "detect_anomaly"
    label = "torch.autograd.detect_anomaly()"

    def forward_backward(self, x: Tensor, y: Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autograd.detect_anomaly():
                super().forward_backward(x, y)


class ActHooks(Method):
    name = "act_hooks"
    label = "forward hooks: mean/std/zero-frac, every module, every step"

    def setup(self) -> None:
        self.stats: list[Tensor] = []
        self.handles: list[Any] = []

    def enter(self) -> None:
        for mod in self.model.modules():
            self.handles.append(mod.register_forward_hook(self._hook))

    def exit(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        x = output[0] if isinstance(output, tuple) else output
        if isinstance(x, Tensor) and x.is_floating_point():
            x = x.detach()
            self.stats.append(torch.stack([x.mean(), x.std(), (x == 0).float().mean()]))

    def after_backward(self) -> None:
        self.stats = []  # kept on the device, like ours; a logger would also fetch them


class TensorBoardHist(Method):
    name = "tb_histogram"
    label = "TensorBoard add_histogram of every gradient, every step"

    def setup(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = tempfile.TemporaryDirectory(prefix="gv-bench-tb-")
        self.writer = SummaryWriter(self.dir.name)
        self.names = [n for n, _ in self.model.named_parameters()]

    def after_backward(self) -> None:
        for n, p in zip(self.names, self.model.parameters()):
            if p.grad is not None:
                self.writer.add_histogram(f"grad/{n}", p.grad, self.i)

    def close(self) -> None:
        self.writer.close()
        self.dir.cleanup()


class WandbWatch(Method):
    name = "wandb_watch"
    label = 'wandb.watch(log="all", log_freq=1), offline'

    def setup(self) -> None:
        import wandb

        self.dir = tempfile.TemporaryDirectory(prefix="gv-bench-wandb-")
        self.run = wandb.init(mode="offline", dir=self.dir.name, project="gradvitals-bench", reinit=True)
        self.wandb = wandb

    def enter(self) -> None:
        self.wandb.watch(self.model, log="all", log_freq=1)

    def exit(self) -> None:
        self.wandb.unwatch(self.model)

    def step(self) -> None:
        super().step()
        self.wandb.log({}, commit=True)

    def close(self) -> None:
        self.run.finish(quiet=True)
        self.dir.cleanup()


def _available(method: type[Method]) -> bool:
    if issubclass(method, BaselineDefault) and method.package is None:
        return False  # only with --baseline
    try:
        if method is WandbWatch:
            import wandb  # noqa: F401
        if method is TensorBoardHist:
            import torch.utils.tensorboard  # noqa: F401
    except Exception:
        return False
    return True


class BaselineDefault(GradvitalsMethod):
    """The default watch of another revision of gradvitals (``--baseline REV``), loaded
    beside this one as the package ``gradvitals_base``: a before/after comparison of a
    change in one process, each against the same plain blocks."""

    name = "gv_default_base"
    label = "gradvitals watch (default) of the --baseline revision"
    package: Any = None

    def setup(self) -> None:
        self.watch = self.package.watch(self.model, self.opt, **self.options)
        self.watch.pause()


class BaselineFull(BaselineDefault):
    name = "gv_full_base"
    label = "gradvitals full=True of the --baseline revision"
    options = {"full": True}
    warmup = None


def load_baseline(rev: str) -> Any:
    """``src/gradvitals`` at git revision ``rev``, importable as ``gradvitals_base``
    (the package imports itself relatively, so a renamed copy is self-contained)."""
    import importlib
    import io
    import subprocess
    import tarfile

    root = Path(__file__).resolve().parents[1]
    data = subprocess.run(["git", "-C", str(root), "archive", rev, "src/gradvitals"],
                          check=True, capture_output=True).stdout
    where = Path(tempfile.mkdtemp(prefix="gv-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(where, filter="data")
    (where / "src" / "gradvitals").rename(where / "gradvitals_base")
    sys.path.insert(0, str(where))
    return importlib.import_module("gradvitals_base")


METHODS: list[type[Method]] = [Method, PlainTwin, GradvitalsMethod, GradvitalsEarly, GradvitalsNoOrigin, GradvitalsFull,
                               GradvitalsFullNoAttention,
                               GradvitalsAutosave, GradvitalsAutosave1s, NormFloor, NormFetch, NaiveItem, ClipTotal, DetectAnomaly, ActHooks, TensorBoardHist, WandbWatch,
                               BaselineDefault, BaselineFull]


# ------------------------------------------------------------------ timing
def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _wait() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _quantiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def bench_workload(wl: Workload, methods: list[type[Method]], rounds: int, steps: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    # One model and optimizer for every method: each method's block continues the same
    # training run. Separate copies measured 5-20% apart when plain ran on both (an
    # instance effect: where the allocator put each copy's tensors), more than the
    # budgets; on one instance the control (plain_twin) sits within 0-5% of plain (noise).
    torch.manual_seed(SEED)
    model = wl.build().to(DEVICE)
    shared = (model, wl.optimizer(list(model.parameters())))
    insts = [m(wl, shared) for m in methods]
    names = [m.name for m in insts]
    block: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, float] = {n: 0.0 for n in names}
    gc.collect()
    plain_inst = insts[0]
    others = insts[1:]
    ratios: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(SEED)

    def timed(m: Method) -> float:
        m.enter()
        for _ in range(LEAD_IN):  # untimed: the switch from the previous method settles
            m.step()
        _wait()
        t0 = time.perf_counter()
        for _ in range(steps):
            m.step()
        _wait()  # an accelerator's queued work belongs to the block that queued it
        dt = (time.perf_counter() - t0) / steps
        m.exit()
        block[m.name].append(dt)
        rss[m.name] = max(rss[m.name], _rss_mb())
        return dt

    try:
        # Warm-up block (untimed): allocator, first-step work (gradvitals traces the topology at step 0).
        for m in insts:
            m.enter()
            for _ in range(steps if m.warmup is None else m.warmup):
                m.step()
            m.exit()
        for r in range(rounds):
            # Bracketed: a plain block before and after every method's block, the methods
            # in a fresh random order each round. Each ratio is to the mean of the two
            # plain blocks around it, taken seconds apart at most, so the machine's drift
            # cancels to first order and no method always follows the same neighbour.
            order = others[:]
            rng.shuffle(order)
            before = timed(plain_inst)
            for m in order:
                t = timed(m)
                after = timed(plain_inst)
                ratios[m.name].append(t / ((before + after) / 2))
                before = after
            ratios["plain"].append(1.0)
            log(f"  {wl.name} round {r + 1}/{rounds}: plain {1e3 * statistics.median(block['plain'][-len(order) - 1:]):.2f} ms/step")
    finally:
        for m in insts:
            m.close()
    out: dict[str, Any] = {}
    for n in names:
        lo, hi = _quantiles(ratios[n])
        out[n] = {"ms_per_step": 1e3 * statistics.median(block[n]), "ratio": statistics.median(ratios[n]),
                  "ratio_q1": lo, "ratio_q3": hi, "peak_rss_mb": round(rss[n], 1),
                  "block_ms": [round(1e3 * t, 4) for t in block[n]]}
    if "gv_default" in block and "gv_no_origin" in block:
        rel = [a / b for a, b in zip(ratios["gv_default"], ratios["gv_no_origin"])]
        lo, hi = _quantiles(rel)
        out["_origin_vs_no_origin"] = {"ratio": statistics.median(rel), "ratio_q1": lo, "ratio_q3": hi}
    for name in ("gv_autosave", "gv_autosave_1s"):
        if "gv_default" in block and name in block:
            # What the autosave adds to the same default watch, per round.
            rel = [a / b for a, b in zip(ratios[name], ratios["gv_default"])]
            lo, hi = _quantiles(rel)
            saves = next((getattr(m, "saves", None) for m in insts if m.name == name), None)
            out[f"_{name}_vs_default"] = {"ratio": statistics.median(rel), "ratio_q1": lo, "ratio_q3": hi,
                                          "saves": saves}
    for new, old in (("gv_default", "gv_default_base"), ("gv_full", "gv_full_base")):
        if new in block and old in block:
            # This revision against the --baseline one, per round (same plain blocks).
            rel = [a / b for a, b in zip(ratios[new], ratios[old])]
            lo, hi = _quantiles(rel)
            out[f"_{new}_vs_base"] = {"ratio": statistics.median(rel), "ratio_q1": lo, "ratio_q3": hi}
    if "gv_full" in block and "gv_full_no_attn" in block:
        # The attention probes' share of a scheduled step (full=True: every step is one).
        rel = [a / b for a, b in zip(ratios["gv_full"], ratios["gv_full_no_attn"])]
        lo, hi = _quantiles(rel)
        out["_attention_on_scheduled_step"] = {"ratio": statistics.median(rel), "ratio_q1": lo, "ratio_q3": hi}
    if "gv_default" in block and "norm_fetch" in block:
        # What gradvitals adds beyond the least any per-step norm recorder must do.
        rel = [a / b for a, b in zip(ratios["gv_default"], ratios["norm_fetch"])]
        lo, hi = _quantiles(rel)
        out["_default_vs_norm_fetch"] = {"ratio": statistics.median(rel), "ratio_q1": lo, "ratio_q3": hi}
    return out


# ----------------------------------------------------------- host syncs
#: (module, function) pairs whose reads are of CPU tensors by construction (see count_host_syncs).
_CPU_ONLY = {("gradvitals.probes.activations", "cpu_values"), ("gradvitals.recorder.staging", "cpu_floats")}
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_syncs(package: str = "gradvitals"):
    """Count calls that make the host wait for a tensor's value (``.item()``,
    ``.tolist()``, ``float(t)``, ``if t:`` ...) made from ``package``'s own code.
    On a GPU each is a synchronisation; on the CPU this counts where they would be.
    Not counted (tallied apart as ``cpu_reads``): reads through
    ``gradvitals.probes.activations.cpu_values`` and ``gradvitals.recorder.staging.cpu_floats``,
    which refuse any tensor that is not on the CPU (CPU-only branches: on a GPU they do
    not run, and on the CPU the values are in host memory already)."""
    counter = {"n": 0, "cpu_reads": 0}  # cpu_reads: values read through the exempt CPU reader
    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def wrap(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            caller = frame.f_globals.get("__name__", "")
            if caller == package or caller.startswith(package + "."):
                if (caller, frame.f_code.co_name) in _CPU_ONLY:
                    counter["cpu_reads"] += 1
                else:
                    counter["n"] += 1
            return orig(self, *args, **kwargs)

        counted.__name__ = name
        return counted

    try:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, wrap(name, orig))
        yield counter
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


@contextlib.contextmanager
def count_cuda_syncs():
    """Every synchronising CUDA call (torch's sync debug mode, "warn"), whoever made it:
    the ground truth on a GPU, hidden syncs (a tensor in an ``if``, ``nonzero``) included.
    Yields the list of (file:line, message) of each one, in order."""
    import warnings

    seen: list[tuple[str, str]] = []
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode(prev)
            seen.extend((f"{Path(w.filename).name}:{w.lineno}", str(w.message).splitlines()[0])
                        for w in caught if "synchroniz" in str(w.message))


def syncs_per_step(wl: Workload, steps: int) -> dict[str, Any]:
    """Host syncs of gradvitals' default watch per optimizer step (max and mean). On a
    GPU also every synchronising CUDA call (``count_cuda_syncs``), for the watched step
    and for the plain step (the control: a step that syncs on its own)."""
    torch.manual_seed(SEED)
    model = wl.build().to(DEVICE)
    m = GradvitalsMethod(wl, (model, wl.optimizer(list(model.parameters()))))
    cuda = DEVICE.type == "cuda"
    per_step, cuda_per_step, sites = [], [], {}
    try:
        m.enter()
        with count_host_syncs() as counter:
            for _ in range(steps):
                before = counter["n"]
                if cuda:
                    with count_cuda_syncs() as seen:
                        m.step()
                    cuda_per_step.append(len(seen))
                    if len(per_step) > 0:  # step 0's init audit apart (below)
                        for where, _msg in seen:
                            sites[where] = sites.get(where, 0) + 1
                else:
                    m.step()
                per_step.append(counter["n"] - before)
        m.exit()
    finally:
        m.close()
    # Step 0 also holds the once-per-model init audit's own fetch (probes/init_audit.py):
    # reported apart, the budget is on the steady state.
    out = {"max": max(per_step[1:]), "first_step": per_step[0],
           "mean": sum(per_step[1:]) / (len(per_step) - 1), "steps": steps}
    if cuda:
        plain = Method(wl, (model, m.opt))
        with count_cuda_syncs() as seen:
            for _ in range(steps):
                plain.step()
        out["cuda"] = {"max": max(cuda_per_step[1:]), "first_step": cuda_per_step[0],
                       "mean": sum(cuda_per_step[1:]) / (len(cuda_per_step) - 1), "sites": sites,
                       "plain_total": len(seen)}
    return out


# ---------------------------------------------------------- record size
def record_size(steps: int = RECORD_STEPS, layers: int = RECORD_LAYERS, every: int = 25) -> dict[str, Any]:
    """Bytes held by the Record of a ``steps``-step run over ``layers`` Linear layers,
    fed through ``Record.add`` with default mode's series at their real rates.

    Feeding 100 layers x 1M steps (~2e8 adds) would take minutes, so one layer's
    series are fed for all ``steps`` and the peak traced memory is scaled: every
    layer's series get the same number of points at the same steps, so they
    decimate together and their sizes are identical."""
    per_step_keys = ["grad_norm/L.weight", "grad_norm/L.bias"]
    scheduled_keys = ([f"{q}/L.{p}" for q in ("weight_norm", "update_ratio") for p in ("weight", "bias")]
                      + [f"{q}/L" for q in ("act_mean", "act_std", "act_zero_frac", "act_sat_frac",
                                            "act_nonfinite_frac", "dead_frac")])
    run_keys = ["loss", "grad_norm_global", "lr/opt.0"]

    def feed(keys_every: list[str], keys_sched: list[str]) -> tuple[int, int]:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        rec = Record()
        add = rec.add
        for s in range(steps):
            v = 1.0 / (s + 1)
            for k in keys_every:
                add(k, s, v)
            if s % every == 0:
                for k in keys_sched:
                    add(k, s, v)
        cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        points = sum(len(x) for x in rec.series.values())
        del rec
        return peak - base, points

    t0 = time.perf_counter()
    layer_peak, layer_points = feed(per_step_keys, scheduled_keys)
    run_peak, _ = feed(run_keys, [])
    total = layers * layer_peak + run_peak
    return {"steps": steps, "layers": layers, "series": layers * (len(per_step_keys) + len(scheduled_keys))
            + len(run_keys), "bytes_per_layer": layer_peak, "points_per_layer": layer_points,
            "mb": total / 2**20, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------ report
def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _paired(results: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    """(workload, its paired-ratio entry ``key``) for the workloads that have one."""
    return [(w, r["methods"][key]) for w, r in results["workloads"].items() if key in r["methods"]]


def render(results: dict[str, Any], method_names: list[str]) -> str:
    lines = []
    widths = [16] + [13] * len(results["workloads"])
    wls = list(results["workloads"])
    lines.append(_row(["method"] + [f"{w} ms (x)" for w in wls], widths))
    for n in method_names:
        cells = [n]
        for w in wls:
            r = results["workloads"][w]["methods"].get(n)
            cells.append("-" if r is None else f"{r['ms_per_step']:.2f} ({r['ratio']:.3f})")
        lines.append(_row(cells, widths))
    lines.append("")
    lines.append(_row(["peak RSS MB"] + ["" for _ in wls], widths))
    for n in method_names:
        cells = [n]
        for w in wls:
            r = results["workloads"][w]["methods"].get(n)
            cells.append("-" if r is None else f"{r['peak_rss_mb']:.0f}")
        lines.append(_row(cells, widths))
    lines.append("")
    lines.append("ratio spread (q1-q3 of per-round paired ratios):")
    for n in method_names:
        cells = [n]
        for w in wls:
            r = results["workloads"][w]["methods"].get(n)
            cells.append("-" if r is None else f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}")
        lines.append(_row(cells, widths))
    ctx = _paired(results, "_default_vs_norm_fetch")
    if ctx:
        lines.append("")
        lines.append("default watch / norm_fetch (gradvitals beyond the fetched-norm floor, same run): "
                     + ", ".join(f"{w} {c['ratio']:.3f}x" for w, c in ctx))
    for name in ("gv_default", "gv_full"):
        ctx = _paired(results, f"_{name}_vs_base")
        if ctx:
            lines.append(f"{name} / {name}_base (this revision / --baseline, same run): "
                         + ", ".join(f"{w} {c['ratio']:.3f}x ({c['ratio_q1']:.3f}-{c['ratio_q3']:.3f})"
                                     for w, c in ctx))
    ctx = _paired(results, "_attention_on_scheduled_step")
    if ctx:
        lines.append("gv_full / gv_full_no_attn (the attention probes on a scheduled step, same run): "
                     + ", ".join(f"{w} {c['ratio']:.3f}x ({c['ratio_q1']:.3f}-{c['ratio_q3']:.3f})" for w, c in ctx))
    for name in ("gv_autosave", "gv_autosave_1s"):
        ctx = _paired(results, f"_{name}_vs_default")
        if ctx:
            lines.append(f"{name} / default watch (what the autosave adds, same run): "
                         + ", ".join(f"{w} {c['ratio']:.3f}x ({c['ratio_q1']:.3f}-{c['ratio_q3']:.3f}, "
                                     f"{c['saves']} saves)" for w, c in ctx))
    lines.append("")
    lines.append("budgets:")
    for b in results["budgets"]:
        lines.append(f"  {'PASS' if b['pass'] else 'FAIL'}  {b['name']}: {b['measured']} (budget {b['budget']})")
    return "\n".join(lines)


def check_budgets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    gpu = str(results.get("machine", {}).get("device", "cpu")).startswith("cuda")
    for w, res in results["workloads"].items():
        m = res["methods"] if w in REFERENCE else {}  # W0: measured, not budgeted
        if "gv_default" in m:
            limit = BUDGET_DEFAULT_W1 if w == "W1" else BUDGET_DEFAULT
            floor = m.get("_default_vs_norm_fetch")
            if gpu and floor is not None:
                # On a GPU the step's one read waits for its kernels: a plain step never
                # waits, so the floor alone (one fused norm pass and one read) costs more than
                # the CPU budget on a small, launch-bound step. The watch is judged there
                # against that floor; its ratio to plain is in the table above.
                r = floor["ratio"]
                out.append({"name": f"{w} default watch / norm_fetch (GPU: beyond the floor)",
                            "measured": f"{r:.3f}x", "budget": f"<= {limit}x", "pass": r <= limit})
            else:
                r = m["gv_default"]["ratio"]
                out.append({"name": f"{w} default watch", "measured": f"{r:.3f}x", "budget": f"<= {limit}x",
                            "pass": r <= limit})
        if "gv_full" in m:
            r = m["gv_full"]["ratio"]
            out.append({"name": f"{w} full", "measured": f"{r:.3f}x", "budget": f"<= {BUDGET_FULL}x",
                        "pass": r <= BUDGET_FULL})
        if "_origin_vs_no_origin" in m:
            r = m["_origin_vs_no_origin"]["ratio"]
            out.append({"name": f"{w} NaN-origin capture (default / nonfinite_origin=False)",
                        "measured": f"{r:.3f}x", "budget": f"<= {BUDGET_ORIGIN}x", "pass": r <= BUDGET_ORIGIN})
        if "syncs" in res:
            s = res["syncs"]
            out.append({"name": f"{w} host syncs per step (default)", "measured": f"max {s['max']} (step 0: {s['first_step']}, once-per-model init audit)",
                        "budget": f"<= {BUDGET_SYNCS_PER_STEP}", "pass": s["max"] <= BUDGET_SYNCS_PER_STEP})
            if "cuda" in s:  # what the GPU itself saw, beyond the plain step's own
                c = s["cuda"]
                out.append({"name": f"{w} synchronising CUDA calls per step (default)",
                            "measured": f"max {c['max']}, mean {c['mean']:.2f} (step 0: {c['first_step']}; plain "
                                        f"step: {c['plain_total']} in {s['steps']}; sites {c['sites']})",
                            "budget": f"<= {BUDGET_SYNCS_PER_STEP}", "pass": c["max"] <= BUDGET_SYNCS_PER_STEP})
    if "record" in results:
        rec = results["record"]
        out.append({"name": f"record of {rec['steps']:,} steps x {rec['layers']} layers",
                    "measured": f"{rec['mb']:.1f} MB", "budget": f"< {BUDGET_RECORD_MB} MB",
                    "pass": rec["mb"] < BUDGET_RECORD_MB})
    return out


def main(argv: list[str] | None = None) -> int:
    all_wl = workloads()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(REFERENCE),
                   help="comma-separated subset of W1,W2,W3,W4 (default: all four), or W0 (a toy step) or W3L (W3 scaled up, for a GPU): no budget")
    p.add_argument("--methods", default=None, help="comma-separated subset of method names (plain always runs)")
    p.add_argument("--rounds", type=int, default=11, help="alternating rounds (default 11)")
    p.add_argument("--steps", type=int, default=100,
                   help="optimizer steps per method per round (default 100 = the default schedule's late "
                        "interval, so every block holds exactly one scheduled step)")
    p.add_argument("--gv-warmup", type=int, default=GV_WARMUP,
                   help=f"untimed steps of each gradvitals method first (default {GV_WARMUP}: its steady state)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 5 steps, small record")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "latest.json"),
                   help="JSON results path")
    p.add_argument("--no-record", action="store_true", help="skip the 1M-step record-size measurement")
    p.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                   help="pinned (default): fixed glibc malloc thresholds, no page-fault lottery "
                        "(see MALLOC_PINNED); default: the environment's malloc settings as they are")
    p.add_argument("--threads", type=int, default=THREADS,
                   help=f"torch threads (default {THREADS}; 1 on a machine whose cores are busy: two "
                        "threads there measured a 0.2 ms step at 10 ms, spinning)")
    p.add_argument("--baseline", metavar="REV", default=None,
                   help="also time gradvitals at git revision REV (methods gv_default_base, gv_full_base) "
                        "and print this revision / that one per round")
    p.add_argument("--device", default="cpu",
                   help="where models and batches live: cpu (default: the reference numbers) or cuda[:N]; "
                        "on a GPU each block ends with a synchronize, and the CUDA sync counter runs too")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.malloc == "pinned" and any(os.environ.get(k) != v for k, v in MALLOC_PINNED.items()):
        if argv is not None:  # called in-process (tests): cannot re-exec; measure as is
            a.malloc = "as-called"
        else:  # glibc reads these at start-up only: run again with them set
            sys.stdout.flush()
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_PINNED})
    chosen = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in chosen if w not in all_wl]
    if bad or not chosen:
        p.error(f"--workloads: unknown {', '.join(bad) or '(empty)'}; allowed: {', '.join(all_wl)}")
    if a.rounds < 1 or a.steps < 1:
        p.error("--rounds and --steps must be positive integers")
    try:
        device = torch.device(a.device)
    except RuntimeError as exc:
        p.error(f"--device {a.device!r}: {exc}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {a.device!r}: cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device!r}: torch sees no CUDA device here")
    global DEVICE
    DEVICE = device
    rounds, steps, rec_steps = (2, 5, 20_000) if a.quick else (a.rounds, a.steps, RECORD_STEPS)
    if a.gv_warmup < 0:
        p.error("--gv-warmup must be a non-negative integer")
    if a.baseline:
        try:
            BaselineDefault.package = load_baseline(a.baseline)
        except Exception as exc:
            p.error(f"--baseline {a.baseline}: cannot load gradvitals at that revision ({exc})")
    for m in (GradvitalsMethod, GradvitalsNoOrigin, GradvitalsAutosave, GradvitalsAutosave1s, BaselineDefault):
        m.warmup = 5 if a.quick else a.gv_warmup
    methods = [m for m in METHODS if _available(m)]
    if a.methods:
        want = {x.strip() for x in a.methods.split(",")} | {"plain"}
        if a.baseline:  # each chosen gradvitals method beside its --baseline twin
            want |= {f"{n}_base" for n in want if n in ("gv_default", "gv_full")}
        unknown = want - {m.name for m in METHODS}
        if unknown:
            p.error(f"--methods: unknown {', '.join(sorted(unknown))}; allowed: "
                    f"{', '.join(m.name for m in METHODS)}")
        methods = [m for m in methods if m.name in want]
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    torch.set_num_threads(a.threads)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": a.threads, "cpus": os.cpu_count(), "platform": platform.platform(terse=True),
                    "device": str(DEVICE), "dtype": "float32",
                    "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None},
        "settings": {"rounds": rounds, "steps_per_block": steps, "loss_item_in_step": False,
                     "lead_in_steps": LEAD_IN, "malloc": a.malloc,
                     "malloc_env": {k: os.environ.get(k) for k in MALLOC_PINNED},
                     "gv_warmup_steps": GradvitalsMethod.warmup,
                     "vocab": VOCAB, "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "methods": {m.name: m.label for m in methods},
        "skipped": [m.name for m in METHODS if not _available(m)],
        "workloads": {},
    }
    for w in chosen:
        wl = all_wl[w]()
        wl.batches = [(x.to(DEVICE), y.to(DEVICE)) for x, y in wl.batches]
        log(f"{w}: {wl.title}")
        t0 = time.perf_counter()
        res = bench_workload(wl, methods, rounds, steps, log)
        entry: dict[str, Any] = {"title": wl.title, "methods": res}
        if any(m.name == "gv_default" for m in methods):
            entry["syncs"] = syncs_per_step(wl, 2 * 25 + 1)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["workloads"][w] = entry
    if not a.no_record:
        log(f"record size: {rec_steps:,} steps x {RECORD_LAYERS} layers ...")
        results["record"] = record_size(rec_steps)
    results["budgets"] = check_budgets(results)
    results["pass"] = all(b["pass"] for b in results["budgets"])
    print(render(results, [m.name for m in methods]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {out}")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
