"""Activation statistics of one module output, computed on the device.

One call returns a small float32 vector ``[mean, std, zero_frac, sat_frac,
nonfinite_frac]`` (``sat_frac`` is NaN for non-saturating modules) and updates the
module's per-unit "ever positive" mask for dead-unit detection. No host sync.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..taxonomy import SATURATING_FAMILIES, activation_family

STAT_NAMES = ("act_mean", "act_std", "act_zero_frac", "act_sat_frac", "act_nonfinite_frac")

#: A sigmoid output within 0.01 of 0 or 1 has derivative < 0.0099 (max 0.25): its
#: gradient is mostly gone. tanh beyond |0.99| has derivative < 0.02 (max 1).
SIGMOID_SAT_MARGIN = 0.01
TANH_SAT_LEVEL = 0.99

#: Scheduled forwards whose per-unit activity masks are OR-ed to decide "never
#: active over the window": 4 batches x batch size samples.
DEAD_WINDOW = 4

_NAN = float("nan")

#: Above this many elements CPU count_nonzero leaves its fast path (see stats()).
_COUNT_NONZERO_MAX = 32768


def first_tensor(output: object) -> Tensor | None:
    """The main tensor of a module output (LSTM returns (out, (h, c)))."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    return None


def saturation_kind(module: nn.Module) -> str | None:
    fam = activation_family(type(module).__name__)
    if fam in SATURATING_FAMILIES:
        return fam
    if type(module).__name__ in ("RNN", "LSTM", "GRU"):
        return "tanh"  # their outputs are tanh-bounded (LSTM: o * tanh(c))
    return None


def unit_dim(x: Tensor, hint: int | None) -> int:
    """Which dim indexes units: features for (N, F)/(N, L, F), channels for (N, C, H, W)."""
    if hint is not None:
        return hint if x.dim() > abs(hint) or hint == -1 else -1
    return 1 if x.dim() in (2, 4, 5) else -1


def stats(x: Tensor, sat: str | None) -> Tensor:
    """[mean, std, zero_frac, sat_frac, nonfinite_frac] of x as float32, on x's device."""
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    n = x.numel()
    if n == 0:
        return torch.full((5,), _NAN, device=x.device)
    v = x.reshape(-1)
    inv = 1.0 / n
    # Raw sums and counts first, stacked, then scaled to [mean, std, fractions] by one
    # multiply: each 0-d op is a kernel dispatch, which costs more than the arithmetic.
    # Two passes (sum, then the norm of the centred values) instead of var_mean: CPU
    # var_mean is a Welford loop ~10-20x slower, and centring keeps the float32 error
    # ~1e-7 relative (no E[x^2]-E[x]^2 cancellation). Not linalg.vector_norm of the
    # centred values: it accumulates naively, ~3e-5 relative error at 1e5 elements.
    total = v.sum()
    centred_sq = (v - total * inv).square().sum()
    # CPU count_nonzero slows ~50x past its 32768-element grain on half-zero data
    # (ReLU outputs); an equality mask summed as integers is exact and steady there.
    if n <= _COUNT_NONZERO_MAX:
        zeros = n - torch.count_nonzero(v)
    else:
        zeros = (v == 0).sum()
    if sat == "sigmoid":
        satc = ((v < SIGMOID_SAT_MARGIN) | (v > 1 - SIGMOID_SAT_MARGIN)).sum()
    elif sat == "tanh":
        satc = (v.abs() > TANH_SAT_LEVEL).sum()
    else:
        satc = None
    # v - v is 0 for a finite element and NaN for NaN/Inf: its nonzeros count the
    # non-finite elements. Mostly zeros, so count_nonzero is fast on it, ~4x cheaper
    # than counting isfinite's mask.
    nonfinite = torch.count_nonzero(v - v)
    if satc is None:
        counts = torch.stack([zeros, zeros, nonfinite]).float()  # the middle one is replaced by NaN
    else:
        counts = torch.stack([zeros, satc, nonfinite]).float()
    raw = torch.cat([torch.stack([total.float(), centred_sq.float()]), counts])
    out = raw * _scale(n, satc is None, raw.device)
    out[1:2].sqrt_()  # variance -> std
    return out


_SCALES: dict[tuple[int, bool, torch.device], Tensor] = {}


def _scale(n: int, no_sat: bool, device: torch.device) -> Tensor:
    """[1/n, 1/n, 1/n, 1/n or NaN, 1/n]: turns stats()' raw sums into means (NaN: no
    saturation statistic for this module)."""
    key = (n, no_sat, device)
    t = _SCALES.get(key)
    if t is None:
        if len(_SCALES) > 4096:  # many shapes (variable sequence lengths): stay bounded
            _SCALES.clear()
        inv = 1.0 / n
        t = _SCALES[key] = torch.tensor([inv, inv, inv, _NAN if no_sat else inv, inv],
                                        dtype=torch.float32, device=device)
    return t


class DeadUnits:
    """Per-unit "ever positive" masks over the last DEAD_WINDOW scheduled forwards."""

    __slots__ = ("masks",)

    def __init__(self) -> None:
        self.masks: list[Tensor] = []

    def update(self, x: Tensor, dim: int) -> Tensor:
        """Fraction of units never positive over the window, as a 0-d float32 tensor."""
        x = x.detach()
        if x.dim() == 0:
            return torch.full((), _NAN, device=x.device)
        dim = dim % x.dim()
        if x.dim() == 1:
            active = x > 0
        elif dim == x.dim() - 1:  # (N, F), (N, L, F): one reduction over the leading rows
            active = x.reshape(-1, x.shape[-1]).amax(0) > 0
        elif dim == 1:  # (N, C, ...): the spatial dims first, then the batch (CPU amax
            # over dims (0, 2, 3) at once is up to ~3x slower)
            active = x.flatten(2).amax(2).amax(0) > 0
        else:
            active = torch.amax(x, dim=tuple(d for d in range(x.dim()) if d != dim)) > 0
        if self.masks and self.masks[-1].shape != active.shape:
            self.masks.clear()  # the layer changed shape (e.g. variable width): restart
        self.masks.append(active)
        if len(self.masks) > DEAD_WINDOW:
            self.masks.pop(0)
        ever = self.masks[0] if len(self.masks) == 1 else torch.stack(self.masks).any(0)
        return 1.0 - ever.float().mean()


def bn_samples(module: nn.Module, args: tuple) -> tuple[int, int] | None:
    """(batch size, samples per channel) a BatchNorm layer normalises over. Shapes only."""
    if not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if x.dim() < 2:
        return None
    return int(x.shape[0]), int(math.prod(x.shape) // x.shape[1])
