"""Run-level checks that watch the training loop itself, not a tensor's values: each
writes one event into the record, which its rule reads (rules/loss.py, rules/params.py,
diagnose.py's segments). No value is read from a device here."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from ..probes import loss_graph
from ..record import Record
from .registry import Registry, WatchedModel, WatchedOptimizer


class ZeroGradCheck:
    """Were an optimizer's gradients cleared between two of its steps? Identity and
    version counter of one gradient tensor: no value is read, no sync."""

    def __init__(self, record: Record) -> None:
        self.record = record

    def backward_starts(self, opts: Any) -> None:
        """A backward begins: has each optimizer's gradient been cleared (set to None,
        zeroed in place, replaced) since its step, or since the last backward? Cleared
        at any point before its next step: fresh (a GAN's D gets G's backward first,
        then its own zero_grad); never: stale, the next step adds the old gradients in."""
        for o in opts:
            if o.zstate is not None:
                g = o.gparam.grad if o.gparam is not None else None
                state = (id(g), g._version) if g is not None else None
                if state != o.gstate or state is None:
                    o.zstate = "fresh"
                elif o.zstate == "old":
                    o.zstate = "stale"

    def backward_ends(self, opts: Any) -> None:
        for o in opts:
            if o.zstate is not None:
                self.seen(o)

    @staticmethod
    def seen(o: WatchedOptimizer) -> None:
        """Remember the watched gradient as it is now (after a backward, or a step)."""
        g = o.gparam.grad if o.gparam is not None else None
        o.gstate = (id(g), g._version) if g is not None else None

    def step_taken(self, o: WatchedOptimizer, opt: torch.optim.Optimizer) -> None:
        """``o`` stepped: watch whether its gradients get cleared before its next step."""
        if o.gparam is None or o.gparam.grad is None:
            o.gparam = next((p for g in opt.param_groups for p in g["params"] if p.grad is not None), None)
        self.seen(o)
        o.zstate = "old" if o.gstate is not None else None

    def step_begins(self, o: WatchedOptimizer, step: int) -> None:
        """This step of ``o`` adds the gradients its previous step used when nothing
        cleared them (no zero_grad) before the backward of this one."""
        if o.zstate == "stale":
            ev = o.unzeroed
            if ev is None:
                opt = o.ref()
                ev = o.unzeroed = self.record.event("grad_not_zeroed", step=step, optimizer=o.label,
                                                    optimizer_kind=type(opt).__name__ if opt is not None else None,
                                                    steps=0)
            ev["steps"] += 1
            ev["last_step"] = step
        o.zstate = None


class EvalModeCheck:
    """A step trained on a forward run in eval mode, by a model that trained in train
    mode before (a model.eval() for validation and no model.train() after it)."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.last_forward: tuple[WatchedModel, bool] | None = None  # (model, in eval mode after training)
        self.pending: WatchedModel | None = None  # this step's backward came from an eval-mode forward

    def forward_ends(self, model: WatchedModel) -> None:
        # Which model's forward, in which mode, the next backward comes from: an
        # eval-mode one after training in train mode (or after an evaluation before
        # its first step) is validation if nothing backpropagates it, and a
        # forgotten model.train() if a step uses it.
        self.last_forward = (model, not model.module.training
                             and (model.train_mode_seen or model.evaluated_first is True))

    def backward_ends(self) -> None:
        last = self.last_forward
        if last is not None and last[1]:
            self.pending = last[0]  # backpropagated: this eval-mode forward trains

    def step_begins(self, opt: torch.optim.Optimizer, registry: Registry, step: int) -> None:
        model, self.pending = self.pending, None
        if model is None or not registry.steps_model(opt, model):  # a frozen teacher's forward
            return
        ev = model.eval_steps
        if ev is None:
            ev = model.eval_steps = self.record.event("eval_mode_training", step=step, model=model.label,
                                                      steps=0, evaluated_first=not model.train_mode_seen)
        if ev.get("last_step") != step:  # several optimizers of one step count once
            ev["steps"] += 1
            ev["last_step"] = step


class LossInputCheck:
    """Is a loss given what it computes itself (a softmax into cross_entropy)? Probed at
    the first backward of scheduled steps; counted at the step. A metric computed aside
    is in no backward's graph."""

    def __init__(self, record: Record, fail: Callable[[str, BaseException], None]) -> None:
        self.record = record
        self.fail = fail
        self.inputs: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.hits: set[tuple[str, str, int | None]] = set()
        self.probe_step = -1  # the step whose loss graph was last probed
        self.probed = False  # ... and not yet counted

    def backward_starts(self, tensor: Any, step: int, is_scheduled: bool) -> None:
        if self.probe_step != step and is_scheduled:
            try:
                self.probe_step = step
                self.hits |= loss_graph.wrong_loss_inputs(tensor)
                self.probed = True
            except Exception as exc:
                self.fail("loss_graph", exc)

    def step_begins(self, step: int, segment: int) -> None:
        """One event per wrong loss and segment (k-fold: per fold), counting the probed
        steps it was seen at (``steps``) and the probed steps since it was first seen
        (``checked``)."""
        if not self.probed:
            return
        for loss_fn, made_by, classes in self.hits:
            key = (loss_fn, made_by, segment)
            if key not in self.inputs:
                self.inputs[key] = self.record.event(
                    "loss_on_probabilities", step=step, loss=loss_fn, input_from=made_by,
                    classes=classes, steps=0, checked=0)
        hits = {(f, m, segment) for f, m, _ in self.hits}
        for key, ev in self.inputs.items():
            if key[2] == segment and ev.get("last_step") != step:
                ev["checked"] += 1
                if key in hits:
                    ev["steps"] += 1
                ev["last_step"] = step
        self.hits = set()
        self.probed = False


class Segments:
    """An optimizer's first step. When every model it trains is new and other models
    were trained before it (k-fold cross-validation, restarts from scratch, a second
    stage trained on its own), the run-level series (loss, global gradient norm, lr)
    start over here: a ``segment`` event marks the step, and the rules judge each
    segment on its own (diagnose.py) instead of reading one fold's restart as the
    previous fold's loss going back up. Models trained together (a GAN's two players,
    a new optimizer for layers of a model already training) start no segment."""

    def __init__(self, record: Record, registry: Registry) -> None:
        self.record = record
        self.registry = registry
        self.count = 0  # segment events written
        #: Modules an optimizer has stepped (weak: a finished fold's model must be freed).
        self.trained: dict[int, weakref.ref] = {}

    def first_step(self, opt: torch.optim.Optimizer, step: int) -> tuple[list[WatchedModel], bool]:
        """(the models ``opt`` trains, whether a new segment starts here)."""
        owners = self.registry.param_owner
        models: dict[int, WatchedModel] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                owner = owners.get(id(p))
                if owner is not None and owner[0].module is not None:
                    models[id(owner[0].module)] = owner[0]
        if not models:
            return [], False
        trained = self.trained
        fresh = not any(k in trained and trained[k]() is not None for k in models)
        starts = step > 0 and bool(trained) and fresh
        for k, m in models.items():
            trained[k] = weakref.ref(m.module)
        return list(models.values()), starts

    def start(self, models: list[WatchedModel], step: int) -> list[WatchedModel]:
        """Write the segment event; returns the models to let go: those no live
        optimizer trains any more (the folds before). Their record stays; the modules,
        their gradients and last inputs are the user's again to free (k folds of a
        large model would otherwise all stay in memory until the script ends)."""
        self.record.event("segment", step=step, models=sorted(m.label for m in models))
        self.count += 1
        live = self.registry.optimizer_param_ids()
        starting = {id(m.module) for m in models}
        return [m for m in self.registry.models
                if id(m.module) not in starting and not any(id(p) in live for _, p in m.params)]
