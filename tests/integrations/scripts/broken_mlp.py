"""A plain training script (no gradvitals import) whose loss goes NaN: a deep ReLU MLP
with N(0, 1) weights trained full-batch by SGD at a learning rate far too high.

The integration tests import ``BrokenMLP`` and ``digits`` from here so that
``gradvitals run``, ``gv.watch``, the Lightning callback and the Hugging Face
callback all train the very same model on the very same batches.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
DEPTH = 8
WIDTH = 64
SAMPLES = 256  # one full batch: every path sees the same batch at every step
LR = 0.1


def build_net() -> nn.Sequential:
    torch.manual_seed(SEED)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        lin = nn.Linear(WIDTH, WIDTH)
        nn.init.normal_(lin.weight, 0.0, 1.0)  # std 1 instead of He's sqrt(2/64): explodes
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def forward(model: nn.Module, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    logits = model.net(x)
    out = {"logits": logits}
    if labels is not None:
        out["loss"] = F.cross_entropy(logits, labels)
    return out


class BrokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return forward(self, x, labels)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X[:SAMPLES], dtype=torch.float32), torch.tensor(y[:SAMPLES])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    x, y = digits()
    model = BrokenMLP()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(a.steps):
        loss = model(x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
