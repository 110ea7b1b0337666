"""update_ratio_high / update_ratio_low: ratios judged together with the loss."""

from __future__ import annotations

import math

import pytest
from rulebuild import Build, falling_loss, flat_loss

from gradvitals.rules import updates as u

STEPS = list(range(0, 300, 25))


def run(ratio: float, loss: list[float], lr: float = 0.1) -> Build:
    b = Build().mlp(5).ratios(STEPS, lambda s, i, p: ratio).loss(loss)
    return b.series("lr/opt.0", [lr] * len(loss))


def spiky(n: int = 300, at: int = 30) -> list[float]:
    values = falling_loss(n)
    values[at] = 10.0
    return values


def test_high_ratio_with_a_healthy_loss_is_not_a_finding():
    # BatchNorm CNNs and clipped SGD LSTMs train well at 2e-2..3e-2 per step.
    assert u.update_ratio_high(run(3e-2, falling_loss(300)).record) == []


def test_high_ratio_before_a_loss_spike_is_too_high_a_learning_rate():
    f = u.update_ratio_high(run(u.UPDATE_RATIO_HIGH, spiky()).record)
    assert [x.code for x in f] == ["update_ratio_high"]
    assert f[0].severity == "warning" and f[0].step == 0
    assert "lr=0.1" in f[0].summary and "jumped at step 30" in f[0].summary
    assert "lr=0.01" in f[0].advice
    assert u.update_ratio_high(run(u.UPDATE_RATIO_HIGH * 0.99, spiky()).record) == []


@pytest.mark.parametrize("optimizers,step0,fires", [
    (["SGD"], 0.03, True),               # SGD: the step-0 ratio follows the gradient: too high
    (["Adam"], 0.03, False),             # Adam's first step is +-lr per weight: lr 1e-3 on a 256-wide layer
    (["Adam", "AdamW"], 0.099, False),
    (["Adam"], u.ADAPTIVE_FIRST_STEP_HIGH, True),  # a first step that rewrites a tenth of every weight
    (["Adam", "SGD"], 0.03, True),       # not all adaptive: the plain bar
    ([], 0.03, True),                    # optimizer unknown (an older report): the plain bar
])
def test_adaptive_optimizers_first_step_has_its_own_bar(optimizers, step0, fires):
    """An early spike right after step 0: only the step-0 ratio can be blamed. Under
    Adam-family optimizers that ratio is lr / rms(weight) by construction (a false
    update_ratio_high on an actor-critic run at Adam lr 1e-3); later steps keep the
    plain bar."""
    loss = falling_loss(300)
    loss[2] = 3 * loss[0]
    b = Build().mlp(5).ratios(STEPS, lambda s, i, p: step0 if s == 0 else 1e-3).loss(loss)
    b.series("lr/opt.0", [1e-3] * 300)
    b.record.run["optimizers"] = optimizers
    found = u.update_ratio_high(b.record)
    assert bool(found) is fires
    if fires:
        assert found[0].step == 0 and "jumped at step 2" in found[0].summary


def test_adaptive_optimizers_later_steps_keep_the_plain_bar():
    b = Build().mlp(5).ratios(STEPS, lambda s, i, p: 0.03 if s >= 25 else 1e-3).loss(spiky(at=60))
    b.series("lr/opt.0", [1e-3] * 300)
    b.record.run["optimizers"] = ["Adam"]
    found = u.update_ratio_high(b.record)
    assert found and found[0].step in (25, 50)


def test_high_ratio_must_come_before_the_trouble():
    b = Build().mlp(5).ratios(STEPS, lambda s, i, p: 0.05 if s >= 50 else 1e-3).loss(spiky(at=30))
    assert u.update_ratio_high(b.record) == []


def climb_into_nan(b: Build, nan_at: int = 100) -> Build:
    """grad_norm_global flat at 1, then x3 per step for the 8 steps before a NaN."""
    values = [1.0] * (nan_at - 8) + [3.0 ** (k + 1) for k in range(8)] + [math.nan]
    return b.series("grad_norm_global", values)


def test_nan_after_high_ratio_and_a_climbing_gradient_is_critical():
    loss = falling_loss(100) + [math.nan] * 200
    f = u.update_ratio_high(climb_into_nan(run(0.02, loss)).record)[0]
    assert f.severity == "critical" and "went NaN" in f.summary


def test_nan_out_of_the_blue_says_nothing_about_the_lr():
    # sqrt(0) in backward: the gradient norm was flat until the NaN
    loss = falling_loss(100) + [math.nan] * 200
    b = run(0.02, loss).series("grad_norm_global", [1.0] * 100 + [math.nan])
    assert u.update_ratio_high(b.record) == []


def test_stalled_loss_needs_a_much_higher_ratio():
    assert u.update_ratio_high(run(0.05, flat_loss(300)).record) == []
    f = u.update_ratio_high(run(u.UPDATE_RATIO_HIGH_PLATEAU, flat_loss(300)).record)
    assert f and "did not fall" in f[0].summary


def test_low_ratio_with_a_stalled_loss_fires_below_3e4_of_the_fastest_layer():
    f = u.update_ratio_low(run(u.UPDATE_RATIO_LOW_STALLED * 0.99, flat_loss(300), lr=1e-7).record)
    assert [x.code for x in f] == ["update_ratio_low"] and f[0].severity == "warning"
    assert "lr=1.0e-07" in f[0].summary and "Try lr=" in f[0].advice
    assert f[0].step == 25  # after warmup
    assert u.update_ratio_low(run(u.UPDATE_RATIO_LOW_STALLED * 1.01, flat_loss(300)).record) == []


def test_low_ratio_while_learning_needs_1e5():
    assert u.update_ratio_low(run(u.UPDATE_RATIO_LOW * 1.01, falling_loss(300)).record) == []
    assert u.update_ratio_low(run(u.UPDATE_RATIO_LOW * 0.99, falling_loss(300)).record)[0].severity == "info"


def test_low_is_judged_on_the_fastest_layer_not_the_vanishing_ones():
    b = Build().mlp(5).ratios(STEPS, lambda s, i, p: 1e-3 if i == 4 else 1e-12).loss(flat_loss(300))
    assert u.update_ratio_low(b.record) == []


def test_low_ratio_while_learning_is_info():
    f = u.update_ratio_low(run(1e-6, falling_loss(300)).record)[0]
    assert f.severity == "info"


def test_zero_updates_with_gradients_and_layers_without_gradient_are_skipped():
    f = u.update_ratio_low(run(0.0, flat_loss(300)).record)[0]
    assert "exactly 0" in f.summary
    dead = Build().mlp(5).ratios(STEPS, lambda s, i, p: 0.0, grad=0.0).loss(flat_loss(300))
    assert u.update_ratio_low(dead.record) == []  # no gradient at all: dead_relu's business


def test_a_moderate_early_spike_the_run_recovers_from_does_not_blame_the_lr():
    early = [2.56, 2.62, 3.31, 3.52, 2.47, 1.66, 1.24, 0.9, 0.65, 0.35] + [0.1] * 290
    assert u.update_ratio_high(run(0.04, early).record) == []


def test_zero_initialised_weights_have_no_meaningful_ratio():
    b = Build().mlp(5)
    # the recorder divides by a clamped 1e-12 norm: zero-init layers show astronomic ratios at step 0
    b.ratios([0], lambda s, i, p: 6e9 if i in (1, 2, 3) else 2e-3, weight=5.0)
    for i, name in enumerate(b.weights()):
        if i in (1, 2, 3):
            b.record.series[f"weight_norm/{name}"].values[0] = 0.0
    b.loss(spiky(at=3))
    assert u.update_ratio_high(b.record) == []


def test_huge_updates_from_huge_initial_gradients_are_not_blamed_on_the_lr():
    loss = falling_loss(100) + [math.nan] * 200
    b = Build().mlp(5).ratios([0], lambda s, i, p: 1e9).loss(loss)
    b.series("grad_norm_global", {0: 2e14})
    assert u.update_ratio_high(b.record) == []
    b2 = Build().mlp(5).ratios([0], lambda s, i, p: 1e9).loss(loss)
    climb_into_nan(b2)  # step 0's gradient is normal and it climbs into the NaN: the lr is the suspect
    assert u.update_ratio_high(b2.record)


# ------------------------------------------------------------------ dead units under large steps
def dying(ratio: float, dead_from: int | None, opt: str = "AdamW") -> Build:
    """issue 25: AdamW at lr 5e-2, wd 0.5: ratios ~2-4e-2 over the run, the loss falls,
    and acts.1's units die after ``dead_from`` (None: they live)."""
    b = run(ratio, falling_loss(300), lr=5e-2)
    b.record.run["optimizers"] = [opt]
    for i in range(4):
        dead = [0.9 if dead_from is not None and i == 1 and s >= dead_from else 0.1 for s in STEPS]
        b.series(f"dead_frac/acts.{i}", dict(zip(STEPS, dead)))
    return b


def test_units_dying_under_large_steps_name_the_learning_rate_though_the_loss_falls():
    from gradvitals.diagnose import diagnose

    f = u.update_ratio_high(dying(2.5e-2, dead_from=25).record)
    assert f and f[0].severity == "warning" and f[0].step == 25
    assert "died" in f[0].summary and "acts.1" in f[0].summary and "lr=0.005" in f[0].advice
    linked = {x.code: x for x in diagnose(dying(2.5e-2, dead_from=25).record)}
    assert linked["dead_relu"].caused_by == "update_ratio_high"


@pytest.mark.parametrize("ratio,dead_from", [
    (u.UPDATE_RATIO_HIGH * 0.9, 25),  # ordinary steps: the units died of something else
    (2.5e-2, 0),                      # dead from the first recorded step: the init's doing
    (2.5e-2, None),                   # large steps, every unit alive, the loss falls: fine
])
def test_dead_units_blame_the_learning_rate_only_when_they_died_under_large_steps(ratio, dead_from):
    assert u.update_ratio_high(dying(ratio, dead_from).record) == []
