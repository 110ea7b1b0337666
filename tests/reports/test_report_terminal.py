"""Terminal report rendered to a fixed-width console; the CLI's NO_COLOR and --quiet."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from _report_records import mlp_record

from gradvitals.findings import Finding
from gradvitals.report import Report
from gradvitals.reports.terminal import layer_table, make_console, render

ANSI = re.compile(r"\x1b\[[0-9;]*m")
HERE = Path(__file__).resolve().parent


def _render(report: Report, width: int = 100, color: bool = False, **kw) -> str:
    console = make_console(io.StringIO(), width=width)
    if color:
        console = type(console)(file=io.StringIO(), width=width, force_terminal=True, color_system="standard")
    for r in render(report, **kw):
        console.print(r)
    return console.file.getvalue()


FINDINGS = [
    Finding(code="dead_relu", severity="warning", summary="64% of `net.2`'s units never fire.",
            advice="Use LeakyReLU in `net.2`.", step=40, layers=("net.2",), evidence={"dead_fraction": 0.64},
            caused_by="update_ratio_high"),
    Finding(code="update_ratio_high", severity="critical", summary="Updates are 10% of the weights.",
            advice="Lower the learning rate to 1e-3.", step=0, layers=("net.0", "net.2")),
]


def test_verdict_first_then_findings_in_report_order_then_layers_in_depth_order():
    from gradvitals.diagnose import order

    rep = Report(record=mlp_record(depth=4), findings=order(FINDINGS))
    out = _render(rep)
    lines = out.splitlines()
    assert lines[0].startswith("BROKEN: root cause update_ratio_high")
    assert out.index("update_ratio_high  step 0") < out.index("dead_relu  step 40")  # root cause first
    assert "Fix: Lower the learning rate to 1e-3." in out and "Use LeakyReLU in `net.2`." in out
    assert "net.0, net.2" in out and "a consequence of update_ratio_high" in out
    assert "evidence: " not in out.split("dead_relu")[0].splitlines()[-1]
    rows = [l.split()[0] for l in lines if re.match(r"^net\.\d+\s", l)]
    assert rows == ["net.0", "net.2", "net.4", "net.6"]
    assert all(len(l) <= 100 for l in lines)


def test_layer_table_values_and_log_bars():
    rec = mlp_record(depth=4, steps=3)  # layer i: weight 10^(i-4), bias half of it
    out = _render(Report(record=rec, findings=[]))
    row0 = next(l for l in out.splitlines() if l.startswith("net.0 "))
    row3 = next(l for l in out.splitlines() if l.startswith("net.6 "))
    assert f"{math.hypot(1e-4, 5e-5):.2e}" in row0 and f"{math.hypot(1e-1, 5e-2):.2e}" in row3
    assert row0.count("█") == 1 and row3.count("█") == 12  # log scale: 3 decades over 12 cells
    assert "Linear→Sigmoid" in row0
    assert "30%" in row3  # saturation of the Sigmoid after net.6 (0.1 * 3)
    assert "4.00e-03" in row3  # update ratio, last recorded


def test_nan_layers_say_since_when():
    rec = mlp_record(depth=2, steps=5, scale=lambda l, s: math.nan if s >= 3 else 1.0)
    out = _render(Report(record=rec, findings=[]))
    assert "NaN since 3" in out


def test_long_tables_are_elided_in_the_middle():
    rec = mlp_record(depth=40, steps=2)
    table = layer_table(rec, max_layers=10)
    assert table.row_count == 11
    out = _render(Report(record=rec, findings=[]), max_layers=10)
    assert "… 30 more layers …" in out and "net.0 " in out and "net.78 " in out and "net.20 " not in out


def test_colours_by_severity_and_none_with_no_color(monkeypatch):
    rep = Report(record=mlp_record(), findings=FINDINGS)
    coloured = _render(rep, color=True)
    assert "\x1b[1;31mCRITICAL" in coloured and "\x1b[33mWARNING" in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    console = make_console(io.StringIO(), width=100)
    console.print(rep)
    assert not ANSI.search(console.file.getvalue())


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gradvitals", *args], capture_output=True, text=True,
                          env=e, timeout=120)


def test_cli_run_prints_progress_and_summary_unless_quiet(tmp_path):
    script = str(HERE / "scripts" / "vanishing_sigmoid.py")
    out = _cli("run", "--json", str(tmp_path / "r.json"), script, "--steps", "6", env={"NO_COLOR": "1"})
    assert out.returncode == 0, out.stderr
    assert re.search(r"gradvitals  step \d+  loss \d\.\d+  grad norm \S+  findings: ", out.stderr)
    assert not ANSI.search(out.stderr) and "report written to" in out.stderr
    # not a terminal: plain lines, no carriage-return redraws
    assert "\r" not in out.stderr


def test_cli_run_quiet_prints_nothing_of_its_own(tmp_path):
    from click.testing import CliRunner

    from gradvitals.cli import main

    script = str(HERE / "scripts" / "vanishing_sigmoid.py")
    quiet = CliRunner().invoke(main, ["run", "-q", "--json", str(tmp_path / "q.json"), script, "--steps", "3"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout == ""
    assert (tmp_path / "q.json").exists()


def test_module_names_that_look_like_markup_are_printed_as_they_are():
    """ModuleDict keys are any string: "[/]" or "[bold red]x" in a module name made
    rich raise MarkupError and the whole terminal report fail to print."""
    from gradvitals.record import LayerInfo, ParamInfo, Record

    rec = Record()
    names = ["blocks.[/]", "blocks.[bold red]x", "blocks.<b>&amp;"]
    for d, name in enumerate(names):
        rec.layers[name] = LayerInfo(name=name, kind="Linear", depth=d, params=[f"{name}.weight"])
        rec.params[f"{name}.weight"] = ParamInfo(name=f"{name}.weight", layer=name, shape=[4, 4], numel=16)
        for step in range(3):
            rec.add(f"grad_norm/{name}.weight", step, 0.1 * (d + 1))
    rec.steps = 3
    finding = Finding(code="no_gradient", severity="warning", summary=f"`{names[0]}` never received a gradient.",
                      advice=f"Check `{names[1]}`: [link=x]y[/link]", step=0, layers=(names[0], names[1]))
    out = _render(Report(record=rec, findings=[finding]), width=120)
    for name in names:
        assert name in out
    assert "[link=x]y[/link]" in out


def test_advice_reaches_module_dict_keys_that_are_not_python_names():
    from gradvitals.rules._common import attr

    assert attr("blocks.0.mlp") == "model.blocks[0].mlp"
    assert attr("netD:main.0") == "netD.main[0]"
    assert attr("heads.class.proj") == "model.heads['class'].proj"  # a keyword
    assert attr("blocks.layer-1.[/]") == "model.blocks['layer-1']['[/]']"
