"""adam_epsilon_too_large on hand-built records, at its edges."""

from __future__ import annotations

import math

from rulebuild import Build

from gradvitals.rules import optimizer as O

EPS = 1e-4
SHAPE = [10, 64]  # numel 640
ROOT = math.sqrt(640)


def built(rms_of_step, n=60, kind="Adam", eps=EPS, layer_kind="Linear", betas=(0.9, 0.999), dtype="float32",
          extra_groups=()):
    """One layer ``side`` (weight of 640 entries) whose gradient RMS at each step is ``rms_of_step(step)``,
    and a healthy ``fc`` beside it, both stepped by one group of ``kind`` with ``eps``."""
    b = Build().layer("fc", "Linear", params={"weight": SHAPE}).layer("side", layer_kind, params={"weight": SHAPE})
    b.record.params["side.weight"].dtype = dtype
    for s in range(n):
        b.record.add("grad_norm/fc.weight", s, 1e-2 * ROOT)
        b.record.add("grad_norm/side.weight", s, rms_of_step(s) * ROOT)
    b.record.steps = n
    group = {"step": 0, "optimizer": "opt", "kind": kind, "group": 0, "eps": eps, "weight_decay": 0.0,
             "params": ["fc.weight", "side.weight"]}
    if betas is not None:
        group["betas"] = list(betas)
    b.record.run["optimizer_groups"] = [group, *extra_groups]
    return b.record


def codes(record):
    return [f.code for f in O.adam_epsilon_too_large(record)]


def test_fires_at_the_factor_and_not_just_above_it():
    at = O.EPS_RMS_FACTOR * EPS
    f = O.adam_epsilon_too_large(built(lambda s: at))
    assert [x.layers for x in f] == [("side",)]
    ev = f[0].evidence["layers"][0]
    assert ev["param"] == "side.weight" and math.isclose(ev["rms_over_eps"], O.EPS_RMS_FACTOR)
    assert math.isclose(ev["damping"], at / (at + EPS))
    assert "eps=1e-08" in f[0].advice and "was eps=0.0001" in f[0].advice
    assert codes(built(lambda s: at * 1.01)) == []


def test_stays_means_the_stays_fraction_of_the_window():
    n = 60  # window: the last 30 points
    low, high = O.EPS_RMS_FACTOR * EPS, 1.0

    def with_high(k):  # k of the window's 30 points above the bound
        return lambda s: high if s >= n - k else low

    allowed = round(30 * (1 - O.EPS_STAYS_FRACTION))  # 3: 27 of 30 low is exactly the fraction
    assert codes(built(with_high(allowed), n)) == ["adam_epsilon_too_large"]
    assert codes(built(with_high(allowed + 1), n)) == []


def test_needs_min_points_in_the_window():
    low = EPS
    assert codes(built(lambda s: low, n=2 * O.EPS_MIN_POINTS)) == ["adam_epsilon_too_large"]
    assert codes(built(lambda s: low, n=2 * O.EPS_MIN_POINTS - 2)) == []


def test_a_layer_initialised_small_that_grows_out_of_it_is_healthy():
    # LayerScale / zero-init branch: tiny for the first half, normal after
    assert codes(built(lambda s: EPS if s < 30 else 1e-2)) == []
    # ... and one that shrinks into eps late is not
    assert codes(built(lambda s: 1e-2 if s < 25 else EPS)) == ["adam_epsilon_too_large"]


def test_only_optimizers_that_divide_by_sqrt_v_plus_eps():
    assert codes(built(lambda s: EPS, kind="AdamW")) == ["adam_epsilon_too_large"]
    assert codes(built(lambda s: EPS, kind="SGD", betas=None)) == []  # no betas: not Adam's eps
    assert codes(built(lambda s: EPS, kind="Adamax")) == []
    assert codes(built(lambda s: EPS, kind="Adagrad", betas=None)) == []


def test_zero_gradients_and_embedding_tables_are_not_eps_s_doing():
    assert codes(built(lambda s: 0.0)) == []
    assert codes(built(lambda s: EPS, layer_kind="Embedding")) == []


def test_no_groups_recorded_no_finding():
    r = built(lambda s: EPS)
    r.run.pop("optimizer_groups")
    assert codes(r) == []


def test_clipping_counts_adam_sees_the_clipped_gradient():
    r = built(lambda s: 9 * O.EPS_RMS_FACTOR * EPS)
    assert codes(r) == []
    for s in range(60):
        r.add("clip_total_norm", s, 10.0)
        r.add("clip_max_norm", s, 1.0)  # scaled by 0.1 before Adam's step
    assert codes(r) == ["adam_epsilon_too_large"]


def test_eps_at_the_default_is_left_to_the_gradient_rules_and_float16_says_what_is_safe():
    # a GAN generator at RMS 1e-10 under eps 1e-8: vanishing gradients, not eps
    assert codes(built(lambda s: 1e-10, eps=O.EPS_DEFAULT)) == []
    assert codes(built(lambda s: 1e-10, eps=2 * O.EPS_DEFAULT)) == ["adam_epsilon_too_large"]
    f16 = O.adam_epsilon_too_large(built(lambda s: EPS, dtype="float16"))
    assert "float16" in f16[0].advice and "GradScaler" in f16[0].advice


def test_the_group_that_steps_the_layer_decides():
    # side in a second group with eps 1e-8: healthy even though group 0 has eps 1e-4
    r = built(lambda s: EPS)
    r.run["optimizer_groups"][0]["params"] = ["fc.weight"]
    r.run["optimizer_groups"].append({"step": 0, "optimizer": "opt", "kind": "Adam", "group": 1, "eps": 1e-8,
                                      "betas": [0.9, 0.999], "params": ["side.weight"]})
    assert codes(r) == []
    r.run["optimizer_groups"][1]["eps"] = 1e-4
    f = O.adam_epsilon_too_large(r)
    assert "param_groups[1]['eps']" in f[0].advice
