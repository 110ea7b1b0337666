"""``gv.checkup(model, batch)``: a preflight exam at step 0, before hours of compute.

One forward and one backward pass on a real batch, recorded by the same
:class:`~gradvitals.recorder.Recorder` a watched run uses (activation statistics per
layer in forward order, gradient norm per parameter, the activation that follows
each weight layer) plus the init/architecture audit (``probes/init_audit.py``).
The same rules then diagnose the step-0 record, so a checkup's findings carry the
same codes, evidence and advice as a run's, and its report is the same JSON contract.

No optimizer step is taken, and the model is left exactly as it was: parameters,
their ``.grad`` (the original tensors are put back), buffers such as BatchNorm's
running statistics, every module's train/eval flag, and the torch RNG state (CPU and
the model's CUDA devices). While it runs, the checkup holds one copy of the
parameters and buffers, so it can restore them if the model's own forward writes to
them (spectral norm, weight-norm hooks); it copies back only what changed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .probes.norms import fused_norms
from .probes.topology import split_batch
from .recorder import Options, Recorder
from .report import Report

LossFn = Callable[[Any, Any], Tensor]


def checkup(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> Report:
    """Diagnose ``model`` at step 0 on one real ``batch``; returns a :class:`Report`.

    ``batch`` is what the training loop feeds the model:

    - a tensor ``x`` -> ``model(x)``;
    - a tuple/list ``(inputs, targets)`` -> ``model(inputs)`` (``model(*inputs)`` when
      ``inputs`` is a tuple/list, ``model(**inputs)`` when it is a dict); ``(inputs,)``
      has no targets;
    - a dict -> ``model(**batch)`` (Hugging Face style; targets = ``batch["labels"]``
      if present).

    ``loss_fn(output, targets)`` makes the scalar loss (for a dict batch it gets the
    whole batch as ``targets``). Without it: the output's own ``.loss`` / ``["loss"]``
    if it has one (Hugging Face models given labels); else cross-entropy when
    ``targets`` are integer class labels that match the output (classes on dim 1, or
    on the last dim for sequences); else the mean of the output, which still sends
    a gradient through every layer, so signal propagation is measured either way.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (output, targets) -> scalar tensor, got {type(loss_fn).__name__}")
    call_args, call_kwargs, targets = split_batch(batch)

    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    saved_grads = [p.grad for p in params]
    saved_values = [t.detach().clone() for t in params + buffers]
    versions = [t._version for t in params + buffers]
    devices = sorted({t.device.index for t in params + buffers if t.device.type == "cuda" and t.device.index is not None})

    recorder = Recorder(Options(every=1), command="gv.checkup")
    recorder.record.run["mode"] = "checkup"
    started = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            for p in params:
                p.grad = None
            if not model.training:
                model.train()  # a preflight of training: dropout on, BatchNorm on batch statistics
            recorder.add_model(model)
            output = model(*call_args, **call_kwargs)
            loss, how = compute_loss(output, targets, batch, loss_fn)
            recorder.record.run["checkup_loss"] = how
            loss.backward()
            _weight_norms(recorder, step=0)
    finally:
        recorder.close()
        with torch.no_grad():
            # Parameters: a forward that writes them bumps their version counter. Buffers:
            # BatchNorm's kernel updates running stats without bumping it, so compare values.
            # Copy back only what changed (a copy_ would bump a version an autograd graph saved).
            for i, (t, value, version) in enumerate(zip(params + buffers, saved_values, versions)):
                if t._version != version or (i >= len(params) and not torch.equal(t, value)):
                    t.copy_(value)
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, training in flags:
            m.training = training
    recorder.record.run["checkup_s"] = round(time.perf_counter() - started, 3)
    return Report.from_record(recorder.record)


def _weight_norms(recorder: Recorder, step: int) -> None:
    """``weight_norm/<param>`` at step 0, as a run records them at its optimizer step
    (a checkup has none): the rules read gradients relative to weights."""
    named = [(n, p.detach()) for m in recorder.models for n, p in m.params if p.requires_grad]
    if not named:
        return
    norms = fused_norms([p for _, p in named]).tolist()  # one host sync
    for (name, _), value in zip(named, norms):
        recorder.record.add(f"weight_norm/{name}", step, value)


def compute_loss(output: Any, targets: Any, batch: Any, loss_fn: LossFn | None) -> tuple[Tensor, str]:
    """The scalar the checkup backpropagates and which one it is (see :func:`checkup`)."""
    if loss_fn is not None:
        loss = loss_fn(output, batch if isinstance(batch, Mapping) else targets)
        how = "loss_fn"
    else:
        loss = _own_loss(output)
        how = "output.loss"
        if loss is None:
            out = _main_tensor(output)
            if out is None:
                raise TypeError(f"cannot find a tensor in the model's output ({type(output).__name__}); "
                                "pass loss_fn=lambda output, targets: ...")
            loss = _cross_entropy(out, targets)
            how = "cross_entropy"
            if loss is None:
                loss, how = out.float().mean(), "mean of output"
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("loss must be a scalar tensor that requires grad "
                         f"(got {type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}); "
                         "check loss_fn and that the model has trainable parameters")
    return loss.reshape(()), how


def _own_loss(output: Any) -> Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.numel() == 1 else None


def _main_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("logits", "last_hidden_state"):
            if isinstance(output.get(key), Tensor):
                return output[key]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            t = _main_tensor(item)
            if t is not None:
                return t
    return None


def _cross_entropy(out: Tensor, targets: Any) -> Tensor | None:
    """Cross-entropy when ``targets`` are class indices matching ``out``, else None."""
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool or not out.is_floating_point() or out.dim() < 2:
        return None
    classes_last = out.shape[:-1] == targets.shape  # (N, L, C) with (N, L)
    classes_dim1 = out.dim() == targets.dim() + 1 and out.shape[0] == targets.shape[0] \
        and out.shape[2:] == targets.shape[1:]
    if not (classes_last or classes_dim1):
        return None
    n_classes = out.shape[-1] if classes_last else out.shape[1]
    valid = targets[targets != -100]  # cross_entropy's ignore_index
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_classes):
        return None
    if classes_last and not classes_dim1:
        return F.cross_entropy(out.reshape(-1, n_classes).float(), targets.reshape(-1))
    return F.cross_entropy(out.float(), targets)
