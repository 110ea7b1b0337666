"""Run segments: models trained one after another in one run (k-fold, restarts) are
judged each on its own. The pure part (Record.segments / Record.segment) at its
edges, and the recorder's cut on real training: only a model trained from scratch
after others starts a segment."""

from __future__ import annotations

import math

import torch
from torch import nn

import gradvitals as gv
from gradvitals.record import LayerInfo, ParamInfo, Record


def _record(steps: int, events: list[dict]) -> Record:
    r = Record(steps=steps)
    for model in ("a", "b"):
        r.layers[f"{model}:0"] = LayerInfo(name=f"{model}:0", kind="Linear", model=model, params=[f"{model}:0.weight"])
        r.params[f"{model}:0.weight"] = ParamInfo(name=f"{model}:0.weight", layer=f"{model}:0", shape=[2, 2], numel=4)
    for s in range(steps):
        r.add("loss", s, 2.0 - 0.01 * (s % 10))
        r.add("grad_norm/a:0.weight" if s < 10 else "grad_norm/b:0.weight", s, 1.0)
    r.events.extend(events)
    return r


def test_no_cut_is_one_segment_and_bad_cuts_are_ignored():
    assert _record(20, []).segments() == [(0, 20, [])]
    # step 0 (models trained together from the start) and past the end: no cut
    r = _record(20, [{"type": "segment", "step": 0, "models": ["b"]},
                     {"type": "segment", "step": 20, "models": ["b"]},
                     {"type": "segment", "models": ["b"]}])
    assert r.segments() == [(0, 20, [])]


def test_cuts_at_one_step_merge_their_models():
    r = _record(30, [{"type": "segment", "step": 10, "models": ["b"]},
                     {"type": "segment", "step": 10, "models": ["c"]}])
    assert r.segments() == [(0, 10, []), (10, 30, ["b", "c"])]


def test_a_segment_keeps_its_steps_and_its_models_only():
    r = _record(20, [{"type": "segment", "step": 10, "models": ["b"]}, {"type": "init_audit", "step": 12},
                     {"type": "run_note"}])
    r.add("grad_norm_global", 15, math.inf)
    (s0, e0, m0), (s1, e1, m1) = r.segments()
    first = r.segment(s0, e0, m0)  # its models found from its gradient norms
    assert set(first.layers) == {"a:0"} and set(first.params) == {"a:0.weight"}
    assert list(first.get("loss").steps) == list(range(10)) and first.steps == 10
    assert "grad_norm/b:0.weight" not in first.series and first.get("grad_norm_global") is None
    assert [e.get("type") for e in first.events] == ["run_note"]
    second = r.segment(s1, e1, m1)
    assert set(second.layers) == {"b:0"} and second.steps == 10
    assert list(second.get("loss").steps) == list(range(10, 20))
    assert second.get("grad_norm_global").first_nonfinite_step == 15
    assert [e.get("type") for e in second.events] == ["segment", "init_audit", "run_note"]
    assert len(r.get("loss").steps) == 20  # the record itself is untouched


def _train(model, opt, x, steps):
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_only_a_model_trained_from_scratch_after_others_cuts():
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    first = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    second = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(first[2].parameters(), lr=0.01)
    opt2 = torch.optim.SGD(first[0].parameters(), lr=0.01)
    opt3 = torch.optim.SGD(second.parameters(), lr=0.01)
    with gv.watch([first, second], [opt, opt2, opt3]) as w:
        _train(first, opt, x, 5)
        # a second optimizer for more layers of the model already training: no cut
        for _ in range(5):
            opt.zero_grad()
            opt2.zero_grad()
            first(x).pow(2).mean().backward()
            opt.step()
            opt2.step()
        start = w.step
        # a fresh model with its own optimizer after it: a cut, at the step it starts
        _train(second, opt3, x, 5)
    cuts = [(e["step"], e["models"]) for e in w.record.events_of("segment")]
    assert cuts == [(start, ["Sequential1"])], (cuts, start)  # the second of two Sequentials


def test_a_model_joining_a_run_that_goes_on_is_no_restart():
    """The cut's models start while the earlier ones keep training (a model created
    late, trained beside the first): one segment, judged as one run."""
    r = _record(20, [{"type": "segment", "step": 10, "models": ["b"]}])
    for s in range(10, 20):
        r.add("grad_norm/a:0.weight", s, 1.0)  # a goes on
    assert r.segments() == [(0, 20, [])]
