"""Soak: a synthetic long run over many layers fed straight into ``Record.add``, the
way the recorder fills it, to show the record's memory and the report's size stay flat
whatever the run's length.

    python tests/reliability/soak.py --steps 1000000 --layers 100   # README numbers
    python tests/reliability/soak.py --steps 20000 --layers 20      # quick

Per step (as the recorder does with the default schedule): the loss, the global
gradient norm and one gradient norm per layer; every ``--every`` steps six activation
series per layer, its weight norm and update ratio. Values drift, spike and go NaN
now and then. Memory is traced with ``tracemalloc`` (Python allocations: the record
is pure Python), sampled at checkpoints, so "flat" is the traced memory at 10%, 50%
and 100% of the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tracemalloc

from gradvitals.record import Record
from gradvitals.report import Report

SCHEDULED = ("act_mean", "act_std", "act_zero_frac", "act_sat_frac", "act_nonfinite_frac", "dead_frac",
             "weight_norm", "update_ratio")


def soak(steps: int, layers: int, every: int = 25, cap: int | None = None) -> dict:
    """Fill a Record for ``steps`` steps; return memory checkpoints and report size."""
    rec = Record() if cap is None else Record(cap=cap)
    names = [f"blocks.{i}.linear" for i in range(layers)]
    grad_keys = [f"grad_norm/{n}.weight" for n in names]
    sched_keys = [[f"{q}/{n}" for q in SCHEDULED] for n in names]
    add = rec.add
    checkpoints = {max(1, steps // 10): "10%", max(1, steps // 2): "50%", steps: "100%"}
    memory: dict[str, int] = {}
    tracemalloc.start()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = 2.0 * math.exp(-step / (steps / 3 + 1)) + (50.0 if step % 100_003 == 7 else 0.0)
        add("loss", step, math.nan if step % 250_007 == 11 else loss)
        total = 0.0
        for i, key in enumerate(grad_keys):
            g = 1e-3 * (i + 1) * (1.0 + 0.1 * math.sin(step * 0.01 + i))
            add(key, step, g)
            total += g * g
        add("grad_norm_global", step, math.sqrt(total))
        if step % every == 0:
            for i, keys in enumerate(sched_keys):
                for j, key in enumerate(keys):
                    add(key, step, 0.1 * (j + 1) + 1e-4 * i + 1e-7 * step)
        if step + 1 in checkpoints:
            rec.steps = step + 1
            memory[checkpoints[step + 1]] = tracemalloc.get_traced_memory()[0]
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rec.steps = steps
    rec.run["steps"] = steps
    t1 = time.perf_counter()
    report = Report.from_record(rec)
    text = json.dumps(report.to_json(), allow_nan=False, separators=(",", ":"))
    return {
        "steps": steps, "layers": layers, "series": len(rec.series),
        "adds": sum(s.count for s in rec.series.values()),
        "points_kept_max": max(len(s) for s in rec.series.values()),
        "traced_memory_bytes": memory, "traced_peak_bytes": peak,
        "report_bytes": len(text.encode()), "fill_s": round(elapsed, 1),
        "diagnose_and_json_s": round(time.perf_counter() - t1, 1),
        "findings": report.codes,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    a = p.parse_args(argv)
    print(json.dumps(soak(a.steps, a.layers, a.every), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
