"""The recorder: probes -> recorder -> record. ``Recorder`` (facade.py) receives the
training loop's events (events.py) and hands each to the part that owns it:

- registry.py   models, optimizers, parameter ownership and naming
- clock.py      which optimizer step is open
- losses.py     the step's loss
- activations.py / outputs.py   which module outputs are measured, and measuring them
- gradients.py  gradient / weight norms, update ratios, clipping (one code path)
- staging.py    values waiting for the step's one host sync, and the flush
- origin.py     where the first NaN/Inf came from
- checks.py     run-level checks: gradients not zeroed, eval-mode training,
                a loss fed probabilities, k-fold segments

See docs/architecture.md.
"""

from .events import TrainingEvents
from .facade import Recorder
from .options import Options
from .registry import WatchedModel, WatchedOptimizer

__all__ = ["Options", "Recorder", "TrainingEvents", "WatchedModel", "WatchedOptimizer"]
