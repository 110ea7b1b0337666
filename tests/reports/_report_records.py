"""Hand-built records for the renderer tests (plain data, no torch)."""

from __future__ import annotations

import math
from array import array

from gradvitals.findings import Finding
from gradvitals.record import LayerInfo, ParamInfo, Record, Series
from gradvitals.report import Report


def mlp_record(depth: int = 4, steps: int = 10, *, scale=lambda layer, step: 10.0 ** (layer - 4),
               every: int = 5) -> Record:
    """``depth`` Linear layers (each with weight + bias) followed by sigmoid modules;
    grad_norm/<param> = scale(layer, step) (bias at half the weight's), every step."""
    rec = Record()
    d = 0
    for i in range(depth):
        name = f"net.{2 * i}"
        params = [f"{name}.weight", f"{name}.bias"]
        rec.layers[name] = LayerInfo(name=name, kind="Linear", depth=d, params=params,
                                     activation_after="Sigmoid", out_features=8)
        rec.layers[f"net.{2 * i + 1}"] = LayerInfo(name=f"net.{2 * i + 1}", kind="Sigmoid", depth=d + 1)
        d += 2
        for p in params:
            rec.params[p] = ParamInfo(name=p, layer=name, shape=[8, 8], numel=64)
    for step in range(steps):
        total = 0.0
        for i in range(depth):
            v = scale(i, step)
            rec.add(f"grad_norm/net.{2 * i}.weight", step, v)
            rec.add(f"grad_norm/net.{2 * i}.bias", step, v / 2)
            total += 1.25 * v * v
        rec.add("grad_norm_global", step, math.sqrt(total))
        rec.add("loss", step, 2.3 - 0.01 * step)
        if step % every == 0:
            for i in range(depth):
                rec.add(f"update_ratio/net.{2 * i}.weight", step, 1e-3 * (i + 1))
                rec.add(f"act_std/net.{2 * i + 1}", step, 0.5 / (i + 1))
                rec.add(f"act_sat_frac/net.{2 * i + 1}", step, 0.1 * i)
    rec.steps = steps
    rec.run.update({"command": "gradvitals run train.py --lr 0.1", "torch_version": "2.13.0+cpu",
                    "devices": ["cuda:0"], "duration_s": 12.5, "steps": steps})
    return rec


def report_of(rec: Record, findings: list[Finding] = ()) -> dict:
    return Report(record=rec, findings=list(findings)).to_json()


def clone_series(base: Series, factor: float) -> Series:
    """A copy of a (decimated) series with values scaled: builds 100-layer records fast."""
    s = Series(cap=base.cap)
    s.steps = array("q", base.steps)
    s.values = array("d", (v * factor for v in base.values))
    s.stride, s.count = base.stride, base.count
    s.min, s.max = base.min * factor, base.max * factor
    s.max_step, s.last_step, s.last_value = base.max_step, base.last_step, base.last_value * factor
    return s
