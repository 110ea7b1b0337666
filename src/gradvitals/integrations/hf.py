"""gradvitals for the Hugging Face Trainer: ``Trainer(..., callbacks=[GradVitalsCallback()])``.

The Trainer calls ``on_pre_optimizer_step`` after gradient accumulation, right before
``optimizer.step()``, and ``on_optimizer_step`` right after it: the callback begins and
ends the recorded step there (micro-batches are never counted). The Trainer clips
*before* ``on_pre_optimizer_step`` (through accelerate: ``torch.nn.utils.clip_grad_norm_``
in older releases, ``get_total_norm`` + ``clip_grads_with_norm_`` in newer ones); the
recorder takes the per-parameter norms at that clip call, before the gradients are
scaled (and after accelerate unscaled fp16 gradients), and the step uses them.

transformers releases without these events call ``optimizer.step()`` without a
closure, so there the optimizer's own step hooks see the same gradients: the
callback falls back to them (and says so once).
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

from ._common import StepDriver, require

transformers = require("transformers", "hf")
TrainerCallback = transformers.TrainerCallback

log = logging.getLogger("gradvitals")

#: The optimizer-step events (transformers >= 4.43); without them the step hooks drive.
HAS_STEP_EVENTS = hasattr(TrainerCallback, "on_pre_optimizer_step") and hasattr(TrainerCallback, "on_optimizer_step")


class GradVitalsCallback(TrainerCallback):
    """Record the run's vital signs and write ``gradvitals.json``/``.html`` into
    ``args.output_dir`` (or ``report_dir``) when training ends, or when the process
    exits after an exception in ``trainer.train()``.

    Keywords are ``gv.watch`` options (``every``, ``full``, ``tensorboard``, ...).
    """

    def __init__(self, report_dir: str | None = None, *, quiet: bool = False, **watch_options: Any) -> None:
        self.report_dir = report_dir
        self.quiet = quiet
        self._driver = StepDriver(watch_options)
        self._step_events = HAS_STEP_EVENTS
        self._folder: str | None = None
        self._main_process = True
        self.report = None  # the Report, once training ended

    @property
    def record(self) -> Any:
        return self._driver.record

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            log.warning("gradvitals: the Trainer passed no model to on_train_begin; nothing is recorded")
            return
        if not self._step_events:
            log.warning("gradvitals: transformers %s has no on_pre_optimizer_step/on_optimizer_step; "
                        "recording from the optimizer's step hooks instead", transformers.__version__)
        self._driver.start(model, [optimizer], drive="manual" if self._step_events else "hooks",
                           integration=f"transformers {transformers.__version__}",
                           gradient_accumulation_steps=args.gradient_accumulation_steps)
        self._folder = self.report_dir or args.output_dir
        self._main_process = bool(state.is_world_process_zero)
        atexit.register(self._at_exit)  # HF has no exception event: a crashed train() still reports

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if self._step_events and optimizer is not None:
            # The Trainer divides each micro-batch's loss (by the accumulation count or by
            # the step's token count) so that they add up to the step's loss.
            self._driver.begin(optimizer, sum_losses=True)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_events:
            self._driver.end()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        atexit.unregister(self._at_exit)
        self._finish(None)

    def _at_exit(self) -> None:
        self._finish(RuntimeError("training did not reach on_train_end (interrupted or failed)"))

    def _finish(self, error: BaseException | None) -> None:
        if self._driver.watch is None:
            return
        report = self._driver.finish(self._folder, write=self._main_process, quiet=self.quiet, error=error)
        if report is not None:
            self.report = report
