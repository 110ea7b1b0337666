"""Time from SIGTERM to the report on disk for a long run's record.

A scheduler's preemption sends SIGTERM and, after a grace period (often ~30 s), SIGKILL:
the final report must be written well inside it. This starts ``gradvitals run --json``
on a script (this file, ``--child``) that trains a small model for a few steps and then
grafts into its own live record a synthetic ``--steps`` x ``--layers`` record (the shape
a 1,000,000-step run over 100 layers leaves: every series decimated to its cap, built
the way tests/reliability/soak.py fills one), sends it SIGTERM, and times how long the
report takes to land (the path's file appears) and the process to exit.

    python benchmarks/final_write.py                       # 1M steps x 100 layers, 3 rounds
    python benchmarks/final_write.py --html                # and the HTML report after it
    python benchmarks/final_write.py --autosave 1          # a save in flight at the SIGTERM

With ``--autosave 0`` (default here) the file appears only with the final write; with
autosave on, an autosave of the big record is being diagnosed in the background when
the SIGTERM lands (the worst case), and the time to exit is the measure.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

SCHEDULED = ("act_mean", "act_std", "act_zero_frac", "act_sat_frac", "act_nonfinite_frac", "dead_frac")


def synthetic_record(steps: int, layers: int, every: int = 25):
    """A record of a ``steps``-step run over ``layers`` Linear layers, default schedule:
    per step the loss, global and per-parameter gradient norms; every ``every`` steps the
    activation statistics, weight norms and update ratios. One layer's series are fed
    through Series.append (so they decimate exactly as in a real run) and copied, scaled,
    for the others."""
    from gradvitals.record import LayerInfo, ParamInfo, Record, Series

    rec = Record()
    proto: dict[str, Series] = {}
    for key, stride in ([("grad_norm/{p}.weight", 1), ("grad_norm/{p}.bias", 1)]
                        + [(f"{q}/{{p}}.{w}", every) for q in ("weight_norm", "update_ratio") for w in ("weight", "bias")]
                        + [(f"{q}/{{p}}", every) for q in SCHEDULED]):
        s = Series(rec.cap)
        for step in range(0, steps, stride):
            s.append(step, 1e-2 * (1.0 + 0.1 * math.sin(step * 0.01)))
        proto[key] = s
    for i in range(layers):
        name = f"blocks.{i}.linear"
        params = [f"{name}.weight", f"{name}.bias"]
        rec.layers[name] = LayerInfo(name=name, kind="Linear", depth=i, params=params,
                                     activation_after="ReLU", out_features=256, model="model")
        for p, shape in zip(params, ([256, 256], [256])):
            rec.params[p] = ParamInfo(name=p, layer=name, shape=list(shape), numel=math.prod(shape), grad_seen=True,
                                      in_optimizer=True)
        f = 1.0 + 0.01 * i
        for key, s in proto.items():
            c = s.copy()
            c.values = array("d", (v * f for v in c.values))
            c.min, c.max, c.last_value = s.min * f, s.max * f, s.last_value * f
            rec.series[key.format(p=name)] = c
    for key in ("loss", "grad_norm_global", "lr/opt.0"):
        s = Series(rec.cap)
        for step in range(steps):
            s.append(step, 2.0 * math.exp(-step / (steps / 3 + 1)) + 0.1)
        rec.series[key] = s
    rec.steps = steps
    return rec


def child(a: argparse.Namespace) -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 8)

    def step() -> None:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()

    for _ in range(3):
        step()
    big = synthetic_record(a.steps, a.layers)
    recorder = next(o for o in gc.get_objects() if type(o).__name__ == "Recorder")
    recorder.record.series.update(big.series)
    recorder.record.layers.update(big.layers)
    recorder.record.params.update(big.params)
    recorder.step = recorder.record.steps = a.steps
    print("ready", flush=True)
    while True:  # steps go on (autosaves fall due at step boundaries) until the SIGTERM
        step()
        time.sleep(0.01)


def measure(a: argparse.Namespace, folder: Path) -> dict[str, float]:
    out = folder / "final.json"
    html = folder / "final.html"
    for p in (out, html):
        if p.exists():
            p.unlink()
    cmd = [sys.executable, "-m", "gradvitals", "run", "-q", "--autosave", str(a.autosave), "--json", str(out)]
    if a.html:
        cmd += ["--html", str(html)]
    cmd += [__file__, "--child", "--steps", str(a.steps), "--layers", str(a.layers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(a.wait)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    t_json = None
    while proc.poll() is None:
        if t_json is None and a.autosave == 0 and out.exists():
            t_json = time.perf_counter() - t0
        time.sleep(0.001)
    t_exit = time.perf_counter() - t0
    assert proc.returncode == 143, proc.returncode
    data = json.loads(out.read_text())
    assert data["run"]["complete"] is True and data["run"]["steps"] >= a.steps, data["run"].get("steps")
    res = {"json_on_disk_s": t_json, "exit_s": t_exit, "json_mb": out.stat().st_size / 2**20,
           "series": len(data["series"])}
    if a.html:
        res["html_mb"] = html.stat().st_size / 2**20
    return res


def autosave_cost(a: argparse.Namespace, folder: Path) -> dict[str, float]:
    """One autosave of the same record, in this process: the snapshot the training
    thread takes, and the diagnosis, serialisation and atomic write the background
    thread then does (timed here on the main thread, alone)."""
    from gradvitals.report import Report, write_atomic

    rec = synthetic_record(a.steps, a.layers)
    t0 = time.perf_counter()
    snap = rec.snapshot()
    t1 = time.perf_counter()
    report = Report.from_record(snap)
    t2 = time.perf_counter()
    text = json.dumps(report.to_json(), allow_nan=False, separators=(",", ":"))
    t3 = time.perf_counter()
    write_atomic(folder / "autosave.json", text)
    t4 = time.perf_counter()
    return {"snapshot_ms": 1e3 * (t1 - t0), "diagnose_s": t2 - t1, "serialise_s": t3 - t2, "write_s": t4 - t3,
            "background_s": t4 - t1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--html", action="store_true", help="also write the HTML report (after the JSON)")
    p.add_argument("--autosave", type=float, default=0.0, help="autosave interval (0: off, the file appears with the final write)")
    p.add_argument("--wait", type=float, default=1.0, help="seconds between 'ready' and the SIGTERM")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            res = measure(a, Path(d))
            rounds.append(res)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in res.items() if v is not None), flush=True)
        costs = [autosave_cost(a, Path(d)) for _ in range(a.rounds)]
    summary = {k: statistics.median(x[k] for x in rounds) for k in rounds[0] if rounds[0][k] is not None}
    per_save = {k: statistics.median(x[k] for x in costs) for k in costs[0]}
    print("one autosave of this record (median): " + ", ".join(f"{k} {v:.3f}" for k, v in per_save.items()))
    result = {"steps": a.steps, "layers": a.layers, "html": a.html, "autosave_s": a.autosave,
              "rounds": rounds, "median": summary, "autosave_cost": costs, "autosave_cost_median": per_save, "cpus": os.cpu_count(),
              "load_avg": os.getloadavg(), "command": " ".join(["benchmarks/final_write.py", *(argv or sys.argv[1:])])}
    print("median: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
