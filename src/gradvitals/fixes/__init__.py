"""Fixes: the only code in gradvitals that changes a model or its gradients.

- :func:`init_` (``fixes/init.py``): activation-aware initialisation, He or Xavier per
  layer by the activation that follows it in the forward pass.
- :func:`clip_grad_agc_` (``fixes/agc.py``): unit-wise adaptive gradient clipping (NFNets).

Each is what a finding's advice points to; both are also ``gv.init_`` / ``gv.clip_grad_agc_``.
"""

from __future__ import annotations

from .agc import clip_grad_agc_
from .init import init_

__all__ = ["init_", "clip_grad_agc_"]
