"""poor_initialization and symmetric_weights on hand-built step-0 records (no torch)."""

from __future__ import annotations

import math

import pytest

from gradvitals.record import LayerInfo, ParamInfo, Record
from gradvitals.rules.init import (
    CHAIN_DECADES_CRITICAL,
    CHAIN_DECADES_WARNING,
    chains,
    expected_std,
    poor_initialization,
    symmetric_weights,
)

WIDTH = 64


class Net:
    """A step-0 record as the init audit writes it: weight layers with their facts."""

    def __init__(self) -> None:
        self.record = Record()
        self.record.event("init_audit", model="m", step=0)
        self.record.steps = 1
        self.depth = 0

    def linear(self, name: str, act: str | None, std: float, *, fan_in: int = WIDTH, fan_out: int = WIDTH,
               grad: float | None = 1.0, act_std: float | None = None, **extra: object) -> Net:
        facts = {"fan_in": fan_in, "fan_out": fan_out, "weight_std": std, "weight_mean": 0.0,
                 "weight_constant": std == 0, "identical_rows": std == 0, "identical_cols": std == 0}
        facts.update(extra)
        layer = LayerInfo(name=name, kind="Linear", depth=self.depth, activation_after=act, model="m",
                          out_features=fan_out, extra=facts)
        self.depth += 1
        for p in ("weight", "bias"):
            full = f"{name}.{p}"
            layer.params.append(full)
            self.record.params[full] = ParamInfo(full, name, [fan_out, fan_in] if p == "weight" else [fan_out],
                                                 fan_in * fan_out if p == "weight" else fan_out)
        self.record.layers[name] = layer
        if grad is not None:
            self.record.add(f"grad_norm/{name}.weight", 0, grad)
        if act_std is not None:
            self.record.add(f"act_std/{name}", 0, act_std)
        if act is not None:
            self.module(f"{name}.act", act)
        return self

    def module(self, name: str, kind: str) -> Net:
        self.record.layers[name] = LayerInfo(name=name, kind=kind, depth=self.depth, model="m")
        self.depth += 1
        return self


def he(fan_in: int = WIDTH) -> float:
    return math.sqrt(2.0 / fan_in)


def plain(n: int, ratio: float, act: str = "ReLU", **kw: object) -> Net:
    """n hidden layers, each with weight std = ratio x He (or Xavier), then a Xavier head."""
    net = Net()
    for i in range(n):
        exp = expected_std("relu" if act == "ReLU" else "sigmoid", WIDTH, WIDTH)[1]
        net.linear(f"l{i}", act, ratio * exp, **kw)
    net.linear("head", None, expected_std(None, WIDTH, 10)[1], fan_out=10)
    return net


def test_expected_std_is_the_chapter_formula():
    assert expected_std("relu", 100, 50) == ("He", pytest.approx(math.sqrt(2 / 100)))
    assert expected_std("gelu", 100, 50)[0] == "He"
    assert expected_std("tanh", 100, 50) == ("Xavier", pytest.approx(math.sqrt(2 / 150)))
    assert expected_std(None, 100, 50)[0] == "Xavier"


def test_matched_init_is_quiet_at_any_depth():
    assert poor_initialization(plain(40, 1.0).record) == []


def test_chain_threshold_edges():
    # 10 layers at ratio r: predicted decades = 10 * log10(r)
    just_below = 10 ** ((CHAIN_DECADES_WARNING - 0.05) / 10)
    just_above = 10 ** ((CHAIN_DECADES_WARNING + 0.05) / 10)
    assert poor_initialization(plain(10, just_below).record) == []
    found = poor_initialization(plain(10, just_above).record)
    assert [f.severity for f in found] == ["warning"]
    assert found[0].evidence["predicted_decades"] == pytest.approx(CHAIN_DECADES_WARNING + 0.05, abs=1e-3)
    shrink = poor_initialization(plain(10, 1 / just_above).record)
    assert [f.severity for f in shrink] == ["warning"] and "shrink" in shrink[0].summary
    crit = poor_initialization(plain(10, 10 ** ((CHAIN_DECADES_CRITICAL + 0.1) / 10)).record)
    assert [f.severity for f in crit] == ["critical"] and "grow" in crit[0].summary


def test_pytorch_default_init_in_deep_relu_stacks_is_flagged_and_names_the_fix():
    # nn.Linear's default: std = 1/sqrt(3 fan_in) = 0.41 x He per layer: 10^-0.39 per layer
    default = math.sqrt(1 / 3) / math.sqrt(2)
    assert poor_initialization(plain(6, default).record) == []  # 10^-2.3: trains fine
    assert [f.severity for f in poor_initialization(plain(10, default).record)] == ["warning"]  # 10^-3.9
    f = poor_initialization(plain(20, default).record)  # 10^-7.8: the signal is gone
    assert len(f) == 1 and f[0].severity == "critical"
    assert "kaiming_normal_" in f[0].advice and "gv.init_" in f[0].advice and "ReLU" in f[0].advice
    assert f[0].step == 0 and set(f[0].layers) >= {"l0", "l19"}


def test_normalisation_resets_the_chain():
    net = Net()
    ratio = 10 ** (0.9 * CHAIN_DECADES_WARNING / 6)  # 12 layers would be 1.8x the threshold ...
    for i in range(12):
        net.linear(f"l{i}", "ReLU", ratio * he())
        if i % 6 == 5:
            net.module(f"norm{i}", "LayerNorm")  # ... but every 6 a norm resets the scale
    assert [len(c.layers) for c in chains(net.record)] == [6, 6]
    assert all(abs(c.predicted_decades) < CHAIN_DECADES_WARNING for c in chains(net.record))
    assert poor_initialization(net.record) == []


def test_residual_bypassed_layers_do_not_compound():
    net = Net()
    for i in range(20):
        net.linear(f"l{i}", "ReLU", 3 * he(), residual_bypass=True)
    assert chains(net.record) == [] and poor_initialization(net.record) == []


def test_measured_collapse_alone_decides_when_weights_look_fine():
    net = Net()
    for i in range(6):
        net.linear(f"l{i}", "ReLU", he(), act_std=10 ** (-0.7 * i))  # 10^-3.5 from first to last
    f = poor_initialization(net.record)
    assert len(f) == 1 and f[0].severity == "warning"
    assert f[0].evidence["measured_decades"] == pytest.approx(-3.5)


def test_nonfinite_measured_signal_with_bad_init_is_critical():
    net = plain(10, 10 ** ((CHAIN_DECADES_WARNING + 0.5) / 10), act_std=1.0)
    net.record.add("act_std/head", 0, float("inf"))
    f = poor_initialization(net.record)
    assert [x.severity for x in f] == ["critical"] and f[0].evidence["nonfinite_activations"]


def test_zero_weights_are_left_to_symmetric_weights():
    net = Net()
    for i in range(20):
        net.linear(f"l{i}", "ReLU", 0.0, grad=0.0)
    net.linear("head", None, 0.0, fan_out=10, grad=0.0)
    assert poor_initialization(net.record) == []
    f = symmetric_weights(net.record)
    assert len(f) == 1
    assert f[0].code == "symmetric_weights" and f[0].severity == "critical"
    assert f[0].layers[0] == "l0" and "head" not in f[0].layers and len(f[0].layers) == 20
    assert "all zero" in f[0].summary and f[0].evidence["count"] == 20


def test_symmetric_hidden_layer_before_a_random_layer_is_a_warning():
    net = Net()
    net.linear("l0", "ReLU", he())
    net.linear("l1", "Sigmoid", 0.0, weight_constant=True, identical_rows=True, identical_cols=True,
               weight_mean=0.05, grad=0.3)
    net.linear("head", None, 0.1, fan_out=10)
    f = symmetric_weights(net.record)
    assert [(x.severity, x.layers) for x in f] == [("warning", ("l1",))]
    # the same layer with no gradient at step 0 can never recover
    net.record.series["grad_norm/l1.weight"].values[0] = 0.0
    assert symmetric_weights(net.record)[0].severity == "critical"


def test_constant_last_layer_and_zero_init_residual_branch_are_fine():
    net = Net()
    net.linear("l0", "ReLU", he())
    net.linear("branch_out", None, 0.0, residual_bypass=True)  # Fixup / ReZero style
    net.linear("head", None, 0.0, fan_out=10)  # zero-init classifier: targets break symmetry
    assert symmetric_weights(net.record) == []


def test_only_the_last_layer_of_a_residual_branch_may_start_at_zero():
    """Every weight zero inside a residual branch (a GPT with all-zero init): the
    branch's first layer is a symmetry nothing breaks; its last one is exempt."""
    net = Net()
    net.linear("l0", "ReLU", he())
    net.linear("fc1", "ReLU", 0.0, grad=0.0, residual_bypass=True, residual_branch_last=False)
    net.linear("fc2", None, 0.0, grad=0.0, residual_bypass=True, residual_branch_last=True)
    net.linear("head", None, 0.1, fan_out=10)
    f = symmetric_weights(net.record)
    assert [(x.severity, x.layers) for x in f] == [("critical", ("fc1",))]
    assert "(here `model.fc2`)" in f[0].advice and "kaiming_normal_(model.fc1.weight" in f[0].advice
    # a record written before the audit told branch layers apart: the whole branch exempt, as before
    for name in ("fc1", "fc2"):
        del net.record.layers[name].extra["residual_branch_last"]
    assert symmetric_weights(net.record) == []


def test_single_output_unit_has_no_symmetry():
    net = Net()
    net.linear("l0", "ReLU", 0.0, fan_out=1)
    net.linear("head", None, 0.1, fan_in=1, fan_out=10)
    assert symmetric_weights(net.record) == []


def test_rules_survive_a_json_round_trip():
    from gradvitals.report import Report

    rec = plain(20, 0.4).record
    again = Record.from_json(Report.from_record(rec).to_json())
    assert [f.to_json() for f in poor_initialization(again)] == [f.to_json() for f in poor_initialization(rec)]


def test_records_without_audit_facts_produce_nothing():
    rec = Record()
    rec.layers["l0"] = LayerInfo(name="l0", kind="Linear", depth=0, activation_after="relu")
    assert poor_initialization(rec) == [] and symmetric_weights(rec) == []


# ------------------------------------------------------------------ too large inside blocks
def gpt(std: float, loss0: float | None, vocab: int = 65, d: int = 32, blocks: int = 2) -> Net:
    """A pre-LN GPT's weight layers as the audit writes them: each block's qkv and fc
    follow a LayerNorm, its proj and out end residual branches; every Linear at N(0, std)."""
    n = Net()
    for b in range(blocks):
        n.module(f"blocks.{b}.ln1", "LayerNorm")
        n.linear(f"blocks.{b}.qkv", None, std, fan_in=d, fan_out=3 * d, act_std=std * 5)
        n.linear(f"blocks.{b}.proj", None, std, fan_in=d, fan_out=d, residual_bypass=True)
        n.module(f"blocks.{b}.ln2", "LayerNorm")
        n.linear(f"blocks.{b}.fc", "gelu", std, fan_in=d, fan_out=4 * d)
        n.linear(f"blocks.{b}.out", None, std, fan_in=4 * d, fan_out=d, residual_bypass=True)
    n.module("ln_f", "LayerNorm")
    n.linear("head", None, std, fan_in=d, fan_out=vocab)
    if loss0 is not None:
        n.record.add("loss", 0, loss0)
    return n


def test_init_too_large_inside_a_transformer_is_found_with_the_step0_loss():
    # issue 25: every Linear at N(0, 1) in a pre-LN GPT, step-0 loss 19.2 vs ln(65) = 4.17
    f = poor_initialization(gpt(1.0, 19.2).record)
    assert len(f) == 1 and f[0].severity == "warning"
    ev = f[0].evidence
    assert ev["classes"] == 65 and ev["weight_layers"] == 9 and ev["residual_branch_layers"] == 4
    assert ev["mean_init_ratio"] >= 4.0 and "19.2" in f[0].summary and "ln(65)" in f[0].summary
    assert "std=0.02" in f[0].advice


@pytest.mark.parametrize("std,loss0", [
    (1.0, 2.0 * math.log(65) * 0.99),  # the loss still near a uniform guess: no confirmation
    (0.02, 19.2),                      # GPT-2's init: a high loss has another cause
    (1.0, None),                       # no step-0 loss recorded
])
def test_init_inside_blocks_needs_both_large_weights_and_a_large_step0_loss(std, loss0):
    assert poor_initialization(gpt(std, loss0).record) == []


def test_default_pytorch_init_of_a_transformer_is_clean():
    d = 32
    default = 1.0 / math.sqrt(3 * d)  # kaiming_uniform(a=sqrt(5)): std 1/sqrt(3 fan_in)
    assert poor_initialization(gpt(default, 4.3).record) == []
