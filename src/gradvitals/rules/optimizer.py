"""The optimizer's hyperparameters against what the layers need: Adam's epsilon.

Adam divides each step by ``sqrt(v) + eps``, ``v`` the running mean of the squared
gradient. When a layer's gradients are of the order of ``eps``, the denominator is
``eps``, not the gradient's own scale, and the update shrinks by
``rms / (rms + eps)``: the layer stops learning. Decided from the per-parameter
gradient norms (every step), their sizes (``ParamInfo.numel``) and the groups'
``eps`` (``run.optimizer_groups``, recorded from ``param_groups``).
"""

from __future__ import annotations

import math
from typing import Any

from ..findings import Finding
from ..record import Record
from ._common import as_dict, points, sci

#: A gradient RMS at or below this multiple of ``eps`` damps Adam's update to at most
#: 1/(1 + 1/3) = 75% of its eps-free size at the RMS (and more for the smaller
#: entries under it). Wortsman et al. 2023, "Small-scale proxies for large-scale
#: Transformer training instabilities" (arXiv 2309.14322), §3.4 "AdamW epsilon":
#: as a layer's gradient RMS falls toward eps (1e-8 there), its update RMS falls with it
#: and the loss suffers; lowering eps (to 1e-15) restored the updates. The factor is
#: our reading: "of the order of eps".
EPS_RMS_FACTOR = 3.0

#: "Stays": at least this fraction of the judged steps at or below the bound (a few
#: larger gradients in between do not rescue a layer that is damped the rest of the time).
EPS_STAYS_FRACTION = 0.9

#: Judged over the last half of the steps with a gradient: early steps of a layer
#: initialised small (LayerScale, zero-init branches) can be tiny and then grow.
EPS_WINDOW_FRACTION = 0.5

#: Fewer gradient points than this in the window decide nothing.
EPS_MIN_POINTS = 20

#: Optimizers that divide the step by ``sqrt(v) + eps`` (a group with ``eps`` and
#: ``betas`` from another class counts too, unless listed in EPS_NOT_DENOMINATOR).
ADAM_FAMILY = frozenset({"Adam", "AdamW", "NAdam", "RAdam", "FusedAdam", "AdamW8bit", "Adam8bit",
                         "PagedAdamW", "PagedAdamW8bit"})
#: ``eps`` plays another part there (Adamax: inside a max; Adafactor: a floor on v).
EPS_NOT_DENOMINATOR = frozenset({"Adamax", "Adafactor", "Adagrad", "Adadelta"})

#: Embedding tables: only the rows of the batch's tokens get a gradient, so the whole
#: table's RMS is not the per-entry scale Adam sees (1% of rows touched reads 10x low).
SPARSE_ROW_LAYERS = frozenset({"Embedding", "EmbeddingBag"})

#: The largest ``eps`` recommended (PyTorch's default, Wortsman et al.'s baseline).
EPS_DEFAULT = 1e-8
#: fp16 cannot hold a number below 2^-24 = 6.0e-8 (its smallest subnormal): a smaller eps
#: in fp16 optimizer state rounds to 0.
FP16_SMALLEST = 2.0 ** -24


def group_of_params(record: Record) -> dict[str, dict[str, Any]]:
    """Each parameter's last recorded optimizer group entry (``run.optimizer_groups``)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in record.run.get("optimizer_groups") or ():
        if isinstance(entry, dict):
            for p in entry.get("params") or ():
                out[p] = entry
    return out


def _eps_divides(entry: dict[str, Any]) -> float | None:
    eps, betas, kind = entry.get("eps"), entry.get("betas"), entry.get("kind")
    if not isinstance(eps, (int, float)) or not eps > 0 or not isinstance(betas, list):
        return None
    if kind in EPS_NOT_DENOMINATOR or eps <= EPS_DEFAULT:
        # At the default or below, gradients that small are the vanishing-gradient
        # rules' business (a GAN generator at 1e-10 under eps 1e-8 learns with no eps).
        return None
    return float(eps)


def _clip_scale(record: Record) -> dict[int, float]:
    """Step -> the factor clip_grad_norm_ scaled the gradients by (Adam sees them clipped)."""
    totals, maxes = as_dict(record.get("clip_total_norm")), as_dict(record.get("clip_max_norm"))
    return {s: min(1.0, maxes[s] / t) for s, t in totals.items() if s in maxes and t > 0}


def adam_epsilon_too_large(record: Record) -> list[Finding]:
    """Layers whose gradient RMS stays within EPS_RMS_FACTOR x their group's Adam eps,
    where that eps is above EPS_DEFAULT (raised by the user).

    For each parameter an Adam-family group steps: RMS = grad_norm / sqrt(numel) at each
    step (after clipping, when clip_grad_norm_ ran), over the last EPS_WINDOW_FRACTION
    of its non-zero points (at least EPS_MIN_POINTS); fires when EPS_STAYS_FRACTION of
    them are at or below EPS_RMS_FACTOR x eps. A gradient exactly 0 is not eps's doing
    (no_gradient, dead units) and is left out; embedding tables are skipped.
    """
    groups = group_of_params(record)
    if not groups:
        return []
    clip = _clip_scale(record)
    hits: list[dict[str, Any]] = []
    for name, series in record.per_name("grad_norm").items():
        entry = groups.get(name)
        info = record.params.get(name)
        if entry is None or info is None or info.numel < 1:
            continue
        eps = _eps_divides(entry)
        if eps is None:
            continue
        layer = record.layers.get(info.layer)
        if layer is not None and layer.kind in SPARSE_ROW_LAYERS:
            continue
        steps, norms = points(series)
        root = math.sqrt(info.numel)
        pairs = [(s, n * clip.get(s, 1.0) / root) for s, n in zip(steps, norms) if n > 0]
        pairs = pairs[int(len(pairs) * (1 - EPS_WINDOW_FRACTION)):]
        window = [r for _, r in pairs]
        if len(window) < EPS_MIN_POINTS:
            continue
        bound = EPS_RMS_FACTOR * eps
        low = sum(1 for r in window if r <= bound)
        if low < EPS_STAYS_FRACTION * len(window):
            continue
        typical = sorted(window)[len(window) // 2]
        first = pairs[0][0]
        hits.append({"param": name, "layer": info.layer, "grad_rms": typical, "eps": eps,
                     "rms_over_eps": typical / eps, "damping": typical / (typical + eps),
                     "optimizer": entry.get("optimizer"), "group": entry.get("group"),
                     "kind": entry.get("kind"), "dtype": info.dtype, "since": first})
    if not hits:
        return []
    order = {l.name: i for i, l in enumerate(record.layers_in_order())}
    hits.sort(key=lambda h: (order.get(h["layer"], len(order)), h["param"]))
    layers = list(dict.fromkeys(h["layer"] for h in hits))
    worst = min(hits, key=lambda h: h["rms_over_eps"])
    eps_values = sorted({h["eps"] for h in hits})
    eps_text = " / ".join(sci(e) for e in eps_values)
    summary = (f"Adam's eps ({eps_text}) is as large as the gradients of {len(layers)} layer"
               f"{'s' if len(layers) > 1 else ''} ({', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}): "
               f"gradient RMS {sci(worst['grad_rms'])} in {worst['layer']}, {worst['rms_over_eps']:.2g}x eps, "
               f"so its update is damped to {worst['damping']:.0%} of what Adam would step: the layer "
               f"barely learns.")
    evidence = {"layers": hits[:20], "factor": EPS_RMS_FACTOR, "stays_fraction": EPS_STAYS_FRACTION,
                "window_fraction": EPS_WINDOW_FRACTION}
    return [Finding(code="adam_epsilon_too_large", severity="warning", step=min(h["since"] for h in hits),
                    layers=tuple(layers), summary=summary, evidence=evidence, advice=_advice(hits, worst))]


def _advice(hits: list[dict[str, Any]], worst: dict[str, Any]) -> str:
    kind = worst.get("kind") or "AdamW"
    if kind not in ADAM_FAMILY:
        kind = "AdamW"
    largest = max(h["eps"] for h in hits)
    new = EPS_DEFAULT
    lines = [f"Lower eps so it sits well below the gradients' scale (Adam's update is m / (sqrt(v) + eps)):",
             f"    optimizer = torch.optim.{kind}(model.parameters(), lr=..., eps={new:g})"
             f"  # was eps={largest:g}"]
    groups = sorted({(h["optimizer"], h["group"]) for h in hits if h.get("group") is not None})
    if len(groups) == 1 and groups[0][1] not in (0, None):
        lines.append(f"    # or only that param group:  optimizer.param_groups[{groups[0][1]}]['eps'] = {new:g}")
    dtypes = {h["dtype"] for h in hits}
    if "float16" in dtypes:
        lines.append(f"These parameters are float16: an eps below {FP16_SMALLEST:.1e} rounds to 0 in fp16 optimizer "
                     "state (division by ~0). Keep the weights and optimizer in float32 and train under "
                     "torch.autocast(dtype=torch.float16) with a GradScaler; then eps=1e-8 or lower is safe.")
    else:
        lines.append("With torch.autocast (bf16 or fp16) the weights and Adam's state stay float32, so eps=1e-8 "
                     "or lower is safe; with pure float16 weights (model.half()) an eps below 6e-8 rounds to 0, "
                     "keep float32 master weights instead. bf16 holds 1e-15, but its 8-bit mantissa makes "
                     "sqrt(v) + eps equal sqrt(v) anyway.")
    return "\n".join(lines)
