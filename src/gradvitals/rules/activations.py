"""Activations: ReLU units that never fire, sigmoid/tanh units pinned at their bounds.

Both read the scheduled activation statistics (``dead_frac/<module>``,
``act_sat_frac/<module>``), so they work with the recorder's sparse schedule
(every 25 steps) as well as with ``full=True``.
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import Record
from ..taxonomy import (
    BATCHNORM_LAYERS,
    RECURRENT_LAYERS,
    WEIGHT_LAYERS,
    ZEROING_FAMILIES,
    activation_family,
)
from ._common import WARMUP_STEPS, attr, first_nonfinite_step, loss_levels, median, names, nn_class, points, q, sci

# ----------------------------------------------------------------- dead ReLU
#: Fraction of a layer's units never positive over the recorder's window (4
#: scheduled batches) that makes it dead: the chapter's "> ~50% beyond ReLU's
#: expected half" (a healthy ReLU zeroes half its *outputs*, almost no *unit* is
#: zero on every sample; healthy runs measure 0-0.2 at step 0, ~0 later).
DEAD_LAYER_FRAC = 0.5

#: A layer this dead passes no gradient at all to the layers below it.
DEAD_FULL_FRAC = 0.99

#: Last scheduled points that must all be dead: units that revive are not dead.
DEAD_CONFIRM_POINTS = 2

#: Steps before a NaN whose dead fractions are ignored: in the blow-up that precedes
#: it (a too-high lr: dead from step 12, NaN at 21) units die as a consequence.
#: One default recording period (25 steps).
DEAD_BEFORE_NAN_MARGIN = 25


def dead_relu(record: Record) -> list[Finding]:
    """ReLU-family units that never activate across the recorder's window.

    Decides from ``dead_frac/<module>`` of ReLU modules (or, for functional
    ``F.relu``, of the weight layer -- or the BatchNorm right after it -- whose
    ``activation_after`` is ReLU): a layer is dead when its last
    DEAD_CONFIRM_POINTS values are all >= DEAD_LAYER_FRAC. Critical when a layer
    is fully dead (>= DEAD_FULL_FRAC: no gradient flows below it).
    """
    dead: list[tuple[str, float, int]] = []  # (module, fraction, first step of the final dead run)
    measured = 0
    stop = first_nonfinite_step(record)  # NaN is never > 0: after it every unit looks dead
    if stop is not None:
        stop -= DEAD_BEFORE_NAN_MARGIN  # units dying in the blow-up before a NaN are its aftermath
    for name in _relu_outputs(record):
        steps, values = _before(points(record.get(f"dead_frac/{name}")), stop)
        if not values:
            continue
        measured += 1
        tail = values[-DEAD_CONFIRM_POINTS:]
        if min(tail) < DEAD_LAYER_FRAC:
            continue
        if len(values) < DEAD_CONFIRM_POINTS and min(tail) < DEAD_FULL_FRAC:
            # One batch (a step-0 checkup): a healthy He-init ReLU layer reads 50-56% "dead"
            # on a single batch by chance; only a layer dead on every unit is conclusive.
            continue
        i = len(values) - 1
        while i > 0 and values[i - 1] >= DEAD_LAYER_FRAC:
            i -= 1
        dead.append((name, min(tail), steps[i]))
    if not dead:
        return []
    dead.sort(key=lambda d: (-d[1], _depth(record, d[0])))
    full = [d for d in dead if d[1] >= DEAD_FULL_FRAC]
    step = min(d[2] for d in dead)
    layers = tuple(d[0] for d in dead)
    if full:
        more = (f"{len(dead)} of {measured} ReLU layers have over {DEAD_LAYER_FRAC:.0%} of their units dead, "
                f"{len(full)} entirely" if len(dead) > len(full) else
                f"{len(full)} of {measured} ReLU layers have every unit dead")
        summary = (f"{more} (never positive over the last batches, e.g. {names([d[0] for d in full], 2)}): "
                   f"no gradient flows below {'it' if len(full) == 1 else 'them'}.")
    else:
        worst = dead[0]
        others = f" ({len(dead)} of {measured} ReLU layers over {DEAD_LAYER_FRAC:.0%})" if len(dead) > 1 else ""
        summary = f"{worst[1]:.0%} of the units after {q(worst[0])} never activate{others}."
    severity = "critical" if full else "warning"
    evidence = {
        "dead_fraction_by_layer": {d[0]: d[1] for d in dead},
        "relu_layers_measured": measured,
        "fully_dead_layers": [d[0] for d in full],
        "threshold": DEAD_LAYER_FRAC,
    }
    weights = [_weight_before(record, d[0]) for d in dead]
    targets = [w for w in weights if w] or list(layers)
    return [Finding(code="dead_relu", severity=severity, step=step, layers=layers, summary=summary,
                    evidence=evidence, advice=_dead_advice(record, list(layers), targets))]


def _relu_outputs(record: Record) -> list[str]:
    """Modules whose dead fraction is the ReLU's: ReLU modules, else the layer feeding F.relu."""
    relu_modules = [l.name for l in record.layers.values()
                    if activation_family(l.kind) in ZEROING_FAMILIES and record.get(f"dead_frac/{l.name}")]
    if relu_modules:
        return relu_modules
    ordered = record.layers_in_order()
    out = []
    for i, layer in enumerate(ordered):
        if layer.kind not in WEIGHT_LAYERS or activation_family(layer.activation_after) not in ZEROING_FAMILIES:
            continue
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        if nxt is not None and nxt.kind in BATCHNORM_LAYERS and nxt.depth is not None:
            out.append(nxt.name)  # conv -> BN -> F.relu: the BN output is what the ReLU sees
        else:
            out.append(layer.name)
    return out


def _before(pts: tuple[list[int], list[float]], stop: int | None) -> tuple[list[int], list[float]]:
    if stop is None:
        return pts
    kept = [(s, v) for s, v in zip(*pts) if s < stop]
    return [s for s, _ in kept], [v for _, v in kept]


def _depth(record: Record, name: str) -> int:
    layer = record.layers.get(name)
    return layer.depth if layer is not None and layer.depth is not None else 10**9


def _weight_before(record: Record, name: str) -> str | None:
    """The weight layer that feeds the module ``name`` (nearest before it in the forward)."""
    layer = record.layers.get(name)
    if layer is None or layer.depth is None:
        return None
    if layer.kind in WEIGHT_LAYERS:
        return name
    before = [l for l in record.layers.values()
              if l.kind in WEIGHT_LAYERS and l.depth is not None and l.depth < layer.depth]
    return max(before, key=lambda l: l.depth).name if before else None  # type: ignore[arg-type]


def _dead_advice(record: Record, layers: list[str], weights: list[str]) -> str:
    act = next((record.layers[n].kind for n in layers if n in record.layers
                and activation_family(record.layers[n].kind) in ZEROING_FAMILIES), "ReLU")
    where = names(layers)
    return (f"Units after {where} get a negative pre-activation for every input, so their gradient is 0 "
            f"and they never recover. Use an activation with a gradient below zero and lower the learning "
            f"rate (a too-large step pushes biases negative); initialise {names(weights)} with He init and "
            f"zero biases:\n"
            f"    nn.LeakyReLU(0.01)  # or nn.GELU(), instead of nn.{act}()\n"
            f"    nn.init.kaiming_normal_(layer.weight, nonlinearity='relu'); nn.init.zeros_(layer.bias)")


# ----------------------------------------------------------------- saturation
#: Fraction of a sigmoid/tanh layer's outputs within the probe's margin of their
#: bounds (derivative < 1% of its maximum) that makes the layer saturated: a
#: quarter of its units pass almost no gradient. Healthy runs measured < 0.02;
#: raw 0..16 digit pixels into a default-init sigmoid layer measured 0.30.
SAT_LAYER_FRAC = 0.25

#: Sigmoid and tanh outputs lie in [-1, 1]: a std above 1 means the module's output
#: is not bounded at all, whatever the probe assumed.
BOUNDED_STD = 1.0

#: A run that removed at least this fraction of its starting loss learns despite
#: the saturation: then it is only worth knowing (info), not a warning.
SAT_LEARNING_PROGRESS = 0.5

#: Pre-activation std above which a sigmoid/tanh is driven into its flat tails
#: (sigmoid'(4) = 0.018, tanh'(2.5) = 0.027): the cause to name in the advice.
SAT_PREACT_STD = 2.5


def saturated_activations(record: Record) -> list[Finding]:
    """Sigmoid/tanh (and RNN) outputs pinned near their bounds.

    Decides from ``act_sat_frac/<module>`` (for a weight layer: of the functional
    tanh/sigmoid its output goes into, read on the pre-activation): a layer is saturated when the median
    over its scheduled points after WARMUP_STEPS is >= SAT_LAYER_FRAC. The model's
    last module is left out (a confident sigmoid output is the goal, not a
    fault). Warning when the loss removed < SAT_LEARNING_PROGRESS of its start,
    else info; the pre-activation std of the layer feeding it is the evidence
    for the cause.
    """
    ordered = record.layers_in_order()
    last = max((l.depth for l in ordered if l.depth is not None), default=None)
    sat: list[tuple[str, float, int]] = []
    for name, series in record.per_name("act_sat_frac").items():
        layer = record.layers.get(name)
        if layer is not None and last is not None and layer.depth == last:
            continue
        steps, values = _before(points(series), first_nonfinite_step(record))
        if not values:
            continue
        pre = layer is not None and layer.kind in WEIGHT_LAYERS  # measured before a functional tanh/sigmoid
        if not pre and any(v > BOUNDED_STD for v in points(record.get(f"act_std/{name}"))[1]):
            continue  # not a bounded output (e.g. nn.RNN(nonlinearity="relu")): nothing to pin
        late = [v for s, v in zip(steps, values) if s >= WARMUP_STEPS] or values
        level = median(late)
        if level >= SAT_LAYER_FRAC:
            first = next(s for s, v in zip(steps, values) if v >= SAT_LAYER_FRAC)
            sat.append((name, level, first))
    if not sat:
        return []
    sat.sort(key=lambda x: (-x[1], _depth(record, x[0])))
    levels = loss_levels(record)
    progress = levels.progress if levels is not None else math.nan
    learning = math.isfinite(progress) and progress >= SAT_LEARNING_PROGRESS
    severity = "info" if learning else "warning"
    worst = sat[0]
    feeder = _weight_before(record, worst[0]) if record.layers.get(worst[0]) is not None else None
    pre_std = median(points(record.get(f"act_std/{feeder}"))[1]) if feeder else math.nan
    kind = record.layers[worst[0]].kind if worst[0] in record.layers else "activation"
    if kind in WEIGHT_LAYERS:  # a functional activation after a weight layer: read on its input
        fn = record.layers[worst[0]].activation_after or "tanh"
        summary = (f"{worst[1]:.0%} of the outputs of `torch.{fn}` applied to {q(worst[0])} ({kind}) are "
                   f"pinned at their bounds, where the derivative is < 1% of its maximum")
        kind = nn_class(record, fn)
    else:
        summary = (f"{worst[1]:.0%} of the outputs of {q(worst[0])} ({kind}) are pinned at their bounds, "
                   f"where the derivative is < 1% of its maximum")
    if len(sat) > 1:
        summary += f"; {len(sat)} layers are saturated"
    if math.isfinite(pre_std):
        summary += f" (pre-activation std {sci(pre_std)})"
    summary += "."
    evidence = {
        "saturated_fraction_by_layer": {n: v for n, v, _ in sat},
        "preactivation_std": pre_std if math.isfinite(pre_std) else None,
        "feeding_layer": feeder,
        "loss_progress": progress if math.isfinite(progress) else None,
        "threshold": SAT_LAYER_FRAC,
    }
    return [Finding(code="saturated_activations", severity=severity, step=min(s for _, _, s in sat),
                    layers=tuple(n for n, _, _ in sat), summary=summary, evidence=evidence,
                    advice=_sat_advice(record, worst[0], feeder, pre_std, kind))]


def _sat_advice(record: Record, module: str, feeder: str | None, pre_std: float, kind: str) -> str:
    first_weight = next((l for l in record.layers_in_order() if l.kind in WEIGHT_LAYERS), None)
    is_input = feeder is not None and first_weight is not None and feeder == first_weight.name
    recurrent = record.layers.get(module) is not None and record.layers[module].kind in RECURRENT_LAYERS
    if recurrent:
        return (f"The hidden state of {q(module)} sits at tanh's bounds. Normalise its inputs, clip the "
                f"gradient norm (max_norm=1.0) and lower the learning rate; initialise recurrent weights "
                f"orthogonally: `nn.init.orthogonal_({attr(module)}.weight_hh_l0)`.")
    big = math.isfinite(pre_std) and pre_std > SAT_PREACT_STD
    layer = record.layers.get(module)
    if layer is not None and layer.kind in WEIGHT_LAYERS:
        fn = layer.activation_after or "tanh"
        return (f"{q(module)} drives the `torch.{fn}` after it into its flat tails"
                f"{f' (pre-activation std {sci(pre_std)})' if math.isfinite(pre_std) else ''}. Lower the "
                f"learning rate (large steps grow the weights until the {fn} pins) and clip the gradient norm; "
                f"normalise the pre-activation and initialise with Xavier:\n"
                f"    h = torch.{fn}(self.norm(self.{module.rsplit('.', 1)[-1]}(x)))  # self.norm = nn.LayerNorm(features)\n"
                f"    nn.init.xavier_normal_({attr(module)}.weight)")
    if is_input and big:
        return (f"The inputs are not normalised: {q(feeder)} feeds {q(module)} pre-activations with std "
                f"{sci(pre_std)}, deep in the flat tails. Standardise the data once, before training:\n"
                f"    x = (x - x_train.mean(0)) / (x_train.std(0) + 1e-8)\n"
                f"or put `nn.LayerNorm` / `nn.BatchNorm1d` before `nn.{kind}()`; better, use ReLU/GELU in "
                f"hidden layers.")
    target = feeder or "the layer before it"
    return (f"{q(target)} drives {q(module)} into its flat tails. Use Xavier init for {kind} "
            f"(`nn.init.xavier_normal_({attr(feeder) if feeder else 'layer'}.weight)`), add normalisation before the activation, lower the "
            f"learning rate, or switch hidden activations to ReLU/GELU with He init.")

