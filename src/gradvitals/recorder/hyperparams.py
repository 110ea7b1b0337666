"""The optimizer's per-group hyperparameters (eps, betas, weight decay, momentum), in the record.

Rules need them to judge a layer against the optimizer that steps it (Adam's ``eps``
against the layer's gradient scale). They are read from ``param_groups`` when an
optimizer is first measured and again on scheduled steps, and written to
``record.run["optimizer_groups"]`` only when a group's values or parameters changed:
one entry per (optimizer, group) and change, never one per step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..record import Record
from .registry import Registry, WatchedOptimizer

#: The run-level key of the entries (see docs/design.md, "run.optimizer_groups").
RUN_KEY = "optimizer_groups"

#: The group keys copied, as plain floats (``betas`` as a list of floats): what the
#: rules read. ``lr`` is not among them: it is a per-step series (``lr/<opt>.<group>``).
HYPERPARAMETERS = ("eps", "betas", "weight_decay", "momentum", "dampening", "alpha")

#: Entries kept per (optimizer, group): a scheduler that moves betas or momentum every
#: step (OneCycleLR's cycle_momentum) changes them at every scheduled step; past this
#: many, the group's last entry is overwritten with the newest values (bounded record).
MAX_ENTRIES_PER_GROUP = 32


def _plain(value: Any) -> Any:
    """A float (or list of floats) for a group value; None for what is not a number.
    A tensor is read only where it already is in host memory: no device sync."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            return None
        return float(value.detach())
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        return items if items and all(isinstance(v, float) for v in items) else None
    return None


def group_values(group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a param group has, as plain floats (JSON-safe when finite)."""
    out: dict[str, Any] = {}
    for key in HYPERPARAMETERS:
        if key in group:
            v = _plain(group[key])
            if v is not None and all(math.isfinite(x) for x in (v if isinstance(v, list) else [v])):
                out[key] = v
    return out


class GroupFacts:
    """Writes an optimizer's groups to the record when they are new or changed."""

    def __init__(self, registry: Registry, record: Record) -> None:
        self.registry = registry
        self.record = record
        # (optimizer label, group index) -> the last entry written, without its step
        self.last: dict[tuple[str, int], dict[str, Any]] = {}
        self.where: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (index of its last entry, entries)
        # id(WatchedOptimizer) -> (registry version, values of every group) last read
        self.seen: dict[int, tuple[int, list[dict[str, Any]]]] = {}

    def due(self, o: WatchedOptimizer, scheduled: bool) -> bool:
        """Whether to read ``o``'s groups now: its first measured step, then scheduled steps."""
        return scheduled or id(o) not in self.seen

    def note(self, o: WatchedOptimizer, opt: Any, step: int) -> None:
        groups = opt.param_groups
        values = [group_values(g) for g in groups]
        state = (self.registry.version, values)
        if self.seen.get(id(o)) == state:
            return
        self.seen[id(o)] = state
        owner = self.registry.param_owner
        entries = self.record.run.setdefault(RUN_KEY, [])
        for i, (g, vals) in enumerate(zip(groups, values)):
            params = [owner[id(p)][1] for p in g["params"] if id(p) in owner]
            entry = {"optimizer": o.label, "kind": type(opt).__name__, "group": i, **vals, "params": params}
            key = (o.label, i)
            if self.last.get(key) == entry:
                continue  # the same optimizer built again (e.g. every epoch) with the same values
            self.last[key] = entry
            at, count = self.where.get(key, (-1, 0))
            if count >= MAX_ENTRIES_PER_GROUP and 0 <= at < len(entries):
                entries[at] = {"step": step, **entry}
                continue
            self.where[key] = (len(entries), count + 1)
            entries.append({"step": step, **entry})
