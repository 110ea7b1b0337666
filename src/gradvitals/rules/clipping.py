"""Gradient clipping that does more than catch outliers: the threshold, not the
learning rate, sets the steps.

Decided from what ``clip_grad_norm_`` saw on each call (``clip_total_norm``,
``clip_max_norm``, ``clip_clipped``), over a window after warm-up: clipping in the
first steps of a run is normal (the gradient is large while the loss is), clipping
late in training is the alarm.
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

#: Fraction of the window's steps clipped that is an alarm when each clip is a large
#: cut (CLIP_SCALE_WARN). Norm clipping is meant to catch rare spikes (Pascanu et al.
#: 2013, "On the difficulty of training recurrent neural networks", sec. 3.2; GPT-3,
#: PaLM and Llama train with max_norm 1.0 as such a guard);
#: ZClip (Kumar et al. 2025, arXiv:2504.02507) treats a fixed threshold as a spike guard,
#: not a step-size control. No report publishes one number: 5% is our reading of
#: practice's "more than a few percent of late steps clipped" alarm.
CLIP_RATE_ALARM = 0.05

#: Leading share of the clip calls left out of the window (at least WARMUP_STEPS):
#: early-training clipping is normal (the classic SGD LSTM recipe clips its first ~10%).
CLIP_WARMUP_FRACTION = 0.1

#: Median gradient norm / max_norm at which constant clipping is a warning: every
#: update is shrunk 10x or more, whatever the learning rate says (a healthy
#: transformer/LSTM clipped at 1.0 typically sees norms 1-5x the threshold).
CLIP_SCALE_WARN = 10.0

#: A smaller shrink still earns a warning when the loss does not fall.
CLIP_SCALE_STALLED = 3.0


def clipping_always_active(record: Record) -> list[Finding]:
    """Gradient clipping triggered on (nearly) every step.

    Decides from the clip series over the window after warm-up (the first
    CLIP_WARMUP_FRACTION of the calls, at least WARMUP_STEPS): max_norm 0 is
    critical (it zeroes every gradient); clipped on >= CLIP_RATE_ALARM of the
    window with a median norm/max_norm over the clipped steps >= CLIP_SCALE_WARN
    (or >= CLIP_SCALE_STALLED while the loss does not fall) is a warning; clipped
    on >= CLIP_ALWAYS_FRACTION but mildly is info; rarer or milder clipping is what
    clipping is for.
    """
    _, max_norms = points(record.get("clip_max_norm"))
    steps, totals = points(record.get("clip_total_norm"))
    _, clipped = points(record.get("clip_clipped"))
    if not max_norms:
        return []
    max_norm = median(max_norms)
    n = min(len(steps), len(clipped))
    skip = max(WARMUP_STEPS, steps[0] + int(CLIP_WARMUP_FRACTION * (steps[n - 1] - steps[0] + 1))) if n else 0
    late = [i for i in range(n) if steps[i] >= skip] or list(range(n))
    if max_norm <= 0:
        summary = (f"clip_grad_norm_ is called with max_norm={max_norm:g}: it multiplies every gradient by "
                   f"0, so no weight ever changes.")
        return [Finding(code="clipping_always_active", severity="critical", step=steps[0] if steps else 0,
                        layers=(), summary=summary, evidence={"max_norm": max_norm, "calls": len(max_norms)},
                        advice="Pass a positive max_norm, about the typical gradient norm (1.0 is the usual "
                               "start): `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)`.")]
    if len(late) < CLIP_MIN_CALLS:
        return []
    cut = [i for i in late if clipped[i] > 0]
    frac = len(cut) / len(late)
    if frac < CLIP_RATE_ALARM or not cut:
        return []
    norms = sorted(totals[i] for i in late)
    # "By how much": the cut on the steps that were clipped (on an always-clipped
    # run, the median step's).
    scale = median(totals[i] for i in cut) / max_norm
    levels = loss_levels(record)
    stalled = levels is not None and math.isfinite(levels.progress) and levels.progress < PLATEAU_PROGRESS
    if scale >= CLIP_SCALE_WARN or (stalled and scale >= CLIP_SCALE_STALLED):
        severity = "warning"
    elif frac >= CLIP_ALWAYS_FRACTION:
        severity = "info"
    else:
        return []
    p90 = norms[min(len(norms) - 1, int(0.9 * len(norms)))]
    suggest = float(f"{p90:.1g}") if p90 > 0 else 1.0
    every = "every step" if frac >= CLIP_ALWAYS_FRACTION else "most steps" if frac >= 0.5 else "many steps"
    summary = (f"clip_grad_norm_ scaled the gradients down on {frac:.0%} of {len(late)} steps after "
               f"warm-up (from step {steps[late[0]]}), by {scale:.3g}x on the median clipped step "
               f"(norm {sci(scale * max_norm)} vs max_norm {max_norm:g}): the threshold, not the learning "
               f"rate, sets {every}.")
    evidence = {"clipped_fraction": frac, "calls": len(late), "clipped_calls": len(cut),
                "window_first_step": steps[late[0]], "max_norm": max_norm,
                "median_grad_norm": median(norms), "p90_grad_norm": p90, "median_scale": scale,
                "rate_alarm": CLIP_RATE_ALARM, "loss_stalled": stalled}
    advice = (("The gradient norm is far above max_norm on most steps after warm-up: the learning rate is "
               "too high for this model (lower it about 10x, or warm it up to a lower peak), and clipping "
               "is hiding it. " if frac < CLIP_ALWAYS_FRACTION else "")
              + f"Raise max_norm to about the gradient norm of a normal step (your 90th percentile is "
              f"{sci(p90)}), so clipping only catches outliers:\n"
              f"    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={suggest:g})\n"
              f"If you want smaller steps, lower the learning rate instead.")
    return [Finding(code="clipping_always_active", severity=severity, step=steps[late[0]], layers=(),
                    summary=summary, evidence=evidence, advice=advice)]
