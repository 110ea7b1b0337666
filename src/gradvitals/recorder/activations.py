"""Which forward is traced and which module outputs it hands to the output meter.

On scheduled steps the first training forward of a root model is traced: one
process-wide forward hook for that forward (not one per module), removed when the
root returns. The model's first traced forward also learns its topology (which
activation follows which layer, functional activations) and runs the init audit.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import torch_compat
from .. import distributed
from ..probes import activations as act_probe
from ..probes import init_audit
from ..probes.topology import ActivationCalls, activation_after, functional_activations
from ..record import Record, series_key
from ..taxonomy import BATCHNORM_LAYERS, WEIGHT_LAYERS, activation_family
from .outputs import ACT_BATCH_MAX_NUMEL, ACT_LEAN_MIN_NUMEL, ActInfo, OutputMeter
from .registry import Registry, WatchedModel


class ActivationTracer:
    def __init__(self, owner: Any, registry: Registry, record: Record, meter: OutputMeter,
                 fail: Callable[[str, BaseException], None]) -> None:
        self.owner = owner  # the Recorder (init_audit reads its record and step)
        self.registry = registry
        self.record = record
        self.meter = meter
        self.fail = fail
        self.handles: list[Any] = []
        self.stale: list[Any] = []  # hooks to remove once torch no longer iterates over them
        self.mark = 0  # len(staging.pending) when the traced forward began
        self.model: WatchedModel | None = None
        self.seen: set[int] = set()
        self.events: list[tuple[str, str, str]] | None = None
        self.mode: ActivationCalls | None = None
        self.infos: dict[int, ActInfo] = {}  # id(module) -> what its stats need
        self.root: tuple[nn.Module, nn.Module] | None = None
        self.batch = True
        self.unit_hint: int | None = None
        self.next_depth = 0
        self.attention: Any = None  # recorder.attention.AttentionMeter: wraps attention in traced forwards

    def remove_hooks(self) -> None:
        for h in self.handles + self.stale:
            h.remove()
        self.handles, self.stale = [], []
        self.model = None
        self.root = None
        self.meter.reset()
        if self.attention is not None:
            self.attention.abort()
        if self.mode is not None:
            try:
                self.mode.__exit__(None, None, None)
            except Exception:
                pass
            self.mode = None

    def start(self, model: WatchedModel, step: int, wanted: bool) -> None:
        """``model``'s root forward begins at ``step``; ``wanted``: activations are on
        and the step is scheduled."""
        if self.stale:  # left by a forward that raised (see end)
            for h in self.stale:
                h.remove()
            self.stale = []
        if self.handles or not wanted:
            return  # a nested root (D(G(z))), or nothing to trace
        if not torch.is_grad_enabled() or model.traced_step == step:
            return  # evaluation forwards must not pollute training statistics
        if model.module is not None and not model.module.training and model.train_mode_seen:
            return
        model.traced_step = step
        self.model = model
        self.mark = len(self.meter.staging.pending)  # what this forward adds comes after
        self.seen = set()
        if not model.topology_done:
            try:  # once per model: init/architecture facts for the rules (probes/init_audit.py)
                init_audit.start(self.owner, model)
            except Exception as exc:
                self.fail("init_audit", exc)
            self.events = []
            self.mode = ActivationCalls(self.events)
            self.mode.__enter__()
        self.root = (torch_compat.unwrap(model.module), model.module)
        self.batch = not distributed.initialized()  # see OutputMeter.stage_add
        # One process-wide forward hook for the traced forward (not one per module: 40
        # registrations and removals per scheduled step on a 20-layer MLP). Not for
        # the root itself: its output is measured from end().
        self.handles.append(torch.nn.modules.module.register_module_forward_hook(self._global_hook))
        if self.attention is not None:
            try:
                self.attention.begin(model)
            except Exception as exc:
                self.fail("attention", exc)

    def end(self, model: WatchedModel, args: tuple, output: Any, raised: bool) -> None:
        """The traced root returned ``output`` (``raised``: it raised instead, and torch
        is running its always-called global forward hooks: the process-wide hook must not
        be removed from under that loop now, only made inert and removed later)."""
        if self.model is not model:
            return
        if self.attention is not None:
            self.attention.finish(model, raised)
        if raised:
            self.stale.extend(self.handles)
            # The statistics of a forward that never finished (a batch the script
            # rejects, a retry after running out of memory) are not the step's: dropped.
            self.meter.reset()
            del self.meter.staging.pending[self.mark:]
            model.traced_step = -1  # the step's next forward (the retry) is traced instead
        else:
            for h in self.handles:
                h.remove()
        self.handles = []
        if output is not None:
            self.hook(torch_compat.unwrap(model.module), args, output)
        self.meter.finish_forward()
        self.model = None
        self.root = None
        if self.mode is not None:
            try:
                self.mode.__exit__(None, None, None)
            except Exception as exc:
                self.fail("topology", exc)
            self.mode = None
            model.topology_done = True
            try:
                for name, act in activation_after(self.events or []).items():
                    if name in self.record.layers:
                        self.record.layers[name].activation_after = act
                for name in functional_activations(self.events or []):
                    if name in self.record.layers:
                        self.record.layers[name].extra["activation_is_function"] = True
                self.infos.clear()  # a layer before a functional tanh/sigmoid measures its saturation
            except Exception as exc:
                self.fail("topology", exc)

    def _global_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        root = self.root
        if root is None or module is root[0] or module is root[1]:
            return
        entry = self.registry.modules.get(id(module))
        if entry is None or entry[0] is not self.model:
            return  # not this model's (another model called inside this forward)
        self.hook(module, args, output)

    def info_of(self, module: nn.Module) -> ActInfo | None:
        version = self.registry.version
        info = self.infos.get(id(module))
        if info is not None and info.module is module and info.version == version:
            return info
        entry = self.registry.modules.get(id(module))
        if entry is None:
            return None
        name = entry[1]
        kind = torch_compat.module_kind(module)
        layer = self.record.layers.get(name)
        fam = activation_family(kind)
        keys = [series_key(q, name) for q in act_probe.STAT_NAMES]
        wants_dead = kind in WEIGHT_LAYERS or fam in ("relu",) or kind in BATCHNORM_LAYERS
        if wants_dead:
            keys.append(series_key("dead_frac", name))
        if len(self.infos) > 65536:
            self.infos.clear()
        info = self.infos[id(module)] = ActInfo(
            module=module, name=name, kind=kind, layer=layer, keys=keys, wants_dead=wants_dead,
            sat=act_probe.saturation_kind(module) or (
                act_probe.preactivation_kind(layer.activation_after)
                if layer is not None and kind in WEIGHT_LAYERS and layer.extra.get("activation_is_function") else None),
            leaf=next(module.children(), None) is None,
            version=version)
        return info

    def hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            key = id(module)
            if key in self.seen:
                return  # a module called several times per step: its first call counts
            self.seen.add(key)
            info = self.info_of(module)
            if info is None:
                return
            if self.events is not None and self.mode is not None and info.leaf:
                self.events.append(("module", info.name, info.kind))
            layer = info.layer
            if layer is None:
                return  # containers: their children carry the stats
            if layer.depth is None:
                layer.depth = self.next_depth
                self.next_depth += 1
            if info.kind in WEIGHT_LAYERS:
                self.unit_hint = 1 if info.kind.startswith("Conv") else -1
            meter = self.meter
            if info.kind in BATCHNORM_LAYERS:
                bn = act_probe.bn_samples(module, args)
                if bn is not None:
                    self.record.add(series_key("bn_batch", info.name), self.owner.step, float(bn[1]))
                    layer.extra["batch_size"] = bn[0]
            x = act_probe.first_tensor(output)
            if x is None or not x.is_floating_point() or x.numel() == 0:
                return
            dt = torch_compat.dtensor_type_if_loaded()
            if dt is not None and isinstance(x, dt):  # a tensor-parallel layer's output
                if any(p.is_partial() for p in x.placements):
                    return  # partial sums before their all-reduce: not this layer's values
                x = x.to_local()  # a shard (merged by element weights) or a replica
            dim = act_probe.unit_dim(x, self.unit_hint) if info.wants_dead and x.dim() else 0
            if meter.where and not info.wants_dead and meter.view_of(x, info):
                return
            if self.batch and info.batchable is not False:
                if (info.batchable and x.numel() >= ACT_LEAN_MIN_NUMEL
                        and x.dtype == torch.float32 and x.device.type == "cpu"):
                    meter.lean_add(x, info, dim)
                    return
                if info.batchable is None or x.numel() <= ACT_BATCH_MAX_NUMEL:
                    meter.stage_add(x, info, dim)  # (first sight: measured now, learns batchable)
                    return
            meter.measure([x], [info], dim)
        except Exception as exc:
            self.fail("activations", exc)
