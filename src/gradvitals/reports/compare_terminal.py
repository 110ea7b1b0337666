"""``gradvitals compare`` in the terminal (rich): per compared run, its verdict line,
the findings that changed and the numbers at the last common step; then the
per-layer gradient-norm ratio as a coarse strip per layer. No torch here.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from rich.table import Table
from rich.text import Text

from .html_format import fmt

#: Characters of the per-layer ratio strip (step bins are merged to fit).
STRIP_WIDTH = 20
#: Layers shown in the ratio table before the middle is elided.
MAX_RATIO_LAYERS = 16
#: A strip cell is marked up (+) or down (-) when B/A is beyond 10x either way;
#: within that a layer's gradient is in the same decade.
RATIO_MARK = 10.0
_CHANGE_STYLE = {"removed": "green", "added": "bold red", "severity": "yellow"}


def _cell(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return " "
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        return "!"
    logs = [math.log10(v) if v > 0 else -math.inf for v in vals]
    mean = sum(logs) / len(logs)
    return "+" if mean >= math.log10(RATIO_MARK) else "-" if mean <= -math.log10(RATIO_MARK) else "·"


def ratio_strip(row: list[float | None], width: int = STRIP_WIDTH) -> str:
    """A layer's B/A ratios over the step bins, merged into ``width`` characters:
    ``+`` B ≥ 10x A, ``-`` B ≤ A/10, ``·`` within 10x, ``!`` NaN/Inf, blank: no data."""
    if not row:
        return ""
    per = max(1, math.ceil(len(row) / width))
    return "".join(_cell(row[i:i + per]) for i in range(0, len(row), per))


def render_compare(cmp: Any) -> Iterator[Any]:
    """Renderables for a :class:`gradvitals.compare.Comparison`."""
    for p in cmp.pairs:
        problems = {f.code for f in p.b.report.findings if f.severity in ("critical", "warning")}
        yield Text(p.verdict, style="bold red" if problems else "bold green")
        if p.changes:
            table = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
            for col in ("finding", "change", f"{p.a.label} → {p.b.label}", "layers"):
                table.add_column(col)
            for c in p.changes:
                layers = ", ".join(c.layers[:4]) + (f" +{len(c.layers) - 4}" if len(c.layers) > 4 else "")
                table.add_row(Text(c.code), Text({"removed": "gone", "added": "new"}.get(c.change, c.change),
                                                 style=_CHANGE_STYLE[c.change]),
                              Text(f"{c.before or '—'} → {c.after or '—'}"), Text(layers or "run"))
            yield table
        else:
            yield Text("No finding appeared, disappeared or changed severity.")
        for x in p.at_step:
            name = "loss" if x.quantity == "loss" else "global grad norm"
            yield Text(f"{name} at step {x.step}: {fmt(x.a)} → {fmt(x.b)}")
        if p.ratio:
            layers, rows = p.ratio["layers"], p.ratio["ratio"]
            keep = list(range(len(layers)))
            if len(keep) > MAX_RATIO_LAYERS:
                half = MAX_RATIO_LAYERS // 2
                keep = keep[:half] + keep[-half:]
            bins = p.ratio["bins"]
            yield Text(f"Gradient-norm ratio {p.b.label}/{p.a.label} per layer, steps {bins[0][0]}..{bins[-1][1]} "
                       "(+ ≥10x, - ≤1/10, · within 10x, ! NaN/Inf):")
            table = Table(box=None, padding=(0, 1))
            table.add_column("layer")
            table.add_column("over steps")
            table.add_column("last bin", justify="right")
            for i in keep:
                last = next((v for v in reversed(rows[i]) if v is not None), None)
                table.add_row(Text(layers[i]), Text(ratio_strip(rows[i])), Text("—" if last is None else fmt(last)))
                if len(layers) > MAX_RATIO_LAYERS and i == keep[MAX_RATIO_LAYERS // 2 - 1]:
                    table.add_row(Text(f"… {len(layers) - MAX_RATIO_LAYERS} more"), Text(""), Text(""))
            yield table
        else:
            yield Text("No layer has gradient norms recorded in both runs: no ratio heatmap.", style="dim")
