"""The output logits' normaliser: log Z drifting away from 0 (output logit divergence).

Reads ``log_z_mean`` / ``log_z_max`` (recorder/logits.py: log Z = logsumexp of the
logits that enter ``cross_entropy``, on scheduled steps). Softmax ignores a shift of
all logits, so nothing in the loss holds log Z in place: without a term that does
(PaLM's z-loss), Adam's per-coordinate steps let it wander, and once the logits are
large their low-precision rounding and the softmax's saturation turn the drift into a
divergence (Wortsman et al. 2023, arXiv 2309.14322, §3.2 "output logit divergence";
Chowdhery et al. 2022, PaLM, §5 "z-loss").
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import Record
from ._common import median, points, sci

#: |log Z| (mean over tokens) a run must have reached. Our choice: PaLM's z-loss
#: 1e-4 * log^2 Z weighs 0.0064 nats here, where it starts to pull. (log Z starts at
#: ln(classes) when the logits are ~0: 3.7 for 40 characters, 10.8 for GPT-2's 50,257
#: tokens; LOGZ_DRIFT measures from there.)
LOGZ_LEVEL = 8.0

#: ... and it moved this far away from 0 since the first recorded step (a pretrained
#: model whose log Z sits at -60 from the start is not drifting). Our choice: the
#: softmax's normaliser grew e^5 ~ 150x.
LOGZ_DRIFT = 5.0

#: ... and keeps moving: the median |log Z| of the last quarter of the points is this
#: many nats above that of the quarter before (flat at a high level is not a
#: divergence in progress). Our choice: measured on a drifting tiny GPT (examples/cases/
#: logit_drift_no_zloss.py), log Z rose ~0.55 nats per 50 steps with a wobble of ~0.3
#: between scheduled steps.
LOGZ_STILL_GROWING = 0.25

#: The loss "still falls" when the median of the last quarter is this fraction below
#: that of the quarter before (mini-batch noise of a plateau stays within it).
LOSS_FALLING = 0.02

#: Recorded points needed (scheduled steps: 7 points are 150 steps at the default every=25).
LOGZ_MIN_POINTS = 7

#: The z-loss term's weight (PaLM, Chowdhery et al. 2022, §5; OLMo 2 uses the same).
ZLOSS_COEFF = 1e-4

ZLOSS_SNIPPET = ("loss = loss + 1e-4 * torch.logsumexp(logits, dim=-1).pow(2).mean()"
                 "  # z-loss (PaLM): holds log Z near 0")


def output_logit_divergence(record: Record) -> list[Finding]:
    """log Z of the output logits grew past LOGZ_LEVEL, LOGZ_DRIFT away from where the
    run started, and was still growing over the last quarter of its points."""
    steps, values = points(record.get("log_z_mean"))
    n = len(values)
    if n < LOGZ_MIN_POINTS:
        return []
    q = max(2, n // 4)
    last, before = values[-q:], values[-2 * q:-q]
    end, prev, start = median(abs(v) for v in last), median(abs(v) for v in before), abs(values[0])
    if end < LOGZ_LEVEL or end - start < LOGZ_DRIFT or end - prev < LOGZ_STILL_GROWING:
        return []
    sign = 1.0 if median(last) >= 0 else -1.0
    # since when: the first point past the level (on the side it drifted to)
    since = next((s for s, v in zip(steps, values) if sign * v >= LOGZ_LEVEL), steps[-q])
    _, zmax = points(record.get("log_z_max"))
    lsteps, losses = points(record.get("loss"))
    loss_before = _median_between(lsteps, losses, steps[-2 * q], steps[-q])
    loss_end = _median_between(lsteps, losses, steps[-q], steps[-1] + 1)
    falling = (loss_end < (1 - LOSS_FALLING) * loss_before) if loss_before is not None and loss_end is not None else None
    rate = (median(last) - median(before)) / max(1, steps[-q] - steps[-2 * q])
    evidence = {
        "since": since, "first": values[0], "first_step": steps[0], "last": values[-1], "last_step": steps[-1],
        "max_log_z": max(zmax) if zmax else None, "per_step": rate,
        "values": [[s, v] for s, v in zip(steps, values)][-12:],
        "loss_still_falling": falling, "loss_before": loss_before, "loss_end": loss_end,
        "level": LOGZ_LEVEL, "drift": LOGZ_DRIFT, "still_growing": LOGZ_STILL_GROWING,
    }
    where = "positive (logits growing)" if sign > 0 else "negative (logits sinking together)"
    # Rising with a falling loss: the logits grow with the model's confidence (log Z ~ the
    # target's logit once the loss is small; a digit classifier's goes 2.3 -> 10.7 in 1000
    # healthy Adam steps): worth knowing, not a fault. Sinking (the direction softmax
    # cannot see) or growing while the loss no longer falls is the divergence.
    severity = "info" if sign > 0 and falling else "warning"
    loss_text = ("the loss is still falling, so the drift costs nothing yet" if falling
                 else "the loss is no longer falling" if falling is False else "")
    summary = (f"The output logits' log-partition log Z drifts away from 0: mean {sci(values[0], 3)} at step "
               f"{steps[0]}, {sci(values[-1], 3)} at step {steps[-1]} ({where}), past {LOGZ_LEVEL:g} since step "
               f"{since} and still moving ~{sci(abs(rate))} per step" + (f"; {loss_text}." if loss_text else "."))
    advice = ("Nothing in cross_entropy holds log Z = logsumexp(logits) in place (softmax ignores a shift of all "
              "logits); once the logits are large, bf16/fp16 rounding and the softmax's saturation turn the "
              "drift into a divergence late in training (Wortsman et al. 2023, §3.2). Add PaLM's z-loss, "
              f"{ZLOSS_COEFF:g} * log^2 Z, to the loss where it is computed:\n"
              f"    {ZLOSS_SNIPPET}\n"
              "Weight decay on the output layer (and its bias) also holds the logits' scale; a lower learning "
              "rate slows the drift.")
    return [Finding(code="output_logit_divergence", severity=severity, step=since, layers=(),
                    summary=summary, evidence=evidence, advice=advice)]


def _median_between(steps: list[int], values: list[float], lo: int, hi: int) -> float | None:
    vals = [v for s, v in zip(steps, values) if lo <= s < hi and math.isfinite(v)]
    return median(vals) if vals else None
