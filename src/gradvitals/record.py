"""The run's vital signs as plain data: bounded columnar series, layers, events.

No torch here: rules and reports read a ``Record`` (live, or rebuilt from a saved
JSON report with :meth:`Record.from_json`) without importing torch.

Series are named ``"<quantity>/<name>"`` for per-layer or per-parameter values
(``grad_norm/layers.0.weight``, ``act_std/layers.3``) and ``"<quantity>"`` for
run-level ones (``loss``, ``grad_norm_global``). The quantities are listed in
:data:`QUANTITIES`.
"""

from __future__ import annotations

import bisect
import copy
import math
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

SCHEMA = "gradvitals.report/1"

#: Points kept per series before it is decimated (every other point dropped,
#: stride doubled). 1,000 points x 16 bytes = 16 kB per series, so 100 layers x
#: 10 series stay under 20 MB for any run length.
DEFAULT_CAP = 1000

@dataclass(frozen=True)
class Quantity:
    """One recorded quantity: what its series mean and how the layers treat them.

    Everything that would otherwise parse a series key to decide what to do with it
    (the distributed merge, the NaN-origin search, the renderers, the rules) reads
    this instead. Adding a quantity is a row here and the probe that records it.
    """

    name: str
    meaning: str
    #: What the part after ``/`` names: "param", "layer", or "run" (no suffix, or
    #: a run-level one: ``lr/<optimizer>.<group>``, ``loss/<optimizer>``).
    per: str
    #: How ranks combine it (gradvitals.distributed): "norm" (sqrt of the summed
    #: squared shards), "global" (recomputed from the merged norms), "ratio"
    #: (|dW|/|W| from merged norms), "moment" (weighted mean/second moment), "dead"
    #: (ever-active masks summed), "mean" (over ranks), "local" (each rank's own),
    #: "max" (the largest over ranks: each rank's value in its own slot),
    #: "rank" (every rank's own value kept, under ``<quantity>/<rank>``), "merged"
    #: (computed by the merge itself from the ranks' values; never pending).
    merge: str
    #: A NaN/Inf in it starts the NaN-origin search (the recorder's flush).
    watched: bool
    #: When it is measured: "step" (every optimizer step), "scheduled" (steps the
    #: schedule picks, see Options.every), "clip" (each clip_grad_norm_ call).
    schedule: str
    #: NaN in it means "not applicable here" (no sigmoid/tanh to saturate), not a fault.
    nan_ok: bool = False
    #: Computed from each rank's own micro-batch: a NaN/Inf in it on one rank names
    #: that rank as the bad one (gradients are all-reduced: they go bad everywhere).
    names_bad_rank: bool = False


def _q(*rows: tuple[Any, ...]) -> dict[str, Quantity]:
    return {r[0]: Quantity(*r) for r in rows}


#: Every quantity a series can hold, by the part of its key before ``/``.
QUANTITIES: dict[str, Quantity] = _q(
    ("loss", "training loss (mean of the backward() losses of the step)", "run", "mean", True, "step", False,
     True),
    ("grad_norm_global", "L2 norm of all recorded gradients together", "run", "global", True, "step"),
    ("grad_norm", "L2 norm of a parameter's gradient (before clipping)", "param", "norm", True, "step"),
    ("weight_norm", "L2 norm of a parameter", "param", "norm", True, "scheduled"),
    ("update_ratio", "|W_after - W_before| / |W_before| over one optimizer step", "param", "ratio", False,
     "scheduled"),
    ("act_mean", "mean of a module's output", "layer", "moment", True, "scheduled", False, True),
    ("act_std", "standard deviation of a module's output", "layer", "moment", True, "scheduled", False, True),
    ("act_zero_frac", "fraction of exact zeros in a module's output", "layer", "moment", False, "scheduled"),
    ("act_sat_frac", "fraction of sigmoid/tanh outputs pinned near their bounds", "layer", "moment", False,
     "scheduled", True),
    ("act_nonfinite_frac", "fraction of NaN/Inf in a module's output", "layer", "moment", False, "scheduled"),
    ("dead_frac", "fraction of output units never positive over the window", "layer", "dead", False,
     "scheduled", True),
    ("bn_batch", "number of samples per channel a BatchNorm layer normalised over", "layer", "local", False,
     "scheduled"),
    ("lr", "learning rate of a param group", "run", "mean", False, "step"),
    ("clip_total_norm", "total gradient norm seen by clip_grad_norm_ (before clipping)", "run", "mean", True,
     "clip"),
    ("clip_max_norm", "max_norm passed to clip_grad_norm_", "run", "mean", False, "clip"),
    ("clip_clipped", "1 when clip_grad_norm_ scaled the gradients down, else 0", "run", "mean", False, "clip"),
    # over ranks: the mean of the means (each rank's tokens are its own), the max of the maxima
    ("log_z_mean", "mean over tokens of log Z = logsumexp of the logits entering cross_entropy", "run", "mean",
     False, "scheduled", True),
    ("log_z_max", "max over tokens of log Z = logsumexp of the logits entering cross_entropy", "run", "max",
     False, "scheduled", True),
    ("clip_rank_norm", "total norm a clip call returned on one rank (suffix: the rank), when it clipped every "
     "recorded gradient", "run", "rank", False, "clip"),
    ("replica_spread", "relative spread across ranks of the norm of a parameter every rank should hold "
     "identically (written only where it is not ~0)", "param", "merged", False, "scheduled"),
    ("replica_rank_off", "1 when a rank's replicated parameters differ from those most ranks hold (suffix: "
     "the rank), at a step where some differ", "run", "merged", False, "scheduled"),
    ("attn_max_logit", "largest pre-softmax attention score q.k^T*scale (+ additive mask) of a module, masked "
     "positions excluded", "layer", "max", False, "scheduled", True),
    ("attn_entropy", "mean entropy (nats) of a module's attention rows", "layer", "mean", False, "scheduled", True),
    ("attn_entropy_uniform", "mean entropy (nats) a uniform row over the same unmasked keys would have "
     "(the ceiling of attn_entropy)", "layer", "mean", False, "scheduled", True),
)

#: Quantities recorded per layer or per parameter (``<quantity>/<name>``); the others
#: (loss, grad_norm_global, lr/<group>, clip_*) are the run's.
PER_NAME_QUANTITIES = frozenset(q.name for q in QUANTITIES.values() if q.per != "run")


def series_key(quantity: str, name: str | None = None) -> str:
    """The series key of ``quantity`` for ``name`` (a parameter, a layer, a group)."""
    return quantity if name is None else f"{quantity}/{name}"


def split_key(key: str) -> tuple[str, str | None]:
    """``"grad_norm/0.weight"`` -> ``("grad_norm", "0.weight")``; ``"loss"`` -> ``("loss", None)``."""
    q, sep, name = key.partition("/")
    return (q, name) if sep else (q, None)


def quantity_of(key: str) -> Quantity | None:
    """The :class:`Quantity` a series key holds (None for a key no probe writes)."""
    return QUANTITIES.get(key.partition("/")[0])


def _encode(value: float) -> float | str:
    """JSON has no NaN/Inf: encode them as the strings "nan", "inf", "-inf"."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def _decode(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        return float(value)
    return float(value)


class Series:
    """A bounded (step, value) series.

    Keeps every ``stride``-th appended point; when ``cap`` points are held, drops
    every other one and doubles ``stride``, so memory is O(cap) whatever the run's
    length. Exact summaries (count, min, max, first non-finite step, last point)
    are kept over *all* appended points, so a spike or a NaN is never decimated
    away.
    """

    __slots__ = (
        "steps", "values", "cap", "stride", "count",
        "min", "max", "max_step", "first_nonfinite_step", "last_step", "last_value",
    )

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap < 2:
            raise ValueError(f"cap must be >= 2, got {cap!r}")
        self.steps = array("q")
        self.values = array("d")
        self.cap = cap
        self.stride = 1
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.max_step: int | None = None
        self.first_nonfinite_step: int | None = None
        self.last_step: int | None = None
        self.last_value = math.nan

    def append(self, step: int, value: float) -> None:
        if step == self.last_step and self.steps and self.steps[-1] == step:
            # A later value for the same step (e.g. the global norm once a second
            # optimizer of the step has stepped) replaces the earlier one.
            self.values[-1] = value
            self.last_value = value
            self._summarise(step, value)
            return
        self._summarise(step, value)
        keep = self.count % self.stride == 0
        self.count += 1
        self.last_step = step
        self.last_value = value
        if not keep:
            return
        self.steps.append(step)
        self.values.append(value)
        if len(self.steps) >= self.cap:
            self.steps = self.steps[::2]
            self.values = self.values[::2]
            self.stride *= 2

    def extend(self, steps: list[int], values: list[float]) -> None:
        """Exactly ``append(s, v)`` for each pair in order, in bulk (a ring of recent
        steps fetched at once): slices and builtins instead of a call per value."""
        n = len(values)
        if not n:
            return
        stride = self.stride
        if ((self.last_step is not None and steps[0] <= self.last_step)
                or len(self.steps) + n // stride + 1 >= self.cap):
            for st, v in zip(steps, values):  # a replaced step or a decimation inside
                self.append(st, v)
            return
        isfinite = math.isfinite
        finite = values if all(map(isfinite, values)) else [v for v in values if isfinite(v)]
        if finite:
            lo, hi = min(finite), max(finite)
            if lo < self.min:
                self.min = lo
            if hi > self.max:
                self.max = hi
                self.max_step = steps[values.index(hi)]
        if finite is not values and self.first_nonfinite_step is None:
            # NaN/Inf among them (e.g. a statistic that does not apply: all NaN)
            self.first_nonfinite_step = next(st for st, v in zip(steps, values) if not isfinite(v))
        first = (-self.count) % stride  # the first index append() would keep
        if first < n:
            self.steps.extend(steps[first::stride])
            self.values.extend(values[first::stride])
        self.count += n
        self.last_step = steps[-1]
        self.last_value = values[-1]

    def _summarise(self, step: int, value: float) -> None:
        if math.isfinite(value):
            if value < self.min:
                self.min = value
            if value > self.max:
                self.max = value
                self.max_step = step
        elif self.first_nonfinite_step is None:
            self.first_nonfinite_step = step

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[int, float]]:
        return zip(self.steps, self.values)

    def points(self, include_last: bool = True) -> tuple[list[int], list[float]]:
        """Kept points, plus the last appended point when decimation dropped it."""
        steps, values = list(self.steps), list(self.values)
        if include_last and self.last_step is not None and (not steps or steps[-1] != self.last_step):
            steps.append(self.last_step)
            values.append(self.last_value)
        return steps, values

    def to_json(self) -> dict[str, Any]:
        steps, values = self.points()
        return {
            "steps": steps,
            "values": [_encode(v) for v in values],
            "stride": self.stride,
            "count": self.count,
            "min": _encode(self.min) if self.count and math.isfinite(self.min) else None,
            "max": _encode(self.max) if self.count and math.isfinite(self.max) else None,
            "max_step": self.max_step,
            "first_nonfinite_step": self.first_nonfinite_step,
        }

    def copy(self) -> Series:
        """An independent copy (two array copies): what an autosave serialises while
        the live series goes on growing."""
        c = Series.__new__(Series)
        for name in Series.__slots__:
            setattr(c, name, getattr(self, name))
        c.steps = self.steps[:]
        c.values = self.values[:]
        return c

    @classmethod
    def from_json(cls, data: dict[str, Any], cap: int = DEFAULT_CAP) -> Series:
        s = cls(cap=max(cap, len(data.get("steps", ())) + 2))
        s.steps = array("q", (int(x) for x in data.get("steps", ())))
        s.values = array("d", (_decode(v) for v in data.get("values", ())))
        s.stride = int(data.get("stride", 1))
        s.count = int(data.get("count", len(s.steps)))
        finite = [v for v in s.values if math.isfinite(v)]
        s.min = _decode(data["min"]) if data.get("min") is not None else min(finite, default=math.inf)
        s.max = _decode(data["max"]) if data.get("max") is not None else max(finite, default=-math.inf)
        s.max_step = data.get("max_step")
        s.first_nonfinite_step = data.get("first_nonfinite_step")
        if s.steps:
            s.last_step, s.last_value = s.steps[-1], s.values[-1]
        return s


@dataclass
class ParamInfo:
    """One trainable (or frozen) parameter, by its ``named_parameters()`` path."""

    name: str
    layer: str
    shape: list[int]
    numel: int
    requires_grad: bool = True
    in_optimizer: bool | None = None  # None: no optimizer known
    grad_seen: bool = False  # received a gradient at least once
    dtype: str = "float32"


@dataclass
class LayerInfo:
    """One module, by its ``named_modules()`` path.

    ``depth`` is the module's position in the forward call order (0 = first
    called), None until it has been seen in a traced forward.
    ``activation_after`` is the activation that followed it in that forward
    (module class or function name), which decides the init it should have.
    """

    name: str
    kind: str
    depth: int | None = None
    params: list[str] = field(default_factory=list)
    activation_after: str | None = None
    out_features: int | None = None
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """Everything measured about one run. Plain data; see module docstring."""

    run: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    params: dict[str, ParamInfo] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0  # optimizer steps recorded
    cap: int = DEFAULT_CAP

    # -- writing -----------------------------------------------------------
    def add(self, key: str, step: int, value: float) -> None:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(self.cap)
        s.append(step, value)

    def event(self, event_type: str, /, **data: Any) -> dict[str, Any]:
        ev = {"type": event_type, **data}
        self.events.append(ev)
        return ev

    # -- reading -----------------------------------------------------------
    def get(self, key: str) -> Series | None:
        return self.series.get(key)

    def per_name(self, quantity: str) -> dict[str, Series]:
        """All series of one quantity, keyed by layer/parameter name."""
        prefix = quantity + "/"
        return {k[len(prefix):]: s for k, s in self.series.items() if k.startswith(prefix)}

    def events_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    def layers_in_order(self) -> list[LayerInfo]:
        """Layers in forward order (those never seen in a forward come last)."""
        seen = sorted((l for l in self.layers.values() if l.depth is not None), key=lambda l: l.depth)
        rest = [l for l in self.layers.values() if l.depth is None]
        return seen + rest

    def layer_grad_norms(self, step: int | None = None) -> dict[str, tuple[list[int], list[float]]]:
        """Per layer: (steps, L2 norm of the layer's gradient) from its parameters'
        ``grad_norm/<param>`` series, layers in forward order (then any others).

        At each step a layer's norm is sqrt(sum of the squared norms of the parameters
        recorded at that step); a non-finite parameter norm makes the layer's
        non-finite (NaN wins over Inf). ``step``: that step alone (a logger's per-step
        scalars: O(parameters), not O(points)). The one place the per-layer norm is
        computed: the HTML heatmap and the trainer loggers read it from here.
        """
        per_layer: dict[str, dict[int, float]] = {l.name: {} for l in self.layers_in_order()}
        seen: set[str] = set()
        for key, s in self.series.items():
            q, param = split_key(key)
            if q != "grad_norm" or param is None:
                continue
            layer = self.layer_of(param)
            seen.add(layer)
            acc = per_layer.setdefault(layer, {})
            for st, v in (_point_at(s, step) if step is not None else zip(*s.points())):
                acc[st] = _combine_norms(acc[st], v) if st in acc else abs(v)
        out = {}
        for layer, acc in per_layer.items():
            if layer in seen and (acc or step is None):
                steps = sorted(acc)
                out[layer] = (steps, [acc[st] for st in steps])
        return out

    def layer_of(self, param: str) -> str:
        p = self.params.get(param)
        if p is not None:
            return p.layer
        return param.rsplit(".", 1)[0] if "." in param else param

    def segments(self) -> list[tuple[int, int, list[str]]]:
        """``(first_step, end_step, models)`` per training segment: the run cut at each
        ``segment`` event (a model trained from scratch after others, e.g. the next
        fold of a k-fold loop; see recorder/checks.py Segments). ``models`` is empty for the
        first segment (its models are found from the series). One segment: no cut."""
        cuts = sorted((e["step"], list(e.get("models") or [])) for e in self.events
                      if e.get("type") == "segment" and isinstance(e.get("step"), int)
                      and 0 < e["step"] < self.steps and self._restarts_at(e["step"]))
        out: list[tuple[int, int, list[str]]] = []
        start, models = 0, []
        for step, ms in cuts:
            if step > start:
                out.append((start, step, models))
                start, models = step, ms
            else:
                models = sorted(set(models) | set(ms))
        out.append((start, max(self.steps, start), models))
        return out

    def _restarts_at(self, step: int) -> bool:
        """Whether the models trained before ``step`` stop there (a restart: the next
        fold), rather than go on beside the one that starts (a model joining a run)."""
        before: set[str] = set()
        after: set[str] = set()
        for key, s in self.series.items():
            q, _, name = key.partition("/")
            p = self.params.get(name) if q == "grad_norm" else None
            layer = self.layers.get(p.layer) if p is not None else None
            if layer is None or not len(s.steps):
                continue
            if s.steps[0] < step:
                before.add(layer.model)
            if (s.last_step if s.last_step is not None else s.steps[-1]) > step:
                after.add(layer.model)
        return not (before & after)

    def segment(self, start: int, end: int, models: Iterable[str] = ()) -> Record:
        """The record of steps ``start <= step < end`` alone, for the rules: run-level
        series cut to those steps, and only the layers and parameters of the models
        trained in them (``models``; when empty, those with gradient norms there).
        Steps keep their numbers; ``steps`` is the segment's length."""
        def cut(s: Series) -> Series:
            out = Series(self.cap)
            for st, v in zip(*s.points()):
                if start <= st < end:
                    out.append(st, v)
            f = s.first_nonfinite_step
            if f is not None and start <= f < end:
                out.first_nonfinite_step = min(f, out.first_nonfinite_step if out.first_nonfinite_step is not None else f)
            return out

        wanted = set(models)
        if not wanted:
            for key, s in self.series.items():
                q, _, name = key.partition("/")
                if q == "grad_norm" and name in self.params and any(start <= st < end for st in s.steps):
                    layer = self.layers.get(self.params[name].layer)
                    if layer is not None:
                        wanted.add(layer.model)
        layers = {n: l for n, l in self.layers.items() if not wanted or l.model in wanted}
        params = {n: p for n, p in self.params.items() if not wanted or p.layer in layers}
        series = {}
        for key, s in self.series.items():
            q, _, name = key.partition("/")
            if q in PER_NAME_QUANTITIES and name not in params and name not in layers:
                continue  # another segment's model
            c = cut(s)
            if c.count:
                series[key] = c
        if "loss" not in series:
            # Its optimizer is not the run's first (the previous folds' are still alive):
            # its loss went to loss/<optimizer>; alone in the segment, it is the loss.
            own = [k for k in series if k.startswith("loss/")]
            if len(own) == 1:
                series["loss"] = series.pop(own[0])
        events = [e for e in self.events
                  if not isinstance(e.get("step"), int) or start <= e["step"] < end]
        return Record(run=dict(self.run), layers=layers, params=params, series=series, events=events,
                      steps=end - start, cap=self.cap)

    def snapshot(self) -> Record:
        """A copy that shares nothing mutable with this record (series arrays copied,
        run and events deep-copied as their JSON values), cheap enough to take on the
        training thread: what is serialised from it elsewhere cannot change under it."""
        layers = {}
        for n, l in self.layers.items():
            c = copy.copy(l)
            c.params = list(l.params)
            c.extra = _json_safe(l.extra)
            layers[n] = c
        params = {}
        for n, p in self.params.items():
            c = copy.copy(p)
            c.shape = list(p.shape)
            params[n] = c
        return Record(run=_json_safe(self.run), layers=layers, params=params,
                      series={k: s.copy() for k, s in self.series.items()},
                      events=_json_safe(self.events), steps=self.steps, cap=self.cap)

    # -- (de)serialisation ---------------------------------------------------
    def layers_json(self) -> list[dict[str, Any]]:
        out = []
        for layer in self.layers_in_order():
            d = asdict(layer)
            d["params"] = [asdict(self.params[p]) for p in layer.params if p in self.params]
            out.append(d)
        return out

    def series_json(self) -> dict[str, Any]:
        return {k: s.to_json() for k, s in self.series.items()}

    def to_json(self) -> dict[str, Any]:
        """The report minus findings (``run``, ``layers``, ``series``, ``events``)."""
        run = dict(self.run)
        run["steps"] = self.steps
        run["events"] = [_json_safe(e) for e in self.events]
        return {"schema": SCHEMA, "run": _json_safe(run), "layers": self.layers_json(),
                "series": self.series_json()}

    @classmethod
    def from_json(cls, report: dict[str, Any]) -> Record:
        """Rebuild a Record from a saved report (the renderers and rules need only this)."""
        if report.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} report (schema={report.get('schema')!r})")
        run = dict(report.get("run", {}))
        events = list(run.pop("events", []))
        rec = cls(run=run, events=events, steps=int(run.get("steps", 0)))
        for d in report.get("layers", []):
            d = dict(d)
            params = d.pop("params", [])
            names = []
            for p in params:
                info = ParamInfo(**{k: v for k, v in p.items() if k in ParamInfo.__dataclass_fields__})
                rec.params[info.name] = info
                names.append(info.name)
            layer = LayerInfo(**{k: v for k, v in d.items() if k in LayerInfo.__dataclass_fields__})
            layer.params = names
            rec.layers[layer.name] = layer
        for k, v in report.get("series", {}).items():
            rec.series[k] = Series.from_json(v)
        return rec


def _combine_norms(a: float, b: float) -> float:
    """The L2 norm of two parts with norms ``a`` and ``b``; NaN wins over Inf.
    (math.hypot would return Inf for (Inf, NaN), and hides no overflow either.)"""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return math.hypot(a, b)


def _point_at(s: Series, step: int) -> list[tuple[int, float]]:
    """The series' value at ``step`` ([] when not recorded then): the last point
    first (a logger asks for the step just recorded), else a binary search."""
    if s.last_step == step:
        return [(step, s.last_value)]
    i = bisect.bisect_left(s.steps, step)
    return [(step, s.values[i])] if i < len(s.steps) and s.steps[i] == step else []


def _json_safe(obj: Any) -> Any:
    """Recursively make a value JSON-encodable (non-finite floats as strings)."""
    if isinstance(obj, float):
        return _encode(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def json_safe(obj: Any) -> Any:
    return _json_safe(obj)
