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

#: A weight layer followed by a *functional* sigmoid/tanh (``torch.tanh(self.fc(x))``,
#: no module to hook) is measured on its output, the pre-activation: tanh(x) > 0.99
#: exactly where |x| > atanh(0.99), sigmoid(x) within 0.01 of its bounds where
#: |x| > logit(0.99). Same band as the modules', read one op earlier.
PRE_TANH_LEVEL = math.atanh(TANH_SAT_LEVEL)
PRE_SIGMOID_LEVEL = math.log((1.0 - SIGMOID_SAT_MARGIN) / SIGMOID_SAT_MARGIN)

#: Scheduled forwards whose per-unit activity masks are OR-ed to decide "never
#: active over the window": 4 batches x batch size samples.
DEAD_WINDOW = 4

_NAN = float("nan")



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
        if getattr(module, "nonlinearity", "tanh") == "relu":
            return None  # nn.RNN(nonlinearity="relu"): unbounded, nothing to saturate
        return "tanh"  # their outputs are tanh-bounded (LSTM: o * tanh(c))
    return None


def preactivation_kind(activation_after: str | None) -> str | None:
    """"pre_tanh"/"pre_sigmoid" for a weight layer whose output goes into a functional
    tanh/sigmoid (``torch.tanh`` -> "tanh"; the caller checks it is no module's: an
    ``nn.Tanh`` is measured on its own output instead)."""
    if activation_after in ("tanh", "sigmoid"):
        return "pre_" + activation_after
    return None


def unit_dim(x: Tensor, hint: int | None) -> int:
    """Which dim indexes units: features for (N, F)/(N, L, F), channels for (N, C, H, W)."""
    if hint is not None:
        return hint if x.dim() > abs(hint) or hint == -1 else -1
    return 1 if x.dim() in (2, 4, 5) else -1


def stats(x: Tensor, sat: str | None) -> Tensor:
    """[mean, std, zero_frac, sat_frac, nonfinite_frac] of x as float32, on x's device."""
    x = x.detach()
    if x.numel() == 0:
        return torch.full((5,), _NAN, device=x.device)
    return batch_stats([x], sat)[0]


class Scratch:
    """Kept CPU work buffers for the statistics' temporaries. A fresh multi-MB CPU
    allocation page-faults every time it is touched (a scheduled step of a 20-layer
    MLP spent ~4 ms of its ~4.5 ms of statistics there); these are allocated once and
    reused. Bounded: requests above ``max_numel`` (per buffer) allocate as usual, and
    so does every accelerator tensor (the caching allocator already reuses blocks)."""

    __slots__ = ("bufs", "max_numel")

    def __init__(self, max_numel: int = 2**20) -> None:
        self.bufs: dict[int, Tensor] = {}
        self.max_numel = max_numel

    def get(self, slot: int, rows: int, n: int, like: Tensor) -> Tensor | None:
        """A (rows, n) float32 view of buffer ``slot``, or None (allocate instead)."""
        need = rows * n
        if like.device.type != "cpu" or need > self.max_numel:
            return None
        buf = self.bufs.get(slot)
        if buf is None or buf.numel() < need:
            buf = self.bufs[slot] = torch.empty(max(need, 2**16), dtype=torch.float32)
        return buf[:need].view(rows, n)


def stack_rows(xs: list[Tensor], scratch: Scratch | None = None) -> Tensor:
    """Tensors of one numel as the rows of a (k, numel) tensor (a view when k = 1)."""
    n = xs[0].numel()
    if len(xs) == 1:
        return xs[0].detach().reshape(1, n)
    rows = [x.detach().reshape(n) for x in xs]
    out = scratch.get(0, len(xs), n, xs[0]) if scratch is not None and xs[0].dtype == torch.float32 else None
    if out is None:
        return torch.stack(rows)
    return torch.stack(rows, out=out)


def batch_stats(xs: list[Tensor], sat: str | None, scratch: Scratch | None = None) -> Tensor:
    """Row i = :func:`stats` of ``xs[i]`` (see :func:`row_stats`)."""
    return row_stats(stack_rows(xs, scratch), sat, scratch)


def row_stats(X: Tensor, sat: str | None, scratch: Scratch | None = None) -> Tensor:
    """Row i = :func:`stats` of row i of ``X`` (tensors of one numel, dtype and device):
    one set of kernels for all of them (each kernel dispatch costs more than the
    arithmetic on small outputs; a 20-layer MLP's 40 module outputs take ~12 kernels
    instead of ~600). Shape (len(xs), 5), float32, no host sync. ``X`` is not changed.

    Only float arithmetic and float sums, all vectorised: CPU reductions over bool
    masks (``(x == 0).sum()``, ``count_nonzero`` past its 32,768-element grain) run
    3-10x slower than a float pass of the same length. The variance is centred (sum,
    then the sum of squares about the mean): float32 error ~1e-7 relative, no
    E[x^2]-E[x]^2 cancellation; not var_mean, a Welford loop 10-20x slower on the CPU.
    """
    k, n = X.shape
    if X.dtype != torch.float32:
        X = X.float()
    # One temporary, reused by each statistic in turn (a kept buffer on the CPU).
    c = scratch.get(1, k, n, X) if scratch is not None else None
    if c is None:
        c = torch.empty_like(X)
    total = X.sum(1)
    if X.device.type == "cpu":
        fast = _raw_moment_stats(X, total, n, c, sat)
        if fast is not None:
            return fast
    torch.sub(X, (total * (1.0 / n)).unsqueeze(1), out=c)
    centred_sq = c.mul_(c).sum(1)
    # x - x is 0 for a finite element and NaN for NaN/Inf: as 0/1, their count.
    nonfinite = torch.sub(X, X, out=c).nan_to_num_(1.0).sum(1)
    # Non-zeros, NaN and Inf included (NaN != 0): zeros = n - those. A float 0/1 out of
    # the comparison, summed as floats (one pass each, not a bool reduction).
    nonzero = torch.ne(X, 0.0, out=c).sum(1)
    if sat == "sigmoid":
        satc = _count_above(torch.sub(X, 0.5, out=c).abs_(), 0.5 - SIGMOID_SAT_MARGIN)
    elif sat == "tanh":
        satc = _count_above(torch.abs(X, out=c), TANH_SAT_LEVEL)
    elif sat in _PRE_LEVELS:
        satc = _count_above(torch.abs(X, out=c), _PRE_LEVELS[sat])
    else:
        satc = nonfinite  # replaced by NaN in the scale
    raw = torch.stack([total, centred_sq, nonzero.neg_().add_(n), satc, nonfinite], 1)
    out = raw.mul_(_scale(n, sat is None, raw.device))
    out[:, 1].sqrt_()  # variance -> std
    return out


#: The raw-moment variance E[x^2] - E[x]^2 is used only where E[x^2] <= this x the
#: variance (|mean| <= ~10 std): float32 rounding then costs at most ~1e-5 of the
#: variance. Beyond it (a near-constant output, mean 1000 std 0.01) the centred pass.
RAW_MOMENT_MAX_RATIO = 100.0


def _raw_moment_stats(X: Tensor, total: Tensor, n: int, c: Tensor, sat: str | None) -> Tensor | None:
    """:func:`row_stats` of a CPU ``X`` in three passes instead of eight (five with a
    saturation count): the sum, the sum of squares (one fused norm kernel, nothing
    written) and the non-zero count, finished on the host (a CPU tensor's values are
    there already: no device sync; a few floats of arithmetic instead of a dozen
    small tensor ops). The non-finite count and the centred variance are skipped
    where the host sees they are not needed: a finite sum of squares means every
    element is finite (a NaN or Inf makes it NaN or Inf; finite values past ~1.8e19
    overflow it and take the exact path), and the raw moments are used only where
    they are well conditioned (RAW_MOMENT_MAX_RATIO). Returns None otherwise: the
    caller takes the exact path."""
    l2 = torch.linalg.vector_norm(X, 2, dim=1)
    nonzero = torch.ne(X, 0.0, out=c).sum(1)
    parts = [total, l2, nonzero]
    satc = saturation_count(X, sat, c)
    if satc is not None:
        parts.append(satc)
    rows = []
    for v in cpu_values(torch.stack(parts, 1)):
        row = finish_raw(v, n, sat)
        if row is None:
            return None
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def saturation_count(X: Tensor, sat: str | None, c: Tensor) -> Tensor | None:
    """Per row of ``X``, how many elements sit in the saturated band (None: the module
    does not saturate). ``c``: a temporary of X's shape. NaN never counts."""
    if sat == "sigmoid":
        return torch.sub(X, 0.5, out=c).abs_().gt_(0.5 - SIGMOID_SAT_MARGIN).sum(1)
    if sat == "tanh":
        return torch.abs(X, out=c).gt_(TANH_SAT_LEVEL).sum(1)
    if sat in _PRE_LEVELS:
        return torch.abs(X, out=c).gt_(_PRE_LEVELS[sat]).sum(1)
    return None


_PRE_LEVELS = {"pre_tanh": PRE_TANH_LEVEL, "pre_sigmoid": PRE_SIGMOID_LEVEL}


def finish_raw(v: list[float], n: int, sat: str | None) -> list[float] | None:
    """[mean, std, zero_frac, sat_frac, nonfinite_frac] from one row's raw sums
    ``[sum, L2 norm, non-zeros(, saturated)]`` over ``n`` elements, on the host; None
    when they cannot be trusted (a non-finite sum of squares: NaN/Inf or overflow;
    E[x^2] beyond RAW_MOMENT_MAX_RATIO x the variance): the exact passes are needed."""
    inv = 1.0 / n
    msq = v[1] * v[1] * inv
    mean = v[0] * inv
    var = msq - mean * mean
    if not (math.isfinite(msq) and var * RAW_MOMENT_MAX_RATIO >= msq):
        return None
    return [mean, math.sqrt(max(var, 0.0)), (n - v[2]) * inv, v[3] * inv if sat else _NAN, 0.0]


def cpu_values(t: Tensor) -> list:
    """The values of a CPU tensor: already in host memory, so reading them is no
    device synchronisation (the sync counter of benchmarks/overhead.py does not count
    reads made here). Refuses any other device: an accelerator tensor read here would
    be a hidden sync."""
    if t.device.type != "cpu":
        raise ValueError(f"cpu_values() reads CPU tensors only, got one on {t.device}")
    with torch._C.DisableTorchFunction():  # past any tracing mode active (init audit, topology)
        return t.tolist()


def _count_above(a: Tensor, level: float) -> Tensor:
    """Per row, how many elements of ``a`` (>= 0, or NaN) exceed ``level``; NaN never
    counts. In place on ``a`` (a temporary)."""
    return a.sub_(level).clamp_(min=0).sign_().nan_to_num_(0.0).sum(1)


_SCALES: dict[tuple[int, bool, torch.device], Tensor] = {}


def _scale(n: int, no_sat: bool, device: torch.device) -> Tensor:
    """[1/n, 1/n, 1/n, 1/n or NaN, 1/n]: turns batch_stats()' raw sums into means
    (NaN: no saturation statistic for this module)."""
    key = (n, no_sat, device)
    t = _SCALES.get(key)
    if t is None:
        if len(_SCALES) > 4096:  # many shapes (variable sequence lengths): stay bounded
            _SCALES.clear()
        inv = 1.0 / n
        t = _SCALES[key] = torch.tensor([inv, inv, inv, _NAN if no_sat else inv, inv],
                                        dtype=torch.float32, device=device)
    return t


def active_units(x: Tensor, dim: int) -> Tensor:
    """Per unit along ``dim``: whether any element of ``x`` is positive (bool)."""
    x = x.detach()
    dim = dim % x.dim()
    if x.dim() == 1:
        return x > 0
    if dim == x.dim() - 1:  # (N, F), (N, L, F): one reduction over the leading rows
        return x.reshape(-1, x.shape[-1]).amax(0) > 0
    if dim == 1:  # (N, C, ...): the spatial dims first, then the batch (CPU amax
        # over dims (0, 2, 3) at once is up to ~3x slower)
        return x.flatten(2).amax(2).amax(0) > 0
    return torch.amax(x, dim=tuple(d for d in range(x.dim()) if d != dim)) > 0


def batch_active_units(X: Tensor, shape: torch.Size, dim: int) -> Tensor:
    """:func:`active_units` of each row of ``X`` (k rows, each a tensor of ``shape``
    flattened), as a (k, units) bool tensor."""
    k = X.shape[0]
    dim = dim % len(shape)
    if len(shape) == 1:
        return X > 0
    if dim == len(shape) - 1:
        return X.reshape(k, -1, shape[-1]).amax(1) > 0
    if dim == 1:
        return X.reshape(k, shape[0], shape[1], -1).amax(3).amax(1) > 0
    Y = X.reshape(k, *shape)
    return torch.amax(Y, dim=tuple(d + 1 for d in range(len(shape)) if d != dim)) > 0


class DeadUnits:
    """One module's per-unit "ever positive" masks (shape (units,)) over its last
    DEAD_WINDOW scheduled forwards, whichever way each forward was measured (alone, or
    with other modules in one kernel: :func:`push_group`), so that the window never
    restarts when the way changes and a merge across ranks reads the same window."""

    __slots__ = ("masks",)

    def __init__(self) -> None:
        self.masks: list[Tensor] = []

    def update(self, x: Tensor, dim: int) -> Tensor:
        """Fraction of units never positive over the window, as a 0-d float32 tensor."""
        if x.dim() == 0:
            return torch.full((), _NAN, device=x.device)
        return self.push(active_units(x, dim))

    def add(self, active: Tensor) -> None:
        """Add this forward's mask (no kernel)."""
        if self.masks and self.masks[-1].shape != active.shape:
            self.masks.clear()  # the layer changed shape (e.g. variable width): restart
        self.masks.append(active)
        if len(self.masks) > DEAD_WINDOW:
            self.masks.pop(0)

    def ever(self) -> Tensor:
        """Per unit: positive in some forward of the window."""
        return self.masks[0] if len(self.masks) == 1 else torch.stack(self.masks).any(0)

    def push(self, active: Tensor) -> Tensor:
        """Add this forward's mask; the never-active fraction over the window."""
        self.add(active)
        return _never_fraction(self.ever())


def _never_fraction(ever: Tensor) -> Tensor:
    """The fraction of units (last dimension) never active, from their "ever" flags."""
    return ever.float().mean(-1).neg_().add_(1.0)


def push_group(windows: list[DeadUnits], active: Tensor) -> Tensor:
    """Add a group's masks (``active``: (modules, units), one row per window) and return
    each module's never-active fraction over its own window, in one stack and one
    reduction when the windows are as long as each other (modules measured together
    every forward), else window by window."""
    rows = active.unbind(0)
    for w, row in zip(windows, rows):
        w.add(row)
    n = len(windows[0].masks)
    if all(len(w.masks) == n for w in windows):
        ever = torch.stack([m for w in windows for m in w.masks]).view(len(windows), n, -1).any(1)
    else:
        ever = torch.stack([w.ever() for w in windows])
    return _never_fraction(ever)


def bn_samples(module: nn.Module, args: tuple) -> tuple[int, int] | None:
    """(batch size, samples per channel) a BatchNorm layer normalises over. Shapes only."""
    if not args or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if x.dim() < 2:
        return None
    return int(x.shape[0]), int(math.prod(x.shape) // x.shape[1])
