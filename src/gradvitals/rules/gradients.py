"""Gradient flow: vanishing and exploding gradients.

Vanishing is judged from the *depth profile* of weight layers' relative gradients
(|grad| / |weight|, scale-free) along the forward order, over every scheduled step
where both norms are known, not from one absolute threshold: biases, embeddings,
norm gains and heads are left out, and a profile must hold over most of the run.

Exploding is judged from the *trend* of the global gradient norm (recorded every
step): how far it climbed above the run's own normal level, and since when. The
step where the climb became visible is the early warning the user could have had
before the NaN.
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import Record
from ..taxonomy import RECURRENT_LAYERS, SATURATING_FAMILIES
from ._common import (
    activation_families,
    activation_names,
    as_dict,
    by_model,
    first_nonfinite_step,
    median,
    names,
    nn_class,
    orders,
    points,
    q,
    relative_grads,
    sci,
    WeightParam,
    weight_params,
)

# ----------------------------------------------------------------- vanishing
#: Weight layers needed for a depth profile (with two, "early vs late" is one pair).
VANISH_MIN_LAYERS = 3

#: Orders of magnitude between the late and the early weight layers' relative
#: gradients that make a flow problem: the chapter's max/min > 100x.
VANISH_ORDERS = 2.0

#: Orders of magnitude that make it critical: early layers get < 1e-5 of the
#: late layers' step size, they are effectively frozen.
VANISH_CRITICAL_ORDERS = 5.0

#: A layer whose relative gradient is this many orders below the best layer's
#: gets < 1/1000 of its step size: "not learning" in the summary.
STALL_ORDERS = 3.0

#: Fraction of the profiled steps on which the gap must hold: a transient dip
#: (a warmup step, a lucky batch) is not a vanishing gradient.
VANISH_PERSIST = 0.6

#: Largest relative gradient of any weight layer below this, persistently, is
#: vanishing in absolute terms (a step of lr=1 would move the weights < 1e-8).
VANISH_ABSOLUTE = 1e-8

#: log10 given to a gradient that is exactly 0.0 where it underflowed: the smallest
#: positive float32 (subnormal) is 1.4e-45, so a gradient that decayed to 0 is below it.
UNDERFLOW_LOG10 = -45.0

#: Weight layers needed when the early ones' gradients are exactly 0: the last layer
#: still learning and the first one at 0 is the whole profile.
VANISH_MIN_LAYERS_ZERO = 2


def vanishing_gradients(record: Record) -> list[Finding]:
    """Early weight layers' |grad|/|weight| orders of magnitude below the late ones'.

    Decides from ``grad_norm/<weight>`` and ``weight_norm/<weight>`` on scheduled
    steps, weight layers ordered by ``LayerInfo.depth``: the median log10 ratio of
    the last third of layers minus the first third's (exact zeros, i.e. dead
    units, are left to ``dead_relu``). Fires when the gap is >= VANISH_ORDERS on
    VANISH_PERSIST of the profiled steps, or when every layer's ratio is below
    VANISH_ABSOLUTE.
    """
    found = [f for group in by_model(weight_params(record), record)
             for f in _vanishing_in(record, group)]
    # Several models (a GAN): report the worst profile.
    return sorted(found, key=lambda f: -(f.evidence.get("gap_orders") or 0))[:1]


def _underflowed(wps: list[WeightParam], row: list[float], logs: list[float]) -> list[int]:
    """Indices of the leading weight layers whose gradient is exactly 0 because it
    underflowed (see ``vanishing_gradients``), or [] (none, or a dead-ReLU cliff)."""
    k = 0
    while k < len(row) and (row[k] == 0.0 or not math.isfinite(row[k])):
        k += 1
    zeros = [i for i in range(k) if row[i] == 0.0]
    if not zeros or k >= len(row):
        return []  # no zeros first, or no layer after them that learns
    nonzero = [x for x in logs[k:] if math.isfinite(x)]
    late = median(nonzero[-max(1, len(nonzero) // 3):])
    decayed = len(nonzero) >= 2 and late - logs[k] >= VANISH_ORDERS
    saturating = wps[zeros[-1]].activation in SATURATING_FAMILIES
    return zeros if decayed or saturating else []


def _vanishing_in(record: Record, wps: list[WeightParam]) -> list[Finding]:
    if len(wps) < VANISH_MIN_LAYERS_ZERO:
        return []
    stop = first_nonfinite_step(record)
    rel = {s: row for s, row in relative_grads(record, wps).items() if stop is None or s < stop}
    n = len(wps)
    third = max(1, n // 3)
    gaps: dict[int, float] = {}
    tops: dict[int, float] = {}
    per_layer: list[list[float]] = [[] for _ in wps]
    zero_steps: dict[int, int] = {}  # step -> leading layers whose gradient underflowed to 0
    for step, row in rel.items():
        logs = [math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in row]
        zeros = _underflowed(wps, row, logs)
        for i in zeros:
            logs[i] = UNDERFLOW_LOG10
        if zeros:
            zero_steps[step] = len(zeros)
        valid = [x for x in logs if math.isfinite(x)]
        if len(valid) < (VANISH_MIN_LAYERS_ZERO if zeros else VANISH_MIN_LAYERS):
            if n < VANISH_MIN_LAYERS and len(valid) == n:
                gaps[step] = 0.0  # too few layers for a profile: a step without zeros counts as no gap
            continue
        early = median(logs[:third])
        late = median(logs[-third:])
        if math.isfinite(early) and math.isfinite(late):
            gaps[step] = late - early
        tops[step] = max(valid)
        for i, x in enumerate(logs):
            per_layer[i].append(x)
    if not gaps and not tops:
        return []
    flagged = [s for s, g in gaps.items() if g >= VANISH_ORDERS]
    tiny = [s for s, t in tops.items() if t < math.log10(VANISH_ABSOLUTE)]
    by_gap = len(gaps) > 0 and len(flagged) >= VANISH_PERSIST * len(gaps)
    by_abs = len(tops) > 0 and len(tiny) >= VANISH_PERSIST * len(tops)
    if not (by_gap or by_abs):
        return []
    underflow = by_gap and sum(1 for st in flagged if st in zero_steps) >= VANISH_PERSIST * len(flagged)
    layer_level = [median(xs) for xs in per_layer]
    best = max((x for x in layer_level if math.isfinite(x)), default=math.nan)
    stalled = [i for i, x in enumerate(layer_level) if math.isfinite(x) and best - x >= STALL_ORDERS]
    gap = median(gaps[s] for s in flagged) if by_gap else median(gaps.values())
    first_step = min(flagged) if by_gap else min(tiny)
    worst = sorted((i for i in range(n) if math.isfinite(layer_level[i])), key=lambda i: layer_level[i])
    layers = list(dict.fromkeys(  # an RNN's weight_ih/weight_hh share one module path
        wps[i].layer for i in (sorted(stalled, key=lambda i: layer_level[i]) if stalled else worst[:third])))
    head, first = wps[-1].layer, wps[0].layer
    # The contiguous run of stalled layers from the input: "the first k of n".
    k = 0
    while k < n and k in stalled:
        k += 1
    early_names = [w.layer for w in wps[: max(k, third)]]
    acts = activation_families(record, early_names)
    act_names = activation_names(record, early_names)
    if by_gap:
        span = orders(10 ** gap)
        if k:
            tail = f"the first {k} of {n} weight layers are not learning"
        elif stalled:
            tail = f"{len(stalled)} of {n} weight layers get < 1/1000 of the best layer's step"
        else:
            tail = f"the first {third} of {n} weight layers learn {span} slower than the last"
        summary = f"Gradients shrink {span} from {q(head)} to {q(first)}: {tail}."
        if underflow:
            zk = max(zero_steps[st] for st in flagged if st in zero_steps)
            summary = (f"Gradients vanish from {q(head)} back to {q(first)} until they underflow: the first "
                       f"{zk} of {n} weight layers get gradients of exactly 0.0 on "
                       f"{sum(1 for st in flagged if st in zero_steps)} of {len(gaps)} profiled steps, "
                       f"while the last layers' are not.")
    else:
        summary = (f"Gradients are vanishingly small in every weight layer: the largest "
                   f"|grad|/|weight| is {sci(10 ** best)} (< {VANISH_ABSOLUTE:g}).")
    severity = "critical" if (by_gap and gap >= VANISH_CRITICAL_ORDERS) or by_abs else "warning"
    evidence = {
        "gap_orders": round(gap, 2) if math.isfinite(gap) else None,
        "profiled_steps": len(gaps),
        "steps_with_gap": len(flagged),
        "relative_grad_by_layer": {wps[i].layer: 10 ** layer_level[i] for i in range(n)
                                   if math.isfinite(layer_level[i])},
        "stalled_layers": [wps[i].layer for i in stalled],
        "activation": act_names[0] if act_names else None,
        "weight_layers": n,
        "underflow_steps": len(zero_steps),
        "zero_grad_layers": max(zero_steps.values(), default=0),
    }
    return [Finding(code="vanishing_gradients", severity=severity, step=first_step,
                    layers=tuple(layers), summary=summary, evidence=evidence,
                    advice=_vanishing_advice(record, early_names, acts, act_names))]


def _vanishing_advice(record: Record, early: list[str], acts: list[str], act_names: list[str]) -> str:
    where = names(early)
    kind = (record.layers[early[0]].kind if early and early[0] in record.layers else "") or "Linear"
    if acts and acts[0] in ("sigmoid", "tanh"):
        act = nn_class(record, act_names[0] if act_names else acts[0])
        return (f"`nn.{act}` after {where} multiplies the gradient by at most "
                f"{'0.25' if acts[0] == 'sigmoid' else '1'} per layer and it compounds with depth. "
                f"Use ReLU/GELU with He init in the hidden layers (keep sigmoid only at the output), "
                f"or add residual connections and normalisation:\n"
                f"    for m in model.modules():\n"
                f"        if isinstance(m, nn.{kind}):\n"
                f"            nn.init.kaiming_normal_(m.weight, nonlinearity='relu'); nn.init.zeros_(m.bias)\n"
                f"(with the hidden `nn.{act}()` replaced by `nn.ReLU()`; `gv.init_(model, batch)` picks the init).")
    if acts and acts[0] in ("relu", "leaky_relu", "elu", "gelu"):
        act = nn_class(record, act_names[0] if act_names else acts[0])
        return (f"The weights of {where} are too small for `nn.{act}`: each layer shrinks the signal. "
                f"Use He (Kaiming) init, Var(W) = 2/fan_in, or `gv.init_(model, batch)`:\n"
                f"    for m in model.modules():\n"
                f"        if isinstance(m, nn.{kind}):\n"
                f"            nn.init.kaiming_normal_(m.weight, nonlinearity='relu'); nn.init.zeros_(m.bias)\n"
                f"For very deep stacks add residual connections (x = x + block(x)) or normalisation.")
    return (f"The gradient fades on its way back to {where}. Add residual connections "
            f"(`x = x + block(x)`) and normalisation (LayerNorm/BatchNorm), and initialise each layer "
            f"for its activation (`gv.init_(model, batch)`: He for ReLU, Xavier for tanh/sigmoid).")


# ----------------------------------------------------------------- exploding
#: Gradient norm this many times its normal level is a visible climb (healthy
#: mini-batch noise stays within a few x of the median).
GROWTH_VISIBLE = 10.0

#: Peak gradient norm this many times the normal level, without a NaN, is an
#: explosion the run survived (three orders of magnitude).
EXPLODE_PEAK = 1e3

#: Peak this many times normal is critical even without a NaN (the updates it
#: produced are garbage).
EXPLODE_CRITICAL_PEAK = 1e6

#: The chapter's absolute alarm for a gradient norm; with a NaN following, a norm
#: this large means the values overflowed rather than being NaN from bad data.
ABSOLUTE_EXPLODING = 1e4

#: A gradient norm whose last tenth of the run sits this far above its first tenth,
#: rising through the middle, is climbing without bound (healthy runs grew <= 10x:
#: the gradient norm of a learning MLP rises as the loss surface sharpens).
TREND_GROWTH = 100.0
#: Steps skipped before the trend's first window (warmup), and points per window.
TREND_SKIP_STEPS = 10
TREND_MIN_POINTS = 5

#: A script that died (an uncaught exception, e.g. OverflowError in its own
#: ``math.exp(loss)``) ends its record before any NaN: a climb of GROWTH_VISIBLE x
#: whose peak lies within this many steps of the last one, with the loss grown
#: CRASH_LOSS_GROWTH x, is the explosion that killed it (the report is written after
#: the crash, so the last steps are all the warning there was).
CRASH_TAIL_STEPS = 10
CRASH_LOSS_GROWTH = 10.0

#: NaN origins that are not the aftermath of growth (bad data, an unsafe loss).
_NOT_GROWTH_ORIGINS = ("input", "loss")


def exploding_gradients(record: Record) -> list[Finding]:
    """Gradient norm climbing orders of magnitude above its normal level (or into NaN).

    Decides from ``grad_norm_global`` (every step): the normal level is the median
    of the first half of the steps before the peak (before a NaN: the lower of
    that and the median of all of them); the climb is the last unbroken run of
    steps >= GROWTH_VISIBLE x normal ending at the last finite value before the
    NaN (critical), or at a peak >= EXPLODE_PEAK x normal. A NaN after a norm >= ABSOLUTE_EXPLODING also counts (explosion at
    init, no normal level to compare with). The climb's first step is ``step``;
    ``evidence.warning_steps`` is how many steps it preceded the NaN.
    """
    series = record.get("grad_norm_global")
    steps, values = points(series)
    if not steps:
        return []
    nan_step = first_nonfinite_step(record)
    if (series is not None and series.max_step is not None and series.max_step not in steps
            and math.isfinite(series.max) and series.max > max(values)):
        # a long run's series is decimated; its exact maximum is kept: never lose the peak
        i = next((k for k, st in enumerate(steps) if st > series.max_step), len(steps))
        steps.insert(i, series.max_step)
        values.insert(i, series.max)
    origin = next(iter(record.events_of("nonfinite_origin")), {})
    if nan_step is not None:
        kept = [(s, v) for s, v in zip(steps, values) if s < nan_step]
        later = [(s, v) for s, v in zip(steps, values) if s > nan_step]
        steps, values = [s for s, _ in kept], [v for _, v in kept]
        if not steps:
            return []
        huge_later = [(s, v) for s, v in later if v >= max(ABSOLUTE_EXPLODING, GROWTH_VISIBLE * median(values))]
        if huge_later and values[-1] < GROWTH_VISIBLE * median(values):
            return [_overflow_then_huge(record, nan_step, median(values), huge_later)]
        end = len(values) - 1
        normal = min(median(values), median(values[: max(1, (end + 1) // 2)]))
    else:
        end = max(range(len(values)), key=lambda i: values[i])
        if end == 0:
            # Largest at the first step and lower ever after: a converging run (LBFGS,
            # a loss that gets easier), unless the start itself was past the alarm.
            rest = median(values[1:])
            if not (values[0] >= ABSOLUTE_EXPLODING and rest > 0 and values[0] >= EXPLODE_PEAK * rest):
                return _growing_trend(record, steps, values)
            normal = rest
        else:
            # The normal level is what came *before* the peak: a run whose gradient later
            # shrinks (convergence) must not make an ordinary early value look like a spike.
            normal = median(values[: max(1, (end + 1) // 2)])
    if not math.isfinite(normal) or normal <= 0:
        positive = [v for v in values if v > 0]
        if not positive:
            return []
        normal = min(positive)
    peak = values[end]
    ratio = peak / normal
    start = end
    while start > 0 and values[start - 1] >= GROWTH_VISIBLE * normal:
        start -= 1
    if steps[0] == 0 and all(v >= ABSOLUTE_EXPLODING for v in values[: start + 1]):
        start = 0  # already past the alarm at the first gradient: the climb began at init
    if nan_step is not None:
        grew = ratio >= GROWTH_VISIBLE
        huge = peak >= ABSOLUTE_EXPLODING and origin.get("kind") not in _NOT_GROWTH_ORIGINS
        if not (grew or huge):
            return []
        if not grew:
            start = next(i for i, v in enumerate(values) if v >= ABSOLUTE_EXPLODING)
        severity = "critical"
    else:
        crashed = ratio >= GROWTH_VISIBLE and _died_diverging(record, steps[end], steps[-1])
        if ratio < EXPLODE_PEAK and not crashed:
            return _growing_trend(record, steps, values)
        severity = "critical" if ratio >= EXPLODE_CRITICAL_PEAK or crashed else "warning"
    visible = steps[start]
    span = max(steps[end] - visible, 0)
    factor = (peak / values[start]) ** (1.0 / span) if span and values[start] > 0 else math.nan
    # The climb includes the very first gradient, measured before any update: the
    # initialisation (or the data's scale), not the learning rate, started it.
    at_init = start == 0 and steps[0] == 0
    layers = _growing_layers(record, steps[end])
    evidence = {
        "normal_grad_norm": normal,
        "peak_grad_norm": peak,
        "peak_step": steps[end],
        "growth": ratio,
        "visible_step": visible,
        "growth_per_step": factor if math.isfinite(factor) else None,
        "nonfinite_step": nan_step,
        "warning_steps": (nan_step - visible) if nan_step is not None else None,
        "at_init": at_init,
    }
    if nan_step is not None:
        warn = nan_step - visible
        if ratio >= GROWTH_VISIBLE and span:
            summary = (f"Gradient norm climbed {orders(ratio)} above normal ({sci(normal)} -> {sci(peak)}, "
                       f"x{factor:.2g} per step) from step {visible} to the NaN at step {nan_step}: "
                       f"{warn} step{'s' if warn != 1 else ''} of warning.")
        else:
            summary = (f"Gradient norm was already {sci(peak)} at step {visible} (alarm: > {ABSOLUTE_EXPLODING:g}) "
                       f"and turned NaN at step {nan_step}: {warn} step{'s' if warn != 1 else ''} of warning.")
    else:
        summary = (f"Gradient norm spiked {orders(ratio)} above its normal level ({sci(normal)} -> {sci(peak)} "
                   f"at step {steps[end]}), climbing from step {visible}.")
        if severity == "critical" and ratio < EXPLODE_PEAK:  # the crash branch
            error = str(record.run.get("script_error") or "an error").splitlines()[-1][:120]
            summary = summary[:-1] + (f", and the loss diverged until the script died at step "
                                      f"{record.steps - 1} ({error}).")
            evidence["script_died"] = True
    return [Finding(code="exploding_gradients", severity=severity, step=visible, layers=tuple(layers),
                    summary=summary, evidence=evidence, advice=_exploding_advice(record, at_init, layers))]


def _died_diverging(record: Record, peak_step: int, last_step: int) -> bool:
    """The script died of an error (not Ctrl-C) CRASH_TAIL_STEPS or fewer after the
    gradient's peak, its loss CRASH_LOSS_GROWTH x above where it started."""
    status = record.run.get("exit_status")
    if not record.run.get("script_error") or status in (None, 0, 130):
        return False
    if last_step - peak_step > CRASH_TAIL_STEPS:
        return False
    _, losses = points(record.get("loss"))
    return len(losses) >= 2 and losses[0] > 0 and max(losses[-CRASH_TAIL_STEPS:]) >= CRASH_LOSS_GROWTH * losses[0]


def _growing_trend(record: Record, steps: list[int], values: list[float]) -> list[Finding]:
    """No peak yet, but the norm keeps climbing: the run's last tenth sits
    TREND_GROWTH x above its first tenth (after warmup), the early warning of a run
    stopped before its NaN."""
    late = [(s, v) for s, v in zip(steps, values) if s >= TREND_SKIP_STEPS]
    k = max(TREND_MIN_POINTS, len(late) // 10)
    if len(late) < 3 * k:
        return []
    first, last = median(v for _, v in late[:k]), median(v for _, v in late[-k:])
    middle = median(v for _, v in late[len(late) // 2 - k // 2: len(late) // 2 + k // 2 + 1])
    if not (first > 0 and last >= TREND_GROWTH * first and last > middle > first):
        return []
    span = late[-1][0] - late[0][0]
    per_step = (last / first) ** (1.0 / span) if span else math.nan
    layers = _growing_layers(record, late[-1][0])
    summary = (f"Gradient norm grew {orders(last / first)} over the run ({sci(first)} -> {sci(last)}, "
               f"x{per_step:.3g} per step) and is still climbing.")
    evidence = {"normal_grad_norm": first, "peak_grad_norm": last, "peak_step": late[-1][0],
                "growth": last / first, "visible_step": late[0][0], "growth_per_step": per_step,
                "nonfinite_step": None, "warning_steps": None, "at_init": False, "trend": True}
    return [Finding(code="exploding_gradients", severity="warning", step=late[0][0], layers=tuple(layers),
                    summary=summary, evidence=evidence, advice=_exploding_advice(record, False, layers))]


def _overflow_then_huge(record: Record, nan_step: int, normal: float,
                        huge: list[tuple[int, float]]) -> Finding:
    """The norm jumped straight to Inf (float32 overflow of the norm itself) and the
    run went on with finite but enormous gradients: an explosion without a climb."""
    peak_step, peak = max(huge, key=lambda x: x[1])
    layers = _growing_layers(record, peak_step)
    # From exactly 0 (gradients that had vanished) the growth has no finite ratio.
    growth = peak / normal if normal > 0 else None
    above = f", {orders(growth)} normal" if growth is not None else ""
    summary = (f"Gradient norm jumped from {sci(normal)} to Inf at step {nan_step} and stayed huge "
               f"(up to {sci(peak)} at step {peak_step}{above}): 0 steps of warning.")
    evidence = {"normal_grad_norm": normal, "peak_grad_norm": peak, "peak_step": peak_step,
                "growth": growth, "visible_step": nan_step, "growth_per_step": None,
                "nonfinite_step": nan_step, "warning_steps": 0, "at_init": False,
                "huge_steps_after_nonfinite": len(huge)}
    return Finding(code="exploding_gradients", severity="critical", step=nan_step, layers=tuple(layers),
                   summary=summary, evidence=evidence, advice=_exploding_advice(record, False, layers))


def _growing_layers(record: Record, at: int) -> list[str]:
    """Weight layers ranked by how much their gradient grew from the first step to ``at``."""
    grads = record.per_name("grad_norm")
    scored = []
    for wp in weight_params(record):
        d = as_dict(grads.get(wp.param))
        if not d:
            continue
        first = d[min(d)]
        last = d.get(at, math.nan)
        if math.isfinite(first) and first > 0 and math.isfinite(last):
            scored.append((last / first, last, wp.layer))
    scored.sort(key=lambda x: (-x[0], -x[1]))
    out: list[str] = []
    for _, _, layer in scored:
        if layer not in out:
            out.append(layer)
    return out[:5]


def _exploding_advice(record: Record, at_init: bool, layers: list[str]) -> str:
    rnn = [l.name for l in record.layers.values() if l.kind in RECURRENT_LAYERS]
    clipped = record.get("clip_max_norm") is not None
    clip = ("    loss.backward()\n"
            "    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)\n"
            "    optimizer.step()")
    if rnn:
        return (f"The recurrent weights of {names(rnn)} multiply the gradient once per time step. "
                f"Clip the gradient norm (max_norm 1.0 for RNNs/transformers)"
                f"{' more tightly' if clipped else ''}, and lower the learning rate:\n{clip}")
    wps = weight_params(record)
    acts = activation_names(record, [w.layer for w in wps])
    act = f"nn.{nn_class(record, acts[0])}" if acts else None
    if at_init:
        kind = (wps[0].kind if wps else "") or "Linear"  # an imported log's layers have no kind
        fam = activation_families(record, [w.layer for w in wps])
        init = ("nn.init.xavier_normal_(m.weight)" if fam and fam[0] in ("sigmoid", "tanh")
                else "nn.init.kaiming_normal_(m.weight, nonlinearity='relu')")
        return (f"The gradients were huge from the first step: the initial weights are too large"
                f"{' for `' + act + '`' if act else ''}, so every layer multiplies the signal by > 1. "
                f"Initialise by activation (He for ReLU, Xavier for tanh/sigmoid), or `gv.init_(model, batch)`:\n"
                f"    for m in model.modules():\n"
                f"        if isinstance(m, nn.{kind}):\n"
                f"            {init}; nn.init.zeros_(m.bias)")
    where = names(layers) if layers else "the model"
    return (f"The gradient of {where} grew step after step: the learning rate is too high for this model "
            f"(divide it by 10, or add a warmup), and clip the gradient norm"
            f"{' (your max_norm lets it through)' if clipped else ''}:\n{clip}")
