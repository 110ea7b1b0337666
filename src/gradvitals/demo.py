"""``gradvitals demo``: the chapter's running example, every failure and its fix.

One network — a 20-layer classifier of scikit-learn's bundled handwritten digits (8x8
images, 1,797 samples) — is trained in a gallery of broken configurations, each
watched by gradvitals, and then with the chapter's fix. For each pair the demo prints
what gradvitals diagnosed (live, from the run's own record), the fix, and what the fix
achieved (held-out accuracy and final loss, before vs after).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

DEPTH = 20
WIDTH = 64


@dataclass(frozen=True)
class Config:
    """One training configuration of the 20-layer digit classifier."""

    act: str = "relu"  # relu | sigmoid | leaky_relu | gelu
    init: str = "default"  # default (PyTorch's) | normal1 (N(0,1)) | zeros | he
    bias: float | None = None  # constant bias for every hidden layer
    residual: bool = False
    norm: str | None = None  # None | layer | batch
    normalize_inputs: bool = True
    lr: float = 1e-3
    optimizer: str = "adam"
    clip: float | None = None
    warmup: int = 0
    steps: int = 300
    batch: int = 64


@dataclass
class Case:
    key: str
    title: str
    broken: Config
    fix_title: str
    fix: Config
    expect: tuple[str, ...]  # codes the chapter says this failure shows (any of them)


def gallery(steps: int) -> list[Case]:
    s = steps
    return [
        Case("vanishing", "sigmoid, plain, default init", Config(act="sigmoid", steps=s),
             "residual connections (the gradient highway: dy/dx = dF/dx + 1)",
             Config(act="sigmoid", residual=True, steps=s),
             ("vanishing_gradients", "loss_plateau")),
        Case("exploding", "ReLU with N(0, 1) init", Config(init="normal1", optimizer="sgd", lr=1e-2, steps=s),
             "He init (gv.init_)", Config(init="he", optimizer="sgd", lr=1e-2, steps=s),
             ("exploding_gradients", "nonfinite")),
        # lr 0.03: at 0.05 this 20-layer plain ReLU net (He init) has genuine loss spikes on
        # some thread counts, which the demo's "fixed" run must not show.
        Case("symmetry", "zero init", Config(init="zeros", optimizer="sgd", lr=0.03, steps=s),
             "random (He) init", Config(init="he", optimizer="sgd", lr=0.03, steps=s),
             ("symmetric_weights",)),
        Case("lr", "learning rate too high (SGD lr=2.0)", Config(init="he", optimizer="sgd", lr=2.0, steps=s),
             "clipping (max_norm=1) and 50-step warmup, lr 0.1",
             Config(init="he", optimizer="sgd", lr=0.1, clip=1.0, warmup=50, steps=s),
             ("loss_spike", "nonfinite", "update_ratio_high", "exploding_gradients")),
        Case("dead", "large negative bias (-3) under ReLU", Config(init="he", bias=-3.0, steps=s),
             "GELU with proper init (bias 0)", Config(act="gelu", init="he", steps=s),
             ("dead_relu",)),
        Case("saturation", "unnormalized inputs (0..16) into sigmoid",
             Config(act="sigmoid", init="he", normalize_inputs=False, steps=s),
             "normalize inputs and add BatchNorm",
             Config(act="sigmoid", init="he", normalize_inputs=True, norm="batch", steps=s),
             ("saturated_activations",)),
        Case("modern", "the modern recipe: He + GELU + LayerNorm + residuals + clipping + warmup",
             Config(act="gelu", init="he", residual=True, norm="layer", clip=1.0, warmup=30, steps=s),
             "(already healthy)", Config(act="gelu", init="he", residual=True, norm="layer", clip=1.0,
                                         warmup=30, steps=s),
             ()),
    ]


class Block(nn.Module):
    def __init__(self, width: int, act: str, norm: str | None, residual: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = (nn.LayerNorm(width) if norm == "layer" else nn.BatchNorm1d(width) if norm == "batch"
                     else None)
        self.act = _act(act)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.norm is not None:
            h = self.norm(h)
        h = self.act(h)
        return x + h if self.residual else h


class DigitNet(nn.Module):
    """The chapter's 20-layer digit classifier: stem, 18 hidden blocks, head."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.stem = nn.Linear(64, WIDTH)
        self.stem_act = _act(cfg.act)
        self.blocks = nn.ModuleList(Block(WIDTH, cfg.act, cfg.norm, cfg.residual) for _ in range(DEPTH - 2))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem_act(self.stem(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU,
            "tanh": nn.Tanh}[name]()


def build(cfg: Config, example: torch.Tensor) -> nn.Module:
    model = DigitNet(cfg)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        if cfg.init == "normal1":
            for m in linears:
                nn.init.normal_(m.weight, 0.0, 1.0)
        elif cfg.init == "zeros":
            for m in linears:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
        elif cfg.init == "he":
            from .fixes.init import init_

            init_(model, example)
        if cfg.bias is not None:
            for m in linears[:-1]:
                nn.init.constant_(m.bias, cfg.bias)
    return model


def load_data(normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .data import load_digits

    X, y = load_digits()
    X = torch.tensor(X, dtype=torch.float32)
    if normalize:
        X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=g)
    n_train = 1400
    tr, te = perm[:n_train], perm[n_train:]
    return X[tr], y[tr], X[te], y[te]


@dataclass
class Outcome:
    config: Config
    codes: list[str]
    problems: list[str]
    verdict: str
    accuracy: float
    final_loss: float
    report: dict[str, Any] = field(repr=False, default_factory=dict)
    seconds: float = 0.0


def train(cfg: Config, seed: int = 0) -> Outcome:
    """Train one configuration under gv.watch; returns its diagnosis and results."""
    from .watcher import watch

    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte = load_data(cfg.normalize_inputs)
    torch.manual_seed(seed)
    model = build(cfg, Xtr[:64])
    opt = (torch.optim.Adam(model.parameters(), lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=cfg.lr))
    g = torch.Generator().manual_seed(seed)
    losses = []
    with watch(model, opt, name="digits20") as w:
        for step in range(cfg.steps):
            if cfg.warmup:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            idx = torch.randint(0, len(Xtr), (cfg.batch,), generator=g)
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            if cfg.clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            losses.append(loss.detach())
    model.eval()
    with torch.no_grad():
        logits = model(Xte)
        acc = (logits.argmax(1) == yte).float().mean().item() if torch.isfinite(logits).all() else 0.1
    rep = w.diagnosis()
    final = torch.stack(losses[-20:]).mean().item()
    return Outcome(config=cfg, codes=rep.codes, problems=[f.code for f in rep.problems()],
                   verdict=rep.verdict, accuracy=acc, final_loss=final, report=rep.to_json(),
                   seconds=time.perf_counter() - t0)


def run_demo(out: Path, steps: int, echo: Callable[[str], None] = print,
             only: list[str] | None = None) -> list[tuple[Case, Outcome, Outcome]]:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    from .report import write_atomic
    import json

    for case in gallery(steps):
        if only and case.key not in only:
            continue
        broken = train(case.broken)
        fixed = train(case.fix) if case.fix != case.broken else broken
        for tag, o in (("broken", broken), ("fixed", fixed)):
            write_atomic(out / f"{case.key}-{tag}.json", json.dumps(o.report, allow_nan=False))
        results.append((case, broken, fixed))
        echo(_describe(case, broken, fixed))
    return results


def _fmt_loss(v: float) -> str:
    return "NaN" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3f}")


def _describe(case: Case, broken: Outcome, fixed: Outcome) -> str:
    lines = [f"── {case.title}",
             f"   diagnosed: {', '.join(broken.problems) or 'no problems'}",
             f"   verdict:   {broken.verdict}"]
    if fixed is not broken:
        lines += [f"   fix:       {case.fix_title}",
                  f"   after fix: {', '.join(fixed.problems) or 'no problems'}",
                  f"   result:    accuracy {broken.accuracy:.1%} → {fixed.accuracy:.1%}, "
                  f"final loss {_fmt_loss(broken.final_loss)} → {_fmt_loss(fixed.final_loss)}"]
    else:
        lines += [f"   result:    accuracy {broken.accuracy:.1%}, final loss {_fmt_loss(broken.final_loss)}"]
    return "\n".join(lines)


def write_gallery(results: list[tuple[Case, Outcome, Outcome]], path: Path) -> Path | None:
    try:
        from .reports.html import render_gallery
    except ImportError:
        return None
    from .report import write_atomic

    entries = []
    for case, broken, fixed in results:
        entries.append((f"{case.title} — broken", broken.report))
        if fixed is not broken:
            entries.append((f"{case.title} — fixed: {case.fix_title}", fixed.report))
    write_atomic(path, render_gallery(entries))
    return path


def quick_steps(steps: int | None, quick: bool) -> int:
    if steps is not None:
        return steps
    return 120 if quick else 300


__all__ = ["Config", "Case", "gallery", "train", "run_demo", "write_gallery", "replace"]
