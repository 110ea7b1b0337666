"""Activation-aware initialisation: ``gv.init_(model, example_batch)``.

The chapter's rule, per Linear/Conv layer, by the activation that *follows it in the
forward pass* (traced, so ``F.relu`` in a custom ``forward`` counts, and names do
not matter):

- ReLU family, and GELU/SiLU/ELU (He works for them): He / Kaiming normal,
  Var(W) = 2 / fan_in (He et al. 2015);
- sigmoid/tanh, or no activation (an output layer, a linear projection): Xavier /
  Glorot normal, Var(W) = 2 / (fan_in + fan_out) (Glorot & Bengio 2010);
- biases zero.

These are the scales the checkup's ``poor_initialization`` rule expects, so a model
initialised here checks clean. Draws from torch's global RNG like ``nn.init``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from ..probes.init_audit import fans
from ..probes.isolated import isolated
from ..probes.topology import ActivationCalls, activation_after, split_batch
from ..taxonomy import HE_FAMILIES, WEIGHT_LAYERS, activation_family


def init_(model: nn.Module, example_batch: Any = None,
          activations: Mapping[str, str | None] | str | None = None) -> list[dict[str, Any]]:
    """Re-initialise every Linear/Conv of ``model`` in place for its activation; biases zero.

    Which activation follows each layer comes from, in order of precedence:
    ``activations`` (a ``{module path: activation name or None}`` mapping, or one name
    for every layer), then a traced forward on ``example_batch`` (same forms as
    :func:`gradvitals.checkup`; run under ``no_grad`` with buffers and RNG restored),
    else the modules' registration order (``nn.Sequential``-style models; a
    functional activation in a custom ``forward`` is invisible then, so pass a batch).

    Returns one dict per layer: ``layer``, ``kind``, ``activation``, ``init``
    (``"he_normal"``/``"xavier_normal"``), ``std``, ``fan_in``, ``fan_out``, ``bias``,
    ``source`` (``"given"``, ``"traced"``, ``"module order"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if activations is not None and not isinstance(activations, (str, Mapping)):
        raise TypeError("activations must be a {module path: activation name} mapping or one activation name "
                        f"(e.g. 'relu'), got {type(activations).__name__}")
    weight_layers = [(n, m) for n, m in model.named_modules() if _is_weight_layer(m)]
    _check_given(activations, {n for n, _ in weight_layers})

    if example_batch is not None:
        found, source = trace_activations(model, example_batch), "traced"
    else:
        found, source = _registration_order(model), "module order"
        if activations is None and any(type(m).__name__ in WEIGHT_LAYERS for m in model.modules()):
            warnings.warn("gv.init_ without example_batch reads activations from module registration order; "
                          "functional activations (F.relu in forward) are invisible. Pass a batch to trace them.",
                          stacklevel=2)

    done = []
    with torch.no_grad():
        for name, mod in weight_layers:
            if isinstance(activations, str):
                act, src = activations, "given"
            elif isinstance(activations, Mapping) and name in activations:
                act, src = activations[name], "given"
            else:
                act, src = found.get(name), source
            family = activation_family(act)
            if act is not None and family is None:
                raise ValueError(f"activations[{name!r}] = {act!r} is not an activation gradvitals knows; "
                                 "use a module or function name such as 'relu', 'gelu', 'tanh', 'sigmoid', or None")
            w = mod.weight
            fan_in, fan_out = fans(w)
            if family in HE_FAMILIES:
                std = math.sqrt(2.0 / fan_in)
                rule = "he_normal"
            else:
                std = math.sqrt(2.0 / (fan_in + fan_out))
                rule = "xavier_normal"
            w.normal_(0.0, std)  # == kaiming_normal_(fan_in, relu) / xavier_normal_(gain=1)
            bias = getattr(mod, "bias", None)
            if isinstance(bias, Tensor):
                bias.zero_()
            done.append({"layer": name, "kind": type(mod).__name__, "activation": act, "init": rule,
                         "std": std, "fan_in": fan_in, "fan_out": fan_out,
                         "bias": "zeros" if isinstance(bias, Tensor) else None, "source": src})
    return done


def _is_weight_layer(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__ in WEIGHT_LAYERS and isinstance(w, Tensor) and not isinstance(w, UninitializedParameter)
            and w.dim() >= 2 and w.numel() > 0)


def _check_given(activations: Any, layers: set[str]) -> None:
    if isinstance(activations, str):
        if activation_family(activations) is None:
            raise ValueError(f"activations={activations!r} is not an activation gradvitals knows; use e.g. "
                             "'relu', 'leaky_relu', 'gelu', 'silu', 'tanh' or 'sigmoid'")
    elif isinstance(activations, Mapping):
        unknown = sorted(set(activations) - layers)
        if unknown:
            raise ValueError(f"activations names modules that are not Linear/Conv layers of the model: "
                             f"{', '.join(unknown[:5])}; allowed: {', '.join(sorted(layers)[:10])}"
                             f"{' ...' if len(layers) > 10 else ''}")


def trace_activations(model: nn.Module, example_batch: Any) -> dict[str, str]:
    """{weight layer path: activation that follows it} from one traced forward.

    The forward runs under ``no_grad`` in the model's current mode; buffers (BatchNorm
    running statistics) and the RNG state are restored afterwards."""
    args, kwargs, _ = split_batch(example_batch)
    names = {id(m): n for n, m in model.named_modules()}
    events: list[tuple[str, str, str]] = []

    def leaf_done(mod: nn.Module, _args: Any, _out: Any) -> None:
        if next(mod.children(), None) is None:
            events.append(("module", names.get(id(mod), ""), type(mod).__name__))

    handles = [m.register_forward_hook(leaf_done) for m in model.modules()]
    try:
        with isolated(model), torch.no_grad(), ActivationCalls(events):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return activation_after(events)


def _registration_order(model: nn.Module) -> dict[str, str]:
    events = [("module", n, type(m).__name__) for n, m in model.named_modules() if next(m.children(), None) is None]
    return activation_after(events)
