"""What the trainer callbacks share: one manually driven :class:`~gradvitals.watcher.Watch`,
the optimizer-step bookkeeping, and writing the report at the end.

No probe and no rule lives here: a callback only tells the core recorder when an
optimizer step begins (final gradients, before clipping) and when it has ended.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import torch

from ..record import Record
from ..recorder import Options
from ..report import Report, write_atomic
from ..watcher import Watch

log = logging.getLogger("gradvitals")

#: File name (without suffix) of the reports a callback writes into the trainer's folder.
REPORT_STEM = "gradvitals"


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"gradvitals.integrations.{extra} needs {module.split('.')[0]}: "
                          f"pip install 'gradvitals[{extra}]'") from exc


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer): step hooks and identity belong to the inner one."""
    seen = 0
    while seen < 4 and not _is_plain(optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _is_plain(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", None)
    return isinstance(optimizer, torch.optim.Optimizer) and not isinstance(inner, torch.optim.Optimizer)


class StepDriver:
    """Drives one Watch from a trainer's events.

    Guards: a step is marked only where the trainer really steps an optimizer (never
    per accumulation micro-batch); several optimizers begun in one batch are ended
    together, in order; an optimizer begun twice before an end closes its first step.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        Options.from_kwargs(dict(options))  # bad options fail when the callback is built
        self.options = dict(options)
        self.watch: Watch | None = None
        self._open: list[torch.optim.Optimizer] = []

    @property
    def record(self) -> Record | None:
        return self.watch.record if self.watch is not None else None

    def start(self, model: torch.nn.Module, optimizers: Iterable[Any], *, drive: str = "manual",
              **run: Any) -> Watch:
        if self.watch is not None:  # a second fit() with the same callback: a new record
            self.watch.close()
        opts = [unwrap_optimizer(o) for o in optimizers if o is not None]
        self.watch = Watch(model, opts or None, drive=drive, **self.options)
        self.watch.record.run.update(run)
        self._open = []
        return self.watch

    def log_loss(self, loss: Any) -> None:
        if self.watch is not None:
            self.watch.log_loss(loss)

    def begin(self, optimizer: Any, *, sum_losses: bool = False) -> bool:
        """``optimizer`` holds this step's final gradients; True when recorded."""
        if self.watch is None:
            return False
        opt = unwrap_optimizer(optimizer)
        if any(o is opt for o in self._open):
            self.end()
        self.watch.step_begin(opt, sum_losses=sum_losses)
        self._open.append(opt)
        return True

    def end(self) -> None:
        """The optimizers begun since the last end have stepped."""
        if self.watch is None:
            return
        began, self._open = self._open, []
        for opt in began:
            self.watch.step_end(opt)

    def finish(self, folder: str | Path | None, *, write: bool, quiet: bool,
               error: BaseException | None = None) -> Report | None:
        """Close the watch, diagnose, and (on the main process) write and announce the report.
        Never raises: the user's training must not fail because of its report."""
        watch, self.watch = self.watch, None
        self._open = []  # an interrupted step: its update never happened
        if watch is None:
            return None
        try:
            watch.close()
            if error is not None:
                watch.record.run["error"] = f"{type(error).__name__}: {error}"
            report = watch.diagnosis()
            paths = write_reports(report, folder) if write and folder is not None else []
            if write and not quiet:
                where = "".join(f"\n  report: {p}" for p in paths)
                print(f"gradvitals: {report.verdict}{where}", file=sys.stderr)
            return report
        except Exception as exc:
            log.warning("gradvitals: could not write the report (%s: %s)", type(exc).__name__, exc)
            return None


def write_reports(report: Report, folder: str | Path) -> list[Path]:
    """``gradvitals.json`` (and ``gradvitals.html`` when the HTML renderer is available)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [report.save(folder / f"{REPORT_STEM}.json")]
    try:
        from ..reports.html import render_html
    except ImportError:
        return paths
    paths.append(write_atomic(folder / f"{REPORT_STEM}.html", render_html(report.to_json())))
    return paths


def layer_grad_norms(record: Record, step: int) -> dict[str, float]:
    """A logger's scalars for ``step``: each layer's gradient norm (the record's,
    :meth:`Record.layer_grad_norms`, from the values the recorder already fetched: no
    device access) and the global norm."""
    metrics = {f"gradvitals/grad_norm/{layer}": values[-1]
               for layer, (_, values) in record.layer_grad_norms(step).items()}
    total = record.get("grad_norm_global")
    if total is not None and total.last_step == step:
        metrics["gradvitals/grad_norm_global"] = total.last_value
    return metrics
