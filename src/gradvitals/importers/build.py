"""Logged points -> a Record with the recorder's series keys, parameters and layers."""

from __future__ import annotations

import math
import re
from typing import Iterable

from ..record import DEFAULT_CAP, LayerInfo, ParamInfo, Record, Series, series_key, split_key
from .names import KeyMap, series_for

#: Layer names of normalisation and embedding modules, as the usual models spell them:
#: their weights are vectors/tables whose gradient scale differs for good reasons, and
#: the rules leave them out of a depth profile by their kind.
_NORM = re.compile(r"(^|[._])(ln|ln_f|ln_\d+|norm|bn|\w*norm\w*|layernorm|batchnorm)(\d+)?($|[._])", re.I)
_EMBED = re.compile(r"embed|(^|[._])(wte|wpe|tok_embeddings)($|[._])", re.I)


def natural_key(name: str) -> list[object]:
    """``layers.10.weight`` after ``layers.2.weight``: loggers sort their keys as
    text (Lightning's CSV header), the forward order of a stack is numeric."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Builder:
    """Collects (log key, step, value) and turns them into one Record."""

    def __init__(self, mapping: KeyMap) -> None:
        self.mapping = mapping
        # Appended as they come (bounded: a long log decimates like a live run's series);
        # a point before its series' last step (a resumed run's log) waits in ``late``.
        self.series: dict[str, Series] = {}
        self.late: dict[str, dict[int, float]] = {}
        self.sources: dict[str, str] = {}
        self.ignored: dict[str, None] = {}
        self._targets: dict[str, str | None] = {}

    def add(self, key: str, step: int, value: object) -> None:
        try:
            target = self._targets[key]
        except KeyError:
            target = self._targets[key] = series_for(key, self.mapping)
        if target is None:
            self.ignored.setdefault(key, None)
            return
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return  # an empty cell, a string: nothing logged here
        step = int(step)
        self.sources.setdefault(target, key)
        s = self.series.get(target)
        if s is None:
            s = self.series[target] = Series(DEFAULT_CAP)
        if s.last_step is None or step >= s.last_step:
            s.append(step, v)  # the same step again: the later value replaces it
        else:
            self.late.setdefault(target, {})[step] = v

    def record(self, run: dict[str, object]) -> Record:
        rec = Record(run=dict(run))
        for key in sorted(self.series, key=natural_key):
            s = self.series[key]
            if key in self.late:  # out of order: merged by step, a later value winning
                merged = dict(zip(*s.points()))
                merged.update(self.late[key])
                s = Series(DEFAULT_CAP)
                for step in sorted(merged):
                    s.append(step, merged[step])
            rec.series[key] = s
        params = sorted({n for k in rec.series for q, n in [split_key(k)] if q in ("grad_norm", "weight_norm",
                                                                              "update_ratio") and n},
                        key=natural_key)
        for name in params:
            layer = rec.layer_of(name)
            leaf = name.rsplit(".", 1)[-1]
            # The log gives no shapes. A "weight" of a layer that is not a norm or an
            # embedding is taken for a matrix ([0, 0]: two dimensions of unknown size) so
            # the depth-profile rules see it; numel 0 means unknown to the rules that
            # need sizes (they skip it).
            matrix = leaf == "weight" and not _NORM.search(layer) and not _EMBED.search(layer)
            # grad_seen: a log that omits a parameter's gradient says nothing about it.
            rec.params[name] = ParamInfo(name=name, layer=layer, shape=[0, 0] if matrix else [0], numel=0,
                                         grad_seen=True)
            info = rec.layers.get(layer)
            if info is None:
                # Kind unknown (""); depth: the name order, the forward order of a stack
                # (layers.2 before layers.10). The per-layer table and heatmap read these.
                info = rec.layers[layer] = LayerInfo(name=layer, kind="", depth=len(rec.layers))
            info.params.append(name)
        if "grad_norm_global" not in rec.series:
            _derive_global(rec, params)
        steps = [s.last_step for s in rec.series.values() if s.last_step is not None]
        rec.steps = max(steps) + 1 if steps else 0
        return rec


def _derive_global(rec: Record, params: Iterable[str]) -> None:
    """The global gradient norm from the per-parameter ones, at the steps where every
    parameter's norm was logged (sqrt of the summed squares, as the recorder computes it)."""
    series = [rec.series[k] for p in params if (k := series_key("grad_norm", p)) in rec.series]
    if not series:
        return
    by_step = [dict(zip(*s.points())) for s in series]
    common = set(by_step[0])
    for d in by_step[1:]:
        common &= set(d)
    for step in sorted(common):
        total = 0.0
        for d in by_step:
            v = d[step]
            total = math.nan if math.isnan(v) or math.isnan(total) else total + v * v
        rec.add("grad_norm_global", step, math.sqrt(total) if math.isfinite(total) else total)
    if "grad_norm_global" in rec.series:
        rec.run.setdefault("derived", []).append("grad_norm_global")
