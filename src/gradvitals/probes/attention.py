"""Attention statistics: the largest pre-softmax score and the mean entropy of the
attention rows, from the inputs of ``F.scaled_dot_product_attention`` (recomputed per
chunk of heads) or from a softmax the model computes itself.

Every function returns device tensors (no host read) and works on detached inputs
under ``no_grad``: the model's own call is never touched.

Per call the result is three 0-d float32 tensors (see :class:`Stats`):
``max_logit`` — max over batch, heads and positions of q·kᵀ·scale (+ an additive
mask), masked positions excluded; ``entropy_sum``/``rows`` — the summed entropy (nats)
of the softmax rows and how many rows had one (a fully masked row has none);
``uniform_sum`` — the summed entropy a uniform row over its unmasked keys would have
(log of their number): the ceiling the entropy is judged against.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Elements of attention scores materialised at once beyond the model's own (float32:
#: 16 MiB): heads, then query rows, are processed in chunks of at most this many.
CHUNK_NUMEL = 2**22
#: Scores further than this below their row's max are taken as this far (exp(-80) =
#: 1.8e-35, still a normal float32): their weight is negligible either way.
EXP_FLOOR = -80.0


@dataclass
class Stats:
    max_logit: Tensor
    entropy_sum: Tensor
    rows: Tensor
    uniform_sum: Tensor

    def add(self, other: Stats) -> Stats:
        return Stats(torch.maximum(self.max_logit, other.max_logit), self.entropy_sum + other.entropy_sum,
                     self.rows + other.rows, self.uniform_sum + other.uniform_sum)

    def values(self) -> Tensor:
        """[max logit, mean entropy, mean uniform entropy] (NaN means: no row)."""
        rows = self.rows
        return torch.stack([self.max_logit, self.entropy_sum / rows, self.uniform_sum / rows])


def _float32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the probe's own ops: it runs inside the model's forward, so inside
    its autocast region, where the recomputed scores would come out bfloat16/float16
    (float32's lowest value, the mask fill, overflows them and the max logit loses digits)."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _rows(s: Tensor, keep: Tensor | None) -> Stats:
    """Stats of float32 score rows ``s`` (last dim = keys); ``keep``: the unmasked
    positions, broadcastable to ``s`` (None: all). Masked scores become float32's lowest
    value, not -inf: their weight is exactly 0 and 0 x score stays 0 (no 0 x -inf in the
    entropy); a row without keys is left out."""
    low = torch.finfo(torch.float32).min
    if keep is not None:
        if keep.shape[-1] != s.shape[-1]:  # a mask broadcast over the keys
            keep = keep.expand_as(s)
        s = s.masked_fill(~keep, low)
        n = keep.sum(-1)
    else:
        n = torch.full((1,), s.shape[-1], device=s.device)
    row_max = s.amax(-1, keepdim=True)
    # Clamped at EXP_FLOOR below the row's max: exp of float32's lowest value takes a slow
    # path (5x a normal exp on the CPU); a key that far down weighs < 2e-35 either way.
    d = (s - row_max).clamp_(min=EXP_FLOOR)
    e = d.exp()
    z = e.sum(-1)
    ent = z.log() - torch.linalg.vecdot(e, d) / z  # = logsumexp(s) - sum(softmax(s) * s)
    valid = (n > 0).expand(ent.shape)
    mx = row_max.amax()
    return Stats(torch.where(mx > low / 2, mx, -math.inf), torch.where(valid, ent, 0.0).sum(),
                 valid.sum().float(), torch.where(n > 0, n.clamp(min=1).float().log(), 0.0).expand(ent.shape).sum())


def from_softmax(x: Tensor, p: Tensor) -> Stats:
    """Stats of attention whose scores ``x`` (masked with -inf or a very negative fill)
    the model turned into ``p = softmax(x, -1)`` itself: the entropy is ``p``'s (the
    probabilities the model used), the max and the unmasked keys are ``x``'s."""
    with torch.no_grad(), _float32(x.device):
        x = x.detach()
        p = p.detach()
        keys = x.shape[-1]
        xr = x.reshape(-1, keys)
        pr = p.reshape(-1, keys)
        step = max(1, CHUNK_NUMEL // max(1, keys))
        out: Stats | None = None
        for i in range(0, xr.shape[0], step):
            xs = xr[i:i + step]
            keep = xs > torch.finfo(xs.dtype).min / 2
            ps = pr[i:i + step].float()
            ent = -torch.special.xlogy(ps, ps).sum(-1)
            n = keep.sum(-1)
            valid = (n > 0) & ent.isfinite()
            st = Stats(xs.float().masked_fill(~keep, -math.inf).amax(),
                       torch.where(valid, ent, 0.0).sum(), valid.sum().float(),
                       torch.where(valid, n.clamp(min=1).float().log(), 0.0).sum())
            out = st if out is None else out.add(st)
        assert out is not None
        return out


def from_sdpa(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False) -> Stats | None:
    """Stats of ``scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., scale=...,
    enable_gqa=...)``'s scores, recomputed per chunk of heads (and of query rows), so no
    more than :data:`CHUNK_NUMEL` scores exist at once. None for shapes it does not know
    (nested tensors, more than 4 dimensions)."""
    if q.is_nested or k.is_nested or q.dim() < 2 or q.dim() > 4 or k.dim() != q.dim():
        return None
    with torch.no_grad(), _float32(q.device):
        q = q.detach()
        k = k.detach()
        m = attn_mask.detach() if isinstance(attn_mask, Tensor) else None
        while q.dim() < 4:  # (L, E) / (N, L, E): one head
            q, k = q.unsqueeze(0), k.unsqueeze(0)
            if m is not None and m.dim() >= q.dim():
                m = m.unsqueeze(0)
        B, H, L, E = q.shape
        Hk, S = k.shape[1], k.shape[2]
        sc = (1.0 / math.sqrt(E)) if scale is None else float(scale)
        if H != Hk and (not enable_gqa or H % Hk):
            return None  # a broadcast torch would reject anyway
        group = H // Hk
        causal = None
        if is_causal:  # torch's is_causal: the top-left aligned lower triangle
            causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        per_head = B * L * S
        hc = max(1, min(H, CHUNK_NUMEL // max(1, per_head)))
        rc = L if per_head <= CHUNK_NUMEL else max(1, CHUNK_NUMEL // max(1, B * S))
        out: Stats | None = None
        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            kh = k[:, h0 // group:(h1 - 1) // group + 1]
            if group > 1:
                kh = kh.repeat_interleave(group, 1)[:, h0 % group:h0 % group + (h1 - h0)]
            for r0 in range(0, L, rc):
                r1 = min(L, r0 + rc)
                s = torch.matmul(q[:, h0:h1, r0:r1].float(), kh.float().transpose(-2, -1)) * sc
                keep = None
                if m is not None:
                    mm = m
                    if mm.dim() == 4 and mm.shape[1] > 1:
                        mm = mm[:, h0:h1]
                    if mm.dim() >= 2 and mm.shape[-2] > 1:
                        mm = mm[..., r0:r1, :]
                    if mm.dtype == torch.bool:
                        keep = mm
                    else:  # additive: -inf or the dtype's lowest value (Hugging Face) masks
                        keep = mm > torch.finfo(mm.dtype).min / 2
                        s = s + mm.float()
                if causal is not None:
                    c = causal[r0:r1]
                    keep = c if keep is None else keep & c
                st = _rows(s, keep)
                out = st if out is None else out.add(st)
        return out
