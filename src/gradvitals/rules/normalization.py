"""BatchNorm trained on batches too small for its statistics.

Decided from the shapes the BatchNorm layers saw in training forwards
(``bn_batch/<module>``: samples per channel; ``LayerInfo.extra["batch_size"]``).
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
