"""Rules: pure functions ``Record -> list[Finding]``, one module per family. No torch.

Every rule is listed in :data:`RULES`; :func:`gradvitals.diagnose.diagnose` runs them all.
Families: ``nonfinite``, ``gradients`` (vanishing/exploding), ``activations`` (dead ReLU,
saturation), ``loss`` (plateau, spikes, a loss given probabilities), ``updates`` (update/weight ratios: learning rate),
``params`` (no gradient, not updated, gradients never cleared), ``normalization`` (BatchNorm batch size, training in eval mode),
``clipping``, ``distributed`` (a rank's numbers against the whole run's), ``optimizer`` (Adam's eps against the gradients' scale), ``logits`` (the output logits' log Z), ``attention`` (logit growth, entropy collapse). The checkup's lint (``init``, ``architecture``) registers itself here too.
"""

from __future__ import annotations

from typing import Callable

from ..findings import Finding
from ..record import Record
from . import (activations, architecture, attention, clipping, distributed, gradients, init, logits, loss, nonfinite,
               normalization, optimizer, params, updates)

Rule = Callable[[Record], "list[Finding]"]

RULES: list[Rule] = [
    nonfinite.nonfinite,
    gradients.vanishing_gradients,
    gradients.exploding_gradients,
    activations.dead_relu,
    activations.saturated_activations,
    loss.loss_plateau,
    loss.loss_spike,
    loss.loss_on_probabilities,
    updates.update_ratio_high,
    updates.update_ratio_low,
    optimizer.adam_epsilon_too_large,
    attention.attention_logit_growth,
    attention.attention_entropy_collapse,
    logits.output_logit_divergence,
    normalization.batchnorm_small_batch,
    normalization.eval_mode_training,
    clipping.clipping_always_active,
    distributed.grad_norm_misreported,
    distributed.replica_divergence,
    params.no_gradient,
    params.not_updated,
    params.grad_not_zeroed,
    init.poor_initialization,
    init.symmetric_weights,
    architecture.architecture_risk,
]

__all__ = ["RULES", "Rule"]
