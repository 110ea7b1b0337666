"""grad_norm_misreported on hand-built records, at its edges: the clip norm each rank got
(clip_rank_norm/<rank>) against the merged global norm (grad_norm_global)."""

from __future__ import annotations

import math

import pytest

from gradvitals.record import Record
from gradvitals.rules import distributed as D

TRUE = [1.3, 1.7, 0.9, 1.1, 2.0, 1.5]


def built(per_rank, world=None, max_norm=1.0, true=TRUE):
    """``per_rank``: rank -> list of reported norms (None: no call that step)."""
    rec = Record()
    for s, g in enumerate(true):
        rec.add("grad_norm_global", s, g)
        rec.add("clip_max_norm", s, max_norm)
        for r, vals in per_rank.items():
            if vals[s] is not None:
                rec.add(f"clip_rank_norm/{r}", s, vals[s])
    rec.steps = len(true)
    if world is not None:
        rec.run["distributed"] = {"world_size": world, "rank": 0}
    return rec


def find(rec):
    out = D.grad_norm_misreported(rec)
    assert len(out) <= 1
    return out[0] if out else None


def test_local_shard_norms_that_add_up_as_squares_name_the_local_shard():
    share = [0.3, 0.6, 0.5, 0.45, 0.55, 0.5]  # rank 0's share of the squared norm
    r0 = [g * math.sqrt(a) for g, a in zip(TRUE, share)]
    r1 = [g * math.sqrt(1 - a) for g, a in zip(TRUE, share)]
    f = find(built({"0": r0, "1": r1}, world=2))
    assert f is not None and f.severity == "warning"
    ev = f.evidence
    assert ev["cause"] == "local_shard" and ev["ranks"] == [0, 1] and ev["world_size"] == 2
    assert ev["factor"] == pytest.approx(math.sqrt(0.5), rel=0.1)
    # rank 0 says 0.71 < 1.0 at step 0 while the truth is 1.3: the clip decision differs
    assert ev["clip_decisions_wrong"] >= 1 and ev["step"] == 0
    assert "clips at a true norm of" in f.summary


@pytest.mark.parametrize("scale,cause", [(math.sqrt(4), "double_counted"), (4.0, "summed_over_ranks"),
                                         (0.5, "one_shard")])
def test_factors_of_the_world_size_name_their_cause(scale, cause):
    ranks = {str(r): [g * scale for g in TRUE] for r in range(4)}
    f = find(built(ranks, world=4))
    assert f is not None and f.evidence["cause"] == cause
    assert f.evidence["factor"] == pytest.approx(scale)
    assert f.evidence["effective_max_norm"] == pytest.approx(1.0 / scale)


def test_only_the_rank_that_misreports_is_named():
    ok = list(TRUE)
    f = find(built({"0": ok, "1": [g * 1.414 for g in TRUE]}, world=2))
    assert f is not None and f.evidence["ranks"] == [1] and f.evidence["cause"] == "double_counted"


def test_float_error_is_not_a_finding_and_just_past_the_tolerance_is():
    tol = D.MISREPORT_REL_TOL
    assert find(built({"0": [g * (1 + 0.9 * tol) for g in TRUE]})) is None
    f = find(built({"0": [g * (1 + 1.5 * tol) for g in TRUE]}))
    assert f is not None and f.evidence["cause"] == "other"


def test_too_few_calls_or_too_few_wrong_ones_are_not_judged():
    n = D.MISREPORT_MIN_POINTS
    few = [g * 2 if s < n - 1 else None for s, g in enumerate(TRUE)]
    assert find(built({"0": few})) is None
    # one odd step among six: not a formula that is wrong
    once = [g * 2 if s == 3 else g for s, g in enumerate(TRUE)]
    assert find(built({"0": once})) is None


def test_nonfinite_values_and_a_zero_true_norm_are_skipped():
    true = [0.0, math.nan, 1.0, 1.0, 1.0, math.inf]
    rec = built({"0": [5.0, 5.0, math.nan, math.inf, 1.0, 5.0]}, true=true)
    assert find(rec) is None  # one comparable step left
    assert find(built({"0": [g * 2 for g in TRUE]}, true=[math.nan] * 6)) is None


def test_without_a_global_norm_or_clip_series_nothing_is_said():
    rec = Record()
    for s in range(6):
        rec.add("clip_rank_norm/0", s, 3.0)
    assert find(rec) is None
    assert find(built({})) is None


# ------------------------------------------------------------ replica_divergence
def replicas(spreads, off=(), world=2, last_equal=0):
    """``spreads``: param -> {step: relative spread}; ``off``: ranks flagged."""
    rec = Record()
    for name, pts in spreads.items():
        for s, v in pts.items():
            rec.add(f"replica_spread/{name}", s, v)
            for r in range(world):
                rec.add(f"replica_rank_off/{r}", s, 1.0 if r in off else 0.0)
    rec.run["distributed"] = {"world_size": world, "replica_checks": 5, "replica_tensors": 4,
                              "replica_last_equal_step": last_equal}
    return rec


def test_replicas_apart_name_the_parameters_worst_first_the_ranks_and_since_when():
    rec = replicas({"ln.weight": {4: 0.01, 6: 0.02}, "fc.bias": {6: 2e-3}}, off=(3,), world=4, last_equal=2)
    (f,) = D.replica_divergence(rec)
    assert f.evidence["params"] == ["ln.weight", "fc.bias"] and f.layers == ("ln", "fc")
    assert f.evidence["ranks"] == [3] and "rank 3 holds other values" in f.summary
    assert (f.step, f.evidence["first_step"], f.evidence["last_equal_step"]) == (4, 4, 2)
    assert f.severity == "critical"


def test_a_small_drift_is_a_warning_and_no_spread_is_no_finding():
    below = D.REPLICA_CRITICAL_SPREAD * 0.5
    (f,) = D.replica_divergence(replicas({"w": {2: below}}))
    assert f.severity == "warning"
    (f,) = D.replica_divergence(replicas({"w": {2: D.REPLICA_CRITICAL_SPREAD}}))
    assert f.severity == "critical"
    assert D.replica_divergence(replicas({})) == []
    assert D.replica_divergence(replicas({"w": {2: 0.0}})) == []


def test_a_nonfinite_spread_counts_as_apart_and_a_stale_equal_step_is_dropped():
    (f,) = D.replica_divergence(replicas({"w": {3: math.inf}}, last_equal=8))
    assert f.evidence["params"] == ["w"] and f.evidence["last_equal_step"] is None
    assert f.severity == "critical"
