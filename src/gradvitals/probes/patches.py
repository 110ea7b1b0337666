"""The few process-wide interception points the probes need, installed while at
least one recorder is active and removed (restored exactly) when the last closes.

- ``Tensor.backward`` / ``torch.autograd.backward``: the loss (a scalar's value,
  kept as a device tensor) and the end of each backward pass.
- ``torch.autograd.grad``: a loss differentiated with respect to the parameters
  directly (loops that set ``p.grad`` themselves), for steps that run no backward.
- ``torch.nn.utils.clip_grad_norm_``: per-parameter norms *before* clipping, the
  total norm and max_norm (did it clip?).
- ``torch.nn.utils.clip_grads_with_norm_`` (torch >= 2.6): the same, for code that takes
  the total norm itself and then scales (accelerate >= 1.x, hence the HF Trainer 5.x,
  clips this way, before the Trainer's ``on_pre_optimizer_step``).
- ``torch.distributed.destroy_process_group``: the end of a torchrun script, the last
  moment every rank can still merge the steps a batched merge holds
  (distributed.Merger.close_batch).
- ``torch.distributed.pipelining``'s stage metadata inference (when that module is
  loaded): at its first step a pipeline stage runs its module forward (and backward) on
  ``torch.empty`` tensors to learn the shapes it will send; those are not training
  forwards, and their statistics would be of uninitialised memory (NaN, huge values).

Each wrapper calls the original with the same arguments and returns its result
unchanged; a listener that raises is reported by its recorder, never propagated.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from typing import Any, Callable

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad
from torch.amp.grad_scaler import GradScaler as _GradScaler

_lock = threading.Lock()
_listeners: list[Any] = []  # recorders, in creation order
_originals: dict[str, Callable[..., Any]] = {}
_depth = threading.local()  # re-entrancy: autograd.backward called by Tensor.backward


def _each(method: str, *args: Any) -> None:
    """Tell every listener (recorder.events.TrainingEvents) that has ``method``."""
    for rec in list(_listeners):
        fn = getattr(rec, method, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except Exception as exc:  # never break the user's run
            rec.fail("patches." + method, exc)


_bookkeeping = threading.local()  # inside a forward torch runs for itself (pipelining metadata)

#: PipelineStage methods that run the stage's module for shapes only (torch >= 2.10 names;
#: earlier releases: _shape_inference).
_PIPELINE_INFERENCE = ("_forward_metadata_inference", "_backward_metadata_inference", "_shape_inference")


def bookkeeping() -> bool:
    """Whether the current forward is one torch runs for its own bookkeeping (a pipeline
    stage's metadata inference): the recorders ignore it."""
    return getattr(_bookkeeping, "n", 0) > 0


def _bookkeeping_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def inference(*args: Any, **kwargs: Any) -> Any:
        _bookkeeping.n = getattr(_bookkeeping, "n", 0) + 1
        try:
            with quiet():  # its backward on ones is not the user's either
                return orig(*args, **kwargs)
        finally:
            _bookkeeping.n -= 1

    return inference


def _pipeline_classes() -> list[type]:
    """The loaded pipeline stage classes (none unless the script imported pipelining)."""
    mod = sys.modules.get("torch.distributed.pipelining.stage")
    return [c for c in (getattr(mod, "PipelineStage", None), getattr(mod, "_PipelineStage", None))
            if isinstance(c, type)] if mod is not None else []


@contextlib.contextmanager
def quiet() -> Any:
    """Backwards and ``autograd.grad`` calls of our own (the NaN origin's backward
    replay): no listener hears them, as for a backward nested in another."""
    _depth.n = getattr(_depth, "n", 0) + 1
    try:
        yield
    finally:
        _depth.n -= 1


def _destroy_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def destroy_process_group(group: Any = None, *args: Any, **kwargs: Any) -> Any:
        _each("before_destroy_process_group", group)
        return orig(group, *args, **kwargs)

    return destroy_process_group


def _backward_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def backward(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        outer = getattr(_depth, "n", 0) == 0
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            if outer and _listeners:
                _each("backward_start", tensor)
            result = orig(tensor, *args, **kwargs)
        finally:
            _depth.n -= 1
        if outer and _listeners:
            # The gradient it was seeded with (Tensor.backward's ``gradient``,
            # autograd.backward's ``grad_tensors``): None for a plain loss.backward().
            seed = args[0] if args else kwargs.get("gradient", kwargs.get("grad_tensors"))
            _each("backward_end", tensor, seed)
        return result

    return backward


def _grad_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def grad(outputs: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        result = orig(outputs, inputs, *args, **kwargs)
        if _listeners and getattr(_depth, "n", 0) == 0:
            seed = args[0] if args else kwargs.get("grad_outputs")
            _each("autograd_grad", outputs, inputs, seed)
        return result

    return grad


def _clip_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def clip_grad_norm_(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
        if not _listeners:
            return orig(parameters, max_norm, *args, **kwargs)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        else:
            parameters = list(parameters)  # the original does the same: a generator is read once
        norm_type = kwargs.get("norm_type", args[0] if args else 2.0)
        _each("clip_start", parameters, max_norm, norm_type)
        _depth.clip = True
        try:
            total = orig(parameters, max_norm, *args, **kwargs)
        finally:
            _depth.clip = False
        _each("clip_end", total, max_norm)
        return total

    return clip_grad_norm_


def _clip_with_norm_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: Any, *args: Any, **kwargs: Any) -> Any:
        if not _listeners or getattr(_depth, "clip", False):  # inside clip_grad_norm_: seen there
            return orig(parameters, max_norm, total_norm, *args, **kwargs)
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        _each("clip_start", parameters, max_norm)
        result = orig(parameters, max_norm, total_norm, *args, **kwargs)
        _each("clip_end", total_norm, max_norm)
        return result

    return clip_grads_with_norm_


def _scale_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def scale(scaler: Any, outputs: Any) -> Any:
        result = orig(scaler, outputs)
        if _listeners:
            _each("loss_scaled", result, scaler, outputs)
        return result

    return scale


def _scaler_step_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def step(scaler: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        if _listeners:
            _each("scaler_step_begin", optimizer)
        result = orig(scaler, optimizer, *args, **kwargs)
        if _listeners:
            _each("scaler_step_end", optimizer)
        return result

    return step


_kept: list[Any] = []  # wrappers registered as TorchScript builtins (see _as_builtin)


def _as_builtin(wrapper: Any, original: Any) -> None:
    """Register ``wrapper`` as the TorchScript builtin ``original`` is (private API: a
    torch without it only loses scripting through the wrapper)."""
    try:
        from torch.jit import _builtins

        op = _builtins._get_builtin_table().get(id(original))
        if op is not None:
            _builtins._register_builtin(wrapper, op)
            _kept.append(wrapper)  # the table holds its id: it must never be reused
    except Exception:
        pass


class PatchHandle:
    """What :func:`install` returns: ``remove()`` takes the listener off again
    (torch.utils.hooks.RemovableHandle style; idempotent)."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener

    def remove(self) -> None:
        uninstall(self.listener)


def install(recorder: Any) -> PatchHandle:
    """Add a listener (recorder.events.TrainingEvents methods it has are called); the
    patches go in with the first one."""
    handle = PatchHandle(recorder)
    with _lock:
        if recorder in _listeners:
            return handle
        _listeners.append(recorder)
        if len(_listeners) > 1:
            return handle
        _originals["Tensor.backward"] = torch.Tensor.backward
        _originals["autograd.backward"] = torch.autograd.backward
        _originals["autograd.grad"] = torch.autograd.grad
        _originals["clip"] = torch.nn.utils.clip_grad_norm_
        _originals["clip_mod"] = torch.nn.utils.clip_grad.clip_grad_norm_
        torch.Tensor.backward = _backward_wrapper(torch.Tensor.backward)  # type: ignore[method-assign]
        torch.autograd.backward = _backward_wrapper(torch.autograd.backward)
        torch.autograd.grad = _grad_wrapper(torch.autograd.grad)
        # TorchScript maps these functions to its builtins by identity: a function scripted
        # while they are wrapped must still find aten::backward / aten::grad (else it tries to
        # compile the wrapper and the user's torch.jit.script fails).
        _as_builtin(torch.autograd.backward, _originals["autograd.backward"])
        _as_builtin(torch.autograd.grad, _originals["autograd.grad"])
        wrapped = _clip_wrapper(_originals["clip"])
        torch.nn.utils.clip_grad_norm_ = wrapped
        torch.nn.utils.clip_grad.clip_grad_norm_ = wrapped
        if hasattr(torch.nn.utils, "clip_grads_with_norm_"):
            _originals["clip_with_norm"] = torch.nn.utils.clip_grads_with_norm_
            torch.nn.utils.clip_grads_with_norm_ = _clip_with_norm_wrapper(_originals["clip_with_norm"])
        if torch.distributed.is_available():
            import torch.distributed.distributed_c10d as c10d

            _originals["destroy_pg"] = c10d.destroy_process_group
            torch.distributed.destroy_process_group = c10d.destroy_process_group = _destroy_wrapper(
                _originals["destroy_pg"])
        # GradScaler: the loss it scales (recorded unscaled) and the steps it skips.
        _originals["scaler.scale"] = _GradScaler.scale
        _originals["scaler.step"] = _GradScaler.step
        _GradScaler.scale = _scale_wrapper(_GradScaler.scale)  # type: ignore[method-assign]
        _GradScaler.step = _scaler_step_wrapper(_GradScaler.step)  # type: ignore[method-assign]
        for cls in _pipeline_classes():
            for name in _PIPELINE_INFERENCE:
                if name in vars(cls):
                    _originals[f"pipeline:{cls.__name__}.{name}"] = vars(cls)[name]
                    setattr(cls, name, _bookkeeping_wrapper(vars(cls)[name]))
    return handle


def uninstall(recorder: Any) -> None:
    with _lock:
        if recorder not in _listeners:
            return
        _listeners.remove(recorder)
        if _listeners or not _originals:
            return
        torch.Tensor.backward = _originals.pop("Tensor.backward")  # type: ignore[method-assign]
        torch.autograd.backward = _originals.pop("autograd.backward")
        torch.autograd.grad = _originals.pop("autograd.grad")
        torch.nn.utils.clip_grad_norm_ = _originals.pop("clip")
        torch.nn.utils.clip_grad.clip_grad_norm_ = _originals.pop("clip_mod")
        if "clip_with_norm" in _originals:
            torch.nn.utils.clip_grads_with_norm_ = _originals.pop("clip_with_norm")
        if "destroy_pg" in _originals:
            import torch.distributed.distributed_c10d as c10d

            torch.distributed.destroy_process_group = c10d.destroy_process_group = _originals.pop("destroy_pg")
        _GradScaler.scale = _originals.pop("scaler.scale")  # type: ignore[method-assign]
        _GradScaler.step = _originals.pop("scaler.step")  # type: ignore[method-assign]
        for cls in _pipeline_classes():
            for name in _PIPELINE_INFERENCE:
                key = f"pipeline:{cls.__name__}.{name}"
                if key in _originals:
                    setattr(cls, name, _originals.pop(key))


def active() -> list[Any]:
    return list(_listeners)
