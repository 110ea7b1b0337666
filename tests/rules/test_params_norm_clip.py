"""no_gradient / not_updated / batchnorm_small_batch / clipping_always_active."""

from __future__ import annotations

import pytest
from rulebuild import Build, falling_loss, flat_loss

from gradvitals.rules import clipping as c
from gradvitals.rules import normalization as n
from gradvitals.rules import params as p

STEPS = list(range(0, 300, 25))


def trained(b: Build, steps: int = 100) -> Build:
    return b.series("grad_norm_global", [1.0] * steps).loss(falling_loss(steps))


# ------------------------------------------------------------------ no_gradient
def test_no_gradient_for_a_disconnected_trainable_layer():
    b = trained(Build().mlp(3).layer("aux", "Linear", params={"weight": [5, 10], "bias": [5]}))
    for name in ("aux.weight", "aux.bias"):
        b.record.params[name].grad_seen = False
    f = p.no_gradient(b.record)[0]
    assert f.severity == "warning" and f.layers == ("aux",)
    assert "`aux` (2 tensors, 55 parameters) never received a gradient in 100 steps" in f.summary
    assert "model.aux.requires_grad_(False)" in f.advice


@pytest.mark.parametrize("aux_ran", [False, True])
def test_no_gradient_says_whether_the_layer_ever_ran(aux_ran):
    """Other layers ran in the traced forwards (they have a forward position and
    activation statistics at 4 traced steps): a layer that never did is a code path
    that never runs (an expert no input is routed to), not a detached output."""
    b = trained(Build().mlp(3).layer("aux", "Linear", params={"weight": [5, 10], "bias": [5]}, depth=aux_ran))
    for name in ("aux.weight", "aux.bias"):
        b.record.params[name].grad_seen = False
    b.series("act_mean/layers.0", {0: 0.1, 25: 0.1, 50: 0.1, 75: 0.1})
    f = p.no_gradient(b.record)[0]
    assert f.evidence["ran_in_traced_forwards"] is aux_ran
    if aux_ran:
        assert "it is not connected to the loss." in f.summary and "flows into the loss" in f.advice
    else:
        assert "it never ran in the 4 forward passes traced, while the model's other layers did" in f.summary
        assert "load-balancing" in f.advice and "model.aux.requires_grad_(False)" in f.advice
    b.record.series.pop("act_mean/layers.0")  # nothing traced: no claim either way
    f = p.no_gradient(b.record)[0]
    assert "ran_in_traced_forwards" not in f.evidence and "not connected to the loss" in f.summary


def test_frozen_or_excluded_parameters_are_not_no_gradient():
    b = trained(Build().mlp(3))
    for info in list(b.record.params.values())[:2]:
        info.requires_grad = False
        info.grad_seen = False
    third = list(b.record.params.values())[2]
    third.grad_seen, third.in_optimizer = False, False
    assert p.no_gradient(b.record) == []


def test_no_gradient_anywhere_is_critical_and_needs_a_step():
    b = trained(Build().mlp(3))
    for info in b.record.params.values():
        info.grad_seen = False
    assert p.no_gradient(b.record)[0].severity == "critical"
    assert p.no_gradient(Build().mlp(3).record) == []  # nothing recorded yet


def reloaded(in_optimizer: bool | None, got_some: bool = False) -> Build:
    """A trained model "model" and a second one "best" (a checkpoint reloaded to be
    evaluated, a teacher, a target network) whose parameters got no gradient."""
    b = trained(Build().mlp(3, model="model"))
    b.layer("best:0", "Linear", params={"weight": [64, 64], "bias": [64]}, model="best")
    b.layer("best:1", "Linear", params={"weight": [10, 64], "bias": [10]}, model="best")
    for name in ("best:0.weight", "best:0.bias", "best:1.weight", "best:1.bias"):
        b.record.params[name].grad_seen = got_some and name.startswith("best:1")
        b.record.params[name].in_optimizer = in_optimizer
    return b


def test_a_model_nothing_trains_is_evaluated_not_disconnected():
    """No gradient anywhere in it and no optimizer known to hold it (in_optimizer None:
    it appeared after the last step): it is evaluated, not trained."""
    assert p.no_gradient(reloaded(None).record) == []
    assert p.no_gradient(reloaded(False).record) == []


def test_a_model_an_optimizer_holds_or_partly_trained_is_still_no_gradient():
    f = p.no_gradient(reloaded(True).record)  # its optimizer steps it: disconnected from the loss
    assert f and f[0].layers == ("best:0", "best:1") and f[0].severity == "warning"
    f = p.no_gradient(reloaded(None, got_some=True).record)  # part of it trains: the rest is cut off
    assert f and f[0].layers == ("best:0",)
    b = reloaded(None)  # the only model, with no gradient: nothing else trained either
    for info in b.record.params.values():
        info.grad_seen, info.in_optimizer = False, None
    assert p.no_gradient(b.record)[0].severity == "critical"


# ------------------------------------------------------------------ not_updated
def test_not_updated_when_missing_from_the_optimizer():
    b = trained(Build().mlp(4))
    b.record.params["layers.1.weight"].in_optimizer = False
    b.record.params["layers.1.bias"].in_optimizer = False
    f = p.not_updated(b.record)[0]
    assert f.layers == ("layers.1",) and "not in the optimizer" in f.summary
    assert "model.layers[1].parameters()" in f.advice


def test_not_updated_from_exact_zero_ratios_only_when_others_move_and_the_gradient_is_real():
    def build(rel_grad: float, others: float) -> Build:
        b = Build().mlp(4)
        b.ratios(STEPS, lambda s, i, name: 0.0 if name == "layers.0.weight" else others, grad=rel_grad * 5.0)
        return trained(b, 300)

    f = p.not_updated(build(p.NOT_UPDATED_MIN_RELATIVE_GRAD, 1e-3).record)
    assert f and f[0].evidence["zero_update_ratio"] == ["layers.0.weight"]
    # a vanishing gradient rounds to a zero update: not this finding
    assert p.not_updated(build(p.NOT_UPDATED_MIN_RELATIVE_GRAD * 0.9, 1e-3).record) == []
    # nothing moves anywhere: a learning rate / clipping matter
    assert p.not_updated(build(1.0, 0.0).record) == []


def test_not_updated_ignores_a_zero_initialised_tensor_that_barely_moved():
    # a bias at norm ~1e-23 under a gradient of 1e-22 (underflowing early layers of a
    # 50-layer tanh MLP): the ratio divides by ~0, the zero update is float32 rounding
    def build(weight: float) -> Build:
        b = Build().mlp(4)
        b.ratios(STEPS, lambda s, i, name: 0.0 if name == "layers.0.weight" else 1e-3,
                 grad=10 * weight, weight=weight)
        for name in b.weights():
            if name != "layers.0.weight":
                for s in STEPS:
                    b.record.add(f"weight_norm/{name}", s, 5.0)
        return trained(b, 300)

    assert p.not_updated(build(7.5e-23).record) == []
    assert p.not_updated(build(p.NOT_UPDATED_MIN_WEIGHT_NORM * 0.99).record) == []
    assert p.not_updated(build(p.NOT_UPDATED_MIN_WEIGHT_NORM * 1.01).record)


def rebuilt(optimizer_got_grads: bool) -> Build:
    """A model whose every parameter gets gradients and is in no optimizer, in a run
    whose optimizer (Adam) steps 6 tensors of no model this run uses."""
    b = Build().mlp(3).loss(flat_loss(80))
    b.record.run["optimizers"] = ["Adam"]
    for info in b.record.params.values():
        info.in_optimizer, info.grad_seen = False, True
    for i in range(6):
        b.series(f"weight_norm/opt.param{i}", {0: 5.0, 25: 5.0})
        b.series(f"update_ratio/opt.param{i}", {0: 0.0, 25: 0.0})
        if optimizer_got_grads:
            b.series(f"grad_norm/opt.param{i}", {0: 1.0, 25: 1.0})
    return b


def test_not_updated_model_built_again_after_its_optimizer_is_critical():
    f = p.not_updated(rebuilt(False).record)
    assert len(f) == 1 and f[0].severity == "critical"
    assert set(f[0].layers) == {"layers.0", "layers.1", "head"}
    assert ("receive gradients but never change: no optimizer holds them, and the optimizer (Adam) steps "
            "6 parameter tensors that never receive a gradient") in f[0].summary
    assert "built again" in f[0].summary and f[0].evidence["stale_optimizer_params"] == 6
    assert "optimizer = torch.optim.Adam(model.parameters()" in f[0].advice
    # the optimizer's own parameters do get gradients (a loss network left trainable beside
    # the model that trains): only the warning that they are not in the optimizer
    f = p.not_updated(rebuilt(True).record)
    assert f[0].severity == "warning" and "not in the optimizer" in f[0].summary


def test_not_updated_under_fsdp2_says_the_optimizer_was_built_before_fully_shard():
    b = rebuilt(False)
    b.record.run["distributed"] = {"world_size": 2, "strategy": "fsdp2"}
    (f,) = p.not_updated(b.record)
    assert f.severity == "critical" and "built before fully_shard" in f.summary
    ev = f.evidence
    assert (ev["cause"], ev["optimizer_tensors"], ev["optimizer_tensors_of_model"]) == (
        "optimizer_before_fully_shard", 6, 0)
    assert "fully_shard(model)" in f.advice
    # the same record under DDP: the model was rebuilt, not sharded
    b.record.run["distributed"]["strategy"] = "ddp"
    (f,) = p.not_updated(b.record)
    assert f.evidence["cause"] == "model_rebuilt_after_optimizer" and "built again" in f.summary


# ------------------------------------------------------------------ BatchNorm
def bn_run(samples: list[float], batch: int | None, kind: str = "BatchNorm1d") -> Build:
    b = Build()
    b.layer("fc", "Linear", params={"weight": [32, 16]})
    extra = {"batch_size": batch} if batch is not None else {}
    b.layer("bn", kind, params={"weight": [32], "bias": [32]}, **extra)
    return b.series("bn_batch/bn", dict(zip(STEPS, samples)))


def test_batchnorm_small_batch_below_eight_samples():
    f = n.batchnorm_small_batch(bn_run([7.0] * 12, 7).record)[0]
    assert f.layers == ("bn",) and "batches of 7 samples" in f.summary
    assert "model.bn = nn.LayerNorm(32)" in f.advice
    assert n.batchnorm_small_batch(bn_run([8.0] * 12, 8).record) == []


def test_batchnorm_conv_uses_the_batch_size_not_the_pixels_and_ignores_a_short_last_batch():
    # BatchNorm2d over 4 x 16 x 16: 1024 samples per channel, but a batch of 4.
    f = n.batchnorm_small_batch(bn_run([1024.0] * 12, 4, kind="BatchNorm2d").record)[0]
    assert f.evidence["batch_size_by_layer"] == {"bn": 4.0}
    assert "nn.GroupNorm(8, 32)" in f.advice
    # batches of 64, the epoch's last one of 3: the median decides
    assert n.batchnorm_small_batch(bn_run([64.0] * 11 + [3.0], 3).record) == []


# ------------------------------------------------------------------ clipping
def clip_run(max_norm: float, norms: list[float], loss: list[float]) -> Build:
    b = Build().mlp(3)
    b.series("clip_max_norm", [max_norm] * len(norms))
    b.series("clip_total_norm", norms)
    b.series("clip_clipped", [1.0 if x > max_norm else 0.0 for x in norms])
    return b.loss(loss)


def test_clip_max_norm_zero_is_critical():
    f = c.clipping_always_active(clip_run(0.0, [1.0] * 50, flat_loss(50)).record)[0]
    assert f.severity == "critical" and "max_norm=0" in f.summary


def test_clipping_every_step_by_10x_is_a_warning_with_a_suggested_max_norm():
    f = c.clipping_always_active(clip_run(0.1, [1.0] * 100, falling_loss(100)).record)[0]
    assert f.severity == "warning" and f.evidence["median_scale"] == 10.0
    assert "max_norm=1)" in f.advice


def test_mild_constant_clipping_of_a_learning_run_is_info():
    f = c.clipping_always_active(clip_run(1.0, [2.0] * 100, falling_loss(100)).record)[0]
    assert f.severity == "info"
    # the same mild clipping (3x) while the loss is stuck is a warning
    assert c.clipping_always_active(clip_run(1.0, [3.0] * 100, flat_loss(100)).record)[0].severity == "warning"


def test_clipping_under_ninety_percent_is_not_a_finding():
    norms = [2.0] * 88 + [0.5] * 12  # 88% of the 95 steps after warmup... check the edge
    late = norms[c.WARMUP_STEPS:]
    assert sum(x > 1.0 for x in late) / len(late) < c.CLIP_ALWAYS_FRACTION
    assert c.clipping_always_active(clip_run(1.0, norms, falling_loss(100)).record) == []
    norms = [2.0] * 92 + [0.5] * 8
    assert c.clipping_always_active(clip_run(1.0, norms, falling_loss(100)).record)


def test_frequent_large_clipping_after_warmup_is_a_warning_with_rate_and_size():
    # issue 25: clipped on ~65% of the steps, norms 15-40x max_norm 1.0
    norms = [0.5 if i % 3 == 0 else 15.0 + (i % 26) for i in range(150)]
    f = c.clipping_always_active(clip_run(1.0, norms, falling_loss(150)).record)[0]
    assert f.severity == "warning"
    assert 0.6 < f.evidence["clipped_fraction"] < 0.7
    assert 15.0 <= f.evidence["median_scale"] <= 40.0
    assert f.evidence["window_first_step"] == 15  # the first tenth of the run is warm-up
    assert f"{f.evidence['clipped_fraction']:.0%} of 135 steps" in f.summary and "learning rate is too high" in f.advice


@pytest.mark.parametrize("clipped,found", [(3, False), (4, False), (5, True), (20, True)])
def test_clip_rate_alarm_edge_over_the_window(clipped, found):
    # 100 steps, window = steps 10..99 (90 calls); CLIP_RATE_ALARM = 5% = 4.5 calls
    norms = [0.5] * 100
    for k in range(clipped):
        norms[99 - 7 * k] = 30.0
    got = c.clipping_always_active(clip_run(1.0, norms, falling_loss(100)).record)
    assert bool(got) == found
    assert not got or got[0].severity == "warning"


def test_clipping_only_in_the_first_steps_is_clean():
    # large clips during warm-up (the first tenth), never after
    norms = [40.0] * 10 + [0.5] * 90
    assert c.clipping_always_active(clip_run(1.0, norms, falling_loss(100)).record) == []


def test_frequent_mild_clipping_is_clean():
    # the classic SGD LSTM recipe: clipped often, but each clip a small cut
    norms = [2.0 if i % 2 else 0.5 for i in range(100)]
    assert c.clipping_always_active(clip_run(1.0, norms, falling_loss(100)).record) == []


# ------------------------------------------------------------------ grad_not_zeroed
@pytest.mark.parametrize("n,severity", [
    (p.GRAD_NOT_ZEROED_MIN_STEPS - 1, None),  # one or two such steps: no finding
    (p.GRAD_NOT_ZEROED_MIN_STEPS, "warning"),
    (89, "warning"),                          # 89 of the 99 steps from step 1: degraded
    (90, "critical"),                         # >= GRAD_NOT_ZEROED_BROKEN of them: broken
])
def test_grad_not_zeroed_from_the_recorders_event(n, severity):
    b = trained(Build().mlp(3))  # 100 steps
    b.record.run["optimizers"] = ["SGD"]
    b.event("grad_not_zeroed", step=1, optimizer="opt", optimizer_kind="SGD", steps=n, last_step=99)
    found = p.grad_not_zeroed(b.record)
    if severity is None:
        assert found == []
        return
    f = found[0]
    assert f.code == "grad_not_zeroed" and f.severity == severity and f.step == 1
    assert f"The optimizer (SGD) stepped on gradients that were never cleared at {n} of its 99 steps from step 1" in f.summary
    assert "optimizer.zero_grad()" in f.advice and f.evidence["steps"] == n


def test_grad_not_zeroed_names_the_optimizer_when_there_are_several():
    b = trained(Build().mlp(3))
    b.record.run["optimizers"] = ["SGD", "Adam"]
    b.event("grad_not_zeroed", step=0, optimizer="opt1", optimizer_kind="Adam", steps=100)
    f = p.grad_not_zeroed(b.record)[0]
    assert f.summary.startswith("Optimizer `opt1` (Adam) stepped on gradients")
    assert p.grad_not_zeroed(trained(Build().mlp(3)).record) == []  # no event: nothing


# ------------------------------------------------------------------ eval_mode_training
@pytest.mark.parametrize("kinds,steps,fires", [
    (("BatchNorm1d", "Dropout"), n.EVAL_TRAINING_MIN_STEPS, True),
    (("BatchNorm1d", "Dropout"), n.EVAL_TRAINING_MIN_STEPS - 1, False),  # a step or two: no habit
    (("Dropout",), 40, True),
    (("ReLU",), 40, False),  # nothing computes differently in eval mode: the same training
])
def test_eval_mode_training_only_where_the_mode_matters(kinds, steps, fires):
    b = trained(Build().mlp(3))
    for i, kind in enumerate(kinds):
        b.layer(f"extra.{i}", kind)
    b.event("eval_mode_training", step=10, model="", steps=steps, last_step=99)
    found = n.eval_mode_training(b.record)
    assert bool(found) is fires
    if fires:
        f = found[0]
        assert f.severity == "warning" and f.step == 10 and f.evidence["steps"] == steps
        assert f"From step 10, {steps} of 90 steps trained the model on forwards run in eval mode" in f.summary
        assert "model.train()" in f.advice
        assert ("BatchNorm" in f.summary) is ("BatchNorm1d" in kinds) and "dropout" in f.summary


@pytest.mark.parametrize("evaluated_first", [True, False])
def test_eval_mode_training_says_what_put_the_model_in_eval_mode(evaluated_first):
    b = trained(Build().mlp(3)).layer("drop", "Dropout")
    b.event("eval_mode_training", step=0, model="", steps=100, last_step=99, evaluated_first=evaluated_first)
    f = n.eval_mode_training(b.record)[0]
    assert f.summary.startswith("From step 0, 100 of 100 steps trained the model on forwards run in eval mode, ")
    assert ("after an evaluation before its first step" in f.summary) is evaluated_first
    assert ("after it had trained in train mode" in f.summary) is not evaluated_first
    assert "model.train()" in f.advice and "`drop`" in f.summary
