"""TensorBoard output (``watch(..., tensorboard=DIR)``, ``--tensorboard DIR``).

The recorder feeds :meth:`TensorBoardSink.write_step` the values of each flush (after
they reached the record: only finite ones are logged, TensorBoard would break its
axis on a NaN); the driver that ends the run (``Watch.close``, ``gradvitals run``)
hands it the findings with :meth:`TensorBoardSink.finish`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..record import Record, split_key
from ..report import Report


class TensorBoardSink:
    def __init__(self, logdir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ImportError("tensorboard=... needs the tensorboard package: "
                              "pip install 'gradvitals[tensorboard]'") from exc
        self.writer = SummaryWriter(logdir)

    def write_step(self, record: Record, pending: list[tuple[int, list[str], Any]]) -> None:
        """Scalars for what one flush fetched: the loss, the global gradient norm, and
        per parameter and per layer the gradient norms and update ratios."""
        add = self.writer.add_scalar
        fetched = {k for _, keys, _ in pending for k in keys}
        if any(k.startswith("grad_norm/") for k in fetched):
            fetched.add("grad_norm_global")  # computed on the host from those (see Staging.flush)
        for key in ("loss", "grad_norm_global"):
            if key not in fetched:
                continue  # e.g. the last step's update ratios: this step's loss is already logged
            s = record.series.get(key)
            if s is not None and s.last_step is not None and math.isfinite(s.last_value):
                add(f"gradvitals/{key}", s.last_value, s.last_step)
        layers: dict[int, set[str]] = {}  # step -> the layers whose gradient norms this flush fetched
        for step, keys, _ in pending:
            for k in keys:
                q, name = split_key(k)
                if q in ("grad_norm", "update_ratio"):
                    v = record.series[k].last_value
                    if math.isfinite(v):
                        add(f"gradvitals/{k}", v, step)
                    if q == "grad_norm" and name is not None:
                        layers.setdefault(step, set()).add(record.layer_of(name))
        for step, names in layers.items():
            for layer, (_, values) in record.layer_grad_norms(step).items():
                if layer in names and values and math.isfinite(values[0]):
                    add(f"gradvitals/layer_grad_norm/{layer}", values[0], step)

    def finish(self, findings: Iterable[Any]) -> None:
        """One text entry per finding, then close the file."""
        try:
            seen: dict[str, int] = {}
            for f in findings:
                # One tag per finding: a second finding of the same code (two layers
                # each dying) gets its own tag instead of overwriting the first.
                n = seen[f.code] = seen.get(f.code, 0) + 1
                tag = f"gradvitals/{f.code}" if n == 1 else f"gradvitals/{f.code}/{f.layers[0] if f.layers else n}"
                self.writer.add_text(tag, f"**{f.severity}**: {f.summary}\n\n{f.advice}")
        finally:
            self.writer.close()


def open_for(recorder: Any, logdir: str | None) -> None:
    """The driver's start: a sink for ``recorder`` when a folder is given."""
    if logdir:
        recorder.tensorboard = TensorBoardSink(str(logdir))


def close_for(recorder: Any) -> None:
    """The driver's end, after the recorder closed: the findings of its final record,
    then the file closed. A failure is the run's probe error, never raised."""
    sink = recorder.tensorboard
    if sink is None:
        return
    recorder.tensorboard = None
    try:
        sink.finish(Report.from_record(recorder.record).findings)
    except Exception as exc:
        recorder.fail("tensorboard", exc)
