"""What to record and how often: the options of ``gv.watch`` / ``gradvitals run``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

from ..record import DEFAULT_CAP


@dataclass
class Options:
    """What to record and how often. Every field is a ``gv.watch(**options)`` keyword."""

    #: Activation stats, weight norms and update ratios every this many steps
    #: (gradient norms and the loss are recorded every step). Step 0 always.
    every: int = 25
    #: ... and every this many steps once the run is past ``late_after`` steps (None:
    #: 4 x ``every``). Most failures show early; a long run's record decimates to
    #: ``cap`` points anyway; this keeps the scheduled probes' share of a long run at a
    #: quarter of the early one's. ``late_every=every`` keeps one rate throughout.
    late_every: int | None = None
    late_after: int = 1000
    #: Record everything every step (for debugging; costs more).
    full: bool = False
    #: Points kept per series before decimation.
    cap: int = DEFAULT_CAP
    #: Collect activation statistics on scheduled steps.
    activations: bool = True
    #: Replay the step that first produced NaN/Inf to find the module it came from.
    nonfinite_origin: bool = True
    #: Model name used as a prefix when several models are watched ("netD:main.0").
    name: str | None = None
    #: Write per-layer gradient norms, update ratios and the loss to TensorBoard here.
    tensorboard: str | None = None
    #: Rewrite the report every this many seconds of wall time while the run goes on,
    #: when it has a path (``--json``/``--html``, ``gv.watch(path=...)``): a run killed
    #: without a chance to write it (SIGKILL, OOM, node loss) leaves one this recent.
    #: None or 0: off. (See gradvitals.autosave.)
    autosave_s: float | None = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"every must be a positive integer (steps), got {self.every!r}")
        if self.late_every is None:
            self.late_every = 4 * self.every
        if not isinstance(self.late_every, int) or isinstance(self.late_every, bool) or self.late_every < 1:
            raise ValueError(f"late_every must be a positive integer (steps) or None, got {self.late_every!r}")
        if not isinstance(self.late_after, int) or isinstance(self.late_after, bool) or self.late_after < 0:
            raise ValueError(f"late_after must be a non-negative integer (steps), got {self.late_after!r}")
        if not isinstance(self.cap, int) or self.cap < 16:
            raise ValueError(f"cap must be an integer >= 16 (points per series), got {self.cap!r}")
        for flag in ("full", "activations", "nonfinite_origin"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"name must be a non-empty string or None, got {self.name!r}")
        if self.tensorboard is not None and not isinstance(self.tensorboard, (str, os.PathLike)):
            raise ValueError(f"tensorboard must be a folder path (str) or None, got {self.tensorboard!r}")
        a = self.autosave_s
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 0 or a == math.inf):
            raise ValueError(f"autosave_s must be a number of seconds >= 0 (0 or None: off), got {a!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Options:
        allowed = {f.name for f in fields(cls)}
        bad = sorted(set(kwargs) - allowed)
        if bad:
            raise TypeError(f"unknown watch option(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
        return cls(**kwargs)


def scheduled(options: Options, step: int) -> bool:
    """Whether ``step`` runs the scheduled probes (activations, weights, update ratios)."""
    return options.full or step % (options.every if step < options.late_after else options.late_every) == 0
