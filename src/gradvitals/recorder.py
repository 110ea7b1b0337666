"""The recorder: owns the probes, decides when they run, and fetches their device
tensors with at most one host sync per optimizer step.

Timeline of one optimizer step ``s`` (single optimizer):

    root forward   -> on scheduled steps, per-module forward hooks collect activation
                      stats (device tensors); the root's inputs are kept for a replay
    backward()     -> the loss is kept (device tensor)
    clip_grad_norm_-> per-parameter norms before clipping (device tensor)
    opt pre-hook   -> gradient norms (fused); on scheduled steps weight norms and a copy
                      of the weights; ONE host sync fetches everything pending; if any
                      value is NaN/Inf the forward is replayed to find its origin
    opt post-hook  -> update ratios (device tensor, fetched at the next sync); s += 1

Without an optimizer, the end of each backward plays the pre-hook's part.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import __version__
from .probes import activations as act_probe
from .probes import init_audit
from .probes import loss_graph
from .probes import patches
from . import distributed
from .probes.nonfinite import replay_backward, replay_forward
from .probes.norms import foreach_norm, fused_norms
from .probes.topology import ActivationCalls, activation_after, functional_activations
from .record import DEFAULT_CAP, LayerInfo, ParamInfo, Record, Series
from .taxonomy import BATCHNORM_LAYERS, WEIGHT_LAYERS, activation_family

log = logging.getLogger("gradvitals")

_NAN = float("nan")


@dataclass
class Options:
    """What to record and how often. Every field is a ``gv.watch(**options)`` keyword."""

    #: Activation stats, weight norms and update ratios every this many steps
    #: (gradient norms and the loss are recorded every step). Step 0 always.
    every: int = 25
    #: ... and every this many steps once the run is past ``late_after`` steps (None:
    #: 4 x ``every``). Most failures show early; a long run's record decimates to
    #: ``cap`` points anyway; this keeps the scheduled probes' share of a long run at a
    #: quarter of the early one's. ``late_every=every`` keeps one rate throughout.
    late_every: int | None = None
    late_after: int = 1000
    #: Record everything every step (for debugging; costs more).
    full: bool = False
    #: Points kept per series before decimation.
    cap: int = DEFAULT_CAP
    #: Collect activation statistics on scheduled steps.
    activations: bool = True
    #: Replay the step that first produced NaN/Inf to find the module it came from.
    nonfinite_origin: bool = True
    #: Model name used as a prefix when several models are watched ("netD:main.0").
    name: str | None = None
    #: Write per-layer gradient norms, update ratios and the loss to TensorBoard here.
    tensorboard: str | None = None
    #: Rewrite the report every this many seconds of wall time while the run goes on,
    #: when it has a path (``--json``/``--html``, ``gv.watch(path=...)``): a run killed
    #: without a chance to write it (SIGKILL, OOM, node loss) leaves one this recent.
    #: None or 0: off. (See gradvitals.autosave.)
    autosave_s: float | None = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"every must be a positive integer (steps), got {self.every!r}")
        if self.late_every is None:
            self.late_every = 4 * self.every
        if not isinstance(self.late_every, int) or isinstance(self.late_every, bool) or self.late_every < 1:
            raise ValueError(f"late_every must be a positive integer (steps) or None, got {self.late_every!r}")
        if not isinstance(self.late_after, int) or isinstance(self.late_after, bool) or self.late_after < 0:
            raise ValueError(f"late_after must be a non-negative integer (steps), got {self.late_after!r}")
        if not isinstance(self.cap, int) or self.cap < 16:
            raise ValueError(f"cap must be an integer >= 16 (points per series), got {self.cap!r}")
        for flag in ("full", "activations", "nonfinite_origin"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError(f"name must be a non-empty string or None, got {self.name!r}")
        if self.tensorboard is not None and not isinstance(self.tensorboard, (str, os.PathLike)):
            raise ValueError(f"tensorboard must be a folder path (str) or None, got {self.tensorboard!r}")
        a = self.autosave_s
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not a >= 0 or a == math.inf):
            raise ValueError(f"autosave_s must be a number of seconds >= 0 (0 or None: off), got {a!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Options:
        allowed = {f.name for f in fields(cls)}
        bad = sorted(set(kwargs) - allowed)
        if bad:
            raise TypeError(f"unknown watch option(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
        return cls(**kwargs)


@dataclass
class _Model:
    module: nn.Module
    index: int
    label: str  # variable or class name, numbered when several share it ("model1")
    prefix: str = ""
    base: str = ""  # the label as given (the numbering counts these)
    ordinal: int = 0  # how many models of this base came before it (its number: "model2")
    names: dict[int, str] = field(default_factory=dict)  # id(module) -> reported name
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    last_inputs: tuple[tuple, dict] | None = None
    traced_step: int = -1
    topology_done: bool = False
    # A grad-enabled forward in training mode was seen. Until then an eval-mode one
    # counts as training: models fine-tuned in eval mode (frozen BatchNorm statistics,
    # no dropout) are measured and replayed; after, eval-mode forwards are validation.
    train_mode_seen: bool = False
    eval_steps: dict[str, Any] | None = None  # its eval_mode_training event, once seen
    # Its first forward was an evaluation (no_grad, eval mode) before any training one:
    # eval-mode training forwards after it are a forgotten model.train(), not a model
    # fine-tuned in eval mode on purpose. None until its first forward decides.
    evaluated_first: bool | None = None
    local_hooks: bool = False  # its root hooks live on the module (gv.watch), not global (runner)


@dataclass
class _Opt:
    ref: Any  # weakref to the optimizer
    index: int
    label: str
    params: list[nn.Parameter] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # "grad_norm/<name>" per param
    tkeys: tuple[str, ...] = ()  # the same, as the key of its row (Recorder._rows)
    names: list[str] = field(default_factory=list)
    version: int = -1
    fast: bool = False  # params: dense, one device, one float dtype, no DTensor (one fused kernel)
    lr_keys: list[str] = field(default_factory=list)
    loss_keys: list[str] = field(default_factory=lambda: ["loss"])
    lr_series: list[Series] = field(default_factory=list)  # the lr series, per param group
    lr_series_of: Any = None  # the record's series dict they belong to
    wkeys: list[str] = field(default_factory=list)  # "weight_norm/<name>" per param
    ukeys: list[str] = field(default_factory=list)  # "update_ratio/<name>" per param
    snapshot: list[Tensor] | None = None  # kept weight-copy buffers (CPU, see _snapshot)
    preclip: tuple[list[str], Tensor] | None = None
    before: tuple[list[str], list[Tensor], Tensor] | None = None
    handles: list[Any] = field(default_factory=list)
    local_hooks: bool = False  # its step hooks live on the optimizer (gv.watch)
    stepped: bool = False  # it has taken a step (see Recorder._note_segment)
    # Were its gradients cleared between two of its steps? (see Recorder._zero_watch)
    gparam: Any = None  # the parameter watched: its first with a gradient
    gstate: tuple[int, int] | None = None  # (id, version) of that gradient when last seen
    zstate: str | None = None  # None | "old": as its last step left them | "stale" | "fresh"
    unzeroed: dict[str, Any] | None = None  # the grad_not_zeroed event, once seen
    registered_at: int = 0  # optimizer steps (pre-hook calls) seen before it was registered


@dataclass(eq=False)
class _ActInfo:
    """What one module's activation statistics need, worked out once (per version)."""

    module: nn.Module
    name: str
    kind: str
    layer: LayerInfo | None
    keys: list[str]
    wants_dead: bool
    sat: str | None
    leaf: bool
    version: int
    batchable: bool | None = None  # None: not yet seen; False: changed in place later


#: Module outputs up to this many elements are measured together at the end of the
#: forward (see Recorder._act_stage_add); larger ones at once, where the arithmetic
#: outweighs the per-kernel cost.
ACT_BATCH_MAX_NUMEL = 2**16
#: Staged elements held at most (then measured early): bounds the memory kept alive.
ACT_STAGE_MAX_NUMEL = 2**20
#: CPU float32 outputs too large to stage, of modules whose output is not changed in
#: place later, are reduced at once in the hook, while the output is still in cache
#: (see Recorder._act_lean_add); only their few sums wait for the end of the forward.
#: (Measured: on W2's 131k-262k-element outputs 1.66x -> 1.54x of the step in full
#: mode; on W1's 32k-element ones staging stays cheaper, ~9 dispatches per output.)
ACT_LEAN_MIN_NUMEL = ACT_BATCH_MAX_NUMEL + 1
#: Module outputs whose sums wait at most (elements): bounds the memory kept alive.
ACT_LEAN_MAX_NUMEL = 2**23
LEAN_PATH = True


class Recorder:
    """Owns probes over one or more models and optimizers; fills a :class:`Record`."""

    def __init__(self, options: Options | None = None, *, command: str | None = None) -> None:
        self.options = options or Options()
        self.record = Record(cap=self.options.cap)
        self.record.run.update(_environment())
        if command is not None:
            self.record.run["command"] = command
        self.models: list[_Model] = []
        self._modules: dict[int, tuple[_Model, str]] = {}  # id(module) -> (model, name)
        self._opts: dict[int, _Opt] = {}
        self._param_owner: dict[int, tuple[_Model, str]] = {}  # id(param) -> (model, name)
        self.step = 0
        self._version = 0  # bumped when models/optimizers change (invalidates caches)
        self._stepped: list[int] = []  # optimizers stepped in the current step, in order
        self._cycle_last: int | None = None  # the optimizer that ends a step (learned)
        self._optimizer_seen = False
        self._last_stepped_call = 0  # _pre_hook_calls when the open step's last optimizer stepped
        #: Modules an optimizer has stepped (weak: a finished fold's model must be freed).
        self._trained_models: dict[int, weakref.ref] = {}
        self._base_counts: dict[str, int] = {}  # models per base label, ever (see _relabel)
        #: Called with a model no longer watched (see _retire); the runner forgets it too.
        self.on_retire: Any = None
        self._losses: list[Tensor] = []
        self._grad_losses: list[Tensor] = []  # see _on_autograd_grad
        self._loss_inputs: dict[tuple[str, str, int], dict[str, Any]] = {}  # see _count_wrong_losses
        self._segments = 0  # segment events written (see _note_segment)
        self._wrong_hits: set[tuple[str, str, int | None]] = set()  # see _probe_loss_graph
        self._loss_probe_step = -1  # the step whose loss graph was last probed
        self._loss_probed = False  # ... and not yet counted
        self._explicit_loss = False
        self._saw_forward = False  # a root training forward was ever seen
        self._forwards = 0  # root training forwards seen (which forward a backward's loss came from)
        self._last_forward: tuple[_Model, bool] | None = None  # see _on_root_end
        self._eval_step: _Model | None = None  # this step's backward came from an eval-mode forward
        self._forward_since_flush = False  # ... since the last measured step
        self._pending: list[tuple[int, list[str], Tensor]] = []
        self._act_handles: list[Any] = []
        self._act_stale: list[Any] = []  # hooks to remove once torch no longer iterates over them
        self._act_mark = 0  # len(self._pending) when the traced forward began
        self._act_model: _Model | None = None
        self._act_seen: set[int] = set()
        self._act_events: list[tuple[str, str, str]] | None = None
        self._act_mode: ActivationCalls | None = None
        self._dead: dict[str, act_probe.DeadUnits] = {}
        self._dead_groups: dict[tuple[int, ...], act_probe.DeadUnits] = {}  # see _act_measure
        self._act_infos: dict[int, _ActInfo] = {}  # id(module) -> what its stats need
        self._act_root: tuple[nn.Module, nn.Module] | None = None
        self._act_batch = True
        self._act_stage: list[tuple[Tensor, int, _ActInfo, int]] = []
        self._act_lean: list[tuple[Tensor, int, _ActInfo, list[Tensor], Tensor | None]] = []
        self._act_leaned = 0
        self._act_staged = 0
        # Outputs whose measurement waits (staged or lean), by where their elements are:
        # a later module returning a view of the same elements (Flatten after pooling,
        # Identity) takes their statistics instead of measuring them again.
        self._act_where: dict[tuple[int, torch.device], tuple[_ActInfo, int, int, torch.dtype, bool]] = {}
        self._act_alias: dict[int, list[_ActInfo]] = {}  # id(source info) -> its views' infos
        self._act_group_keys: dict[tuple[int, ...], list[str]] = {}
        self._scratch = act_probe.Scratch(ACT_STAGE_MAX_NUMEL)  # CPU work buffers, see Scratch
        self._unit_hint: int | None = None
        self._next_depth = 0
        self._unseen_grads: set[int] = set()
        self._errors: dict[str, int] = {}
        self._closure_step: _Opt | None = None  # a closure optimizer's step awaiting its first backward
        self._closure_measured = False  # that step is measured: later (line-search) losses are not the step's
        self._manual_before: tuple[list[str], list[Tensor], list[Tensor], Tensor] | None = None
        self._scaled_loss: tuple[Tensor, Tensor, float | None] | None = None  # (loss * scale, the loss scaled, its divisor)
        self._loss_div: float | None = None  # the divisor of the loss whose backward runs (_loss_divisor)
        self._pre_hook_calls = 0
        self._scaler_pre_calls = 0
        self._origin_done = False
        self._replaying = False  # the NaN origin's backward replay runs a forward of ours
        self._last_nonfinite: int | None = None  # the last step any watched value was NaN/Inf
        self._closed = False
        self._paused = False
        self._started = time.time()
        self._tb: Any = None
        self._dist: Any = None  # distributed.Merger once a multi-rank process group exists
        self._global_step = -1  # grad_norm_global of this step so far (several optimizers)
        self._global_value = 0.0
        self._rows: dict[tuple[str, ...], tuple[list[Series], list[int], int]] = {}  # see _row()
        self._rows_of: dict[str, Series] | None = None
        # Per-parameter gradient norms fetched but not yet appended: key tuple ->
        # (steps, rows of values, their series); appended in bulk (see _ring_push).
        self._ring: dict[tuple[str, ...], tuple[list[int], list[list[float]], list[Series]]] = {}
        self._ring_rows = 0
        self.progress: Any = None  # reports.progress.Progress: the CLI's live status line
        self.backward_mode_models: set[int] = set()
        self.autosave: Any = None  # autosave.Autosave: ticked at each step boundary
        patches.install(self)
        if self.options.tensorboard:
            self._open_tensorboard(self.options.tensorboard)

    # ------------------------------------------------------------------ setup
    def add_model(self, module: nn.Module, label: str | None = None, *, local_hooks: bool = True) -> _Model:
        """Watch a root model. ``local_hooks``: attach its root hooks on the module
        itself (``gv.watch``); the runner passes False and calls the same handlers
        from process-global hooks, so nothing lives on the user's modules."""
        for m in self.models:
            if m.module is module:
                return m
        model = _Model(module=module, index=len(self.models), label=label or self.options.name
                       or type(module).__name__)
        model.base = model.label
        model.ordinal = self._base_counts.get(model.base, 0)
        self._base_counts[model.base] = model.ordinal + 1
        self.models.append(model)
        if len(self.models) == 1:
            self._index_model(model)
        # else _relabel() indexes it under its prefix: indexed bare first, its names
        # would collide with the first model's ("0.weight") and take over its series
        model.local_hooks = local_hooks
        if local_hooks and not self._paused:
            self._hook_model(model)
        if len(self.models) > 1:
            self._relabel()
        return model

    def remove_model(self, module: nn.Module) -> None:
        """Stop watching ``module`` (e.g. it turned out to be part of a larger model,
        called on its own first). Its layers and parameters leave the record unless
        something was recorded under their names."""
        for m in list(self.models):
            if m.module is module:
                for h in m.handles:
                    h.remove()
                self.models.remove(m)
                names = {full for k, (mm, full) in self._modules.items() if mm is m}
                for k in [k for k, (mm, _) in self._modules.items() if mm is m]:
                    del self._modules[k]
                self._version += 1
                self._forget_unrecorded(names)

    def _forget_unrecorded(self, layer_names: set[str]) -> None:
        rec = self.record
        used = {key.split("/", 1)[1] for key in rec.series if "/" in key}
        for name in layer_names:
            layer = rec.layers.get(name)
            if layer is None or name in used or any(p in used for p in layer.params):
                continue
            for p in layer.params:
                rec.params.pop(p, None)
            del rec.layers[name]

    def _index_model(self, model: _Model) -> None:
        pre = model.prefix
        model.names = {}
        base = distributed.unwrap(model.module)  # DDP: the user's names, without "module."
        if base is not model.module:
            model.names[id(model.module)] = pre.rstrip(":") or "(root)"
            self._modules[id(model.module)] = (model, model.names[id(model.module)])
        for name, mod in base.named_modules():
            full = pre + (name or "(root)") if pre else (name or "(root)")
            if not name and pre:
                full = pre.rstrip(":")
            model.names[id(mod)] = full
            self._modules[id(mod)] = (model, full)
            kind = distributed.module_kind(mod)
            if _PARAMETRIZATIONS in f".{name}.":
                continue  # a parametrized weight's machinery: its parameters are its layer's
            own = [(n, p) for n, p in mod.named_parameters(recurse=False)]
            is_leaf = next(mod.children(), None) is None
            if own or is_leaf:
                layer = self.record.layers.get(full) or LayerInfo(name=full, kind=kind, model=model.label)
                layer.kind = kind  # a module may have been swapped in place (try-fixes)
                layer.params = [pre + (f"{name}.{n}" if name else n) for n, _ in own]
                if kind in WEIGHT_LAYERS and own:
                    w = init_audit.plain_weight(mod)
                    if w is not None and w.dim() >= 2:
                        layer.out_features = int(w.shape[0])
                    elif w is None:  # parametrized (spectral_norm...): not read, see plain_weight
                        n_out = getattr(mod, "out_features", None) or getattr(mod, "out_channels", None)
                        if isinstance(n_out, int):
                            layer.out_features = n_out
                self.record.layers[full] = layer
        model.params = []
        seen: set[int] = set()
        for name, p in base.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = (pre + name) if pre else name
            if _PARAMETRIZATIONS in f".{name}":
                # `0.parametrizations.weight.original`: the weight of layer `0`, computed
                owner = f".{name}".split(_PARAMETRIZATIONS, 1)[0][1:]
                layer = (pre + owner) if owner else (pre.rstrip(":") or "(root)")
                lay = self.record.layers.get(layer)
                if lay is not None and full not in lay.params:
                    lay.params.append(full)
            else:
                layer = full.rsplit(".", 1)[0] if "." in full else (pre.rstrip(":") or "(root)")
            model.params.append((full, p))
            self._param_owner[id(p)] = (model, full)
            info = self.record.params.get(full)
            if info is None:
                info = ParamInfo(name=full, layer=layer, shape=list(p.shape), numel=p.numel(),
                                 requires_grad=p.requires_grad, dtype=str(p.dtype).replace("torch.", ""))
                self.record.params[full] = info
                if p.requires_grad:
                    self._unseen_grads.add(id(p))
        self._version += 1

    def _relabel(self) -> None:
        """Several models: prefix every name with its model's label ("netD:main.0")."""
        self._drain_ring()  # appended before the names change
        renames: dict[str, str] = {}
        for m in self.models:
            # Numbered by order of arrival among the models of its base, ever: a third
            # "model" is model2, whatever became of model0 (see _retire).
            label = m.base or m.label
            if self._base_counts.get(label, 0) > 1:
                label = f"{label}{m.ordinal}"
            new_prefix = label + ":"
            if m.prefix == new_prefix:
                continue
            old_names = dict(m.names)
            old_params = [n for n, _ in m.params]
            m.prefix = new_prefix
            if m.label != label:
                for ev in self.record.events:  # e.g. its init_audit, written under the old label
                    if ev.get("model") == m.label and ev.get("step", -1) <= self.step:
                        ev["model"] = label
            m.label = label
            self._index_model(m)
            for mid, old in old_names.items():
                renames[old] = m.names[mid]
            for old, (new, _) in zip(old_params, m.params):
                renames[old] = new
        if not renames:
            return
        rec = self.record
        for old, new in renames.items():  # what was learned under the old name stays
            if old != new and old in rec.layers and new in rec.layers:
                was, now = rec.layers[old], rec.layers[new]
                now.depth, now.activation_after, now.extra = was.depth, was.activation_after, was.extra
            if old != new and old in rec.params and new in rec.params:
                rec.params[new].grad_seen = rec.params[old].grad_seen
                rec.params[new].in_optimizer = rec.params[old].in_optimizer
        rec.layers = {k: v for k, v in rec.layers.items() if k not in renames or renames[k] == k}
        rec.params = {k: v for k, v in rec.params.items() if k not in renames or renames[k] == k}
        new_series = {}
        for key, s in rec.series.items():
            q, _, name = key.partition("/")
            new_series[f"{q}/{renames.get(name, name)}" if name else key] = s
        rec.series = new_series
        for d in list(self._dead):
            if d in renames:
                self._dead[renames[d]] = self._dead.pop(d)

    def add_optimizer(self, opt: torch.optim.Optimizer, *, local_hooks: bool = True) -> _Opt:
        o = self._opts.get(id(opt))
        if o is not None and o.ref() is opt:
            return o
        label = f"opt{len(self._opts)}" if self._opts else "opt"
        o = _Opt(ref=weakref.ref(opt), index=len(self._opts), label=label)
        o.registered_at = self._pre_hook_calls
        self._opts[id(opt)] = o
        # Their kinds, each once, for the rules (an adaptive optimizer's first step is
        # +-lr per weight). Once: a script may build a new optimizer every epoch.
        kinds = self.record.run.setdefault("optimizers", [])
        if type(opt).__name__ not in kinds:
            kinds.append(type(opt).__name__)
        o.local_hooks = local_hooks
        if local_hooks and not self._paused:
            self._hook_optimizer(o, opt)
        self._version += 1
        return o

    def _hook_model(self, model: _Model) -> None:
        model.handles.append(model.module.register_forward_pre_hook(self._root_pre_hook))
        model.handles.append(model.module.register_forward_hook(self._root_post_hook, with_kwargs=True,
                                                                always_call=True))

    def _hook_optimizer(self, o: _Opt, opt: torch.optim.Optimizer) -> None:
        o.handles.append(opt.register_step_pre_hook(self._opt_pre_hook))
        o.handles.append(opt.register_step_post_hook(self._opt_post_hook))

    # ------------------------------------------------------------ pause
    def pause(self) -> None:
        """Detach every hook and patch, keeping the record and the step count: while
        paused, training runs exactly as unwatched (nothing is measured, no step is
        counted). :meth:`resume` re-attaches. Idempotent; a no-op once closed."""
        if self._paused or self._closed:
            return
        self._paused = True
        self._remove_hooks()
        patches.uninstall(self)

    def resume(self) -> None:
        """Re-attach what :meth:`pause` detached. Idempotent; a no-op once closed."""
        if not self._paused or self._closed:
            return
        self._paused = False
        patches.install(self)
        for m in self.models:
            if m.local_hooks:
                self._hook_model(m)
        for o in self._opts.values():
            opt = o.ref()
            if o.local_hooks and opt is not None:
                self._hook_optimizer(o, opt)

    @property
    def paused(self) -> bool:
        return self._paused

    # --------------------------------------------- read by the distributed merge
    @property
    def version(self) -> int:
        """Bumped whenever the watched models or optimizers change (caches key on it)."""
        return self._version

    @property
    def merger(self) -> Any:
        """The cross-rank merge: None until the first multi-rank flush, then a
        distributed.Merger, or False once merging is off."""
        return self._dist

    @merger.setter
    def merger(self, value: Any) -> None:
        self._dist = value

    def ever_active(self, name: str) -> Tensor | None:
        """Layer ``name``'s per-unit "ever active over the dead-unit window" mask, or None."""
        dead = self._dead.get(name)
        masks = getattr(dead, "masks", None)
        if not masks:
            return None
        ever = masks[0] if len(masks) == 1 else torch.stack(masks).any(0)
        return ever.reshape(-1)

    def fail(self, probe: str, exc: BaseException) -> None:
        """A probe failed: reported once per probe, never raised (the run goes on)."""
        self._fail(probe, exc)

    def _remove_hooks(self) -> None:
        for h in self._act_handles + self._act_stale:
            h.remove()
        self._act_handles, self._act_stale = [], []
        self._act_model = None
        self._act_root = None
        self._act_stage, self._act_staged = [], 0
        self._act_lean, self._act_leaned = [], 0
        self._act_where, self._act_alias = {}, {}
        if self._act_mode is not None:
            try:
                self._act_mode.__exit__(None, None, None)
            except Exception:
                pass
            self._act_mode = None
        for m in self.models:
            for h in m.handles:
                h.remove()
            m.handles = []
        for o in self._opts.values():
            for h in o.handles:
                h.remove()
            o.handles = []
            o.before = None

    def _opt_params(self, o: _Opt, opt: torch.optim.Optimizer) -> None:
        """Parameters measured at this optimizer's step: its own, plus the other
        trainable parameters of the models it updates (those it misses are the
        ``not_updated`` suspects), each measured by one optimizer only."""
        groups = opt.param_groups
        n = len(groups[0]["params"]) if len(groups) == 1 else sum(len(g["params"]) for g in groups)
        if o.version == self._version and len(o.params) >= n:
            return
        own = [p for g in opt.param_groups for p in g["params"]]
        own_ids = {id(p) for p in own}
        # Parameters of these models that no optimizer updates: measured here (the
        # not_updated suspects). Those another optimizer updates are its to measure.
        any_opt: set[int] = set(own_ids)
        for other in self._opts.values():
            other_opt = other.ref()
            if other is not o and other_opt is not None:
                any_opt |= {id(p) for g in other_opt.param_groups for p in g["params"]}
        models = {id(self._param_owner[id(p)][0]) for p in own if id(p) in self._param_owner}
        claimed: set[int] = set()
        for other in self._opts.values():
            if other is not o and other.index < o.index:
                other_opt = other.ref()
                if other_opt is not None:  # claims go in index order, whichever optimizer steps first
                    self._opt_params(other, other_opt)
                claimed |= {id(p) for p in other.params}
        params: list[nn.Parameter] = []
        for p in own:
            if id(p) not in claimed:
                params.append(p)
        for m in self.models:
            if id(m) in models:
                for name, p in m.params:
                    if id(p) not in any_opt and id(p) not in claimed and p.requires_grad:
                        params.append(p)
        # Models no optimizer updates at all (an EMA / SWA copy, a teacher evaluated
        # beside the student): nothing there is meant to receive a gradient.
        touched = {id(self._param_owner[pid][0]) for pid in any_opt if pid in self._param_owner}
        for m in self.models:
            for name, p in m.params:
                info = self.record.params.get(name)
                if info is not None and id(p) in any_opt:
                    info.in_optimizer = True
                elif info is not None and (id(m) in models or id(m) not in touched) and not info.in_optimizer:
                    info.in_optimizer = False
        o.params = params
        o.names = [self._param_owner[id(p)][1] if id(p) in self._param_owner else f"{o.label}.param{i}"
                   for i, p in enumerate(params)]
        o.keys = ["grad_norm/" + n for n in o.names]
        o.tkeys = tuple(o.keys)
        o.version = self._version
        o.fast = _uniform(params)
        o.snapshot = None
        o.lr_keys, o.wkeys, o.ukeys = [], [], []

    # ------------------------------------------------------------- forwards
    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        entry = self._modules.get(id(module))
        if entry is None:
            return
        try:
            self._on_root_start(entry[0])
        except Exception as exc:
            self._fail("activations", exc)

    def _root_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        entry = self._modules.get(id(module))
        if entry is None:
            return
        # Always called: also when the forward raised (torch calls it from the handler
        # of that exception, with no output).
        self._on_root_end(entry[0], args, kwargs, output,
                          raised=output is None and sys.exc_info()[1] is not None)

    def _scheduled(self, step: int) -> bool:
        o = self.options
        return o.full or step % (o.every if step < o.late_after else o.late_every) == 0

    def _on_root_start(self, model: _Model) -> None:
        if self._replaying:
            return
        if self._act_stale:  # left by a forward that raised (see _on_root_end)
            for h in self._act_stale:
                h.remove()
            self._act_stale = []
        if self._act_handles or not self.options.activations:
            return  # a nested root (D(G(z))) or activations off
        if not torch.is_grad_enabled() or model.traced_step == self.step:
            return  # evaluation forwards must not pollute training statistics
        if model.module is not None and not model.module.training and model.train_mode_seen:
            return
        if not self._scheduled(self.step):
            return
        model.traced_step = self.step
        self._act_model = model
        self._act_mark = len(self._pending)  # what this forward adds comes after
        self._act_seen = set()
        if not model.topology_done:
            try:  # once per model: init/architecture facts for the rules (probes/init_audit.py)
                init_audit.start(self, model)
            except Exception as exc:
                self._fail("init_audit", exc)
            self._act_events = []
            self._act_mode = ActivationCalls(self._act_events)
            self._act_mode.__enter__()
        self._act_root = (distributed.unwrap(model.module), model.module)
        self._act_batch = not distributed.initialized()  # see _act_stage
        # One process-wide forward hook for the traced forward (not one per module: 40
        # registrations and removals per scheduled step on a 20-layer MLP). Not for
        # the root itself: its output is measured from _on_root_end.
        self._act_handles.append(torch.nn.modules.module.register_module_forward_hook(self._act_global_hook))

    def _on_root_end(self, model: _Model, args: tuple, kwargs: dict, output: Any = None,
                     raised: bool = False) -> None:
        """The root's forward returned ``output`` (``raised``: it raised instead, and torch
        is running its always-called global forward hooks: the process-wide hook must not
        be removed from under that loop now, only made inert and removed later)."""
        if self._replaying:
            return
        if model.evaluated_first is None and not raised:
            model.evaluated_first = not torch.is_grad_enabled() and not model.module.training
        if torch.is_grad_enabled() and not raised:
            # Which model's forward, in which mode, the next backward comes from: an
            # eval-mode one after training in train mode (or after an evaluation before
            # its first step) is validation if nothing backpropagates it, and a
            # forgotten model.train() if a step uses it.
            self._last_forward = (model, not model.module.training
                                  and (model.train_mode_seen or model.evaluated_first is True))
        if torch.is_grad_enabled() and not raised and (model.module.training or not model.train_mode_seen):
            if model.module.training:
                model.train_mode_seen = True
            # Kept (references only) so a NaN can be traced back by replaying this forward.
            model.last_inputs = (args, kwargs)
            self._saw_forward = self._forward_since_flush = True
            self._forwards += 1
        if self._act_model is not model:
            return
        if raised:
            self._act_stale.extend(self._act_handles)
            # The statistics of a forward that never finished (a batch the script
            # rejects, a retry after running out of memory) are not the step's: dropped.
            self._act_stage, self._act_staged = [], 0
            self._act_lean, self._act_leaned = [], 0
            self._act_where, self._act_alias = {}, {}
            del self._pending[self._act_mark:]
            model.traced_step = -1  # the step's next forward (the retry) is traced instead
        else:
            for h in self._act_handles:
                h.remove()
        self._act_handles = []
        if output is not None:
            self._act_hook(distributed.unwrap(model.module), args, output)
        self._act_flush_stage()
        self._act_flush_lean()
        self._act_where, self._act_alias = {}, {}  # (a view whose source was lost: nothing)
        self._act_model = None
        self._act_root = None
        if self._act_mode is not None:
            try:
                self._act_mode.__exit__(None, None, None)
            except Exception as exc:
                self._fail("topology", exc)
            self._act_mode = None
            model.topology_done = True
            try:
                for name, act in activation_after(self._act_events or []).items():
                    if name in self.record.layers:
                        self.record.layers[name].activation_after = act
                for name in functional_activations(self._act_events or []):
                    if name in self.record.layers:
                        self.record.layers[name].extra["activation_is_function"] = True
                self._act_infos.clear()  # a layer before a functional tanh/sigmoid measures its saturation
            except Exception as exc:
                self._fail("topology", exc)

    def _act_global_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        root = self._act_root
        if root is None or module is root[0] or module is root[1]:
            return
        entry = self._modules.get(id(module))
        if entry is None or entry[0] is not self._act_model:
            return  # not this model's (another model called inside this forward)
        self._act_hook(module, args, output)

    def _act_info_of(self, module: nn.Module) -> _ActInfo | None:
        info = self._act_infos.get(id(module))
        if info is not None and info.module is module and info.version == self._version:
            return info
        entry = self._modules.get(id(module))
        if entry is None:
            return None
        name = entry[1]
        kind = distributed.module_kind(module)
        layer = self.record.layers.get(name)
        fam = activation_family(kind)
        keys = [f"{q}/{name}" for q in act_probe.STAT_NAMES]
        wants_dead = kind in WEIGHT_LAYERS or fam in ("relu",) or kind in BATCHNORM_LAYERS
        if wants_dead:
            keys.append(f"dead_frac/{name}")
        if len(self._act_infos) > 65536:
            self._act_infos.clear()
        info = self._act_infos[id(module)] = _ActInfo(
            module=module, name=name, kind=kind, layer=layer, keys=keys, wants_dead=wants_dead,
            sat=act_probe.saturation_kind(module) or (
                act_probe.preactivation_kind(layer.activation_after)
                if layer is not None and kind in WEIGHT_LAYERS and layer.extra.get("activation_is_function") else None),
            leaf=next(module.children(), None) is None,
            version=self._version)
        return info

    def _act_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            key = id(module)
            if key in self._act_seen:
                return  # a module called several times per step: its first call counts
            self._act_seen.add(key)
            info = self._act_info_of(module)
            if info is None:
                return
            if self._act_events is not None and self._act_mode is not None and info.leaf:
                self._act_events.append(("module", info.name, info.kind))
            layer = info.layer
            if layer is None:
                return  # containers: their children carry the stats
            if layer.depth is None:
                layer.depth = self._next_depth
                self._next_depth += 1
            if info.kind in WEIGHT_LAYERS:
                self._unit_hint = 1 if info.kind.startswith("Conv") else -1
            if info.kind in BATCHNORM_LAYERS:
                bn = act_probe.bn_samples(module, args)
                if bn is not None:
                    self.record.add(f"bn_batch/{info.name}", self.step, float(bn[1]))
                    layer.extra["batch_size"] = bn[0]
            x = act_probe.first_tensor(output)
            if x is None or not x.is_floating_point() or x.numel() == 0:
                return
            dim = act_probe.unit_dim(x, self._unit_hint) if info.wants_dead and x.dim() else 0
            if self._act_where and not info.wants_dead and self._act_view_of(x, info):
                return
            if self._act_batch and info.batchable is not False:
                if (info.batchable and LEAN_PATH and x.numel() >= ACT_LEAN_MIN_NUMEL
                        and x.dtype == torch.float32 and x.device.type == "cpu"):
                    self._act_lean_add(x, info, dim)
                    return
                if info.batchable is None or x.numel() <= ACT_BATCH_MAX_NUMEL:
                    self._act_stage_add(x, info, dim)  # (first sight: measured now, learns batchable)
                    return
            self._act_measure([x], [info], dim)
        except Exception as exc:
            self._fail("activations", exc)

    def _act_view_of(self, x: Tensor, info: _ActInfo) -> bool:
        """Whether ``x`` holds exactly the elements of an output measured at the end of
        this forward (same memory, numel and dtype, both contiguous, not changed since):
        its statistics are then that output's, given to ``info`` too (no new passes)."""
        src = self._act_where.get((x.data_ptr(), x.device))
        if src is None:
            return False
        sinfo, version, numel, dtype, _ = src
        if (x._version != version or x.numel() != numel or x.dtype != dtype or sinfo.sat != info.sat
                or sinfo is info or not x.is_contiguous()):
            return False
        self._act_alias.setdefault(id(sinfo), []).append(info)
        return True

    def _act_waits(self, x: Tensor, info: _ActInfo, lean: bool) -> None:
        """Note where an output measured later lies (see _act_view_of)."""
        if x.is_contiguous():
            self._act_where[(x.data_ptr(), x.device)] = (info, x._version, x.numel(), x.dtype, lean)

    def _act_measured(self, lean: bool) -> None:
        """The waiting outputs of one kind (lean or staged) are being measured: views
        of them found later cannot wait for them."""
        where = self._act_where
        if where:
            self._act_where = {k: v for k, v in where.items() if v[4] != lean}

    def _act_views(self, info: _ActInfo, row: Tensor) -> None:
        """``row``, the statistics of ``info``'s output, are also its views' (pending)."""
        for other in self._act_alias.pop(id(info), ()):
            self._pending.append((self.step, other.keys[:len(act_probe.STAT_NAMES)], row))

    def _act_stage_add(self, x: Tensor, info: _ActInfo, dim: int) -> None:
        """Small outputs are measured together at the end of the forward (one set of
        kernels per shape, see act_probe.row_stats). A tensor changed in place after
        its module returned (an in-place activation next) must not be measured late:
        its version is checked then; the first traced forward measures everything at
        once and learns which modules are safe to stage."""
        if info.batchable is None:  # first sight: measured now, staged only to learn
            self._act_measure([x], [info], dim)
        if self._act_staged + x.numel() > ACT_STAGE_MAX_NUMEL:
            # Measured before it grows past the bound, so a group always fits the kept
            # buffers (Scratch(ACT_STAGE_MAX_NUMEL)): one row over, and the stacked copy
            # and its temporary were fresh 4 MB allocations, written at page-fault speed
            # (a 20-layer MLP's `full` step spent ~2 ms there).
            self._act_flush_stage()
        self._act_stage.append((x.detach(), x._version, info, dim))
        self._act_staged += x.numel()
        if info.batchable:
            self._act_waits(x, info, False)

    def _act_lean_add(self, x: Tensor, info: _ActInfo, dim: int) -> None:
        """A CPU output reduced now, while it is still in cache: its sum, sum of squares,
        non-zero (and saturation) counts and per-unit activity, a few kernels with no
        copy; the statistics are finished for all such outputs of the forward at once
        (_act_flush_lean: one read, the host arithmetic of act_probe.finish_raw)."""
        x2 = x.detach().reshape(1, -1)
        n = x2.shape[1]
        c = self._scratch.get(2, 1, n, x2)
        if c is None:
            c = torch.empty_like(x2)
        parts = [x2.sum(1), torch.linalg.vector_norm(x2, 2, dim=1), torch.ne(x2, 0.0, out=c).sum(1)]
        sat = act_probe.saturation_count(x2, info.sat, c)
        if sat is not None:
            parts.append(sat)
        active = act_probe.active_units(x, dim) if info.wants_dead and x.dim() else None
        self._act_lean.append((x2, x._version, info, parts, active))
        self._act_leaned += n
        self._act_waits(x, info, True)
        if self._act_leaned > ACT_LEAN_MAX_NUMEL:
            self._act_flush_lean()

    def _act_flush_lean(self) -> None:
        lean = self._act_lean
        if not lean:
            return
        self._act_lean, self._act_leaned = [], 0
        self._act_measured(True)
        try:
            vals = act_probe.cpu_values(torch.cat([t for e in lean for t in e[3]]))
            rows: list[float] = []
            i = 0
            for x2, version, info, parts, _ in lean:
                k = len(parts)
                row = act_probe.finish_raw(vals[i:i + k], x2.shape[1], info.sat)
                i += k
                if row is None:  # NaN/Inf or ill-conditioned: the exact passes, on the output itself
                    if x2._version == version:
                        row = act_probe.cpu_values(act_probe.row_stats(x2, info.sat, self._scratch)[0])
                    else:  # changed in place since (a path not seen before): measured at once from now on
                        info.batchable = False
                        row = [_NAN] * len(act_probe.STAT_NAMES)
                rows.extend(row)
                if self._act_alias and id(info) in self._act_alias:
                    self._act_views(info, torch.tensor(row, dtype=torch.float32))
            gid = tuple(id(e[2]) for e in lean)
            keys = self._act_group_keys.get(gid)
            if keys is None:
                if len(self._act_group_keys) > 1024:
                    self._act_group_keys.clear()
                keys = self._act_group_keys[gid] = [k for e in lean for k in e[2].keys[:len(act_probe.STAT_NAMES)]]
            self._pending.append((self.step, keys, torch.tensor(rows, dtype=torch.float32)))
            # Dead units: the activity masks of a forward's outputs with the same number
            # of units, one window per such group of modules.
            by_units: dict[int, list[tuple[_ActInfo, Tensor]]] = {}
            for _, _, info, _, active in lean:
                if active is not None:
                    by_units.setdefault(active.numel(), []).append((info, active))
            for members in by_units.values():
                gkey = ("lean",) + tuple(id(i.module) for i, _ in members)
                dead = self._dead_groups.get(gkey)
                if dead is None:
                    if len(self._dead_groups) > 1024:
                        self._dead_groups.clear()
                    dead = self._dead_groups[gkey] = act_probe.DeadUnits()
                frac = dead.push(torch.stack([a.reshape(-1) for _, a in members]))
                dkeys = self._act_group_keys.get(gkey)
                if dkeys is None:
                    dkeys = self._act_group_keys[gkey] = [i.keys[-1] for i, _ in members]
                self._pending.append((self.step, dkeys, frac))
        except Exception as exc:
            self._fail("activations", exc)

    def _act_flush_stage(self) -> None:
        stage = self._act_stage
        if not stage:
            return
        self._act_stage, self._act_staged = [], 0
        self._act_measured(False)
        groups: dict[tuple, list[tuple[Tensor, _ActInfo]]] = {}
        for x, version, info, dim in stage:
            unchanged = x._version == version
            if info.batchable is None:  # its first forward: already measured, now learnt
                info.batchable = unchanged
                continue
            if not unchanged:
                # Changed in place since its module returned (a path not seen before):
                # this forward's stats for it are lost; measured at once from now on.
                info.batchable = False
                continue
            key = (x.shape, x.dtype, x.device, info.sat, info.wants_dead, dim)
            groups.setdefault(key, []).append((x, info))
        for (_, dtype, device, _, _, dim), members in groups.items():
            try:
                if len(members) == 1 and LEAN_PATH and dtype == torch.float32 and device.type == "cpu":
                    # Nothing to share kernels with: its few sums now, finished with the
                    # lean outputs' (one read for all; a measurement of its own cost
                    # ~15 small ops, ~80 us for a 128x10 logits output).
                    self._act_lean_add(members[0][0], members[0][1], dim)
                    continue
                self._act_measure([x for x, _ in members], [i for _, i in members], dim)
            except Exception as exc:
                self._fail("activations", exc)

    def _act_measure(self, xs: list[Tensor], infos: list[_ActInfo], dim: int) -> None:
        """Stats of module outputs of one shape (and dead-unit fractions): pending."""
        X = act_probe.stack_rows(xs, self._scratch)
        st = act_probe.row_stats(X, infos[0].sat, self._scratch)
        if infos[0].wants_dead:
            shape = xs[0].shape
            if len(xs) == 1:
                name = infos[0].name
                dead = self._dead.get(name)
                if dead is None:
                    dead = self._dead[name] = act_probe.DeadUnits()
                frac = dead.update(xs[0], dim).reshape(1)
            else:  # a window per group of modules (the same modules each step)
                gkey = tuple(id(i.module) for i in infos)
                dead = self._dead_groups.get(gkey)
                if dead is None:
                    if len(self._dead_groups) > 1024:
                        self._dead_groups.clear()
                    dead = self._dead_groups[gkey] = act_probe.DeadUnits()
                frac = dead.push(act_probe.batch_active_units(X, shape, dim))
            st = torch.cat([st, frac.reshape(-1, 1).to(st.dtype)], 1)
        if self._act_alias:
            for i, info in enumerate(infos):
                if id(info) in self._act_alias:
                    self._act_views(info, st[i, :len(act_probe.STAT_NAMES)])
        if len(infos) == 1:
            self._pending.append((self.step, infos[0].keys, st[0]))
            return
        gid = tuple(id(i) for i in infos)
        keys = self._act_group_keys.get(gid)
        if keys is None:
            if len(self._act_group_keys) > 1024:
                self._act_group_keys.clear()
            keys = self._act_group_keys[gid] = [k for i in infos for k in i.keys]
        self._pending.append((self.step, keys, st.reshape(-1)))

    # ------------------------------------------------------------- backward
    def _on_backward_start(self, tensor: Any) -> None:
        # Read before the backward, which frees what the autograd node saved.
        self._loss_div = _loss_divisor(tensor)
        if self._loss_probe_step != self.step and self._scheduled(self.step):
            try:
                self._probe_loss_graph(tensor)
            except Exception as exc:
                self._fail("loss_graph", exc)
        for o in self._opts.values():
            if o.zstate is not None:
                self._zero_watch(o)

    def _zero_watch(self, o: _Opt) -> None:
        """A backward begins: has ``o``'s gradient been cleared (set to None, zeroed in
        place, replaced) since its step, or since the last backward? Identity and version
        counter of one gradient tensor: no value is read, no sync. Cleared at any point
        before ``o``'s next step: fresh (a GAN's D gets G's backward first, then its own
        zero_grad); never: stale, the next step adds the old gradients in."""
        g = o.gparam.grad if o.gparam is not None else None
        state = (id(g), g._version) if g is not None else None
        if state != o.gstate or state is None:
            o.zstate = "fresh"
        elif o.zstate == "old":
            o.zstate = "stale"

    def _zero_seen(self, o: _Opt) -> None:
        """Remember the watched gradient as it is now (after a backward, or a step)."""
        g = o.gparam.grad if o.gparam is not None else None
        o.gstate = (id(g), g._version) if g is not None else None

    def _on_backward_end(self, tensor: Any, seed: Any = None) -> None:
        for o in self._opts.values():
            if o.zstate is not None:
                self._zero_seen(o)
        last = self._last_forward
        if last is not None and last[1]:
            self._eval_step = last[0]  # backpropagated: this eval-mode forward trains
        if not self._owns_backward():
            return  # another watch's model (two models trained in turn)
        if (isinstance(tensor, (list, tuple)) and tensor
                and all(isinstance(t, Tensor) and t.numel() == 1 and t.is_floating_point() for t in tensor)):
            # torch.autograd.backward([loss_a, loss_b]): the gradient of their sum (of
            # their sum weighted by one-element grad_tensors); on their device, no sync
            parts = [t.detach().reshape(()).float() for t in tensor]
            if seed is not None:
                seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
                if len(seeds) != len(parts) or not all(isinstance(g, Tensor) and g.numel() == 1 for g in seeds):
                    parts = []
                else:
                    parts = [t * g.detach().reshape(()).float().to(t.device) for t, g in zip(parts, seeds)]
            tensor = torch.stack([p.to(parts[0].device) for p in parts]).sum() if parts else None
        if (isinstance(tensor, Tensor) and tensor.numel() == 1 and tensor.is_floating_point()
                and not self._explicit_loss and not self._closure_measured):
            loss = tensor.detach()
            if loss.dim():
                loss = loss.reshape(())
            scaled, self._scaled_loss = self._scaled_loss, None
            div = self._loss_div
            if scaled is not None and scaled[0] is tensor:
                loss = scaled[1].reshape(())  # GradScaler: the user's loss, not loss * 65536
                div = scaled[2]
            if div is not None:
                loss._gv_div = div  # (ours: a detached copy) see _step_loss
            if self._saw_forward:
                loss._gv_fwd = self._forwards  # see _step_loss
            self._losses.append(loss)
            if len(self._losses) > MAX_STEP_LOSSES:
                del self._losses[0]
        if self._closure_step is not None:
            # LBFGS & co.: the closure's first backward holds the step's gradient at its
            # starting weights (what the optimizer's pre-hook would see without a closure).
            o, self._closure_step = self._closure_step, None
            self._closure_measured = True
            self._measure_and_flush(o)
            return
        if self._backward_mode():
            self._manual_update_ratio()
            self._measure_and_flush(None)
            if self._scheduled(self.step):
                with torch.no_grad():
                    named = [(n, p) for m in self.models for n, p in m.params if p.requires_grad]
                    params = [p for _, p in named]
                    if params:
                        self._manual_before = ([n for n, _ in named], params,
                                               torch._foreach_mul([p.detach() for p in params], 1.0),
                                               fused_norms([p.detach() for p in params]))
            self._advance()

    def _manual_update_ratio(self) -> None:
        """No optimizer (``p.data.add_(p.grad, alpha=-lr)``): the update is the weight
        change between two backward passes, recorded for the step that made it."""
        if self._manual_before is None:
            return
        names, params, before, wnorm = self._manual_before
        self._manual_before = None
        with torch.no_grad():
            dnorm = fused_norms(torch._foreach_sub([p.detach() for p in params], before))
        self._pending.append((self.step - 1, ["update_ratio/" + n for n in names], dnorm / wnorm.clamp_min(1e-12)))

    # ------------------------------------------------------------ GradScaler
    def _on_loss_scaled(self, scaled: Any, scaler: Any, loss: Any = None) -> None:
        """``scaler.scale(loss)``: the backward of ``scaled`` is the user's ``loss``. Kept
        as given (not ``scaled / scale``: a large scale can overflow ``scaled`` to Inf
        while the scaled gradients stay finite and the step is taken)."""
        if (isinstance(scaled, Tensor) and scaled.numel() == 1 and isinstance(loss, Tensor)
                and loss.numel() == 1 and loss.is_floating_point()):
            self._scaled_loss = (scaled, loss.detach(), _loss_divisor(loss))

    def _on_scaler_step_begin(self, optimizer: Any) -> None:
        self._scaler_pre_calls = self._pre_hook_calls

    def _on_scaler_step_end(self, optimizer: Any) -> None:
        """The scaler skipped ``optimizer.step()`` (inf/NaN in the fp16 gradients): an
        expected overflow, not a step and not a NaN. Forget what this iteration left."""
        if self._pre_hook_calls != self._scaler_pre_calls:
            return
        self._losses = []
        o = self._opts.get(id(optimizer))
        if o is not None:
            o.preclip = None
        self._pending = [item for item in self._pending if item[1][0] != "clip_total_norm"]
        n = int(self.record.run.get("amp_skipped_steps", 0)) + 1
        self.record.run["amp_skipped_steps"] = n
        if n == 1:
            self.record.event("amp_skipped_step", step=self.step)

    def _probe_loss_graph(self, tensor: Any) -> None:
        """Once per scheduled step, at its first backward: is a loss in this backward's
        graph given what it computes itself (a softmax into cross_entropy)? Counted at
        the step (_count_wrong_losses); a metric computed aside is in no backward's graph."""
        self._loss_probe_step = self.step
        self._wrong_hits |= loss_graph.wrong_loss_inputs(tensor)
        self._loss_probed = True

    def _count_wrong_losses(self) -> None:
        """A step whose loss graph was probed: one event per wrong loss and segment
        (k-fold: per fold), counting the probed steps it was seen at (``steps``) and the
        probed steps since it was first seen (``checked``)."""
        for loss_fn, made_by, classes in self._wrong_hits:
            key = (loss_fn, made_by, self._segments)
            if key not in self._loss_inputs:
                self._loss_inputs[key] = self.record.event(
                    "loss_on_probabilities", step=self.step, loss=loss_fn, input_from=made_by,
                    classes=classes, steps=0, checked=0)
        hits = {(f, m, self._segments) for f, m, _ in self._wrong_hits}
        for key, ev in self._loss_inputs.items():
            if key[2] == self._segments and ev.get("last_step") != self.step:
                ev["checked"] += 1
                if key in hits:
                    ev["steps"] += 1
                ev["last_step"] = self.step
        self._wrong_hits = set()
        self._loss_probed = False

    def _on_autograd_grad(self, outputs: Any, inputs: Any, seed: Any) -> None:
        """``torch.autograd.grad(loss, params)`` with parameters an optimizer holds: the
        loss of a loop that sets ``p.grad`` itself. Used only for a step that ran no
        backward (a gradient penalty, a meta-learning inner step, go with one)."""
        if seed is not None or self._explicit_loss or not self._owns_backward():
            return
        outs = [outputs] if isinstance(outputs, Tensor) else list(outputs) if isinstance(outputs, (list, tuple)) else []
        if not outs or not all(isinstance(t, Tensor) and t.numel() == 1 and t.is_floating_point() for t in outs):
            return
        ins = [inputs] if isinstance(inputs, Tensor) else list(inputs) if isinstance(inputs, (list, tuple)) else []
        ids = set()
        for o in self._opts.values():
            opt = o.ref()
            if opt is not None:
                ids.update(id(p) for g in opt.param_groups for p in g["params"])
        if not any(id(t) in ids for t in ins):
            return
        loss = outs[0].detach().reshape(()).float()
        if len(outs) > 1:
            loss = torch.stack([t.detach().reshape(()).float().to(loss.device) for t in outs]).sum()
        self._grad_losses.append(loss)
        if len(self._grad_losses) > MAX_STEP_LOSSES:
            del self._grad_losses[0]

    def _owns_backward(self) -> bool:
        """With several recorders at once every backward() reaches all of them: it belongs
        to those whose model ran a training forward since their last step (or that never
        see their root's forward, e.g. submodules called directly: then all)."""
        return self._forward_since_flush or not self._saw_forward or len(patches.active()) < 2

    def _backward_mode(self) -> bool:
        """No optimizer to mark steps: each backward is a step."""
        return not self._opts and not self._optimizer_seen and bool(self.models)

    def log_loss(self, loss: Any) -> None:
        """Record this step's loss explicitly (disables the automatic capture)."""
        self._explicit_loss = True
        if isinstance(loss, Tensor):
            self._losses.append(loss.detach().reshape(-1)[0].float())
        else:
            self._losses.append(torch.tensor(float(loss)))

    # ------------------------------------------------------------- clipping
    def _on_clip_start(self, parameters: list, max_norm: float) -> None:
        ids = {id(p) for p in parameters[:4]}
        for o in self._opts.values():
            opt = o.ref()
            if opt is None:
                continue
            self._opt_params(o, opt)
            if any(id(p) in ids for p in o.params):
                o.preclip = self._grad_norms(o)

    def _on_clip_end(self, total: Any, max_norm: float) -> None:
        if not isinstance(total, Tensor):
            return
        if not math.isfinite(float(max_norm)):
            return  # clip_grad_norm_(params, inf) only measures (HF max_grad_norm=0): nothing clips
        t = total.detach().float().reshape(1)
        clipped = (t > float(max_norm)).float()
        self._pending.append((self.step, ["clip_total_norm", "clip_clipped"], torch.cat([t, clipped])))
        self.record.add("clip_max_norm", self.step, float(max_norm))

    # ------------------------------------------------------------ optimizer
    def _opt_pre_hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            o = self._opts.get(id(opt))
            if o is None:
                return
            self._optimizer_seen = True
            self._pre_hook_calls += 1
            if len(self._opts) > 1:  # a dead one can only be another optimizer
                self._drop_dead_optimizers()
            if id(opt) in self._stepped:  # a new cycle began before we learned its end
                if self._cycle_last is None and self._stepped:
                    self._cycle_last = self._stepped[-1]
                self._advance()
            if not o.stepped:
                o.stepped = True
                self._note_segment(opt, o)
            if self._loss_probed:
                self._count_wrong_losses()
            self._stepped.append(id(opt))
            self._last_stepped_call = self._pre_hook_calls
            if self._grad_losses:
                if not self._losses:  # no backward this step: the losses it differentiated
                    self._losses = self._grad_losses
                self._grad_losses = []
            rest = args[1:] if args and args[0] is opt else args  # global hooks get (opt, *args)
            if (rest and callable(rest[0])) or callable(kwargs.get("closure")):
                self._closure_step = o  # measured at the closure's first backward
                o.zstate = None  # the closure clears them after this hook
                return
            if o.zstate == "stale":
                self._note_unzeroed(o)
            o.zstate = None
            if self._eval_step is not None:
                if self._steps_model(opt, self._eval_step):  # not a frozen teacher's forward
                    self._note_eval_step(self._eval_step)
                self._eval_step = None
            if self._unseen_grads and self._scheduled(self.step):
                self._note_unstepped_grads()
            self._measure_and_flush(o)
        except Exception as exc:
            self._fail("gradients", exc)

    def _note_unstepped_grads(self) -> None:
        """Parameters of models no optimizer holds that have a gradient now (a model built
        again after its optimizer, a loss network left trainable): no optimizer measures
        them, so their grad_seen is set here, on scheduled steps only (an attribute read
        per parameter not seen yet; no value read)."""
        for m in self.models:
            for name, p in m.params:
                if id(p) in self._unseen_grads and p.grad is not None:
                    info = self.record.params.get(name)
                    if info is not None and info.in_optimizer is False:
                        self._unseen_grads.discard(id(p))
                        info.grad_seen = True

    @staticmethod
    def _steps_model(opt: torch.optim.Optimizer, model: _Model) -> bool:
        """Whether ``opt`` updates some parameter of ``model``."""
        mine = {id(p) for _, p in model.params}
        return any(id(p) in mine for g in opt.param_groups for p in g["params"])

    def _note_eval_step(self, model: _Model) -> None:
        """A step trained on a forward run in eval mode, by a model that trained in train
        mode before (a model.eval() for validation and no model.train() after it)."""
        ev = model.eval_steps
        if ev is None:
            ev = model.eval_steps = self.record.event("eval_mode_training", step=self.step, model=model.label,
                                                      steps=0, evaluated_first=not model.train_mode_seen)
        if ev.get("last_step") != self.step:  # several optimizers of one step count once
            ev["steps"] += 1
            ev["last_step"] = self.step

    def _note_unzeroed(self, o: _Opt) -> None:
        """This step of ``o`` adds the gradients its previous step used: nothing cleared
        them (no zero_grad) before the backward of this one."""
        ev = o.unzeroed
        if ev is None:
            opt = o.ref()
            ev = o.unzeroed = self.record.event("grad_not_zeroed", step=self.step, optimizer=o.label,
                                                optimizer_kind=type(opt).__name__ if opt is not None else None,
                                                steps=0)
        ev["steps"] += 1
        ev["last_step"] = self.step

    def _note_segment(self, opt: torch.optim.Optimizer, o: _Opt) -> None:
        """An optimizer's first step. When every model it trains is new and other models
        were trained before it (k-fold cross-validation, restarts from scratch, a second
        stage trained on its own), the run-level series (loss, global gradient norm, lr)
        start over here: a ``segment`` event marks the step, and the rules judge each
        segment on its own (diagnose.py) instead of reading one fold's restart as the
        previous fold's loss going back up. Models trained together (a GAN's two players,
        a new optimizer for layers of a model already training) start no segment."""
        owners = self._param_owner
        models: dict[int, _Model] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                owner = owners.get(id(p))
                if owner is not None and owner[0].module is not None:
                    models[id(owner[0].module)] = owner[0]
        if not models:
            return
        trained = self._trained_models
        fresh = not any(k in trained and trained[k]() is not None for k in models)
        if self.step > 0 and trained and fresh:
            if self._stepped and o.registered_at >= self._last_stepped_call:
                # Created after the open step's optimizers stepped: that step (the previous
                # segment's last; its optimizer is alive, so the cycle never saw it end) is
                # over. (One created before them steps within their step: a model joining.)
                self._advance()
                self._cycle_last = None
            self.record.event("segment", step=self.step, models=sorted(m.label for m in models.values()))
            self._segments += 1
            self._retire_finished(models)
        for k, m in models.items():
            trained[k] = weakref.ref(m.module)

    def _retire_finished(self, starting: dict[int, _Model]) -> None:
        """At a segment's start: stop holding the models no live optimizer trains any
        more (the folds before). Their record stays; the modules, their gradients and
        last inputs are the user's again to free (k folds of a large model would
        otherwise all stay in memory until the script ends)."""
        live: set[int] = set()
        for other in self._opts.values():
            ref = other.ref()
            if ref is not None:
                live.update(id(p) for g in ref.param_groups for p in g["params"])
        for m in list(self.models):
            if id(m.module) in starting or any(id(p) in live for _, p in m.params):
                continue
            self.remove_model(m.module)
            for _, p in m.params:
                self._param_owner.pop(id(p), None)
            self._act_infos.clear()
            m.last_inputs = None
            if self.on_retire is not None:
                self.on_retire(m)
            self.record.event("model_released", step=self.step, model=m.label)

    def _drop_dead_optimizers(self) -> None:
        """An optimizer re-created every epoch (``opt = SGD(model.parameters(), lr)`` in
        the epoch loop): the garbage one must not keep claiming the parameters, split
        the loss series (``loss/opt1``) or hold a place in the step cycle."""
        dead = [k for k, o in self._opts.items() if o.ref() is None]
        if not dead:
            return
        for k in dead:
            del self._opts[k]
        for i, o in enumerate(sorted(self._opts.values(), key=lambda o: o.index)):
            o.index, o.label = i, ("opt" if i == 0 else f"opt{i}")
        self._stepped = [k for k in self._stepped if k in self._opts]
        if self._cycle_last not in self._opts:
            self._cycle_last = None
        self._version += 1

    def _opt_post_hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            o = self._opts.get(id(opt))
            if o is None:
                return
            self._closure_measured = False
            if self._closure_step is o:  # a closure that never called backward
                self._closure_step = None
                self._measure_and_flush(o)
            else:  # watch whether its gradients get cleared before its next step
                if o.gparam is None or o.gparam.grad is None:
                    o.gparam = next((p for g in opt.param_groups for p in g["params"] if p.grad is not None), None)
                self._zero_seen(o)
                o.zstate = "old" if o.gstate is not None else None
            o.preclip = None  # a clip after the measurement (Lightning) must not leak into the next step
            if o.before is not None:
                keys, before, wnorm = o.before
                o.before = None
                with torch.no_grad():
                    # In place into the snapshot (ours): before - after has the same norm
                    # as after - before, without allocating a second copy.
                    torch._foreach_sub_(before, [p.detach() for p in o.params])
                    dnorm = torch.stack(foreach_norm(before)) if o.fast else fused_norms(before)
                    ratio = dnorm / wnorm.clamp_min(1e-12)
                self._pending.append((self.step, keys, ratio))
            if len(self._opts) == 1 or self._cycle_last == id(opt):
                self._advance()
            elif self._cycle_last is None and set(self._stepped) >= {
                    k for k, other in self._opts.items() if other.ref() is not None}:
                # every optimizer has stepped once: this one ends the step (else a clip
                # or a loss of the next step would be recorded one step too early)
                self._cycle_last = id(opt)
                self._advance()
        except Exception as exc:
            self._fail("update_ratio", exc)

    # ------------------------------------------- driven by a training framework
    def step_begin(self, optimizer: torch.optim.Optimizer, *, sum_losses: bool = False) -> None:
        """``optimizer`` is about to step with this step's final gradients: the work of
        its step pre-hook. For frameworks whose ``optimizer.step(closure)`` runs forward
        and backward inside the step (Lightning), where the pre-hook would still see the
        previous step's gradients; such optimizers are added without hooks.
        ``sum_losses``: the trainer divided each accumulation micro-batch's loss so that
        they add up to the step's loss (HF Trainer); add them instead of averaging."""
        self.add_optimizer(optimizer, local_hooks=False)  # idempotent
        if sum_losses and len(self._losses) > 1:
            self._losses = [torch.stack([l.to(self._losses[0].device) for l in self._losses]).sum()]
        self._opt_pre_hook(optimizer, (), {})

    def step_end(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer`` has stepped: the work of its step post-hook."""
        self._opt_post_hook(optimizer, (), {})

    def _advance(self) -> None:
        self._stepped = []
        self.step += 1
        self.record.steps = self.step
        if self.autosave is not None:
            self.autosave.tick(self)  # a clock read; a snapshot when one is due (never raises)

    # ------------------------------------------------------ measure + sync
    def _grad_norms(self, o: _Opt | None) -> tuple[list[str], Any] | None:
        """(keys, per-parameter norms: a float32 vector, or a list of 0-d tensors on
        the fast path, stacked with the step's other scalars in _flush)."""
        if o is None:
            params = [p for m in self.models for _, p in m.params if p.requires_grad]
            names = [n for m in self.models for n, p in m.params if p.requires_grad]
            keys = ["grad_norm/" + n for n in names]
        else:
            params, keys = o.params, o.keys
        grads = [p.grad for p in params]
        if self._unseen_grads:
            for p in params:
                if p.grad is not None and id(p) in self._unseen_grads:
                    self._unseen_grads.discard(id(p))
                    self.record.params[self._param_owner[id(p)][1]].grad_seen = True
        complete = True
        for g in grads:
            if g is None:
                complete = False
                break
        if complete and o is not None and o.fast:
            # The steady state: every parameter has a dense gradient on one device in
            # one dtype (checked when the parameter list was built). One fused kernel.
            try:
                return keys, foreach_norm(grads)  # 0-d each: stacked with the step's scalars
            except Exception:  # a gradient unlike its parameter (dtype, layout): general path
                o.fast = False
        if not complete:
            present = [(g, k) for g, k in zip(grads, keys) if g is not None]
            if not present:
                return None
            grads = [g for g, _ in present]
            keys = [k for _, k in present]
        return keys, fused_norms(grads)

    def _ring_push(self, tkeys: tuple[str, ...], row_series: list[Series], step: int, vals: list[float]) -> None:
        """A step's per-parameter gradient norms (already fetched) wait on the host; every
        RING_STEPS steps each parameter's series takes them in one extend: the Python
        work per value on the step's path becomes a list append per step."""
        entry = self._ring.get(tkeys)
        if entry is not None and entry[0][-1] >= step:  # the same step again (a closure): in order
            self._drain_ring()
            entry = None
        elif entry is None and self._ring:
            # A new set of keys (e.g. some gradients missing this step) sharing series with
            # one waiting: that one first, so every series gets its steps in order.
            ids = {id(x) for x in row_series}
            if any(id(x) in ids for e in self._ring.values() for x in e[2]):
                self._drain_ring()
        if entry is None:
            entry = self._ring[tkeys] = ([], [], row_series)
        entry[0].append(step)
        entry[1].append(vals)
        self._ring_rows += 1
        if self._ring_rows >= RING_STEPS * len(self._ring):  # ~RING_STEPS steps of each
            self._drain_ring()

    def _drain_ring(self) -> None:
        """Append what waits in the ring (no device access)."""
        if not self._ring_rows:
            return
        ring, self._ring, self._ring_rows = self._ring, {}, 0
        for steps, rows, row_series in ring.values():
            for s, col in zip(row_series, zip(*rows)):
                s.extend(steps, list(col))

    def sync(self) -> None:
        """Bring the record up to date: append the recent steps' per-parameter gradient
        norms that wait in the ring (values pending for the current step stay so)."""
        try:
            self._drain_ring()
        except Exception as exc:
            self._fail("flush", exc)

    def _measure_and_flush(self, o: _Opt | None) -> None:
        if o is not None and FAST_PATH and self._measure_fast(o):
            return
        step = self.step
        if o is not None:
            opt = o.ref()
            self._opt_params(o, opt)
            measured = o.preclip or self._grad_norms(o)
            o.preclip = None
            groups = opt.param_groups
            if len(o.lr_keys) != len(groups):
                o.lr_keys = [f"lr/{o.label}.{i}" for i in range(len(groups))]
            lrs = [(k, g.get("lr")) for k, g in zip(o.lr_keys, groups)]
        else:
            measured = self._grad_norms(None)
            lrs = []
        if measured is not None:
            # The global norm is taken on the host from the fetched per-parameter norms
            # (see _flush); several optimizers of a step add up there.
            self._pending.append((step, measured[0], measured[1]))
        loss_key = "loss" if o is None or o.index == 0 else f"loss/{o.label}"
        self._forward_since_flush = False
        if self._losses:
            losses = self._losses
            self._losses = []
            loss = losses[0] if len(losses) == 1 else _step_loss(losses)
            if loss.dtype != torch.float32:
                loss = loss.float()
            if o is not None:
                if o.loss_keys[0] != loss_key:
                    o.loss_keys = [loss_key]
                lkeys = o.loss_keys
            else:
                lkeys = [loss_key]
            self._pending.append((step, lkeys, [loss]))
        series = self.record.series
        plain_lrs = o is not None and self._tb is None and self._dist is None
        for key, lr in lrs:
            if isinstance(lr, Tensor):
                self._pending.append((step, [key], [lr.detach().float().reshape(())]))
                plain_lrs = False
                if self._ring_rows:
                    self._drain_ring()  # earlier float values of this lr may wait there
        if plain_lrs and all(isinstance(lr, (int, float)) for _, lr in lrs):
            # Python floats: to the ring with the gradient norms (appended in bulk).
            if len(o.lr_series) != len(lrs) or o.lr_series_of is not series:
                o.lr_series = [series.get(k) or series.setdefault(k, Series(self.record.cap)) for k, _ in lrs]
                o.lr_series_of = series
            self._ring_push(tuple(o.lr_keys), o.lr_series, step, [float(lr) for _, lr in lrs])
        else:
            for key, lr in lrs:
                if lr is not None and not isinstance(lr, Tensor):
                    self._drain_ring()  # in order after what waits there
                    s = series.get(key)
                    if s is None:
                        s = series[key] = Series(self.record.cap)
                    s.append(step, float(lr))
        if o is not None and self._scheduled(step) and o.params:
            with torch.no_grad():
                weights = [p.detach() for p in o.params]
                wnorm = torch.stack(foreach_norm(weights)) if o.fast else fused_norms(weights)
                if len(o.wkeys) != len(o.names):
                    o.wkeys = ["weight_norm/" + n for n in o.names]
                    o.ukeys = ["update_ratio/" + n for n in o.names]
                self._pending.append((step, o.wkeys, wnorm))
                o.before = (o.ukeys, self._snapshot(o, weights), wnorm)
        self._flush()

    def _measure_fast(self, o: _Opt) -> bool:
        """The steady state of a run, in one pass: an unscheduled step, every parameter
        with a dense gradient on one device (``o.fast``), Python-float learning rates, at
        most one loss, nothing else pending, no TensorBoard, no process group. Does
        exactly what :meth:`_measure_and_flush` + :meth:`_flush` do for such a step
        (tested record for record against them) without their general bookkeeping.
        Returns False, having changed nothing, when the step is not such a step (the
        first step of a parameter set always goes the general way: it builds the rows)."""
        step = self.step
        losses = self._losses
        rows = self._rows
        if (self._pending or o.preclip is not None or self._tb is not None or self._dist is not None
                or self._unseen_grads or len(losses) > 1 or self._scheduled(step)
                or self._rows_of is not self.record.series):
            return False
        opt = o.ref()
        self._opt_params(o, opt)
        grow = rows.get(o.tkeys)
        if not o.fast or grow is None:
            return False
        groups = opt.param_groups
        if (len(o.lr_keys) != len(groups) or len(o.lr_series) != len(groups)
                or o.lr_series_of is not self.record.series):
            return False
        lrs = []
        for g in groups:
            lr = g.get("lr")
            if type(lr) is not float and type(lr) is not int:
                return False
            lrs.append(float(lr))
        grads = [p.grad for p in o.params]
        for g in grads:
            if g is None:
                return False
        lrow = None
        if losses:
            loss = losses[0]
            if (loss.dtype != torch.float32 or loss.device != grads[0].device
                    or o.loss_keys[0] != ("loss" if o.index == 0 else f"loss/{o.label}")):
                return False
            lrow = rows.get(tuple(o.loss_keys))
            if lrow is None:
                return False
        if distributed.initialized():
            return False
        try:
            norms = foreach_norm(grads)
        except Exception:  # a gradient unlike its parameter (dtype, layout): general path
            o.fast = False
            return False
        # From here on this step is measured here, in the general path's order.
        self._forward_since_flush = False
        if losses:
            self._losses = []
            norms = [*norms, loss]
        self._ring_push(tuple(o.lr_keys), o.lr_series, step, lrs)
        if grads[0].is_cpu:  # in host memory already: read where they are, no stack
            values = _cpu_floats(norms)
        else:
            values = torch.stack(norms).tolist()  # THE host sync of the step
        n = len(grads)
        vals = values[:n] if losses else values
        lossv = values[n] if losses else 0.0
        total = math.hypot(*vals)
        if not (math.isfinite(total) and math.isfinite(lossv)):
            # A NaN/Inf: the general path's handling (the global norm, the culprits,
            # the origin search), fed the values just fetched (float32: the same values).
            self._pending.append((step, o.keys, torch.tensor(vals, dtype=torch.float32)))
            if losses:
                self._pending.append((step, o.loss_keys, [torch.tensor(lossv, dtype=torch.float32)]))
            self._flush()
            return True
        self._add_global_norm(step, vals, [], total)
        self._ring_push(o.tkeys, grow[0], step, vals)
        if lrow is not None:
            for s in lrow[0]:
                s.append(step, lossv)
        if self.progress is not None:
            self.progress.update(self.record)  # reads the values just fetched; never raises
        return True

    def _flush(self) -> None:
        """THE host sync of the step: one transfer per device of everything pending."""
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        if self._dist is not None or distributed.initialized():
            pending = [(st, k, torch.stack(t) if isinstance(t, list) else t) for st, k, t in pending]
            pending = distributed.merge_pending(self, pending)  # multi-rank: global values, one all-reduce
            ring = False
        else:  # no process group: no DTensor either (FSDP2 needs one, even on one rank)
            ring = self._tb is None
        dev0 = _device(pending[0][2])
        one_device = True
        for item in pending:
            if _device(item[2]) != dev0:
                one_device = False
                break
        if one_device:
            groups = [pending]
        else:
            by_device: dict[torch.device, list[tuple[int, list[str], Any]]] = {}
            for item in pending:
                by_device.setdefault(_device(item[2]), []).append(item)
            groups = list(by_device.values())
        nonfinite: list[tuple[int, str, float]] = []
        if self._rows_of is not self.record.series:  # renamed series (a second model): rebuild
            self._rows = {}
            self._rows_of = self.record.series
        rows = self._rows
        isfinite = math.isfinite
        for items in groups:
            # Scalars (the step's fused norms, loss, lr: lists of 0-d float32 tensors) go
            # in one stack, vectors (scheduled probes, clipping) after them.
            scalars: list[Tensor] = []
            vectors: list[Tensor] = []
            for _, _, t in items:
                if isinstance(t, list):
                    scalars.extend(t)
                else:
                    vectors.append(t.reshape(-1).float())
            if not vectors:
                flat = torch.stack(scalars)
            elif scalars:
                flat = torch.cat([torch.stack(scalars), *vectors])
            else:
                flat = torch.cat(vectors)
            values = flat.tolist()  # host sync (one per device)
            i = 0  # scalar items first, in order, then the vectors
            j = len(scalars)
            for step, keys, t in items:
                n = len(keys)
                if isinstance(t, list):
                    vals = values[i:i + n]
                    i += n
                else:
                    vals = values[j:j + n]
                    j += n
                tkeys = tuple(keys)
                row = rows.get(tkeys)
                if row is None:
                    row = rows[tkeys] = self._row(keys)
                row_series, watched, kind = row
                if kind == _ROW_GRAD:
                    # The global norm from these, now; the values themselves in bulk
                    # later (the ring), unless a NaN/Inf needs them at once.
                    total = self._add_global_norm(step, vals, nonfinite)
                    if ring and isfinite(total):
                        self._ring_push(tkeys, row_series, step, vals)
                        continue
                else:
                    bad = False
                    for k in watched:  # the quantities whose NaN/Inf starts an origin search
                        if not isfinite(vals[k]):
                            nonfinite.append((step, keys[k], vals[k]))
                            bad = True
                    if ring and not bad and kind == _ROW_LATER:  # scheduled probes, clipping
                        self._ring_push(tkeys, row_series, step, vals)
                        continue
                if self._ring_rows and kind != _ROW_NOW:
                    self._drain_ring()  # in order: what waits in the ring comes first
                for s, v in zip(row_series, vals):
                    s.append(step, v)
                if kind == _ROW_GRAD:
                    for k in watched:
                        if not isfinite(vals[k]):
                            nonfinite.append((step, keys[k], vals[k]))
        if self._tb is not None:
            self._write_tensorboard(pending)
        if nonfinite:
            last = max(s for s, _, _ in nonfinite)
            if self._last_nonfinite is None or last > self._last_nonfinite:
                self._last_nonfinite = last
        if nonfinite and not self._origin_done:
            self._origin_done = True
            self._drain_ring()
            try:
                self._locate_origin(nonfinite)
            except Exception as exc:
                self._fail("nonfinite_origin", exc)
        if self.progress is not None:
            self.progress.update(self.record)  # reads the values just fetched; never raises

    def _row(self, keys: list[str]) -> tuple[list[Series], list[int], int]:
        """The series a pending item's values go to (cached per key tuple): no
        per-value dict lookups on the hot path."""
        if len(self._rows) > 4096:  # e.g. a gradient set that changes every step
            self._rows.clear()
        series = self.record.series
        out = []
        for k in keys:
            s = series.get(k)
            if s is None:
                s = series[k] = Series(self.record.cap)
            out.append(s)
        watched = [j for j, k in enumerate(keys) if k.split("/", 1)[0] in _NONFINITE_WATCHED]
        if keys and keys[0].startswith("grad_norm/"):
            kind = _ROW_GRAD
        elif keys and keys[0].startswith(("loss", "lr/")):
            kind = _ROW_NOW  # read every step (the live status line): appended at once
        else:
            kind = _ROW_LATER
        return out, watched, kind

    def _add_global_norm(self, step: int, norms: list[float], nonfinite: list[tuple[int, str, float]],
                         total: float | None = None) -> float:
        """grad_norm_global = sqrt(sum of squared per-parameter norms), in float64 on the
        host; a second optimizer of the same step adds its share (hypot). ``total``: that
        of ``norms``, when the caller has it already."""
        if total is None:
            total = math.hypot(*norms)
        if self._global_step == step:
            total = math.hypot(total, self._global_value)
        self._global_step, self._global_value = step, total
        s = self.record.series.get("grad_norm_global")
        if s is None:
            s = self.record.series["grad_norm_global"] = Series(self.record.cap)
        s.append(step, total)
        if not math.isfinite(total):
            nonfinite.append((step, "grad_norm_global", total))
        return total

    def _snapshot(self, o: _Opt, weights: list[Tensor]) -> list[Tensor]:
        """A copy of the weights before the update (for the update ratio)."""
        if o.fast and weights[0].device.type == "cpu":
            buf = o.snapshot
            if buf is None:
                nbytes = sum(w.numel() * w.element_size() for w in weights)
                if nbytes <= SNAPSHOT_KEEP_BYTES:
                    buf = o.snapshot = [torch.empty_like(w) for w in weights]
            if buf is not None:
                torch._foreach_copy_(buf, weights)
                return buf
        return torch._foreach_mul(weights, 1.0)

    # ------------------------------------------------------- NaN origin
    def _locate_origin(self, seen: list[tuple[int, str, float]]) -> None:
        step = min(s for s, _, _ in seen)
        first = [x for x in seen if x[0] == step]
        value = "nan" if any(math.isnan(v) for _, _, v in first) else "inf"
        event: dict[str, Any] = {"step": step, "seen_in": sorted({k for _, k, _ in first})[:8],
                                 "value": value}
        found = None
        if self.options.nonfinite_origin:
            for model in self.models:
                if model.last_inputs is None:
                    continue
                args, kwargs = model.last_inputs
                target, collective = distributed.replay_plan(self, model.module)
                if target is None:
                    event["replay"] = "skipped: an FSDP forward needs every rank, and not every rank records"
                    continue
                if found is not None and not collective:
                    continue  # found already; an FSDP model is still replayed (the others do)
                if collective:
                    event["replay"] = "every rank (FSDP)"
                res = replay_forward(target, model.names, args, kwargs, collective=collective)
                event["forward_checked"] = True
                if found is None and res is not None:
                    found = res
                    event["source"] = "replay"
        grads = [(k[len("grad_norm/"):], v) for _, k, v in first if k.startswith("grad_norm/")]
        loss_bad = any(k.startswith("loss") for _, k, _ in first)
        if found is None and grads and not loss_bad and event.get("forward_checked"):
            found = self._replay_backward(event)
        if found is None:
            if loss_bad and not event.get("forward_checked"):
                # No forward to replay (none recorded: a functional model, hooks that
                # never ran): the loss may only carry what a weight already held.
                found = self._nonfinite_weight()
                event.setdefault("forward_checked", False)
            if found is not None:
                pass
            elif loss_bad:
                found = {"kind": "loss", "module": None, "value": value}
            elif grads:
                # Backward runs from the output to the input: the deepest layer with a
                # non-finite gradient is where it began.
                def depth(name: str) -> int:
                    layer = self.record.layers.get(self.record.layer_of(name))
                    return layer.depth if layer is not None and layer.depth is not None else -1
                name, v = max(grads, key=lambda g: depth(g[0]))
                found = {"kind": "gradient", "module": self.record.layer_of(name), "param": name,
                         "value": "nan" if math.isnan(v) else "inf"}
                if math.isinf(v) and self._grad_elements_finite(name):
                    # Elements up to ~1e19 are finite, but their float32 norm is not.
                    found["kind"] = "norm_overflow"
            else:
                k = first[0][1]
                name = k.split("/", 1)[1] if "/" in k else None
                found = {"kind": "activation" if k.startswith("act_") else "weight",
                         "module": self.record.layer_of(name) if name else None, "value": value}
            event["source"] = "series"
        event.update(found)
        event.setdefault("op", None)
        # Which pass made it: the backward for gradients born there (replayed or read
        # off the series), the forward (the loss included) for everything else.
        event["phase"] = "backward" if event.get("kind") in ("gradient", "norm_overflow") else "forward"
        module = event.get("module")
        if module and module in self.record.layers:
            event["module_kind"] = self.record.layers[module].kind
        event = distributed.merge_origin(self, event)  # multi-rank: the first bad rank's origin
        self.record.event("nonfinite_origin", **event)

    def _replay_backward(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The forward was finite and a gradient is not: replay each model's last forward
        and its backward from the loss the model returns (probes/nonfinite.py). Not
        under torch.distributed (a replayed backward would need every rank)."""
        if distributed.initialized():
            return None
        for model in self.models:
            if model.last_inputs is None:
                continue
            args, kwargs = model.last_inputs
            self._replaying = True
            try:
                checked, res = replay_backward(model.module, model.names, args, kwargs)
            except Exception as exc:  # e.g. out of memory for a second graph: the series decide
                event["backward_replay_error"] = type(exc).__name__
                return None
            finally:
                self._replaying = False
            event["backward_checked"] = event.get("backward_checked", False) or checked
            if res is not None:
                event["source"] = "replay"
                return res
        return None

    def _nonfinite_weight(self) -> dict[str, Any] | None:
        """The first parameter, in forward order, holding NaN/Inf (one sync per device;
        NaN path only), as an origin; None when every weight is finite."""
        named = [(n, p) for m in self.models for n, p in m.params]
        seen = {id(p) for _, p in named}
        for o in self._opts.values():  # parameters of no module (a functional model)
            named += [(n, p) for n, p in zip(o.names, o.params) if id(p) not in seen]
        named = [(n, p) for n, p in named if not p.is_sparse]
        if not named:
            return None
        with torch.no_grad():
            norms = fused_norms([p.detach() for _, p in named]).tolist()
        bad = [(n, p) for (n, p), v in zip(named, norms) if not math.isfinite(v)]

        def depth(name: str) -> int:
            layer = self.record.layers.get(self.record.layer_of(name))
            return layer.depth if layer is not None and layer.depth is not None else 1 << 30
        for name, p in sorted(bad, key=lambda b: depth(b[0])):
            w = distributed.local_tensors([p.detach()])[0]
            if not bool(torch.isfinite(w).all()):  # not merely a norm past float32's range
                value = "nan" if bool(torch.isnan(w).any()) else "inf"
                layer = self.record.layer_of(name)
                return {"kind": "weight", "module": layer if layer in self.record.layers else name,
                        "param": name, "value": value}
        return None

    def _grad_elements_finite(self, name: str) -> bool:
        """Whether a parameter's gradient holds only finite values (one sync; NaN path only)."""
        for m in self.models:
            for n, p in m.params:
                if n == name and p.grad is not None and not p.grad.is_sparse:
                    return bool(torch.isfinite(p.grad).all())
        return False

    # ---------------------------------------------------------- failures
    def _fail(self, probe: str, exc: BaseException) -> None:
        n = self._errors.get(probe, 0)
        self._errors[probe] = n + 1
        if n == 0:
            log.warning("gradvitals: probe %r failed (%s: %s); training continues", probe,
                        type(exc).__name__, exc)
            self.record.event("probe_error", probe=probe, error=f"{type(exc).__name__}: {exc}",
                              step=self.step)

    # ------------------------------------------------------- TensorBoard
    def _open_tensorboard(self, logdir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise ImportError("tensorboard=... needs the tensorboard package: "
                              "pip install 'gradvitals[tensorboard]'") from exc
        self._tb = SummaryWriter(logdir)

    def _write_tensorboard(self, pending: list[tuple[int, list[str], Tensor]]) -> None:
        fetched = {k for _, keys, _ in pending for k in keys}
        if any(k.startswith("grad_norm/") for k in fetched):
            fetched.add("grad_norm_global")  # computed on the host from those (see _flush)
        for key in ("loss", "grad_norm_global"):
            if key not in fetched:
                continue  # e.g. the last step's update ratios: this step's loss is already logged
            s = self.record.series.get(key)
            if s is not None and s.last_step is not None and math.isfinite(s.last_value):
                self._tb.add_scalar(f"gradvitals/{key}", s.last_value, s.last_step)
        for step, keys, _ in pending:
            for k in keys:
                q = k.split("/", 1)[0]
                if q in ("grad_norm", "update_ratio"):
                    s = self.record.series[k]
                    if math.isfinite(s.last_value):
                        self._tb.add_scalar(f"gradvitals/{k}", s.last_value, step)

    # ------------------------------------------------------------ close
    def finish(self) -> None:
        """Fetch whatever is pending and stamp the run's duration (idempotent)."""
        if self._pending and not distributed.holds_pending(self):
            try:
                self._flush()
            except Exception as exc:
                self._fail("flush", exc)
        self.sync()
        self.stamp(self.record)

    def stamp(self, record: Record) -> None:
        """Write the run's totals so far into ``record`` (this recorder's, or a snapshot of it)."""
        record.run["duration_s"] = round(time.time() - self._started, 3)
        # A step still open (several optimizers, one of them alive but idle: the cycle
        # never saw the last step end) has been taken and recorded: it counts.
        g = record.series.get("grad_norm_global")
        steps = self.step + 1 if self._stepped and g is not None and g.last_step == self.step else self.step
        record.run["steps"] = steps
        record.steps = steps
        if self._last_nonfinite is not None:  # did the run come back from it? (rules/nonfinite.py)
            for ev in record.events_of("nonfinite_origin"):
                ev["last_nonfinite_step"] = self._last_nonfinite
        record.run["devices"] = sorted({str(p.device) for m in self.models for _, p in m.params})

    def close(self) -> None:
        """Remove every hook and patch this recorder installed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.autosave is not None:
            self.autosave.stop()  # no autosave may land after the final report
        self._remove_hooks()
        patches.uninstall(self)
        self.finish()
        if self._tb is not None:
            try:
                from .diagnose import diagnose

                seen: dict[str, int] = {}
                for f in diagnose(self.record):
                    # One tag per finding: a second finding of the same code (two layers
                    # each dying) gets its own tag instead of overwriting the first.
                    n = seen[f.code] = seen.get(f.code, 0) + 1
                    tag = f"gradvitals/{f.code}" if n == 1 else f"gradvitals/{f.code}/{f.layers[0] if f.layers else n}"
                    self._tb.add_text(tag, f"**{f.severity}**: {f.summary}\n\n{f.advice}")
                self._tb.close()
            except Exception as exc:
                self._fail("tensorboard", exc)
            self._tb = None


#: Steps of per-parameter gradient norms (and scheduled values) fetched every step but
#: appended to their series together: one bulk extend per series, not an append per value.
RING_STEPS = 32
#: Recorder._measure_fast on (tests turn it off to compare it with the general path).
FAST_PATH = True
_ROW_GRAD, _ROW_NOW, _ROW_LATER = 0, 1, 2  # how _flush appends a row (see _row)

#: A step's loss is the mean of at most this many backward() losses (the latest):
#: an optimizer that never steps must not hold every loss of the run.
MAX_STEP_LOSSES = 1024
#: Where torch.nn.utils.parametrize keeps a parametrized weight's modules and originals.
_PARAMETRIZATIONS = ".parametrizations."


_NONFINITE_WATCHED = {"loss", "grad_norm", "grad_norm_global", "act_mean", "act_std", "weight_norm",
                      "clip_total_norm"}


def _device(t: Any) -> torch.device:
    return t[0].device if isinstance(t, list) else t.device


def _loss_divisor(t: Any) -> float | None:
    """k when ``t`` is a one-element loss divided by the number k (or multiplied by 1/k),
    as gradient-accumulation loops normalise each micro-batch's loss; else None. Read
    before its backward (which frees what the node saved); a CPU scalar only (no
    device sync)."""
    gf = getattr(t, "grad_fn", None)
    if gf is None or type(gf).__name__ not in ("DivBackward0", "MulBackward0"):
        return None
    try:
        if t.numel() != 1:
            return None
        other = gf._saved_other
        if not (isinstance(other, Tensor) and other.numel() == 1 and other.is_cpu and not other.requires_grad):
            return None
        v = _cpu_floats([other.reshape(())])[0]
    except Exception:
        return None
    if type(gf).__name__ == "MulBackward0":
        v = 1.0 / v if v else 0.0
    return v if v > 0 and math.isfinite(v) else None


def _step_loss(losses: list[Tensor]) -> Tensor:
    """The loss of a step that ran several backwards. Backwards after one forward
    (``loss_a.backward(retain_graph=True); loss_b.backward()``) are terms of one
    objective: their sum. Across forwards (gradient accumulation, a micro-batch each):
    the sum when each micro-batch's loss was divided by their number (``loss / accum``:
    the sum is the loss the user knows, the mean of the undivided ones), else the mean."""
    dev = losses[0].device
    parts: list[Tensor] = []
    divs: list[float | None] = []
    last = None
    for l in losses:
        fwd, div = getattr(l, "_gv_fwd", None), getattr(l, "_gv_div", None)
        if parts and fwd is not None and fwd == last:  # another term of the same forward's
            parts[-1] = parts[-1] + l.to(dev)
            if div != divs[-1]:
                divs[-1] = None
        else:
            parts.append(l.to(dev))
            divs.append(div)
        last = fwd
    n = len(parts)
    if n == 1:
        return parts[0]
    stacked = torch.stack(parts)
    if all(d is not None and abs(d - n) <= 1e-6 * n for d in divs):
        return stacked.sum()
    return stacked.mean()


def _cpu_floats(ts: list[Tensor]) -> list[float]:
    """The values of one-element CPU tensors (the step's gradient norms and loss on the
    CPU): in host memory already, so no device synchronisation — the sync counter of
    benchmarks/overhead.py leaves reads made here out. One ``.item()`` each: cheaper
    there than stacking them first (a kernel, an allocation and a copy for a few dozen
    floats cost ~2x as much in a step). Refuses any tensor not on the CPU: read here,
    an accelerator tensor would be a hidden sync."""
    for x in ts:
        if not x.is_cpu:
            raise ValueError(f"_cpu_floats() reads CPU tensors only, got one on {x.device}")
    out = []
    with torch._C.DisableTorchFunction():  # past any tracing mode active
        for x in ts:  # (a loop, not a comprehension: the sync counter knows this frame)
            out.append(x.item())
    return out


def _uniform(params: list[nn.Parameter]) -> bool:
    """Whether one fused ``_foreach_norm`` call can measure these parameters' gradients:
    dense, on one device, one floating dtype below float64, none a DTensor (FSDP2)."""
    if not params:
        return False
    p0 = params[0]
    dev, dtype = p0.device, p0.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    dtensor = distributed.dtensor_type_if_loaded()
    for p in params:
        if p.device != dev or p.dtype != dtype or p.is_sparse or (dtensor is not None and isinstance(p, dtensor)):
            return False
    return True


#: CPU weight snapshots (for update ratios) are kept between scheduled steps up to this
#: size: a fresh multi-MB allocation page-faults on every scheduled step (W1: 1.3 ms
#: for a 4.8 MB copy, vs 0.1 ms copying into kept buffers). Larger models, and every
#: accelerator (its caching allocator reuses blocks), allocate per scheduled step.
SNAPSHOT_KEEP_BYTES = 64 * 2**20


def _environment() -> dict[str, Any]:
    return {
        "gradvitals_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cuda": torch.cuda.is_available() and torch.version.cuda or None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv),
    }


def iter_modules(objs: Iterable[Any]) -> list[nn.Module]:
    return [o for o in objs if isinstance(o, nn.Module)]
