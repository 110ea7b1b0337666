"""The learning rate, judged by what it does: per-step update/weight ratios of the
weight layers *together with* the loss's behaviour.

A ratio alone decides nothing: a CNN with BatchNorm trains well at 2e-2 and an
SGD LSTM language model with clipping at 3e-2, so "too high" needs the loss to
misbehave as well (spike, NaN, or no progress), and "too low" needs even the
fastest-moving layer to crawl.
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import Record
from ._common import (
    WARMUP_STEPS,
    as_dict,
    first_nonfinite_step,
    loss_levels,
    median,
    points,
    reading,
    sci,
    weight_params,
)
from .activations import dead_relu
from .gradients import ABSOLUTE_EXPLODING, exploding_gradients
from .loss import PLATEAU_PROGRESS, find_spikes, spike_severity

#: The rule of thumb: a healthy step moves each weight matrix by ~1e-3 of its norm.
UPDATE_RATIO_TARGET = 1e-3

#: Typical (median over weight layers) ratio 10x above the target: too high when
#: the loss misbehaves too (healthy BatchNorm CNNs measured up to 2e-2).
UPDATE_RATIO_HIGH = 1e-2

#: Optimizers whose first step moves every weight by about the same amount whatever
#: the gradient's size (Adam: m/sqrt(v) = +-1 at step 1; RMSprop: +-10x; Adagrad,
#: Lion: +-1): their step-0 ratio is lr / rms(weight), set by the learning rate and the
#: init scale alone. Standard Adam (lr 1e-3) on PyTorch's default init of a 256-wide
#: layer reads ~0.03 there, a healthy start, and later steps shrink with the gradient's
#: consistency.
ADAPTIVE_OPTIMIZERS = frozenset({"Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adagrad",
                                 "Adadelta", "RMSprop", "Adafactor", "Lion", "LAMB", "Lamb"})
#: Their step-0 ratio that counts as too high: each first step rewrites a tenth of
#: every weight (Adam at lr 1e-2 on a 64-wide layer reads ~0.14; at lr 1e-3, ~0.014).
ADAPTIVE_FIRST_STEP_HIGH = 1e-1

#: Typical ratio at which a run that merely fails to learn (no spike, no NaN) is
#: blamed on the learning rate: each step rewrites a tenth of the weights.
UPDATE_RATIO_HIGH_PLATEAU = 1e-1

#: Even the fastest weight layer moving < 1e-5 of its norm per step (100x below
#: the target) is a learning rate too low (healthy runs measured >= 1e-4).
UPDATE_RATIO_LOW = 1e-5

#: With a loss that does not fall, the fastest layer a few x below the target
#: already explains it (SGD at lr=5e-4 on the digit MLP: head 2.6e-4, hidden
#: layers 3e-5, loss 2.35 -> 2.28 in 300 steps; stalled runs with a sane lr had
#: >= 1e-2 in their fastest layer).
UPDATE_RATIO_LOW_STALLED = 3e-4


#: A weight norm below this is a zero-initialised tensor: its ratio is meaningless.
ZERO_WEIGHT_NORM = 1e-6


def _typical_ratios(record: Record) -> dict[int, tuple[float, float, list[tuple[str, float]]]]:
    """Per scheduled step: (median, max, [(layer, ratio)]) over weight layers that got a gradient."""
    wps = weight_params(record)
    ratios = record.per_name("update_ratio")
    grads = record.per_name("grad_norm")
    weights = record.per_name("weight_norm")
    table: dict[int, list[tuple[str, float]]] = {}
    for wp in wps:
        r = as_dict(ratios.get(wp.param))
        g = as_dict(grads.get(wp.param))
        w = as_dict(weights.get(wp.param))
        for step, v in r.items():
            gv = g.get(step, math.nan)
            # a zero-initialised weight (residual branch, LoRA B) has no scale to move against
            if w.get(step, 1.0) < ZERO_WEIGHT_NORM:
                continue
            if math.isfinite(v) and math.isfinite(gv) and gv > 0:
                table.setdefault(step, []).append((wp.layer, v))
    return {s: (median(v for _, v in row), max(v for _, v in row), row) for s, row in sorted(table.items())
            if row}


def _lr(record: Record) -> float:
    """The run's median learning rate over its first optimizer's groups (NaN if unknown)."""
    vals = []
    for key, s in record.per_name("lr").items():
        vals.extend(points(s)[1])
    return median(vals)


def update_ratio_high(record: Record) -> list[Finding]:
    """Steps that rewrite the weights (learning rate too high), shown by the loss.

    Decides from ``update_ratio/<weight>`` (median over weight layers per
    scheduled step, leaving out steps whose global gradient norm was already past
    ABSOLUTE_EXPLODING) and the loss: fires when the typical ratio reached
    UPDATE_RATIO_HIGH at or before the loss spiked, went NaN after a climbing
    gradient (see ``exploding_gradients``), or
    reached UPDATE_RATIO_HIGH_PLATEAU in a run whose loss did not fall, or stayed
    >= UPDATE_RATIO_HIGH over the run while ReLU units died (``dead_relu``, after
    the first recorded step).
    Critical when the loss went NaN or diverged.
    """
    typical = _typical_ratios(record)
    if not typical:
        return []
    nan_step = first_nonfinite_step(record)
    spikes = find_spikes(record)
    if spikes and spike_severity(record, spikes) == "info":
        spikes = []  # a moderate spike the run recovered from is no verdict on the lr
    trouble = [s.step for s in spikes]
    if nan_step is not None and _nan_after_growth(record):
        trouble.append(nan_step)
    trouble_step = min(trouble) if trouble else None
    # Steps whose gradient was already past the exploding alarm moved the weights
    # because of the gradient, not the learning rate: exploding_gradients' business.
    grad_at = as_dict(record.get("grad_norm_global"))
    typical = {s: v for s, v in typical.items() if not grad_at.get(s, 0.0) >= ABSOLUTE_EXPLODING}
    first = min(typical) if typical else None
    opts = record.run.get("optimizers") or []
    first_bar = (ADAPTIVE_FIRST_STEP_HIGH if opts and all(o in ADAPTIVE_OPTIMIZERS for o in opts)
                 else UPDATE_RATIO_HIGH)
    high = [(s, med) for s, (med, _, _) in typical.items()
            if med >= (first_bar if s == first else UPDATE_RATIO_HIGH)
            and (trouble_step is None or s <= trouble_step)]
    levels = loss_levels(record, until=nan_step)
    stalled = levels is not None and math.isfinite(levels.progress) and levels.progress < PLATEAU_PROGRESS
    if trouble_step is not None and high:
        step, ratio = max(high, key=lambda x: x[1])
        why = ("the loss went NaN" if nan_step is not None and (not spikes or nan_step <= spikes[0].step)
               else f"the loss jumped at step {spikes[0].step}")
        severity = "critical" if nan_step is not None else "warning"
    elif stalled:
        very = [(s, med) for s, (med, _, _) in typical.items() if med >= UPDATE_RATIO_HIGH_PLATEAU]
        if not very:
            return []
        step, ratio = max(very, key=lambda x: x[1])
        why = "the loss did not fall"
        severity = "warning"
    elif (died := _units_died_under(record, typical, first_bar)) is not None:
        step, ratio, why = died
        severity = "warning"
    else:
        return []
    row = sorted(typical[step][2], key=lambda x: -x[1])
    layers = tuple(dict.fromkeys(l for l, _ in row))[:5]
    lr = _lr(record)
    lr_txt = f" (lr={sci(lr)})" if math.isfinite(lr) else ""
    summary = (f"Each step moved the weights by {sci(ratio)} of their norm at step {step}, "
               f"{ratio_words(ratio / UPDATE_RATIO_TARGET)} the healthy ~1e-3{lr_txt}, and {why}.")
    suggestion = f"lr={sci(lr / 10)}" if math.isfinite(lr) and lr > 0 else "lr / 10"
    evidence = {"update_ratio": ratio, "step": step, "target": UPDATE_RATIO_TARGET, "lr": lr if math.isfinite(lr) else None,
                "trouble_step": trouble_step, "loss_stalled": stalled,
                "ratio_by_layer": {l: v for l, v in row}}
    advice = (f"Lower the learning rate about 10x ({suggestion}) so that updates are ~1e-3 of the weights, "
              f"and warm it up over the first few hundred steps; clip the gradient norm as a safety net:\n"
              f"    optimizer = torch.optim.SGD(model.parameters(), {suggestion})  # or your optimizer\n"
              f"    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)")
    return [Finding(code="update_ratio_high", severity=severity, step=step, layers=layers, summary=summary,
                    evidence=evidence, advice=advice)]


def _units_died_under(record: Record, typical: dict[int, tuple[float, float, list[tuple[str, float]]]],
                      first_bar: float) -> tuple[int, float, str] | None:
    """(step, ratio, why) when ReLU units died while the steps were large: alive at the
    first recorded point, dead (see ``dead_relu``) from a later one, the typical ratio
    high at or before that step and its median over the run after WARMUP_STEPS at least
    UPDATE_RATIO_HIGH. The loss may still fall (the surviving units carry it); the dead
    units are the damage the learning rate did. None otherwise (dead from the init is
    the init's, not the learning rate's)."""
    dead = [f for f in reading(dead_relu, record) if f.severity in ("warning", "critical")]
    if not dead or not typical:
        return None
    death = dead[0].step
    first = min(typical)
    if death is None or death <= first:
        return None
    late = [med for s, (med, _, _) in typical.items() if s >= WARMUP_STEPS] or [m for m, _, _ in typical.values()]
    if median(late) < UPDATE_RATIO_HIGH:
        return None
    high = [(s, med) for s, (med, _, _) in typical.items()
            if s <= death and med >= (first_bar if s == first else UPDATE_RATIO_HIGH)]
    if not high:
        return None
    # An adaptive optimizer's first step is lr-sized by construction: a later one speaks.
    step, ratio = max([h for h in high if h[0] >= WARMUP_STEPS] or high, key=lambda x: x[1])
    worst = max(dead[0].evidence.get("dead_fraction_by_layer", {}).items(), key=lambda x: x[1], default=None)
    where = f" ({worst[1]:.0%} of the units after `{worst[0]}`)" if worst else ""
    return step, ratio, (f"ReLU units died under those steps by step {death}{where}, though the loss still "
                         f"falls (median ratio {sci(median(late))} over the run)")


def _nan_after_growth(record: Record) -> bool:
    """A NaN that large steps can explain: the gradient climbed into it. A NaN out of
    the blue (sqrt(0) in backward, bad data) says nothing about the learning rate."""
    return any(not f.evidence.get("at_init") and f.evidence.get("nonfinite_step") is not None
               for f in reading(exploding_gradients, record))


def update_ratio_low(record: Record) -> list[Finding]:
    """Steps too small to learn (learning rate too low, or updates zeroed).

    Decides from ``update_ratio/<weight>``: per scheduled step (after
    WARMUP_STEPS when there are such steps) the *largest* ratio over weight
    layers that received a gradient; fires when its median over the run is below
    UPDATE_RATIO_LOW, or below UPDATE_RATIO_LOW_STALLED when the loss fell less
    than PLATEAU_PROGRESS. Warning when the loss stalls, info when it still falls.
    """
    typical = _typical_ratios(record)
    nan_step = first_nonfinite_step(record)
    typical = {s: v for s, v in typical.items() if nan_step is None or s < nan_step}
    late = {s: v for s, v in typical.items() if s >= WARMUP_STEPS} or typical
    if not late:
        return []
    fastest = median(mx for _, mx, _ in late.values())
    levels = loss_levels(record, until=nan_step)
    progress = levels.progress if levels is not None else math.nan
    learning = math.isfinite(progress) and progress >= PLATEAU_PROGRESS
    stalled = math.isfinite(progress) and not learning
    limit = UPDATE_RATIO_LOW_STALLED if stalled else UPDATE_RATIO_LOW
    if not math.isfinite(fastest) or fastest >= limit:
        return []
    severity = "info" if learning else "warning"
    step = min(late)
    layers = tuple(dict.fromkeys(l for s in late for l, _ in late[s][2]))[:5]
    lr = _lr(record)
    lr_txt = f"lr={sci(lr)}" if math.isfinite(lr) else "the learning rate"
    if fastest == 0:
        summary = (f"No weight changed in {len(late)} recorded steps although gradients were non-zero: "
                   f"every update was exactly 0.")
        factor_txt = "much higher"
    else:
        factor = UPDATE_RATIO_TARGET / fastest
        factor_txt = f"about {sci(factor, 2)}x"
        summary = (f"Even the fastest weight layer moves only {sci(fastest)} of its norm per step "
                   f"(healthy ~1e-3): {lr_txt} is ~{ratio_words(factor)} too low to learn.")
    suggest = ""
    if math.isfinite(lr) and lr > 0 and fastest > 0:
        new = min(lr * UPDATE_RATIO_TARGET / fastest, 1.0)
        suggest = f" Try lr={sci(float(f'{new:.1g}'))}."
    evidence = {"fastest_update_ratio": fastest, "target": UPDATE_RATIO_TARGET, "lr": lr if math.isfinite(lr) else None,
                "steps": sorted(late), "loss_progress": progress if math.isfinite(progress) else None}
    clipped = record.get("clip_max_norm") is not None
    advice = (f"Raise the learning rate {factor_txt} so updates reach ~1e-3 of the weights.{suggest} "
              f"Typical values: Adam 1e-4..3e-3, SGD with momentum 1e-2..1e-1; an lr range test finds it:\n"
              f"    for g in optimizer.param_groups: g['lr'] *= 10  # until the loss starts falling"
              + ("\nAlso check `clip_grad_norm_`: a max_norm far below the gradient norm shrinks every update."
                 if clipped else ""))
    return [Finding(code="update_ratio_low", severity=severity, step=step, layers=layers, summary=summary,
                    evidence=evidence, advice=advice)]


def ratio_words(factor: float) -> str:
    if factor < 1000:
        return f"{factor:.0f}x"
    return f"10^{round(math.log10(factor))}x"
