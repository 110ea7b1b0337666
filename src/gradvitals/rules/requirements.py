"""What each rule reads, by finding code: the data a check needs before it can run.

``gradvitals diagnose`` on an imported log derives its coverage from this table (which
checks ran, on what data, and why the others could not), so a rule that starts
reading another quantity changes one line here, not a list per log format.

An input is a series pattern of the record's quantity table (``loss``,
``grad_norm/*``: at least one series of that quantity), or one of the facts only the
live recorder observes (:data:`LIVE_FACTS`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Needs:
    """The inputs of one check. ``all``: every one is required; ``any``: at least one
    of them (empty: no such condition). ``step_to_step``: the rule compares consecutive
    points, so a log written every N steps hides what lasts fewer than N."""

    all: tuple[str, ...] = ()
    any: tuple[str, ...] = ()
    step_to_step: bool = False
    #: Inputs that sharpen the check but are not required (``weight_norm/*`` makes the
    #: gradient profile scale-free).
    better_with: tuple[str, ...] = ()


#: Facts gradvitals' hooks observe during a run, which no training log holds, with
#: what each is (the coverage's "why not" for a check that needs one).
LIVE_FACTS: dict[str, str] = {
    "model": "the model's structure (module types, activations, forward order)",
    "init_audit": "the step-0 audit of the initial weights (gradvitals checkup)",
    "optimizer": "the optimizer's settings (eps, the parameters it holds)",
    "hooks": "gradvitals' hooks in the run (stale .grad, train/eval mode, the loss's graph)",
}

#: Inputs per finding code. Every code of findings.CODES has a row (a test checks it).
REQUIRES: dict[str, Needs] = {
    "nonfinite": Needs(any=("loss", "grad_norm_global", "grad_norm/*", "weight_norm/*", "act_mean/*"),
                       better_with=("hooks",)),
    "vanishing_gradients": Needs(all=("grad_norm/*",), better_with=("weight_norm/*", "model")),
    "exploding_gradients": Needs(all=("grad_norm_global",), step_to_step=True, better_with=("grad_norm/*",)),
    "dead_relu": Needs(all=("dead_frac/*", "model")),
    "saturated_activations": Needs(all=("act_sat_frac/*", "model")),
    "symmetric_weights": Needs(all=("init_audit",)),
    "poor_initialization": Needs(all=("model", "init_audit")),
    "loss_plateau": Needs(all=("loss",)),
    "loss_spike": Needs(all=("loss",), step_to_step=True, better_with=("grad_norm/*",)),
    "update_ratio_high": Needs(all=("update_ratio/*",)),
    "update_ratio_low": Needs(all=("update_ratio/*",)),
    "batchnorm_small_batch": Needs(all=("bn_batch/*", "model")),
    "clipping_always_active": Needs(all=("clip_clipped",)),
    "no_gradient": Needs(all=("grad_norm_global", "model")),
    "not_updated": Needs(all=("update_ratio/*",), better_with=("optimizer",)),
    "architecture_risk": Needs(all=("model",)),
    "grad_not_zeroed": Needs(all=("hooks",)),
    "eval_mode_training": Needs(all=("hooks",)),
    "loss_on_probabilities": Needs(all=("hooks",)),
    "adam_epsilon_too_large": Needs(all=("grad_norm/*", "optimizer")),
    "attention_logit_growth": Needs(all=("attn_max_logit/*",)),
    "attention_entropy_collapse": Needs(all=("attn_entropy/*", "attn_entropy_uniform/*"), better_with=("attn_max_logit/*",)),
    "output_logit_divergence": Needs(all=("log_z_mean",), better_with=("loss",)),
    "grad_norm_misreported": Needs(all=("clip_rank_norm/*", "grad_norm_global")),
    "replica_divergence": Needs(all=("replica_spread/*",)),
}
