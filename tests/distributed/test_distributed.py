"""DDP and FSDP2 under torchrun (gloo, CPU, 2 processes): the merged report holds the
numbers a single process computes on the global batch (torch is the oracle), a NaN on
one rank names that rank and its module, and a rank that raises ends nobody's run
in a hang while rank 0 still writes the report."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_launch
from gradvitals import distributed

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "scripts" / "train_dist.py"
sys.path.insert(0, str(HERE / "scripts"))
from dist_common import digits, global_batch, make_model  # noqa: E402

pytestmark = pytest.mark.slow

#: Wall-clock limit of one 2-process torchrun; a hang fails the test instead of the suite.
RUN_TIMEOUT_S = 120
#: Ranks wait this long in a gradvitals collective before giving up (tests only).
MERGE_TIMEOUT_S = "20"
#: float32 training on 2 ranks vs 1 process: same maths, different summation order.
REL = 1e-4
#: |W_after - W_before| loses ~log10(1/ratio) digits to cancellation in float32.
REL_UPDATE = 2e-3


def torchrun(args: list[str], timeout: float = RUN_TIMEOUT_S,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return dist_launch.torchrun(args, timeout=timeout, merge_timeout_s=MERGE_TIMEOUT_S, env=env)


def oracle(steps: int, lr: float = 0.1) -> dict[str, list[float]]:
    """What one process measures training the same model on the whole global batch."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    X, y = digits()
    out: dict[str, list[float]] = defaultdict(list)
    windows: dict[str, list[torch.Tensor]] = defaultdict(list)
    for step in range(steps):
        xb, yb = global_batch(X, y, step)
        acts: dict[str, torch.Tensor] = {}
        def keep(mod, inputs, output, name):
            acts.setdefault(name, output.detach())  # returns None: the output is unchanged

        hooks = [m.register_forward_hook(lambda mod, i, o, n=name: keep(mod, i, o, n))
                 for name, m in model.named_children()]
        loss = nn.functional.cross_entropy(model(xb), yb)
        for h in hooks:
            h.remove()
        opt.zero_grad()
        loss.backward()
        out["loss"].append(loss.item())
        grads = {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.named_parameters()}
        for n, g in grads.items():
            out[f"grad_norm/{n}"].append(g)
        out["grad_norm_global"].append(math.sqrt(sum(g * g for g in grads.values())))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            w = torch.linalg.vector_norm(before[n])
            out[f"weight_norm/{n}"].append(w.item())
            out[f"update_ratio/{n}"].append((torch.linalg.vector_norm(p.detach() - before[n]) / w).item())
        for n, a in acts.items():
            var, mean = torch.var_mean(a, correction=0)
            out[f"act_mean/{n}"].append(mean.item())
            out[f"act_std/{n}"].append(var.sqrt().item())
            out[f"act_zero_frac/{n}"].append((a == 0).float().mean().item())
            windows[n] = (windows[n] + [a.amax(0) > 0])[-4:]  # the recorder's 4-batch window
            out[f"dead_frac/{n}"].append(1 - torch.stack(windows[n]).any(0).float().mean().item())
    return out


def assert_matches(report: dict, expected: dict[str, list[float]], steps: int, least: int = 100) -> None:
    series = report["series"]
    checked = 0
    for key, want in expected.items():
        got = series[key]
        assert got["steps"][:steps] == list(range(len(got["steps"][:steps]))), key
        values = got["values"]
        n = min(len(values), steps)
        assert n >= steps - 1, (key, got["steps"])  # the last update ratio stays pending
        rel = REL_UPDATE if key.startswith("update_ratio/") else REL
        assert values[:n] == pytest.approx(want[:n], rel=rel, abs=1e-6), key
        checked += n
    assert checked > least


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


STEPS = 4
#: A max_norm no gradient here reaches: clipping is observed but changes nothing.
NEVER_CLIPS = 1e6


def test_ddp_under_gradvitals_run_matches_single_process(tmp_path):
    out = tmp_path / "ddp.json"
    p = torchrun(["-m", "gradvitals", "run", "--every", "1", "--json", str(out), str(SCRIPT),
                  "--strategy", "ddp", "--steps", str(STEPS)])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    assert_matches(rep, oracle(STEPS), STEPS)
    # The user's names, not DDP's "module.0.weight"; one summary, from rank 0.
    assert [l["name"] for l in rep["layers"]] == ["0", "1", "2", "3", "4"]
    assert {q["name"] for l in rep["layers"] for q in l["params"]} == {
        f"{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
    assert p.stderr.count("report written to") == 1
    info = rep["run"]["distributed"]
    assert (info["world_size"], info["rank"], info["strategy"]) == (2, 0, "ddp")
    # One all-reduce per recorded step, of the stated size: O(#tensors + #units).
    assert info["allreduce_calls"] == STEPS
    units = 4 * 33 + 10  # ever-active flags of Linear/ReLU outputs
    assert info["allreduce_bytes_max"] == distributed.allreduce_bytes(
        2, grad_tensors=6, losses=1, lr_groups=0, weight_tensors=6, modules=5, units=units, replicas=6,
        scalars=1, maxima=1)  # log Z's mean and max: the script's loss is a cross-entropy
    assert info["allreduce_bytes_max"] < 8 * sum(
        p.numel() for p in make_model().parameters()) / 10
    assert not [f for f in rep["findings"] if f["code"] == "nonfinite"]


def test_merges_not_waited_for_land_in_place_and_equal_one_process(tmp_path):
    """The default schedule: steps 2-11 are not scheduled, so under DDP they wait in
    batches of distributed.BATCH_STEPS: steps 2-9 sent as one all-reduce at step 9's
    flush and landed at step 10's (no rank waits for it), steps 10-11 when the script
    destroys its process group, before the batch fills; the report lands it."""
    out = tmp_path / "ddp.json"
    steps = 12
    assert distributed.BATCH_STEPS == 8
    p = torchrun(["-m", "gradvitals", "run", "--json", str(out), str(SCRIPT), "--strategy", "ddp",
                  "--steps", str(steps), "--clip", str(NEVER_CLIPS)])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    want_all = oracle(steps)
    every_step = {k: v for k, v in want_all.items() if k == "loss" or k.startswith("grad_norm")}
    assert len(every_step) == 8
    # Each rank clips DDP's averaged gradients: its own total is the global norm, in its slot.
    every_step |= {f"clip_rank_norm/{r}": want_all["grad_norm_global"] for r in (0, 1)}
    every_step["clip_total_norm"] = want_all["grad_norm_global"]
    every_step["clip_clipped"] = [0.0] * steps
    for key, want in every_step.items():
        got = rep["series"][key]
        assert got["steps"] == list(range(steps)), key  # the last step too: nothing stays behind
        assert got["values"] == pytest.approx(want, rel=REL, abs=1e-6), key
    info = rep["run"]["distributed"]
    # Waited for at once: step 0 (scheduled) and step 1, whose flush carries step 0's update
    # ratios; steps 2-9 and 10-11 in two batches, each landed late.
    assert (info["allreduce_calls"], info["merges_landed_late"], info["layout_checks"]) == (4, 2, 2)
    assert (info["batch_steps"], info["batches"]) == (8, 2)
    assert "unmerged_steps" not in info


def test_a_report_saved_before_close_holds_the_batched_steps_as_this_ranks_own(tmp_path):
    """``watch.save()`` inside the script, before ``watch.close()``: the steps a DDP batch
    still holds are not merged (a mid-run report starts no collective); the report holds
    rank 0's own values for them and says which steps. DDP's gradients are the same on
    every rank, so those norms are still the global ones."""
    out = tmp_path / "ddp.json"
    steps = 6
    p = torchrun([str(SCRIPT), "--strategy", "ddp", "--steps", str(steps), "--watch", str(out), "--every", "25"])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    assert rep["run"]["distributed"]["unmerged_steps"] == [2, steps - 1]
    want = oracle(steps)
    for key in [k for k in want if k.startswith("grad_norm")]:
        got = rep["series"][key]
        assert got["steps"] == list(range(steps)), key
        assert got["values"] == pytest.approx(want[key], rel=REL, abs=1e-6), key
    assert rep["series"]["loss"]["steps"] == list(range(steps))
    assert rep["series"]["loss"]["values"][:2] == pytest.approx(want["loss"][:2], rel=REL)  # merged


def test_fsdp2_with_watch_inside_the_script_matches_single_process(tmp_path):
    out = tmp_path / "fsdp.json"
    p = torchrun([str(SCRIPT), "--strategy", "fsdp", "--steps", str(STEPS), "--watch", str(out),
                  "--clip", str(NEVER_CLIPS)])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    # Sharded gradients (17 + 16 rows of a 33-row weight): local squared norms summed.
    expected = oracle(STEPS)
    assert_matches(rep, expected, STEPS)
    # clip_grad_norm_ on DTensors returns a replicated total: the same global norm.
    assert rep["series"]["clip_total_norm"]["values"] == pytest.approx(expected["grad_norm_global"], rel=REL)
    assert rep["series"]["clip_clipped"]["values"] == [0.0] * STEPS
    assert [l["kind"] for l in rep["layers"]] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    layer0 = next(l for l in rep["layers"] if l["name"] == "0")
    assert layer0["params"][0]["shape"] == [33, 64]  # the global shape, not a shard's
    info = rep["run"]["distributed"]
    assert (info["strategy"], info["allreduce_calls"]) == ("fsdp2", STEPS)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_accumulation_without_sync_matches_single_process(tmp_path, strategy):
    """The accumulation recipe: 2 micro-batches per step, loss / 2, the gradient sync
    skipped on the first (DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``).
    The step's gradients are the global batch's mean, as in one process on the whole
    batch; the loss recorded is the mean of the undivided micro-batch losses over ranks."""
    out = tmp_path / "accum.json"
    p = torchrun([str(SCRIPT), "--strategy", strategy, "--steps", str(STEPS), "--watch", str(out),
                  "--accum", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    info = rep["run"]["distributed"]
    assert "merge_stopped" not in info and info["strategy"] == ("ddp" if strategy == "ddp" else "fsdp2")
    # Activation statistics are of one micro-batch, the oracle's of the whole batch: not compared.
    expected = {k: v for k, v in oracle(STEPS).items()
                if k == "loss" or k.startswith(("grad_norm", "weight_norm/", "update_ratio/"))}
    # The loss, 6 gradient norms and their global norm, 6 weight norms, 6 update ratios.
    assert_matches(rep, expected, STEPS, least=70)
    assert not [f for f in rep["findings"] if f["severity"] in ("warning", "critical")], rep["findings"]


def test_rank0_evaluating_alone_between_steps_leaves_the_merged_record_equal_one_process(tmp_path):
    """Scripts evaluate on the main process: after every step rank 0 alone runs the inner
    model in eval mode under no_grad, on other rows. Those forwards are not the step's:
    no activation statistic of theirs reaches the record (recorded every step here), no
    rank-0-only value breaks the merge's layout, and every series equals one process's."""
    out = tmp_path / "eval.json"
    p = torchrun([str(SCRIPT), "--strategy", "ddp", "--steps", str(STEPS), "--watch", str(out), "--every", "1",
                  "--eval-rank0", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    info = rep["run"]["distributed"]
    assert "merge_stopped" not in info and info["layout_checks"] == STEPS
    assert_matches(rep, oracle(STEPS), STEPS)
    assert not [f for f in rep["findings"] if f["severity"] in ("warning", "critical")], rep["findings"]


def test_gradscaler_skipped_steps_under_ddp_are_not_a_nan(tmp_path):
    """The AMP twin of a NaN: the scaler's first scale overflows the float16 backward, every
    rank sees inf gradients and the scaler skips those steps. No origin is searched and no
    finding is raised; the skips are counted, and the steps taken are the ones recorded."""
    out = tmp_path / "amp.json"
    p = torchrun(["-m", "gradvitals", "run", "--json", str(out), str(SCRIPT.parent / "amp_ddp.py"), "--steps", "30"])
    assert p.returncode == 0, p.stderr[-3000:]
    skipped = int(next(line for line in p.stdout.splitlines() if line.startswith("skipped")).split()[1])
    assert skipped > 0
    rep = _load(out)
    assert "merge_stopped" not in rep["run"]["distributed"]
    assert rep["run"]["amp_skipped_steps"] == skipped
    assert rep["series"]["loss"]["steps"] == list(range(30 - skipped))
    assert not [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert not [f for f in rep["findings"] if f["severity"] in ("warning", "critical")], rep["findings"]


def test_a_nan_born_in_one_ranks_backward_names_that_rank_not_the_one_ddp_passed_it_to(tmp_path):
    """A torch.where guard on rank 1's batch at step 3: the forward and every loss stay
    finite, rank 1's backward makes NaN and DDP's all-reduce gives it to rank 0 too. Rank
    1's replay reproduces it (sqrt, dropped by the where); rank 0 only reads it off its
    all-reduced gradients. The report named rank 0 "only" and the first Linear (the
    deepest gradient); it names rank 1, the module and the op. Twin with the guard
    written safely: no NaN, no finding."""
    script = str(SCRIPT.parent / "backward_nan_ddp.py")
    out = tmp_path / "bnan.json"
    p = torchrun(["-m", "gradvitals", "run", "--json", str(out), script])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    assert "merge_stopped" not in rep["run"]["distributed"]
    (ev,) = [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert (ev["step"], ev["rank"], ev["ranks"], ev["module"], ev["op"]) == (3, 1, [1], "1", "sqrt")
    assert (ev["kind"], ev["phase"], ev["source"], ev["dropped_in_forward"]) == ("gradient", "backward", "replay", True)
    finding = next(f for f in rep["findings"] if f["code"] == "nonfinite")
    assert "rank 1 only" in finding["summary"] and "torch.where" in finding["summary"]
    out = tmp_path / "safe.json"
    p = torchrun(["-m", "gradvitals", "run", "--json", str(out), script, "--safe"])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    assert not [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert not [f for f in rep["findings"] if f["severity"] in ("warning", "critical")], rep["findings"]


def test_zero_redundancy_optimizer_records_what_a_plain_optimizer_does(tmp_path):
    """ZeroRedundancyOptimizer steps an inner Adam over this rank's part of the parameters
    inside its own step. The zero-code run found that inner optimizer too (another part,
    or none, per rank) and its values broke the merge at step 0: each rank recorded its
    own from then on. The inner one is not watched: the run records what the same script
    with a plain Adam records, merged."""
    script = str(SCRIPT.parent / "zero_ddp.py")
    reps = {}
    for variant in ("zero", "plain"):
        out = tmp_path / f"{variant}.json"
        p = torchrun(["-m", "gradvitals", "run", "--json", str(out), script,
                      *(["--plain"] if variant == "plain" else [])])
        assert p.returncode == 0, p.stderr[-3000:]
        reps[variant] = _load(out)
    zero, plain = reps["zero"], reps["plain"]
    assert "merge_stopped" not in zero["run"]["distributed"] and zero["run"]["distributed"]["strategy"] == "ddp"
    assert not [e for e in zero["run"]["events"] if e["type"] == "probe_error"]
    assert zero["run"]["optimizers"] == ["ZeroRedundancyOptimizer", "Adam"]
    assert not [k for k in zero["series"] if k.startswith("lr/opt1")]
    keys = [k for k in plain["series"] if k == "loss" or k.startswith(("grad_norm", "update_ratio/", "weight_norm/"))]
    assert len(keys) > 10
    for key in keys:
        got, want = zero["series"][key], plain["series"][key]
        assert got["steps"] == want["steps"], key
        assert got["values"] == pytest.approx(want["values"], rel=1e-5, abs=1e-7), key
    assert not [f for f in zero["findings"] if f["severity"] in ("warning", "critical")], zero["findings"]


def _trainer_ddp_runs(tmp_path: Path, script: str, drift_step: int, tensors: int) -> tuple[list[dict], dict]:
    """A trainer's DDP script run twice, healthy and with a rank-1 parameter nudged at
    ``drift_step``: both judged as DDP with ``tensors`` replicas checked, merged; the
    healthy one clean. Returns (both reports' distributed info, the drift's finding)."""
    reports = {}
    for case, extra in (("healthy", []), ("drift", ["--drift-step", str(drift_step)])):
        p = torchrun([script, str(tmp_path / case), *extra])
        assert p.returncode == 0, p.stderr[-3000:]
        reports[case] = _load(tmp_path / case / "gradvitals.json")
    for case, rep in reports.items():
        info = rep["run"]["distributed"]
        assert (info["strategy"], info["replica_tensors"]) == ("ddp", tensors), (case, info)
        assert "merge_stopped" not in info
    assert not [f for f in reports["healthy"]["findings"] if f["severity"] in ("warning", "critical")]
    drift = next(f for f in reports["drift"]["findings"] if f["code"] == "replica_divergence")
    return [rep["run"]["distributed"] for rep in reports.values()], drift


def test_lightning_ddp_parameters_are_judged_as_replicas_and_a_drifting_one_is_found(tmp_path):
    """Trainer(strategy="ddp") wraps the LightningModule in DistributedDataParallel itself;
    the callback watches the module and never sees the wrapper called. It was reported as
    a plain "replicated" model with no replica to check, so a rank-dependent update
    outside the optimizer went unseen. The callback tells the watch the model trains in
    Lightning's wrapper: the strategy is DDP, its 4 tensors are checked, a healthy run
    stays clean and rank 1's drifting bias is named."""
    infos, drift = _trainer_ddp_runs(tmp_path, str(SCRIPT.parent / "lightning_ddp.py"), drift_step=3, tensors=4)
    assert all(info["replica_checks"] >= 6 for info in infos)
    # Drifted after batch 3; the next check is step 5 (every=5), the last equal one step 0.
    assert (drift["layers"], drift["evidence"]["params"], drift["step"]) == (["net.0"], ["net.0.bias"], 5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_matches_single_process(tmp_path, strategy):
    """The middle Linear under torch.utils.checkpoint (non-reentrant): its forward runs a
    second time inside the backward (under FSDP2, with its parameters gathered again).
    Those recomputations are not another forward of the step: every series, activation
    statistics recorded at every step included, equals one process's."""
    out = tmp_path / "ckpt.json"
    p = torchrun([str(SCRIPT), "--strategy", strategy, "--steps", str(STEPS), "--watch", str(out), "--every", "1",
                  "--checkpoint"])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    assert "merge_stopped" not in rep["run"]["distributed"]
    assert not [e for e in rep["run"]["events"] if e["type"] == "probe_error"]
    assert_matches(rep, oracle(STEPS), STEPS)


def test_hf_trainer_ddp_is_seen_through_the_wrapper_it_never_hands_the_callback(tmp_path):
    """The Hugging Face Trainer under torchrun wraps the model in DistributedDataParallel
    (accelerate) and gives callbacks the bare model. The watch was never given the
    wrapper: a plain "replicated" model, no replica checked. Its forward runs inside
    DDP's, where torch names the active wrapper: the strategy is DDP, its 28 tensors are
    checked, a healthy run stays clean and rank 1's nudged LayerNorm bias is named."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _, drift = _trainer_ddp_runs(tmp_path, str(SCRIPT.parent / "hf_ddp.py"), drift_step=2, tensors=28)
    assert drift["evidence"]["params"] == ["transformer.ln_f.bias"] and drift["step"] == 4, drift


#: (strategy, corrupt batch) -> (kind, module) of the origin the report names.
NAN_CASES = {
    ("ddp", "nan"): ("input", "(root)"),  # the replay sees the NaN already in the batch
    ("ddp", "huge"): ("activation", "0"),  # 3e38 inputs: the first Linear overflows
    ("fsdp", "nan"): ("input", "(root)"),  # every rank replays (FSDP2 all-gathers): the batch
    ("fsdp", "huge"): ("activation", "0"),  # ... and names the layer, as under DDP
    # No gradient shared: rank 0's values stay finite; it learns of the NaN when the batch
    # holding the bad step lands (the end of the run); rank 1 replayed alone at once.
    ("local", "nan"): ("input", "(root)"),
}


@pytest.mark.parametrize("strategy,corrupt", sorted(NAN_CASES))
def test_nan_on_one_rank_names_the_rank_and_module(tmp_path, strategy, corrupt):
    out = tmp_path / "nan.json"
    p = torchrun(["-m", "gradvitals", "run", "-q", "--json", str(out), str(SCRIPT), "--strategy", strategy,
                  "--steps", "4", "--nan-rank", "1", "--nan-step", "2", "--corrupt", corrupt])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    origin = [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert len(origin) == 1
    ev = origin[0]
    assert (ev["step"], ev["rank"], ev["ranks"], ev["world_size"]) == (2, 1, [1], 2)
    assert (ev["kind"], ev["module"]) == NAN_CASES[strategy, corrupt]
    assert ev["source"] == "replay"
    if strategy == "fsdp":
        assert ev["replay"] == "every rank (FSDP)"
    info = rep["run"]["distributed"]
    if strategy == "local":
        assert "replay" not in ev  # rank 1's event: a plain replay on that rank
        assert info["merges_landed_late"] >= 1  # steps 2 (the NaN step) and 3: one batch, landed late
    finding = next(f for f in rep["findings"] if f["code"] == "nonfinite")
    assert finding["step"] == 2 and "rank 1 only" in finding["summary"]
    assert finding["layers"][0] == ev["module"]
    # Until the bad step the merged loss is finite; from it on, every rank's record says NaN.
    assert rep["series"]["loss"]["first_nonfinite_step"] == 2


@pytest.mark.parametrize("corrupt,kind,module", [("nan", "input", "(root)"), ("huge", "activation", "0")])
def test_a_nan_in_a_batched_fsdp2_step_is_replayed_by_every_rank_that_met_it(tmp_path, corrupt, kind, module):
    """Rank 1's batch at step 3, an ordinary step waiting in a batch (every=25): no merge
    tells rank 0, but FSDP2 reduce-scatters rank 1's NaN gradients into rank 0's shards, so
    both meet one at that step, say so in the store and replay their forwards together
    (FSDP's all-gathers need both): the origin is named on rank 1 by its replay."""
    closed = tmp_path / "closed.json"
    p = torchrun([str(SCRIPT), "--strategy", "fsdp", "--steps", "6", "--watch", str(tmp_path / "saved.json"),
                  "--closed-out", str(closed), "--every", "25", "--nan-rank", "1", "--nan-step", "3",
                  "--corrupt", corrupt])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(closed)
    info = rep["run"]["distributed"]
    assert (info["batch_steps"], info["batches"]) == (8, 1) and "merge_stopped" not in info
    (ev,) = [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert (ev["step"], ev["rank"], ev["ranks"], ev["kind"], ev["module"]) == (3, 1, [1], kind, module)
    assert (ev["replay"], ev["source"]) == ("every rank (FSDP)", "replay")


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_a_nan_in_one_ranks_own_gradient_names_that_rank_and_stalls_no_rank(tmp_path, strategy):
    """One element of rank 1's own gradient set to NaN after the backward: under FSDP2 its
    shard (rank 0's values stay finite at that step, it learns of the NaN a step later),
    under DDP after DDP's all-reduce (the step waits in a batch). Every rank gathers its
    origin at the same flush: a rank that gathered at once would block while the others
    went on into the next step, whose collectives (FSDP's all-gathers) need it — both
    would wait out the time-out and merging would stop."""
    out = tmp_path / "nan.json"
    p = torchrun(["-m", "gradvitals", "run", "-q", "--json", str(out), str(SCRIPT), "--strategy", strategy,
                  "--steps", "5", "--nan-rank", "1", "--nan-step", "2", "--corrupt", "grad"])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    info = rep["run"]["distributed"]
    assert "merge_stopped" not in info, info
    assert not [e for e in rep["run"]["events"] if e["type"] == "probe_error"]
    (ev,) = [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    # No rank's batch holds it: the rank named is the one whose own values held it at its step.
    assert (ev["step"], ev["rank"], ev["ranks"], ev["kind"], ev["param"]) == (2, 1, [1], "gradient", "0.weight")
    finding = next(f for f in rep["findings"] if f["code"] == "nonfinite")
    assert "rank 1 only" in finding["summary"]


def test_a_mid_run_report_on_rank_0_alone_starts_no_collective(tmp_path):
    """Rank 0 alone calls watch.report() after step 9, when the batch of steps 2-9, which
    holds rank 1's NaN batch of step 5, is in flight. Landing it there would gather the
    NaN's origin on rank 0 alone (a collective rank 1 never joins: a stall, then merging
    off); the look lands nothing, and the report at the end is whole."""
    out, peek = tmp_path / "end.json", tmp_path / "peek.json"
    p = torchrun([str(SCRIPT), "--strategy", "ddp", "--steps", "12", "--watch", str(out), "--every", "25",
                  "--nan-rank", "1", "--nan-step", "5", "--peek-step", "9", "--peek-out", str(peek)])
    assert p.returncode == 0, p.stderr[-3000:]
    rep = _load(out)
    info = rep["run"]["distributed"]
    assert "merge_stopped" not in info, info
    (ev,) = [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert (ev["step"], ev["rank"], ev["kind"], ev["module"]) == (5, 1, "input", "(root)")
    assert rep["series"]["loss"]["steps"] == list(range(12))
    # Saved before close: the batch still filling (steps 10-11) as rank 0's own values, marked.
    assert info["unmerged_steps"] == [10, 11] and "in_flight_steps" not in info
    # What rank 0 saw: every step so far, the batched ones (2-9) as its own values, marked.
    seen = json.loads(peek.read_text())
    assert seen["series"]["loss"]["steps"] == list(range(10))
    assert seen["run"]["distributed"]["unmerged_steps"] == [2, 9]
    assert "in_flight_steps" not in seen["run"]["distributed"]


def test_a_mid_run_report_under_fsdp2_names_the_steps_not_merged_yet(tmp_path):
    """Under FSDP2 ordinary steps wait in a batch (steps 2-9) and this rank's own values of
    them are shards: a report made meanwhile (rank 0's look after step 5; the script's save
    before close, after step 7) leaves those steps out and says which; the report written
    at close has every step, merged."""
    out, peek, end = tmp_path / "end.json", tmp_path / "peek.json", tmp_path / "closed.json"
    p = torchrun([str(SCRIPT), "--strategy", "fsdp", "--steps", "8", "--watch", str(out), "--every", "25",
                  "--peek-step", "5", "--peek-out", str(peek), "--closed-out", str(end)])
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(peek.read_text())
    assert seen["series"]["loss"]["steps"] == [0, 1]
    assert seen["run"]["distributed"]["in_flight_steps"] == [2, 5]
    assert "unmerged_steps" not in seen["run"]["distributed"]
    rep = _load(out)
    assert rep["series"]["loss"]["steps"] == [0, 1]
    assert rep["run"]["distributed"]["in_flight_steps"] == [2, 7]
    assert "merge_stopped" not in rep["run"]["distributed"]
    closed = _load(end)
    assert closed["series"]["loss"]["steps"] == list(range(8))
    assert "in_flight_steps" not in closed["run"]["distributed"]


@pytest.mark.parametrize("where", ["after_step", "before_step"])
def test_a_rank_that_raises_ends_the_run_and_rank0_still_reports(tmp_path, where):
    """after_step: rank 0 is next blocked in DDP's gradient all-reduce; before_step: in
    gradvitals' own merge (the optimizer pre-hook). Either way it fails fast, goes on,
    and writes the report."""
    out = tmp_path / "crash.json"
    started = time.monotonic()
    p = torchrun(["-m", "gradvitals", "run", "--every", "1", "--json", str(out), str(SCRIPT),
                  "--strategy", "ddp", "--steps", "50", "--raise-rank", "1", "--raise-step", "1",
                  "--raise-where", where])
    elapsed = time.monotonic() - started
    assert p.returncode != 0
    assert "rank 1 fails at step 1" in p.stderr
    assert elapsed < RUN_TIMEOUT_S
    rep = _load(out)
    assert rep["run"]["exit_status"] != 0
    assert rep["run"]["distributed"]["rank"] == 0
    # The steps both ranks completed were merged and kept.
    merged = 2 if where == "after_step" else 1
    assert rep["series"]["grad_norm/0.weight"]["steps"][:merged] == list(range(merged))
    assert rep["run"]["distributed"]["allreduce_calls"] == merged
    assert rep["run"]["steps"] < 50


def test_fsdp_replay_by_every_rank_leaves_the_run_unchanged():
    """The FSDP2 replay runs between the backward and the optimizer step; FSDP2 keeps the
    root's gathered parameters after a forward, so without putting the shards back the
    next forward would use the weights from before the step. Losses and final weights
    of a run with a replay equal those without, bit for bit; skipping the reshard
    changes them (what this test catches)."""
    script = HERE / "scripts" / "fsdp_replay.py"

    def run(*extra: str) -> dict:
        p = torchrun([str(script), *extra])
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    plain, replayed, stale = run(), run("--replay-step", "1"), run("--replay-step", "1", "--no-reshard")
    assert replayed["replays"] == [None, True]  # a finite forward: no origin; shards back
    assert (replayed["losses"], replayed["params"]) == (plain["losses"], plain["params"])
    assert stale["replays"] == [None, False]
    assert stale["losses"][:2] == plain["losses"][:2] and stale["losses"][2:] != plain["losses"][2:]


def test_watch_on_rank0_only_records_rank0_alone_at_once_and_says_why(tmp_path):
    """``if rank == 0: gv.watch(...)``, as ``wandb.watch`` is often called: rank 1 never
    says it watches, so rank 0 records alone from its first step, without waiting out
    the merge's time-out (300 s by default) for a rank that will never come; the user's
    own later group still works on every rank."""
    out = tmp_path / "r0.json"
    started = time.monotonic()
    p = torchrun([str(SCRIPT), "--steps", "3", "--watch", str(out), "--watch-ranks", "0"])
    elapsed = time.monotonic() - started
    assert p.returncode == 0, p.stderr[-3000:]
    assert elapsed < distributed.DEFAULT_TIMEOUT_S / 5, elapsed
    assert json.loads(p.stdout.strip().splitlines()[-1])["users_group_sum"] == 2.0
    info = _load(out)["run"]["distributed"]
    assert info["merged"] is False
    assert info["merge_stopped"].startswith("rank 1 does not watch") and "every rank" in info["merge_stopped"]
    assert len(_load(out)["series"]["grad_norm/0.weight"]["values"]) == 3  # rank 0's own record


def test_rank0_autosaves_the_merged_record_and_a_killed_rank0_leaves_it(tmp_path):
    """Under torchrun only rank 0 autosaves, and what it saves is the merged record (the
    loss is the ranks' mean: rank 1's batch differs); SIGKILL on rank 0 leaves its last
    autosave, whole and partial."""
    out = tmp_path / "ddp.json"
    progress = tmp_path / "progress.txt"
    script = HERE / "scripts" / "train_forever_dist.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(dist_launch.free_port()), "-m", "gradvitals", "run", "-q", "--autosave", "0.3",
           "--json", str(out), str(script), "--progress", str(progress)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: MERGE_TIMEOUT_S}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (out.exists() and _load(out)["run"]["steps"] >= 3):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() - t0 < RUN_TIMEOUT_S, "no autosave"
            time.sleep(0.05)
        pids = {}
        for line in progress.read_text().splitlines():
            rank, pid, _ = line.split()
            pids[int(rank)] = int(pid)
        time.sleep(0.5)
        os.kill(pids[0], signal.SIGKILL)
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rep = _load(out)
    from gradvitals.report import schema
    import jsonschema

    jsonschema.validate(rep, schema())
    run = rep["run"]
    assert run["complete"] is False and run["pid"] == pids[0]  # rank 0's, never rank 1's
    steps = run["steps"]
    assert steps >= 3
    # Merged: each step's loss is the mean of the two ranks' losses, not rank 0's own.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    xs, ys = [], []
    for rank in range(2):
        g = torch.Generator().manual_seed(rank)
        xs.append(torch.randn(32, 16, generator=g) * (3.0 if rank == 1 else 1.0))
        ys.append(torch.randint(0, 4, (32,), generator=g))
    with torch.no_grad():
        first = [nn.functional.cross_entropy(model(x), y).item() for x, y in zip(xs, ys)]
    loss0 = rep["series"]["loss"]["values"][0]
    assert loss0 == pytest.approx(sum(first) / 2, rel=1e-5)
    assert loss0 != pytest.approx(first[0], rel=1e-3)
