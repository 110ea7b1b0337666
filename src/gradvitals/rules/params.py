"""Parameters that do not take part in learning: no gradient ever reaches them
(disconnected from the loss), or gradients reach them but the optimizer never
moves them (missing from the optimizer); and gradients never cleared between
steps (no ``zero_grad``), so each step adds in all the earlier ones.

Decided from ``ParamInfo`` facts the recorder keeps exactly (``requires_grad``,
``in_optimizer``, ``grad_seen``) and, for the "moves exactly 0" case, the
scheduled ``update_ratio`` series. Intentionally frozen parameters
(``requires_grad=False``) are never reported.
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import ParamInfo, Record
from ._common import as_dict, attr, names, points

#: Recorded optimizer steps before "never" means anything.
MIN_STEPS = 1

#: Relative gradient (|grad|/|weight|) above which an update of exactly 0 cannot
#: be float32 rounding of a tiny step (needs lr < 1e-4 to round away): only then
#: is a parameter with ratio 0 "not updated" rather than "vanishing".
NOT_UPDATED_MIN_RELATIVE_GRAD = 1e-3

#: A parameter norm below this is a zero-initialised tensor (a bias) that has barely
#: moved: |grad|/|weight| divides by ~0 and says nothing (a 50-layer tanh MLP's early
#: biases, norm ~1e-24 under gradients of 1e-22 that underflow in the update).
NOT_UPDATED_MIN_WEIGHT_NORM = 1e-6

#: Scheduled points with ratio exactly 0 needed (one step may be skipped by an AMP
#: scaler or accumulation).
NOT_UPDATED_MIN_POINTS = 2


#: Steps of one optimizer taken on gradients its previous step had already used
#: (nothing cleared them before the next backward) before it is reported: one such
#: step can be a deliberate trick, three in a run are a missing zero_grad.
GRAD_NOT_ZEROED_MIN_STEPS = 3
#: Share of that optimizer's steps (from the first such one on) above which the run
#: is broken, not merely degraded: the update is the running sum of every gradient.
GRAD_NOT_ZEROED_BROKEN = 0.9


def grad_not_zeroed(record: Record) -> list[Finding]:
    """Optimizer steps whose gradients still held the previous step's.

    Decided from the ``grad_not_zeroed`` events the recorder writes per optimizer:
    between two of its steps no gradient clearing was seen (the watched gradient
    tensor kept its identity and version counter from that optimizer's step to the
    next backward, with no clearing at any later point before its next step).
    """
    out: list[Finding] = []
    several = len(record.run.get("optimizers") or []) > 1 or len(record.events_of("grad_not_zeroed")) > 1
    for ev in record.events_of("grad_not_zeroed"):
        n = int(ev.get("steps") or 0)
        first = ev.get("step")
        if n < GRAD_NOT_ZEROED_MIN_STEPS or not isinstance(first, int):
            continue
        span = max(record.steps - first, n)
        share = n / span
        opt = str(ev.get("optimizer") or "optimizer")
        kind = f" ({ev['optimizer_kind']})" if ev.get("optimizer_kind") else ""
        who = f"Optimizer `{opt}`{kind}" if several else f"The optimizer{kind}"
        severity = "critical" if share >= GRAD_NOT_ZEROED_BROKEN else "warning"
        summary = (f"{who} stepped on gradients that were never cleared at {n} of its {span} steps from "
                   f"step {first}: nothing zeroed them between one step and the next backward, so backward() "
                   f"added each new gradient to all the earlier ones and every update follows their running sum.")
        advice = ("Clear the gradients once per optimizer step: call `optimizer.zero_grad()` before "
                  "`loss.backward()` (or right after `optimizer.step()`). With gradient accumulation, clear "
                  "them after the step, not before every micro-batch:\n"
                  "    optimizer.zero_grad()\n    loss.backward()\n    optimizer.step()")
        out.append(Finding(code="grad_not_zeroed", severity=severity, step=first, layers=(),
                           summary=summary, advice=advice,
                           evidence={"optimizer": opt, "steps": n, "of_steps": span,
                                     "last_step": ev.get("last_step")}))
    return out


def _by_layer(params: list[ParamInfo]) -> dict[str, list[ParamInfo]]:
    out: dict[str, list[ParamInfo]] = {}
    for p in params:
        out.setdefault(p.layer, []).append(p)
    return out


def _model_of(record: Record, p: ParamInfo) -> str:
    layer = record.layers.get(p.layer)
    return layer.model if layer is not None else ""


def _untrained_models(record: Record, trainable: list[ParamInfo]) -> set[str]:
    """Models that took part in no backward (not one of their parameters ever got a
    gradient) and that no optimizer is known to hold, while another model did get
    gradients: evaluated, not trained (a best checkpoint reloaded with torch.load to
    be tested, a teacher, a reference model, a target network, an inference copy).
    Their parameters are not expected to receive gradients."""
    by_model: dict[str, list[ParamInfo]] = {}
    for p in trainable:
        by_model.setdefault(_model_of(record, p), []).append(p)
    if len(by_model) < 2:
        return set()
    trained = {m for m, ps in by_model.items() if any(p.grad_seen for p in ps)}
    if not trained:
        return set()  # nothing got a gradient anywhere: that is the finding
    return {m for m, ps in by_model.items()
            if m not in trained and not any(p.in_optimizer for p in ps)}


def no_gradient(record: Record) -> list[Finding]:
    """Trainable parameters that never received a gradient.

    Decides from ``ParamInfo``: ``requires_grad`` and not ``grad_seen`` after at
    least MIN_STEPS steps with gradients, and not known to be outside the
    optimizer (``in_optimizer is False``: the user left it out on purpose).
    A whole model none of whose parameters got a gradient and that no optimizer
    holds, beside one that trained, is evaluated, not trained: not reported.
    Critical when no trainable parameter got a gradient at all.
    """
    if record.steps < MIN_STEPS or record.get("grad_norm_global") is None:
        return []
    trainable = [p for p in record.params.values() if p.requires_grad]
    untrained = _untrained_models(record, trainable)
    trainable = [p for p in trainable if _model_of(record, p) not in untrained]
    missing = [p for p in trainable if not p.grad_seen and p.in_optimizer is not False]
    if not missing:
        return []
    layers = _by_layer(missing)
    numel = sum(p.numel for p in missing)
    everything = len(missing) == len(trainable)
    # Did they run at all? Layers get a forward position when a traced forward calls
    # them; if others did and these never, their code path never ran (a branch not
    # taken, an expert its router never picks), which detaching would not explain.
    traced = max((s.count for k, s in record.series.items() if k.startswith("act_mean/")), default=0)
    uncalled = (traced > 0 and not everything
                and all(record.layers.get(n) is not None and record.layers[n].depth is None for n in layers))
    they = "they" if len(layers) > 1 else "it"
    if uncalled:
        why = (f"{they} never ran in the {traced} forward passes traced, while the model's other layers did "
               f"(a branch never taken, an expert its router never picks, a module built but not called).")
    else:
        why = f"{'they are' if len(layers) > 1 else 'it is'} not connected to the loss."
    summary = (f"{names(list(layers))} ({len(missing)} tensor{'s' if len(missing) != 1 else ''}, {numel:,} "
               f"parameters) never received a gradient in {record.steps} steps: {why}")
    evidence = {"params": [p.name for p in missing], "numel": numel, "steps": record.steps,
                "layers": list(layers)}
    if traced:
        evidence["ran_in_traced_forwards"] = not uncalled
    first = next(iter(layers))
    if uncalled:
        advice = (f"Check the code path of forward() that calls {names(list(layers))}: it never ran. For an "
                  f"expert of a mixture of experts, the router sends it no inputs (expert collapse): add a "
                  f"load-balancing auxiliary loss or noise to the router's logits. If it is not meant to be "
                  f"used, remove it, or freeze it:\n    {attr(first)}.requires_grad_(False)")
    else:
        advice = (f"Make sure the output of {names(list(layers))} flows into the loss: it is not called in "
                  f"forward(), or its output is detached (`.detach()`, `.item()`, `torch.no_grad()`, a NumPy "
                  f"round trip) or unused. If it is meant to be frozen, say so:\n"
                  f"    {attr(first)}.requires_grad_(False)")
    return [Finding(code="no_gradient", severity="critical" if everything else "warning", step=0,
                    layers=tuple(layers), summary=summary, evidence=evidence, advice=advice)]


def not_updated(record: Record) -> list[Finding]:
    """Parameters that receive gradients but never change.

    Decides from ``ParamInfo`` (``grad_seen`` and ``in_optimizer is False``: the
    optimizer does not hold them), or from ``update_ratio/<param>`` exactly 0 on
    every (>= NOT_UPDATED_MIN_POINTS) scheduled step while |grad|/|weight| is
    >= NOT_UPDATED_MIN_RELATIVE_GRAD and other parameters do move (so it is not a
    learning rate or clipping that stops everything).
    """
    outside = [p for p in record.params.values()
               if p.requires_grad and p.grad_seen and p.in_optimizer is False]
    frozen_by_ratio = _zero_ratio_params(record, exclude={p.name for p in outside})
    found = outside + frozen_by_ratio
    if not found:
        return []
    layers = _by_layer(found)
    numel = sum(p.numel for p in found)
    stale = _stale_optimizer_params(record) if outside else []
    kinds = [str(k) for k in record.run.get("optimizers") or []]
    kind = kinds[0] if len(kinds) == 1 else "AdamW"
    severity = "warning"
    dist_info = record.run.get("distributed")
    sharded = stale and isinstance(dist_info, dict) and any(
        s in str(dist_info.get("strategy", "")) for s in ("fsdp2", "hsdp"))
    if sharded:
        # fully_shard replaces a module's parameters with new DTensor ones: an optimizer
        # built before it holds the old plain tensors (huggingface/accelerate#2665).
        severity = "critical"
        why = (f"the optimizer holds {len(stale)} tensor{'s' if len(stale) != 1 else ''}, none of them the "
               f"{len(outside)} parameter{'s' if len(outside) != 1 else ''} the model trains: it was built "
               f"before fully_shard, which replaced the model's parameters with sharded DTensors, so it steps "
               f"the old plain tensors (torch raises no error)")
    elif stale:
        # The optimizer steps parameters that never get a gradient, the parameters that do
        # are in no optimizer: nothing in the run learns (a model built again after its
        # optimizer was created from the first one's parameters).
        severity = "critical"
        who = f"the optimizer ({kinds[0]})" if len(kinds) == 1 else "the optimizers"
        why = (f"no optimizer holds them, and {who} steps {len(stale)} parameter tensor"
               f"{'s' if len(stale) != 1 else ''} that never receive a gradient: the model was built again "
               f"(or replaced) after the optimizer was created from an earlier one's parameters, so nothing "
               f"steps the model that trains")
    elif outside:
        why = "they are not in the optimizer" if len(outside) > 1 else "it is not in the optimizer"
    else:
        why = "the optimizer step leaves them exactly unchanged"
    summary = (f"{names(list(layers))} ({numel:,} parameters) receive gradients but never change: {why}.")
    evidence = {"params": [p.name for p in found], "not_in_optimizer": [p.name for p in outside],
                "zero_update_ratio": [p.name for p in frozen_by_ratio], "numel": numel}
    if stale:
        evidence["stale_optimizer_params"] = len(stale)
        # Why: how many tensors the optimizer steps, and how many of them the model's.
        evidence["optimizer_tensors"] = len(stale)
        evidence["optimizer_tensors_of_model"] = sum(1 for p in record.params.values() if p.in_optimizer)
        evidence["cause"] = "optimizer_before_fully_shard" if sharded else "model_rebuilt_after_optimizer"
    first = next(iter(layers))
    if sharded:
        advice = (f"Build the optimizer after fully_shard, from the sharded model's parameters:\n"
                  f"    fully_shard(model)  # every fully_shard call first\n"
                  f"    optimizer = torch.optim.{kind}(model.parameters(), lr=...)\n"
                  f"(with accelerate: prepare the model before creating the optimizer, or pass both to one "
                  f"`prepare` call).")
    elif stale:
        advice = (f"Create the optimizer after the last line that builds or replaces the model (`model = ...`), "
                  f"from that model's parameters:\n    model = ...\n"
                  f"    optimizer = torch.optim.{kind}(model.parameters(), lr=...)\n"
                  f"(or build the model once, and move it with `model.to(device)` before the optimizer).")
    else:
        advice = (f"Build the optimizer from every trainable parameter, after the model is complete (modules "
                  f"added or replaced later, e.g. {names(list(layers))}, are not in it):\n"
                  f"    optimizer = torch.optim.{kind}(model.parameters(), lr=...)\n"
                  f"or add them: `optimizer.add_param_group({{'params': {attr(first)}.parameters()}})`. "
                  f"If they are meant to stay fixed, freeze them: `{attr(first)}.requires_grad_(False)`.")
    return [Finding(code="not_updated", severity=severity, step=0, layers=tuple(layers), summary=summary,
                    evidence=evidence, advice=advice)]


def _stale_optimizer_params(record: Record) -> list[str]:
    """Parameters the optimizers step that never received a gradient, when no parameter
    any optimizer holds ever did: those of models in the record (``in_optimizer`` and
    not ``grad_seen``) and those of no model (measured by the optimizer under their
    ``opt.paramN`` names: a weight series, never a gradient one). Empty when any
    optimizer parameter got a gradient (a loss network left trainable beside a model
    that trains is only outside the optimizer)."""
    held = [p for p in record.params.values() if p.in_optimizer]
    if any(p.grad_seen for p in held) or record.get("grad_norm_global") is not None:
        return []
    if any(k.startswith("grad_norm/") for k in record.series):
        return []
    orphans = [k.split("/", 1)[1] for k in record.series
               if k.startswith("weight_norm/") and k.split("/", 1)[1] not in record.params]
    return [p.name for p in held] + orphans


def _zero_ratio_params(record: Record, exclude: set[str]) -> list[ParamInfo]:
    ratios = record.per_name("update_ratio")
    grads = record.per_name("grad_norm")
    weights = record.per_name("weight_norm")
    moving = any(v > 0 for s in ratios.values() for v in points(s)[1])
    if not moving:
        return []  # nothing moves: a learning rate or clipping matter, not this parameter
    out = []
    for name, series in ratios.items():
        info = record.params.get(name)
        if info is None or name in exclude or not info.requires_grad or not info.grad_seen:
            continue
        steps, values = points(series)
        if len(values) < NOT_UPDATED_MIN_POINTS or any(v != 0 for v in values):
            continue
        g, w = as_dict(grads.get(name)), as_dict(weights.get(name))
        rel = [g[s] / w[s] for s in steps
               if s in g and s in w and w[s] > NOT_UPDATED_MIN_WEIGHT_NORM and math.isfinite(g[s])]
        if rel and min(rel) >= NOT_UPDATED_MIN_RELATIVE_GRAD:
            out.append(info)
    return out
