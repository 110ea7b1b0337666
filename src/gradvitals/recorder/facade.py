"""The recorder: receives the training loop's events (events.TrainingEvents) and
hands each to the parts that own it; fetches their device tensors with at most one
host sync per optimizer step.

Timeline of one optimizer step ``s`` (single optimizer):

    root forward   -> on scheduled steps the activation tracer hands module outputs
                      to the output meter (device tensors); the root's inputs are
                      kept for a NaN-origin replay
    backward()     -> the loss tracker keeps the loss (device tensor)
    clip_grad_norm_-> per-parameter norms before clipping (device tensor)
    opt pre-hook   -> the gradient meter: gradient norms (fused); on scheduled steps
                      weight norms and a copy of the weights; the staging's flush
                      fetches everything pending in ONE host sync; a NaN/Inf there
                      sends the origin locator looking
    opt post-hook  -> update ratios (device tensor, fetched at the next sync); s += 1

Without an optimizer, the end of each backward plays the pre-hook's part.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__, distributed, torch_compat
from ..probes import patches
from ..record import Record
from .activations import ActivationTracer
from .attention import AttentionMeter
from .checks import EvalModeCheck, LossInputCheck, Segments, ZeroGradCheck
from .clock import StepClock
from .gradients import GradientMeter
from .hooks import LocalHooks
from .logits import LogZProbe
from .losses import LossTracker
from .options import Options, scheduled
from .origin import OriginLocator
from .outputs import OutputMeter
from .registry import Registry, WatchedModel, WatchedOptimizer
from .staging import Staging

log = logging.getLogger("gradvitals")

#: At the end of a multi-rank run, how long the report waits for the last step's merge
#: (launched by every rank, normally done long since): a rank that died before it must
#: not hold the report for the whole collective time-out.
SETTLE_PATIENCE_S = 10.0


class Recorder:
    """Owns probes over one or more models and optimizers; fills a :class:`Record`.
    ``manual_steps``: the driver calls :meth:`step_begin`/:meth:`step_end` (never a
    backward without optimizer as a step)."""

    def __init__(self, options: Options | None = None, *, command: str | None = None,
                 manual_steps: bool = False) -> None:
        self.options = options = options or Options()
        self.record = record = Record(cap=options.cap)
        record.run.update(_environment())
        if command is not None:
            record.run["command"] = command
        self._errors: dict[str, int] = {}
        self._closed = False
        self._paused = False
        self._announced = False  # this rank said in the process group's store that it watches
        self._started = time.time()
        #: Called with a model no longer watched (see _retire); the runner forgets it too.
        self.on_retire: Any = None
        self.autosave: Any = None  # autosave.Autosave: ticked at each step boundary
        self.clock = StepClock(self._advanced)
        self.clock.optimizer_seen = manual_steps
        self.registry = Registry(record, options.name)
        self.staging = Staging(self, record)
        self.losses = LossTracker()
        self.outputs = OutputMeter(self.staging, lambda: self.clock.step, self.fail)
        self.tracer = ActivationTracer(self, self.registry, record, self.outputs, self.fail)
        self.tracer.attention = AttentionMeter(self.registry, self.staging, lambda: self.clock.step, self.fail)
        self.gradients = GradientMeter(self, options, self.registry, self.staging, self.losses, record)
        self.origin = OriginLocator(self, self.registry, record, options.nonfinite_origin)
        self.staging.on_nonfinite = self.origin.seen
        self.zero_grad = ZeroGradCheck(record)
        self.eval_mode = EvalModeCheck(record)
        self.loss_inputs = LossInputCheck(record, self.fail)
        self.log_z = LogZProbe(self.staging, self.fail)
        self.segments = Segments(record, self.registry)
        self.hooks = LocalHooks(self, self.registry)
        self._patched = patches.install(self)

    # ------------------------------------------------------------ reading
    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def version(self) -> int:
        """Bumped whenever the watched models or optimizers change (caches key on it)."""
        return self.registry.version

    @property
    def models(self) -> list[WatchedModel]:
        return self.registry.models

    @property
    def merger(self) -> Any:
        """The cross-rank merge: None until the first multi-rank flush, then a
        distributed.Merger, or False once merging is off."""
        return self.staging.merger

    @merger.setter
    def merger(self, value: Any) -> None:
        self.staging.merger = value

    @property
    def progress(self) -> Any:
        return self.staging.progress

    @progress.setter
    def progress(self, value: Any) -> None:
        self.staging.progress = value  # reports.progress.Progress: the CLI's live status line

    @property
    def tensorboard(self) -> Any:
        return self.staging.tensorboard

    @tensorboard.setter
    def tensorboard(self, sink: Any) -> None:
        self.staging.tensorboard = sink  # reports.tensorboard.TensorBoardSink, fed at every flush

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backward_mode(self) -> bool:
        """No optimizer to mark steps: each backward is a step."""
        return not self.registry.opts and not self.clock.optimizer_seen and bool(self.registry.models)

    @property
    def closure_pending(self) -> bool:
        """A closure optimizer's step waits for its closure's first backward."""
        return self.clock.closure_step is not None

    @property
    def closure_measured(self) -> bool:
        return self.clock.closure_measured

    def model_of(self, module: nn.Module) -> tuple[WatchedModel, str] | None:
        """(the watched model ``module`` belongs to, its name there), or None."""
        return self.registry.modules.get(id(module))

    def ever_active(self, name: str) -> Tensor | None:
        """Layer ``name``'s per-unit "ever active over the dead-unit window" mask, or None."""
        return self.outputs.ever_active(name)

    # -------------------------------------------------------------- setup
    def add_model(self, module: nn.Module, label: str | None = None, *, local_hooks: bool = True) -> WatchedModel:
        """Watch a root model. ``local_hooks``: attach its root hooks on the module
        itself (``gv.watch``); the runner passes False and calls the same handlers
        from process-global hooks, so nothing lives on the user's modules."""
        known = self.registry.find_model(module)
        if known is not None:
            return known
        if self.registry.models:
            self.staging.drain()  # appended before the names change
        model, renames = self.registry.add_model(module, label, self.clock.step)
        if renames:
            self.outputs.rename(renames)  # the dead-unit windows follow their layers
        model.local_hooks = local_hooks
        if local_hooks and not self._paused:
            self.hooks.hook_model(model)
        return model

    def trains_in(self, module: nn.Module, wrapper: nn.Module) -> None:
        """``module`` (watched) trains inside ``wrapper``: see WatchedModel.wrapper."""
        model = self.registry.find_model(module)
        if model is not None and wrapper is not module:
            model.wrapper = weakref.ref(wrapper)
            self.registry.version += 1  # the merge's view of the models changed

    def remove_model(self, module: nn.Module) -> None:
        """Stop watching ``module`` (e.g. it turned out to be part of a larger model,
        called on its own first). Its layers and parameters leave the record unless
        something was recorded under their names."""
        self.registry.remove_model(module)

    def add_optimizer(self, opt: torch.optim.Optimizer, *, local_hooks: bool = True) -> WatchedOptimizer:
        o, new = self.registry.add_optimizer(opt, self.clock.pre_hook_calls)
        if new:
            o.local_hooks = local_hooks
            if local_hooks and not self._paused:
                self.hooks.hook_optimizer(o, opt)
        return o

    def drop_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Stop watching ``opt``: it steps only inside another watched optimizer's step."""
        self.registry.drop_optimizer(opt)
        self.clock.forget(set(self.registry.opts))

    # -------------------------------------------------------------- pause
    def pause(self) -> None:
        """Detach every hook and patch, keeping the record and the step count: while
        paused, training runs exactly as unwatched (nothing is measured, no step is
        counted). :meth:`resume` re-attaches. Idempotent; a no-op once closed."""
        if self._paused or self._closed:
            return
        self._paused = True
        self._remove_hooks()
        self._patched.remove()

    def resume(self) -> None:
        """Re-attach what :meth:`pause` detached. Idempotent; a no-op once closed."""
        if not self._paused or self._closed:
            return
        self._paused = False
        self._patched = patches.install(self)
        self.hooks.attach_all()

    def _remove_hooks(self) -> None:
        self.tracer.remove_hooks()
        self.hooks.remove_all()

    # ------------------------------------------------------------- events
    def forward_start(self, model: WatchedModel) -> None:
        if self.origin.replaying or patches.bookkeeping():
            return
        if not self._announced:  # before any collective of the step: see distributed.WATCHING_GRACE_S
            self._announced = distributed.announce()
        if model.wrapper is None and self._announced and distributed.initialized():
            # Called inside a DDP wrapper it was not given (a Trainer's): the merge judges it by that.
            ddp = torch_compat.active_ddp()
            if ddp is not None and any(m is model.module for m in ddp.module.modules()):
                self.trains_in(model.module, ddp)
        try:
            step = self.clock.step
            self.tracer.start(model, step, self.options.activations and scheduled(self.options, step))
        except Exception as exc:
            self.fail("activations", exc)

    def forward_end(self, model: WatchedModel, args: tuple, kwargs: dict, output: Any = None,
                    raised: bool = False) -> None:
        if self.origin.replaying or patches.bookkeeping():
            return
        try:
            training = model.module.training
            if model.evaluated_first is None and not raised:
                model.evaluated_first = not torch.is_grad_enabled() and not training
            if torch.is_grad_enabled() and not raised:
                self.eval_mode.forward_ends(model)
                if training or not model.train_mode_seen:
                    if training:
                        model.train_mode_seen = True
                    # Kept (references only) so a NaN can be traced back by replaying this forward.
                    model.last_inputs = (args, kwargs)
                    self.losses.forward_seen()
                    if training:
                        self.log_z.forward_ends(output, self.clock.step, scheduled(self.options, self.clock.step))
            self.tracer.end(model, args, output, raised)
        except Exception as exc:
            self.fail("activations", exc)

    def backward_start(self, tensor: Any) -> None:
        self.losses.before_backward(tensor)
        step = self.clock.step
        self.loss_inputs.backward_starts(tensor, step, scheduled(self.options, step))
        self.log_z.backward_starts(tensor, step)
        self.zero_grad.backward_starts(self.registry.opts.values())

    def backward_end(self, tensor: Any, seed: Any = None) -> None:
        self.zero_grad.backward_ends(self.registry.opts.values())
        self.eval_mode.backward_ends()
        if not self._owns_backward():
            return  # another watch's model (two models trained in turn)
        clock = self.clock
        self.losses.capture(tensor, seed, clock.closure_measured)
        if clock.closure_step is not None:
            # LBFGS & co.: the closure's first backward holds the step's gradient at its
            # starting weights (what the optimizer's pre-hook would see without a closure).
            o, clock.closure_step = clock.closure_step, None
            clock.closure_measured = True
            self.gradients.measure(o)
            return
        if self.backward_mode:
            self.gradients.manual_update_ratio()
            self.gradients.measure(None)
            if scheduled(self.options, clock.step):
                self.gradients.keep_manual_weights()
            clock.advance()

    def autograd_grad(self, outputs: Any, inputs: Any, seed: Any) -> None:
        if seed is not None or self.losses.explicit or not self._owns_backward():
            return
        self.losses.autograd_grad(outputs, inputs, self.registry.optimizer_param_ids())

    def _owns_backward(self) -> bool:
        """With several recorders at once every backward() reaches all of them: it belongs
        to those whose model ran a training forward since their last step (or that never
        see their root's forward, e.g. submodules called directly: then all)."""
        losses = self.losses
        return losses.forward_since_flush or not losses.saw_forward or len(patches.active()) < 2

    def clip_start(self, parameters: list, max_norm: float, norm_type: Any = 2.0) -> None:
        self.gradients.clip_start(parameters, norm_type)

    def clip_end(self, total: Any, max_norm: float) -> None:
        self.gradients.clip_end(total, max_norm)

    def loss_scaled(self, scaled: Any, scaler: Any, loss: Any = None) -> None:
        self.losses.loss_scaled(scaled, loss)

    def scaler_step_begin(self, optimizer: Any) -> None:
        self.clock.scaler_pre_calls = self.clock.pre_hook_calls

    def scaler_step_end(self, optimizer: Any) -> None:
        """The scaler skipped ``optimizer.step()`` (inf/NaN in the fp16 gradients): an
        expected overflow, not a step and not a NaN. Forget what this iteration left."""
        if self.clock.pre_hook_calls != self.clock.scaler_pre_calls:
            return
        self.losses.pending = []
        o = self.registry.opts.get(id(optimizer))
        if o is not None:
            o.preclip = None
        self.staging.drop_clip()
        n = int(self.record.run.get("amp_skipped_steps", 0)) + 1
        self.record.run["amp_skipped_steps"] = n
        if n == 1:
            self.record.event("amp_skipped_step", step=self.clock.step)

    def log_loss(self, loss: Any) -> None:
        """Record this step's loss explicitly (disables the automatic capture)."""
        self.losses.log_loss(loss)

    def step_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            o = self.registry.opts.get(id(opt))
            if o is None:
                return
            clock, registry = self.clock, self.registry
            clock.step_begins()
            if len(registry.opts) > 1 and registry.drop_dead_optimizers():  # a dead one can only be another
                clock.forget(set(registry.opts))
            clock.cycle_begins(id(opt))
            if not o.stepped:
                o.stepped = True
                self._first_step(opt, o)
            self.loss_inputs.step_begins(clock.step, self.segments.count)
            clock.took(id(opt))
            self.losses.step_begins()
            self.log_z.clear()
            rest = args[1:] if args and args[0] is opt else args  # global hooks get (opt, *args)
            if (rest and callable(rest[0])) or callable(kwargs.get("closure")):
                clock.closure_step = o  # measured at the closure's first backward
                o.zstate = None  # the closure clears them after this hook
                return
            self.zero_grad.step_begins(o, clock.step)
            self.eval_mode.step_begins(opt, registry, clock.step)
            self.gradients.measure(o)
            # After measure: it decided which parameters no optimizer holds (in_optimizer).
            if registry.unseen_grads and scheduled(self.options, clock.step):
                registry.note_unstepped_grads()
        except Exception as exc:
            self.fail("gradients", exc)

    def _first_step(self, opt: torch.optim.Optimizer, o: WatchedOptimizer) -> None:
        """A new segment (see checks.Segments) may start at an optimizer's first step."""
        models, starts = self.segments.first_step(opt, self.clock.step)
        if not starts:
            return
        self.clock.segment_starts(o.registered_at)
        for m in self.segments.start(models, self.clock.step):
            self._retire(m)

    def _retire(self, m: WatchedModel) -> None:
        self.registry.remove_model(m.module)
        self.registry.forget_params(m)
        self.tracer.infos.clear()
        m.last_inputs = None
        if self.on_retire is not None:
            self.on_retire(m)
        self.record.event("model_released", step=self.clock.step, model=m.label)

    def step_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            o = self.registry.opts.get(id(opt))
            if o is None:
                return
            clock = self.clock
            clock.closure_measured = False
            if clock.closure_step is o:  # a closure that never called backward
                clock.closure_step = None
                self.gradients.measure(o)
            else:
                self.zero_grad.step_taken(o, opt)
            o.preclip = None  # a clip after the measurement (Lightning) must not leak into the next step
            self.gradients.update_ratio(o)
            opts = self.registry.opts
            clock.step_ends(id(opt), {k for k, other in opts.items() if other.ref() is not None}, len(opts) == 1)
        except Exception as exc:
            self.fail("update_ratio", exc)

    # ------------------------------------------- driven by a training framework
    def step_begin(self, optimizer: torch.optim.Optimizer, *, sum_losses: bool = False) -> None:
        """``optimizer`` is about to step with this step's final gradients: the work of
        its step pre-hook. For frameworks whose ``optimizer.step(closure)`` runs forward
        and backward inside the step (Lightning), where the pre-hook would still see the
        previous step's gradients; such optimizers are added without hooks.
        ``sum_losses``: the trainer divided each accumulation micro-batch's loss so that
        they add up to the step's loss (HF Trainer); add them instead of averaging."""
        self.add_optimizer(optimizer, local_hooks=False)  # idempotent
        if sum_losses:
            self.losses.sum_pending()
        self.step_pre(optimizer, (), {})

    def step_end(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer`` has stepped: the work of its step post-hook."""
        self.step_post(optimizer, (), {})

    def _advanced(self, step: int) -> None:
        self.record.steps = step
        if self.autosave is not None:
            self.autosave.tick(self)  # a clock read; a snapshot when one is due (never raises)

    def before_destroy_process_group(self, group: Any) -> None:
        """The script is about to destroy its process group (the end of a torchrun run,
        on every rank): the last moment the steps a batched merge holds can be merged."""
        if group is None or group is torch.distributed.group.WORLD:
            try:
                self.staging.settle(patience_s=SETTLE_PATIENCE_S, final=True)
            except Exception as exc:
                self.fail("flush", exc)

    # -------------------------------------------------------------- close
    def fail(self, probe: str, exc: BaseException) -> None:
        """A probe failed: reported once per probe, never raised (the run goes on)."""
        n = self._errors.get(probe, 0)
        self._errors[probe] = n + 1
        if n == 0:
            log.warning("gradvitals: probe %r failed (%s: %s); training continues", probe,
                        type(exc).__name__, exc)
            self.record.event("probe_error", probe=probe, error=f"{type(exc).__name__}: {exc}",
                              step=self.clock.step)

    def sync(self) -> None:
        """Bring the record up to date: append the recent steps' per-parameter gradient
        norms that wait in the ring (values pending for the current step stay so)."""
        try:
            self.staging.drain()
        except Exception as exc:
            self.fail("flush", exc)

    def finish(self, final: bool = False) -> None:
        """Fetch whatever is pending and stamp the run's duration (idempotent).
        ``final``: the watch closes (on every rank, at the end of the run), so the
        merges in flight land and the steps a multi-rank run still holds in a batch are
        merged too. A mid-run report (maybe rank 0's alone) lands nothing: a landing may
        start a collective (a NaN's origin gathered), which the other ranks would not join
        (its view adds this rank's own values of the batched steps: report_record)."""
        if final or not distributed.holds_pending(self):
            try:  # a merge in flight: every rank launched it, so it is a wait, not a collective
                self.staging.settle(patience_s=SETTLE_PATIENCE_S, final=final)
            except Exception as exc:
                self.fail("flush", exc)
        if final:
            self.origin.record_stashed()
        if self.staging.pending and not distributed.holds_pending(self):
            try:
                self.staging.flush()
            except Exception as exc:
                self.fail("flush", exc)
        self.sync()
        self.stamp(self.record)

    def report_record(self) -> Record:
        """The record a report is made of: this one, or, while a multi-rank run holds
        ordinary steps in a batch not merged yet (distributed.Merger.start; a mid-run
        report starts no collective), a snapshot with this rank's own values for those
        steps, which ``run.distributed.unmerged_steps`` names. Steps whose local values
        are shards (FSDP/TP) are left out until their merge lands:
        ``run.distributed.in_flight_steps`` names them."""
        own = distributed.unsent_values(self)
        flying = distributed.steps_in_flight(self)
        if not own and not flying:
            return self.record
        rec = self.record.snapshot()
        if own:
            side = Staging(self, rec)  # appends to the snapshot, never to the live record
            try:
                side.apply(own, ring=False)
            except Exception as exc:
                self.fail("flush", exc)
                return self.record
        info = rec.run.get("distributed")
        if isinstance(info, dict):
            if own:
                steps = [st for st, _, _ in own]
                info["unmerged_steps"] = [min(steps), max(steps)]
            if flying:
                info["in_flight_steps"] = [min(flying), max(flying)]
        self.stamp(rec)
        return rec

    def stamp(self, record: Record) -> None:
        """Write the run's totals so far into ``record`` (this recorder's, or a snapshot of it)."""
        record.run["duration_s"] = round(time.time() - self._started, 3)
        g = record.series.get("grad_norm_global")
        steps = self.clock.taken(g is not None and g.last_step == self.clock.step)
        record.run["steps"] = steps
        record.steps = steps
        if self.origin.last_nonfinite is not None:  # did the run come back from it? (rules/nonfinite.py)
            for ev in record.events_of("nonfinite_origin"):
                ev["last_nonfinite_step"] = self.origin.last_nonfinite
        record.run["devices"] = sorted({str(p.device) for m in self.registry.models for _, p in m.params})

    def close(self) -> None:
        """Remove every hook and patch this recorder installed. Idempotent. (The
        TensorBoard sink stays open: the driver gives it the findings and closes it.)"""
        if self._closed:
            return
        self._closed = True
        if self.autosave is not None:
            self.autosave.stop()  # no autosave may land after the final report
        self._remove_hooks()
        self._patched.remove()
        self.finish(final=True)


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
