"""attention_logit_growth and attention_entropy_collapse on hand-built records, at their edges."""

from __future__ import annotations

import math

import pytest

from gradvitals.diagnose import diagnose
from gradvitals.rules import attention as A
from gradvitals.rules.attention import attention_entropy_collapse, attention_logit_growth

from rulebuild import Build

STEPS = [0, 25, 50, 75, 100]


def logits(b: Build, layer: str, values: list[float], steps: list[int] = STEPS) -> Build:
    return b.series(f"attn_max_logit/{layer}", dict(zip(steps, values)))


def entropy(b: Build, layer: str, values: list[float], uniform: float = 2.5, steps: list[int] = STEPS) -> Build:
    b.series(f"attn_entropy/{layer}", dict(zip(steps, values)))
    return b.series(f"attn_entropy_uniform/{layer}", {s: uniform for s in steps})


def attn_layers(b: Build, n: int = 2) -> Build:
    for i in range(n):
        b.layer(f"h.{i}.attn", "CausalSelfAttention")
    return b


# ------------------------------------------------------------ logit growth
def test_growth_to_the_level_by_the_factor_fires_with_its_numbers():
    b = attn_layers(Build())
    logits(b, "h.0.attn", [10.0, 20.0, 60.0, 99.0, 100.0])  # exactly 100 = 10 x 10
    logits(b, "h.1.attn", [2.0, 3.0, 150.0, 400.0, 900.0])
    [f] = attention_logit_growth(b.record)
    assert f.code == "attention_logit_growth" and f.severity == "warning"
    assert f.layers == ("h.1.attn", "h.0.attn")  # the largest last logit first
    assert f.step == 50  # h.1 passed 100 at step 50, h.0 only at 100
    rows = {r["layer"]: r for r in f.evidence["layers"]}
    assert rows["h.1.attn"]["since_step"] == 50 and rows["h.0.attn"]["since_step"] == 100
    assert rows["h.1.attn"]["growth_per_100_steps"] == pytest.approx((900 - 2) / 100 * 100)
    assert rows["h.1.attn"]["factor"] == pytest.approx(450)
    assert rows["h.1.attn"]["peak"] == [100, 900]
    assert rows["h.1.attn"]["values"][0] == [0, 2.0] and rows["h.1.attn"]["values"][-1] == [100, 900.0]
    assert "q_norm = nn.LayerNorm(head_dim)" in f.advice and "learning rate" in f.advice


def test_just_below_the_level_or_the_factor_is_silent():
    b = attn_layers(Build(), 3)
    logits(b, "h.0.attn", [1.0, 20.0, 50.0, 80.0, 99.9])  # grew 100x, below the level
    logits(b, "h.1.attn", [10.1, 50.0, 80.0, 90.0, 100.0])  # at the level, 9.9x: a fine-tune starting high
    logits(b, "h.2.attn", [80.0, 90.0, 95.0, 100.0, 300.0])  # 3.75x
    assert attention_logit_growth(b.record) == []
    b.record.series.pop("attn_max_logit/h.1.attn")
    logits(b, "h.1.attn", [10.0, 50.0, 80.0, 90.0, 100.0])  # 10x exactly: fires
    assert attention_logit_growth(b.record)[0].layers == ("h.1.attn",)


def test_a_spike_that_came_back_and_too_few_points_are_silent():
    b = attn_layers(Build())
    logits(b, "h.0.attn", [2.0, 5.0, 500.0, 40.0, 20.0])  # judged on where it ends
    logits(b, "h.1.attn", [2.0, 500.0], steps=[0, 25])  # two points: no trend yet
    assert attention_logit_growth(b.record) == []


def test_an_overflowed_logit_counts_and_nan_points_are_skipped():
    b = attn_layers(Build(), 1)
    logits(b, "h.0.attn", [3.0, 200.0, math.inf, math.nan])
    [f] = attention_logit_growth(b.record)
    assert f.evidence["layers"][0]["last"] == [50, math.inf] and f.step == 25


# ------------------------------------------------------------ entropy collapse
def test_entropy_at_a_tenth_of_its_start_and_of_uniform_fires():
    b = attn_layers(Build())
    entropy(b, "h.0.attn", [2.5, 1.5, 0.6, 0.3, 0.25])  # 0.25 = 10% of 2.5 and of uniform 2.5
    entropy(b, "h.1.attn", [2.4, 2.0, 1.8, 1.5, 1.2])  # halves: a model that learns to focus
    [f] = attention_entropy_collapse(b.record)
    assert f.layers == ("h.0.attn",) and f.step == 100 and f.caused_by is None
    row = f.evidence["layers"][0]
    assert row["of_initial"] == pytest.approx(0.1) and row["of_uniform"] == pytest.approx(0.1)
    assert row["uniform"] == 2.5 and row["first"] == [0, 2.5]


def test_entropy_edges_that_stay_silent():
    b = attn_layers(Build(), 3)
    entropy(b, "h.0.attn", [2.5, 1.0, 0.5, 0.3, 0.26])  # just above 10%
    entropy(b, "h.1.attn", [0.2, 0.2, 0.15, 0.1, 0.1], uniform=2.5)  # sharp from the start (pretrained heads): 50% of its start
    entropy(b, "h.2.attn", [5.0, 3.0, 1.0, 0.5, 0.45], uniform=3.4)  # 9% of its start, 13% of uniform
    assert attention_entropy_collapse(b.record) == []
    b.record.series.pop("attn_entropy_uniform/h.2.attn")  # no ceiling recorded: nothing decided
    entropy(b, "h.2.attn", [5.0, 3.0, 1.0, 0.5, 0.34], uniform=3.4)
    assert attention_entropy_collapse(b.record)[0].layers == ("h.2.attn",)


def test_collapse_is_caused_by_the_logit_growth_of_its_layer_and_diagnose_keeps_both():
    b = attn_layers(Build())
    logits(b, "h.0.attn", [2.0, 30.0, 300.0, 3000.0, 8000.0])
    entropy(b, "h.0.attn", [2.5, 0.4, 0.1, 0.02, 0.0])
    entropy(b, "h.1.attn", [2.5, 0.4, 0.1, 0.02, 0.0])
    logits(b, "h.1.attn", [2.0, 5.0, 8.0, 9.0, 12.0])
    [f] = attention_entropy_collapse(b.record)
    assert f.caused_by == "attention_logit_growth" and f.layers == ("h.0.attn", "h.1.attn")
    found = {x.code: x for x in diagnose(b.record)}
    assert found["attention_logit_growth"].layers == ("h.0.attn",)
    assert found["attention_entropy_collapse"].caused_by == "attention_logit_growth"


def test_thresholds_are_the_documented_ones():
    assert (A.LOGIT_LEVEL, A.LOGIT_GROWTH_FACTOR, A.ENTROPY_OF_INITIAL, A.ENTROPY_OF_UNIFORM) == (100.0, 10.0, 0.1, 0.1)
