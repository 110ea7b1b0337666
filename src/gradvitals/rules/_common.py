"""Shared readings of a record for the rules: weight layers in forward order, the
loss's levels, robust statistics and the wording every finding uses. No torch.

The rules judge *weight* layers (Linear, Conv, recurrent) because biases,
embeddings, norm layers and their gains legitimately differ by orders of
magnitude; everything here is about picking the numbers that mean the same
thing from layer to layer.
"""

from __future__ import annotations

import keyword
import math
import statistics
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..record import LayerInfo, Record, Series
from ..taxonomy import (
    EMBEDDING_LAYERS,
    NORM_LAYERS,
    RECURRENT_LAYERS,
    WEIGHT_LAYERS,
    activation_family,
)

#: The findings of the rules already run in this diagnosis, by (rule, record): a rule
#: that reads another rule's conclusion (update_ratio_high asks whether the gradient
#: exploded) gets it from here instead of running that rule a second time. Per
#: thread/context: an autosave may diagnose beside the training thread.
_READINGS: ContextVar[dict[tuple[Any, int], tuple[Record, Any]] | None] = ContextVar(
    "gradvitals_rule_readings", default=None)


@contextmanager
def shared_readings() -> Iterator[None]:
    """One diagnosis: inside it, :func:`reading` computes each rule once per record."""
    token = _READINGS.set({})
    try:
        yield
    finally:
        _READINGS.reset(token)


def reading(rule: Callable[[Record], Any], record: Record) -> Any:
    """``rule(record)``, computed once per diagnosis (outside one: computed now)."""
    cache = _READINGS.get()
    if cache is None:
        return rule(record)
    key = (rule, id(record))
    hit = cache.get(key)
    if hit is not None and hit[0] is record:  # the record is kept: its id cannot be reused
        return hit[1]
    out = rule(record)
    cache[key] = (record, out)
    return out


#: Optimizer steps at the start of a run that no trend or loss rule judges on its
#: own: the first updates of Adam-like optimizers are sign-like and a warmup ramps
#: the learning rate, so the loss and the gradients are not yet representative.
WARMUP_STEPS = 5

#: Fraction of the run's loss points that make its "start" and "end" levels
#: (medians over them, so one noisy mini-batch does not decide anything).
LOSS_EDGE_FRACTION = 0.1

#: Loss points at least in each edge window (fewer points: a level is too noisy).
LOSS_EDGE_MIN_POINTS = 3

#: A weight or gradient norm below this is "exactly zero" for a ratio.
TINY_NORM = 1e-30


# ---------------------------------------------------------------- formatting
def q(name: str) -> str:
    """A module or parameter name as the findings write it."""
    return f"`{name}`"


def names(items: Sequence[str], limit: int = 3) -> str:
    """`a`, `b`, `c` and 4 more."""
    shown = ", ".join(q(n) for n in items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def attr(path: str, root: str = "model") -> str:
    """A module path as Python that reaches it: "blocks.0.mlp" -> "model.blocks[0].mlp"."""
    if ":" in path:  # several watched models: "netD:main.0" -> netD.main[0]
        root, path = path.split(":", 1)
    out = root
    for part in path.split("."):
        if part.isdigit():
            out += f"[{part}]"
        elif part.isidentifier() and not keyword.iskeyword(part):
            out += f".{part}"
        else:  # a ModuleDict key that is no Python name ("layer-1", "<b>")
            out += f"[{part!r}]"
    return out


#: Activation family -> the torch.nn class to write in advice when the record
#: only knows a function name (``F.relu`` -> ``nn.ReLU``).
_NN_CLASS = {"relu": "ReLU", "leaky_relu": "LeakyReLU", "elu": "ELU", "gelu": "GELU",
             "sigmoid": "Sigmoid", "tanh": "Tanh"}


def nn_class(record: Record, name: str | None) -> str:
    """The user's activation class for an activation name (``sigmoid`` -> ``Sigmoid``)."""
    fam = activation_family(name)
    for layer in record.layers.values():
        if activation_family(layer.kind) == fam and fam is not None and layer.kind.lower() == (name or "").lower().replace("_", ""):
            return layer.kind
    for layer in record.layers.values():
        if fam is not None and activation_family(layer.kind) == fam:
            return layer.kind
    return _NN_CLASS.get(fam or "", name or "ReLU")


def sci(value: float, digits: int = 2) -> str:
    """A number as people read it: 0.0123 -> 0.012, 1.2e-07 -> 1.2e-07."""
    if value is None or not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.{digits}g}"
    return f"{value:.{max(digits - 1, 0)}e}"


def orders(ratio: float) -> str:
    """A ratio as a power of ten ("10^9x"); small ratios stay plain ("35x")."""
    if not math.isfinite(ratio):
        return "infinitely"
    if ratio < 1000:
        return f"{ratio:.0f}x"
    return f"10^{round(math.log10(ratio))}x"


# ---------------------------------------------------------------- series
def points(series: Series | None, *, finite_only: bool = True) -> tuple[list[int], list[float]]:
    if series is None:
        return [], []
    steps, values = series.points()
    if not finite_only:
        return steps, values
    kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def as_dict(series: Series | None) -> dict[int, float]:
    if series is None:
        return {}
    steps, values = series.points()
    return dict(zip(steps, values))


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def mad(values: Sequence[float], center: float) -> float:
    """Median absolute deviation, scaled to a normal's standard deviation."""
    vals = [abs(v - center) for v in values if math.isfinite(v)]
    return 1.4826 * statistics.median(vals) if vals else math.nan


def zero_gradient_tail(record: Record) -> int | None:
    """First step of the run's final stretch on which every recorded global gradient
    norm is exactly 0 (no gradient anywhere: nothing can learn any more), or None
    when the last recorded one is not 0."""
    steps, values = points(record.get("grad_norm_global"), finite_only=False)
    first = None
    for s, v in zip(reversed(steps), reversed(values)):
        if v != 0:
            break
        first = s
    return first


def first_nonfinite_step(record: Record) -> int | None:
    """First step the loss or a gradient norm was NaN/Inf (the run's breaking point)."""
    found: list[int] = []
    for key in ("loss", "grad_norm_global"):
        s = record.get(key)
        if s is not None and s.first_nonfinite_step is not None:
            found.append(s.first_nonfinite_step)
    for ev in record.events_of("nonfinite_origin"):
        if isinstance(ev.get("step"), int):
            found.append(ev["step"])
    return min(found) if found else None


# ---------------------------------------------------------------- loss
@dataclass(frozen=True)
class LossLevels:
    """Where the loss started and ended (medians over the run's edges)."""

    start: float
    end: float
    start_step: int
    end_step: int
    n_points: int
    steps: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def progress(self) -> float:
        """Fraction of the starting loss removed by the end (1 = all of it)."""
        if not math.isfinite(self.start) or not math.isfinite(self.end):
            return math.nan
        scale = abs(self.start) if abs(self.start) > 1e-12 else 1.0
        return (self.start - self.end) / scale


def loss_levels(record: Record, until: int | None = None) -> LossLevels | None:
    """Start/end loss levels over the finite loss points (before ``until``)."""
    steps, values = points(record.get("loss"))
    if until is not None:
        kept = [(s, v) for s, v in zip(steps, values) if s < until]
        steps, values = [s for s, _ in kept], [v for _, v in kept]
    n = len(values)
    k = max(LOSS_EDGE_MIN_POINTS, int(n * LOSS_EDGE_FRACTION))
    if n < 2 * LOSS_EDGE_MIN_POINTS:
        return None
    return LossLevels(start=median(values[:k]), end=median(values[-k:]), start_step=steps[0],
                      end_step=steps[-1], n_points=n, steps=tuple(steps), values=tuple(values))


# ---------------------------------------------------------------- layers
@dataclass(frozen=True)
class WeightParam:
    """A weight matrix/kernel of a weight layer, with its place in the forward."""

    param: str
    layer: str
    kind: str
    depth: int
    activation: str | None  # activation family after it (relu, sigmoid, ...)


def weight_params(record: Record) -> list[WeightParam]:
    """Weight tensors (>= 2-D) of Linear/Conv/recurrent layers, in forward order.

    Biases, norm gains and embeddings are left out: their gradient scale differs
    by orders of magnitude for good reasons. Layers never seen in a forward keep
    their registration order after the ones that were.
    """
    out: list[tuple[tuple[int, int], WeightParam]] = []
    for index, (name, info) in enumerate(record.params.items()):
        if len(info.shape) < 2 or not info.requires_grad:
            continue
        layer = record.layers.get(info.layer)
        kind = layer.kind if layer is not None else ""
        if not _is_weight(kind, name):
            continue
        depth = layer.depth if layer is not None and layer.depth is not None else None
        key = (depth if depth is not None else 10**9, index)
        act = activation_family(layer.activation_after) if layer is not None else None
        out.append((key, WeightParam(param=name, layer=info.layer, kind=kind,
                                     depth=depth if depth is not None else 10**9 + index,
                                     activation=act)))
    out.sort(key=lambda x: x[0])
    return [w for _, w in out]


def _is_weight(kind: str, param: str) -> bool:
    """Linear/Conv/recurrent weights, and the ``weight`` of layers we don't know by
    name (HF's GPT-2 ``Conv1D``, quantizable Linear subclasses), never embeddings or norms."""
    if kind in EMBEDDING_LAYERS or kind in NORM_LAYERS:
        return False
    if kind in WEIGHT_LAYERS or kind in RECURRENT_LAYERS:
        return True
    return param.rsplit(".", 1)[-1] == "weight"


def by_model(wps: Sequence[WeightParam], record: Record) -> list[list[WeightParam]]:
    """Weight params split by watched model (a GAN's G and D have separate depth profiles)."""
    groups: dict[str, list[WeightParam]] = {}
    for wp in wps:
        layer = record.layers.get(wp.layer)
        groups.setdefault(layer.model if layer is not None else "", []).append(wp)
    return list(groups.values())


def activation_families(record: Record, layers: Iterable[str]) -> list[str]:
    """Distinct activation families after the given layers, most common first."""
    counts: dict[str, int] = {}
    for name in layers:
        layer = record.layers.get(name)
        fam = activation_family(layer.activation_after) if layer is not None else None
        if fam:
            counts[fam] = counts.get(fam, 0) + 1
    return sorted(counts, key=lambda f: -counts[f])


def activation_names(record: Record, layers: Iterable[str]) -> list[str]:
    """The activations as the user wrote them (``Sigmoid``, ``relu``), most common first."""
    counts: dict[str, int] = {}
    for name in layers:
        layer = record.layers.get(name)
        if layer is not None and layer.activation_after:
            counts[layer.activation_after] = counts.get(layer.activation_after, 0) + 1
    return sorted(counts, key=lambda f: -counts[f])


def layer_kind(record: Record, name: str) -> str:
    layer: LayerInfo | None = record.layers.get(name)
    return layer.kind if layer is not None else ""


def relative_grads(record: Record, wps: Sequence[WeightParam]) -> dict[int, list[float]]:
    """Per scheduled step, |grad| / |weight| of each weight param (NaN where unknown).

    The ratio is scale-free (it is the update ratio per unit learning rate of plain
    SGD), so a wide first layer and a narrow head compare fairly. Weight norms are
    recorded on scheduled steps only; those are the steps returned.

    An imported log without any weight norm (one that kept only gradient norms, e.g.
    Lightning's ``grad_norm()`` columns) gives |grad| itself at every logged step: the
    chapter's per-layer health check compares gradient norms directly. (A live run
    without an optimizer has no weight norms either; it keeps the silence it had.)
    """
    grads = record.per_name("grad_norm")
    weights = record.per_name("weight_norm")
    if not weights and record.run.get("imported"):
        return _absolute_grads(grads, wps)
    by_param = []
    steps: set[int] = set()
    for wp in wps:
        g = as_dict(grads.get(wp.param))
        w = as_dict(weights.get(wp.param))
        by_param.append((g, w))
        steps |= set(w) & set(g)
    out: dict[int, list[float]] = {}
    for step in sorted(steps):
        row = []
        for g, w in by_param:
            gv, wv = g.get(step, math.nan), w.get(step, math.nan)
            row.append(gv / wv if math.isfinite(gv) and math.isfinite(wv) and wv > TINY_NORM else math.nan)
        out[step] = row
    return out


def _absolute_grads(grads: dict[str, Series], wps: Sequence[WeightParam]) -> dict[int, list[float]]:
    by_param = [as_dict(grads.get(wp.param)) for wp in wps]
    steps = sorted(set().union(*by_param)) if by_param else []
    return {step: [g.get(step, math.nan) for g in by_param] for step in steps}
