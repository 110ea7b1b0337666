"""``gv.watch``: attach gradvitals to a model (and its optimizers) in your own loop."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

import torch
from torch import nn

import logging

from .record import Record
from . import autosave, distributed
from .autosave import mark_complete
from .recorder import Options, Recorder
from .report import Report, ReportDict, check_writable, write_atomic
from .reports import tensorboard

log = logging.getLogger("gradvitals")


DRIVES = ("hooks", "manual")


class Watch:
    """A live watch over one or more models. Use as a context manager or call
    :meth:`close`. ``record`` is the plain-data record, ``report()`` the JSON contract.

    ``drive="manual"``: no optimizer hooks; the caller marks each optimizer step with
    :meth:`step_begin` (final gradients, before clipping) and :meth:`step_end` (after
    the update). For trainers that run forward and backward inside ``optimizer.step``.
    """

    def __init__(self, model: nn.Module | Iterable[nn.Module], optimizer: Any = None, *,
                 drive: str = "hooks", path: str | os.PathLike[str] | None = None,
                 html: str | os.PathLike[str] | None = None, status: bool | None = None,
                 **options: Any) -> None:
        if drive not in DRIVES:
            raise ValueError(f"drive must be one of {', '.join(map(repr, DRIVES))}, got {drive!r}")
        self.drive = drive
        self.path, self.html = path, html
        for flag, where in (("path", path), ("html", html)):
            if where is not None:
                if not isinstance(where, (str, os.PathLike)):
                    raise TypeError(f"{flag} must be a file path (str or os.PathLike) or None, got {type(where).__name__}")
                why = check_writable(where)
                if why:
                    raise ValueError(f"{flag}={str(where)!r}: cannot write the report there ({why})")
        models = _as_list(model, nn.Module, "model")
        optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer") if optimizer is not None else []
        self.options = Options.from_kwargs(options)
        # drive="manual": steps come from step_begin, never from a backward()
        self._recorder = Recorder(self.options, manual_steps=drive == "manual")
        try:
            tensorboard.open_for(self._recorder, self.options.tensorboard)
            for m in models:
                self._recorder.add_model(m, label=self.options.name if len(models) == 1 else None)
            for opt in optimizers:
                self._recorder.add_optimizer(opt, local_hooks=drive == "hooks")
        except BaseException:
            self._recorder.close()
            raise
        if distributed.writes_report():
            autosave.attach(self._recorder, path, html, self.options.autosave_s)
            _attach_status(self._recorder, status)

    # -- the record --------------------------------------------------------
    @property
    def record(self) -> Record:
        """The record so far (recent per-parameter gradient norms waiting on the device
        are fetched first)."""
        self._recorder.sync()
        return self._recorder.record

    @property
    def step(self) -> int:
        """Optimizer steps recorded so far."""
        return self._recorder.step

    def log_loss(self, loss: Any) -> None:
        """Give this step's loss explicitly (otherwise taken from ``loss.backward()``)."""
        self._recorder.log_loss(loss)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._recorder.add_optimizer(_as_list(optimizer, torch.optim.Optimizer, "optimizer")[0],
                                     local_hooks=self.drive == "hooks")

    def trains_in(self, model: nn.Module, wrapper: nn.Module) -> None:
        """``model`` is trained inside ``wrapper``, a module this watch never sees called
        (the ``DistributedDataParallel`` a trainer wraps the watched model in): under
        torchrun its parameters are then judged as DDP's replicas."""
        self._recorder.trains_in(model, wrapper)

    def step_begin(self, optimizer: torch.optim.Optimizer, *, sum_losses: bool = False) -> None:
        """(``drive="manual"``) ``optimizer`` is about to step: record its gradients.
        ``sum_losses``: the step's micro-batch losses add up to its loss (see Recorder)."""
        self._recorder.step_begin(optimizer, sum_losses=sum_losses)

    def step_end(self, optimizer: torch.optim.Optimizer) -> None:
        """(``drive="manual"``) ``optimizer`` has stepped: update ratios; next step."""
        self._recorder.step_end(optimizer)

    def report(self) -> dict[str, Any]:
        """The JSON report (schema gradvitals.report/1) as a dict (shown as the HTML
        report when it is a notebook cell's value)."""
        return ReportDict(self.diagnosis().to_json())

    def diagnosis(self) -> Report:
        self._recorder.finish()
        return Report.from_record(self._recorder.report_record())

    def save(self, path: str | os.PathLike[str]) -> Report:
        """Write the JSON report atomically; returns the Report. Under torchrun only
        rank 0 writes (every rank holds the same merged record)."""
        rep = self.diagnosis()
        if distributed.writes_report():
            rep.save(path)
        return rep

    # -- lifetime ----------------------------------------------------------
    def pause(self) -> None:
        """Stop watching for now (an evaluation loop, a phase you don't want in the
        record): every hook and patch is detached, so the model trains exactly as
        unwatched and no step is counted. The record is kept. Idempotent."""
        self._recorder.pause()

    def resume(self) -> None:
        """Watch again after :meth:`pause`; the step count carries on. Idempotent."""
        self._recorder.resume()

    @property
    def is_paused(self) -> bool:
        return self._recorder.paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[Watch]:
        """``with w.paused(): evaluate(model)`` pauses inside the block (unless it already was)
        and resumes after it, even on an exception."""
        was = self._recorder.paused
        self._recorder.pause()
        try:
            yield self
        finally:
            if not was:
                self._recorder.resume()

    def close(self, *, ended: str = "closed") -> None:
        """Remove every hook gradvitals attached and, given ``path``/``html``, write
        the final report there (``run.complete: true``; a failed write is warned
        about, never raised into the training script). Idempotent."""
        if self._recorder.closed:
            return
        self._recorder.close()  # stops the autosave first
        tensorboard.close_for(self._recorder)
        progress = self._recorder.progress
        if progress is not None:
            if hasattr(progress, "finish"):
                progress.finish(self._recorder.record)
            progress.close()
        if (self.path is None and self.html is None) or not distributed.writes_report():
            return
        mark_complete(self._recorder.record, ended)
        rep = self.diagnosis()
        try:
            with distributed.sigterm_deferred():
                if self.path is not None:
                    rep.save(self.path)
                if self.html is not None:
                    from .reports.html import render_html

                    write_atomic(self.html, render_html(rep.to_json()))
        except OSError as exc:
            log.warning("gradvitals: could not write the report (%s); the last autosave, if any, "
                        "is what remains", exc)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, etype: Any, value: Any, tb: Any) -> None:
        ended = ("closed" if etype is None else "KeyboardInterrupt" if issubclass(etype, KeyboardInterrupt)
                 else "sys.exit" if issubclass(etype, SystemExit) else "exception")
        self.close(ended=ended)


def watch(model: nn.Module | Iterable[nn.Module], optimizer: Any = None, *, drive: str = "hooks",
          path: str | os.PathLike[str] | None = None, html: str | os.PathLike[str] | None = None,
          status: bool | None = None, **options: Any) -> Watch:
    """Watch ``model`` (one module or several). ``optimizer``: one, several, or None
    (then each ``backward()`` counts as a step). ``path`` / ``html``: the JSON / HTML
    report is written there when the watch closes and autosaved every ``autosave_s``
    seconds (default 60) until then. ``status``: a live status line (step, loss,
    gradient norm, findings so far); None: only in a Jupyter notebook, where it is one
    output updated in place. Options: see :class:`gradvitals.recorder.Options`.
    """
    return Watch(model, optimizer, drive=drive, path=path, html=html, status=status, **options)


def _attach_status(recorder: Recorder, status: bool | None) -> None:
    from .reports.progress import NotebookProgress, Progress, in_notebook

    notebook = in_notebook()
    if status is None:
        status = notebook
    if status:
        recorder.progress = NotebookProgress() if notebook else Progress()


def _as_list(obj: Any, kind: type, what: str) -> list[Any]:
    items = [obj] if isinstance(obj, kind) else list(obj) if isinstance(obj, (list, tuple)) else None
    if not items or not all(isinstance(i, kind) for i in items):
        raise TypeError(f"{what} must be a {kind.__module__}.{kind.__qualname__} or a list of them, "
                        f"got {type(obj).__name__}")
    return items
