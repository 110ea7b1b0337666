"""Hand-built records for rule tests: no torch, every number chosen at a threshold."""

from __future__ import annotations

import math
from typing import Callable, Iterable

from gradvitals.record import LayerInfo, ParamInfo, Record


class Build:
    """A small fluent builder over :class:`Record` for rule tests.

    ``mlp(n)`` makes ``layers.0 .. layers.{n-2}`` Linear layers each followed by an
    activation module ``acts.i``, and a ``head`` Linear, with forward depths in order.
    """

    def __init__(self) -> None:
        self.record = Record()
        self._depth = 0

    # -- structure ----------------------------------------------------------
    def layer(self, name: str, kind: str, *, activation_after: str | None = None,
              params: dict[str, list[int]] | None = None, depth: bool = True,
              model: str = "", **extra: object) -> Build:
        layer = LayerInfo(name=name, kind=kind, depth=self._depth if depth else None,
                          activation_after=activation_after, model=model, extra=dict(extra))
        if depth:
            self._depth += 1
        for pname, shape in (params or {}).items():
            full = f"{name}.{pname}"
            numel = math.prod(shape)
            self.record.params[full] = ParamInfo(name=full, layer=name, shape=list(shape), numel=numel,
                                                 in_optimizer=True, grad_seen=True)
            layer.params.append(full)
        self.record.layers[name] = layer
        return self

    def mlp(self, n: int = 6, act: str = "ReLU", width: int = 64, model: str = "") -> Build:
        for i in range(n - 1):
            self.layer(f"layers.{i}", "Linear", activation_after=act,
                       params={"weight": [width, width], "bias": [width]}, model=model)
            self.layer(f"acts.{i}", act, model=model)
        self.layer("head", "Linear", params={"weight": [10, width], "bias": [10]}, model=model)
        return self

    def weights(self) -> list[str]:
        return [p for p, info in self.record.params.items() if len(info.shape) >= 2]

    # -- series -------------------------------------------------------------
    def series(self, key: str, values: dict[int, float] | Iterable[float]) -> Build:
        items = values.items() if isinstance(values, dict) else enumerate(values)
        for step, v in items:
            self.record.add(key, int(step), float(v))
        self.record.steps = max(self.record.steps, max((s for s, _ in self.record.series[key]), default=0) + 1)
        return self

    def loss(self, values: Iterable[float]) -> Build:
        return self.series("loss", values)

    def grads(self, steps: Iterable[int], grad: Callable[[int, int, str], float],
              weight: float = 5.0) -> Build:
        """grad(step, index, param) for every weight param (and weight norms) on ``steps``;
        biases get a gradient 1000x larger than their weight's to prove they are ignored."""
        steps = list(steps)
        weights = self.weights()
        for i, p in enumerate(weights):
            for s in steps:
                self.record.add(f"grad_norm/{p}", s, grad(s, i, p))
                self.record.add(f"weight_norm/{p}", s, weight)
        for p, info in self.record.params.items():
            if len(info.shape) == 1:
                for s in steps:
                    self.record.add(f"grad_norm/{p}", s, 1e3)
                    self.record.add(f"weight_norm/{p}", s, 1.0)
        self.record.steps = max(self.record.steps, max(steps) + 1)
        return self

    def ratios(self, steps: Iterable[int], ratio: Callable[[int, int, str], float],
               grad: float = 0.5, weight: float = 5.0) -> Build:
        """update_ratio (and a non-zero grad/weight norm) for every weight param on ``steps``."""
        steps = list(steps)
        for i, p in enumerate(self.weights()):
            for s in steps:
                self.record.add(f"update_ratio/{p}", s, ratio(s, i, p))
                self.record.add(f"grad_norm/{p}", s, grad)
                self.record.add(f"weight_norm/{p}", s, weight)
        self.record.steps = max(self.record.steps, max(steps) + 1)
        return self

    def event(self, event_type: str, /, **data: object) -> Build:
        self.record.event(event_type, **data)
        return self


def falling_loss(n: int, start: float = 2.3, end: float = 0.2) -> list[float]:
    """A healthy exponential decay with a small deterministic wiggle."""
    return [end + (start - end) * math.exp(-5 * i / n) * (1 + 0.05 * math.sin(i)) for i in range(n)]


def flat_loss(n: int, level: float = 2.3, wiggle: float = 0.01) -> list[float]:
    return [level * (1 + wiggle * math.sin(1.7 * i)) for i in range(n)]
