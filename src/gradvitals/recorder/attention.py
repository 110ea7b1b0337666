"""Attention statistics on traced (scheduled) forwards: the max attention logit and the
mean attention entropy per attention module.

While the activation tracer traces a forward, ``F.scaled_dot_product_attention`` and
the softmax functions (``F.softmax``, ``torch.softmax``, ``Tensor.softmax``) are
wrapped; outside it they are torch's own. A wrapper calls torch's function first and
returns exactly its result; the statistics come after, under ``no_grad`` on detached
tensors (probes/attention.py), staged as device tensors for the step's one sync.

Which calls count:
- every ``scaled_dot_product_attention`` call (nanoGPT, Hugging Face ``sdpa``, and
  ``nn.MultiheadAttention(need_weights=False)``, which calls it);
- a softmax over the last dimension of a tensor of >= 3 dimensions whose last two are
  equal (self-attention scores: minGPT, HF ``eager``, ``nn.MultiheadAttention`` with
  weights) or made inside a module whose class or name says attention (``attn``,
  ``attention``, ``nn.MultiheadAttention``: cross-attention with other lengths).
  Known misses: a cross-attention softmax in a module not named so, scores put
  through ``log_softmax``/``exp`` by hand, fused kernels other than SDPA (flash-attn,
  xformers), compiled regions. Possible false hits: a softmax over a square tensor
  that is not attention (a (B, C, C) similarity inside an ``attn`` module counts).

Each call is credited to the innermost module of the traced model whose method made
it (found by walking up the caller's frames; ``nn.Softmax`` passes its call to its
parent); several calls of one module in a forward combine (max of maxima, entropies
averaged over all their rows).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..probes import attention as probe
from ..record import series_key
from .registry import Registry, WatchedModel
from .staging import Staging

#: The quantities one attention module records per traced forward, in order.
KEYS = ("attn_max_logit", "attn_entropy", "attn_entropy_uniform")
_ATTN_WORDS = ("attn", "attention")
_MAX_FRAMES = 40  # how far up the caller's frames a module is looked for


class AttentionMeter:
    """Wraps the attention functions during a traced forward and stages their stats."""

    def __init__(self, registry: Registry, staging: Staging, step: Callable[[], int],
                 fail: Callable[[str, BaseException], None]) -> None:
        self.registry = registry
        self.staging = staging
        self.step = step
        self.fail = fail
        self.model: WatchedModel | None = None
        self.busy = False
        self.acc: dict[str, probe.Stats] = {}
        self.saved: list[tuple[Any, str, Any, bool]] = []  # (owner, attribute, original, own attr)

    # ------------------------------------------------------------ patching
    def begin(self, model: WatchedModel) -> None:
        if self.saved:
            self.end_patches()
        self.model, self.acc, self.busy = model, {}, False
        sdpa = getattr(F, "scaled_dot_product_attention", None)
        if sdpa is not None:
            self._patch(F, "scaled_dot_product_attention", self._wrap(sdpa, self._sdpa))
        self._patch(F, "softmax", self._wrap(F.softmax, self._softmax))
        self._patch(torch, "softmax", self._wrap(torch.softmax, self._softmax))
        self._patch(torch.Tensor, "softmax", self._wrap(torch.Tensor.softmax, self._softmax))

    def _patch(self, owner: Any, attr: str, wrapper: Any) -> None:
        own = attr in vars(owner)
        self.saved.append((owner, attr, vars(owner).get(attr) if own else getattr(owner, attr), own))
        setattr(owner, attr, wrapper)

    def end_patches(self) -> None:
        for owner, attr, orig, own in reversed(self.saved):
            try:
                if own:
                    setattr(owner, attr, orig)
                else:
                    delattr(owner, attr)
            except Exception as exc:  # never leave torch half-patched silently
                self.fail("attention", exc)
        self.saved = []

    def finish(self, model: WatchedModel, raised: bool) -> None:
        """The traced forward ended: torch's functions back; its stats pending (a forward
        that raised: dropped, as its activation statistics are)."""
        if self.model is not model:
            return
        self.end_patches()
        acc, self.acc, self.model = self.acc, {}, None
        if raised:
            return
        step = self.step()
        for name, st in acc.items():
            self.staging.pending.append((step, [series_key(k, name) for k in KEYS], st.values()))

    def abort(self) -> None:
        self.end_patches()
        self.acc, self.model = {}, None

    # ------------------------------------------------------------ wrappers
    def _wrap(self, orig: Callable[..., Any], measure: Callable[[tuple, dict, Any], None]) -> Callable[..., Any]:
        """``orig`` as it was, then ``measure(args, kwargs, out)`` (its errors are ours, not
        the run's); not re-entered from inside a measurement. ``measure`` is a bound
        method: :meth:`_owner` counts the frames above it."""
        meter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if meter.busy:
                return orig(*args, **kwargs)
            meter.busy = True
            try:
                out = orig(*args, **kwargs)
                try:
                    measure(args, kwargs, out)
                except Exception as exc:
                    meter.fail("attention", exc)
                return out
            finally:
                meter.busy = False

        wrapper.__name__ = wrapper.__qualname__ = getattr(orig, "__name__", "wrapper")
        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
        return wrapper

    # ------------------------------------------------------------ measuring
    def _sdpa(self, args: tuple, kwargs: dict, _out: Any = None) -> None:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k = a.get("query"), a.get("key")
        if not isinstance(q, Tensor) or not isinstance(k, Tensor) or not q.is_floating_point():
            return
        if _compiling():
            return
        owner = self._owner()
        if owner is None:
            return
        st = probe.from_sdpa(q, k, a.get("attn_mask"), bool(a.get("is_causal", False)), a.get("scale"),
                             bool(a.get("enable_gqa", False)))
        if st is not None:
            self._add(owner[0], st)

    def _softmax(self, args: tuple, kwargs: dict, out: Any) -> None:
        x = args[0] if args else kwargs.get("input", kwargs.get("self"))
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(x, Tensor) or not isinstance(out, Tensor) or dim is None or x.dim() < 3:
            return
        if not isinstance(dim, int) or dim not in (-1, x.dim() - 1) or not x.is_floating_point():
            return
        if _compiling():
            return
        square = x.shape[-1] == x.shape[-2]
        owner = self._owner()
        if owner is None:
            return
        name, module = owner
        if not square and not _says_attention(name, module):
            return
        self._add(name, probe.from_softmax(x, out))

    def _add(self, name: str, st: probe.Stats) -> None:
        prev = self.acc.get(name)
        self.acc[name] = st if prev is None else prev.add(st)

    def _owner(self) -> tuple[str, nn.Module] | None:
        """(name, module) of the innermost module of the traced model whose method is on
        the caller's stack (the root's forward at least), or None when the call is not
        this model's."""
        model = self.model
        modules = self.registry.modules
        f = sys._getframe(3)
        for _ in range(_MAX_FRAMES):
            if f is None:
                break
            obj = f.f_locals.get("self") if "self" in f.f_code.co_varnames[:1] else None
            if isinstance(obj, nn.Module) and not isinstance(obj, nn.Softmax):
                entry = modules.get(id(obj))
                if entry is not None and entry[0] is model:
                    return entry[1], obj
            f = f.f_back
        return None  # not under this model's forward (another thread, another model)


def _says_attention(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    text = (name.rsplit(".", 1)[-1] + " " + type(module).__name__).lower()
    return any(w in text for w in _ATTN_WORDS)


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:
        return False
