"""The training matrix, end to end with ``gv.watch`` and ``gradvitals run``.

Each case (tests/reliability/scripts/matrix.py) is run three ways with the same seed:
plainly, under ``gv.watch(..., every=1)`` (every probe on every step: the most
intrusive setting), and under ``gradvitals run --every 1`` (the CLI, in the test's
process). The watched runs must be bit-identical to the plain run (final weights, RNG
state, every loss), and the report must say what torch says: one step per optimizer step,
the loss of each step, each parameter's gradient norm at the optimizer step, and a
schema-valid JSON report.

Not covered here (tests/realworld/): LBFGS closures, torch.compile, GradScaler fp16,
GAN multi-backward, manual SGD without an optimizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

import gradvitals as gv
from conftest import cli
from gradvitals.probes import patches
from gradvitals.report import schema

MATRIX = Path(__file__).resolve().parent / "scripts" / "matrix.py"
VALIDATOR = jsonschema.Draft202012Validator(schema())

#: Gradient norms are compared with torch's own norm of the same gradient; the fused
#: foreach kernel may sum in a different order (float32 round-off only).
NORM_RTOL = 1e-5


def _load_matrix():
    spec = importlib.util.spec_from_file_location("gv_reliability_matrix", MATRIX)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


matrix = _load_matrix()


@functools.lru_cache(maxsize=None)
def plain(argv: tuple[str, ...]) -> dict[str, Any]:
    return json.loads(json.dumps(matrix.main(list(argv))))


def watched(argv: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The case under gv.watch: one watch per model as the user would add them."""
    watches: list[Any] = []

    def attach(model, optimizers):
        watches.append(gv.watch(model, optimizers, every=1))

    try:
        result = json.loads(json.dumps(matrix.main(list(argv), attach)))
    finally:
        for w in watches:
            w.close()
    assert patches.active() == []
    return result, [w.report() for w in watches]


def run_cli(argv: tuple[str, ...], tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`gradvitals run --every 1` in this process (the CLI's code path without a second torch
    import; tests/test_runner.py and tests/realworld run it as a subprocess)."""
    out = tmp_path / "report.json"
    p = cli(["run", "-q", "--every", "1", "--json", out, MATRIX, *argv])
    assert p.exit_code == 0, (p.stderr, p.exception)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert len(line) == 1, p.stdout
    return json.loads(line[0][len("RESULT "):]), json.loads(out.read_text())


def _points(report: dict[str, Any], key: str) -> dict[int, float]:
    s = report["series"][key]
    assert s["stride"] == 1, key  # these runs are far below the cap: nothing decimated
    return {st: (float(v) if isinstance(v, str) else v) for st, v in zip(s["steps"], s["values"])}


def check_report(report: dict[str, Any], oracle: dict[str, Any], prefix: dict[str, str],
                 steps: int | None = None, step_offset: int = 0) -> None:
    """The report says what torch measured: steps, loss per step, grad norm per parameter."""
    VALIDATOR.validate(report)
    json.dumps(report, allow_nan=False)
    assert report["run"]["steps"] == (oracle["steps"] if steps is None else steps)
    assert not [e for e in report["run"]["events"] if e["type"] in ("probe_error", "rule_error")]
    for label, params in oracle["grad_norms"].items():
        if label not in prefix:
            continue
        for name, per_step in params.items():
            got = _points(report, f"grad_norm/{prefix[label]}{name}")
            want = {int(s) - step_offset: v for s, v in per_step.items()}
            assert sorted(got) == sorted(want), (label, name)
            for s, v in want.items():
                assert got[s] == pytest.approx(v, rel=NORM_RTOL), (label, name, s)


def check_loss(report: dict[str, Any], oracle: dict[str, Any], key: str = "loss") -> None:
    got = _points(report, key)
    assert sorted(got) == list(range(len(oracle["step_losses"])))
    assert [got[s] for s in sorted(got)] == pytest.approx(oracle["step_losses"], rel=1e-6)


def same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical: the same losses (exact floats) and the same final weights and RNG state."""
    assert a["step_losses"] == b["step_losses"]
    assert a["digest"] == b["digest"]


SINGLE = {"model": ""}

# id -> argv; every case runs under gv.watch, the RUN ones also under `gradvitals run`.
CASES: dict[str, tuple[str, ...]] = {
    "autocast_bf16": ("--case", "autocast_bf16"),
    "grad_accum": ("--case", "grad_accum", "--micro", "4"),
    "two_optimizers": ("--case", "two_optimizers"),
    "sparse_adam": ("--case", "sparse", "--opt", "adam"),
    "sparse_sgd": ("--case", "sparse", "--opt", "sgd"),
    "tied": ("--case", "tied"),
    "reused_module": ("--case", "reused_module"),
    "toggle_requires_grad": ("--case", "toggle_requires_grad", "--steps", "9"),
    "eval_eval_no_grad": ("--case", "eval_loops", "--eval", "eval_no_grad"),
    "eval_no_grad": ("--case", "eval_loops", "--eval", "no_grad"),
    "eval_inference": ("--case", "eval_loops", "--eval", "inference"),
    **{f"opt_{name}": ("--case", "optimizer", "--opt", name) for name in sorted(matrix.OPTIMIZERS)},
}
RUN = ["autocast_bf16", "grad_accum", "two_optimizers", "sparse_adam", "tied", "reused_module",
       "toggle_requires_grad", "eval_no_grad", "opt_sgd", "opt_rmsprop"]


def _case_checks(case: str, report: dict[str, Any], oracle: dict[str, Any]) -> None:
    """What each case is about, beyond steps/loss/grad norms."""
    s = report["series"]
    n = oracle["steps"]
    if case == "autocast_bf16":
        for layer in ("0", "1", "2"):  # bf16 outputs measured in float32, finite
            assert all(isinstance(v, float) and math.isfinite(v) for v in s[f"act_std/{layer}"]["values"])
        assert {p["dtype"] for l in report["layers"] for p in l["params"]} == {"float32"}
    if case == "grad_accum":  # one point per optimizer step, not per micro-batch
        assert len(s["grad_norm/0.weight"]["steps"]) == n
        assert len(s["act_mean/0"]["steps"]) == n
    if case == "two_optimizers":  # one step per iteration, clipping seen once per step
        assert s["clip_total_norm"]["steps"] == list(range(n))
        assert set(s["lr/opt.0"]["steps"]) == set(s["lr/opt1.0"]["steps"]) == set(range(n))
    if case.startswith("sparse"):
        ratios = [v for v in s["update_ratio/emb.weight"]["values"]]
        assert len(ratios) == n and all(isinstance(v, float) and v > 0 for v in ratios)
    if case == "tied":  # the shared weight is one parameter, measured once
        grads = {k for k in s if k.startswith("grad_norm/")}
        assert grads == {"grad_norm/emb.weight", "grad_norm/mid.weight", "grad_norm/mid.bias"}
        numel = sum(p["numel"] for l in report["layers"] for p in l["params"])
        assert numel == matrix.VOCAB * 16 + 16 * 16 + 16
    if case == "reused_module":  # three calls per step: its first call's stats, once per step
        assert s["act_mean/block"]["steps"] == list(range(n))
    if case == "toggle_requires_grad":
        frozen = set(range(n // 3, 2 * n // 3))
        assert set(s["grad_norm/0.weight"]["steps"]) == set(range(n)) - frozen
        assert set(s["grad_norm/2.weight"]["steps"]) == set(range(n))
        assert not [f for f in report["findings"] if f["code"] in ("no_gradient", "not_updated")
                    and any(l.startswith("0") for l in f["layers"])]


@pytest.mark.parametrize("case", sorted(CASES))
def test_watch(case):
    argv = CASES[case]
    base = plain(argv)
    result, reports = watched(argv)
    same_run(base, result)
    assert len(reports) == 1
    check_report(reports[0], base, SINGLE)
    check_loss(reports[0], base)
    _case_checks(case, reports[0], base)


@pytest.mark.slow
@pytest.mark.parametrize("case", RUN)
def test_run(case, tmp_path):
    argv = CASES[case]
    base = plain(argv)
    result, report = run_cli(argv, tmp_path)
    same_run(base, result)
    check_report(report, base, SINGLE)
    check_loss(report, base)
    _case_checks(case, report, base)


ACT_KEYS = ("act_mean/", "act_std/", "act_zero_frac/", "dead_frac/", "bn_batch/")


def _act_series(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report["series"].items() if k.startswith(ACT_KEYS)}


@pytest.mark.parametrize("mode", ["eval_no_grad", "no_grad", "inference", "eval_grad"])
def test_evaluation_does_not_pollute_training_statistics(mode):
    """Evaluating on data 5x wider and shifted by 5 between steps leaves every activation
    series exactly as in the run without evaluation."""
    _, (clean,) = watched(("--case", "eval_loops", "--eval", "none"))
    _, (evaluated,) = watched(("--case", "eval_loops", "--eval", mode))
    acts = _act_series(clean)
    assert acts and "act_mean/1" in acts and "dead_frac/0" in acts
    assert _act_series(evaluated) == acts
    assert evaluated["series"]["loss"] == clean["series"]["loss"]


@pytest.mark.slow
def test_evaluation_does_not_pollute_training_statistics_in_run(tmp_path):
    _, (clean,) = watched(("--case", "eval_loops", "--eval", "none"))
    _, report = run_cli(("--case", "eval_loops", "--eval", "eval_no_grad"), tmp_path)
    assert _act_series(report) == _act_series(clean)


# ------------------------------------------------ several models, late models
LATE = ("--case", "late_model", "--steps", "8", "--late", "3")
SEQ = ("--case", "sequence", "--steps", "5")


def test_watch_late_model():
    base = plain(LATE)
    result, (rep_a, rep_b) = watched(LATE)
    same_run(base, result)
    check_report(rep_a, base, {"netA": ""})
    check_loss(rep_a, base)  # netB's backward() losses must not leak into netA's watch
    # netB's own watch counts its own steps from 0
    check_report(rep_b, base, {"netB": ""}, steps=8 - 3, step_offset=3)


@pytest.mark.slow
def test_run_discovers_late_model(tmp_path):
    base = plain(LATE)
    result, report = run_cli(LATE, tmp_path)
    same_run(base, result)
    check_report(report, base, {"netA": "netA:", "netB": "netB:"})
    check_loss(report, base)
    assert {l["model"] for l in report["layers"]} == {"netA", "netB"}


def test_watch_two_models_in_sequence():
    base = plain(SEQ)
    result, (rep_a, rep_b) = watched(SEQ)  # netA's watch stays open while netB trains
    same_run(base, result)
    check_report(rep_a, base, {"netA": ""}, steps=5)
    assert _points(rep_a, "loss") == dict(enumerate(base["step_losses"][:5]))
    check_report(rep_b, base, {"netB": ""}, steps=5, step_offset=5)
    assert _points(rep_b, "loss") == dict(enumerate(base["step_losses"][5:]))


@pytest.mark.slow
def test_run_two_models_in_sequence(tmp_path):
    base = plain(SEQ)
    result, report = run_cli(SEQ, tmp_path)
    same_run(base, result)
    check_report(report, base, {"netA": "netA:", "netB": "netB:"})
    # every step's loss is recorded once, whichever optimizer's series holds it
    losses = {}
    for key in ("loss", "loss/opt1"):
        if key in report["series"]:
            for s, v in _points(report, key).items():
                assert s not in losses
                losses[s] = v
    assert [losses[s] for s in sorted(losses)] == pytest.approx(base["step_losses"], rel=1e-6)
    assert sorted(losses) == list(range(10))
