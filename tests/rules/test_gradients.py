"""vanishing_gradients / exploding_gradients on hand-built records, at their edges."""

from __future__ import annotations

import math

import pytest
from rulebuild import Build

from gradvitals.rules import gradients as g

STEPS = range(0, 300, 25)


def profile(gap_orders: float, n: int = 10) -> Build:
    """Relative gradient falling log-linearly by ``gap_orders`` from head to first layer."""
    b = Build().mlp(n)
    return b.grads(STEPS, lambda s, i, p: 5.0 * 10 ** (-gap_orders * (n - 1 - i) / (n - 1)))


def scaled_for_gap(target: float) -> float:
    """Head-to-first orders of ``profile`` (n=10) whose thirds' gap is ``target``: the
    rule compares the medians of layers 0-2 and 7-9, i.e. layer 1 vs layer 8 (7/9 of it)."""
    return target * 9 / 7


def test_vanishing_fires_at_the_chapter_100x_and_not_below():
    just = scaled_for_gap(g.VANISH_ORDERS + 0.01)
    below = scaled_for_gap(g.VANISH_ORDERS - 0.05)
    found = g.vanishing_gradients(profile(just).record)
    assert [f.code for f in found] == ["vanishing_gradients"]
    assert found[0].severity == "warning"
    assert found[0].evidence["gap_orders"] == pytest.approx(g.VANISH_ORDERS + 0.01, abs=0.01)
    assert g.vanishing_gradients(profile(below).record) == []


def test_vanishing_critical_names_layers_and_counts_the_stalled_ones():
    f = g.vanishing_gradients(profile(12.0, n=20).record)[0]
    assert f.severity == "critical"
    assert f.step == 0
    assert f.layers[0] == "layers.0"  # worst first
    stalled = f.evidence["stalled_layers"]
    # relative grads fall 12/19 orders per layer: > 3 orders below the head for i <= 14
    assert stalled == [f"layers.{i}" for i in range(15)]
    assert "from `head` to `layers.0`" in f.summary and "the first 15 of 20" in f.summary
    assert "10^" in f.summary
    assert "nn.init.kaiming_normal_" in f.advice and "ReLU" in f.advice


def test_vanishing_sigmoid_advice_names_the_activation_and_layers():
    b = Build().mlp(8, act="Sigmoid")
    b.grads(STEPS, lambda s, i, p: 10.0 ** (-(7 - i)))
    f = g.vanishing_gradients(b.record)[0]
    assert "nn.Sigmoid" in f.advice and "`layers.0`" in f.advice
    assert f.evidence["activation"] == "Sigmoid"


def test_vanishing_needs_the_gap_on_most_steps():
    steps = list(STEPS)
    flagged = set(steps[: int(len(steps) * g.VANISH_PERSIST) - 1])  # just under the persistence

    def grad(s: int, i: int, p: str) -> float:
        return 10.0 ** (-(9 - i)) if s in flagged else 1.0

    assert g.vanishing_gradients(Build().mlp(10).grads(steps, grad).record) == []


def test_vanishing_ignores_biases_and_needs_three_weight_layers():
    # Flat weight profile; biases (set by the builder 1000x larger) must not matter.
    assert g.vanishing_gradients(profile(0.0).record) == []
    two = Build().mlp(2).grads(STEPS, lambda s, i, p: 10.0 ** (-8 * (1 - i)))
    assert g.vanishing_gradients(two.record) == []


def test_vanishing_skips_exact_zero_gradients_left_to_dead_relu():
    b = Build().mlp(6).grads(STEPS, lambda s, i, p: 0.0 if i < 4 else 1.0)
    assert g.vanishing_gradients(b.record) == []


def underflowing(n: int, zeros: int, act: str = "Tanh", per_layer: float = 1.5) -> Build:
    """A profile decaying ``per_layer`` orders per layer from the head whose first
    ``zeros`` layers underflowed to exactly 0.0 (issue 25: a 50-layer tanh MLP at N(0, 0.01))."""
    return Build().mlp(n, act=act).grads(
        STEPS, lambda s, i, p: 0.0 if i < zeros and p.endswith("weight") else 10.0 ** (-per_layer * (n - 1 - i)))


def test_vanishing_exact_zeros_at_the_end_of_a_decay_are_underflow():
    f = g.vanishing_gradients(underflowing(12, 6).record)
    assert f and f[0].severity == "critical"
    assert f[0].evidence["zero_grad_layers"] == 6 and f[0].evidence["underflow_steps"] == len(STEPS)
    assert "exactly 0.0" in f[0].summary and "first 6 of 12" in f[0].summary
    assert f[0].layers[0] == "layers.0"
    # the same decay through ReLU layers underflows the same way (no dead-unit cliff)
    assert g.vanishing_gradients(underflowing(12, 6, act="ReLU").record)


def test_vanishing_exact_zeros_through_tanh_with_two_weight_layers():
    # issue 25: embedding -> Linear -> tanh -> Linear; the saturated tanh passes exactly 0
    b = Build().mlp(2, act="Tanh").grads(STEPS, lambda s, i, p: 0.0 if i == 0 and s >= 50 else 1.0)
    f = g.vanishing_gradients(b.record)
    assert f and f[0].layers == ("layers.0",) and f[0].evidence["weight_layers"] == 2
    # ...but exactly 0 behind a ReLU is a dead layer (dead_relu's), not vanishing
    relu = Build().mlp(2, act="ReLU").grads(STEPS, lambda s, i, p: 0.0 if i == 0 and s >= 50 else 1.0)
    assert g.vanishing_gradients(relu.record) == []
    # and zeros on too few of the steps are not persistent
    brief = Build().mlp(2, act="Tanh").grads(STEPS, lambda s, i, p: 0.0 if i == 0 and s >= 200 else 1.0)
    assert g.vanishing_gradients(brief.record) == []
    # two layers with ordinary, non-zero gradients are no profile at all
    two = Build().mlp(2, act="Tanh").grads(STEPS, lambda s, i, p: 10.0 ** (-8 * (1 - i)))
    assert g.vanishing_gradients(two.record) == []


def test_vanishing_profiles_each_model_of_a_gan_separately():
    b = Build()
    b.mlp(5, model="G")
    for i in range(4):  # a second model whose first layers come *after* G's head in depth
        b.layer(f"D.layers.{i}", "Linear", activation_after="LeakyReLU",
                params={"weight": [64, 64], "bias": [64]}, model="D")
    # G: healthy flat profile. D: healthy too, but 10^4 smaller overall than G.
    b.grads(STEPS, lambda s, i, p: 1e-4 if p.startswith("D.") else 1.0)
    assert g.vanishing_gradients(b.record) == []


def test_vanishing_absolute_when_every_layer_is_tiny():
    b = Build().mlp(6).grads(STEPS, lambda s, i, p: 1e-9)
    f = g.vanishing_gradients(b.record)
    assert f and f[0].severity == "critical" and "vanishingly small" in f[0].summary


# ------------------------------------------------------------------ exploding
def climbing(n_flat: int, factor: float, n_climb: int, nan: bool = True, wiggle: float = 0.1) -> Build:
    values = [1.0 + wiggle * math.sin(i) for i in range(n_flat)]
    values += [factor ** (k + 1) for k in range(n_climb)]  # the climb starts from the normal 1.0
    if nan:
        values.append(math.nan)
    b = Build().mlp(4)
    b.series("grad_norm_global", values)
    b.series("loss", [2.3] * (len(values) - 1) + ([math.nan] if nan else [2.3]))
    return b


def test_exploding_reports_the_step_growth_became_visible_and_warning_steps():
    b = climbing(40, 3.0, 10)  # x3 per step: 10x the normal level after 3 steps of climbing
    f = g.exploding_gradients(b.record)[0]
    assert f.severity == "critical"
    nan_step = 50
    assert f.evidence["nonfinite_step"] == nan_step
    # 1.0*3^k >= 10 first at k=3 (step 40 + 2): the first step >= GROWTH_VISIBLE x normal
    assert f.step == 42
    assert f.evidence["warning_steps"] == nan_step - 42
    assert f.evidence["growth_per_step"] == pytest.approx(3.0, rel=0.05)
    assert "8 steps of warning" in f.summary


def test_exploding_not_for_a_nan_without_growth():
    b = climbing(40, 1.0, 0)
    b.event("nonfinite_origin", step=40, kind="input", module="layers.0", value="nan")
    assert g.exploding_gradients(b.record) == []


def test_exploding_huge_gradient_at_init_counts_even_without_a_climb():
    b = Build().mlp(4)
    b.series("grad_norm_global", [2e14, math.nan])
    f = g.exploding_gradients(b.record)[0]
    assert f.step == 0 and f.evidence["at_init"] is True and f.evidence["warning_steps"] == 1
    assert "kaiming_normal_" in f.advice


def test_exploding_without_nan_needs_three_orders_above_normal():
    b = climbing(40, 10.0, 3, nan=False, wiggle=0.0)  # peak exactly 1000x the median 1.0 -> warning
    b.series("grad_norm_global", {43 + k: 1.0 for k in range(40)})
    found = g.exploding_gradients(b.record)
    assert found and found[0].severity == "warning"
    b2 = climbing(40, 9.99, 3, nan=False, wiggle=0.0)  # 997x
    b2.series("grad_norm_global", {43 + k: 1.0 for k in range(40)})
    assert g.exploding_gradients(b2.record) == []


def test_exploding_rnn_advice_is_clipping():
    b = climbing(20, 3.0, 8)
    b.layer("rnn", "RNN", params={"weight_ih_l0": [32, 8], "weight_hh_l0": [32, 32]})
    f = g.exploding_gradients(b.record)[0]
    assert "`rnn`" in f.advice and "clip_grad_norm_" in f.advice and "max_norm=1.0" in f.advice


def test_exploding_peak_survives_decimation_of_a_long_run():
    b = Build().mlp(4)
    b.record.cap = 64  # decimate early: most single steps are dropped
    values = [1.0] * 5000
    values[2501] = 5e3  # an odd step: dropped by every stride >= 2
    b.series("grad_norm_global", values)
    kept_steps = list(b.record.series["grad_norm_global"].steps)
    assert 2501 not in kept_steps
    f = g.exploding_gradients(b.record)
    assert f and f[0].evidence["peak_step"] == 2501 and f[0].evidence["peak_grad_norm"] == 5e3


def test_norm_overflowing_to_inf_then_staying_huge_is_an_explosion_without_warning():
    # Adam at lr=1: the float32 norm overflows at step 1, then the run goes on at 1e17..1e19
    b = Build().mlp(4)
    b.series("grad_norm_global", [0.7, math.inf, 6e17, 1.5e19, math.inf] + [0.4] * 50)
    f = g.exploding_gradients(b.record)[0]
    assert f.severity == "critical" and f.step == 1 and f.evidence["warning_steps"] == 0
    assert f.evidence["peak_grad_norm"] == 1.5e19
    b2 = Build().mlp(4)
    b2.series("grad_norm_global", [0.7, math.inf, 0.8] + [0.7] * 50)  # one overflowed norm, nothing huge
    assert g.exploding_gradients(b2.record) == []


def test_overflow_from_a_normal_level_of_exactly_zero_has_no_ratio():
    # Found by test_properties' random records: a normal level of exactly 0 divided the peak
    # (ZeroDivisionError, reported as a rule_error and the finding lost).
    b = Build().mlp(4)
    b.series("grad_norm_global", [0.0, 0.0, math.inf, 6e17, 1.5e19] + [0.0] * 50)
    f = g._overflow_then_huge(b.record, 2, 0.0, [(3, 6e17), (4, 1.5e19)])
    assert f.severity == "critical" and f.step == 2 and f.evidence["growth"] is None
    assert f.evidence["peak_grad_norm"] == 1.5e19 and "normal)" not in f.summary
    assert g._overflow_then_huge(b.record, 2, 0.5, [(4, 1.5e19)]).evidence["growth"] == 3e19


def test_a_norm_still_climbing_at_the_end_of_the_run_is_an_early_warning():
    n = 300
    growth = 200.0  # over the run (after the trend's warmup skip)
    values = [growth ** (i / (n - 1)) for i in range(n)]
    b = Build().mlp(4)
    b.series("grad_norm_global", values)
    f = g.exploding_gradients(b.record)
    assert f and f[0].severity == "warning" and f[0].evidence["trend"] is True
    assert "still climbing" in f[0].summary
    # a healthy 10x rise (the loss surface sharpens as it learns) is not one
    b2 = Build().mlp(4)
    b2.series("grad_norm_global", [10.0 ** (i / (n - 1)) for i in range(n)])
    assert g.exploding_gradients(b2.record) == []


def test_a_converging_run_whose_gradient_shrinks_is_not_a_spike():
    # LBFGS: 2.4 at step 0, then 1e-3 once converged
    b = Build().mlp(4)
    b.series("grad_norm_global", [2.4, 0.5, 0.05] + [1.2e-3] * 12)
    assert g.exploding_gradients(b.record) == []
    # ...and an ordinary early bump in a run that later converges is not one either
    b2 = Build().mlp(4)
    b2.series("grad_norm_global", [1.0, 1.2, 3.0, 1.0, 0.5] + [1e-3] * 50)
    assert g.exploding_gradients(b2.record) == []


@pytest.mark.parametrize("last_bad,finite_after,severity", [
    (50, 99, "warning"),   # one bad step, then 99 finite steps to the end: recovered
    (55, 10, "warning"),   # exactly RECOVERED_MIN_STEPS finite steps after the last bad one
    (56, 9, "critical"),   # one step short: not shown to train again
    (None, 0, "critical"),  # no last bad step recorded (an older report): as before
])
def test_nonfinite_run_that_recovered_is_a_warning(last_bad, finite_after, severity):
    from gradvitals.rules import nonfinite as nf

    steps = (last_bad if last_bad is not None else 149) + 1 + finite_after
    b = Build().mlp(4)
    b.loss([2.0] * 50 + [math.nan] + [1.5] * (steps - 51))
    extra = {} if last_bad is None else {"last_nonfinite_step": last_bad}
    b.event("nonfinite_origin", step=50, kind="input", module="(root)", value="nan", **extra)
    assert nf.RECOVERED_MIN_STEPS == 10
    f = nf.nonfinite(b.record)[0]
    assert f.severity == severity and f.step == 50
    if severity == "warning":
        span = "step 50" if last_bad == 50 else f"steps 50-{last_bad}"
        assert f"The run recovered: after {span}, every recorded value was finite again for its last {finite_after} steps." in f.summary
    else:
        assert "recovered" not in f.summary


@pytest.mark.parametrize("source, op, says", [
    ("replay", "layer_norm", "in the backward (the loss and the forward were finite): `layers.2` made the first "
                             "non-finite gradient in `layer_norm`'s backward (NativeLayerNormBackward0)"),
    ("replay", None, "in the backward (the loss and the forward were finite): `layers.2` made the first "
                     "non-finite gradient from a finite incoming gradient"),
    ("series", None, "`layers.2` received the first non-finite gradient (backward)"),  # not replayed: as before
])
def test_nonfinite_born_in_the_backward_says_so(source, op, says):
    from gradvitals.rules import nonfinite as nf

    b = Build().mlp(4)
    b.loss([2.0] * 31)
    b.event("nonfinite_origin", step=30, kind="gradient", module="layers.2", value="inf", source=source,
            phase="backward", op=op, backward_op="NativeLayerNormBackward0" if op else None)
    f = nf.nonfinite(b.record)[0]
    assert says in f.summary and f.layers[0] == "layers.2" and f.evidence["phase"] == "backward"


@pytest.mark.parametrize("op, seed, singular", [
    ("sqrt", "surrogate", True), ("pow", "loss", True), ("acos", "surrogate", True),
    ("layer_norm", "surrogate", False),  # an overflow, not a derivative infinite at a point
    ("sqrt", None, False),  # read off the series (source: series): no op to advise on
])
def test_nonfinite_born_in_an_infinite_derivative_advises_the_epsilon_inside(op, seed, singular):
    """`torch.sqrt(var) + eps` at var 0: the cure is the epsilon inside the root, not a
    lower learning rate; an overflow in the backward keeps the learning-rate advice."""
    from gradvitals.rules import nonfinite as nf

    b = Build().mlp(4)
    b.event("nonfinite_origin", step=8, kind="gradient", module="layers.2", value="nan",
            source="replay" if seed else "series", phase="backward", op=op if seed else None,
            backward_op=f"{op.capitalize()}Backward0" if seed else None, backward_seed=seed)
    f = nf.nonfinite(b.record)[0]
    assert ("derivative" in f.advice and "inside" in f.advice and f"`{op}`" in f.advice) is singular, f.advice
    assert ("Lower the learning rate" in f.advice) is not singular, f.advice
    assert ("outside the model" in f.summary) is (seed == "surrogate"), f.summary


def test_nonfinite_forward_origin_names_its_op_only_when_replayed():
    from gradvitals.rules import nonfinite as nf

    b = Build().mlp(4)
    b.event("nonfinite_origin", step=3, kind="activation", module="layers.1", value="nan", source="replay",
            phase="forward", op="layer_norm")
    f = nf.nonfinite(b.record)[0]
    assert f.summary.endswith("produced the first non-finite activation, in `layer_norm` from finite inputs.")
    b = Build().mlp(4)
    b.event("nonfinite_origin", step=3, kind="activation", module="layers.1", value="nan", source="series",
            phase="forward", op=None)
    assert "from finite inputs" not in nf.nonfinite(b.record)[0].summary


# ------------------------------------------------------------------ crash before any NaN
def crashed(grads: list[float], losses: list[float], status: int = 1,
            error: str | None = "OverflowError: math range error") -> Build:
    b = Build().mlp(3, act="Tanh")
    b.series("grad_norm_global", grads)
    b.loss(losses)
    b.record.run["exit_status"] = status
    if error:
        b.record.run["script_error"] = error
    return b


# issue 25: a tanh RNN without clipping: the norm rose 60x in two steps, the loss 160x,
# then math.exp(loss) overflowed and killed the script before any NaN was recorded.
RNN_GRADS = [1.17, 24.0, 71.2, 12.7, 9.8, 6.9]
RNN_LOSS = [4.5, 29.2, 292.0, 691.6, 379.8, 718.9]


def test_a_climb_that_ends_in_a_crash_is_an_explosion():
    f = g.exploding_gradients(crashed(RNN_GRADS, RNN_LOSS).record)
    assert f and f[0].severity == "critical" and f[0].evidence["script_died"] is True
    assert f[0].evidence["peak_grad_norm"] == 71.2 and f[0].step == 1
    assert "OverflowError" in f[0].summary and "died at step 5" in f[0].summary


@pytest.mark.parametrize("change", ["finished", "sigint", "no_error", "loss_flat", "small_climb", "old_peak"])
def test_a_crash_is_not_an_explosion_without_a_climb_and_a_diverging_loss(change):
    grads, losses, status, error = list(RNN_GRADS), list(RNN_LOSS), 1, "OverflowError: math range error"
    if change == "finished":
        status, error = 0, None
    elif change == "sigint":
        status, error = 130, "KeyboardInterrupt"
    elif change == "no_error":
        error = None
    elif change == "loss_flat":  # a bug unrelated to training killed it (KeyError at step 5)
        losses = [4.5, 4.4, 4.3, 4.4, 4.2, 4.1]
    elif change == "small_climb":  # 9.9x: under GROWTH_VISIBLE
        grads = [1.0, 5.0, 9.9, 3.0, 2.0, 2.0]
    elif change == "old_peak":  # the peak lies more than CRASH_TAIL_STEPS before the end
        grads = RNN_GRADS[:3] + [5.0] * (g.CRASH_TAIL_STEPS + 1)
        losses = RNN_LOSS[:3] + [400.0] * (g.CRASH_TAIL_STEPS + 1)
    assert g.exploding_gradients(crashed(grads, losses, status, error).record) == []


@pytest.mark.parametrize("zero_tail,severity", [
    (24, "critical"),  # every gradient exactly 0 for the last 24 steps: dead, not recovered
    (10, "critical"),  # exactly RECOVERED_MIN_STEPS of them
    (9, "warning"),    # one short: the last steps of a run that recovered and converged
    (0, "warning"),    # finite and learning to the end: recovered
    (30, "critical"),  # the zeros began inside the episode: its last 24 steps count
])
def test_nonfinite_run_finite_but_with_all_zero_gradients_is_dead(zero_tail, severity):
    """After its Inf episode every value is finite, but the global gradient norm is
    exactly 0 (and the loss exactly 0.0) on its last steps: a saturated softmax,
    nothing can learn any more. Finite is not recovered."""
    from gradvitals.rules import nonfinite as nf

    b = Build().mlp(4)
    live = max(99 - 75 - zero_tail, 0)
    b.series("grad_norm_global", ([math.inf] * 76 + [3.0] * live + [0.0] * zero_tail)[-100:])
    b.loss([1e20] * 76 + [0.5] * live + [0.0] * min(zero_tail, 24))
    b.event("nonfinite_origin", step=0, kind="norm_overflow", module="38", value="inf", last_nonfinite_step=75)
    f = nf.nonfinite(b.record)[0]
    assert f.severity == severity
    if severity == "critical":
        assert "The run recovered" not in f.summary
        n = min(zero_tail, 24)
        assert (f"The run is dead, not recovered: after steps 0-75 every value was finite, but every gradient "
                f"was exactly 0 for its last {n} steps (the loss exactly 0.0)") in f.summary
        assert f.evidence["zero_gradient_steps"] == n and f.evidence["zero_gradient_from"] == 100 - n
        assert "before step 0" in f.advice
    else:
        assert "The run recovered" in f.summary and "zero_gradient_steps" not in f.evidence
