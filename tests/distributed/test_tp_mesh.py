"""Tensor parallel, SequenceParallel, FSDP2 x TP on a 2 x 2 mesh and HSDP, as real
4-process programs under torchrun (gloo, CPU): per-parameter gradient and weight norms
and update ratios equal the one-process run's on the same global batches, and a NaN
one rank's tensor-parallel module makes is traced to that module and rank. Every
program is one torchrun launch shared by the tests (module-scoped): start-up is most
of its time."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_launch import torchrun
from gradvitals import distributed

SCRIPT = Path(__file__).resolve().parent / "scripts" / "tp_mesh.py"
RUN_TIMEOUT_S = 240
#: float32 norms of the same gradients summed in another order (gradvitals: float64 on the host).
REL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """program -> (rank 0's report, each rank's printed numbers): every program of
    ``tp_mesh.py`` in ONE torchrun launch of 4 processes."""
    out = tmp_path_factory.mktemp("tp_mesh")
    proc = torchrun([str(SCRIPT), "--out", str(out)], nproc=4, timeout=RUN_TIMEOUT_S, merge_timeout_s="30")
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-3000:]
    printed = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {p["program"]: (json.loads((out / f"{p['program']}.json").read_text()), p["ranks"]) for p in printed}


def _oracle(clip: float | None, steps: int = 3) -> dict[str, list[float]]:
    """What torch computes in one process on the global batches: per-parameter gradient
    norms (before clipping at ``clip``), weight norms and update ratios, each leaf
    module's output mean and std."""
    sys.path.insert(0, str(SCRIPT.parent))
    from dist_common import TPTransformer, transformer_batch

    torch.manual_seed(0)
    model = TPTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out: dict[str, list[float]] = {}

    def stats(name: str, output: torch.Tensor) -> None:
        std, mean = torch.std_mean(output.detach(), correction=0)
        out.setdefault(f"act_mean/{name}", []).append(mean.item())
        out.setdefault(f"act_std/{name}", []).append(std.item())

    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(lambda m, args, output, name=name: stats(name, output))
    for step in range(steps):
        x, t = transformer_batch(step)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, TPTransformer.VOCAB), t.reshape(-1))
        opt.zero_grad()
        loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            out.setdefault(f"grad_norm/{n}", []).append(p.grad.norm().item())
            out.setdefault(f"weight_norm/{n}", []).append(p.detach().norm().item())
        out.setdefault("grad_norm_global", []).append(
            torch.stack([p.grad.norm() for p in model.parameters()]).norm().item())
        out.setdefault("loss", []).append(loss.item())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        for n, p in model.named_parameters():
            out.setdefault(f"update_ratio/{n}", []).append(((p.detach() - before[n]).norm() / before[n].norm()).item())
    return out


@pytest.fixture(scope="module")
def oracles() -> dict[str, dict[str, list[float]]]:
    """Per program: its one-process run (tp_sp clips)."""
    plain = _oracle(None)  # puts the scripts' folder on sys.path
    from dist_common import SP_CLIP

    return {"tp": plain, "tp_sp": _oracle(SP_CLIP), "fsdp_tp": plain, "fsdp_tp_sp": plain, "hsdp": plain}


@pytest.fixture(scope="module")
def watched_oracle(oracles) -> dict[str, list[float]]:
    """The one-process run under gv.watch (every step scheduled): its attention and
    log Z series, which only gradvitals' own probes compute."""
    import gradvitals as gv
    from dist_common import TPTransformer, transformer_batch

    torch.manual_seed(0)
    model = TPTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gv.watch(model, opt, every=1) as w:
        for step in range(3):
            x, t = transformer_batch(step)
            loss = nn.functional.cross_entropy(model(x).reshape(-1, TPTransformer.VOCAB), t.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        series = w.report()["series"]
    return {k: v["values"] for k, v in series.items() if k.startswith(("attn_", "log_z_", "dead_frac/"))}


def codes(report: dict) -> list[str]:
    return [f["code"] for f in report["findings"] if f["severity"] in ("warning", "critical")]


#: The key bias's gradient is zero but for rounding (a softmax ignores what q.b_k adds to
#: every key's score alike): ~1e-9, compared in absolute terms.
ROUNDING = 1e-8


#: Row-parallel layers (the embedding too): their outputs are partial sums until the
#: all-reduce that follows them, so gradvitals records no statistics of them.
ROW_PARALLEL = {f"{q}/{m}" for q in ("act_mean", "act_std") for m in ("embed", "attn.o", "fc2")}


def _off(rep: dict, want: dict[str, list[float]]) -> dict[str, float]:
    """Per series that differs from the oracle: the largest ratio got / want."""
    off = {}
    for key, values in want.items():
        if key in ROW_PARALLEL and key not in rep["series"]:
            continue
        got = rep["series"][key]["values"]
        n = min(len(got), len(values))
        assert n >= len(values) - 1, key  # the last update ratio stays pending
        steps = range(n)
        if key.startswith("update_ratio/"):  # of a weight that was not zero (LayerNorm biases start at 0)
            steps = [s for s in steps if want[f"weight_norm/{key.split('/', 1)[1]}"][s] > 0]
        a, b = [got[s] for s in steps], [values[s] for s in steps]
        floor = ROUNDING
        if key.startswith("act_mean/"):  # a mean near 0 (a LayerNorm's output): judged at its values' scale
            floor = max(ROUNDING, REL * max(want[key.replace("act_mean/", "act_std/")]))
        if a != pytest.approx(b, rel=1e-3 if key.startswith("update_ratio/") else REL, abs=floor):
            off[key] = max((g / w if w else math.inf) for g, w in zip(a, b))
    return off


@pytest.mark.slow
@pytest.mark.parametrize("program", ["tp", "tp_sp", "fsdp_tp", "fsdp_tp_sp", "hsdp"])
def test_norms_update_ratios_and_outputs_equal_one_process(runs, oracles, program):
    rep, _ = runs[program]
    assert _off(rep, oracles[program]) == {}
    skipped = ROW_PARALLEL - set(rep["series"])
    assert skipped == (set() if program == "hsdp" else ROW_PARALLEL)
    assert [e for e in rep["run"]["events"] if e["type"] == "probe_error"] == []
    assert codes(rep) == []
    if program == "tp":  # the init audit reads each rank's shard, with the global fan-in
        audit = next(e for e in rep["run"]["events"] if e["type"] == "init_audit")
        assert (audit["weight_layers"], audit["residual_bypassed_layers"]) == (7, 6)  # all but head
        fan_in = {l["name"]: l.get("extra", {}).get("fan_in") for l in rep["layers"]}
        assert (fan_in["attn.q"], fan_in["fc1"], fan_in["fc2"], fan_in["head"]) == (32, 32, 64, 32)


@pytest.mark.slow
def test_the_strategy_and_the_all_reduce_bytes_say_what_ran(runs):
    info = {p: runs[p][0]["run"]["distributed"] for p in ("tp", "tp_sp", "fsdp_tp", "hsdp")}
    assert {p: i["strategy"] for p, i in info.items()} == {
        "tp": "tensor_parallel", "tp_sp": "tensor_parallel", "fsdp_tp": "fsdp2+tensor_parallel", "hsdp": "hsdp"}
    assert {p: i["allreduce_calls"] for p, i in info.items()} == dict.fromkeys(info, 3)
    # Every strategy batches its ordinary steps (none here: every step is scheduled).
    assert {p: i["batch_steps"] for p, i in info.items()} == dict.fromkeys(info, distributed.BATCH_STEPS)
    # Sequence parallel adds the six LayerNorm gradients' partial sums (32 values each,
    # sent whole) and six replicas (the LayerNorms become Replicate DTensors) to the
    # same one all-reduce per step (and its clip call, its total and each rank's).
    extra = info["tp_sp"]["allreduce_bytes_max"] - info["tp"]["allreduce_bytes_max"]
    assert extra == (distributed.allreduce_bytes(4, 0, 0, 0, replicas=8, partial_elements=6 * 32, clips=1)
                     - distributed.allreduce_bytes(4, 0, 0, 0, replicas=2))
    assert (info["tp"]["replica_tensors"], info["tp_sp"]["replica_tensors"]) == (2, 8)


@pytest.mark.slow
def test_a_nan_one_rank_makes_in_a_tensor_parallel_module_names_the_module_and_the_rank(runs):
    """Rank 1's fc1 (column-parallel) makes NaN at step 1; fc2's all-reduce takes it to
    every rank. Every rank replays its forward (one alone would wait in fc2's
    all-reduce): rank 1 meets it in fc1, the others only after fc2's all-reduce."""
    rep, printed = runs["tp_nan"]
    f = next(f for f in rep["findings"] if f["code"] == "nonfinite")
    ev = f["evidence"]
    assert (f["layers"][0], f["step"], ev["kind"], ev["op"]) == ("fc1", 1, "activation", "log")
    assert (ev["rank"], ev["ranks"], ev["world_size"]) == (1, [1], 4)
    assert ev["replay"] == "every rank (tensor parallel)"
    assert "on rank 1 only (of 4 ranks)" in f["summary"]
    for numbers in printed:  # every rank's loss went NaN at step 1
        losses = numbers["losses"]
        assert losses[0] == pytest.approx(runs["tp"][1][0]["losses"][0]) and all(x != x for x in losses[1:])


@pytest.mark.slow
def test_a_nan_in_a_tensor_parallel_module_under_fsdp2_x_tp_names_the_module_and_the_rank(runs):
    """FSDP2 x TP on 2 x 2: rank 1's fc1 makes NaN at step 1; its "tp" partner (rank 0)
    meets it after fc2's all-reduce, the other "dp" half (ranks 2, 3) only in the
    gradients FSDP reduce-scatters. Every rank saw a NaN at that step, so every rank
    replays its forward (FSDP's all-gathers and TP's all-reduces need them all): rank 1
    meets it in fc1, first in the forward."""
    rep, printed = runs["fsdp_tp_nan"]
    f = next(f for f in rep["findings"] if f["code"] == "nonfinite")
    ev = f["evidence"]
    assert (f["layers"][0], f["step"], ev["kind"], ev["op"]) == ("fc1", 1, "activation", "log")
    assert (ev["rank"], ev["ranks"], ev["world_size"]) == (1, [1], 4)
    assert ev["replay"] == "every rank (FSDP)"
    assert "merge_stopped" not in rep["run"]["distributed"]
    losses = [numbers["losses"] for numbers in printed]
    assert all(x != x for x in losses[0][1:] + losses[1][1:])  # the "tp" group of rank 1: NaN loss


@pytest.mark.slow
def test_tensor_parallel_merges_batched_equal_one_process_at_every_step(runs):
    """Tensor parallelism batches ordinary steps as DDP does (GRADVITALS_DIST_BATCH=4 here:
    two batches fit 10 steps): 10 steps on the default schedule, steps 2-5 and 6-9 each
    merged in one all-reduce; every gradient norm, the global norm and the loss equal
    the one-process run at every step."""
    rep, _ = runs["tp_batched"]
    want = _oracle(None, steps=10)
    for key in [k for k in want if k.startswith("grad_norm") or k == "loss"]:
        got = rep["series"][key]
        assert got["steps"] == list(range(10)), key
        assert got["values"] == pytest.approx(want[key], rel=REL, abs=1e-7), key
    info = rep["run"]["distributed"]
    assert (info["batch_steps"], info["batches"], info["allreduce_calls"]) == (4, 2, 4)
    assert "unmerged_steps" not in info and "merge_stopped" not in info


@pytest.mark.slow
def test_a_nan_in_a_batched_tensor_parallel_step_is_replayed_by_every_rank_that_met_it(runs):
    """Batched, no merge tells the ranks of rank 1's NaN at that step; fc2's all-reduce
    took it to every rank, so each met one in its own values and says so in the store:
    every rank replays its forward at once (one alone would wait in fc2's all-reduce),
    the origin is fc1's log on rank 1, gathered when the batch lands, and no rank stalls."""
    rep, printed = runs["tp_nan_batched"]
    info = rep["run"]["distributed"]
    assert "merge_stopped" not in info and info["batch_steps"] == 4
    (ev,) = [e for e in rep["run"]["events"] if e["type"] == "nonfinite_origin"]
    assert (ev["step"], ev["replay"], ev["source"]) == (3, "every rank (tensor parallel)", "replay")
    assert (ev["module"], ev["op"], ev["rank"], ev["ranks"], ev["world_size"]) == ("fc1", "log", 1, [1], 4)
    for numbers in printed:  # every rank's loss went NaN at step 3
        assert all(x != x for x in numbers["losses"][3:]) and all(x == x for x in numbers["losses"][:3])


@pytest.mark.slow
@pytest.mark.parametrize("program", ["tp", "fsdp_tp", "hsdp"])
def test_attention_log_z_and_dead_units_equal_one_process(runs, watched_oracle, program):
    """Each rank sees other heads (TP) or other rows (HSDP): the largest attention logit
    and log Z over the global batch are the largest over ranks, the entropies and log Z's
    mean the mean of equal shares. Dead fractions too: fc1's DEAD never-firing units are
    all on the first rank's shard under TP, and its RARE units fire on some steps on one
    data-parallel rank's rows only under FSDP2 x TP (dead on neither)."""
    rep, _ = runs[program]
    assert {"attn_max_logit/attn", "log_z_max"} <= set(watched_oracle)
    from dist_common import TPTransformer

    assert all(v > TPTransformer.DEAD / (2 * TPTransformer.DIM) for v in watched_oracle["dead_frac/fc1"])
    for key, want in watched_oracle.items():
        if key.startswith("dead_frac/") and key.replace("dead_frac/", "act_mean/") in ROW_PARALLEL \
                and key not in rep["series"]:
            continue  # a partial sum: no statistics
        got = rep["series"][key]["values"]
        assert got[:len(want)] == pytest.approx(want, rel=1e-5), key
