"""Terminal rendering with rich: verdict, findings root-cause first, per-layer table."""

from __future__ import annotations

import math
from typing import Any, Iterator

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def render(report: Any, *, max_layers: int = 30) -> Iterator[Any]:
    findings = report.findings
    problems = [f for f in findings if f.severity in ("critical", "warning")]
    style = "bold red" if any(f.severity == "critical" for f in problems) else ("yellow" if problems else "bold green")
    yield Text(report.verdict, style=style)
    for f in findings:
        head = Text.assemble((f"[{f.severity}] ", _STYLE[f.severity]), (f.code, "bold"))
        if f.step is not None:
            head.append(f"  step {f.step}")
        if f.layers:
            head.append("  " + ", ".join(f.layers[:4]) + (" ..." if len(f.layers) > 4 else ""), style="magenta")
        yield Panel(Group(Text(f.summary), Text("Fix: " + f.advice, style="dim")), title=head,
                    title_align="left", border_style=_STYLE[f.severity])
    table = layer_table(report.record, max_layers=max_layers)
    if table is not None:
        yield table


def _last(series: Any) -> float:
    return series.last_value if series is not None and series.count else math.nan


def layer_table(record: Any, max_layers: int = 30) -> Table | None:
    layers = [l for l in record.layers_in_order() if l.params]
    if not layers:
        return None
    table = Table(title=f"Layers in forward order (last recorded values, step {max(record.steps - 1, 0)})",
                  title_justify="left", show_edge=False, pad_edge=False)
    for col in ("layer", "kind", "grad norm", "", "update ratio", "dead", "saturated"):
        table.add_column(col, justify="right" if col not in ("layer", "kind", "") else "left")
    norms = {}
    for l in layers:
        vals = [_last(record.series.get(f"grad_norm/{p}")) for p in l.params]
        vals = [v for v in vals if not math.isnan(v)]
        norms[l.name] = math.sqrt(sum(v * v for v in vals)) if vals else math.nan
    finite = [v for v in norms.values() if math.isfinite(v) and v > 0]
    lo, hi = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 1.0)
    shown = layers if len(layers) <= max_layers else layers[: max_layers // 2] + layers[-max_layers // 2:]
    for l in shown:
        g = norms[l.name]
        ratio = [_last(record.series.get(f"update_ratio/{p}")) for p in l.params]
        ratio = [r for r in ratio if not math.isnan(r)]
        dead = _last(record.series.get(f"dead_frac/{l.name}"))
        sat = _last(record.series.get(f"act_sat_frac/{l.name}"))
        table.add_row(l.name, l.kind, _fmt(g), _bar(g, lo, hi), _fmt(max(ratio)) if ratio else "-",
                      _pct(dead), _pct(sat))
    return table


def _bar(v: float, lo: float, hi: float, width: int = 12) -> Text:
    if not math.isfinite(v):
        return Text("NaN/Inf" if not math.isnan(v) or v != v else "", style="bold red")
    if v <= 0:
        return Text("")
    span = max(hi - lo, 1e-9)
    n = max(1, round((math.log10(v) - lo) / span * width))
    return Text("█" * n, style="green" if n > width // 3 else "red")


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan" if v != v else "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2e}"


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:.0f}%"


def print_report(report: Any, console: Console | None = None) -> None:
    (console or Console(stderr=True)).print(report)
