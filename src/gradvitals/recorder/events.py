"""The recorder's event interface: what a training loop tells it, and who calls what.

Every caller outside the recorder package speaks to it through these methods only:

- root-model forward hooks (local ones from ``gv.watch``, process-global ones from
  ``gradvitals run``): :meth:`forward_start`, :meth:`forward_end`;
- the process-wide patches of probes/patches.py: :meth:`backward_start`,
  :meth:`backward_end`, :meth:`autograd_grad`, :meth:`clip_start`, :meth:`clip_end`,
  :meth:`loss_scaled`, :meth:`scaler_step_begin`, :meth:`scaler_step_end`;
- optimizer step hooks (local or global): :meth:`step_pre`, :meth:`step_post`;
- frameworks that drive the steps themselves (Lightning, the HF Trainer, via
  integrations/_common.py): :meth:`step_begin`, :meth:`step_end`, :meth:`log_loss`;
- the driver (``Watch``, the runner): :meth:`pause`, :meth:`resume`, :meth:`close`.

A listener that raises never reaches the training script: the caller reports it
with :meth:`fail`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class TrainingEvents(Protocol):
    def forward_start(self, model: Any) -> None:
        """A watched root model's forward begins (``model``: its registry entry)."""

    def forward_end(self, model: Any, args: tuple, kwargs: dict, output: Any = None,
                    raised: bool = False) -> None:
        """It returned ``output`` (``raised``: it raised instead)."""

    def backward_start(self, tensor: Any) -> None:
        """``tensor.backward()`` / ``torch.autograd.backward(tensor)`` begins."""

    def backward_end(self, tensor: Any, seed: Any = None) -> None:
        """... and ended; ``seed``: the gradient it was seeded with, if any."""

    def autograd_grad(self, outputs: Any, inputs: Any, seed: Any) -> None:
        """``torch.autograd.grad(outputs, inputs)`` ran (a loop setting ``p.grad`` itself)."""

    def clip_start(self, parameters: list, max_norm: float, norm_type: Any = 2.0) -> None:
        """``clip_grad_norm_`` / ``clip_grads_with_norm_`` is about to scale ``parameters``
        (``norm_type``: the norm ``clip_grad_norm_`` computes; the user's own for the other)."""

    def clip_end(self, total: Any, max_norm: float) -> None:
        """... and did: ``total`` is the norm it saw."""

    def loss_scaled(self, scaled: Any, scaler: Any, loss: Any = None) -> None:
        """``GradScaler.scale(loss)`` returned ``scaled``."""

    def scaler_step_begin(self, optimizer: Any) -> None:
        """``GradScaler.step(optimizer)`` begins (it may skip the optimizer's step)."""

    def scaler_step_end(self, optimizer: Any) -> None:
        """``GradScaler.step(optimizer)`` returned."""

    def before_destroy_process_group(self, group: Any) -> None:
        """``torch.distributed.destroy_process_group(group)`` is about to run."""

    def step_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``opt.step()`` is about to run (the optimizer step pre-hook)."""

    def step_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """``opt.step()`` ran (the post-hook)."""

    def step_begin(self, optimizer: torch.optim.Optimizer, *, sum_losses: bool = False) -> None:
        """A framework says: ``optimizer`` steps now, with this step's final gradients."""

    def step_end(self, optimizer: torch.optim.Optimizer) -> None:
        """A framework says: ``optimizer`` has stepped."""

    def log_loss(self, loss: Any) -> None:
        """This step's loss, given explicitly."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...

    def fail(self, probe: str, exc: BaseException) -> None:
        """A listener failed: reported once per probe, never raised."""

