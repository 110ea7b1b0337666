"""Terminal rendering with rich: the verdict line first, then the findings root cause
first (severity colours, the user's module names, the advice), then a compact
per-layer table in forward order with an inline log-scale bar of each layer's
gradient norm.

``Report.__rich_console__`` yields :func:`render`, so ``console.print(report)``
prints all of it. Colour follows the console: rich honours ``NO_COLOR``, and
:func:`make_console` builds one that does for a given stream. No torch here.
"""

from __future__ import annotations

import math
import os
from typing import IO, Any, Iterator

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..report import partial_note
from ..taxonomy import ZEROING_FAMILIES, activation_family
from .html_format import fmt

SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
#: Layers shown in the table before it is elided in the middle (first and last
#: layers are where vanishing and exploding show).
MAX_TABLE_LAYERS = 30
#: Width of the inline gradient-norm bar, in characters.
BAR_WIDTH = 12
#: A bar in the lowest third of the log range is drawn red: that layer's gradient is
#: orders of magnitude below the others' (the vanishing picture).
LOW_BAR_FRACTION = 1 / 3
#: Layers named per finding header before "+N more".
LAYERS_IN_HEADER = 4
#: Evidence items shown under a finding (the HTML report shows all).
EVIDENCE_ITEMS = 4


def make_console(file: IO[str] | None = None, *, width: int | None = None, stderr: bool = True) -> Console:
    """A console for reports: stderr by default, colourless when ``NO_COLOR`` is set."""
    no_color = "NO_COLOR" in os.environ and os.environ["NO_COLOR"] != ""
    if file is not None:
        return Console(file=file, width=width, no_color=no_color, highlight=False)
    return Console(stderr=stderr, width=width, no_color=no_color, highlight=False)


def render(report: Any, *, max_layers: int = MAX_TABLE_LAYERS) -> Iterator[Any]:
    """Renderables for a :class:`gradvitals.report.Report`, verdict first."""
    findings = list(report.findings)
    problems = [f for f in findings if f.severity in ("critical", "warning")]
    style = "bold red" if any(f.severity == "critical" for f in problems) else ("yellow" if problems else "bold green")
    if getattr(report, "untrained", False):
        style = "bold"
    yield Text(report.verdict, style=style)
    note = partial_note(report.record.run)
    if note:
        yield Text(note, style="yellow")
    for f in findings:
        yield finding_panel(f)
    table = layer_table(report.record, max_layers=max_layers)
    if table is not None:
        yield table


def finding_panel(f: Any) -> Panel:
    """One finding: code, step and modules in the title; summary, evidence, the fix."""
    sev = SEVERITY_STYLE.get(f.severity, "")
    head = Text.assemble((f"{f.severity.upper()} ", sev), (f.code, "bold"))
    if f.step is not None:
        head.append(f"  step {f.step}")
    if f.layers:
        shown = ", ".join(f.layers[:LAYERS_IN_HEADER])
        more = f" +{len(f.layers) - LAYERS_IN_HEADER} more" if len(f.layers) > LAYERS_IN_HEADER else ""
        head.append("  " + shown + more, style="magenta")
    body: list[Any] = [Text(f.summary)]
    if getattr(f, "caused_by", None):
        body.append(Text(f"a consequence of {f.caused_by}", style="italic"))
    evidence = _evidence_line(f.evidence)
    if evidence:
        body.append(Text(evidence, style="dim"))
    body.append(Text.assemble(("Fix: ", "bold green"), f.advice))
    return Panel(Group(*body), title=head, title_align="left", border_style=sev or "white")


def _evidence_line(evidence: dict[str, Any]) -> str:
    items = []
    for key, value in evidence.items():
        if isinstance(value, (bool, int, str)) or value is None:
            items.append(f"{key}={value}")
        elif isinstance(value, float):
            items.append(f"{key}={_fmt(value)}")
        if len(items) == EVIDENCE_ITEMS:
            break
    return ("evidence: " + ", ".join(items)) if items else ""


def _last(series: Any) -> float:
    return series.last_value if series is not None and series.count else math.nan


def layer_table(record: Any, max_layers: int = MAX_TABLE_LAYERS) -> Table | None:
    """Compact per-layer table in forward order: grad norm (+bar), update ratio, dead, saturated."""
    layers = [l for l in record.layers_in_order()
              if l.params and any(f"grad_norm/{p}" in record.series for p in l.params)]
    if not layers:
        return None
    last_step = max((s.last_step for k, s in record.series.items()
                     if k.startswith("grad_norm/") and s.last_step is not None), default=0)
    table = Table(title=f"Layers in forward order (last recorded values, step {last_step})",
                  title_justify="left", show_edge=False, pad_edge=False, box=None, header_style="bold")
    for col, justify in (("layer", "left"), ("kind", "left"), ("grad norm", "right"), ("", "left"),
                         ("update ratio", "right"), ("dead", "right"), ("saturated", "right")):
        table.add_column(col, justify=justify, no_wrap=col in ("", "grad norm"))
    norms: dict[str, float] = {}
    bars: dict[str, float] = {}
    first_bad: dict[str, int] = {}
    per_layer = record.layer_grad_norms()
    for l in layers:
        values = per_layer.get(l.name, ([], []))[1]
        norms[l.name] = values[-1] if values else math.nan
        # The bar of a layer whose gradient went NaN shows its latest finite norm.
        bars[l.name] = next((v for v in reversed(values) if math.isfinite(v)), math.nan)
        series = [s for p in l.params if (s := record.series.get(f"grad_norm/{p}")) is not None]
        bad = [s.first_nonfinite_step for s in series if s.first_nonfinite_step is not None]
        if bad:
            first_bad[l.name] = min(bad)
    order = record.layers_in_order()
    positive = [v for v in bars.values() if math.isfinite(v) and v > 0]
    lo, hi = (math.log10(min(positive)), math.log10(max(positive))) if positive else (0.0, 1.0)
    shown: list[Any] = list(layers)
    if len(layers) > max_layers:
        half = max_layers // 2
        shown = layers[:half] + [None] + layers[-(max_layers - half):]
    for l in shown:
        if l is None:
            table.add_row(Text(f"… {len(layers) - max_layers} more layers …", style="dim"), "", "", "", "", "", "")
            continue
        g = norms[l.name]
        if math.isfinite(g):
            norm_text = Text(_fmt(g))
        else:
            since = first_bad.get(l.name)
            norm_text = Text(_fmt(g) + (f" since {since}" if since is not None else ""), style="bold red")
        ratios = [_last(record.series.get(f"update_ratio/{p}")) for p in l.params]
        ratios = [r for r in ratios if not math.isnan(r)]
        kind = l.kind + (f"→{l.activation_after}" if l.activation_after else "")
        # Text, not str: a str cell is rich markup, and module names are the user's
        # (a ModuleDict key "[/]" made the whole report fail to print).
        table.add_row(Text(l.name), Text(kind), norm_text, _bar(bars[l.name], lo, hi), _fmt(max(ratios)) if ratios else "-",
                      _pct(_dead_fraction(record, l)), _pct(_saturation(record, l, order)))
    return table


def _dead_fraction(record: Any, layer: Any) -> float:
    """Dead units only mean something for ReLU-family outputs (a sigmoid is never 0)."""
    if ZEROING_FAMILIES & {activation_family(layer.kind), activation_family(layer.activation_after)}:
        return _last(record.series.get(f"dead_frac/{layer.name}"))
    return math.nan


def _saturation(record: Any, layer: Any, order: list[Any]) -> float:
    """Saturation of the layer's own output, else of the activation module that follows
    it in the forward (Linear -> Sigmoid: the Sigmoid's output is what saturates)."""
    own = _last(record.series.get(f"act_sat_frac/{layer.name}"))
    if not math.isnan(own):
        return own
    i = next((k for k, x in enumerate(order) if x is layer), None)
    for nxt in order[i + 1:] if i is not None else ():
        if nxt.params:
            break  # the next weight layer: no activation module in between
        v = _last(record.series.get(f"act_sat_frac/{nxt.name}"))
        if not math.isnan(v):
            return v
    return math.nan


def _bar(v: float, lo: float, hi: float, width: int = BAR_WIDTH) -> Text:
    """Log-scale bar of v on [lo, hi] decades; red in the lowest third (vanishing)."""
    if not math.isfinite(v) or v <= 0:
        return Text("·" if v == 0 else "", style="dim")
    span = hi - lo
    frac = (math.log10(v) - lo) / span if span > 1e-9 else 1.0
    n = max(1, round(frac * width))
    return Text("█" * n + " " * (width - n), style="red" if frac < LOW_BAR_FRACTION and span > 1e-9 else "green")


def _fmt(v: float) -> str:
    return fmt(v, sci=2, plain=False)


def _pct(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{100 * v:.0f}%"


def print_report(report: Any, console: Console | None = None) -> None:
    (console or make_console()).print(report)
