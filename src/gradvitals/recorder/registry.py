"""What is watched and what it is called: models, optimizers, parameter ownership.

Names are the user's (``layers.3.weight``); with several models each is prefixed by
its label (``netD:main.0``). Layers and parameters are entered in the record here,
once per model (again when the models change, which bumps :attr:`Registry.version`:
the other parts key their caches on it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import torch_compat
from ..probes import init_audit
from ..record import LayerInfo, ParamInfo, Record, Series, series_key, split_key
from ..taxonomy import WEIGHT_LAYERS

#: Where torch.nn.utils.parametrize keeps a parametrized weight's modules and originals.
PARAMETRIZATIONS = ".parametrizations."


@dataclass
class WatchedModel:
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
    # A weakref to the wrapper a trainer runs this model in (Lightning's DistributedDataParallel),
    # which the watch never sees called: what the distributed merge judges the model by.
    wrapper: Any = None
    eval_steps: dict[str, Any] | None = None  # its eval_mode_training event, once seen
    # Its first forward was an evaluation (no_grad, eval mode) before any training one:
    # eval-mode training forwards after it are a forgotten model.train(), not a model
    # fine-tuned in eval mode on purpose. None until its first forward decides.
    evaluated_first: bool | None = None
    local_hooks: bool = False  # its root hooks live on the module (gv.watch), not global (runner)


@dataclass
class WatchedOptimizer:
    ref: Any  # weakref to the optimizer
    index: int
    label: str
    params: list[nn.Parameter] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # "grad_norm/<name>" per param
    tkeys: tuple[str, ...] = ()  # the same, as the key of its row (Staging.rows)
    names: list[str] = field(default_factory=list)
    version: int = -1
    fast: bool = False  # params: dense, one device, one float dtype, no DTensor (one fused kernel)
    lr_keys: list[str] = field(default_factory=list)
    loss_keys: list[str] = field(default_factory=lambda: ["loss"])
    lr_series: list[Series] = field(default_factory=list)  # the lr series, per param group
    lr_series_of: Any = None  # the record's series dict they belong to
    wkeys: list[str] = field(default_factory=list)  # "weight_norm/<name>" per param
    ukeys: list[str] = field(default_factory=list)  # "update_ratio/<name>" per param
    snapshot: list[Tensor] | None = None  # kept weight-copy buffers (CPU, see GradientMeter.snapshot)
    preclip: tuple[list[str], Tensor] | None = None
    before: tuple[list[str], list[Tensor], Tensor] | None = None
    handles: list[Any] = field(default_factory=list)
    local_hooks: bool = False  # its step hooks live on the optimizer (gv.watch)
    stepped: bool = False  # it has taken a step (see checks.Segments)
    # Were its gradients cleared between two of its steps? (see checks.ZeroGradCheck)
    gparam: Any = None  # the parameter watched: its first with a gradient
    gstate: tuple[int, int] | None = None  # (id, version) of that gradient when last seen
    zstate: str | None = None  # None | "old": as its last step left them | "stale" | "fresh"
    unzeroed: dict[str, Any] | None = None  # the grad_not_zeroed event, once seen
    registered_at: int = 0  # optimizer steps (pre-hook calls) seen before it was registered

    @property
    def loss_key(self) -> str:
        return "loss" if self.index == 0 else f"loss/{self.label}"


class Registry:
    """The watched models and optimizers, and which parameter belongs to which."""

    def __init__(self, record: Record, default_label: str | None) -> None:
        self.record = record
        self.default_label = default_label
        self.models: list[WatchedModel] = []
        self.modules: dict[int, tuple[WatchedModel, str]] = {}  # id(module) -> (model, name)
        self.opts: dict[int, WatchedOptimizer] = {}
        self.param_owner: dict[int, tuple[WatchedModel, str]] = {}  # id(param) -> (model, name)
        self.version = 0  # bumped when models/optimizers change (invalidates caches)
        self.base_counts: dict[str, int] = {}  # models per base label, ever (see relabel)
        #: Trainable parameters whose gradient no measurement has seen yet (grad_seen).
        self.unseen_grads: set[int] = set()

    # ------------------------------------------------------------- models
    def find_model(self, module: nn.Module) -> WatchedModel | None:
        for m in self.models:
            if m.module is module:
                return m
        return None

    def add_model(self, module: nn.Module, label: str | None, step: int) -> tuple[WatchedModel, dict[str, str]]:
        """Index a new root model (the caller checked it is new); with several models,
        every name takes its model's prefix. (Its entry, the renames: see relabel.)"""
        model = WatchedModel(module=module, index=len(self.models), label=label or self.default_label
                             or type(module).__name__)
        model.base = model.label
        model.ordinal = self.base_counts.get(model.base, 0)
        self.base_counts[model.base] = model.ordinal + 1
        self.models.append(model)
        if len(self.models) == 1:
            self.index_model(model)
            return model, {}
        # indexed under its prefix only: indexed bare first, its names would collide
        # with the first model's ("0.weight") and take over its series
        return model, self.relabel(step)

    def remove_model(self, module: nn.Module) -> WatchedModel | None:
        """Stop watching ``module``. Its layers and parameters leave the record unless
        something was recorded under their names."""
        for m in list(self.models):
            if m.module is module:
                for h in m.handles:
                    h.remove()
                self.models.remove(m)
                names = {full for k, (mm, full) in self.modules.items() if mm is m}
                for k in [k for k, (mm, _) in self.modules.items() if mm is m]:
                    del self.modules[k]
                self.version += 1
                self._forget_unrecorded(names)
                return m
        return None

    def forget_params(self, model: WatchedModel) -> None:
        for _, p in model.params:
            self.param_owner.pop(id(p), None)

    def _forget_unrecorded(self, layer_names: set[str]) -> None:
        rec = self.record
        used = {split_key(key)[1] for key in rec.series if "/" in key}
        for name in layer_names:
            layer = rec.layers.get(name)
            if layer is None or name in used or any(p in used for p in layer.params):
                continue
            for p in layer.params:
                rec.params.pop(p, None)
            del rec.layers[name]

    def index_model(self, model: WatchedModel) -> None:
        pre = model.prefix
        model.names = {}
        base = torch_compat.unwrap(model.module)  # DDP: the user's names, without "module."
        if base is not model.module:
            model.names[id(model.module)] = pre.rstrip(":") or "(root)"
            self.modules[id(model.module)] = (model, model.names[id(model.module)])
        for name, mod in base.named_modules():
            full = pre + (name or "(root)") if pre else (name or "(root)")
            if not name and pre:
                full = pre.rstrip(":")
            model.names[id(mod)] = full
            self.modules[id(mod)] = (model, full)
            kind = torch_compat.module_kind(mod)
            if PARAMETRIZATIONS in f".{name}.":
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
            if PARAMETRIZATIONS in f".{name}":
                # `0.parametrizations.weight.original`: the weight of layer `0`, computed
                owner = f".{name}".split(PARAMETRIZATIONS, 1)[0][1:]
                layer = (pre + owner) if owner else (pre.rstrip(":") or "(root)")
                lay = self.record.layers.get(layer)
                if lay is not None and full not in lay.params:
                    lay.params.append(full)
            else:
                layer = full.rsplit(".", 1)[0] if "." in full else (pre.rstrip(":") or "(root)")
            model.params.append((full, p))
            self.param_owner[id(p)] = (model, full)
            info = self.record.params.get(full)
            if info is None:
                info = ParamInfo(name=full, layer=layer, shape=list(p.shape), numel=p.numel(),
                                 requires_grad=p.requires_grad, dtype=str(p.dtype).replace("torch.", ""))
                self.record.params[full] = info
                if p.requires_grad:
                    self.unseen_grads.add(id(p))
        self.version += 1

    def relabel(self, step: int) -> dict[str, str]:
        """Several models: prefix every name with its model's label ("netD:main.0").
        Returns the renames (old name -> new); what was recorded moves with them."""
        renames: dict[str, str] = {}
        for m in self.models:
            # Numbered by order of arrival among the models of its base, ever: a third
            # "model" is model2, whatever became of model0 (see checks.Segments.retire_finished).
            label = m.base or m.label
            if self.base_counts.get(label, 0) > 1:
                label = f"{label}{m.ordinal}"
            new_prefix = label + ":"
            if m.prefix == new_prefix:
                continue
            old_names = dict(m.names)
            old_params = [n for n, _ in m.params]
            m.prefix = new_prefix
            if m.label != label:
                for ev in self.record.events:  # e.g. its init_audit, written under the old label
                    if ev.get("model") == m.label and ev.get("step", -1) <= step:
                        ev["model"] = label
            m.label = label
            self.index_model(m)
            for mid, old in old_names.items():
                renames[old] = m.names[mid]
            for old, (new, _) in zip(old_params, m.params):
                renames[old] = new
        if not renames:
            return renames
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
            q, name = split_key(key)
            new_series[series_key(q, renames.get(name, name)) if name else key] = s
        rec.series = new_series
        return renames

    # --------------------------------------------------------- optimizers
    def add_optimizer(self, opt: torch.optim.Optimizer, registered_at: int) -> tuple[WatchedOptimizer, bool]:
        """(its entry, whether it is new)."""
        o = self.opts.get(id(opt))
        if o is not None and o.ref() is opt:
            return o, False
        label = f"opt{len(self.opts)}" if self.opts else "opt"
        o = WatchedOptimizer(ref=weakref.ref(opt), index=len(self.opts), label=label)
        o.registered_at = registered_at
        self.opts[id(opt)] = o
        # Their kinds, each once, for the rules (an adaptive optimizer's first step is
        # +-lr per weight). Once: a script may build a new optimizer every epoch.
        kinds = self.record.run.setdefault("optimizers", [])
        if type(opt).__name__ not in kinds:
            kinds.append(type(opt).__name__)
        self.version += 1
        return o, True

    def drop_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Stop watching ``opt`` (an optimizer that only ever steps inside another's step)."""
        if self.opts.pop(id(opt), None) is not None:
            self._relabel()

    def drop_dead_optimizers(self) -> bool:
        """An optimizer re-created every epoch (``opt = SGD(model.parameters(), lr)`` in
        the epoch loop): the garbage one must not keep claiming the parameters, split
        the loss series (``loss/opt1``) or hold a place in the step cycle. True when
        one was dropped."""
        dead = [k for k, o in self.opts.items() if o.ref() is None]
        if not dead:
            return False
        for k in dead:
            del self.opts[k]
        self._relabel()
        return True

    def _relabel(self) -> None:
        """Optimizers were dropped: the others are numbered again, in their order."""
        for i, o in enumerate(sorted(self.opts.values(), key=lambda o: o.index)):
            o.index, o.label = i, ("opt" if i == 0 else f"opt{i}")
        self.version += 1

    def optimizer_param_ids(self) -> set[int]:
        """id() of every parameter a live optimizer holds."""
        ids: set[int] = set()
        for o in self.opts.values():
            opt = o.ref()
            if opt is not None:
                ids.update(id(p) for g in opt.param_groups for p in g["params"])
        return ids

    def steps_model(self, opt: torch.optim.Optimizer, model: WatchedModel) -> bool:
        """Whether ``opt`` updates some parameter of ``model``."""
        mine = {id(p) for _, p in model.params}
        return any(id(p) in mine for g in opt.param_groups for p in g["params"])

    def opt_params(self, o: WatchedOptimizer, opt: torch.optim.Optimizer) -> None:
        """Parameters measured at this optimizer's step: its own, plus the other
        trainable parameters of the models it updates (those it misses are the
        ``not_updated`` suspects), each measured by one optimizer only."""
        groups = opt.param_groups
        n = len(groups[0]["params"]) if len(groups) == 1 else sum(len(g["params"]) for g in groups)
        if o.version == self.version and len(o.params) >= n:
            return
        own = [p for g in opt.param_groups for p in g["params"]]
        own_ids = {id(p) for p in own}
        # Parameters of these models that no optimizer updates: measured here (the
        # not_updated suspects). Those another optimizer updates are its to measure.
        any_opt: set[int] = set(own_ids)
        for other in self.opts.values():
            other_opt = other.ref()
            if other is not o and other_opt is not None:
                any_opt |= {id(p) for g in other_opt.param_groups for p in g["params"]}
        models = {id(self.param_owner[id(p)][0]) for p in own if id(p) in self.param_owner}
        claimed: set[int] = set()
        for other in self.opts.values():
            if other is not o and other.index < o.index:
                other_opt = other.ref()
                if other_opt is not None:  # claims go in index order, whichever optimizer steps first
                    self.opt_params(other, other_opt)
                claimed |= {id(p) for p in other.params}
        params: list[nn.Parameter] = [p for p in own if id(p) not in claimed]
        for m in self.models:
            if id(m) in models:
                for name, p in m.params:
                    if id(p) not in any_opt and id(p) not in claimed and p.requires_grad:
                        params.append(p)
        # Models no optimizer updates at all (an EMA / SWA copy, a teacher evaluated
        # beside the student): nothing there is meant to receive a gradient.
        touched = {id(self.param_owner[pid][0]) for pid in any_opt if pid in self.param_owner}
        for m in self.models:
            for name, p in m.params:
                info = self.record.params.get(name)
                if info is not None and id(p) in any_opt:
                    info.in_optimizer = True
                elif info is not None and (id(m) in models or id(m) not in touched) and not info.in_optimizer:
                    info.in_optimizer = False
        o.params = params
        o.names = [self.param_owner[id(p)][1] if id(p) in self.param_owner else f"{o.label}.param{i}"
                   for i, p in enumerate(params)]
        o.keys = [series_key("grad_norm", n) for n in o.names]
        o.tkeys = tuple(o.keys)
        o.version = self.version
        o.fast = uniform(params)
        o.snapshot = None
        o.lr_keys, o.wkeys, o.ukeys = [], [], []

    def note_grads_seen(self, params: list[nn.Parameter]) -> None:
        """grad_seen for those of ``params`` that have a gradient now (no value read)."""
        for p in params:
            if p.grad is not None and id(p) in self.unseen_grads:
                self.unseen_grads.discard(id(p))
                self.record.params[self.param_owner[id(p)][1]].grad_seen = True

    def note_unstepped_grads(self) -> None:
        """Parameters of models no optimizer holds that have a gradient now (a model built
        again after its optimizer, a loss network left trainable): no optimizer measures
        them, so their grad_seen is set here, on scheduled steps only (an attribute read
        per parameter not seen yet; no value read)."""
        for m in self.models:
            for name, p in m.params:
                if id(p) in self.unseen_grads and p.grad is not None:
                    info = self.record.params.get(name)
                    if info is not None and info.in_optimizer is False:
                        self.unseen_grads.discard(id(p))
                        info.grad_seen = True

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """Every watched model's parameters that require a gradient (no optimizer: all
        of them are measured at each backward)."""
        return [(n, p) for m in self.models for n, p in m.params if p.requires_grad]


def uniform(params: list[nn.Parameter]) -> bool:
    """Whether one fused ``_foreach_norm`` call can measure these parameters' gradients:
    dense, on one device, one floating dtype below float64, none a DTensor (FSDP2)."""
    if not params:
        return False
    p0 = params[0]
    dev, dtype = p0.device, p0.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    dtensor = torch_compat.dtensor_type_if_loaded()
    for p in params:
        if p.device != dev or p.dtype != dtype or p.is_sparse or (dtensor is not None and isinstance(p, dtensor)):
            return False
    return True
