"""Adaptive gradient clipping (AGC), unit-wise, as in NFNets.

Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021 (arXiv:2102.06171), section 3 / Eq. 3: for each unit i
(a row of a weight matrix: one output neuron or conv filter, all its fan-in)

    G_i <- G_i                                  if |G_i| / max(|W_i|, eps) <= lambda
    G_i <- lambda * max(|W_i|, eps) / |G_i| * G_i   otherwise

so no unit's step can exceed ``lambda`` times its weights' norm (times the lr):
the update ratio is capped where it matters. Vectors and scalars (biases, norm
gains) are one unit each, as in the paper's reference code. The paper does not clip
the final classifier layer: pass ``model.body.parameters()`` to follow it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import torch
from torch import Tensor

#: A unit whose gradient norm is below this is left alone (avoids 0/0; timm uses 1e-6).
_GRAD_FLOOR = 1e-6


def clip_grad_agc_(parameters: Tensor | Iterable[Tensor], clipping: float = 0.01, eps: float = 1e-3) -> int:
    """Clip gradients unit-wise in place so that |G_i| <= clipping * max(|W_i|, eps).

    ``clipping`` is lambda (the paper uses 0.01-0.16; smaller for larger batches);
    ``eps`` keeps zero-initialised units trainable. Returns how many units were
    clipped. The fused ``torch._foreach_*`` ops run on the device without syncing;
    the returned count is the one host sync (one per device the parameters live on).
    Non-finite gradients stay non-finite (AGC does not hide a NaN).
    """
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) or not math.isfinite(clipping) \
            or clipping <= 0:
        raise ValueError(f"clipping must be a positive finite number (lambda, e.g. 0.01), got {clipping!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number (e.g. 1e-3), got {eps!r}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        try:
            parameters = list(parameters)
        except TypeError:
            raise TypeError("parameters must be a tensor or an iterable of tensors (e.g. model.parameters()), "
                            f"got {type(parameters).__name__}") from None
    for p in parameters:
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters must contain tensors, got a {type(p).__name__}")

    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError("clip_grad_agc_ does not support sparse gradients (nn.Embedding(sparse=True))")
        weights, grads = groups[(p.device, p.grad.dtype)]
        weights.append(p.detach())
        grads.append(p.grad.detach())

    counts: list[Tensor] = []
    with torch.no_grad():
        for weights, grads in groups.values():
            w_norms = [unit_norms(w) for w in weights]
            g_norms = [unit_norms(g) for g in grads]
            # max_norm_i = clipping * max(|W_i|, eps); scale_i = min(1, max_norm_i / max(|G_i|, floor))
            max_norms = torch._foreach_clamp_min(w_norms, eps)
            torch._foreach_mul_(max_norms, clipping)
            scales = torch._foreach_div(max_norms, torch._foreach_clamp_min(g_norms, _GRAD_FLOOR))
            torch._foreach_clamp_max_(scales, 1.0)
            # A unit with a NaN/Inf gradient gets a NaN/0 scale: it stays non-finite, the others are unaffected.
            clipped = torch.cat([(g > m).reshape(-1) for g, m in zip(g_norms, max_norms)])
            torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scales, grads)])
            counts.append(clipped.sum())
    if not counts:
        return 0
    return int(sum(int(c.item()) for c in counts))  # the host sync: one per device


def unit_norms(t: Tensor) -> Tensor:
    """L2 norm per unit, shaped to broadcast against ``t``: over all dims but the first
    (rows of a Linear weight, filters of a Conv) for 2-D+ tensors; the whole tensor for
    vectors and scalars. Accumulated in float32 at least."""
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if t.dim() <= 1:
        return torch.linalg.vector_norm(t, dtype=dtype)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True, dtype=dtype)
