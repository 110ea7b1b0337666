"""The training matrix: small, plain training loops that stress how gradvitals finds
steps, models and gradients. No gradvitals import.

Run as a script (plainly or under ``gradvitals run``) it prints one line
``RESULT {json}``; imported, ``main(argv, attach)`` returns the same dict and calls
``attach(model, optimizers)`` whenever a model and its optimizer(s) come to exist (the
test passes ``gv.watch`` there). The result holds the torch oracle of what gradvitals
should record: the loss of every optimizer step (mean of the step's ``backward()``
losses) and every parameter's gradient norm at the optimizer step, plus a digest of
the final weights and RNG state for the bit-identical check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

D_IN, N_CLASSES, VOCAB = 16, 3, 50

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
}


def _no_attach(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """The plain run: nothing attached."""


def mlp(width: int = 32, norm: bool = False) -> nn.Sequential:
    mid: list[nn.Module] = [nn.BatchNorm1d(width)] if norm else []
    return nn.Sequential(nn.Linear(D_IN, width), *mid, nn.ReLU(), nn.Linear(width, N_CLASSES))


class Oracle:
    """What gradvitals should record, measured with plain torch (observation only)."""

    def __init__(self) -> None:
        self.step = 0
        self.backward: list[torch.Tensor] = []
        self.step_losses: list[float] = []
        self.grad_norms: dict[str, dict[str, dict[str, float]]] = {}  # model -> param -> step -> norm

    def loss(self, loss: torch.Tensor) -> None:
        """Call right after ``loss.backward()``."""
        self.backward.append(loss.detach().reshape(()))

    def grads(self, label: str, model: nn.Module) -> None:
        """Call right before ``optimizer.step()``."""
        out = self.grad_norms.setdefault(label, {})
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            out.setdefault(name, {})[str(self.step)] = torch.linalg.vector_norm(g.float()).item()

    def end_step(self) -> None:
        """Call after the step's last ``optimizer.step()``."""
        if self.backward:
            losses = self.backward
            loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
            self.step_losses.append(loss.float().item())
        self.backward = []
        self.step += 1


def data(n: int = 512, seed: int = 0, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D_IN, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return X * (1 + shift) + shift, y


def batches(X: torch.Tensor, y: torch.Tensor, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(X), (size,), generator=g)
        yield X[idx], y[idx]


def digest(*models: nn.Module) -> str:
    h = hashlib.sha256()
    for m in models:
        for k, t in m.state_dict().items():
            h.update(k.encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()


def _train_step(model, opt, x, y, o: Oracle, label: str = "model") -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    o.loss(loss)
    o.grads(label, model)
    opt.step()
    o.end_step()
    return loss


# ---------------------------------------------------------------- cases
def case_autocast_bf16(a: argparse.Namespace, attach, o: Oracle) -> list[nn.Module]:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attach(model, [opt])
    it = batches(*data(), 64)
    for _ in range(a.steps):
        x, y = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)  # autocast runs cross_entropy in float32
        opt.zero_grad()
        loss.backward()
        o.loss(loss)
        o.grads("model", model)
        opt.step()
        o.end_step()
    return [model]


def case_grad_accum(a, attach, o) -> list[nn.Module]:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach(model, [opt])
    it = batches(*data(), 16)
    for _ in range(a.steps):
        opt.zero_grad()
        for _ in range(a.micro):
            x, y = next(it)
            raw = F.cross_entropy(model(x), y)
            (raw / a.micro).backward()  # the usual normalisation of accumulated micro-batches
            o.loss(raw)  # the step's loss as the user knows it: the mean of the micro-batches'
        o.grads("model", model)
        opt.step()
        o.end_step()
    return [model]


def case_optimizer(a, attach, o) -> list[nn.Module]:
    model = mlp()
    opt = OPTIMIZERS[a.opt](model.parameters())
    attach(model, [opt])
    it = batches(*data(), 64)
    for _ in range(a.steps):
        _train_step(model, opt, *next(it), o)
    return [model]


def case_two_optimizers(a, attach, o) -> list[nn.Module]:
    """Body and head on different optimizers, clipped together: one step per iteration."""
    model = mlp()
    body = torch.optim.SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    attach(model, [body, head])
    it = batches(*data(), 64)
    for _ in range(a.steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        body.zero_grad()
        head.zero_grad()
        loss.backward()
        o.loss(loss)
        o.grads("model", model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        body.step()
        head.step()
        o.end_step()
    return [model]


class BagOfWords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, sparse=True)
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(tokens).mean(1))


def token_batches(size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, VOCAB, (size, 6), generator=g)
        yield tokens, (tokens[:, 0] % N_CLASSES)


def case_sparse(a, attach, o) -> list[nn.Module]:
    """nn.Embedding(sparse=True): SparseAdam on the embedding + Adam, or one SGD for all."""
    model = BagOfWords()
    if a.opt == "sgd":
        opts = [torch.optim.SGD(model.parameters(), lr=0.5)]
    else:
        opts = [torch.optim.SparseAdam(list(model.emb.parameters()), lr=1e-2),
                torch.optim.Adam(model.head.parameters(), lr=1e-2)]
    attach(model, opts)
    it = token_batches(32)
    for _ in range(a.steps):
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        o.loss(loss)
        o.grads("model", model)
        for opt in opts:
            opt.step()
        o.end_step()
    return [model]


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight (counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, VOCAB, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(tokens))))


def case_tied(a, attach, o) -> list[nn.Module]:
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attach(model, [opt])
    it = token_batches(32)
    for _ in range(a.steps):
        x, _ = next(it)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        o.loss(loss)
        o.grads("model", model)
        opt.step()
        o.end_step()
    return [model]


class Unrolled(nn.Module):
    """One block applied three times per forward (weight-shared recurrence)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, 32)
        self.block = nn.Linear(32, 32)
        self.act = nn.Tanh()
        self.head = nn.Linear(32, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x))
        for _ in range(3):
            h = self.act(self.block(h)) + h
        return self.head(h)


def case_reused_module(a, attach, o) -> list[nn.Module]:
    model = Unrolled()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attach(model, [opt])
    it = batches(*data(), 64)
    for _ in range(a.steps):
        _train_step(model, opt, *next(it), o)
    return [model]


def case_toggle_requires_grad(a, attach, o) -> list[nn.Module]:
    """The first layer is frozen for the middle third of the run, then unfrozen."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attach(model, [opt])
    it = batches(*data(), 64)
    third = a.steps // 3
    for step in range(a.steps):
        frozen = third <= step < 2 * third
        for p in model[0].parameters():
            p.requires_grad_(not frozen)
        _train_step(model, opt, *next(it), o)
    return [model]


def case_late_model(a, attach, o) -> list[nn.Module]:
    """netB (and its optimizer) is created after netA's first optimizer steps."""
    netA = mlp()
    optA = torch.optim.Adam(netA.parameters(), lr=1e-2)
    attach(netA, [optA])
    it = batches(*data(), 64)
    netB = optB = None
    for step in range(a.steps):
        if step == a.late:
            netB = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, N_CLASSES))
            optB = torch.optim.SGD(netB.parameters(), lr=0.1)
            attach(netB, [optB])
        x, y = next(it)
        lossA = F.cross_entropy(netA(x), y)
        optA.zero_grad()
        lossA.backward()
        o.loss(lossA)
        o.grads("netA", netA)
        optA.step()
        if netB is not None:
            lossB = F.cross_entropy(netB(x), y)
            optB.zero_grad()
            lossB.backward()
            o.grads("netB", netB)
            optB.step()
        o.end_step()  # the step's "loss" is the first optimizer's (netA's)
    return [netA] + ([netB] if netB is not None else [])


def case_eval_loops(a, attach, o) -> list[nn.Module]:
    """Evaluation on shifted data between training steps (mode: a.eval)."""
    model = mlp(norm=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, [opt])
    it = batches(*data(), 64)
    X_eval, y_eval = data(256, seed=7, shift=5.0)  # a different distribution
    for _ in range(a.steps):
        _train_step(model, opt, *next(it), o)
        if a.eval == "none":
            continue
        if a.eval == "eval_no_grad":
            model.eval()
            with torch.no_grad():
                F.cross_entropy(model(X_eval), y_eval).item()
            model.train()
        elif a.eval == "no_grad":  # no .eval(): BatchNorm updates its running stats, as the user asked
            with torch.no_grad():
                F.cross_entropy(model(X_eval), y_eval).item()
        elif a.eval == "inference":
            model.eval()
            with torch.inference_mode():
                model(X_eval).argmax(1)
            model.train()
        elif a.eval == "eval_grad":  # validation without no_grad (common): only .eval()
            model.eval()
            F.cross_entropy(model(X_eval), y_eval).item()
            model.train()
    return [model]


def case_sequence(a, attach, o) -> list[nn.Module]:
    """Two models trained one after the other, each with its own optimizer."""
    X, y = data()
    it = batches(X, y, 64)
    netA = mlp()
    optA = torch.optim.Adam(netA.parameters(), lr=1e-2)
    attach(netA, [optA])
    for _ in range(a.steps):
        x, t = next(it)
        lossA = F.cross_entropy(netA(x), t)  # called here, so `gradvitals run` names it netA
        optA.zero_grad()
        lossA.backward()
        o.loss(lossA)
        o.grads("netA", netA)
        optA.step()
        o.end_step()
    netB = nn.Sequential(nn.Linear(D_IN, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, N_CLASSES))
    optB = torch.optim.AdamW(netB.parameters(), lr=1e-3)
    attach(netB, [optB])
    for _ in range(a.steps):
        x, t = next(it)
        lossB = F.cross_entropy(netB(x), t)
        optB.zero_grad()
        lossB.backward()
        o.loss(lossB)
        o.grads("netB", netB)
        optB.step()
        o.end_step()
    return [netA, netB]


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def main(argv: list[str], attach: Callable[[nn.Module, list[torch.optim.Optimizer]], Any] = _no_attach) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=sorted(CASES), required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--late", type=int, default=3)
    p.add_argument("--opt", choices=sorted(OPTIMIZERS), default="adam")
    p.add_argument("--eval", choices=["none", "eval_no_grad", "no_grad", "inference", "eval_grad"], default="none")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # same reduction order in every process
    torch.manual_seed(0)
    o = Oracle()
    models = CASES[a.case](a, attach, o)
    return {"case": a.case, "steps": o.step, "step_losses": o.step_losses, "grad_norms": o.grad_norms,
            "digest": digest(*models)}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1:])))
