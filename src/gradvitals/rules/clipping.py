"""Gradient clipping that never lets go: the threshold, not the learning rate,
sets every step.

Decided from what ``clip_grad_norm_`` saw on each call (``clip_total_norm``,
``clip_max_norm``, ``clip_clipped``).
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import Record
from ._common import WARMUP_STEPS, loss_levels, median, points, sci
from .loss import PLATEAU_PROGRESS

#: Clipping calls needed before "every step" means anything.
CLIP_MIN_CALLS = 10

#: Fraction of steps clipped that is "(nearly) every step".
CLIP_ALWAYS_FRACTION = 0.9

#: Median gradient norm / max_norm at which constant clipping is a warning: every
#: update is shrunk 10x or more, whatever the learning rate says (a healthy
#: transformer/LSTM clipped at 1.0 typically sees norms 1-5x the threshold).
CLIP_SCALE_WARN = 10.0

#: A smaller shrink still earns a warning when the loss does not fall.
CLIP_SCALE_STALLED = 3.0


def clipping_always_active(record: Record) -> list[Finding]:
    """Gradient clipping triggered on (nearly) every step.

    Decides from the clip series after WARMUP_STEPS: max_norm 0 is critical (it
    zeroes every gradient); clipped on >= CLIP_ALWAYS_FRACTION of calls with a
    median norm/max_norm >= CLIP_SCALE_WARN (or >= CLIP_SCALE_STALLED while the
    loss does not fall) is a warning; constant but mild clipping is info.
    """
    _, max_norms = points(record.get("clip_max_norm"))
    steps, totals = points(record.get("clip_total_norm"))
    _, clipped = points(record.get("clip_clipped"))
    if not max_norms:
        return []
    max_norm = median(max_norms)
    n = min(len(steps), len(clipped))
    late = [i for i in range(n) if steps[i] >= WARMUP_STEPS] or list(range(n))
    if max_norm <= 0:
        summary = (f"clip_grad_norm_ is called with max_norm={max_norm:g}: it multiplies every gradient by "
                   f"0, so no weight ever changes.")
        return [Finding(code="clipping_always_active", severity="critical", step=steps[0] if steps else 0,
                        layers=(), summary=summary, evidence={"max_norm": max_norm, "calls": len(max_norms)},
                        advice="Pass a positive max_norm, about the typical gradient norm (1.0 is the usual "
                               "start): `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)`.")]
    if len(late) < CLIP_MIN_CALLS:
        return []
    frac = sum(1 for i in late if clipped[i] > 0) / len(late)
    if frac < CLIP_ALWAYS_FRACTION:
        return []
    norms = sorted(totals[i] for i in late)
    scale = median(norms) / max_norm
    levels = loss_levels(record)
    stalled = levels is not None and math.isfinite(levels.progress) and levels.progress < PLATEAU_PROGRESS
    if scale >= CLIP_SCALE_WARN or (stalled and scale >= CLIP_SCALE_STALLED):
        severity = "warning"
    else:
        severity = "info"
    p90 = norms[min(len(norms) - 1, int(0.9 * len(norms)))]
    suggest = float(f"{p90:.1g}") if p90 > 0 else 1.0
    summary = (f"clip_grad_norm_ scaled the gradients down on {frac:.0%} of {len(late)} steps, by "
               f"{scale:.3g}x on the median step (norm {sci(median(norms))} vs max_norm {max_norm:g}): "
               f"the threshold, not the learning rate, sets every step.")
    evidence = {"clipped_fraction": frac, "calls": len(late), "max_norm": max_norm,
                "median_grad_norm": median(norms), "p90_grad_norm": p90, "median_scale": scale,
                "loss_stalled": stalled}
    advice = (f"Raise max_norm to about the gradient norm of a normal step (your 90th percentile is "
              f"{sci(p90)}), so clipping only catches outliers:\n"
              f"    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={suggest:g})\n"
              f"If you want smaller steps, lower the learning rate instead.")
    return [Finding(code="clipping_always_active", severity=severity, step=steps[late[0]], layers=(),
                    summary=summary, evidence=evidence, advice=advice)]
