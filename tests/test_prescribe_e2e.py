"""`gradvitals run --try-fixes` on broken scripts from the case library: the winning remedy
removes the critical findings and improves the loss, measured in fresh trial runs."""

from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, cli

pytestmark = pytest.mark.slow

CASES = ROOT / "examples" / "cases"
BUDGET, TRIALS = 100, 3  # README states this budget: 3 remedies + a baseline, 100 steps each


def try_fixes(script, tmp_path):
    """The CLI in this process (its trials are still fresh interpreters); the subprocess
    path of `run --try-fixes` is tests/realworld's dead-baseline test."""
    out = tmp_path / "r.json"
    result = cli(["run", "--try-fixes", "--trials", TRIALS, "--budget-steps", BUDGET, "--json", out, script])
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    return json.loads(out.read_text()), result.stderr


CRITICAL = {"nonfinite", "exploding_gradients", "vanishing_gradients", "dead_relu", "symmetric_weights",
            "grad_not_zeroed"}


# dead_relu_bias's winner (init, or swap_relu) is relu_normal_init's remedy or one the unit
# tests apply (tests/test_prescribe_unit.py): one subprocess trial set fewer in the suite.
@pytest.mark.parametrize("case,winner", [
    ("relu_normal_init", {"init"}),
    ("lr_too_high", {"lr_x0.1", "clip", "warmup", "lr_x0.3"}),
    ("sigmoid20_digits", {"swap_saturating", "init"}),
    ("forgot_zero_grad", {"zero_grad"}),
])
def test_winner_cures_the_run(case, winner, tmp_path):
    rep, stderr = try_fixes(CASES / f"{case}.py", tmp_path)
    trials = rep["trials"]
    base = trials[0]
    assert base["remedy"] == "none" and len(trials) <= TRIALS + 1
    assert set(base["remaining_codes"]) & CRITICAL  # the baseline is broken at the same budget
    won = [t for t in trials if t["winner"]]
    assert len(won) == 1 and won[0]["remedy"] in winner, [(t["remedy"], t["remaining_codes"], t["final_loss"]) for t in trials]
    w = won[0]
    assert not set(w["remaining_codes"]) & set(base["remaining_codes"]) & CRITICAL
    base_final = base["final_loss"] if isinstance(base["final_loss"], float) else math.inf
    assert isinstance(w["final_loss"], float) and w["final_loss"] < base_final
    assert "WINNER" in stderr and "Make it permanent" in stderr


def test_healthy_run_tries_nothing(tmp_path):
    rep, stderr = try_fixes(CASES / "healthy_he_relu20_digits.py", tmp_path)
    assert rep["trials"] == []
    assert "nothing to try" in stderr


def test_adam_eps_remedy_removes_adam_epsilon_too_large():
    """Baseline + the eps remedy only (trials=1): the cheapest proof that the remedy
    applies in-process (no script edit) and that the finding goes with it."""
    from gradvitals.prescribe import try_fixes as run_trials

    diagnosed = {"findings": [{"code": "adam_epsilon_too_large", "severity": "warning", "step": 0}]}
    base, eps = run_trials(str(CASES / "adam_eps_large.py"), [], diagnosed, budget=60, trials=1,
                           echo=lambda line: None)
    assert eps.remedy == "adam_eps" and eps.applicable and "eps=1e-08" in eps.reason
    assert "adam_epsilon_too_large" in base.remaining_codes  # the real baseline run still has it
    assert "adam_epsilon_too_large" not in eps.remaining_codes
    assert eps.final_loss < base.final_loss
    assert "eps=1e-08" in eps.snippet
