"""Initialisation at step 0: ``poor_initialization`` and ``symmetric_weights``.

Decided from the init audit's facts in ``LayerInfo.extra`` (``weight_std``,
``fan_in``, ``fan_out``, ``identical_rows``, ``identical_cols``, ``residual_bypass``;
see ``probes/init_audit.py``), the activation that follows each weight layer in the
forward (``LayerInfo.activation_after``) and the step-0 series (``act_std``,
``grad_norm``). No torch.

The chapter's init rule: Var(W) = 2/fan_in (He) before the ReLU family (GELU/SiLU
too), Var(W) = 2/(fan_in + fan_out) (Xavier) before sigmoid/tanh or no activation.
A weight std ``r`` times the expected one scales the signal by ``r`` at that layer;
along a chain of weight layers with neither normalisation nor a residual path, the
factors multiply. That product, in decades, is what this rule judges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..findings import Finding
from ..record import LayerInfo, Record, Series
from ..taxonomy import HE_FAMILIES, NORM_LAYERS, WEIGHT_LAYERS, activation_family
from ._common import attr, points

#: Signal scale off by 10^3 along one unnormalised chain: a 20-layer ReLU MLP with
#: PyTorch's default init (std x0.41 of He per layer) is at 10^-7.8; a healthy 3-layer
#: one at 10^-0.8. 1000x is where training visibly stalls or needs a tuned lr.
CHAIN_DECADES_WARNING = 3.0
#: 10^6: activations or gradients leave float32's comfortable range within a few steps.
CHAIN_DECADES_CRITICAL = 6.0

#: Inside normalised or residual blocks (a transformer) no chain compounds, but each
#: layer still has a scale: weights this many times He/Xavier's std on (geometric)
#: average over the blocks' weight layers are too large (PyTorch's default init reads
#: 0.4-0.6x, GPT-2's N(0, 0.02) well below 1x; N(0, 1) in a 32-wide GPT reads 4-9x,
#: in a 768-wide one ~30x).
BLOCK_INIT_RATIO_LARGE = 4.0
#: Weight layers needed for that average (one odd layer is a choice, not an init).
BLOCK_INIT_MIN_LAYERS = 3
#: The step-0 loss at this many times ln(classes) confirms it: a classifier at init
#: predicts ~uniformly, loss ~ln(C) (4.17 for 65 characters); logits blown up by the
#: init are confidently wrong (a pre-LN GPT at N(0, 1): 19.2).
INIT_LOSS_EXCESS = 2.0


@dataclass
class ChainLayer:
    """One weight layer of a chain with its init ratio (weight std / expected std)."""

    layer: LayerInfo
    family: str | None
    rule: str  # "He" or "Xavier"
    expected_std: float
    ratio: float


@dataclass
class Chain:
    """Consecutive weight layers (forward order) with no normalisation or residual path between."""

    model: str
    layers: list[ChainLayer] = field(default_factory=list)

    @property
    def predicted_decades(self) -> float:
        return sum(math.log10(c.ratio) for c in self.layers)


def expected_std(family: str | None, fan_in: int, fan_out: int) -> tuple[str, float]:
    """(rule name, the std the chapter's init gives) for the activation family that follows."""
    if family in HE_FAMILIES:
        return "He", math.sqrt(2.0 / fan_in)
    return "Xavier", math.sqrt(2.0 / (fan_in + fan_out))


def has_weight_facts(layer: LayerInfo) -> bool:
    return layer.kind in WEIGHT_LAYERS and isinstance(layer.extra.get("weight_std"), (int, float)) \
        and bool(layer.extra.get("fan_in")) and bool(layer.extra.get("fan_out"))


def weight_layers_by_model(record: Record) -> dict[str, list[LayerInfo]]:
    """Audited weight layers of each model, in forward order."""
    out: dict[str, list[LayerInfo]] = {}
    for layer in record.layers_in_order():
        if layer.depth is not None and has_weight_facts(layer):
            out.setdefault(layer.model, []).append(layer)
    return out


def chains(record: Record) -> list[Chain]:
    """Split each model's forward order into plain chains: a normalisation layer, a
    residual-bypassed layer or any other parameterised module (attention, RNN,
    embedding) ends a chain. Constant (e.g. zero) weights are left to
    ``symmetric_weights`` and do not count."""
    result: list[Chain] = []
    current: dict[str, Chain] = {}

    def close(model: str) -> None:
        c = current.pop(model, None)
        if c is not None and c.layers:
            result.append(c)

    for layer in record.layers_in_order():
        if layer.depth is None:
            continue
        model = layer.model
        if layer.kind in NORM_LAYERS or layer.extra.get("residual_bypass"):
            close(model)
            continue
        if has_weight_facts(layer):
            ex = layer.extra
            std = float(ex["weight_std"])
            if ex.get("weight_constant") or not math.isfinite(std) or std <= 0:
                close(model)
                continue
            fam = activation_family(layer.activation_after)
            rule, exp = expected_std(fam, int(ex["fan_in"]), int(ex["fan_out"]))
            current.setdefault(model, Chain(model)).layers.append(
                ChainLayer(layer, fam, rule, exp, std / exp))
        elif layer.params:
            close(model)
    for model in list(current):
        close(model)
    return result


def first_point(series: Series | None) -> float | None:
    """The value at the series' first recorded step (step 0 for a checkup or a watch)."""
    if series is None or not series.count or not len(series.values):
        return None
    return series.values[0]


def measured_decades(record: Record, chain: Chain) -> tuple[float | None, bool, dict[str, Any]]:
    """log10(act_std of the chain's last layer / first layer) at the first step, whether
    a non-finite value was seen, and the numbers."""
    stds = [(c.layer.name, first_point(record.get(f"act_std/{c.layer.name}"))) for c in chain.layers]
    stds = [(n, v) for n, v in stds if v is not None]
    nonfinite = any(not math.isfinite(v) for _, v in stds)
    usable = [(n, v) for n, v in stds if math.isfinite(v) and v > 0]
    evidence: dict[str, Any] = {}
    if len(usable) >= 2:
        evidence = {"act_std_first": usable[0][1], "act_std_last": usable[-1][1],
                    "act_std_first_layer": usable[0][0], "act_std_last_layer": usable[-1][0]}
        return math.log10(usable[-1][1] / usable[0][1]), nonfinite, evidence
    return None, nonfinite, evidence


def grad_profile(record: Record, layers: list[LayerInfo]) -> dict[str, float]:
    """Step-0 gradient norm of each layer's weight, by layer (evidence only)."""
    out = {}
    for layer in layers:
        for p in layer.params:
            if p.endswith("weight"):
                v = first_point(record.get(f"grad_norm/{p}"))
                if v is not None:
                    out[layer.name] = v
    return out


def _audit_step(record: Record) -> int | None:
    steps = [e.get("step") for e in record.events_of("init_audit") if isinstance(e.get("step"), int)]
    return min(steps) if steps else (0 if record.steps else None)


# ----------------------------------------------------------------- poor_initialization
def poor_initialization(record: Record) -> list[Finding]:
    """Warning (critical beyond 10^6) when a plain chain's weight scales, compounded,
    put the signal >= 10^3 away from where He/Xavier for its activations would keep
    it (predicted from weight std vs fan-in/fan-out), or the step-0 activation std
    measured along the chain collapses or blows up as much."""
    findings = []
    step = _audit_step(record)
    judged: set[str] = set()
    for chain in chains(record):
        predicted = chain.predicted_decades
        measured, nonfinite, act_ev = measured_decades(record, chain)
        worst = max(abs(predicted), abs(measured) if measured is not None else 0.0)
        if worst < CHAIN_DECADES_WARNING and not (nonfinite and abs(predicted) >= CHAIN_DECADES_WARNING):
            continue
        judged.update(c.layer.name for c in chain.layers)
        severity = "critical" if worst >= CHAIN_DECADES_CRITICAL or nonfinite else "warning"
        ranked = sorted(chain.layers, key=lambda c: -abs(math.log10(c.ratio)))
        direction = "grow" if (measured if measured is not None and abs(measured) > abs(predicted)
                               else predicted) > 0 else "shrink"
        names = [c.layer.name for c in chain.layers]
        mean_log = predicted / len(chain.layers)  # the layer that best represents the chain
        typical = min(chain.layers, key=lambda c: abs(math.log10(c.ratio) - mean_log))
        acts = sorted({c.layer.activation_after or "none" for c in chain.layers})
        summary = (f"Init mismatched to the activations: along {len(names)} weight layers without "
                   f"normalisation or residual path (`{names[0]}` ... `{names[-1]}`) the signal is set to "
                   f"{direction} about 10^{abs(predicted):.1f}x at step 0 "
                   f"(e.g. `{typical.layer.name}`: weight std {float(typical.layer.extra['weight_std']):.3g} "
                   f"vs {typical.rule}'s {typical.expected_std:.3g} for "
                   f"{typical.layer.activation_after or 'no activation'}).")
        if measured is not None:
            summary = summary[:-1] + (f"; measured activation std goes from {act_ev['act_std_first']:.3g} to "
                                      f"{act_ev['act_std_last']:.3g}.")
        evidence: dict[str, Any] = {
            "model": chain.model,
            "predicted_decades": round(predicted, 3),
            "measured_decades": None if measured is None else round(measured, 3),
            "nonfinite_activations": nonfinite,
            "chain_layers": len(names),
            "init_ratio": {c.layer.name: round(c.ratio, 4) for c in ranked[:8]},
            "expected": {c.layer.name: f"{c.rule} std {c.expected_std:.4g}" for c in ranked[:8]},
            "activation_after": {c.layer.name: c.layer.activation_after for c in ranked[:8]},
            "grad_norm_step0": grad_profile(record, [chain.layers[0].layer, chain.layers[-1].layer]),
            "threshold_decades": CHAIN_DECADES_WARNING,
            **act_ev,
        }
        findings.append(Finding(
            code="poor_initialization", severity=severity, step=step,
            layers=tuple(c.layer.name for c in ranked),
            summary=summary, evidence=evidence, advice=_init_advice(acts)))
    findings.extend(_too_large_in_blocks(record, judged, step))
    return findings


def _too_large_in_blocks(record: Record, judged: set[str], step: int | None) -> list[Finding]:
    """Weights too large layer by layer where no chain compounds them (residual branches,
    layers before a LayerNorm): the geometric mean of weight std / He-or-Xavier std over
    the model's weight layers (those no chain finding already named) >= BLOCK_INIT_RATIO_LARGE,
    confirmed by a step-0 loss >= INIT_LOSS_EXCESS x ln(classes), classes being the
    last weight layer's outputs."""
    found = []
    loss_steps, losses = points(record.get("loss"))
    if not loss_steps or loss_steps[0] != 0:
        return []
    loss0 = losses[0]
    for model, layers in weight_layers_by_model(record).items():
        head = layers[-1]
        classes = int(head.extra.get("fan_out") or 0)
        if classes < 2 or loss0 < INIT_LOSS_EXCESS * math.log(classes):
            continue
        scored = []
        for layer in layers:
            ex = layer.extra
            std = float(ex["weight_std"])
            if layer.name in judged or ex.get("weight_constant") or not math.isfinite(std) or std <= 0:
                continue
            fam = activation_family(layer.activation_after)
            rule, exp = expected_std(fam, int(ex["fan_in"]), int(ex["fan_out"]))
            scored.append((std / exp, layer, rule, exp))
        if len(scored) < BLOCK_INIT_MIN_LAYERS:
            continue
        mean_ratio = 10 ** (sum(math.log10(r) for r, *_ in scored) / len(scored))
        if mean_ratio < BLOCK_INIT_RATIO_LARGE:
            continue
        scored.sort(key=lambda x: -x[0])
        ratio, typical, rule, exp = scored[len(scored) // 2]
        stds = [(layer.name, first_point(record.get(f"act_std/{layer.name}"))) for _, layer, _, _ in scored]
        stds = [(n, v) for n, v in stds if v is not None and math.isfinite(v)]
        act = max(stds, key=lambda x: x[1]) if stds else None
        in_blocks = sum(1 for _, layer, _, _ in scored if layer.extra.get("residual_bypass"))
        summary = (f"Weights initialised {mean_ratio:.1f}x larger than He/Xavier for their activations across "
                   f"{len(scored)} weight layers ({in_blocks} in residual branches; e.g. `{typical.name}`: std "
                   f"{float(typical.extra['weight_std']):.3g} vs {rule}'s {exp:.3g}): the loss at step 0 is "
                   f"{loss0:.3g}, {loss0 / math.log(classes):.1f}x the ln({classes}) = {math.log(classes):.2f} "
                   f"of a uniform guess" + (f"; activation std up to {act[1]:.3g} (`{act[0]}`)." if act else "."))
        evidence: dict[str, Any] = {
            "model": model,
            "mean_init_ratio": round(mean_ratio, 3),
            "weight_layers": len(scored),
            "residual_branch_layers": in_blocks,
            "init_ratio": {layer.name: round(r, 4) for r, layer, _, _ in scored[:8]},
            "expected": {layer.name: f"{rl} std {e:.4g}" for _, layer, rl, e in scored[:8]},
            "loss_step0": loss0,
            "classes": classes,
            "uniform_loss": math.log(classes),
            "act_std_step0_max": act[1] if act else None,
            "threshold_ratio": BLOCK_INIT_RATIO_LARGE,
        }
        advice = ("Initialise the weights small, as transformers do (GPT-2: N(0, 0.02), the residual "
                  "projections scaled by 1/sqrt(2 * n_layers)); normalisation does not undo a too-large init "
                  "inside the residual branches or of the logits:\n"
                  "    for m in model.modules():\n"
                  "        if isinstance(m, nn.Linear):\n"
                  "            nn.init.normal_(m.weight, mean=0.0, std=0.02)\n"
                  "or `gv.init_(model, batch)`, which picks He/Xavier per layer.")
        found.append(Finding(code="poor_initialization", severity="warning", step=step,
                             layers=tuple(layer.name for _, layer, _, _ in scored[:8]), summary=summary,
                             evidence=evidence, advice=advice))
    return found



def _init_advice(acts: list[str]) -> str:
    he = [a for a in acts if activation_family(a) in HE_FAMILIES]
    xavier = [a if a != "none" else "no activation (output/projection layers)" for a in acts if a not in he]
    parts = []
    if he:
        parts.append(f"He (Kaiming) before {', '.join(he)}: `nn.init.kaiming_normal_(m.weight, nonlinearity='relu')`")
    if xavier:
        parts.append(f"Xavier before {', '.join(xavier)}: `nn.init.xavier_normal_(m.weight)`")
    return ("Initialise each layer for the activation that follows it, biases zero: "
            + "; ".join(parts) + ". One call does it by tracing a batch: "
            "`gv.init_(model, example_batch)`. Normalisation (LayerNorm/BatchNorm) or residual "
            "connections also stop the scale from compounding with depth.")


# ------------------------------------------------------------------ symmetric_weights
def symmetric_weights(record: Record) -> list[Finding]:
    """Hidden Linear/Conv layers whose output units all have identical incoming weights
    (zero/constant init). Critical when symmetry cannot break: the next weight layer's
    columns are identical too, or the layer got no gradient at step 0; warning when
    only the next layer's randomness can slowly break it. The last weight layer (the
    targets differ per output) and the last weight layer of each residual branch
    (zero-init on purpose, e.g. Fixup/ReZero, GPT-2's residual projections: the
    skip path carries the signal) are exempt; the branch's other layers are not
    (``residual_branch_last`` False; records without that fact exempt the whole
    branch, as before)."""
    hits: list[tuple[str, LayerInfo, dict[str, Any]]] = []
    for model, layers in weight_layers_by_model(record).items():
        for i, layer in enumerate(layers):
            ex = layer.extra
            if not ex.get("identical_rows") or (ex.get("residual_bypass") and ex.get("residual_branch_last", True)):
                continue
            if int(layer.out_features or ex.get("fan_out", 0) or 0) <= 1 or i == len(layers) - 1:
                continue
            nxt = layers[i + 1]
            grads = grad_profile(record, [layer])
            g = grads.get(layer.name)
            next_symmetric = bool(nxt.extra.get("identical_cols") or nxt.extra.get("weight_constant"))
            stuck = next_symmetric or (g is not None and g == 0.0)
            hits.append(("critical" if stuck else "warning", layer, {
                "weight_std": ex.get("weight_std"), "weight_mean": ex.get("weight_mean"),
                "constant": bool(ex.get("weight_constant")), "next_layer": nxt.name,
                "next_layer_columns_identical": next_symmetric, "grad_norm_step0": g}))
    if not hits:
        return []
    hits.sort(key=lambda h: (h[0] != "critical", h[1].depth or 0))
    severity = hits[0][0]
    names = [h[1].name for h in hits]
    zero = [h[1].name for h in hits if h[2]["constant"] and h[2]["weight_mean"] == 0]
    what = "all zero" if len(zero) == len(hits) else "identical rows (zero/constant init)"
    shown = ", ".join(f"`{n}`" for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    summary = (f"{shown}: every unit starts with the same weights ({what}), so the units compute the "
               f"same function and receive the same gradient"
               + (" - the symmetry can never break." if severity == "critical"
                  else " - only randomness in the next layer can slowly break it."))
    return [Finding(
        code="symmetric_weights", severity=severity, step=_audit_step(record), layers=tuple(names),
        summary=summary,
        evidence={"layers": {h[1].name: h[2] for h in hits[:16]}, "count": len(hits)},
        advice=_symmetric_advice(record, hits[0][1]),
    )]


def _symmetric_advice(record: Record, first: LayerInfo) -> str:
    """Random init for the first symmetric layer, by the activation after it; where the
    model has residual branches, which of its layers may start at zero."""
    if activation_family(first.activation_after) in HE_FAMILIES:
        init = f"nn.init.kaiming_normal_({attr(first.name)}.weight, nonlinearity='relu')"
    else:
        init = f"nn.init.xavier_normal_({attr(first.name)}.weight)"
    branch_ends = [l.name for l in record.layers_in_order()
                   if l.model == first.model and l.extra.get("residual_branch_last")]
    allowed = "the last layer of a residual branch"
    if branch_ends:
        allowed += " (here " + ", ".join(f"`{attr(n)}`" for n in branch_ends[:4]) + \
            (f" and {len(branch_ends) - 4} more" if len(branch_ends) > 4 else "") + ")"
    return ("Break the symmetry with random init (biases may stay zero): `gv.init_(model, batch)`, "
            f"or per layer, e.g. `{init}` (He for the ReLU family, Xavier for sigmoid/tanh or no "
            f"activation). Zero init is fine only for biases, the final output layer, or {allowed}.")


RULES = [poor_initialization, symmetric_weights]
