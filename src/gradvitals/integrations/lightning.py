"""gradvitals for Lightning: ``Trainer(callbacks=[GradVitalsCallback()])``.

Lightning's automatic optimization calls ``optimizer.step(closure)`` and runs forward
and backward *inside* that call, so the optimizer's own step pre-hook would see the
previous step's gradients. The callback marks the step itself instead:
``on_before_optimizer_step`` begins it (the closure has run, AMP gradients are
unscaled, clipping has not happened yet) and ``on_train_batch_end`` ends it.
Accumulation micro-batches have no ``on_before_optimizer_step``: one recorded step
per real optimizer step.

Activation statistics and the NaN-origin replay follow the LightningModule's own
``forward``: call the network as ``self(x)`` in ``training_step``.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import StepDriver, layer_grad_norms, require

L = require("lightning.pytorch", "lightning")


class GradVitalsCallback(L.Callback):
    """Record the run's vital signs and write ``gradvitals.json``/``.html`` into the
    trainer's log dir (or ``report_dir``) at the end, also after an exception.

    ``log_every_n_steps``: per-layer gradient norms go to the trainer's logger every this
    many optimizer steps (default: the trainer's ``log_every_n_steps``; 0 turns it off).
    Other keywords are ``gv.watch`` options (``every``, ``full``, ``tensorboard``, ...).
    """

    def __init__(self, report_dir: str | None = None, *, log_every_n_steps: int | None = None,
                 quiet: bool = False, **watch_options: Any) -> None:
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 0):
            raise ValueError(f"log_every_n_steps must be an integer >= 0 (0: off), got {log_every_n_steps!r}")
        self.report_dir = report_dir
        self.log_every_n_steps = log_every_n_steps
        self.quiet = quiet
        self._driver = StepDriver(watch_options)
        self._folder: str | None = None
        self.report = None  # the Report, once training ended

    @property
    def record(self) -> Any:
        return self._driver.record

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resolved now, on every rank: trainer.log_dir is a collective (broadcast), and an
        # exception may reach on_exception on one rank only.
        self._folder = self.report_dir or trainer.log_dir or trainer.default_root_dir
        watch = self._driver.start(pl_module, trainer.optimizers, integration=f"lightning {L.__version__}",
                                   accumulate_grad_batches=trainer.accumulate_grad_batches)
        wrapper = getattr(trainer.strategy, "model", None)  # strategy="ddp": DistributedDataParallel
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            watch.trains_in(pl_module, wrapper)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # The loss as training_step returned it: Lightning divided it by the accumulation
        # count and AMP multiplied it by the loss scale (device ops only, no sync).
        loss = loss.detach() * trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            loss = loss / scaler.scale(torch.ones((), device=loss.device))
        self._driver.log_loss(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self._driver.begin(optimizer):
            return
        every = trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps
        record, step = self._driver.record, self._driver.watch.step  # type: ignore[union-attr]
        if trainer.logger is not None and every and step % every == 0 and record is not None:
            metrics = layer_grad_norms(record, step)
            if metrics:
                trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._driver.end()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._finish(trainer, exception)

    def _finish(self, trainer: L.Trainer, error: BaseException | None) -> None:
        if self._driver.watch is None:
            return
        report = self._driver.finish(self._folder, write=trainer.is_global_zero, quiet=self.quiet, error=error)
        if report is not None:
            self.report = report
