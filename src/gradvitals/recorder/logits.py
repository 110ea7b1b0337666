"""log Z of the logits that enter ``cross_entropy``, on scheduled steps.

The root model's floating outputs of a scheduled step's training forward are kept
(references) until the step's first backward begins; the loss's autograd graph names
the node that made the cross-entropy's logits, and the output that node made is the
one measured (probes/log_z.py). Targets equal to the loss's ignore_index are left out
when the target has one entry per token. Nothing is read on the host: the two values
go to the staging's flush.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor
from torch.utils._pytree import tree_flatten

from ..probes import log_z, loss_graph
from .staging import Staging

KEYS = ["log_z_mean", "log_z_max"]


class LogZProbe:
    def __init__(self, staging: Staging, fail: Callable[[str, BaseException], None]) -> None:
        self.staging = staging
        self.fail = fail
        self.outputs: list[Tensor] = []  # a scheduled step's root outputs, until its backward
        self.step = -1  # the step the outputs belong to
        self.done = -1  # the last step measured

    def forward_ends(self, output: Any, step: int, is_scheduled: bool) -> None:
        if not is_scheduled or self.done == step:
            return
        try:
            leaves, _ = tree_flatten(output)
            outs = [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()
                    and t.grad_fn is not None and t.dim() >= 1]
            if outs:
                self.outputs, self.step = outs, step
        except Exception as exc:
            self.fail("log_z", exc)

    def backward_starts(self, root: Any, step: int) -> None:
        outs, self.outputs = self.outputs, []
        if not outs or self.step != step or self.done == step:
            return
        try:
            found = loss_graph.cross_entropy_input(root)
            if found is None:
                return
            node, classes, target, ignore = found
            for t in outs:
                if loss_graph.made_by(t) is not node:
                    continue
                dim = -1 if t.shape[-1] == classes else 1 if t.dim() >= 2 and t.shape[1] == classes else None
                if dim is None:
                    return
                keep = target != ignore if isinstance(target, Tensor) else None
                self.staging.pending.append((step, KEYS, log_z.log_z_stats(t, dim, keep)))
                self.done = step
                return
        except Exception as exc:
            self.fail("log_z", exc)

    def clear(self) -> None:
        """The step is taken: its outputs are the user's to free."""
        self.outputs = []
