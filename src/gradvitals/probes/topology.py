"""Forward-order topology: which module runs at which depth, and which activation
follows each weight layer (module or function call, e.g. ``F.relu``); and how an
example batch becomes the traced forward's call (:func:`split_batch`, shared by the
checkup and ``init_``).

Runs on one traced forward only (the first recorded step), so its cost is paid once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..taxonomy import TRANSPARENT_LAYERS, WEIGHT_LAYERS, activation_family


class ActivationCalls(TorchFunctionMode):
    """Notes every functional activation call (torch.relu, F.gelu, ...) into ``events``."""

    def __init__(self, events: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if activation_family(name) is not None:
            self.events.append(("func", name.rstrip("_"), ""))
        return func(*args, **(kwargs or {}))


def activation_after(events: list[tuple[str, str, str]]) -> dict[str, str]:
    """Map each weight layer to the first activation called after it.

    ``events`` is the forward's sequence of ("module", path, kind) leaf calls (in
    completion order) and ("func", name, "") functional activations. Normalisation,
    dropout and pooling are looked through; the next weight layer ends the search.
    """
    result: dict[str, str] = {}
    pending: list[str] = []
    for what, name, kind in events:
        if what == "module":
            if kind in WEIGHT_LAYERS:
                pending = [name]
                continue
            fam = activation_family(kind)
            if fam is not None:
                for p in pending:
                    result.setdefault(p, kind)
                pending = []
            elif kind not in TRANSPARENT_LAYERS:
                pending = []
        else:  # functional activation
            for p in pending:
                result.setdefault(p, name)
            pending = []
    return result


def functional_activations(events: list[tuple[str, str, str]]) -> set[str]:
    """Weight layers whose output goes straight into an activation function called by
    the user's code (``torch.tanh(self.fc(x))``), not by a module's forward (``nn.Tanh``
    calls ``torch.tanh`` itself: its module event follows the call)."""
    after = activation_after(events)
    out: set[str] = set()
    pending: list[str] = []
    for i, (what, name, kind) in enumerate(events):
        if what == "module":
            # Only a function applied right to the layer's output: after a LayerNorm or a
            # dropout in between, the layer's output is not the pre-activation.
            pending = [name] if kind in WEIGHT_LAYERS else []
            continue
        nxt = events[i + 1] if i + 1 < len(events) else None
        by_module = (nxt is not None and nxt[0] == "module"
                     and activation_family(nxt[2]) == activation_family(name))
        if not by_module:
            out.update(p for p in pending if after.get(p) == name)
        pending = []
    return out


def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """(positional args, keyword args, targets) for ``model(...)`` from a batch."""
    if isinstance(batch, Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        if not batch:
            raise ValueError("batch is an empty dict; give the model's inputs, e.g. {'input_ids': ...}")
        return (), dict(batch), batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) not in (1, 2):
            raise ValueError(f"batch must be a tensor, a dict, (inputs,) or (inputs, targets); "
                             f"got a {type(batch).__name__} of length {len(batch)}")
        inputs = batch[0]
        targets = batch[1] if len(batch) == 2 else None
        if isinstance(inputs, Mapping):
            return (), dict(inputs), targets
        if isinstance(inputs, (tuple, list)):
            return tuple(inputs), {}, targets
        return (inputs,), {}, targets
    raise TypeError(f"batch must be a tensor, a dict, (inputs,) or (inputs, targets); got {type(batch).__name__}")
