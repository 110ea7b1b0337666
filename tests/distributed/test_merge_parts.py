"""The pure parts of the distributed merge, in one process: moment arithmetic against
torch on the concatenated data, the stated cost, rank-0-only writing, wrapper names."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradvitals as gv
from gradvitals import distributed, torch_compat


@pytest.mark.parametrize("sizes", [(7, 7), (1, 30), (5, 11, 2)])
def test_moments_merged_from_parts_equal_torch_on_the_whole(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    parts = [torch.randn(n, generator=g) * (i + 1) + 3 * i for i, n in enumerate(sizes)]
    sums = sum(moment_terms_of(p) for p in parts)
    mean, std = distributed.moments_from_sums(sums)
    var, want_mean = torch.var_mean(torch.cat(parts).double(), correction=0)
    assert mean.item() == pytest.approx(want_mean.item(), rel=1e-6, abs=1e-9)
    assert std.item() == pytest.approx(var.sqrt().item(), rel=1e-5)


def moment_terms_of(x: torch.Tensor) -> torch.Tensor:
    var, mean = torch.var_mean(x, correction=0)
    return distributed.moment_terms(float(x.numel()), mean, var.sqrt())


def test_one_element_parts_have_zero_spread_each():
    sums = moment_terms_of(torch.tensor([2.0, 2.0])) + moment_terms_of(torch.tensor([4.0]))
    mean, std = distributed.moments_from_sums(sums)
    want = torch.tensor([2.0, 2.0, 4.0]).double()
    assert mean.item() == pytest.approx(want.mean().item())
    assert std.item() == pytest.approx(want.std(correction=0).item())


def test_cost_counts_tensors_and_units():
    base = distributed.allreduce_bytes(2, grad_tensors=10)
    assert base == 8 * (1 + 2 + 10 + 1 + 1)  # layout check, a flag per rank, norms, loss, lr
    scheduled = distributed.allreduce_bytes(2, grad_tensors=10, weight_tensors=10, modules=4, units=50)
    assert scheduled - base == 8 * (2 * 10 + 6 * 4 + 50)
    assert distributed.allreduce_bytes(8, grad_tensors=10) - base == 8 * 6


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for rank, written in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert distributed.writes_report() is written
        path = tmp_path / f"rank{rank}.json"
        with gv.watch(model, opt) as w:
            model(torch.randn(4, 3)).sum().backward()
            opt.step()
            w.save(path)
        assert path.exists() is written


def test_bad_timeout_names_the_variable(monkeypatch):
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
            distributed.timeout_s()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_s() == 2.5


def test_wrapped_model_reports_the_users_names_and_kinds():
    inner = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    wrapped = nn.DataParallel(inner)  # the same "module." wrapper as DDP, without a process group
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    with gv.watch(wrapped, opt, every=1) as w:
        wrapped(torch.randn(8, 4)).sum().backward()
        opt.step()
        rec = w.record
        assert sorted(rec.params) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert [l.name for l in rec.layers_in_order()] == ["0", "1", "2"]
        want = torch.linalg.vector_norm(inner[0].weight.grad).item()
        assert rec.series["grad_norm/0.weight"].last_value == pytest.approx(want, rel=1e-6)
        assert "act_mean/0" in rec.series and "distributed" not in rec.run  # one process: no merge


def test_fsdp_generated_class_reports_the_users_class():
    class FSDPModule:  # the shape of torch's generated class: FSDP<Name>(FSDPModule, <Name>)
        """Stands in for torch.distributed.fsdp.FSDPModule."""

    generated = type("FSDPLinear", (FSDPModule, nn.Linear), {})
    assert torch_compat.module_kind(generated(2, 2)) == "Linear"
    assert torch_compat.module_kind(nn.Linear(2, 2)) == "Linear"
    assert torch_compat.module_kind(type("FSDPThing", (nn.Module,), {})()) == "FSDPThing"


def _meeting(monkeypatch, arrivals: dict[int, float], patience_s: float, step: int = 3) -> dict[int, bool]:
    """Ranks (threads) meeting at ``step`` on one store, each arriving after its delay."""
    import threading
    import time

    store = dist.HashStore()
    monkeypatch.setattr(distributed, "default_store", lambda: store)
    out: dict[int, bool] = {}

    def rank(r: int, delay: float) -> None:
        time.sleep(delay)
        out[r] = distributed._meet(7, step, 3, patience_s)

    threads = [threading.Thread(target=rank, args=(r, d)) for r, d in arrivals.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_ranks_that_all_met_a_nan_replay_together(monkeypatch):
    assert _meeting(monkeypatch, {0: 0.0, 1: 0.05, 2: 0.1}, patience_s=5.0) == {0: True, 1: True, 2: True}


def test_a_rank_that_never_met_it_leaves_the_others_without_a_replay_after_their_patience(monkeypatch):
    import time

    t0 = time.monotonic()
    assert _meeting(monkeypatch, {0: 0.0, 1: 0.0}, patience_s=0.3) == {0: False, 1: False}
    assert 0.3 <= time.monotonic() - t0 < 3.0


def test_a_rank_arriving_after_another_gave_up_agrees_with_it(monkeypatch):
    """One verdict per step: a late rank may not replay while one that gave up trains on
    (their collectives would pair the replay's with the next step's)."""
    assert _meeting(monkeypatch, {0: 0.0, 1: 0.0, 2: 0.6}, patience_s=0.2) == {0: False, 1: False, 2: False}


def test_after_a_rank_gave_up_a_later_meeting_ends_at_once(monkeypatch):
    import time

    store = dist.HashStore()
    monkeypatch.setattr(distributed, "default_store", lambda: store)
    assert distributed._meet(7, 3, 2, 0.1) is False  # the other rank never came
    t0 = time.monotonic()
    assert distributed._meet(7, 4, 2, 5.0) is False  # it learned of the NaN a step later
    assert time.monotonic() - t0 < 1.0
