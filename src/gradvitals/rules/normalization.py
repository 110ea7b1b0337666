"""BatchNorm trained on batches too small for its statistics; a model trained in
eval mode after it had trained in train mode (a forgotten ``model.train()``).

Decided from the shapes the BatchNorm layers saw in training forwards
(``bn_batch/<module>``: samples per channel; ``LayerInfo.extra["batch_size"]``),
and from the recorder's ``eval_mode_training`` events.
"""

from __future__ import annotations

from ..findings import Finding
from ..record import Record
from ..taxonomy import BATCHNORM_LAYERS
from ._common import attr, median, names, points

#: Batch size below which BatchNorm's per-batch mean/variance are too noisy to
#: normalise with (GroupNorm paper: error climbs steeply below 8 per GPU; at 2
#: every feature is pushed to +-1).
BN_MIN_BATCH = 8


#: Optimizer steps trained on eval-mode forwards (after train-mode ones) before it
#: is reported: a step or two can be a deliberate trick, three are a habit of the loop.
EVAL_TRAINING_MIN_STEPS = 3


def _mode_dependent(kind: str) -> bool:
    """Modules that compute differently in eval mode: BatchNorm (running statistics
    instead of the batch's, never updated) and the dropout family (off)."""
    return kind in BATCHNORM_LAYERS or "Dropout" in kind or kind == "RReLU"


def eval_mode_training(record: Record) -> list[Finding]:
    """Steps trained on forwards run in eval mode by a model that trained in train
    mode before, or that an evaluation put in eval mode before its first step
    (``evaluated_first``: its first forward was a no_grad one in eval mode): a
    ``model.eval()`` for validation and no ``model.train()`` after it. A model
    trained in eval mode from its first forward on is fine-tuned that way on purpose.
    Only where it changes the computation (BatchNorm, Dropout in the model)."""
    out: list[Finding] = []
    for ev in record.events_of("eval_mode_training"):
        n = int(ev.get("steps") or 0)
        first = ev.get("step")
        if n < EVAL_TRAINING_MIN_STEPS or not isinstance(first, int):
            continue
        label = ev.get("model")
        layers = [l for l in record.layers_in_order() if l.model == label] or record.layers_in_order()
        affected = [l for l in layers if _mode_dependent(l.kind)]
        if not affected:
            continue  # nothing computes differently in eval mode: the same training
        bns = [l.name for l in affected if l.kind in BATCHNORM_LAYERS]
        drops = [l.name for l in affected if l.kind not in BATCHNORM_LAYERS]
        what = []
        if bns:
            what.append(f"its BatchNorm layers ({names(bns)}) normalise with running statistics they no "
                        f"longer update")
        if drops:
            what.append(f"its dropout ({names(drops)}) is off")
        span = max(record.steps - first, n)
        if ev.get("evaluated_first"):
            after = ("after an evaluation before its first step (no_grad forwards in eval mode) had put it in "
                     "eval mode")
        else:
            after = "after it had trained in train mode"
        summary = (f"From step {first}, {n} of {span} steps trained the model on forwards run in eval mode, "
                   f"{after}: {' and '.join(what)}. A `model.eval()` (for validation) "
                   f"with no `model.train()` after it.")
        advice = ("Switch back to training mode after evaluating, before the next training forward (at the end "
                  "of the evaluation function, e.g. `estimate_loss()`, or at the top of each training "
                  "iteration):\n"
                  "    model.eval()\n    with torch.no_grad():\n        ...  # validation\n"
                  "    model.train()")
        out.append(Finding(code="eval_mode_training", severity="warning", step=first,
                           layers=tuple(l.name for l in affected[:8]), summary=summary, advice=advice,
                           evidence={"steps": n, "of_steps": span, "model": label,
                                     "batchnorm": len(bns), "dropout": len(drops)}))
    return out


def batchnorm_small_batch(record: Record) -> list[Finding]:
    """BatchNorm layers whose training batches held fewer than BN_MIN_BATCH samples.

    Decides from each BatchNorm's median samples-per-channel over its scheduled
    forwards, turned into a batch size with the last forward's batch size
    (``extra["batch_size"]``; for BatchNorm1d on (N, C) they are equal). The
    median, so a short last batch of an epoch does not count.
    """
    small: list[tuple[str, float]] = []
    for layer in record.layers_in_order():
        if layer.kind not in BATCHNORM_LAYERS:
            continue
        steps, samples = points(record.get(f"bn_batch/{layer.name}"))
        if not samples:
            continue
        typical = median(samples)
        batch = layer.extra.get("batch_size")
        if isinstance(batch, (int, float)) and batch > 0 and samples[-1] > 0:
            est = batch * typical / samples[-1]
        else:
            est = typical
        if est < BN_MIN_BATCH:
            small.append((layer.name, est))
    if not small:
        return []
    batch = min(b for _, b in small)
    mods = [n for n, _ in small]
    kind = record.layers[mods[0]].kind
    channels = _channels(record, mods[0])
    if kind == "BatchNorm1d":
        repl = f"nn.LayerNorm({channels})"
    else:
        groups = 8 if isinstance(channels, int) and channels % 8 == 0 else 1
        repl = f"nn.GroupNorm({groups}, {channels})"
    summary = (f"{names(mods)} ({kind}) normalise over batches of {batch:.0f} sample"
               f"{'s' if batch != 1 else ''}: batch statistics that noisy make training erratic and "
               f"train/eval behaviour differ.")
    evidence = {"batch_size_by_layer": dict(small), "threshold": BN_MIN_BATCH}
    advice = (f"Use a normalisation that does not depend on the batch for {names(mods)}, e.g. "
              f"`{attr(mods[0])} = {repl}` (GroupNorm for conv nets, LayerNorm for MLPs/transformers), or "
              f"train with batches of >= {BN_MIN_BATCH * 2} samples (gradient accumulation does not help "
              f"BatchNorm: it still sees each micro-batch).")
    return [Finding(code="batchnorm_small_batch", severity="warning", step=0, layers=tuple(mods),
                    summary=summary, evidence=evidence, advice=advice)]


def _channels(record: Record, module: str) -> int | str:
    layer = record.layers.get(module)
    for p in layer.params if layer is not None else []:
        info = record.params.get(p)
        if info is not None and info.shape:
            return int(info.shape[0])
    return "num_channels"
