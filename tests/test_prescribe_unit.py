"""try-fixes: remedy selection from findings, the in-process applier, the judge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradvitals.prescribe import (HEALTHY_NORM_CEILING, Remedy, RemedyApplier, Trial, _judge, code_changes,
                                  observed_max_norm, select_remedies)


def report(*codes, step=5, norms=None):
    return {"findings": [{"code": c, "severity": "critical", "step": step} for c in codes],
            "series": {"grad_norm_global": {"steps": list(range(len(norms or []))), "values": norms or []}}}


def test_healthy_run_selects_nothing():
    assert select_remedies({"findings": [{"code": "loss_plateau", "severity": "info"}]}, 200, 5) == []


def test_explosion_points_to_lr_clip_warmup():
    names = [r.name for r in select_remedies(report("nonfinite", "exploding_gradients"), 200, 5)]
    assert names[:3] == ["lr_x0.1", "clip", "warmup"]
    assert "init" not in names  # NaN late in the run: the init is not the suspect


def test_nan_at_first_step_suspects_init_first():
    names = [r.name for r in select_remedies(report("nonfinite", step=0), 200, 5)]
    assert names[0] == "init"


def test_limit_and_specific_remedies():
    assert [r.name for r in select_remedies(report("dead_relu"), 200, 1)] == ["swap_relu"]
    assert select_remedies(report("vanishing_gradients"), 200, 5)[0].name == "swap_saturating"
    assert select_remedies(report("update_ratio_low"), 200, 5)[0].name == "lr_x10"


def test_max_norm_from_early_norms_and_overflow_fallback():
    assert observed_max_norm(report(norms=[2.0, 3.0, 4.0, 5.0, 6.0, 1e9, "nan"] * 2)) == pytest.approx(3.0)
    assert observed_max_norm(report(norms=[HEALTHY_NORM_CEILING * 10] * 10)) == 1.0
    assert observed_max_norm({"series": {}}) == 1.0


def test_unknown_remedy_rejected_with_allowed_list():
    with pytest.raises(ValueError, match="allowed: .*clip"):
        Remedy.from_json('{"name": "magic"}')


def test_applier_scales_lr_and_swaps_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    RemedyApplier(Remedy("lr_x0.1", {"factor": 0.1}), None).on_optimizer(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    a = RemedyApplier(Remedy("swap_relu"), None)
    a.on_new_model(model, (torch.randn(2, 4),))
    assert isinstance(model[1], nn.LeakyReLU) and a.status()["applicable"]


def test_applier_says_when_a_functional_activation_cannot_be_swapped():
    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    a = RemedyApplier(Remedy("swap_relu"), None)
    a.on_new_model(F(), (torch.randn(2, 4),))
    st = a.status()
    assert not st["applicable"] and "function call" in st["reason"]


def test_warmup_restores_lr_after_each_step_and_budget_stops():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    a = RemedyApplier(Remedy("warmup", {"steps": 4}), budget_steps=2)
    seen = []
    model(torch.ones(1, 2)).sum().backward()
    a.on_step_pre(opt)
    seen.append(opt.param_groups[0]["lr"])
    assert not a.on_step_post(opt)
    a.on_step_pre(opt)
    seen.append(opt.param_groups[0]["lr"])
    assert a.on_step_post(opt)  # budget of 2 steps spent
    assert seen == [0.25, 0.5] and opt.param_groups[0]["lr"] == 1.0


def _trial(name, codes, final, best=None, applicable=True):
    return Trial(remedy=name, applicable=applicable, reason="", remaining_codes=codes, final_loss=final,
                 best_loss=final if best is None else best, loss_curve={"steps": [0, 1], "values": [final, final]})


def test_judge_picks_remedy_that_cures_and_improves():
    trials = [_trial("none", ["nonfinite"], math.nan, best=2.3), _trial("clip", ["nonfinite"], math.nan, best=2.2),
              _trial("lr_x0.1", [], 0.4), _trial("warmup", [], 0.9), _trial("init", [], 0.1, applicable=False)]
    _judge(trials)
    assert [t.remedy for t in trials if t.winner] == ["lr_x0.1"]


def test_judge_no_winner_when_nothing_improves():
    trials = [_trial("none", [], 0.5), _trial("clip", [], 0.6)]
    _judge(trials)
    assert not any(t.winner for t in trials)


def test_html_report_shows_trials_table_and_overlaid_curves():
    from gradvitals.reports.html import render_html

    trials = [_trial("none", ["nonfinite"], math.nan, best=2.3), _trial("lr_x0.1", [], 0.4)]
    trials[0].loss_curve = {"steps": [0, 1, 2], "values": [2.3, 5.0, math.nan]}
    _judge(trials)
    trials[1].label, trials[1].snippet = "learning rate x0.1", "lr = 0.1 * lr"
    report = {"schema": "gradvitals.report/1", "run": {"steps": 2}, "layers": [], "series": {}, "findings": [],
              "trials": [t.to_json() for t in trials]}
    page = render_html(report)
    assert 'id="trials-section"' in page and "WINNER" in page and "lr = 0.1 * lr" in page
    assert page.count("<polyline") == 2  # the baseline's NaN points are left out, not drawn at 0


def test_judge_a_degenerate_baseline_sets_no_loss_to_beat():
    """The baseline's loss is exactly 0.0 because the run is dead (every gradient 0 after
    an Inf episode, a nonfinite critical): that loss is no bar. Among the trials that
    remove the critical findings, the best loss wins; a trial that is itself degenerate
    (non-finite values, all-zero gradients) is compared with nothing."""
    base = _trial("none", ["nonfinite", "poor_initialization"], 0.0, best=0.0)
    base.critical_codes, base.degenerate = ["nonfinite", "poor_initialization"], "every gradient exactly 0"
    init = _trial("init", [], 7.5e-7)
    lr = _trial("lr_x0.1", [], 3e-3)
    clip = _trial("clip", ["nonfinite"], 0.0)
    clip.critical_codes, clip.degenerate = ["nonfinite"], "non-finite values"
    trials = [base, init, lr, clip]
    _judge(trials)
    assert [t.remedy for t in trials if t.winner] == ["init"]
    assert init.steps_to_baseline_best is None  # a dead run's loss is no target
    # the same trials against a sound baseline at 0.0 (an easy task it already solves): nothing improves
    for t in trials:
        t.winner = False
    base.critical_codes, base.degenerate, base.remaining_codes = [], "", []
    _judge(trials)
    assert not any(t.winner for t in trials)


def test_judge_a_degenerate_trial_never_wins_on_its_loss():
    base = _trial("none", [], 2.0)
    dead = _trial("lr_x3", [], 0.0)
    dead.degenerate = "every gradient exactly 0"
    ok = _trial("warmup", [], 1.5)
    trials = [base, dead, ok]
    _judge(trials)
    assert [t.remedy for t in trials if t.winner] == ["warmup"]


def test_trial_soundness_is_read_from_its_report():
    from gradvitals.prescribe import _soundness

    def report(grads, losses, findings=()):
        return {"schema": "gradvitals.report/1", "run": {"steps": len(grads)}, "layers": [],
                "series": {"grad_norm_global": {"steps": list(range(len(grads))), "values": grads},
                           "loss": {"steps": list(range(len(losses))), "values": losses}},
                "findings": [{"code": c, "severity": s} for c, s in findings]}

    assert _soundness(report([1.0] * 20, [0.5] * 20)) == ([], "")
    crit, why = _soundness(report([1.0] * 10 + [0.0] * 10, [0.5] * 10 + [0.0] * 10, [("nonfinite", "critical")]))
    assert crit == ["nonfinite"] and why == "every gradient exactly 0 for its last 10 steps"
    assert _soundness(report([1.0] * 11 + [0.0] * 9, [0.5] * 20))[1] == ""  # 9 steps: converging, not dead
    assert _soundness(report([1.0] * 20, [0.5] * 19 + ["nan"]))[1] == "non-finite values"


# --------------------------------------------------- transformer-era remedies
def test_adam_eps_is_tried_first_for_adam_epsilon_too_large():
    names = [r.name for r in select_remedies(report("adam_epsilon_too_large"), 200, 5)]
    assert names[0] == "adam_eps"
    assert code_changes(report("adam_epsilon_too_large")) == []


def test_transformer_codes_try_beta2_lower_lr_and_warmup_and_list_the_code_changes():
    for code in ("output_logit_divergence", "attention_logit_growth"):
        assert [r.name for r in select_remedies(report(code), 200, 5)] == ["beta2", "lr_x0.3", "warmup"]
    (z,) = code_changes(report("output_logit_divergence"))
    assert z["snippet"] == "loss = loss + 1e-4 * torch.logsumexp(logits, dim=-1).pow(2).mean()"
    (qk,) = code_changes({"findings": [{"code": "attention_logit_growth", "severity": "warning"},
                                       {"code": "attention_entropy_collapse", "severity": "warning"}]})
    assert "q_norm" in qk["snippet"] and "QK-layernorm" in qk["remedy"]  # one entry for both codes
    assert code_changes({"findings": [{"code": "output_logit_divergence", "severity": "info"}]}) == []
    # a loss spike under Adam at beta2 0.999 tries beta2 too; under SGD (no betas) not
    adam = {**report("loss_spike"), "run": {"optimizer_groups": [{"betas": [0.9, 0.999]}]}}
    assert "beta2" in [r.name for r in select_remedies(adam, 200, 10)]
    assert "beta2" not in [r.name for r in select_remedies(report("loss_spike"), 200, 10)]


def test_adam_eps_and_beta2_set_the_groups_that_have_them():
    from torch import nn

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "eps": 1e-4}, {"params": [model.bias], "eps": 1e-10}],
                            betas=(0.9, 0.999))
    a = RemedyApplier(Remedy("adam_eps", {"eps": 1e-8}), None)
    a.on_optimizer(opt)
    assert [g["eps"] for g in opt.param_groups] == [1e-8, 1e-10]  # never raised
    assert a.status()["applicable"] and "1 param group" in a.status()["reason"]
    b = RemedyApplier(Remedy("beta2", {"beta2": 0.95}), None)
    b.on_optimizer(opt)
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95), (0.9, 0.95)]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    c = RemedyApplier(Remedy("adam_eps", {"eps": 1e-8}), None)
    c.on_optimizer(sgd)
    assert not c.status()["applicable"] and "SGD" in c.status()["reason"]
    assert Remedy.from_json({"name": "beta2", "params": {"beta2": 0.95}}).label() == "Adam beta2 = 0.95"
