"""nonfinite: the first NaN/Inf in the loss, an activation, a gradient or a weight.

Decided from the ``nonfinite_origin`` event the recorder writes when it first sees a
non-finite value (it replays that step's forward with tracing to find the module
that produced it, and its backward when the forward and the loss were finite),
falling back to the series' first non-finite steps. The event's ``phase`` says which
pass made it ("forward", the loss included, or "backward"), ``op`` the function.
"""

from __future__ import annotations

from ..findings import Finding
from ..record import QUANTITIES, Record, split_key
from ._common import points, zero_gradient_tail

_WHAT = {
    "activation": "produced the first non-finite activation",
    "input": "received non-finite values in its input (the data or the loss target holds NaN/Inf)",
    "weight": "holds non-finite weights",
    "gradient": "received the first non-finite gradient (backward)",
    "loss": "the loss computation itself produced the first NaN/Inf (forward outputs were finite)",
    "norm_overflow": ("has gradients so large that their float32 norm overflows to Inf (the elements are "
                      "still finite): the gradients have exploded"),
}


#: Ops whose derivative is infinite at a finite input (sqrt and x**p, p < 1, at 0;
#: acos/asin at +-1): a finite forward, a backward that makes Inf/NaN there. Their cure
#: is an epsilon inside the op, not a lower learning rate.
_SINGULAR_ADVICE = (
    "{m} computes `{op}` at a point where its derivative is infinite (`sqrt`/a fractional power at 0, "
    "`acos`/`asin` at +-1): the forward is finite, the backward is not. Put the epsilon inside: "
    "`torch.sqrt(var + eps)`, not `torch.sqrt(var) + eps`; `acos(x.clamp(-1 + 1e-7, 1 - 1e-7))`; or use the "
    "library op, whose backward is safe there (`nn.LayerNorm`, `F.normalize`, `torch.linalg.vector_norm`).")
_SINGULAR = {op: _SINGULAR_ADVICE for op in (
    "sqrt", "pow", "__pow__", "float_power", "acos", "arccos", "asin", "arcsin")}


#: An op evaluated where it is NaN/Inf on elements the forward then drops (``torch.where(c,
#: op(x), y)`` computes op(x) everywhere): the backward sends those elements a zero gradient
#: times op's derivative there, and 0 x NaN = NaN (pytorch/pytorch#68425). The cure keeps
#: the dropped elements' input valid, not a lower learning rate.
_DROPPED_ADVICE = (
    "{m} evaluates `{op}` on elements where it is not finite and drops them afterwards (`torch.where`, a "
    "mask): give those elements a safe input before `{op}`, e.g. `torch.where(c, torch.{op}(torch.where(c, x, "
    "torch.ones_like(x))), 0)` (the where twice), or clamp `x` into `{op}`'s domain first; `nan_to_num` on "
    "the output does not help, the NaN is made in the backward.")

#: The loss's own backward made it (the model's backward from a finite seed is finite):
#: ops whose derivative is not finite where their value is, in the loss.
_LOSS_BACKWARD_ADVICE = (
    "Look in the loss for ops whose derivative is not finite where their value is: `log`/`sqrt` at 0, `x / y` "
    "at y = 0, a `torch.where` that also computes the unsafe branch (e.g. `torch.where(p > 0, p * torch.log(p), "
    "0)` at p = 0). Give them safe inputs (`x.clamp_min(1e-12)` before `log`/`sqrt`), and take log-probabilities "
    "from the logits (`F.log_softmax(logits, -1)`, `F.cross_entropy`), not `log` of a softmax: `p * "
    "F.log_softmax(logits, -1)` stays finite where p underflows to 0.")

#: Steps with every recorded value finite, up to the run's end, after its last NaN/Inf
#: before the run counts as recovered (the script restored a checkpoint, skipped the
#: bad batch): enough to show it trains again, not a NaN the next steps bring back.
RECOVERED_MIN_STEPS = 10
#: The same number of last steps with every gradient exactly 0 makes a run whose values
#: are finite again dead instead (a saturated softmax, every ReLU dead): finite is
#: not recovered when nothing can learn any more.


#: Series whose first NaN/Inf names the origin when no origin event was recorded: the
#: quantities the NaN-origin search watches (the quantity table's ``watched``), less
#: clip_total_norm, which repeats the gradient norm without naming a layer.
_FALLBACK_WATCHED = frozenset(q.name for q in QUANTITIES.values() if q.watched) - {"clip_total_norm"}


def nonfinite(record: Record) -> list[Finding]:
    """Critical when any loss/gradient/activation/weight became NaN/Inf: names the origin."""
    origins = record.events_of("nonfinite_origin")
    if origins:
        ev = origins[0]
        module = ev.get("module")
        layers = tuple(x for x in [module, *ev.get("also", [])] if x)
        kind = ev.get("kind", "activation")
        where = f"`{module}`" if module else "the loss function"
        value = ev.get("value", "nan")
        replayed_grad = kind == "gradient" and ev.get("source") == "replay"  # the backward's op was named
        from_loss = bool(ev.get("from_loss"))
        dropped = bool(ev.get("dropped_in_forward") and ev.get("op"))
        if kind == "input":
            # The data, not a layer: say so rather than naming the model's root ("(root)").
            fed = "the model" if module in (None, "(root)") else f"`{module}`"
            summary = (f"{str(value).upper()} first appeared at step {ev.get('step')} in the batch itself: "
                       f"the input fed to {fed} already held NaN/Inf before any layer ran (the data or "
                       f"the loss target, not the model, is the origin).")
        elif kind == "loss" and ev.get("forward_checked") is False:
            # Nothing replayed (no forward recorded): no claim about the forward's outputs.
            summary = (f"{str(value).upper()} first appeared at step {ev.get('step')} in the loss; the "
                       f"model's forward was not recorded, so the layer could not be traced (every "
                       f"weight was still finite).")
        elif replayed_grad and from_loss:
            summary = (f"{str(value).upper()} first appeared at step {ev.get('step')} in the backward, "
                       f"before it reached the model: the loss and the forward were finite, and the "
                       f"model's own backward from a finite gradient of its outputs is finite (replayed), "
                       f"so the gradient the loss (computed outside the model) sent its outputs was not.")
        elif replayed_grad:
            # The backward replayed: the op that made it, not the parameters it reached.
            if dropped:
                kind_of = f" ({ev['module_kind']})" if ev.get("module_kind") else ""
                node = f", in {ev['backward_op']}" if ev.get("backward_op") else ""
                summary = (f"{str(value).upper()} first appeared at step {ev.get('step')} in the backward "
                           f"(the loss and the forward were finite): in {where}{kind_of}, `{ev['op']}` made "
                           f"{str(ev.get('dropped_value') or value).upper()} on elements that a `torch.where` or "
                           f"mask then dropped, so the forward stayed finite, but the backward multiplies their "
                           f"zero gradient by `{ev['op']}`'s derivative there (0 x NaN = NaN{node}).")
            else:
                node = f" ({ev['backward_op']})" if ev.get("backward_op") else ""
                op = f" in `{ev['op']}`'s backward{node}" if ev.get("op") else ""
                summary = (f"{str(value).upper()} first appeared at step {ev.get('step')} in the backward "
                           f"(the loss and the forward were finite): {where} made the first non-finite "
                           f"gradient{op} from a finite incoming gradient.")
            if ev.get("backward_seed") == "surrogate":
                summary = summary.rstrip(".") + (" (the loss is computed outside the model: its backward was "
                                                 "replayed from the model's outputs).")
        else:
            summary = (f"{str(value).upper()} first appeared at step {ev.get('step')}: {where} "
                       f"{_WHAT.get(kind, 'produced it')}.")
        if ev.get("module_kind") and not dropped:  # (the dropped summary names it in its place)
            summary = summary.rstrip(".") + f" ({ev['module_kind']})."
        if kind == "activation" and ev.get("op") and ev.get("source") == "replay":
            summary = summary.rstrip(".") + f", in `{ev['op']}` from finite inputs."
        if ev.get("rank") is not None and (ev.get("world_size") or 1) > 1:  # torchrun: whose data
            ranks = ev.get("ranks") or [ev["rank"]]
            on = f"rank {ev['rank']} only" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            summary = summary.rstrip(".") + f", on {on} (of {ev['world_size']} ranks)."
        severity = "critical"
        evidence = {k: v for k, v in ev.items() if k != "type"}
        advice = _advice(kind, module)
        if replayed_grad and from_loss:
            advice = _LOSS_BACKWARD_ADVICE
        elif replayed_grad and dropped:
            advice = _DROPPED_ADVICE.format(m=f"`{module}`" if module else "the model", op=ev["op"])
        elif replayed_grad and ev.get("op") in _SINGULAR:
            advice = _SINGULAR[ev["op"]].format(m=f"`{module}`" if module else "the model", op=ev["op"])
        last_bad = ev.get("last_nonfinite_step")
        if isinstance(last_bad, int) and record.steps - 1 - last_bad >= RECOVERED_MIN_STEPS:
            bad_steps = f"step {last_bad}" if last_bad == ev.get("step") else f"steps {ev.get('step')}-{last_bad}"
            dead_from = zero_gradient_tail(record)
            if dead_from is not None:
                dead_from = max(dead_from, last_bad + 1)  # (the zeros may begin inside the episode)
            if dead_from is not None and record.steps - dead_from >= RECOVERED_MIN_STEPS:
                # Finite again, but no gradient anywhere to the end: dead, not recovered.
                n = record.steps - dead_from
                summary += (f" The run is dead, not recovered: after {bad_steps} every value was finite, but "
                            f"every gradient was exactly 0 for its last {n} steps{_loss_then(record, dead_from)}: "
                            f"nothing can learn any more.")
                evidence.update(zero_gradient_steps=n, zero_gradient_from=dead_from)
                advice = (f"These weights cannot train on: restart from the initial weights or from a checkpoint "
                          f"saved before step {ev.get('step')}, with the change below (the first NaN/Inf is the "
                          f"cause). " + advice)
            else:
                # Not broken: the script came back from it (its own NaN handling).
                severity = "warning"
                summary += (f" The run recovered: after {bad_steps}, every recorded value was finite "
                            f"again for its last {record.steps - 1 - last_bad} steps.")
        return [Finding(
            code="nonfinite", severity=severity, step=ev.get("step"), layers=layers,
            summary=summary, evidence=evidence, advice=advice,
        )]
    # Fallback: no origin event (e.g. a report from an older run): earliest series.
    first: tuple[int, str] | None = None
    for key, s in record.series.items():
        if s.first_nonfinite_step is not None and split_key(key)[0] in _FALLBACK_WATCHED:
            cand = (s.first_nonfinite_step, key)
            if first is None or cand < first:
                first = cand
    if first is None:
        return []
    step, key = first
    name = key.split("/", 1)[1] if "/" in key else None
    layer = record.layer_of(name) if name else None
    return [Finding(
        code="nonfinite", severity="critical", step=step, layers=(layer,) if layer else (),
        summary=f"NaN/Inf first seen at step {step} in series `{key}`.",
        evidence={"series": key, "step": step}, advice=_advice("gradient", layer),
    )]


def _loss_then(record: Record, from_step: int) -> str:
    """What the loss did over the dead stretch: exactly 0 (a saturated softmax), or flat."""
    steps, values = points(record.get("loss"))
    tail = [v for s, v in zip(steps, values) if s >= from_step]
    if not tail:
        return ""
    if all(v == 0 for v in tail):
        return " (the loss exactly 0.0)"
    if max(tail) == min(tail):
        return f" (the loss stuck at {tail[-1]:.4g})"
    return ""


def _advice(kind: str, module: str | None) -> str:
    m = f"`{module}`" if module else "the model"
    if kind == "input":
        return ("Check the batch fed to the model for NaN/Inf before training on it, e.g. "
                "`assert torch.isfinite(x).all()`; filter or impute bad samples.")
    if kind == "loss":
        return ("Make the loss numerically safe: use `F.cross_entropy` / `BCEWithLogitsLoss` on "
                "logits instead of log(softmax)/log(sigmoid), and clamp arguments of log/sqrt/div "
                "(e.g. `torch.log(p.clamp_min(1e-8))`).")
    return (f"The values that overflow pass through {m}. Lower the learning rate, clip gradients "
            "(`torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)` before "
            "`optimizer.step()`), and initialise weights for the activation (`gv.init_(model, batch)`: "
            "He for ReLU, Xavier for tanh/sigmoid).")
