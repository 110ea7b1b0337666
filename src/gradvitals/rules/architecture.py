"""``architecture_risk``: structures the chapter flags as unstable, linted at step 0.

Decided from the init audit (``probes/init_audit.py``): the activation after each
weight layer (``LayerInfo.activation_after``), residual paths found in the traced
forward (``extra["residual_bypass"]``), recurrent spectral radii
(``extra["spectral_radius"]``) and Post-LN transformer layers (``init_audit``
events), plus the step-0 gradient norms to judge whether the signal still flows.
No torch.

- deep sigmoid/tanh stack without residual paths (sigmoid' <= 0.25 compounds);
- deep Post-LN transformer (``x = LN(x + f(x))``: the gradient through the LNs is
  unstable at depth without a long warmup; Pre-LN is not);
- vanilla RNN whose recurrent weight has spectral radius > 1 (the gradient is
  multiplied by W_hh^T once per time step);
- a deep plain stack (no normalisation, no residuals) whose signal propagates well
  is only ``info``.
"""

from __future__ import annotations

import math
from typing import Any

from ..findings import Finding
from ..record import LayerInfo, Record
from ..taxonomy import SATURATING_FAMILIES, activation_family
from .init import chains, first_point, grad_profile, weight_layers_by_model

#: Consecutive sigmoid/tanh layers without a residual path that make a "deep" stack:
#: through 8 sigmoids the gradient is scaled by at most 0.25^8 = 1.5e-5.
SATURATING_STACK_LAYERS = 8
#: A stack whose step-0 gradient norm shrinks more than 100x from its last to its first
#: layer is not propagating (the chapter's max/min ratio): warning, else info.
STACK_GRAD_SHRINK = 1e-2
#: Post-LN layers from which a transformer is "deep": Xiong et al. (2020) show the
#: Post-LN gradient at the top grows with depth; 6+ layers need long warmup.
POST_LN_DEEP_LAYERS = 6
#: Largest |eigenvalue| of a vanilla RNN's W_hh above which gradients grow
#: geometrically with sequence length (1.0 is the stable edge; 5% for numerics,
#: an orthogonal init sits exactly at 1).
SPECTRAL_RADIUS_LIMIT = 1.05
#: Plain weight layers (no normalisation, no residual) from which a net is deep
#: enough to mention: at 16+ layers trainability hinges on exact init and lr.
DEEP_PLAIN_LAYERS = 16
#: A warmup ramp: the first logged lr below this fraction of the largest one.
WARMUP_START_FRACTION = 0.5


def architecture_risk(record: Record) -> list[Finding]:
    """All architecture lints of the record (see the module docstring)."""
    step = _audit_step(record)
    findings: list[Finding] = []
    stacks = _saturating_stacks(record)
    for stack in stacks:
        findings.append(_stack_finding(record, stack, step))
    findings.extend(_post_ln(record, step))
    findings.extend(_recurrent(record, step))
    in_stacks = {l.name for s in stacks for l in s}
    for chain in chains(record):
        names = [c.layer.name for c in chain.layers]
        if len(names) >= DEEP_PLAIN_LAYERS and not in_stacks & set(names):
            findings.append(Finding(
                code="architecture_risk", severity="info", step=step, layers=(names[0], names[-1]),
                summary=(f"{len(names)} weight layers in a row (`{names[0]}` ... `{names[-1]}`) with neither "
                         f"normalisation nor residual connections: it trains only while init and learning "
                         f"rate stay exactly right."),
                evidence={"kind": "deep_plain_stack", "model": chain.model, "layers": len(names),
                          "threshold": DEEP_PLAIN_LAYERS,
                          "predicted_decades": round(chain.predicted_decades, 3)},
                advice=("Fine as it is if it trains; for robustness add residual connections "
                        "(`x = x + block(x)`) and normalisation (LayerNorm/BatchNorm) every few layers."),
            ))
    return findings


def _audit_step(record: Record) -> int | None:
    steps = [e.get("step") for e in record.events_of("init_audit") if isinstance(e.get("step"), int)]
    return min(steps) if steps else (0 if record.steps else None)


# ------------------------------------------------------------ saturating stacks
def _saturating_stacks(record: Record) -> list[list[LayerInfo]]:
    """Maximal runs of consecutive weight layers followed by sigmoid/tanh, with no
    residual path around them, at least SATURATING_STACK_LAYERS long."""
    stacks = []
    for layers in weight_layers_by_model(record).values():
        run: list[LayerInfo] = []
        for layer in layers + [None]:  # type: ignore[list-item]
            ok = (layer is not None and activation_family(layer.activation_after) in SATURATING_FAMILIES
                  and not layer.extra.get("residual_bypass"))
            if ok:
                run.append(layer)
                continue
            if len(run) >= SATURATING_STACK_LAYERS:
                stacks.append(run)
            run = []
    return stacks


def _stack_finding(record: Record, stack: list[LayerInfo], step: int | None) -> Finding:
    fams = sorted({activation_family(l.activation_after) or "" for l in stack})
    acts = sorted({l.activation_after or "" for l in stack})
    grads = grad_profile(record, [stack[0], stack[-1]])
    g0, g1 = grads.get(stack[0].name), grads.get(stack[-1].name)
    shrink = (g0 / g1) if g0 is not None and g1 and math.isfinite(g0) and math.isfinite(g1) else None
    if shrink is not None:
        flows = shrink > STACK_GRAD_SHRINK
    else:
        flows = "sigmoid" not in fams  # unmeasured: sigmoid' <= 0.25 compounds, tanh' <= 1 may not
    severity = "info" if flows else "warning"
    names = [l.name for l in stack]
    measured = (f"; at step 0 the gradient of `{names[0]}` is {shrink:.1e}x that of `{names[-1]}`"
                if shrink is not None else "")
    return Finding(
        code="architecture_risk", severity=severity, step=step, layers=tuple(names),
        summary=(f"{len(names)} {'/'.join(acts)} layers stacked without residual connections "
                 f"(`{names[0]}` ... `{names[-1]}`): each saturating activation scales the gradient by "
                 f"at most {0.25 if 'sigmoid' in fams else 1.0} on its way back{measured}."),
        evidence={"kind": "saturating_stack", "layers": len(names), "activations": acts,
                  "threshold": SATURATING_STACK_LAYERS, "grad_norm_step0": grads,
                  "grad_shrink": shrink, "shrink_threshold": STACK_GRAD_SHRINK},
        advice=(f"Replace {'/'.join(acts)} in the hidden layers with ReLU/GELU and He init "
                "(`gv.init_(model, batch)`), or add residual connections around the blocks "
                "(`x = x + block(x)`) so the gradient has an identity path; keep sigmoid for the output only."),
    )


# --------------------------------------------------------------------- Post-LN
def _warmup_seen(record: Record) -> bool:
    for s in record.per_name("lr").values():
        vals = [v for v in s.values if math.isfinite(v)]
        if len(vals) >= 2 and max(vals) > 0 and vals[0] < WARMUP_START_FRACTION * max(vals):
            return True
    return False


def _post_ln(record: Record, step: int | None) -> list[Finding]:
    out = []
    for ev in record.events_of("init_audit"):
        layers = list(ev.get("post_ln_layers") or [])
        norms = list(ev.get("post_ln_norms") or [])
        if layers:
            depth, source, names = len(layers), "norm_first=False", layers
        else:
            # traced: a Post-LN stack of n layers feeds 2n-1 residual adds from a LayerNorm output
            depth, source, names = (len(norms) + 1) // 2, "traced", norms
        if depth < POST_LN_DEEP_LAYERS:
            continue
        warm = _warmup_seen(record)
        out.append(Finding(
            code="architecture_risk", severity="info" if warm else "warning", step=step,
            layers=tuple(names),
            summary=(f"{depth} Post-LN transformer layers (`x = LayerNorm(x + f(x))`, `{names[0]}` ... "
                     f"`{names[-1]}`): at this depth Post-LN's gradients are unstable early in training"
                     + (" (a learning-rate warmup is in place, which is the usual mitigation)." if warm
                        else " unless a long learning-rate warmup tames them.")),
            evidence={"kind": "post_ln", "model": ev.get("model"), "post_ln_layers": depth, "source": source,
                      "threshold": POST_LN_DEEP_LAYERS, "warmup_seen": warm},
            advice=("Use Pre-LN: `nn.TransformerEncoderLayer(..., norm_first=True)` (or `x = x + f(norm(x))` "
                    "in your blocks) with a final LayerNorm; if you keep Post-LN, warm the learning rate up "
                    "over the first ~1-4k steps (`torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, "
                    "total_iters=2000)`) and clip gradients at max_norm=1.0. Fine-tuning a pretrained "
                    "Post-LN model (BERT): a short warmup (`warmup_ratio=0.06` in the HF Trainer) is the usual remedy."),
        ))
    return out


# -------------------------------------------------------------------- recurrent
def _recurrent(record: Record, step: int | None) -> list[Finding]:
    out = []
    for layer in record.layers_in_order():
        ex = layer.extra
        radius = ex.get("spectral_radius")
        if not isinstance(radius, (int, float)) or ex.get("recurrent_gates", 1) != 1:
            continue  # LSTM/GRU: the gated cell path, not W_hh alone, carries the gradient
        if not radius > SPECTRAL_RADIUS_LIMIT:
            continue
        by_param: dict[str, Any] = ex.get("spectral_radius_by_param") or {}
        out.append(Finding(
            code="architecture_risk", severity="warning", step=step, layers=(layer.name,),
            summary=(f"`{layer.name}` ({layer.kind}, {ex.get('nonlinearity', 'tanh')}) has a recurrent weight "
                     f"with spectral radius {radius:.2f} > 1: backpropagation through time multiplies the "
                     f"gradient by it once per time step, so it grows like {radius:.2f}^T."),
            evidence={"kind": "recurrent_spectral_radius", "spectral_radius": radius,
                      "by_param": by_param, "limit": SPECTRAL_RADIUS_LIMIT,
                      "grad_norm_step0": {p: first_point(record.get(f"grad_norm/{p}")) for p in layer.params
                                          if record.get(f"grad_norm/{p}") is not None}},
            advice=(f"Initialise `{layer.name}`'s recurrent weights orthogonally (`nn.init.orthogonal_("
                    f"{layer.name if layer.name != '(root)' else 'rnn'}.weight_hh_l0)`, radius 1), clip gradients "
                    "(`torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)`), or use an LSTM/GRU."),
        ))
    return out


RULES = [architecture_risk]
