"""Fused L2 norms of many tensors, grouped by device and dtype (like clip_grad_norm_).

Returns one float32 vector on the first tensor's device; never syncs with the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ..torch_compat import local_tensors

_FOREACH_DTYPE_ARG = True  # torch >= 2.3 takes dtype= in _foreach_norm; probed once below


def _foreach_norm(tensors: list[Tensor]) -> list[Tensor]:
    global _FOREACH_DTYPE_ARG
    if tensors and tensors[0].dtype == torch.float64:
        # dtype=float32 would narrow float64 inside the kernel (a RuntimeError): take
        # the norm in float64, then convert.
        return [n.float() for n in torch._foreach_norm(tensors, 2)]
    if _FOREACH_DTYPE_ARG:
        try:
            # float32 accumulation: a half-precision norm overflows at 65504.
            return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
        except TypeError:
            _FOREACH_DTYPE_ARG = False
    return [n.float() for n in torch._foreach_norm([t.float() for t in tensors], 2)]


foreach_norm = _foreach_norm  # one device, one dtype: the recorder's hot path


def fused_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norm of each tensor, as one float32 vector (order kept), no host sync."""
    if not tensors:
        return torch.zeros(0)
    tensors = local_tensors(tensors)  # FSDP2 DTensors: the local shard (merged across ranks later)
    home = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    sparse: list[int] = []
    for i, t in enumerate(tensors):
        if t.is_sparse:
            sparse.append(i)
        else:
            groups[(t.device, t.dtype)].append(i)
    if len(groups) == 1 and not sparse:
        return torch.stack(_foreach_norm(tensors))
    out: list[Tensor | None] = [None] * len(tensors)
    for (device, _), idx in groups.items():
        norms = _foreach_norm([tensors[i] for i in idx])
        for i, n in zip(idx, norms):
            out[i] = n if device == home else n.to(home, non_blocking=True)
    for i in sparse:
        # A sparse gradient's norm is that of its (coalesced) values.
        out[i] = torch.linalg.vector_norm(tensors[i].coalesce().values().float()).to(home)
    return torch.stack(out)  # type: ignore[arg-type]
