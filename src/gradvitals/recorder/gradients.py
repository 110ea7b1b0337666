"""Gradient norms, weight norms, update ratios and clipping, at each optimizer step.

One code path measures a step: the per-parameter gradient norms (one fused
``_foreach_norm`` when the parameters allow it), the loss and the learning rates go
to the staging's pending list, the scheduled probes (weight norms and a copy of the
weights for the update ratio) join them, and the staging flushes. The steady state
of a run (an unscheduled step with nothing else pending) takes a switch inside it:
its few scalars are read in one go and appended straight to their series.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import distributed
from ..probes.norms import foreach_norm, fused_norms
from ..record import Record, Series, series_key
from ..torch_compat import local_tensors
from .hyperparams import GroupFacts
from .losses import LossTracker
from .options import Options, scheduled
from .registry import Registry, WatchedOptimizer
from .staging import Staging, cpu_floats

#: The one-read path of steady steps on (tests turn it off to compare it with the general path).
FAST_PATH = True
#: CPU weight snapshots (for update ratios) are kept between scheduled steps up to this
#: size: a fresh multi-MB allocation page-faults on every scheduled step. Larger
#: models, and every accelerator (its caching allocator reuses blocks), allocate per
#: scheduled step.
SNAPSHOT_KEEP_BYTES = 64 * 2**20


class Steady(NamedTuple):
    """The series a steady step's values go to: its norms' row and its loss's (if any)."""
    norms: list[Series]
    loss: list[Series] | None


class GradientMeter:
    def __init__(self, owner: Any, options: Options, registry: Registry, staging: Staging,
                 losses: LossTracker, record: Record) -> None:
        self.owner = owner  # the Recorder: its step
        self.options = options
        self.registry = registry
        self.staging = staging
        self.losses = losses
        self.record = record
        self.manual_before: tuple[list[str], list[Tensor], list[Tensor], Tensor] | None = None
        self.groups = GroupFacts(registry, record)
        self.clip_covers_all = False  # set by clip_start, read by clip_end
        # (registry version, ids of a clip call's parameters) -> whether they are exactly the
        # trainable parameters: a loop clips the same list every step
        self._clip_same: tuple[tuple[int, tuple[int, ...]], bool] | None = None

    # ------------------------------------------------------------ norms
    def grad_norms(self, o: WatchedOptimizer | None) -> tuple[list[str], Any] | None:
        """(keys, per-parameter norms: a float32 vector, or a list of 0-d tensors on
        the fast path, stacked with the step's other scalars in the flush)."""
        if o is None:
            named = self.registry.trainable()
            params = [p for _, p in named]
            keys = [series_key("grad_norm", n) for n, _ in named]
        else:
            params, keys = o.params, o.keys
        grads = [p.grad for p in params]
        if self.registry.unseen_grads:
            self.registry.note_grads_seen(params)
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

    # ------------------------------------------------------------ a step
    def measure(self, o: WatchedOptimizer | None) -> None:
        """Measure the step ``o`` is about to take (None: a backward without optimizer)."""
        st = self.staging
        step = self.owner.step
        lrs: list[tuple[str, Any]] = []
        due = scheduled(self.options, step)
        if o is not None:
            opt = o.ref()
            self.registry.opt_params(o, opt)
            groups = opt.param_groups
            if len(o.lr_keys) != len(groups):
                o.lr_keys = [series_key("lr", f"{o.label}.{i}") for i in range(len(groups))]
            if self.groups.due(o, due):
                self.groups.note(o, opt, step)  # host values only: no sync
            rows = self.steady(o, due, groups) if FAST_PATH else None
            if rows is not None and self._one_read(o, step, groups, rows):
                return
            measured = o.preclip or self.grad_norms(o)
            o.preclip = None
            lrs = [(k, g.get("lr")) for k, g in zip(o.lr_keys, groups)]
        else:
            measured = self.grad_norms(None)
        if measured is not None:
            # The global norm is taken on the host from the fetched per-parameter norms
            # (see Staging.flush); several optimizers of a step add up there.
            st.pending.append((step, measured[0], measured[1]))
        self.losses.forward_since_flush = False
        loss = self.losses.take()
        if loss is not None:
            if o is not None:
                if o.loss_keys[0] != o.loss_key:
                    o.loss_keys = [o.loss_key]
                lkeys = o.loss_keys
            else:
                lkeys = ["loss"]
            st.pending.append((step, lkeys, [loss]))
        self._learning_rates(o, step, lrs)
        if o is not None and due and o.params:
            with torch.no_grad():
                weights = [p.detach() for p in o.params]
                wnorm = torch.stack(foreach_norm(weights)) if o.fast else fused_norms(weights)
                if len(o.wkeys) != len(o.names):
                    o.wkeys = [series_key("weight_norm", n) for n in o.names]
                    o.ukeys = [series_key("update_ratio", n) for n in o.names]
                st.pending.append((step, o.wkeys, wnorm))
                o.before = (o.ukeys, self.snapshot(o, weights), wnorm)
        st.flush()

    def _learning_rates(self, o: WatchedOptimizer | None, step: int, lrs: list[tuple[str, Any]]) -> None:
        st = self.staging
        series = self.record.series
        plain = o is not None and st.tensorboard is None and st.merger is None
        for key, lr in lrs:
            if isinstance(lr, Tensor):
                st.pending.append((step, [key], [lr.detach().float().reshape(())]))
                plain = False
                if st.ring_rows:
                    st.drain()  # earlier float values of this lr may wait there
        if plain and all(isinstance(lr, (int, float)) for _, lr in lrs):
            # Python floats: to the ring with the gradient norms (appended in bulk).
            self._lr_series(o, series)
            st.ring_push(tuple(o.lr_keys), o.lr_series, step, [float(lr) for _, lr in lrs])
        else:
            for key, lr in lrs:
                if lr is not None and not isinstance(lr, Tensor):
                    st.drain()  # in order after what waits there
                    st.series(key).append(step, float(lr))

    def _lr_series(self, o: WatchedOptimizer, series: dict[str, Series]) -> None:
        if len(o.lr_series) != len(o.lr_keys) or o.lr_series_of is not series:
            o.lr_series = [self.staging.series(k) for k in o.lr_keys]
            o.lr_series_of = series

    def steady(self, o: WatchedOptimizer, due: bool, groups: list[dict[str, Any]]) -> Steady | None:
        """The series rows to append to when this step is the steady state of a run:
        unscheduled (``due`` false), every parameter with a dense gradient on one device
        (``o.fast``), Python-float learning rates, at most one loss, nothing else pending,
        no TensorBoard, no process group, and the series rows already built (a parameter
        set's first step goes the general way). None otherwise. Changes nothing."""
        st = self.staging
        losses = self.losses.pending
        if (due or not st.idle() or o.preclip is not None or self.registry.unseen_grads or len(losses) > 1
                or not o.fast):
            return None
        norm_row = st.steady_row(o.tkeys)
        if norm_row is None:
            return None
        if len(o.lr_series) != len(groups) or o.lr_series_of is not self.record.series:
            return None
        for g in groups:
            lr = g.get("lr")
            if type(lr) is not float and type(lr) is not int:
                return None
        for p in o.params:
            if p.grad is None:
                return None
        loss_row = None
        if losses:
            loss = losses[0]
            if (loss.dtype != torch.float32 or loss.device != o.params[0].grad.device
                    or o.loss_keys[0] != o.loss_key):
                return None
            loss_row = st.steady_row(tuple(o.loss_keys))
            if loss_row is None:
                return None
        return None if distributed.initialized() else Steady(norm_row, loss_row)

    def _one_read(self, o: WatchedOptimizer, step: int, groups: list[dict[str, Any]], rows: Steady) -> bool:
        """A steady step, measured: its norms and loss read in one go and appended to
        their series (a NaN/Inf goes the general flush's way, with the values read).
        False, having changed nothing, when the fused norm refuses the gradients."""
        st = self.staging
        grads = [p.grad for p in o.params]
        try:
            norms = foreach_norm(grads)
        except Exception:  # a gradient unlike its parameter (dtype, layout): general path
            o.fast = False
            return False
        self.losses.forward_since_flush = False
        loss = self.losses.take()
        if loss is not None:
            norms = [*norms, loss]
        st.ring_push(tuple(o.lr_keys), o.lr_series, step, [float(g.get("lr")) for g in groups])
        if grads[0].is_cpu:  # in host memory already: read where they are, no stack
            values = cpu_floats(norms)
        else:
            values = torch.stack(norms).tolist()  # THE host sync of the step
        n = len(grads)
        vals = values[:n] if loss is not None else values
        lossv = values[n] if loss is not None else 0.0
        total = math.hypot(*vals)
        if not (math.isfinite(total) and math.isfinite(lossv)):
            # The general flush's handling (the global norm, the culprits, the origin
            # search), fed the values just read (float32: the same values).
            st.pending.append((step, o.keys, torch.tensor(vals, dtype=torch.float32)))
            if loss is not None:
                st.pending.append((step, o.loss_keys, [torch.tensor(lossv, dtype=torch.float32)]))
            st.flush()
            return True
        st.add_global_norm(step, vals, [], total)
        st.ring_push(o.tkeys, rows.norms, step, vals)
        if loss is not None:
            for s in rows.loss or ():
                s.append(step, lossv)
        if st.progress is not None:
            st.progress.update(self.record)  # reads the values just fetched; never raises
        return True

    # ------------------------------------------------------- weights
    def snapshot(self, o: WatchedOptimizer, weights: list[Tensor]) -> list[Tensor]:
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
        # DTensors (FSDP2, tensor parallel): their local parts, so that a mix with plain
        # tensors (a model tensor-parallel in some layers only) is one foreach call.
        return torch._foreach_mul(local_tensors(weights), 1.0)

    def update_ratio(self, o: WatchedOptimizer) -> None:
        """``o`` has stepped: |W_after - W_before| / |W_before| of a scheduled step (pending)."""
        if o.before is None:
            return
        keys, before, wnorm = o.before
        o.before = None
        with torch.no_grad():
            # In place into the snapshot (ours): before - after has the same norm
            # as after - before, without allocating a second copy.
            torch._foreach_sub_(before, local_tensors([p.detach() for p in o.params]))
            dnorm = torch.stack(foreach_norm(before)) if o.fast else fused_norms(before)
            ratio = dnorm / wnorm.clamp_min(1e-12)
        self.staging.pending.append((self.owner.step, keys, ratio))

    def manual_update_ratio(self) -> None:
        """No optimizer (``p.data.add_(p.grad, alpha=-lr)``): the update is the weight
        change between two backward passes, recorded for the step that made it."""
        if self.manual_before is None:
            return
        names, params, before, wnorm = self.manual_before
        self.manual_before = None
        with torch.no_grad():
            dnorm = fused_norms(torch._foreach_sub([p.detach() for p in params], before))
        self.staging.pending.append((self.owner.step - 1, [series_key("update_ratio", n) for n in names],
                                     dnorm / wnorm.clamp_min(1e-12)))

    def keep_manual_weights(self) -> None:
        """A scheduled step without optimizer: the weights now, to compare at the next backward."""
        with torch.no_grad():
            named = self.registry.trainable()
            params = [p for _, p in named]
            if params:
                self.manual_before = ([n for n, _ in named], params,
                                      torch._foreach_mul([p.detach() for p in params], 1.0),
                                      fused_norms([p.detach() for p in params]))

    # ------------------------------------------------------- clipping
    def clip_start(self, parameters: list, norm_type: Any = 2.0) -> None:
        """Norms before clipping, for the optimizer whose parameters are clipped."""
        ids = {id(p) for p in parameters[:4]}
        # Whether this call clips every gradient gradvitals measures: then the norm it
        # returns must equal grad_norm_global (rules/distributed.grad_norm_misreported).
        self.clip_covers_all = False
        try:
            l2 = float(norm_type) == 2.0
        except (TypeError, ValueError):
            l2 = False
        if l2:
            self.clip_covers_all = self._clips_every_gradient(parameters)
        for o in self.registry.opts.values():
            opt = o.ref()
            if opt is None:
                continue
            self.registry.opt_params(o, opt)
            if any(id(p) in ids for p in o.params):
                o.preclip = self.grad_norms(o)

    def _clips_every_gradient(self, parameters: list) -> bool:
        """Whether the gradients among ``parameters`` are exactly those of the trainable
        parameters. When the call's parameters are the trainable ones (cached per list:
        a loop clips the same list every step), that is "some gradient exists";
        otherwise the two sets of gradients are compared."""
        key = (self.registry.version, tuple(map(id, parameters)))
        if self._clip_same is None or self._clip_same[0] != key:
            self._clip_same = (key, set(key[1]) == {id(p) for _, p in self.registry.trainable()})
        if self._clip_same[1]:
            return any(getattr(p, "grad", None) is not None for p in parameters)
        clipped = {id(p) for p in parameters if getattr(p, "grad", None) is not None}
        return bool(clipped) and clipped == {id(p) for _, p in self.registry.trainable() if p.grad is not None}

    def clip_end(self, total: Any, max_norm: float) -> None:
        if not isinstance(total, Tensor):
            return
        if not math.isfinite(float(max_norm)):
            return  # clip_grad_norm_(params, inf) only measures (HF max_grad_norm=0): nothing clips
        t = total.detach().float().reshape(1)
        clipped = (t > float(max_norm)).float()
        step = self.owner.step
        self.staging.pending.append((step, ["clip_total_norm", "clip_clipped"], torch.cat([t, clipped])))
        if self.clip_covers_all:
            self.clip_covers_all = False
            rank = distributed.rank_and_world()[0]
            self.staging.pending.append((step, [series_key("clip_rank_norm", str(rank))], t))
        self.record.add("clip_max_norm", step, float(max_norm))
