"""The recorder's parts at their edges, each on its own (the whole is tested on real
runs in the other files of this folder and across the suite)."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch

from gradvitals.probes import patches
from gradvitals.record import Record
from gradvitals.recorder import Recorder, TrainingEvents
from gradvitals.recorder.clock import StepClock
from gradvitals.recorder.losses import loss_divisor, step_loss
from gradvitals.recorder.staging import RING_STEPS, Staging


# ------------------------------------------------------------------ events
def test_every_event_of_the_interface_is_a_recorder_method_with_its_signature():
    events = [n for n, f in vars(TrainingEvents).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert len(events) >= 18
    for name in events:
        want = inspect.signature(getattr(TrainingEvents, name))
        got = inspect.signature(getattr(Recorder, name))
        assert list(got.parameters) == list(want.parameters), name


def test_the_patches_call_only_events_of_the_interface():
    source = Path(patches.__file__).read_text()
    called = set(re.findall(r'_each\("(\w+)"', source))
    assert called and called <= set(vars(TrainingEvents)), called - set(vars(TrainingEvents))


def test_a_patch_listener_gets_only_the_events_it_has():
    heard = []

    class OnlyBackwardEnd:
        def backward_end(self, tensor, seed=None):
            heard.append(seed)

        def fail(self, probe, exc):  # pragma: no cover - must not be called
            heard.append(("fail", probe))

    listener = OnlyBackwardEnd()
    handle = patches.install(listener)
    try:
        w = torch.ones(2, requires_grad=True)
        (w * 2).sum().backward()
        torch.nn.utils.clip_grad_norm_([w], 1.0)  # clip events: it has none, nothing fails
    finally:
        handle.remove()
        handle.remove()  # idempotent
    assert heard == [None]
    assert listener not in patches.active()


# ------------------------------------------------------------------- clock
def test_two_optimizers_make_one_step_per_cycle_once_the_cycle_is_learned():
    advanced = []
    clock = StepClock(advanced.append)
    live = {1, 2}
    for _ in range(3):
        for key in (1, 2):  # a GAN: D then G, every iteration
            clock.step_begins()
            clock.cycle_begins(key)
            clock.took(key)
            clock.step_ends(key, live, single=False)
    assert advanced == [1, 2, 3] and clock.cycle_last == 2
    clock.forget({1})  # G's optimizer was garbage-collected
    assert clock.cycle_last is None and clock.stepped == []


def test_an_open_step_counts_once_recorded():
    clock = StepClock(lambda step: None)
    clock.took(7)
    assert clock.taken(recorded_now=True) == 1
    assert clock.taken(recorded_now=False) == 0


# ----------------------------------------------------------------- staging
class _Owner:
    merger = None

    def fail(self, probe, exc):  # pragma: no cover - a failure fails the test
        raise exc


def test_flush_reads_scalars_and_vectors_into_their_series_and_flags_watched_nans_only():
    rec = Record(cap=64)
    st = Staging(_Owner(), rec)
    seen = []
    st.on_nonfinite = seen.extend
    st.pending.append((0, ["loss"], [torch.tensor(2.5)]))
    st.pending.append((0, ["update_ratio/a", "update_ratio/b"], torch.tensor([0.1, math.nan])))
    st.pending.append((0, ["act_mean/l", "act_std/l"], torch.tensor([0.0, math.inf])))
    st.flush()
    st.drain()
    assert rec.series["loss"].last_value == 2.5
    assert rec.series["update_ratio/a"].last_value == pytest.approx(0.1)
    assert math.isnan(rec.series["update_ratio/b"].last_value)  # recorded, but not a watched quantity
    assert seen == [(0, "act_std/l", math.inf)]
    assert not st.pending


def test_gradient_norms_wait_in_the_ring_and_reach_their_series_in_step_order():
    rec = Record(cap=1000)
    st = Staging(_Owner(), rec)
    keys = ["grad_norm/w", "grad_norm/b"]
    for step in range(RING_STEPS + 3):
        st.pending.append((step, keys, [torch.tensor(float(step)), torch.tensor(3.0)]))
        st.flush()
    assert len(rec.series["grad_norm_global"]) == RING_STEPS + 3  # at once: the status line reads it
    assert len(rec.series["grad_norm/w"]) == RING_STEPS  # one bulk extend, the rest waits
    st.drain()
    assert list(rec.series["grad_norm/w"].steps) == list(range(RING_STEPS + 3))
    assert rec.series["grad_norm_global"].last_value == pytest.approx(math.hypot(RING_STEPS + 2, 3.0))


# ------------------------------------------------------------------ losses
def test_the_divisor_of_an_accumulation_loss_is_read_without_a_sync():
    w = torch.ones(3, requires_grad=True)
    loss = (w * 2).sum()
    assert loss_divisor(loss / 4) == 4.0
    assert loss_divisor(loss * 0.25) == 4.0
    assert loss_divisor(loss / w.sum()) is None  # divided by something trained: not a count
    assert loss_divisor(loss) is None


def test_step_loss_sums_terms_of_one_forward_and_averages_micro_batches():
    a, b = torch.tensor(1.0), torch.tensor(3.0)
    a._gv_fwd, b._gv_fwd = 1, 1
    assert step_loss([a, b]).item() == 4.0  # loss_a + loss_b of one forward
    c, d = torch.tensor(1.0), torch.tensor(3.0)
    c._gv_fwd, d._gv_fwd = 1, 2
    assert step_loss([c, d]).item() == 2.0  # two micro-batches: their mean
    c._gv_div = d._gv_div = 2.0
    assert step_loss([c, d]).item() == 4.0  # each divided by their number: their sum


def test_isolated_forward_leaves_rng_and_buffers_as_they_were():
    from gradvitals.probes.isolated import isolated

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5))
    x = torch.randn(16, 4)
    before = [b.clone() for b in model.buffers()]
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    with pytest.raises(RuntimeError, match="boom"):
        with isolated(model) as buffers:
            model(x)  # dropout draws, BatchNorm updates its running statistics
            assert not torch.equal(buffers[0], before[0])
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(5), expected)
    for b, s in zip(model.buffers(), before):
        assert torch.equal(b, s)
