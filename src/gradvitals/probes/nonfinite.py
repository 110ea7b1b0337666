"""Where did the first NaN/Inf come from? Replay the step's forward with tracing.

Runs only when the recorder has seen a non-finite value (zero steady-state cost).
The replay re-runs the model's last forward on its last inputs under ``no_grad``
while the weights are still the ones that produced the NaN (the optimizer has not
stepped yet), checking the output of every torch function call; the first call
that turns finite inputs into non-finite outputs is the origin, attributed to the
innermost module running it. RNG state and buffers (BatchNorm running stats) are
restored afterwards, so the run's numbers do not change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


def _tensors(obj: Any) -> list[Tensor]:
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]


def _bad(ts: list[Tensor]) -> str | None:
    """'nan' / 'inf' if any tensor holds one (syncs: replay only)."""
    for t in ts:
        if t.numel() == 0 or t.is_sparse:
            continue
        if torch.isnan(t).any():
            return "nan"
        if torch.isinf(t).any():
            return "inf"
    return None


class _Tracer(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.origin: dict[str, Any] | None = None
        self.input_bad: dict[str, Any] | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.origin is None:
            outs = _tensors(out)
            value = _bad(outs) if outs else None
            if value is not None:
                ins = _tensors((args, kwargs))
                module = self.stack[-1] if self.stack else None
                if _bad(ins) is None:
                    self.origin = {"op": getattr(func, "__name__", str(func)), "module": module,
                                   "value": value}
                elif self.input_bad is None:
                    self.input_bad = {"op": getattr(func, "__name__", str(func)), "module": module,
                                      "value": _bad(ins)}
        return out


def replay_forward(model: nn.Module, names: dict[int, str], args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Re-run ``model(*args, **kwargs)`` traced; return the origin of the first NaN/Inf.

    ``names`` maps id(module) -> the name to report. Returns None when the forward is
    finite. The result has ``module``, ``op``, ``value`` and ``kind``: "activation"
    (an op made finite inputs non-finite), "weight" (the module's own parameters are
    non-finite) or "input" (the model's input already held NaN/Inf).
    """
    if _bad(_tensors((args, kwargs))) is not None:
        first = next(iter(names.values()), None)
        return {"kind": "input", "module": names.get(id(model)) or first, "op": None,
                "value": _bad(_tensors((args, kwargs)))}
    stack: list[str] = []
    handles = []

    def pre(mod: nn.Module, _a: Any) -> None:
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod: nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    buffers = [b for b in model.buffers()]
    saved = [b.detach().clone() for b in buffers]
    devices = sorted({b.device.index for b in model.parameters() if b.device.type == "cuda"} - {None})
    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        tracer = _Tracer(stack)
        with torch.random.fork_rng(devices=devices), torch.no_grad(), tracer:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
    found = tracer.origin or tracer.input_bad
    if found is None:
        return None
    kind = "activation"
    mod_name = found.get("module")
    for m in model.modules():
        if names.get(id(m)) == mod_name:
            if _bad([p.detach() for p in m.parameters(recurse=False)]) is not None:
                kind = "weight"
            break
    found["kind"] = kind
    return found
