"""The step's loss: caught at each ``backward()`` (or ``autograd.grad``, or given with
``log_loss``), kept as a device tensor, and combined into one value per step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .staging import cpu_floats

#: A step's loss is the mean of at most this many backward() losses (the latest):
#: an optimizer that never steps must not hold every loss of the run.
MAX_STEP_LOSSES = 1024


class LossTracker:
    """The losses of the open step, and which forward each came from."""

    def __init__(self) -> None:
        self.pending: list[Tensor] = []  # this step's backward() losses (detached, on their device)
        self.grad_losses: list[Tensor] = []  # see autograd_grad
        self.explicit = False  # log_loss() was called: no automatic capture
        self.saw_forward = False  # a root training forward was ever seen
        self.forwards = 0  # root training forwards seen (which forward a backward's loss came from)
        self.forward_since_flush = False  # ... since the last measured step
        self._scaled: tuple[Tensor, Tensor, float | None] | None = None  # (loss * scale, the loss, its divisor)
        self._div: float | None = None  # the divisor of the loss whose backward runs (loss_divisor)

    def forward_seen(self) -> None:
        """A root training forward ended (its loss, if any, comes from this forward)."""
        self.saw_forward = self.forward_since_flush = True
        self.forwards += 1

    def before_backward(self, tensor: Any) -> None:
        # Read before the backward, which frees what the autograd node saved.
        self._div = loss_divisor(tensor)

    def capture(self, tensor: Any, seed: Any, closure_measured: bool) -> None:
        """A backward ended: keep its loss (a one-element float tensor) for the step."""
        if (isinstance(tensor, (list, tuple)) and tensor
                and all(isinstance(t, Tensor) and t.numel() == 1 and t.is_floating_point() for t in tensor)):
            # torch.autograd.backward([loss_a, loss_b]): the gradient of their sum (of
            # their sum weighted by one-element grad_tensors); on their device, no sync
            parts = [t.detach().reshape(()).float() for t in tensor]
            if seed is not None:
                seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
                if len(seeds) != len(parts) or not all(isinstance(g, Tensor) and g.numel() == 1 for g in seeds):
                    parts = []
                else:
                    parts = [t * g.detach().reshape(()).float().to(t.device) for t, g in zip(parts, seeds)]
            tensor = torch.stack([p.to(parts[0].device) for p in parts]).sum() if parts else None
        if (isinstance(tensor, Tensor) and tensor.numel() == 1 and tensor.is_floating_point()
                and not self.explicit and not closure_measured):
            loss = tensor.detach()
            if loss.dim():
                loss = loss.reshape(())
            scaled, self._scaled = self._scaled, None
            div = self._div
            if scaled is not None and scaled[0] is tensor:
                loss = scaled[1].reshape(())  # GradScaler: the user's loss, not loss * 65536
                div = scaled[2]
            if div is not None:
                loss._gv_div = div  # (ours: a detached copy) see step_loss
            if self.saw_forward:
                loss._gv_fwd = self.forwards  # see step_loss
            self.pending.append(loss)
            if len(self.pending) > MAX_STEP_LOSSES:
                del self.pending[0]

    def loss_scaled(self, scaled: Any, loss: Any) -> None:
        """``scaler.scale(loss)``: the backward of ``scaled`` is the user's ``loss``. Kept
        as given (not ``scaled / scale``: a large scale can overflow ``scaled`` to Inf
        while the scaled gradients stay finite and the step is taken)."""
        if (isinstance(scaled, Tensor) and scaled.numel() == 1 and isinstance(loss, Tensor)
                and loss.numel() == 1 and loss.is_floating_point()):
            self._scaled = (scaled, loss.detach(), loss_divisor(loss))

    def autograd_grad(self, outputs: Any, inputs: Any, optimized: set[int]) -> None:
        """``torch.autograd.grad(loss, params)`` with parameters an optimizer holds
        (``optimized``: their ids): the loss of a loop that sets ``p.grad`` itself. Used
        only for a step that ran no backward (a gradient penalty, a meta-learning inner
        step, go with one)."""
        outs = [outputs] if isinstance(outputs, Tensor) else list(outputs) if isinstance(outputs, (list, tuple)) else []
        if not outs or not all(isinstance(t, Tensor) and t.numel() == 1 and t.is_floating_point() for t in outs):
            return
        ins = [inputs] if isinstance(inputs, Tensor) else list(inputs) if isinstance(inputs, (list, tuple)) else []
        if not any(id(t) in optimized for t in ins):
            return
        loss = outs[0].detach().reshape(()).float()
        if len(outs) > 1:
            loss = torch.stack([t.detach().reshape(()).float().to(loss.device) for t in outs]).sum()
        self.grad_losses.append(loss)
        if len(self.grad_losses) > MAX_STEP_LOSSES:
            del self.grad_losses[0]

    def log_loss(self, loss: Any) -> None:
        """Record this step's loss explicitly (disables the automatic capture)."""
        self.explicit = True
        if isinstance(loss, Tensor):
            self.pending.append(loss.detach().reshape(-1)[0].float())
        else:
            self.pending.append(torch.tensor(float(loss)))

    def step_begins(self) -> None:
        """An optimizer is about to step: a step that ran no backward takes the losses
        it differentiated with autograd.grad."""
        if self.grad_losses:
            if not self.pending:
                self.pending = self.grad_losses
            self.grad_losses = []

    def sum_pending(self) -> None:
        """The trainer divided each accumulation micro-batch's loss so that they add up
        to the step's loss (HF Trainer): one sum instead of their mean."""
        if len(self.pending) > 1:
            self.pending = [torch.stack([l.to(self.pending[0].device) for l in self.pending]).sum()]

    def take(self) -> Tensor | None:
        """The step's loss (float32, on its device), and the step's losses are cleared."""
        losses = self.pending
        if not losses:
            return None
        self.pending = []
        loss = losses[0] if len(losses) == 1 else step_loss(losses)
        return loss if loss.dtype == torch.float32 else loss.float()


def loss_divisor(t: Any) -> float | None:
    """k when ``t`` is a one-element loss divided by the number k (or multiplied by 1/k),
    as gradient-accumulation loops normalise each micro-batch's loss; else None. Read
    before its backward (which frees what the node saved); a CPU scalar only (no
    device sync)."""
    gf = getattr(t, "grad_fn", None)
    if gf is None or type(gf).__name__ not in ("DivBackward0", "MulBackward0"):
        return None
    try:
        if t.numel() != 1:
            return None
        other = gf._saved_other
        if not (isinstance(other, Tensor) and other.numel() == 1 and other.is_cpu and not other.requires_grad):
            return None
        v = cpu_floats([other.reshape(())])[0]
    except Exception:
        return None
    if type(gf).__name__ == "MulBackward0":
        v = 1.0 / v if v else 0.0
    return v if v > 0 and math.isfinite(v) else None


def step_loss(losses: list[Tensor]) -> Tensor:
    """The loss of a step that ran several backwards. Backwards after one forward
    (``loss_a.backward(retain_graph=True); loss_b.backward()``) are terms of one
    objective: their sum. Across forwards (gradient accumulation, a micro-batch each):
    the sum when each micro-batch's loss was divided by their number (``loss / accum``:
    the sum is the loss the user knows, the mean of the undivided ones), else the mean."""
    dev = losses[0].device
    parts: list[Tensor] = []
    divs: list[float | None] = []
    last = None
    for l in losses:
        fwd, div = getattr(l, "_gv_fwd", None), getattr(l, "_gv_div", None)
        if parts and fwd is not None and fwd == last:  # another term of the same forward's
            parts[-1] = parts[-1] + l.to(dev)
            if div != divs[-1]:
                divs[-1] = None
        else:
            parts.append(l.to(dev))
            divs.append(div)
        last = fwd
    n = len(parts)
    if n == 1:
        return parts[0]
    stacked = torch.stack(parts)
    if all(d is not None and abs(d - n) <= 1e-6 * n for d in divs):
        return stacked.sum()
    return stacked.mean()
