"""diagnose: causal links (``caused_by``), root cause first, the verdict; rules stay torch-free."""

from __future__ import annotations

import json
from dataclasses import replace
import math
import subprocess
import sys

from rulebuild import Build, flat_loss

from gradvitals.diagnose import diagnose, link, order, verdict
from gradvitals.findings import Finding
from gradvitals.record import Record


def F(code: str, severity: str = "warning", step: int | None = 0, **evidence: object) -> Finding:
    return Finding(code=code, severity=severity, summary=f"{code} happened.", advice="fix it",
                   step=step, evidence=dict(evidence))


def codes(findings: list[Finding]) -> list[tuple[str, str | None]]:
    return [(f.code, f.caused_by) for f in findings]


def test_nan_chain_points_back_to_the_learning_rate():
    out = order(link([F("nonfinite", "critical", 21), F("exploding_gradients", "critical", 13),
                      F("update_ratio_high", "warning", 0)]))
    assert codes(out) == [("update_ratio_high", None), ("exploding_gradients", "update_ratio_high"),
                          ("nonfinite", "exploding_gradients")]


def test_explosion_at_init_is_the_cause_of_huge_updates_not_their_consequence():
    out = order(link([F("update_ratio_high", "critical", 0), F("exploding_gradients", "critical", 0, at_init=True),
                      F("nonfinite", "critical", 1)]))
    assert codes(out)[0] == ("exploding_gradients", None)
    assert ("update_ratio_high", "exploding_gradients") in codes(out)


def test_plateau_chain_leads_with_saturation():
    out = order(link([F("loss_plateau", "warning", 0), F("vanishing_gradients", "critical", 0),
                      F("saturated_activations", "warning", 0)]))
    assert codes(out) == [("saturated_activations", None), ("vanishing_gradients", "saturated_activations"),
                          ("loss_plateau", "vanishing_gradients")]


def test_a_cause_later_than_its_consequence_does_not_explain_it():
    out = link([F("dead_relu", "critical", 0), F("update_ratio_high", "warning", 100)])
    assert dict(codes(out))["dead_relu"] is None


def test_info_never_explains_and_problems_come_before_info():
    out = order(link([F("saturated_activations", "info", 0), F("vanishing_gradients", "warning", 0)]))
    assert codes(out) == [("vanishing_gradients", None), ("saturated_activations", None)]


def test_a_critical_root_leads_a_warning_root():
    out = order(link([F("dead_relu", "warning", 0), F("vanishing_gradients", "critical", 0)]))
    assert [f.code for f in out] == ["vanishing_gradients", "dead_relu"]


def test_verdict_names_state_root_and_count():
    found = order(link([F("loss_plateau"), F("vanishing_gradients", "critical", 3)]))
    v = verdict(found)
    assert v.startswith("BROKEN: root cause vanishing_gradients") and "from step 3" in v
    assert "1 related finding(s)" in v
    assert verdict([F("saturated_activations", "info")]).startswith("Healthy")


def test_diagnose_on_a_record_and_on_its_json_round_trip_agree():
    b = Build().mlp(8, act="Sigmoid").grads(range(0, 300, 25), lambda s, i, p: 10.0 ** (-(7 - i)))
    b.loss(flat_loss(300)).series("grad_norm_global", [0.4] * 300)
    direct = diagnose(b.record)
    again = diagnose(Record.from_json(json.loads(json.dumps(b.record.to_json()))))
    assert codes(direct) == codes(again) == [("vanishing_gradients", None), ("loss_plateau", "vanishing_gradients")]
    assert all(f.summary == g.summary for f, g in zip(direct, again))


def test_a_healthy_hand_built_run_has_no_findings():
    b = Build().mlp(6).grads(range(0, 300, 25), lambda s, i, p: 0.5)
    b.ratios(range(0, 300, 25), lambda s, i, p: 2e-3)
    b.loss([2.3 * math.exp(-i / 60) + 0.1 for i in range(300)]).series("grad_norm_global", [1.0] * 300)
    assert diagnose(b.record) == []


def test_rules_and_diagnose_do_not_import_torch():
    code = ("import sys, gradvitals.rules, gradvitals.diagnose, gradvitals.report; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------ the transformer chain
ATTENTION = ("attention_logit_growth", "attention_entropy_collapse")


def A(code: str, severity: str = "warning", step: int | None = 0) -> Finding:
    return F(code, severity, step)


def test_attention_logit_growth_explains_the_entropy_collapse_and_the_spike_it_precedes(monkeypatch):
    import gradvitals.findings as findings

    # the attention codes come with the attention probes (another part of the same
    # issue); the chain is in place before they land
    monkeypatch.setattr(findings, "CODES", tuple(dict.fromkeys(findings.CODES + ATTENTION)))
    out = order(link([A("loss_spike", "warning", 300), A("attention_entropy_collapse", "warning", 120),
                      A("attention_logit_growth", "warning", 80)]))
    assert codes(out) == [("attention_logit_growth", None), ("attention_entropy_collapse", "attention_logit_growth"),
                          ("loss_spike", "attention_logit_growth")]
    # growth that shows after the spike does not explain it
    later = dict(codes(link([A("loss_spike", "warning", 300), A("attention_logit_growth", "warning", 400)])))
    assert later["loss_spike"] is None


def test_output_logit_divergence_explains_a_later_spike_or_nan_not_an_earlier_one():
    out = dict(codes(link([F("output_logit_divergence", "warning", 500), F("loss_spike", "warning", 800),
                           F("nonfinite", "critical", 900)])))
    assert out["loss_spike"] == "output_logit_divergence"
    assert out["nonfinite"] in ("output_logit_divergence", "loss_spike")
    out = dict(codes(link([F("output_logit_divergence", "warning", 500), F("loss_spike", "warning", 200)])))
    assert out["loss_spike"] is None
    # rising with the model's confidence (info) explains nothing
    out = dict(codes(link([F("output_logit_divergence", "info", 100), F("loss_spike", "warning", 800)])))
    assert out["loss_spike"] is None


def test_adam_eps_explains_a_layer_that_stops_learning_when_they_name_the_same_layer():
    eps = replace(F("adam_epsilon_too_large", "warning", 0), layers=("side",))
    low_same = replace(F("update_ratio_low", "warning", 0), layers=("side",))
    low_other = replace(F("update_ratio_low", "warning", 0), layers=("trunk",))
    assert dict(codes(link([eps, low_same])))["update_ratio_low"] == "adam_epsilon_too_large"
    assert dict(codes(link([eps, low_other])))["update_ratio_low"] is None
    frozen = replace(F("not_updated", "warning", 0), layers=("side",))
    assert dict(codes(link([eps, frozen])))["not_updated"] == "adam_epsilon_too_large"
    # a run that stopped learning for eps: the plateau's root is eps
    out = order(link([F("loss_plateau", "warning", 0), eps]))
    assert codes(out) == [("adam_epsilon_too_large", None), ("loss_plateau", "adam_epsilon_too_large")]
