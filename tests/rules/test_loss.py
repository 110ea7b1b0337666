"""loss_plateau / loss_spike on hand-built loss curves, at their edges."""

from __future__ import annotations

import math

import pytest
from rulebuild import Build, falling_loss, flat_loss

from gradvitals.rules import loss as L


def with_progress(progress: float, n: int = 300, start: float = 2.3) -> list[float]:
    """Flat start level, then a step down so that (start - end) / start == progress."""
    k = n // 10
    return [start] * (n - k) + [start * (1 - progress)] * k


def test_plateau_fires_below_five_percent_progress_and_not_above():
    f = L.loss_plateau(Build().loss(with_progress(L.PLATEAU_PROGRESS - 0.001)).record)
    assert [x.code for x in f] == ["loss_plateau"]
    assert f[0].evidence["progress"] < L.PLATEAU_PROGRESS
    assert "2.3 at the start" in f[0].summary and "after 299 steps" in f[0].summary
    assert L.loss_plateau(Build().loss(with_progress(L.PLATEAU_PROGRESS + 0.001)).record) == []


def test_plateau_needs_enough_steps():
    assert L.loss_plateau(Build().loss(flat_loss(L.PLATEAU_MIN_STEPS)).record) == []
    assert L.loss_plateau(Build().loss(flat_loss(L.PLATEAU_MIN_STEPS + 2)).record)


def test_plateau_skips_adversarial_runs_and_diverged_ones():
    gan = Build().loss(flat_loss(300)).series("loss/opt1", flat_loss(300))
    assert L.loss_plateau(gan.record) == []
    rising = Build().loss([2.3] * 150 + [5.0] * 150)
    assert L.loss_plateau(rising.record) == []


def test_plateau_judges_only_the_loss_before_a_nan():
    b = Build().loss(flat_loss(200) + [math.nan] * 100)
    f = L.loss_plateau(b.record)
    assert f and f[0].evidence["steps"] == 199


def test_no_spike_in_a_healthy_noisy_curve_even_near_zero():
    noisy = [max(0.01, v * (1 + 0.9 * math.sin(7.3 * i))) for i, v in enumerate(falling_loss(400, end=0.05))]
    assert L.find_spikes(Build().loss(noisy).record) == []


def test_spike_found_at_its_step_and_severe_is_a_warning():
    values = flat_loss(100, level=1.0, wiggle=0.02)
    values[60] = 3.0
    f = L.loss_spike(Build().loss(values).record)[0]
    assert f.step == 60 and f.severity == "warning"
    assert f.evidence["after"] == 3.0 and "at step 60" in f.summary


def test_spike_must_clear_the_relative_threshold():
    values = flat_loss(100, level=1.0, wiggle=0.0)
    values[60] = 1.0 + L.SPIKE_REL * 0.99
    assert L.find_spikes(Build().loss(values).record) == []
    values[60] = 1.0 + L.SPIKE_REL * 1.01
    assert [s.step for s in L.find_spikes(Build().loss(values).record)] == [60]


def test_early_jump_right_after_the_first_step():
    f = L.loss_spike(Build().loss([2.3, 40.0] + [2.2] * 50).record)[0]
    assert f.step == 1 and f.evidence["after"] == 40.0


def test_divergence_is_critical():
    values = flat_loss(100, level=1.0, wiggle=0.02) + [3.0] * 40
    f = L.loss_spike(Build().loss(values).record)[0]
    assert f.severity == "critical" and f.evidence["diverged"] is True


def test_moderate_spike_the_run_recovers_from_is_info_but_not_if_it_stays_high():
    # a BatchNorm CNN at a brisk lr: 2.6 -> 3.5 in its first steps, then learns to 0.1
    early = [2.56, 2.62, 3.31, 3.52, 2.47, 1.66, 1.24, 0.9, 0.65, 0.35] + [0.1] * 140
    f = L.loss_spike(Build().loss(early).record)[0]
    assert f.step == 3 and f.severity == "info"
    stuck = [2.32, 2.28, 2.65, 3.25, 3.42] + [2.3] * 145  # lr too high: up, then nothing learned
    assert L.loss_spike(Build().loss(stuck).record)[0].severity == "warning"


def test_spikes_of_adversarial_losses_are_only_info():
    values = flat_loss(100, level=1.0, wiggle=0.02)
    values[60] = 5.0
    b = Build().loss(values).series("loss/opt1", flat_loss(100))
    assert L.loss_spike(b.record)[0].severity == "info"


def test_a_late_spike_undoing_a_third_of_the_progress_then_recovering_is_info():
    # a healthy residual MLP: 2.3 -> 0.09, one batch jumps to 0.76 at step 100, back to 0.09
    values = [0.09 + 2.2 * math.exp(-i / 15) for i in range(100)] + [0.76] + [0.09] * 99
    f = L.loss_spike(Build().loss(values).record)[0]
    assert f.step == 100 and f.severity == "info"
    values[100] = 0.09 + 0.55 * 2.21  # undoes 55% of the progress, but the next batches shrug it off
    assert L.loss_spike(Build().loss(values).record)[0].severity == "info"
    for k in range(100, 100 + L.SPIKE_RECOVERY_STEPS):  # ...and now it persists: severe
        values[k] = 0.09 + 0.55 * 2.21
    assert L.loss_spike(Build().loss(values).record)[0].severity == "warning"


def test_a_spike_above_twice_the_starting_loss_is_severe_even_if_it_passes():
    values = [2.3, 2.3, 2.3, 2.3] + [2.3 * L.SPIKE_EXTREME_OF_START * 1.01] + [0.1] * 200
    assert L.loss_spike(Build().loss(values).record)[0].severity == "warning"
    values[4] = 2.3 * L.SPIKE_EXTREME_OF_START * 0.99
    assert L.loss_spike(Build().loss(values).record)[0].severity == "info"


def test_a_short_run_that_bumps_early_then_learns_recovered():
    early = [2.56, 2.62, 3.31, 3.52, 2.47, 1.66, 1.24, 0.9, 0.65, 0.35, 0.41, 0.48, 0.44, 0.37, 0.36, 0.29]
    assert L.loss_spike(Build().loss(early + [1.4] * 4).record)[0].severity == "info"  # ends 0.54x the level
    assert L.loss_spike(Build().loss(early[:6] + [2.2] * 10).record)[0].severity == "warning"


@pytest.mark.parametrize("loss_fn,made_by,classes,needle", [
    ("cross_entropy", "SoftmaxBackward0", 10, "with 10 classes the loss cannot go below log(1 + 9/e) = 1.46"),
    ("cross_entropy", "SoftmaxBackward0", None, "trains through two softmaxes"),
    ("nll_loss", "SoftmaxBackward0", 10, "probabilities taken for log-probabilities"),
    ("binary_cross_entropy_with_logits", "SigmoidBackward0", 1, "trains through two sigmoids"),
])
def test_loss_on_probabilities_from_the_recorders_event(loss_fn, made_by, classes, needle):
    from gradvitals.rules import loss as L

    b = Build().mlp(3).loss(falling_loss(100))
    b.event("loss_on_probabilities", step=0, loss=loss_fn, input_from=made_by, classes=classes, steps=4,
            checked=5)
    f = L.loss_on_probabilities(b.record)[0]
    assert f.code == "loss_on_probabilities" and f.severity == "warning" and f.step == 0
    assert "at 4 of the 5 steps checked from step 0" in f.summary and needle in f.summary
    assert ("loss_floor" in f.evidence) is (loss_fn == "cross_entropy" and classes is not None)
    b2 = Build().mlp(3).loss(falling_loss(100))
    b2.event("loss_on_probabilities", step=0, loss="mse_loss", input_from="SoftmaxBackward0", steps=100)
    assert L.loss_on_probabilities(b2.record) == []  # a pair it does not know: nothing


# --------------------------------------------------------- spikes at scale
def _noise(n: int, d: float = 0.05) -> list[float]:
    return [d * math.sin(1.7 * i + 0.3) for i in range(n)]


def _robust_sd(logs: list[float]) -> tuple[float, float]:
    """The window's median and 1.4826 x MAD, computed here as the oracle."""
    import statistics
    m = statistics.median(logs)
    return m, 1.4826 * statistics.median(abs(x - m) for x in logs)


def _scale_record(jump_z: float, n_before: int = 30):
    """Log-loss noise around log 2, then one step jump_z robust deviations above the
    previous points' median, then the noise again."""
    logs = _noise(n_before)
    m, sd = _robust_sd(logs[-L.SCALE_WINDOW:])
    logs = logs + [m + jump_z * sd] + _noise(10)
    return Build().loss([2.0 * math.exp(x) for x in logs]).record, n_before


def test_scale_spike_at_six_robust_deviations_and_not_below():
    r, at = _scale_record(L.SCALE_Z + 0.01)
    scale = L.scale_spikes(r)
    assert [e["step"] for e in scale["events"]] == [at] and scale["loss_spikes"] == 1
    assert scale["events"][0]["recovered"] is True and scale["events"][0]["recovered_step"] == at + 1
    r, _ = _scale_record(L.SCALE_Z - 0.01)
    assert L.scale_spikes(r)["events"] == []


def test_scale_needs_min_samples_before_judging():
    r, at = _scale_record(20.0, n_before=L.SCALE_MIN_SAMPLES - 1)
    assert L.scale_spikes(r)["events"] == []
    r, at = _scale_record(20.0, n_before=L.SCALE_MIN_SAMPLES)
    assert [e["step"] for e in L.scale_spikes(r)["events"]] == [at]


def test_scale_co_spike_and_the_layer_that_jumped_first():
    b = Build().layer("a", "Linear", params={"weight": [4, 4]}).layer("b", "Linear", params={"weight": [4, 4]})
    n = 40
    wiggle = [math.exp(x) for x in _noise(n)]
    loss = [2.0 * w for w in wiggle]
    loss[31] = 8.0
    ga = list(wiggle)
    gb = [w * 1.1 for w in reversed(wiggle)]
    gb[30] = 20.0  # b jumps one step before a and the loss
    ga[31] = 50.0  # a jumps more, but later
    b.loss(loss).series("grad_norm/a.weight", ga).series("grad_norm/b.weight", gb)
    b.series("grad_norm_global", [math.hypot(x, y) for x, y in zip(ga, gb)])
    scale = L.scale_spikes(b.record)
    ev = scale["events"][0]
    assert len(scale["events"]) == 1
    assert ev["co_spike"] and ev["loss_z"] >= L.SCALE_Z and ev["grad_norm_z"] >= L.SCALE_Z
    assert (ev["first_layer"], ev["first_layer_step"]) == ("b", 30)
    assert [j["layer"] for j in ev["layers_jumped"]] == ["b", "a"]
    f = L.loss_spike(b.record)[0]
    assert f.layers == ("b",) and "b jumped first" in f.summary


def test_a_loss_that_stays_up_is_not_recovered_and_a_short_tail_is_unknown():
    start = [2.0 * math.exp(x) for x in _noise(30)]
    # the spike steps go on until the window fills with the new level; then 100 more
    ev = L.scale_spikes(Build().loss(start + [10.0] * (L.SCALE_RECOVERY_STEPS + 60)).record)["events"][0]
    assert ev["step"] == 30 and ev["recovered"] is False
    ev = L.scale_spikes(Build().loss(start + [10.0] * 5).record)["events"][0]
    assert ev["step"] == 30 and ev["recovered"] is None


def test_scale_a_converged_loss_wiggling_in_its_last_digit_is_not_a_spike():
    """A loss near zero, logged rounded (the HF Trainer rounds to 4 decimals): 1e-4 ->
    3e-4 is x3 against a flat window (z in the hundreds) but undoes nothing of the
    2.3 the run removed; an LLM-like 10 -> 2.5 run whose loss jumps 2.5 -> 2.7 (2.7% of
    its progress) still spikes."""
    falling = [round(2.3 * math.exp(-0.25 * i), 4) for i in range(40)]
    tail = [0.0001] * 60
    tail[30], tail[45] = 0.0003, 0.0002
    scale = L.scale_spikes(Build().loss(falling + tail).record)
    assert scale is not None and [e for e in scale["events"] if e["loss_z"] is not None] == []
    assert L.loss_spike(Build().loss(falling + tail).record) == []
    llm = [2.5 + 7.5 * math.exp(-0.1 * i) + 0.005 * math.sin(1.7 * i) for i in range(260)]
    llm[250] = 2.7
    events = [e for e in L.scale_spikes(Build().loss(llm).record)["events"] if e["loss_z"] is not None]
    assert [e["step"] for e in events] == [250]
