"""Issue 12: the training programs people actually write, run unmodified.

Each program in this folder is run twice, as ``python PROGRAM`` and as
``gradvitals run PROGRAM``, from this folder. The script's stdout (which ends with a
checksum of its final weights, repr of a float64 sum) must be identical, its exit
status the same, and the report must say what the run really showed.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import gradvitals_cmd

HERE = Path(__file__).resolve().parent
ALARM = ("warning", "critical")
TIMEOUT_S = 300
pytestmark = pytest.mark.slow


def run_both(program: str, *args: str, expect_status: int = 0) -> tuple[dict, str]:
    """Run plain and watched; assert identical stdout and status; return (report, stdout)."""
    plain = subprocess.run([sys.executable, program, *args], capture_output=True, text=True,
                           cwd=HERE, timeout=TIMEOUT_S)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        watched = subprocess.run([*gradvitals_cmd(), "run", "-q", "--json", str(out), program, *args],
                                 capture_output=True, text=True, cwd=HERE, timeout=TIMEOUT_S)
        # python dies of an uncaught KeyboardInterrupt by SIGINT (-2, a shell's 130);
        # gradvitals must write its report first, then exits 130.
        plain_status = 128 + signal.SIGINT if plain.returncode == -signal.SIGINT else plain.returncode
        assert plain_status == expect_status, plain.stderr[-3000:]
        assert watched.returncode == plain_status, watched.stderr[-3000:]
        assert watched.stdout == plain.stdout, "gradvitals changed the script's output or its final weights"
        if expect_status == 0:
            assert watched.stderr == plain.stderr  # no warnings of ours, nothing else
        assert out.exists(), watched.stderr[-3000:]
        report = json.loads(out.read_text())
    assert report["run"]["exit_status"] == plain_status
    return report, plain.stdout


def codes(report: dict, severities: tuple[str, ...] = ALARM) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for f in report["findings"]:
        if f["severity"] in severities:
            found.setdefault(f["code"], f)
    return found


def assert_healthy(report: dict) -> None:
    alarms = codes(report)
    assert not alarms, {c: f["summary"] for c, f in alarms.items()}
    assert not [e for e in report["run"].get("events", []) if e["type"] == "probe_error"], report["run"]["events"]


def series(report: dict, key: str) -> dict:
    return report["series"][key]


def test_programs_read_scikit_learns_digits():
    """The programs load the digits through digits_data.py (scikit-learn's own file,
    without importing scikit-learn): the same arrays as sklearn.datasets.load_digits."""
    import importlib.util

    import numpy as np
    from sklearn.datasets import load_digits

    spec = importlib.util.spec_from_file_location("digits_data", HERE / "digits_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    X, y = module.load_digits(return_X_y=True)
    X_ref, y_ref = load_digits(return_X_y=True)
    assert X.dtype == X_ref.dtype and y.dtype == y_ref.dtype
    assert np.array_equal(X, X_ref) and np.array_equal(y, y_ref)


# ------------------------------------------------------------- patterns 1-10
def test_manual_sgd_without_optimizer():
    report, _ = run_both("manual_sgd.py", "--steps", "60")
    assert report["run"]["steps"] == 60  # one step per backward
    assert series(report, "grad_norm/0.weight")["count"] == 60
    ratios = [v for v in series(report, "update_ratio/0.weight")["values"]]
    assert ratios and all(0 < float(v) < 1 for v in ratios)  # measured from the weight change
    assert_healthy(report)


def test_gan_three_backwards_two_models_same_paths():
    report, stdout = run_both("gan.py", "--steps", "60")
    names = {l["name"] for l in report["layers"]}
    assert {"netD:main.12", "netG:main.12", "netD:main.0", "netG:main.0"} <= names
    assert report["run"]["steps"] == 60  # one step per iteration, not per backward (3) or optimizer (2)
    assert series(report, "grad_norm/netD:main.10.weight")["count"] == 60
    assert series(report, "grad_norm/netG:main.0.weight")["count"] == 60
    assert not [e for e in report["run"]["events"] if e["type"] == "segment"]  # trained together: one segment
    assert_healthy(report)  # G's loss rises while D learns: by design


def test_gan_finding_names_the_model():
    report, _ = run_both("gan.py", "--steps", "60", "--dead-d")
    dead = codes(report).get("dead_relu")
    assert dead is not None, report["findings"]
    assert dead["layers"][0] in ("netD:main.6", "netD:main.7"), dead["layers"]


def test_lbfgs_closure_measures_the_step_gradient():
    report, stdout = run_both("lbfgs.py")
    assert report["run"]["steps"] == 15
    g = series(report, "grad_norm/0.weight")
    assert g["steps"][0] == 0 and g["count"] == 15  # step 0's gradient is seen (the closure computed it)
    loss = series(report, "loss")
    printed = [float(l.split()[-1]) for l in stdout.splitlines() if l.startswith("step ")]
    assert loss["count"] == 15
    # the step's loss is the closure's first evaluation (what LBFGS returns), not a trial average
    assert [float(v) for v in loss["values"]] == pytest.approx(printed, rel=1e-5)
    assert_healthy(report)


def test_whole_model_pickling():
    report, stdout = run_both("pickle_model.py")
    assert "hooks on clone 0, hooks on model 0" in stdout
    assert_healthy(report)


def test_inplace_activations_after_hooked_modules():
    report, _ = run_both("inplace_activations.py")
    assert "act_std/stem.1" in report["series"] or "act_std/stem.0" in report["series"]
    assert_healthy(report)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing(reentrant):
    """torch.utils.checkpoint: the blocks' forwards run again inside the backward (the
    non-reentrant one stops that recompute by raising inside a block's forward). Same
    stdout and stderr as plain python (a hook of ours used to warn there), statistics
    once per scheduled forward, and a NaN born inside a checkpointed block is traced
    to it (the replay's own warnings stay out of the user's stderr)."""
    extra = ["--reentrant"] if reentrant else []
    report, _ = run_both("checkpointed.py", *extra)
    assert_healthy(report)
    assert report["run"]["steps"] == 40
    for name in ("stem", "blocks.2.fc", "blocks.2.act", "head"):
        assert report["series"][f"act_mean/{name}"]["steps"] == [0, 25], name
    report, _ = run_both("checkpointed.py", *extra, "--nan-step", "20")
    origin = [e for e in report["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert [(e["step"], e["kind"], e["module"], e["source"]) for e in origin] == [
        (20, "activation", "blocks.2.fc", "replay")]
    assert codes(report)["nonfinite"]["layers"][0] == "blocks.2.fc"


def test_forward_that_raises_on_a_bad_batch_the_script_skips():
    """The model rejects a corrupt batch by raising in its forward, on a traced step;
    the script catches it and goes on. Under `gradvitals run` the exception stays the
    user's (no hook of ours fails or unhooks itself inside torch's handler of it), the
    rejected forward's NaN statistics are no finding, and the retry is the traced one."""
    report, stdout = run_both("skip_bad_batch.py")
    assert "skipped 1" in stdout
    assert_healthy(report)
    assert report["run"]["steps"] == 60
    for name in ("body.0", "head"):
        assert report["series"][f"act_mean/{name}"]["steps"] == [0, 25, 50], name


def test_parametrized_weights_spectral_and_weight_norm():
    """spectral_norm / weight_norm: gradvitals never reads a parametrized weight (the init
    audit did, and each read ran a spectral-norm power iteration: the run's final weights
    changed). The parametrization's modules are no layers and no models of their own
    (they were discovered as models when `.to()` read the weight before the first forward,
    and reported as never receiving a gradient); their originals belong to their layer."""
    report, stdout = run_both("parametrized_gan.py")
    assert "CHECKSUM" in stdout
    assert_healthy(report)
    layers = {l["name"]: l for l in report["layers"]}
    assert not [n for n in layers if "parametrizations" in n or "Parametrization" in n]
    assert layers["D:0"]["kind"] == "Conv2d" and layers["D:3"]["kind"] == "Linear"
    assert {p["name"] for p in layers["D:0"]["params"]} == {"D:0.bias", "D:0.parametrizations.weight.original"}
    assert "grad_norm/G:2.parametrizations.weight.original1" in report["series"]


def test_ema_copies_are_not_untrained_layers():
    """Models no optimizer updates (an EMA via AveragedModel, a hand-rolled EMA copy),
    evaluated under no_grad: no `no_gradient` warning about them (there was one)."""
    report, _ = run_both("ema.py")
    assert_healthy(report)
    assert {"model:0", "ema:module.0", "ema2:0"} <= {l["name"] for l in report["layers"]}


def test_scripted_submodule_in_dataparallel_with_dict_output():
    """A torch.jit.script-ed submodule takes no Python hooks: the init audit skips it
    instead of failing for the whole model (a probe error on stderr), its layers carry
    their real kinds, and the rest is measured."""
    report, _ = run_both("scripted_dict.py")
    assert_healthy(report)
    assert not [e for e in report["run"]["events"] if e["type"] == "probe_error"]
    kinds = {l["name"]: l["kind"] for l in report["layers"]}
    assert (kinds["enc.0"], kinds["enc.1"], kinds["head"]) == ("Linear", "ReLU", "Linear")
    assert "grad_norm/enc.0.weight" in report["series"] and "act_mean/head" in report["series"]


def test_torch_compile_report_equals_eager():
    compiled, stdout = run_both("compiled.py", "--backend", "aot_eager")
    assert "graph breaks 0" in stdout  # our hooks must not break Dynamo's graph
    eager, eager_out = run_both("compiled.py", "--eager")
    assert stdout.splitlines()[-1] == eager_out.splitlines()[-1]  # same final weights
    assert {l["name"] for l in compiled["layers"]} == {l["name"] for l in eager["layers"]}
    for key, s in eager["series"].items():
        if key.split("/")[0] in ("loss", "grad_norm", "grad_norm_global", "update_ratio", "weight_norm"):
            assert compiled["series"][key]["values"] == pytest.approx(s["values"], rel=1e-5), key
    assert sorted(codes(compiled, ("critical", "warning", "info"))) == sorted(codes(eager, ("critical", "warning", "info")))
    assert_healthy(compiled)


def test_gradscaler_records_unscaled_values():
    report, stdout = run_both("amp_scaler.py", "--steps", "30")
    loss = [float(v) for v in series(report, "loss")["values"]]
    assert max(loss) < 5  # cross-entropy of 10 classes, not x65536
    assert_healthy(report)


def test_gradscaler_skipped_steps_are_not_nonfinite():
    report, stdout = run_both("amp_scaler.py", "--steps", "30", "--init-scale", str(2.0 ** 24))
    skipped = int(stdout.split("skipped ")[-1].split()[0])
    assert skipped >= 1
    assert "nonfinite" not in codes(report, ("critical", "warning", "info")), report["findings"]
    assert report["run"]["steps"] == 30 - skipped  # steps are optimizer steps that happened
    assert_healthy(report)


def test_clip_grad_norm_nan_origin_before_clipping():
    report, _ = run_both("clip_nan.py", "--nan-at", "5")
    nf = codes(report)["nonfinite"]
    assert nf["step"] == 5
    assert nf["layers"][0] == "encoder.2"  # after clipping every gradient is NaN, the head's too
    assert "update_ratio_high" not in codes(report)  # lr 0.1 was fine; the NaN came from sqrt(0)


def test_clip_max_norm_zero_is_reported():
    report, _ = run_both("clip_nan.py", "--max-norm", "0")
    found = {c: f for c, f in codes(report).items() if c in ("clipping_always_active", "not_updated")}
    assert found, report["findings"]
    assert any("max_norm" in f["summary"] + f["advice"] for f in found.values())


def test_config_exec_sees_exactly_pythons_globals():
    report, stdout = run_both("config_exec.py", "config/small.py", "--learning_rate=0.05")
    assert "config {'learning_rate': 0.05, 'n_hidden': 48, 'max_iters': 30" in stdout
    assert report["run"]["steps"] == 30


@pytest.mark.parametrize("mode,status,steps", [("overflow", 1, None), ("sigint", 130, 11), ("early", 1, 0)])
def test_scripts_that_end_badly(mode, status, steps):
    report, stdout = run_both("ends_badly.py", "--mode", mode, expect_status=status)
    iters = sum(1 for l in stdout.splitlines() if l.startswith("iter "))
    # overflow: the step whose log line raised had happened (iters printed + 1)
    assert report["run"]["steps"] == (iters + 1 if steps is None else steps)
    if mode == "overflow":
        assert "OverflowError" in report["run"]["script_error"]
        assert {"loss_spike", "update_ratio_high"} & set(codes(report)) or "exploding_gradients" in codes(report)
    if mode == "early":
        assert report["findings"] == [] or not codes(report)
        assert "FileNotFoundError" in report["run"]["script_error"]


def test_keeps_running_after_nan():
    report, stdout = run_both("nan_continue.py", "--nan-at", "15")
    assert "CHECKSUM nan" in stdout
    nf = codes(report)["nonfinite"]
    assert nf["step"] == 15 and nf["layers"][0] == "3"  # the Temperature module divided by 0
    assert nf["severity"] == "critical" and "recovered" not in nf["summary"]  # NaN to the end


def test_script_that_restores_a_checkpoint_after_nan_recovered():
    """The script restores its last good weights after the NaN step and trains on:
    the origin is still named (the corrupt batch), but the run is not broken: a
    warning that says it recovered (it was a critical "BROKEN" verdict)."""
    report, stdout = run_both("nan_recover.py", "--bad-at", "50")
    assert "step 50: non-finite weights, restoring" in stdout
    nf = codes(report)["nonfinite"]
    assert nf["step"] == 50 and nf["evidence"]["kind"] == "input" and nf["evidence"]["last_nonfinite_step"] == 50
    assert nf["severity"] == "warning", nf["summary"]
    assert "The run recovered: after step 50, every recorded value was finite again for its last 69 steps." in nf["summary"]
    report, _ = run_both("nan_recover.py", "--bad-at", "-1")
    assert_healthy(report)


def test_finite_again_with_every_gradient_zero_is_dead_not_recovered():
    """A 20-layer ReLU MLP at N(0, 1) under Adam: the gradients' norm overflows to Inf for
    steps 0-75, then every value is finite, but the loss is exactly 0.0 and every
    gradient exactly 0 to the end (a saturated softmax). It was a warning that the run
    "recovered"; it is dead: critical, and said so. With He init: no such finding."""
    report, stdout = run_both("dead_after_nan.py")
    assert stdout.splitlines()[-2] == "step 90 loss 0"
    nf = codes(report)["nonfinite"]
    zero = report["series"]["grad_norm_global"]
    tail = [s for s, v in zip(zero["steps"], zero["values"]) if s > nf["evidence"]["last_nonfinite_step"]]
    assert nf["severity"] == "critical" and "The run recovered" not in nf["summary"]
    n = nf["evidence"]["zero_gradient_steps"]
    assert n == len(tail) == 24 and all(float(v) == 0 for v in zero["values"][-n:])
    assert f"every gradient was exactly 0 for its last {n} steps (the loss exactly 0.0)" in nf["summary"]
    report, _ = run_both("dead_after_nan.py", "--init", "he")
    assert "nonfinite" not in codes(report, ("critical", "warning", "info"))


def test_try_fixes_a_dead_baseline_sets_no_loss_to_beat():
    """--try-fixes on the dead run: the baseline's loss is exactly 0.0 because nothing
    learns any more (critical nonfinite, every gradient 0). gv.init_ removes every critical
    finding but could not beat 0.0, so no remedy won; a baseline that is not sound sets no
    loss to beat, and a trial that is not sound (lr x0.1 still overflows) is compared with
    nothing. The winner is the sound trial with the best loss."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        p = subprocess.run([*gradvitals_cmd(), "run", "--try-fixes", "--trials", "2", "--budget-steps", "60",
                            "--json", str(out), "dead_after_nan.py", "--steps", "60"],
                           capture_output=True, text=True, cwd=HERE, timeout=3 * TIMEOUT_S)
        assert p.returncode == 0, p.stderr[-3000:]
        trials = json.loads(out.read_text())["trials"]
    base = trials[0]
    assert base["remedy"] == "none" and base["final_loss"] == 0.0 and "nonfinite" in base["critical_codes"]
    assert base["degenerate"].startswith("every gradient exactly 0 for its last")
    won = [t for t in trials if t["winner"]]
    assert [t["remedy"] for t in won] == ["init"], [(t["remedy"], t["critical_codes"], t["degenerate"],
                                                    t["final_loss"]) for t in trials]
    assert won[0]["critical_codes"] == [] and won[0]["degenerate"] == "" and won[0]["final_loss"] > 0.0
    for t in trials[1:]:
        if not t["winner"]:
            assert t["degenerate"] or t["critical_codes"] or t["final_loss"] > won[0]["final_loss"]
    assert "WINNER" in p.stderr + p.stdout and "Make it permanent" in p.stderr + p.stdout


def test_model_fine_tuned_in_eval_mode_is_measured_and_traced():
    """model.eval() for the whole run (frozen BatchNorm statistics): its forwards are
    the training forwards. They were ignored as validation: no activation statistics,
    and an Inf weight was reported as "the loss computation itself produced the first
    NaN/Inf (forward outputs were finite)" with loss-function advice."""
    report, _ = run_both("eval_mode_finetune.py")
    assert_healthy(report)
    assert series(report, "act_mean/8")["count"] > 0 and series(report, "dead_frac/8")["count"] > 0
    report, stdout = run_both("eval_mode_finetune.py", "--bad-weight-at", "15")
    assert "CHECKSUM nan" in stdout
    nf = codes(report)["nonfinite"]
    assert nf["step"] == 15 and nf["layers"][0] == "8", nf["summary"]
    assert nf["evidence"]["kind"] == "weight" and nf["evidence"]["source"] == "replay"


def test_dataloader_with_spawned_workers():
    """Worker processes started by "spawn" import the script as __mp_main__: they
    load the data as under python, and the run is recorded (58 steps, healthy)."""
    report, stdout = run_both("dataloader_workers.py")
    assert stdout.count("epoch") == 2
    assert report["run"]["steps"] == 2 * 29
    assert_healthy(report)


def test_mixture_of_experts_expert_that_never_runs():
    """A collapsed top-1 router: the experts that received no sample in the whole run
    (the script's own count) are the no_gradient layers, said to never run (it read
    "not connected to the loss", with detaching advice); the others are not named."""
    report, stdout = run_both("moe_router.py")
    usage = [int(u) for u in stdout.split("USAGE ")[1].split("\n")[0].split()]
    unused = {f"2.experts.{i}.0" for i, u in enumerate(usage) if u == 0}
    assert unused and len(unused) < len(usage)
    f = codes(report)["no_gradient"]
    assert set(f["layers"]) == unused
    assert f["evidence"]["ran_in_traced_forwards"] is False and "never ran in the" in f["summary"]


def test_functional_model_without_modules():
    """Raw tensors and an optimizer, no nn.Module: healthy when healthy; a NaN weight is
    named (no forward to replay: the weights are checked before blaming the loss); a
    loss that overflows is the loss, said without claiming the forward was checked."""
    report, _ = run_both("functional_params.py")
    assert_healthy(report)
    report, _ = run_both("functional_params.py", "--nan-weight-at", "20")
    nf = codes(report)["nonfinite"]
    assert nf["step"] == 20 and nf["evidence"]["kind"] == "weight" and nf["layers"][0].endswith("param2")
    report, _ = run_both("functional_params.py", "--nan-loss-at", "20")
    nf = codes(report)["nonfinite"]
    assert nf["step"] == 20 and nf["evidence"]["kind"] == "loss" and nf["evidence"]["forward_checked"] is False
    assert "forward outputs were finite" not in nf["summary"] and "could not be traced" in nf["summary"]


# ------------------------------------- NaN origins: masks by design, the backward
ORACLE = HERE.parent / "nonfinite_oracle.py"


def oracle(program: str, *args: str, backward: bool = False) -> tuple[str, str]:
    """(module path, class) torch's own hooks see make the first NaN/Inf in the forward
    (the first module output that is not finite), or with ``backward`` the first module
    whose gradient is not finite while the gradient it received was."""
    flag = ["--backward"] if backward else []
    p = subprocess.run([sys.executable, str(ORACLE), *flag, program, *args], capture_output=True,
                       text=True, cwd=HERE, timeout=TIMEOUT_S)
    tag = "ORACLE_BACKWARD" if backward else "ORACLE"
    m = re.search(rf"^{tag} (\S+) (\S+)$", p.stderr, re.M)
    assert m, p.stderr[-3000:]
    return m.group(1), m.group(2)


def first_bad_step(report: dict, prefix: str) -> int | None:
    steps = [s["first_nonfinite_step"] for k, s in report["series"].items()
             if k.split("/")[0] == prefix and s.get("first_nonfinite_step") is not None]
    return min(steps) if steps else None


def test_transformer_encoder_causal_mask_is_not_the_origin():
    """nn.TransformerEncoder at an overflowing lr: the -inf masks (the causal mask made
    in the model's forward, the one the encoder builds to check it) were reported as the
    origin (`(root)`, op `full`); the first NaN/Inf made from finite values is the
    LayerNorm torch's hooks see (its output, at that step). At a sane lr: no finding."""
    report, _ = run_both("encoder_causal_mask.py", "--lr", "10")
    nf = codes(report)["nonfinite"]
    module, kind = oracle("encoder_causal_mask.py", "--lr", "10")
    # The last step's float sums decide which overflows first (thread count, SIMD
    # width): a LayerNorm of the encoder is the case this program is for.
    assert kind == "LayerNorm" and module.startswith("encoder.layers."), (module, kind)
    assert nf["layers"][0] == module, nf["summary"]
    ev = nf["evidence"]
    assert (ev["op"], ev["phase"], ev["kind"], ev["source"]) == ("layer_norm", "forward", "activation", "replay")
    assert nf["step"] == first_bad_step(report, "loss")
    report, _ = run_both("encoder_causal_mask.py", "--lr", "0.1")
    assert_healthy(report)


def test_hand_written_masked_fill_attention_is_not_the_origin():
    """A lecture-style character GPT (`wei.masked_fill(tril == 0, float('-inf'))` in every
    head): the origin was `blocks.0.sa.heads.0`, op `masked_fill`; torch sees the first
    non-finite output in `blocks.0.ln2`, a LayerNorm fed finite values. At the script's
    own lr: healthy."""
    report, _ = run_both("gpt_char.py", "--lr", "1000")
    nf = codes(report)["nonfinite"]
    module, kind = oracle("gpt_char.py", "--lr", "1000")
    assert kind == "LayerNorm", (module, kind)  # blocks.0.ln2 with one thread
    assert nf["layers"][0] == module, nf["summary"]
    ev = nf["evidence"]
    assert (ev["op"], ev["phase"], ev["kind"]) == ("layer_norm", "forward", "activation")
    report, _ = run_both("gpt_char.py")
    assert_healthy(report)


@pytest.mark.parametrize("where", ["model", "outside"])
def test_gpt_nan_born_in_the_backward_is_traced_to_its_producer(where):
    """SGD at lr 300: at the first bad step the loss is finite and every gradient is not.
    The report named the deepest parameter whose gradient norm went bad (every upstream
    one goes bad at once); the backward is now replayed and the producer named: the
    module torch's backward hooks see make a non-finite gradient from a finite one.
    With the loss computed outside the model, from its logits, the backward is replayed
    from the logits with a surrogate seed (it kept the series' answer)."""
    flags = ["--optimizer", "sgd", "--lr", "300", *(["--loss-outside"] if where == "outside" else [])]
    report, _ = run_both("gpt_char.py", *flags)
    nf = codes(report)["nonfinite"]
    step = first_bad_step(report, "grad_norm")
    assert first_bad_step(report, "loss") > step  # the forward was finite
    module, kind = oracle("gpt_char.py", *flags, backward=True)
    assert kind == "LayerNorm", (module, kind)  # blocks.1.ln1 with one thread
    assert nf["step"] == step and nf["layers"][0] == module, nf["summary"]
    ev = nf["evidence"]
    assert ev["backward_checked"] is True
    assert (ev["phase"], ev["kind"], ev["source"], ev["op"], ev["backward_op"]) == (
        "backward", "gradient", "replay", "layer_norm", "NativeLayerNormBackward0")
    assert ev["backward_seed"] == ("loss" if where == "model" else "surrogate")
    assert "in the backward" in nf["summary"]


def test_nan_born_in_the_backward_of_a_model_that_returns_logits():
    """A hand-written LayerNorm with the epsilon outside the square root, zeroed padding
    rows, logits out of the model and cross_entropy outside it: the forward is finite,
    the backward of `sqrt` at variance 0 makes NaN at the padded batch. The report named
    `proj` (the deepest parameter whose gradient norm went bad, a propagator); the
    backward is now replayed from the model's output with a surrogate seed and names the
    producer torch's backward hooks see. With the epsilon inside: healthy."""
    report, stdout = run_both("padded_layernorm.py")
    assert "CHECKSUM nan" in stdout
    nf = codes(report)["nonfinite"]
    step = first_bad_step(report, "grad_norm")
    assert first_bad_step(report, "loss") > step  # the forward was finite
    module, kind = oracle("padded_layernorm.py", backward=True)
    assert (module, kind) == ("norm", "LayerNorm")  # the script's own LayerNorm class
    assert nf["step"] == step and nf["layers"][0] == module, nf["summary"]
    ev = nf["evidence"]
    assert (ev["phase"], ev["kind"], ev["source"], ev["op"], ev["backward_op"], ev["backward_seed"]) == (
        "backward", "gradient", "replay", "sqrt", "SqrtBackward0", "surrogate")
    assert ev["backward_checked"] is True and ev["value"] == "nan"
    assert "in the backward" in nf["summary"] and "outside the model" in nf["summary"]
    assert "torch.sqrt(var + eps)" in nf["advice"] and "Lower the learning rate" not in nf["advice"]
    report, _ = run_both("padded_layernorm.py", "--eps-inside")
    assert_healthy(report)




def test_a_nan_that_torch_where_drops_in_the_forward_is_named_where_the_backward_makes_it():
    """The signed square root written with torch.where: both branches are computed, sqrt
    of the negatives is NaN and the where drops it, so the forward and the loss are
    finite; the backward multiplies the dropped branch's zero gradient by that NaN. The
    report said `sqrt` in `1` made "the first non-finite activation" in the forward (the
    forward replay sees the op, not that the output stayed finite) and advised a lower
    learning rate; it now says the NaN was dropped in the forward and born in the
    backward, with the cure for it. Clamped into sqrt's domain: healthy."""
    report, stdout = run_both("where_guard.py")
    assert "CHECKSUM nan" in stdout
    nf = codes(report)["nonfinite"]
    step = first_bad_step(report, "grad_norm")
    assert first_bad_step(report, "loss") > step  # the forward was finite
    module, kind = oracle("where_guard.py", backward=True)
    assert (module, kind) == ("1", "SignedSqrt")
    assert nf["step"] == step and nf["layers"][0] == module, nf["summary"]
    ev = nf["evidence"]
    assert (ev["phase"], ev["kind"], ev["source"], ev["op"], ev["backward_op"]) == (
        "backward", "gradient", "replay", "sqrt", "SqrtBackward0")
    assert ev["dropped_in_forward"] is True and ev["dropped_value"] == "nan" and ev["value"] == "nan"
    assert "torch.where" in nf["summary"] and "in the backward" in nf["summary"]
    assert "clamp" in nf["advice"] and "Lower the learning rate" not in nf["advice"]
    report, _ = run_both("where_guard.py", "--safe")
    assert_healthy(report)


def test_a_nan_the_loss_backward_sends_into_the_model_is_not_blamed_on_its_last_layer():
    """An entropy term `torch.where(p > 0, p * log(p), 0)` in a loss computed outside the
    model: the loss and the forward are finite, the loss's backward sends NaN into the
    logits. The report blamed the last Linear ("values that overflow pass through `2`.
    Lower the learning rate"). Torch's backward hooks see no module make it (every one
    received it); the replay from a finite seed of the outputs is finite: the report now
    says the loss's backward made it, and how to compute the term safely."""
    report, stdout = run_both("entropy_bonus.py")
    assert "CHECKSUM nan" in stdout
    nf = codes(report)["nonfinite"]
    step = first_bad_step(report, "grad_norm")
    assert first_bad_step(report, "loss") > step  # the forward was finite
    p = subprocess.run([sys.executable, str(ORACLE), "--backward", "entropy_bonus.py"], capture_output=True,
                       text=True, cwd=HERE, timeout=TIMEOUT_S)
    assert p.returncode == 0 and "ORACLE_BACKWARD" not in p.stderr, p.stderr[-2000:]  # no module made it
    assert nf["step"] == step and list(nf["layers"]) == [], nf["summary"]
    ev = nf["evidence"]
    assert (ev["phase"], ev["kind"], ev["source"], ev["backward_seed"], ev["from_loss"]) == (
        "backward", "gradient", "replay", "surrogate", True)
    assert ev["module"] is None and "before it reached the model" in nf["summary"]
    assert "log_softmax" in nf["advice"] and "Lower the learning rate" not in nf["advice"]
    report, _ = run_both("entropy_bonus.py", "--safe")
    assert_healthy(report)


def test_best_checkpoint_reloaded_with_torch_load_is_evaluated_not_untrained():
    """torch.save(model, f) of the best epoch, model = torch.load(f) at the end and a test
    evaluation: the reloaded model is a second model no backward reaches and no optimizer
    holds. Not a no_gradient (it was one for every layer of it); a layer the trained
    model really never uses is still one, and only that one is named."""
    report, stdout = run_both("best_checkpoint.py")
    assert "test loss" in stdout and report["run"]["steps"] == 72
    assert len({l["model"] for l in report["layers"]}) == 2  # the reloaded copy is seen
    assert_healthy(report)
    report, _ = run_both("best_checkpoint.py", "--unused-layer")
    f = codes(report)["no_gradient"]
    assert [l.split(":")[-1] for l in f["layers"]] == ["aux"] and len(f["layers"]) == 1, f["layers"]


@pytest.mark.parametrize("init", ["zero", "zero-proj", "default"])
def test_zero_init_inside_residual_branches(init):
    """A lecture-style GPT with every weight zero: the layers inside its residual branches
    (key/query/value, the first feed-forward Linear) are a symmetry nothing breaks
    (symmetric_weights was not reported: the Fixup/ReZero exemption covered every layer of
    a branch). Only the last layer of each branch may start at zero: with just those
    zero (GPT-2-style residual projections), or the default init, the run is healthy."""
    report, _ = run_both("lecture_gpt.py", "--init", init)
    if init != "zero":
        assert_healthy(report)
        return
    f = codes(report)["symmetric_weights"]
    assert f["severity"] == "critical"
    layers = set(f["layers"])
    for b in (0, 1):
        assert {f"blocks.{b}.sa.heads.{h}.{w}" for h in range(4) for w in ("key", "query", "value")} <= layers
        assert f"blocks.{b}.ffwd.net.0" in layers
        assert not {f"blocks.{b}.sa.proj", f"blocks.{b}.ffwd.net.2"} & layers  # branch ends: allowed
    assert "lm_head" not in layers
    assert "(here `model.blocks[0].sa.proj`, `model.blocks[0].ffwd.net[2]`" in f["advice"]


def test_forgot_model_train_after_an_evaluation_before_the_first_step():
    """estimate_loss() at iteration 0 puts the GPT in eval mode; without its model.train()
    every step trains with dropout off. The model never trained in train mode, yet this is
    no deliberate eval-mode fine-tuning: an evaluation put it there (it was not reported).
    With model.train() (the default run, in test_zero_init_inside_residual_branches) and
    a model fine-tuned in eval mode from the start (eval_mode_finetune.py, healthy in
    test_model_fine_tuned_in_eval_mode_is_measured_and_traced): nothing."""
    report, _ = run_both("lecture_gpt.py", "--forget-train")
    f = codes(report)["eval_mode_training"]
    assert f["step"] == 0 and f["evidence"]["steps"] == 100 == report["run"]["steps"]
    assert "after an evaluation before its first step" in f["summary"] and "model.train()" in f["advice"]
    assert "blocks.0.sa.heads.0.dropout" in f["layers"]


def test_model_built_again_after_its_optimizer():
    """The optimizer holds the first model's parameters (no gradient ever reaches them);
    the model built again trains with gradients every step and nothing steps it: the
    loss stays flat. It was only a loss_plateau; it is not_updated, critical, naming the
    cause, with the optimizer moved after the model in the advice. Built in the right
    order (--fixed): healthy."""
    report, _ = run_both("model_rebuilt.py")
    f = codes(report)["not_updated"]
    assert f["severity"] == "critical" and set(f["layers"]) == {"0", "2", "4"}
    assert f["evidence"]["stale_optimizer_params"] == 6 and "built again" in f["summary"]
    assert "optimizer = torch.optim.Adam(model.parameters()" in f["advice"]
    plateau = codes(report).get("loss_plateau")
    assert plateau is None or plateau.get("caused_by") == "not_updated", plateau
    report, _ = run_both("model_rebuilt.py", "--fixed")
    assert_healthy(report)


# ------------------------------------------------- looks bad, is normal
@pytest.mark.parametrize("program", ["attention_masks.py", "bce_clamp.py", "policy_gradient.py",
                                     "float64_unbatched.py", "hf_gpt2.py"])
def test_looks_bad_but_normal(program):
    report, _ = run_both(program)
    assert_healthy(report)


def test_optimizer_recreated_every_epoch():
    report, _ = run_both("optimizer_per_epoch.py")
    assert report["run"]["steps"] == 100  # 4 epochs x 25 steps, one optimizer at a time
    assert series(report, "loss")["count"] == 100  # one loss series, not loss/opt1, loss/opt2, ...
    assert not [k for k in report["series"] if k.startswith("loss/")]
    assert series(report, "grad_norm/0.weight")["count"] == 100  # the dead optimizer claims nothing
    assert not [e for e in report["run"]["events"] if e["type"] == "segment"]  # same model: no restart
    assert_healthy(report)


def test_kfold_folds_are_judged_each_on_its_own():
    """Three folds, each a fresh model and optimizer: one loss series over 180 steps
    whose restarts at steps 60 and 120 are not the loss going back up. Each fold is
    a segment; a healthy k-fold run gets no alarm (it got a false loss_spike at the
    restart). The script prints how many fold models are alive after each fold (after
    gc.collect()): 1 under python, so the same stdout under gradvitals means it holds
    no finished fold's model (it held all of them)."""
    report, stdout = run_both("kfold.py")
    assert stdout.count("models alive 1") == 3
    released = [(e["step"], e["model"]) for e in report["run"]["events"] if e["type"] == "model_released"]
    assert released == [(60, "model0"), (120, "model1")]
    audits = [e["model"] for e in report["run"]["events"] if e["type"] == "init_audit"]
    assert audits == ["model0", "model1", "model2"]  # the first one's, written as "model", renamed with it
    assert report["run"]["steps"] == 180
    cuts = [(e["step"], e["models"]) for e in report["run"]["events"] if e["type"] == "segment"]
    assert cuts == [(60, ["model1"]), (120, ["model2"])]
    assert {l["model"] for l in report["layers"]} == {"model0", "model1", "model2"}
    assert series(report, "loss")["count"] == 180
    assert_healthy(report)


def test_kfold_finding_names_every_fold_it_holds_in():
    """The same learning rate too low in every fold: one finding per code, for the
    first fold, naming the other two; evidence of the first fold's own steps."""
    report, _ = run_both("kfold.py", "--lr", "1e-5")
    found = codes(report)
    assert {"update_ratio_low", "loss_plateau"} <= set(found), [f["summary"] for f in report["findings"]]
    for code in ("update_ratio_low", "loss_plateau"):
        f = found[code]
        assert f["summary"].startswith("model0 (steps 0-59): ")
        assert f["evidence"]["segment"] == {"first_step": 0, "last_step": 59, "models": ["model0"],
                                            "also": ["model1 (steps 60-119)", "model2 (steps 120-179)"]}
    assert sum(f["code"] == "loss_plateau" for f in report["findings"]) == 1


def test_kfold_with_every_optimizer_kept_alive():
    """The earlier folds' optimizers stay alive (kept in a list): each fold's loss goes
    to its optimizer's series (loss/opt1, loss/opt2), the step cycle never sees a fold's
    last step end. Still 60 steps a fold, and each fold's loss is judged as its own."""
    report, _ = run_both("kfold.py", "--keep-optimizers", "--lr", "1e-5")
    assert report["run"]["steps"] == 180
    assert [series(report, k)["count"] for k in ("loss", "loss/opt1", "loss/opt2")] == [60, 60, 60]
    assert series(report, "loss/opt2")["steps"][0] == 120
    plateau = codes(report).get("loss_plateau")
    assert plateau is not None, [f["summary"] for f in report["findings"]]
    assert plateau["evidence"]["segment"]["also"] == ["model1 (steps 60-119)", "model2 (steps 120-179)"]


# ------------------------------------------------------------- issue 25: thresholds calibrated to practice
def test_clipping_on_most_steps_after_warmup_is_found():
    """A char GPT warmed up to lr 1.0: clip_grad_norm_(max_norm=1.0) cuts most steps
    after warm-up (fewer than 90% of them) by several x while the loss climbs."""
    report, stdout = run_both("char_gpt.py", "--lr", "1.0", "--warmup", "60")
    f = codes(report)["clipping_always_active"]
    ev = f["evidence"]
    assert 0.05 <= ev["clipped_fraction"] < 0.9 and ev["median_scale"] >= 3
    assert ev["window_first_step"] >= 5 and f"{ev['clipped_fraction']:.0%}" in f["summary"]
    # the script's own count agrees that clipping was frequent
    clipped = int(stdout.split("clipped on ")[1].split(" of")[0])
    assert clipped >= 50


def test_char_gpt_clipping_now_and_then_is_healthy():
    """The healthy twin: AdamW 3e-3, clipped on a few early steps only."""
    report, _ = run_both("char_gpt.py")
    assert_healthy(report)
    assert "clipping_always_active" not in codes(report, ("warning", "critical", "info"))


def test_init_too_large_inside_a_transformer():
    """Every Linear of a pre-LN GPT at N(0, 1): no plain chain compounds it, the step-0
    loss (far above ln(vocabulary)) and the per-layer scales show it."""
    report, _ = run_both("char_gpt.py", "--init", "normal1", "--steps", "40")
    f = codes(report)["poor_initialization"]
    ev = f["evidence"]
    assert ev["loss_step0"] >= 2 * ev["uniform_loss"] and ev["mean_init_ratio"] >= 4
    assert ev["residual_branch_layers"] >= 4 and ev["act_std_step0_max"] > 10
    assert report["series"]["loss"]["values"][0] == ev["loss_step0"]


def test_gradients_underflowing_to_exact_zero_are_vanishing():
    """50 tanh layers at N(0, 0.01): the first layers' gradients are exactly 0.0 on every
    step while the last layers' are not -- vanishing, caused by the init; not
    'not updated' (nothing is left out of the optimizer)."""
    report, _ = run_both("deep_tanh.py", "--depth", "50", "--std", "0.01", "--steps", "55")
    found = codes(report)
    f = found["vanishing_gradients"]
    assert f["severity"] == "critical" and f["evidence"]["zero_grad_layers"] >= 10
    assert f["layers"][0] == "0" and f["caused_by"] == "poor_initialization"
    assert report["series"]["grad_norm/0.weight"]["max"] == 0.0  # the oracle: exactly zero throughout
    assert "not_updated" not in found and "no_gradient" not in found


def test_deep_tanh_with_xavier_init_is_healthy():
    report, _ = run_both("deep_tanh.py")
    assert_healthy(report)


def test_relu_units_dying_under_large_adamw_steps_name_the_learning_rate():
    """AdamW lr 5e-2, wd 0.5: ratios ~2-4e-2, most units of a ReLU layer die, the loss
    still falls: dead_relu is caused by update_ratio_high."""
    report, stdout = run_both("adamw_dead.py")
    found = codes(report)
    assert found["update_ratio_high"]["severity"] == "warning" and "died" in found["update_ratio_high"]["summary"]
    assert found["dead_relu"]["caused_by"] == "update_ratio_high"
    last = [l for l in stdout.splitlines() if l.startswith("step ")][-1]
    assert int(last.split("dead units after model[3]: ")[1].rstrip("%")) >= 50  # the script's own count


def test_adamw_at_a_sane_learning_rate_is_healthy():
    report, _ = run_both("adamw_dead.py", "--lr", "1e-3", "--wd", "0.01")
    assert_healthy(report)


def test_rnn_gradient_explosion_that_kills_the_script():
    """tanh RNN, BPTT 200, no clipping: the gradient norm climbs, the loss goes from 4.5
    to hundreds in a few steps, then the script's math.exp(loss) overflows: the report,
    written after the crash, names the explosion."""
    report, _ = run_both("rnn_bptt.py", expect_status=1)
    assert "OverflowError" in report["run"]["script_error"]
    f = codes(report)["exploding_gradients"]
    assert f["severity"] == "critical" and f["evidence"]["script_died"] is True
    assert f["evidence"]["growth"] >= 10 and "died" in f["summary"]
    assert "rnn" in f["advice"] or "clip_grad_norm_" in f["advice"]


def test_rnn_with_clipping_and_a_sane_learning_rate_is_healthy():
    report, _ = run_both("rnn_bptt.py", "--clip", "1.0", "--lr", "0.05", "--steps", "30")
    assert_healthy(report)


def test_functional_tanh_in_a_cell_saturates():
    """h = torch.tanh(self.i2h(cat([x, h]))): no nn.Tanh to hook; the saturation is read
    on the Linear feeding the function."""
    report, _ = run_both("char_mlp.py", "--cell", "--init", "randn", "--lr", "10", "--steps", "60")
    f = codes(report)["saturated_activations"]
    assert f["layers"][0] == "i2h" and f["evidence"]["saturated_fraction_by_layer"]["i2h"] >= 0.9
    assert "torch.tanh" in f["summary"]


def test_two_layer_mlp_with_an_embedding_whose_first_layer_gets_exactly_zero():
    """Embedding -> Linear -> torch.tanh -> Linear at a huge lr: the tanh is pinned at +-1,
    its derivative exactly 0: the hidden layer's gradient is exactly 0.0 on most steps.
    Vanishing with two weight layers, caused by the saturation."""
    report, _ = run_both("char_mlp.py", "--lr", "1000", "--steps", "60")
    found = codes(report)
    assert found["saturated_activations"]["layers"][0] == "hidden"
    v = found["vanishing_gradients"]
    assert v["layers"] == ["hidden"] and v["evidence"]["weight_layers"] == 2
    assert v["caused_by"] == "saturated_activations"


def test_char_mlp_at_a_sane_learning_rate_is_healthy():
    report, _ = run_both("char_mlp.py", "--lr", "0.1", "--steps", "60")
    assert_healthy(report)
    report, _ = run_both("char_mlp.py", "--cell", "--lr", "0.1", "--steps", "60")
    assert_healthy(report)
