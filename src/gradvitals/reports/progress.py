"""The live status line of ``gradvitals run``: step, loss, global gradient norm and
the findings so far.

The recorder calls :meth:`Progress.update` after each host sync. It must cost next
to nothing: it only reads the Python floats the sync already fetched (the series'
last values), so it adds no device work and no sync; it redraws at most a few times
per second; the rules run on a slower, self-adjusting schedule. On a terminal it
redraws one line in place; otherwise (a log file, CI) it writes a plain line now and
then. It carries no colour, so ``NO_COLOR`` holds trivially. No torch here.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from typing import IO, Any, Callable

from .html_format import fmt

#: Redraw interval on a terminal: 4 updates/s reads as live and costs nothing.
TTY_INTERVAL_S = 0.25
#: Interval between plain lines when stderr is not a terminal: a log gets a line
#: every so often, not one per step.
PLAIN_INTERVAL_S = 15.0
#: The rules run at most this often for "findings so far".
FINDINGS_INTERVAL_S = 5.0
#: ... and at most this share of wall time: if one pass took longer, the next waits
#: proportionally (100 layers x 1,000 points can take tens of milliseconds).
FINDINGS_TIME_SHARE = 0.02


class Progress:
    """One status line for a running training script (see module docstring)."""

    def __init__(self, stream: IO[str] | None = None, *, interactive: bool | None = None,
                 interval_s: float | None = None, findings_interval_s: float = FINDINGS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval_s = interval_s if interval_s is not None else (
            TTY_INTERVAL_S if interactive else PLAIN_INTERVAL_S)
        self.findings_interval_s = findings_interval_s
        self.clock = clock
        self.updates = 0  # lines drawn
        self._next_draw = -math.inf
        self._next_rules = -math.inf
        self._findings: list[Any] = []
        self._drawn = False
        self._failed = False

    def update(self, record: Any) -> None:
        """Called after every flush; draws only when the interval has passed. Never raises."""
        if self._failed:
            return
        now = self.clock()
        if now < self._next_draw:
            return
        self._next_draw = now + self.interval_s
        if now >= self._next_rules:
            try:
                self._run_rules(record, now)
            except Exception:  # a rule that fails mid-run: the line goes on without findings
                self._findings, self._next_rules = [], math.inf
        try:
            self._write(self.line(record))
        except Exception:  # a status line must never break the training (e.g. stderr closed)
            self._failed = True

    def _run_rules(self, record: Any, now: float) -> None:
        from ..diagnose import diagnose

        log = logging.getLogger("gradvitals")
        # a failing rule is reported once, by the final diagnosis, not every few seconds
        was_disabled, log.disabled = log.disabled, True
        started = time.perf_counter()
        try:
            self._findings = diagnose(record)  # pure: the record is left as it was
        finally:
            log.disabled = was_disabled
        cost = time.perf_counter() - started
        self._next_rules = now + max(self.findings_interval_s, cost / FINDINGS_TIME_SHARE)

    def line(self, record: Any) -> str:
        """``gradvitals  step 120  loss 2.301  grad norm 3.10e-01  findings: 1 critical (nonfinite)``"""
        parts = [f"gradvitals  step {record.steps}"]
        loss = record.series.get("loss")
        if loss is not None and loss.last_step is not None:
            parts.append(f"loss {_fmt(loss.last_value)}")
        grad = record.series.get("grad_norm_global")
        if grad is not None and grad.last_step is not None:
            parts.append(f"grad norm {_fmt(grad.last_value)}")
        parts.append("findings: " + _summarize(self._findings))
        return "  ".join(parts)

    def _write(self, line: str) -> None:
        if self.interactive:
            width = shutil.get_terminal_size(fallback=(100, 24)).columns
            # \r + erase-line redraws in place; longer than the width would wrap and break that
            self.stream.write("\r\x1b[2K" + line[: max(width - 1, 20)])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True
        self.updates += 1

    def close(self) -> None:
        """Clear the live line so that what follows starts on a clean line."""
        if self.interactive and self._drawn:
            try:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self._drawn = False


def _summarize(findings: list[Any]) -> str:
    problems = [f for f in findings if f.severity in ("critical", "warning")]
    if not problems:
        return "none"
    counts = {}
    for f in problems:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    head = ", ".join(f"{n} {sev}" for sev, n in sorted(counts.items()))
    codes = []
    for f in problems:
        if f.code not in codes:
            codes.append(f.code)
    return f"{head} ({', '.join(codes[:3])}{', …' if len(codes) > 3 else ''})"


def _fmt(v: float) -> str:
    return fmt(v, sci=2)


#: Redraw interval in a notebook: each redraw is a message to the browser; twice a
#: second reads as live.
NOTEBOOK_INTERVAL_S = 0.5


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), where stderr is no terminal."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


class NotebookProgress(Progress):
    """The status line as one output of the cell, replaced in place on each redraw
    (IPython's ``display(..., display_id=True)`` then ``update``), not a line per
    redraw. :meth:`finish` draws the last step and the final findings."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("interval_s", NOTEBOOK_INTERVAL_S)
        super().__init__(stream=None, interactive=False, **kwargs)
        self._handle: Any = None

    def _write(self, line: str) -> None:
        from IPython.display import display

        bundle = {"text/plain": line}
        if self._handle is None:
            self._handle = display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        self._drawn = True
        self.updates += 1

    def finish(self, record: Any) -> None:
        """Draw the line once more now, with the rules run on the whole record."""
        if self._failed:
            return
        self._next_draw = self._next_rules = -math.inf
        self.update(record)

    def close(self) -> None:  # the last line stays in the cell's output
        self._drawn = False
