"""Importers, coverage and `gradvitals diagnose` on small hand-written logs (no torch).

The logs are written as their libraries write them (HF's log_history entries,
Lightning's sparse metrics.csv rows): the real runs are in test_import_real.py."""

from __future__ import annotations

import json
import math
import random

import pytest
from click.testing import CliRunner

from gradvitals.cli import main
from gradvitals.coverage import coverage
from gradvitals.diagnose import diagnose
from gradvitals.findings import CODES
from gradvitals.importers import LogError, load_any
from gradvitals.rules.requirements import REQUIRES


def lightning_csv(path, layer_scale, steps=40, seed=0):
    """A metrics.csv as Lightning's CSVLogger writes grad_norm() and self.log: one row per
    log call, header sorted as text (layers.10 before layers.2)."""
    rng = random.Random(seed)
    names = [f"layers.{i}.weight" for i in range(len(layer_scale))]
    cols = sorted(["epoch", "step", "train_loss_step", "grad_2.0_norm_total"]
                  + [f"grad_2.0_norm/{n}" for n in names] + [f"grad_2.0_norm/layers.{i}.bias" for i in range(2)])
    lines = [",".join(cols)]
    for s in range(steps):
        row = {c: "" for c in cols}
        row.update(epoch="0", step=str(s))
        norms = {f"grad_2.0_norm/{n}": sc * (1 + 0.2 * rng.random()) for n, sc in zip(names, layer_scale)}
        row.update({k: repr(v) for k, v in norms.items()})
        row["grad_2.0_norm_total"] = repr(math.sqrt(sum(v * v for v in norms.values())))
        lines.append(",".join(row[c] for c in cols))
        loss_row = {c: "" for c in cols}
        loss_row.update(epoch="0", step=str(s), train_loss_step=repr(2.3 - 0.01 * s + 0.05 * rng.random()))
        lines.append(",".join(loss_row[c] for c in cols))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def hf_state(path, losses, grad_norms=None, logging_steps=1):
    history = [{"step": (i + 1) * logging_steps, "epoch": 0.1 * i, "loss": l, "learning_rate": 1e-3,
                **({"grad_norm": grad_norms[i]} if grad_norms else {})} for i, l in enumerate(losses)]
    history.append({"step": len(losses) * logging_steps, "eval_loss": 9.0})
    history.append({"step": len(losses) * logging_steps, "train_runtime": 1.0, "train_loss": 50.0})
    path.write_text(json.dumps({"log_history": history, "logging_steps": logging_steps, "global_step": 0}))
    return path


# 12 layers from the input: the first ones' gradients 1e-4 of the head's (sigmoid stack)
VANISHING = [10 ** (-4 + 4 * i / 11) for i in range(12)]
HEALTHY = [0.5 + 0.1 * (i % 3) for i in range(12)]


def test_vanishing_from_lightning_gradient_norm_columns_alone(tmp_path):
    # Fails on the code before: without weight norms the depth profile had no step.
    imported = load_any(lightning_csv(tmp_path / "v" / "version_0" / "metrics.csv", VANISHING))
    assert imported.format == "lightning_csv"
    params = [p for p in imported.record.params if p.endswith("weight")]
    assert params == [f"layers.{i}.weight" for i in range(12)]  # numeric order, not the header's
    found = {f.code: f for f in diagnose(imported.record)}
    assert "vanishing_gradients" in found
    assert found["vanishing_gradients"].layers[0] in ("layers.0", "layers.1", "layers.2")
    assert found["vanishing_gradients"].evidence["gap_orders"] > 2


def test_live_record_without_weight_norms_keeps_its_silence(tmp_path):
    # A live run with no optimizer has no weight norms: its depth profile is not
    # switched to absolute norms (only an imported log's is).
    record = load_any(lightning_csv(tmp_path / "metrics.csv", VANISHING)).record
    del record.run["imported"]
    assert "vanishing_gradients" not in [f.code for f in diagnose(record)]


def test_healthy_twin_same_columns_no_warning(tmp_path):
    imported = load_any(lightning_csv(tmp_path / "metrics.csv", HEALTHY))
    assert [f.code for f in diagnose(imported.record) if f.severity != "info"] == []


def test_hf_conventions_steps_from_zero_eval_and_summary_ignored(tmp_path):
    imported = load_any(hf_state(tmp_path / "trainer_state.json", [2.0, 1.8, 1.7], [1.0, 0.9, 0.8]))
    r = imported.record
    assert imported.sources == {"loss": "loss", "grad_norm_global": "grad_norm", "lr": "learning_rate"}
    assert list(zip(*r.get("loss").points())) == [(0, 2.0), (1, 1.8), (2, 1.7)]  # not train_loss's 50
    assert "eval_loss" in imported.ignored and r.steps == 3


def test_hf_output_dir_reads_the_newest_checkpoint(tmp_path):
    for n, losses in ((5, [1.0]), (10, [1.0, 2.0])):
        (tmp_path / f"checkpoint-{n}").mkdir()
        hf_state(tmp_path / f"checkpoint-{n}" / "trainer_state.json", losses)
    imported = load_any(tmp_path)
    assert imported.path.endswith("checkpoint-10/trainer_state.json")  # 10 after 5, not as text


@pytest.mark.parametrize("key, series", [
    ("train/loss", "loss"), ("Loss/train", "loss"), ("train_loss_step", "loss"), ("training_loss", "loss"),
    ("train/grad_norm", "grad_norm_global"), ("grad_2.0_norm_total", "grad_norm_global"),
    ("grad_2.0_norm/enc.Layer.0.weight", "grad_norm/enc.Layer.0.weight"), ("lr-AdamW", "lr/AdamW"),
    ("gradvitals/grad_norm/0.weight", "grad_norm/0.weight"), ("weight_norm/fc.weight", "weight_norm/fc.weight"),
    ("val_loss", None), ("train_loss_epoch", None), ("eval/loss", None), ("accuracy", None), ("epoch", None),
])
def test_name_conventions(tmp_path, key, series):
    from gradvitals.importers.names import parse_mapping, series_for

    assert series_for(key, parse_mapping({})) == series


def test_map_overrides_and_errors(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text("\n".join(json.dumps({"iteration": i, "objective": 1.0 / (i + 1), "gnorm": 2.0,
                                       "grads/a.weight": 1.0}) for i in range(5)))
    with pytest.raises(LogError, match="no training loss"):
        load_any(p)
    imported = load_any(p, {"objective": "loss", "gnorm": "grad_norm", "grads/*": "grad_norm"})
    assert set(imported.record.series) == {"loss", "grad_norm_global", "grad_norm/a.weight"}
    assert imported.record.get("loss").points()[0] == [0, 1, 2, 3, 4]
    with pytest.raises(LogError, match="unknown quantity 'gradnorm'"):
        load_any(p, {"gnorm": "gradnorm"})


def test_resumed_log_later_values_win_and_long_logs_stay_bounded(tmp_path):
    p = tmp_path / "log.jsonl"
    rows = [{"step": s, "loss": 1.0} for s in range(10)] + [{"step": s, "loss": 2.0} for s in range(5, 8)]
    p.write_text("\n".join(map(json.dumps, rows)))
    steps, values = load_any(p).record.get("loss").points()
    assert steps == list(range(10)) and values == [1.0] * 5 + [2.0] * 3 + [1.0] * 2
    long = tmp_path / "long.csv"
    long.write_text("step,loss\n" + "".join(f"{s},{1 + (s % 7) / 10}\n" for s in range(20000)))
    s = load_any(long).record.get("loss")
    assert s.count == 20000 and len(s.steps) < 1000 and s.max == pytest.approx(1.6)


def test_coverage_comes_from_the_rules_inputs_not_the_format(tmp_path):
    assert set(REQUIRES) == set(CODES)
    hf = load_any(hf_state(tmp_path / "trainer_state.json", [2.0 - 0.01 * i for i in range(30)],
                           [1.0] * 30, logging_steps=10)).record
    cov = coverage(hf)
    checks = cov["checks"]
    assert checks["loss_spike"]["ran"] and checks["exploding_gradients"]["ran"]
    assert any("logged every 10 steps: spikes shorter than that are invisible" in n
               for n in checks["loss_spike"]["notes"])
    assert not checks["vanishing_gradients"]["ran"]
    assert checks["vanishing_gradients"]["why"] == "no per-layer gradient norms"
    assert not checks["grad_not_zeroed"]["ran"] and "live run" in checks["grad_not_zeroed"]["why"]
    # The same kind of file with per-parameter columns: the per-layer check runs.
    lt = load_any(lightning_csv(tmp_path / "metrics.csv", HEALTHY)).record
    assert coverage(lt)["checks"]["vanishing_gradients"]["ran"]
    assert "grad_norm/*" in coverage(lt)["checks"]["vanishing_gradients"]["data"]


def _invoke(args):
    return CliRunner().invoke(main, ["diagnose", *map(str, args)])


def test_diagnose_cli_writes_coverage_in_the_json(tmp_path):
    src = lightning_csv(tmp_path / "logs" / "version_0" / "metrics.csv", VANISHING)
    out = tmp_path / "r.json"
    result = _invoke([src.parent.parent, "--json", out])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [f["code"] for f in data["findings"]][:1] == ["vanishing_gradients"]
    assert data["coverage"]["source"]["format"] == "lightning_csv"
    assert data["coverage"]["checks"]["dead_relu"]["ran"] is False
    assert "Checked (5 of" in result.stderr and "vanishing_gradients" in result.stderr
    from gradvitals.report import Report
    from gradvitals.reports.html import heatmap_data

    assert Report.load(out).record.steps == 40  # the report contract still reads
    # The renderers read it unchanged: one heatmap row per layer, in the stack's order.
    assert [l["name"] for l in heatmap_data(data)["layers"]][:3] == ["layers.0", "layers.1", "layers.2"]


def _random_bytes(n, seed=1):
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize("name, content, problem", [
    ("trainer_state.json", lambda: json.dumps({"log_history": [{"step": 1, "loss": 2.0}] * 20})[:150],
     "cut off"),
    ("run.json", lambda: json.dumps({"schema": "gradvitals.report/1", "run": {}, "layers": [], "series": {},
                                     "findings": []})[:60], "cut off"),
    ("metrics.csv", lambda: _random_bytes(4000), "not a text file"),
    ("events.out.tfevents.1.host", lambda: _random_bytes(4000), "not a TensorBoard event file"),
])
def test_malformed_log_one_line_nonzero_nothing_written(tmp_path, name, content, problem):
    data = content()
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    out, html = tmp_path / "out.json", tmp_path / "out.html"
    result = _invoke([p, "--json", out, "--html", html])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"gradvitals: error: {p}: ") and problem in lines[0]
    assert "Traceback" not in result.output and not out.exists() and not html.exists()
    assert [x.name for x in tmp_path.iterdir()] == [name]  # no temporary file left either


def test_diagnose_cli_usage_errors(tmp_path):
    src = hf_state(tmp_path / "trainer_state.json", [1.0, 0.9])
    bad = _invoke([src, "--map", "x=gradnorm"])
    assert bad.exit_code == 2 and "unknown quantity 'gradnorm'" in bad.stderr
    two = _invoke([src, src, "--json", tmp_path / "x.json"])
    assert two.exit_code == 2 and "single PATH" in two.stderr


def test_report_with_coverage_validates_against_the_schema(tmp_path):
    import jsonschema

    from gradvitals.report import schema

    out = tmp_path / "r.json"
    assert _invoke([hf_state(tmp_path / "trainer_state.json", [1.0, 0.9, 0.8]), "--json", out]).exit_code == 0
    data = json.loads(out.read_text())
    jsonschema.validate(data, schema())
    data["coverage"]["checks"]["loss_spike"]["ran"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema())
