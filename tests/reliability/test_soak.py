"""Memory stays flat whatever the run's length (the full 1,000,000-step x 100-layer
soak is tests/reliability/soak.py; its numbers are in README.md "Reliability")."""

from __future__ import annotations

import gc
import importlib.util
import json
import tracemalloc
from pathlib import Path

import torch
from torch import nn

import gradvitals as gv

_spec = importlib.util.spec_from_file_location("gv_reliability_soak", Path(__file__).resolve().parent / "soak.py")
soak_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak_module)

#: Growth of traced memory allowed between 10% and 100% of a run whose series are all
#: at their cap: array slack and dict resizes, not a per-step leak (which would be
#: thousands of points x 16 bytes x series).
FLAT_SLACK_BYTES = 64 * 1024


def test_synthetic_soak_memory_is_flat_and_report_bounded():
    """30,000 steps x 20 layers with cap=64: every series is at its cap by 10% of the run."""
    cap = 64
    r = soak_module.soak(steps=30_000, layers=20, every=25, cap=cap)
    mem = r["traced_memory_bytes"]
    assert mem["100%"] - mem["10%"] < FLAT_SLACK_BYTES, mem
    assert mem["100%"] - mem["50%"] < FLAT_SLACK_BYTES, mem
    assert r["points_kept_max"] < cap
    assert r["adds"] == 30_000 * (20 + 2) + (30_000 // 25) * 20 * len(soak_module.SCHEDULED)
    # the report: every series holds < cap points (+ its last), ~30 bytes a point
    assert r["report_bytes"] < r["series"] * cap * 40 + 100_000
    assert "nonfinite" in r["findings"]  # the injected NaN was not decimated away


def test_real_watch_memory_is_flat():
    """A real gv.watch run: what the recorder holds in Python does not grow per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    marks = {}
    tracemalloc.start()
    try:
        with gv.watch(model, opt, cap=32, every=5) as w:
            for step in range(1, 1501):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step in (500, 1500):
                    gc.collect()
                    marks[step] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    rec = w.record
    assert rec.steps == 1500
    assert all(len(s) < 32 for s in rec.series.values())
    assert marks[1500] - marks[500] < FLAT_SLACK_BYTES, marks
    assert not w._recorder.staging.pending and not w._recorder.losses.pending
    assert len(json.dumps(w.report(), allow_nan=False)) < 200_000
