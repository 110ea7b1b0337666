"""dead_relu / saturated_activations on hand-built records, at their edges."""

from __future__ import annotations

import math

from rulebuild import Build, falling_loss, flat_loss

from gradvitals.rules import activations as a

STEPS = list(range(0, 300, 25))


def dead(levels: dict[str, list[float]], n: int = 5) -> Build:
    b = Build().mlp(n)
    for name, values in levels.items():
        b.series(f"dead_frac/{name}", dict(zip(STEPS, values)))
    for i in range(n - 1):
        if f"acts.{i}" not in levels:
            b.series(f"dead_frac/acts.{i}", dict(zip(STEPS, [0.0] * len(STEPS))))
    return b


def test_dead_relu_fires_at_half_the_units_and_not_below():
    edge = a.DEAD_LAYER_FRAC
    found = a.dead_relu(dead({"acts.1": [0.1] * 10 + [edge, edge]}).record)
    assert [f.code for f in found] == ["dead_relu"]
    f = found[0]
    assert f.severity == "warning" and f.layers == ("acts.1",) and f.step == STEPS[10]
    assert "50% of the units after `acts.1`" in f.summary
    assert "LeakyReLU" in f.advice and "`layers.1`" in f.advice  # names the layer feeding it
    assert a.dead_relu(dead({"acts.1": [0.1] * 10 + [edge - 0.01, edge]}).record) == []


def test_dead_relu_units_that_revive_are_not_dead():
    assert a.dead_relu(dead({"acts.0": [1.0] * 10 + [0.2, 0.1]}).record) == []


def test_fully_dead_layer_is_critical_and_listed_worst_first():
    f = a.dead_relu(dead({"acts.0": [0.6] * 12, "acts.2": [1.0] * 12}).record)[0]
    assert f.severity == "critical"
    assert f.layers == ("acts.2", "acts.0")
    assert f.evidence["fully_dead_layers"] == ["acts.2"]
    assert "2 of 4 ReLU layers have over 50% of their units dead, 1 entirely" in f.summary
    assert "e.g. `acts.2`" in f.summary and "below it." in f.summary
    g = a.dead_relu(dead({"acts.2": [1.0] * 12}).record)[0]
    assert "1 of 4 ReLU layers have every unit dead" in g.summary


def test_dead_relu_ignores_points_after_the_first_nan_and_just_before_it():
    b = dead({"acts.0": [0.1] * 4 + [1.0] * 8})
    b.series("loss", {s: (2.3 if s < 100 else math.nan) for s in range(300)})
    assert a.dead_relu(b.record) == []
    # dead at 50 and 75, NaN at 100: 75 is in the blow-up margin, 50 alone is not confirmed
    b = dead({"acts.0": [0.1] * 2 + [1.0] * 10})
    b.series("loss", {s: (2.3 if s < 100 else math.nan) for s in range(300)})
    assert a.dead_relu(b.record) == []
    # NaN much later: dead at 50 and 75 counts
    b = dead({"acts.0": [0.1] * 2 + [1.0] * 10})
    b.series("loss", {s: (2.3 if s < 101 + a.DEAD_BEFORE_NAN_MARGIN else math.nan) for s in range(300)})
    assert a.dead_relu(b.record)


def test_dead_relu_functional_relu_reads_the_weight_layer_or_the_batchnorm_after_it():
    b = Build()
    b.layer("conv1", "Conv2d", activation_after="relu", params={"weight": [8, 3, 3, 3]})
    b.layer("bn1", "BatchNorm2d", params={"weight": [8], "bias": [8]})
    b.layer("fc", "Linear", activation_after="relu", params={"weight": [8, 8]})
    b.layer("head", "Linear", params={"weight": [2, 8]})
    b.series("dead_frac/conv1", dict(zip(STEPS, [1.0] * 12)))  # conv output: irrelevant, BN shifts it
    b.series("dead_frac/bn1", dict(zip(STEPS, [0.0] * 12)))
    b.series("dead_frac/fc", dict(zip(STEPS, [0.75] * 12)))
    f = a.dead_relu(b.record)[0]
    assert f.layers == ("fc",)


def sat(levels: dict[str, float], loss: list[float]) -> Build:
    b = Build().mlp(5, act="Sigmoid")
    b.layer("out", "Sigmoid")  # the model's output: a confident sigmoid is the goal
    for name, level in levels.items():
        b.series(f"act_sat_frac/{name}", dict(zip(STEPS, [level] * 12)))
    b.series("act_std/layers.0", dict(zip(STEPS, [12.0] * 12)))
    return b.loss(loss)


def test_saturation_warns_at_half_the_outputs_when_the_loss_does_not_learn():
    f = a.saturated_activations(sat({"acts.0": a.SAT_LAYER_FRAC}, flat_loss(300)).record)[0]
    assert f.severity == "warning" and f.layers == ("acts.0",)
    assert "pre-activation std 12" in f.summary
    assert "not normalised" in f.advice and "x_train.std(0)" in f.advice
    assert a.saturated_activations(sat({"acts.0": a.SAT_LAYER_FRAC - 0.01}, flat_loss(300)).record) == []


def test_saturation_is_info_when_the_run_learns_anyway():
    f = a.saturated_activations(sat({"acts.0": 0.6}, falling_loss(300)).record)[0]
    assert f.severity == "info"


def test_saturation_of_the_output_layer_is_not_reported():
    assert a.saturated_activations(sat({"out": 0.99}, flat_loss(300)).record) == []


def test_saturation_needs_a_bounded_output():
    # nn.RNN(nonlinearity="relu") is probed like a tanh RNN; its outputs are not bounded
    b = sat({"acts.0": 0.9}, flat_loss(300))
    b.series("act_std/acts.0", dict(zip(STEPS, [0.5] * 11 + [a.BOUNDED_STD * 1.5])))
    assert a.saturated_activations(b.record) == []


def functional_cell(level: float) -> Build:
    """issue 25: h = torch.tanh(self.i2h(...)): no tanh module; the i2h Linear carries
    the saturation of the tanh after it (measured on its output, unbounded: std 30)."""
    b = Build()
    b.layer("emb", "Embedding", params={"weight": [65, 10]})
    b.layer("i2h", "Linear", activation_after="tanh", params={"weight": [64, 74], "bias": [64]})
    b.layer("out", "Linear", params={"weight": [65, 64], "bias": [65]})
    b.series("act_sat_frac/i2h", dict(zip(STEPS, [level] * 12)))
    b.series("act_std/i2h", dict(zip(STEPS, [30.0] * 12)))
    return b.loss(flat_loss(300))


def test_saturation_of_a_functional_tanh_is_read_on_the_layer_feeding_it():
    f = a.saturated_activations(functional_cell(0.95).record)
    assert f and f[0].severity == "warning" and f[0].layers == ("i2h",)
    assert "`torch.tanh` applied to `i2h`" in f[0].summary and "pre-activation std 30" in f[0].summary
    assert "self.i2h(x)" in f[0].advice and "nn.init.xavier_normal_(model.i2h.weight)" in f[0].advice
    assert a.saturated_activations(functional_cell(a.SAT_LAYER_FRAC - 0.01).record) == []


def test_dead_relu_single_batch_needs_a_fully_dead_layer():
    """A step-0 checkup has one batch: 55% idle units is chance, 100% is conclusive."""
    one = lambda v: a.dead_relu(dead({"acts.1": [v]}).record)  # noqa: E731
    assert one(0.56) == []
    assert [f.severity for f in one(1.0)] == ["critical"]
