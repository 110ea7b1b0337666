"""architecture_risk on hand-built step-0 records (no torch)."""

from __future__ import annotations

import math

from gradvitals.record import LayerInfo, Record
from gradvitals.rules.architecture import (
    DEEP_PLAIN_LAYERS,
    POST_LN_DEEP_LAYERS,
    SATURATING_STACK_LAYERS,
    SPECTRAL_RADIUS_LIMIT,
    STACK_GRAD_SHRINK,
    architecture_risk,
)


def record(**event: object) -> Record:
    rec = Record()
    rec.event("init_audit", model="m", step=0, **event)
    rec.steps = 1
    return rec


def stack(rec: Record, n: int, act: str, *, grads: list[float] | None = None, start: int = 0,
          prefix: str = "l", **extra: object) -> None:
    """n Linear layers each followed by ``act``, He-matched weights (std = sqrt(2/64))."""
    for i in range(n):
        name = f"{prefix}{i}"
        rec.layers[name] = LayerInfo(
            name=name, kind="Linear", depth=start + i, activation_after=act, model="m", params=[f"{name}.weight"],
            extra={"fan_in": 64, "fan_out": 64, "weight_std": math.sqrt(2 / 64), **extra})
        if grads is not None:
            rec.add(f"grad_norm/{name}.weight", 0, grads[i])


def kinds(findings):
    return [(f.evidence["kind"], f.severity) for f in findings]


def test_sigmoid_stack_edge_and_measured_severity():
    rec = record()
    stack(rec, SATURATING_STACK_LAYERS - 1, "Sigmoid")
    assert architecture_risk(rec) == []
    rec = record()
    stack(rec, SATURATING_STACK_LAYERS, "Sigmoid")
    f = architecture_risk(rec)
    assert kinds(f) == [("saturating_stack", "warning")]  # unmeasured sigmoid: 0.25^8 says enough
    assert "ReLU/GELU" in f[0].advice and "x = x + block(x)" in f[0].advice
    assert f[0].layers[0] == "l0" and len(f[0].layers) == SATURATING_STACK_LAYERS


def test_stack_severity_follows_the_measured_gradient_shrink():
    n = SATURATING_STACK_LAYERS + 2
    shrinking = [STACK_GRAD_SHRINK / 2] + [1.0] * (n - 1)  # first layer 200x below the last
    flowing = [STACK_GRAD_SHRINK * 2] + [1.0] * (n - 1)
    rec = record()
    stack(rec, n, "Tanh", grads=shrinking)
    assert kinds(architecture_risk(rec)) == [("saturating_stack", "warning")]
    rec = record()
    stack(rec, n, "Tanh", grads=flowing)
    f = architecture_risk(rec)
    assert kinds(f) == [("saturating_stack", "info")]
    assert f[0].evidence["grad_shrink"] == STACK_GRAD_SHRINK * 2


def test_unmeasured_tanh_stack_is_info():
    rec = record()
    stack(rec, SATURATING_STACK_LAYERS, "tanh")
    assert kinds(architecture_risk(rec)) == [("saturating_stack", "info")]


def test_residual_paths_break_the_stack():
    rec = record()
    stack(rec, 20, "Sigmoid", residual_bypass=True)
    assert architecture_risk(rec) == []


def test_a_relu_layer_splits_a_stack():
    rec = record()
    half = SATURATING_STACK_LAYERS - 1
    stack(rec, half, "Sigmoid", prefix="a")
    stack(rec, 1, "ReLU", prefix="r", start=half)
    stack(rec, half, "Sigmoid", prefix="b", start=half + 1)
    assert architecture_risk(rec) == []


def test_post_ln_depth_edge_and_warmup():
    names = [f"enc.layers.{i}" for i in range(POST_LN_DEEP_LAYERS)]
    assert architecture_risk(record(post_ln_layers=names[:-1])) == []
    rec = record(post_ln_layers=names)
    f = architecture_risk(rec)
    assert kinds(f) == [("post_ln", "warning")]
    assert "norm_first=True" in f[0].advice and f[0].layers == tuple(names)
    for step, lr in enumerate([1e-5, 5e-4, 1e-3, 1e-3]):  # a warmup ramp in the lr series
        rec.add("lr/opt.0", step, lr)
    assert kinds(architecture_risk(rec)) == [("post_ln", "info")]


def test_post_ln_from_the_trace_when_not_a_torch_layer():
    # a Post-LN stack of n layers feeds 2n - 1 residual adds from LayerNorm outputs
    norms = [f"h.{i // 2}.ln_{i % 2}" for i in range(2 * POST_LN_DEEP_LAYERS - 1)]
    f = architecture_risk(record(post_ln_norms=norms))
    assert kinds(f) == [("post_ln", "warning")] and f[0].evidence["source"] == "traced"
    assert architecture_risk(record(post_ln_norms=norms[:-2])) == []


def test_recurrent_spectral_radius_edge():
    def rnn(radius: float, gates: int = 1) -> Record:
        rec = record()
        rec.layers["rnn"] = LayerInfo(name="rnn", kind="RNN" if gates == 1 else "LSTM", depth=0, model="m",
                                      params=["rnn.weight_hh_l0"],
                                      extra={"spectral_radius": radius, "recurrent_gates": gates,
                                             "spectral_radius_by_param": {"weight_hh_l0": radius}})
        return rec

    assert architecture_risk(rnn(SPECTRAL_RADIUS_LIMIT)) == []
    assert architecture_risk(rnn(1.0)) == []  # orthogonal init sits exactly on the edge
    f = architecture_risk(rnn(1.5))
    assert kinds(f) == [("recurrent_spectral_radius", "warning")]
    assert "1.50" in f[0].summary and "orthogonal_" in f[0].advice and "clip_grad_norm_" in f[0].advice
    assert architecture_risk(rnn(1.5, gates=4)) == []  # LSTM: the cell path carries the gradient


def test_deep_plain_relu_stack_is_info_only():
    rec = record()
    stack(rec, DEEP_PLAIN_LAYERS - 1, "ReLU")
    assert architecture_risk(rec) == []
    rec = record()
    stack(rec, DEEP_PLAIN_LAYERS, "ReLU")
    assert kinds(architecture_risk(rec)) == [("deep_plain_stack", "info")]
    rec.layers["norm"] = LayerInfo(name="norm", kind="LayerNorm", depth=DEEP_PLAIN_LAYERS // 2, model="m")
    for i in range(DEEP_PLAIN_LAYERS // 2, DEEP_PLAIN_LAYERS):
        rec.layers[f"l{i}"].depth = i + 1
    assert architecture_risk(rec) == []  # normalisation in the middle: two short chains


def test_empty_record_is_quiet():
    assert architecture_risk(Record()) == []
