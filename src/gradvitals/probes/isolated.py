"""A forward gradvitals runs on the user's model for its own sake (a NaN replay, an
activation trace) must leave no trace in the run: the RNG streams it draws from are
forked (CPU and the model's CUDA devices) and the buffers it updates (BatchNorm running
statistics) are put back afterwards."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[list[Tensor]]:
    """Fork the RNG and restore ``model``'s buffers on exit; yields the buffers."""
    buffers = list(model.buffers())
    saved = [b.detach().clone() for b in buffers]
    devices = sorted({t.device.index for t in [*model.parameters(), *buffers]
                      if t.device.type == "cuda" and t.device.index is not None})
    try:
        with torch.random.fork_rng(devices=devices):
            yield buffers
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
