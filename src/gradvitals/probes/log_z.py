"""The log-partition of a softmax: log Z = logsumexp of the logits over the class dim.

A model's output logits drift so that log Z moves far from 0 when nothing holds the
softmax's normaliser in place (PaLM's z-loss does); this reads it off the logits that
enter ``cross_entropy``. Device tensors only (no host sync), computed in float32 over
chunks of rows so that a large vocabulary never needs a full float32 copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements per chunk of the float32 copy logsumexp makes (16 MB): a 50k vocabulary
#: takes ~80 tokens at a time.
CHUNK_NUMEL = 1 << 22


def log_z_stats(logits: Tensor, dim: int, keep: Tensor | None = None) -> Tensor:
    """[mean, max] of log Z over the tokens of ``logits`` (class dim ``dim``); ``keep``:
    a bool mask of the tokens to count (shape of ``logits`` without ``dim``, e.g. the
    targets that are not ignore_index). NaN for both when no token counts."""
    with torch.no_grad():
        x = logits.detach().movedim(dim, -1)
        classes = x.shape[-1]
        try:
            rows = x.view(-1, classes)
            parts = [rows]
        except RuntimeError:  # not viewable as rows (class dim not innermost): one slice at a time
            parts = [s.reshape(-1, classes) for s in x.unbind(0)] if x.dim() > 1 else [x.reshape(1, -1)]
        lz = torch.cat([torch.logsumexp(p[i:i + max(1, CHUNK_NUMEL // max(classes, 1))].float(), dim=-1)
                        for p in parts for i in range(0, p.shape[0], max(1, CHUNK_NUMEL // max(classes, 1)))])
        if not lz.numel():
            return torch.full((2,), torch.nan, device=lz.device)
        if keep is None or keep.numel() != lz.numel():
            count = torch.tensor(float(lz.numel()), device=lz.device)
            total, peak = lz.sum(), lz.max()
        else:
            keep = keep.reshape(-1).to(lz.device)
            count = keep.sum().float()
            total = torch.where(keep, lz, torch.zeros_like(lz)).sum()
            peak = torch.where(keep, lz, torch.full_like(lz, -torch.inf)).max()
        nan = torch.full_like(total, torch.nan)
        has = count > 0
        return torch.stack([torch.where(has, total / count.clamp(min=1), nan), torch.where(has, peak, nan)])
