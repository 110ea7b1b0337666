"""Where the first NaN/Inf came from: the step's forward replayed under a check of
every module's output (then its backward, for a gradient born there), else the
recorded series; one ``nonfinite_origin`` event. Runs once per run, on the flush
that first fetched a non-finite watched value (see record.QUANTITIES ``watched``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import distributed
from .. import torch_compat
from ..probes.nonfinite import replay_backward, replay_forward
from ..probes.norms import fused_norms
from ..record import Record, split_key
from .registry import Registry


class OriginLocator:
    def __init__(self, owner: Any, registry: Registry, record: Record, enabled: bool) -> None:
        self.owner = owner  # the Recorder: the distributed merge reads it
        self.registry = registry
        self.record = record
        self.enabled = enabled  # Options.nonfinite_origin
        self.done = False
        self.replaying = False  # the backward replay runs a forward of ours: the tracer stays out
        self.last_nonfinite: int | None = None  # the last step any watched value was NaN/Inf
        self.stashed: dict[str, Any] | None = None  # found alone, recorded when the merge lands

    def seen(self, nonfinite: list[tuple[int, str, float]]) -> None:
        """A flush fetched these non-finite watched values ((step, key, value) each)."""
        last = max(s for s, _, _ in nonfinite)
        if self.last_nonfinite is None or last > self.last_nonfinite:
            self.last_nonfinite = last
        if self.done:
            self.gather_stashed()  # this rank searched alone: gathered now, with every rank
            return
        self.done = True
        self.owner.staging.drain()
        try:
            self.locate(nonfinite)
        except Exception as exc:
            self.owner.fail("nonfinite_origin", exc)

    def seen_alone(self, nonfinite: list[tuple[int, str, float]]) -> None:
        """This rank's own values of a step whose merge waits in a batch hold these
        NaN/Inf (distributed.Merger.start): the origin is searched for now, while the
        weights and inputs are still this step's, and recorded when the merged values
        land (:meth:`seen`, where every rank gathers its own)."""
        if self.done:
            return
        self.done = True
        self.owner.staging.drain()
        try:
            event = self.locate(nonfinite, gather=False)
            self.stashed = None if event is None else {**event, "_alone": True}  # (distributed.Merger.merge_origin)
        except Exception as exc:
            self.owner.fail("nonfinite_origin", exc)

    def record_stashed(self) -> None:
        """The run ends with an origin found alone whose merge never landed: this
        rank's own, as it is."""
        if self.stashed is None:
            return
        event, self.stashed = self.stashed, None
        event.pop("_alone", None)
        rank, world = distributed.rank_and_world()
        self.record.event("nonfinite_origin", **{**event, "rank": rank, "ranks": [rank], "world_size": world})

    def _record(self, event: dict[str, Any], due: bool = False) -> None:
        merged = distributed.merge_origin(self.owner, event, due)  # multi-rank: the first bad rank's origin
        if merged is None:  # gathered at this rank's next flush, with the ranks that learn of it then
            self.stashed = event
            return
        self.record.event("nonfinite_origin", **merged)

    def gather_stashed(self, due: bool = False) -> None:
        """Gather and record the origin this rank stashed (found alone in a batch, or held
        for its next flush: ``due``, distributed.collect_merged)."""
        if self.stashed is None:
            return
        event, self.stashed = self.stashed, None
        try:
            self._record(event, due)
        except Exception as exc:
            self.owner.fail("nonfinite_origin", exc)

    def _depth(self, name: str, missing: int) -> int:
        layer = self.record.layers.get(self.record.layer_of(name))
        return layer.depth if layer is not None and layer.depth is not None else missing

    def locate(self, seen: list[tuple[int, str, float]], gather: bool = True) -> dict[str, Any] | None:
        """Find and record the origin (``gather``: merged with every rank's first);
        without ``gather`` the event is returned, not recorded."""
        step = min(s for s, _, _ in seen)
        first = [x for x in seen if x[0] == step]
        value = "nan" if any(math.isnan(v) for _, _, v in first) else "inf"
        event: dict[str, Any] = {"step": step, "seen_in": sorted({k for _, k, _ in first})[:8],
                                 "value": value}
        found = None
        if self.enabled:
            for model in self.registry.models:
                if model.last_inputs is None:
                    continue
                args, kwargs = model.last_inputs
                target, collective = distributed.replay_plan(self.owner, model.module)
                if target is None:
                    event["replay"] = distributed.no_replay_reason(self.owner)
                    continue
                if found is not None and not collective:
                    continue  # found already; an FSDP/TP model is still replayed (the others do)
                if collective:
                    fsdp = torch_compat.has_fsdp(model.module)
                    event["replay"] = "every rank (FSDP)" if fsdp else "every rank (tensor parallel)"
                res = replay_forward(target, model.names, args, kwargs, collective=collective)
                event["forward_checked"] = True
                if found is None and res is not None:
                    found = res
                    event["source"] = "replay"
        grads = [(split_key(k)[1], v) for _, k, v in first if split_key(k)[0] == "grad_norm" and "/" in k]
        loss_bad = any(split_key(k)[0] == "loss" for _, k, _ in first)
        if found is not None and found.pop("dropped", False) and grads and not loss_bad:
            # The forward's NaN/Inf was dropped before the output (a torch.where guard): the
            # finite loss's backward carries the op's NaN/Inf derivative into the gradients.
            # value: the gradients' (the series'); dropped_value: what the op made in the forward.
            found = {**found, "kind": "gradient", "dropped_in_forward": True,
                     "dropped_value": found.get("value"), "value": value}
            event["source"] = "replay"
            backward = self.replay_backward(event)  # the backward node, where one process can replay it
            if backward is not None and backward.get("module") == found.get("module"):
                backward.pop("value", None)
                found = {**found, **backward}
        if found is None and grads and not loss_bad and event.get("forward_checked"):
            found = self.replay_backward(event)
        if found is None:
            if loss_bad and not event.get("forward_checked"):
                # No forward to replay (none recorded: a functional model, hooks that
                # never ran): the loss may only carry what a weight already held.
                found = self.nonfinite_weight()
                event.setdefault("forward_checked", False)
            if found is not None:
                pass
            elif loss_bad:
                found = {"kind": "loss", "module": None, "value": value}
            elif grads:
                # Backward runs from the output to the input: the deepest layer with a
                # non-finite gradient is where it began.
                name, v = max(grads, key=lambda g: self._depth(g[0], -1))
                found = {"kind": "gradient", "module": self.record.layer_of(name), "param": name,
                         "value": "nan" if math.isnan(v) else "inf"}
                if math.isinf(v) and self.grad_elements_finite(name):
                    # Elements up to ~1e19 are finite, but their float32 norm is not.
                    found["kind"] = "norm_overflow"
            else:
                q, name = split_key(first[0][1])
                found = {"kind": "activation" if q.startswith("act_") else "weight",
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
        if not gather:
            return event
        self._record(event)
        return None

    def replay_backward(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The forward was finite and a gradient is not: replay each model's last forward
        and its backward, from the loss the model returns or, for a model that returns
        logits, from its outputs with a surrogate seed (probes/nonfinite.py). Not under
        torch.distributed (a replayed backward would need every rank)."""
        if distributed.initialized():
            return None
        for model in self.registry.models:
            if model.last_inputs is None:
                continue
            args, kwargs = model.last_inputs
            self.replaying = True
            try:
                seed, res = replay_backward(model.module, model.names, args, kwargs)
            except Exception as exc:  # e.g. out of memory for a second graph: the next model may still tell
                event.setdefault("backward_replay_error", type(exc).__name__)
                continue
            finally:
                self.replaying = False
            event["backward_checked"] = event.get("backward_checked", False) or seed is not None
            if seed is not None:
                event["backward_seed"] = seed  # "loss" (the model's own) or "surrogate" (from its outputs)
            if res is not None:
                event["source"] = "replay"
                if seed == "surrogate":
                    # The seed's size decides between Inf and NaN there: the run's own
                    # value (from the series) stays.
                    res.pop("value", None)
                return res
        return None

    def nonfinite_weight(self) -> dict[str, Any] | None:
        """The first parameter, in forward order, holding NaN/Inf (one sync per device;
        NaN path only), as an origin; None when every weight is finite."""
        named = [(n, p) for m in self.registry.models for n, p in m.params]
        seen = {id(p) for _, p in named}
        for o in self.registry.opts.values():  # parameters of no module (a functional model)
            named += [(n, p) for n, p in zip(o.names, o.params) if id(p) not in seen]
        named = [(n, p) for n, p in named if not p.is_sparse]
        if not named:
            return None
        with torch.no_grad():
            norms = fused_norms([p.detach() for _, p in named]).tolist()
        bad = [(n, p) for (n, p), v in zip(named, norms) if not math.isfinite(v)]
        for name, p in sorted(bad, key=lambda b: self._depth(b[0], 1 << 30)):
            w = torch_compat.local_tensors([p.detach()])[0]
            if not bool(torch.isfinite(w).all()):  # not merely a norm past float32's range
                value = "nan" if bool(torch.isnan(w).any()) else "inf"
                layer = self.record.layer_of(name)
                return {"kind": "weight", "module": layer if layer in self.record.layers else name,
                        "param": name, "value": value}
        return None

    def grad_elements_finite(self, name: str) -> bool:
        """Whether a parameter's gradient holds only finite values (one sync; NaN path only)."""
        for m in self.registry.models:
            for n, p in m.params:
                if n == name and p.grad is not None and not p.grad.is_sparse:
                    return bool(torch.isfinite(p.grad).all())
        return False
