"""The merge reads how each value combines from the quantity table, in one process: a
one-rank gloo group, and a second rank that recorded the same values (the sum of two
equal buffers). Every merged value must come back as recorded, in its key's place."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from gradvitals import distributed
from gradvitals.record import Record


class _Recorder:
    """The public names the merge uses, and nothing else (no private attribute)."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.models: list = []
        self.record = Record()
        self.version = 0
        self.step = 3
        self.merger = None
        self.failed: list = []
        self._masks = masks

    def ever_active(self, name: str) -> torch.Tensor | None:
        return self._masks.get(name)

    def fail(self, probe: str, exc: BaseException) -> None:
        self.failed.append((probe, exc))


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _stats(name: str, *extra: str) -> list[str]:
    return [f"{q}/{name}" for q in ("act_mean", "act_std", "act_zero_frac", "act_sat_frac",
                                    "act_nonfinite_frac", *extra)]


def _pending() -> list[tuple[int, list[str], torch.Tensor]]:
    return [
        (3, ["loss"], torch.tensor([2.5])),
        (3, ["grad_norm/a.weight", "grad_norm/a.bias"], torch.tensor([3.0, 4.0])),
        (3, ["grad_norm_global"], torch.tensor([0.0])),
        (3, _stats("a", "dead_frac"), torch.tensor([0.5, 2.0, 0.25, 0.0, 0.0, 0.9])),  # measured alone
        (3, _stats("b") + _stats("c"), torch.tensor([1.0, 3.0, 0.1, 0.2, 0.0, -1.0, 0.5, 0.0, 0.0, 0.3])),
        (3, ["dead_frac/b", "dead_frac/c"], torch.tensor([0.25, 0.75])),  # measured with others
        (3, ["lr/opt.0", "clip_total_norm"], torch.tensor([0.1, 7.0])),
    ]


@pytest.mark.parametrize("ranks", [1, 2])
def test_each_value_merges_by_its_quantity_and_comes_back_in_its_place(one_rank_group, monkeypatch, ranks):
    rec = _Recorder({"a": torch.tensor([True, False, False, True]), "b": torch.tensor([True, False, True, False])})
    merger = distributed.Merger(rec)
    merger.world = ranks
    sent = []

    def allreduce(buf, body=True):  # the other ranks recorded the very same values
        if body:
            sent.append(buf.numel())
        buf.mul_(ranks)

    monkeypatch.setattr(merger, "_allreduce", allreduce)
    pending = _pending()
    out = merger.merge(pending)
    assert [keys for _, keys, _ in out] == [keys for _, keys, _ in pending]
    got = {k: v for _, keys, vals in out for k, v in zip(keys, vals.tolist())}
    want = {k: v for _, keys, vals in pending for k, v in zip(keys, vals.tolist())}
    want["grad_norm_global"] = 5.0  # recomputed from the merged parameter norms
    want["dead_frac/a"] = 0.5  # from the recorder's "ever active" mask of a: 2 of 4 units never fired
    want["dead_frac/b"] = 0.5  # b's own window too, though measured with c (c has none: the mean)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    # one layout check, a flag per rank, 1 loss, 2 norms, 0 global, 6 + 4 mask flags for a,
    # 2 x 6 for b and c (moments + 3 fractions each), 4 mask flags for b and c's fraction, lr and clip
    assert sent == [1 + ranks + 1 + 2 + 0 + 6 + 4 + 12 + 4 + 1 + 2]
    assert not rec.failed and merger.bad_ranks == []


def test_an_item_of_no_values_merges_as_nothing_beside_the_others(one_rank_group, monkeypatch):
    """An optimizer holding no parameter (on this rank) stages an item with no keys: the
    merge failed on it (IndexError) and each rank recorded alone from then on."""
    rec = _Recorder({})
    merger = distributed.Merger(rec)
    monkeypatch.setattr(merger, "_allreduce", lambda buf, body=True: None)
    pending = [(0, [], torch.zeros(0)), (0, ["loss"], torch.tensor([2.5]))]
    out = merger.merge(pending)
    assert [(keys, vals.tolist()) for _, keys, vals in out] == [([], []), (["loss"], [2.5])]
    assert not rec.failed


def test_a_nan_in_a_value_of_the_ranks_own_batch_names_the_rank(one_rank_group, monkeypatch):
    rec = _Recorder({})
    merger = distributed.Merger(rec)
    monkeypatch.setattr(merger, "_allreduce", lambda buf, body=True: None)
    merger.merge([(0, ["grad_norm/a.weight"], torch.tensor([math.inf]))])
    assert merger.bad_ranks == []  # gradients are shared: a NaN there names no rank
    merger.merge([(0, _stats("a"), torch.tensor([0.0, math.nan, 0.0, 0.0, 0.0]))])
    assert merger.bad_ranks == [0]
    merger.merge([(1, ["loss/opt"], torch.tensor([math.nan]))])
    assert merger.bad_ranks == [0]


def test_the_merge_reads_no_private_name_of_the_recorder():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(distributed))
    private = sorted({ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and ast.unparse(n.value) in ("recorder", "rec", "self.recorder")
                      and n.attr.startswith("_")})
    private += sorted({ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
                       and ast.unparse(n.func) == "getattr" and len(n.args) > 1
                       and isinstance(n.args[1], ast.Constant) and str(n.args[1].value).startswith("_")})
    assert private == []


def test_maxima_merge_as_the_largest_over_ranks_beside_means(one_rank_group, monkeypatch):
    """Two ranks' attention and log Z values: a max logit and log Z's max come back as
    the larger of the two (a NaN on one rank, "no attention in its batch", is skipped),
    the entropies and log Z's mean as the mean; the maxima cost one slot per rank."""
    keys = ["attn_max_logit/blk", "attn_entropy/blk", "attn_entropy_uniform/blk"]
    per_rank = {0: [(3, keys, torch.tensor([12.0, 1.0, 2.0])), (3, ["log_z_mean", "log_z_max"], torch.tensor([4.0, 9.0])),
                    (3, ["attn_max_logit/b2", "attn_entropy/b2", "attn_entropy_uniform/b2"],
                     torch.tensor([math.nan, math.nan, math.nan]))],
                1: [(3, keys, torch.tensor([30.0, 3.0, 2.0])), (3, ["log_z_mean", "log_z_max"], torch.tensor([6.0, 7.0])),
                    (3, ["attn_max_logit/b2", "attn_entropy/b2", "attn_entropy_uniform/b2"],
                     torch.tensor([5.0, 0.5, 1.0]))]}
    other: list[torch.Tensor] = []
    mergers = {}
    for rank in (1, 0):
        merger = mergers[rank] = distributed.Merger(_Recorder({}))
        merger.world, merger.rank = 2, rank
        # The layout check (body=False) passes: the layouts agree. Rank 1's values are kept; it
        # then merges with an identical peer (its own result is unused).
        if rank == 1:
            monkeypatch.setattr(merger, "_allreduce",
                                lambda buf, body=True: (body and other.append(buf.clone()), buf.mul_(2)))
        else:
            monkeypatch.setattr(merger, "_allreduce",
                                lambda buf, body=True: buf.add_(other[0]) if body else buf.mul_(2))
        out = merger.merge(per_rank[rank])
    got = {k: v for _, ks, vals in out for k, v in zip(ks, vals.tolist())}
    assert got["attn_max_logit/blk"] == 30.0 and got["log_z_max"] == 9.0
    assert got["attn_entropy/blk"] == pytest.approx(2.0) and got["log_z_mean"] == pytest.approx(5.0)
    assert got["attn_max_logit/b2"] == 5.0  # rank 0 saw no attention there: rank 1's value
    assert math.isnan(got["attn_entropy/b2"])  # a mean with a NaN part is NaN, as before
    # layout check + 2 flags, then per item: 2 maxima x 2 slots + 2 means, 1 mean + 2 slots, as the first
    assert other[0].numel() == 1 + 2 + (2 + 2) + (1 + 2) + (2 + 2)
    assert not mergers[0].recorder.failed


def test_a_merge_that_never_lands_is_dropped_after_the_patience_not_waited_for(one_rank_group):
    """At the report, a merge in flight whose all-reduce never completes (a rank died
    before starting it) is given up after ``patience_s``: the report is not held."""
    import time

    class _NeverDone:
        waited = False

        def is_completed(self) -> bool:
            return False

        def wait(self, timeout=None):
            self.waited = True

    rec = _Recorder({})
    merger = distributed.Merger(rec)
    work = _NeverDone()
    merger.flight = distributed._Flight([(7, ["loss"], torch.tensor([1.0]))], [], [], [], torch.zeros(3),
                                        0.0, [], False, work)
    t0 = time.monotonic()
    assert merger.collect(patience_s=0.05) == []
    assert 0.05 <= time.monotonic() - t0 < 2
    assert not work.waited and merger.flight is None and merger.info["merge_dropped_step"] == 7
    assert merger.collect(patience_s=0.05) == []  # nothing in flight any more


class _Started:
    """An all-reduce started and, with ``done``, completed by the other ranks (which
    recorded the very same values: the sum of ``ranks`` equal buffers)."""

    def __init__(self, buf: torch.Tensor, done: bool, ranks: int) -> None:
        self.buf, self.done, self.ranks = buf, done, ranks

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout=None):
        self.buf.mul_(self.ranks)


def _batched(monkeypatch, done: bool) -> tuple[distributed.Merger, list[int]]:
    from gradvitals.recorder.options import Options

    rec = _Recorder({})
    rec.options = Options()
    merger = rec.merger = distributed.Merger(rec)
    merger.world = 2
    merger.calls = 1  # the first merge (always waited for) is behind
    sizes: list[int] = []

    def allreduce(buf, body=True, wait=True):
        sizes.append(buf.numel())
        work = _Started(buf, done, merger.world)
        if wait:
            work.wait()
            return None
        return work

    monkeypatch.setattr(merger, "_allreduce", allreduce)
    return merger, sizes


def test_ordinary_steps_are_sent_in_batches_and_come_back_in_step_order(one_rank_group, monkeypatch):
    merger, sizes = _batched(monkeypatch, done=True)
    assert merger.batch_k == 1 and merger._shares() == {} and merger.batch_k == distributed.BATCH_STEPS
    landed = []
    for step in range(1, 1 + distributed.BATCH_STEPS + 2):  # step 0 and 25 would be scheduled
        landed += distributed.collect_merged(merger.recorder)
        landed += merger.start([(step, ["grad_norm/a.weight", "grad_norm/b.weight"], torch.tensor([3.0, 4.0])),
                                (step, ["grad_norm_global"], torch.tensor([5.0])),
                                (step, ["loss"], torch.tensor([float(step)]))])
    # One all-reduce for the first batch_k steps: [signature, 2 flags, 3 values per step].
    assert sizes == [1 + 2 + 3 * distributed.BATCH_STEPS]
    assert [s for s, k, _ in landed if k == ["loss"]] == list(range(1, 1 + distributed.BATCH_STEPS))
    for step, keys, v in landed:
        want = {"loss": [float(step)], "grad_norm_global": [5.0]}.get(keys[0], [3.0, 4.0])
        assert v.tolist() == pytest.approx(want), (step, keys)
    assert merger.batch.steps == [9, 10]
    # A step with another layout (a clip call begins) sends the batch so far first.
    merger.start([(11, ["loss", "clip_total_norm"], torch.tensor([1.0, 2.0]))])
    assert sizes[-1] == 1 + 2 + 3 * 2 and merger.batch.steps == [11]
    assert merger.info["batches"] == 2


def test_a_batched_step_may_hold_an_item_of_no_values(one_rank_group, monkeypatch):
    merger, sizes = _batched(monkeypatch, done=True)
    merger._shares()
    landed = []
    for step in range(1, 1 + distributed.BATCH_STEPS):
        landed += merger.start([(step, [], torch.zeros(0)), (step, ["loss"], torch.tensor([float(step)]))])
    landed += distributed.collect_merged(merger.recorder)
    assert sizes == [1 + 2 + distributed.BATCH_STEPS]
    assert [(s, k, v.tolist()) for s, k, v in landed][:2] == [(1, [], []), (1, ["loss"], [1.0])]
    assert len(landed) == 2 * distributed.BATCH_STEPS and not merger.recorder.failed


def test_a_batch_whose_merge_never_comes_keeps_this_ranks_own_values(one_rank_group, monkeypatch):
    """At the end of the run the batch is sent padded to a full batch's size (gloo aborts
    on buffers of different sizes, should a rank still be training); if it never lands,
    this rank's own values are kept for those steps and the report says which."""
    merger, sizes = _batched(monkeypatch, done=False)
    for step in (3, 4):
        assert merger.start([(step, ["loss"], torch.tensor([float(step)]))]) == []
    assert sizes == []
    own = distributed.close_batch(merger.recorder, patience_s=0.05)
    assert sizes == [1 + 2 + distributed.BATCH_STEPS]  # padded
    assert [(s, k, v.tolist()) for s, k, v in own] == [(3, ["loss"], [3.0]), (4, ["loss"], [4.0])]
    assert merger.info["unmerged_steps"] == [3, 4] and merger.batch is None
