"""The merge in one process (a one-rank gloo group), with a recorder that has only
public names."""

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


def test_a_nan_in_a_value_of_the_ranks_own_batch_names_the_rank(one_rank_group, monkeypatch):
    rec = _Recorder({})
    merger = distributed.Merger(rec)
    monkeypatch.setattr(merger, "_allreduce", lambda buf: None)
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
