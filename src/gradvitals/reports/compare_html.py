"""``gradvitals compare --html``: one self-contained page, in the report's style, from
a :class:`gradvitals.compare.Comparison`: the verdict lines, the findings that
changed, the runs' loss and global gradient-norm curves overlaid (the "Tried fixes"
SVG), and the per-layer gradient-norm ratio heatmap as inline SVG. No torch here.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .html import _inline, _page, _severity_class
from .html_format import fmt
from .html_trials import _TRIAL_COLOURS, overlaid_curves_svg

#: The ratio heatmap's colour scale ends at this many decades either way (1000x):
#: a layer whose gradient changed more than that is saturated red or blue.
RATIO_DECADES = 3.0
_LOWER = (33, 102, 172)  # B's gradient smaller than A's
_HIGHER = (178, 24, 43)  # B's gradient larger
_MISSING, _NAN, _INF = "#e8e8e8", "#000000", "#67001f"
CELL_W, CELL_H, LABEL_W = 14, 12, 160


def ratio_colour(r: float | None) -> str:
    """White at 1, blue below, red above, on a log scale clamped at RATIO_DECADES."""
    if r is None:
        return _MISSING
    if math.isnan(r):
        return _NAN
    if math.isinf(r):
        return _INF
    if r <= 0:
        return "#%02x%02x%02x" % _LOWER
    t = max(-1.0, min(1.0, math.log10(r) / RATIO_DECADES))
    end = _HIGHER if t > 0 else _LOWER
    return "#%02x%02x%02x" % tuple(round(255 + (e - 255) * abs(t)) for e in end)


def ratio_svg(ratio: dict[str, Any], a: str, b: str) -> str:
    layers, bins, rows = ratio["layers"], ratio["bins"], ratio["ratio"]
    width, height = LABEL_W + CELL_W * len(bins) + 4, CELL_H * len(layers) + 34
    out = [f'<svg class="gv-ratio" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'data-rows="{len(layers)}" data-cols="{len(bins)}" '
           f'aria-label="per-layer gradient-norm ratio {html.escape(b)}/{html.escape(a)}">']
    for i, (name, row) in enumerate(zip(layers, rows)):
        y = i * CELL_H
        out.append(f'<text x="{LABEL_W - 4}" y="{y + CELL_H - 2}" font-size="10" text-anchor="end">'
                   f'{html.escape(name[-28:])}</text>')
        for j, (r, (lo, hi)) in enumerate(zip(row, bins)):
            where = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
            value = "no data in one run" if r is None else f"{b}/{a} = {fmt(r)}"
            out.append(f'<rect x="{LABEL_W + j * CELL_W}" y="{y}" width="{CELL_W}" height="{CELL_H}" '
                       f'fill="{ratio_colour(r)}"><title>{html.escape(f"{name}, {where}: {value}")}</title></rect>')
    y = len(layers) * CELL_H + 14
    out.append(f'<text x="{LABEL_W}" y="{y}" font-size="10">step {bins[0][0]} .. {bins[-1][1]}</text>')
    legend = [(10 ** -RATIO_DECADES, f"≤1/{10 ** RATIO_DECADES:g}"), (1.0, "1"), (10 ** RATIO_DECADES, f"≥{10 ** RATIO_DECADES:g}")]
    for k, (r, label) in enumerate(legend):
        x = LABEL_W + k * 80
        out.append(f'<rect x="{x}" y="{y + 6}" width="10" height="10" fill="{ratio_colour(r)}" stroke="#999"/>'
                   f'<text x="{x + 14}" y="{y + 15}" font-size="10">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _changes_html(pair: Any) -> str:
    if not pair.changes:
        return "<p>No finding appeared, disappeared or changed severity.</p>"
    rows = []
    for c in pair.changes:
        what = {"removed": "gone", "added": "new", "severity": "severity"}[c.change]
        layers = ", ".join(f"<code>{html.escape(x)}</code>" for x in c.layers[:8])
        more = f" … +{len(c.layers) - 8}" if len(c.layers) > 8 else ""
        rows.append(f'<tr class="change {c.change}" data-code="{html.escape(c.code)}" data-change="{c.change}">'
                    f"<td><b>{html.escape(c.code)}</b></td><td>{what}</td>"
                    f'<td>{html.escape(c.before or "—")} → {html.escape(c.after or "—")}</td>'
                    f"<td>{layers or 'run'}{more}</td></tr>")
    return ('<table class="trials"><tr><th>finding</th><th>change</th><th>severity A → B</th><th>layers</th></tr>'
            + "".join(rows) + "</table>")


def _curve(series: Any) -> dict[str, Any]:
    if series is None:
        return {}
    steps, values = series.points()
    return {"steps": steps, "values": values}


def _curves_html(cmp: Any, quantity: str, title: str) -> str:
    curves = [(r.label, _curve(r.report.record.get(quantity)), i > 0) for i, r in enumerate(cmp.runs)]
    key = "".join(f'<span style="color:{_TRIAL_COLOURS[i % len(_TRIAL_COLOURS)]}">&#9632;</span> '
                  f"{html.escape(r.label)} " for i, r in enumerate(cmp.runs))
    svg = overlaid_curves_svg(curves, quantity=title, css_class=f"gv-compare-{quantity}", what="the runs")
    return f'<div class="chart" data-quantity="{quantity}"><p class="hint">{key}</p>{svg}</div>'


def render_compare_html(cmp: Any) -> str:
    """The comparison as one HTML page (``cmp``: a :class:`gradvitals.compare.Comparison`)."""
    last = cmp.runs[-1].report
    sev = _severity_class([f.to_json() for f in last.findings])
    verdicts = "".join(f'<li class="verdict">{_inline(p.verdict)}</li>' for p in cmp.pairs)
    runs = "".join(f"<tr><td>{html.escape(r.label)}</td><td><code>{html.escape(r.path)}</code></td>"
                   f"<td>{r.report.record.steps}</td><td>{_inline(r.report.verdict)}</td></tr>"
                   for r in cmp.runs)
    pairs = []
    for p in cmp.pairs:
        nums = "".join(f"<tr><td>{'loss' if x.quantity == 'loss' else 'global grad norm'}</td>"
                       f"<td>{x.step}</td><td>{fmt(x.a)}</td><td>{fmt(x.b)}</td></tr>" for x in p.at_step)
        ratio = (ratio_svg(p.ratio, p.a.label, p.b.label) if p.ratio else
                 '<p class="hint">No layer has gradient norms recorded in both runs: no ratio heatmap.</p>')
        pairs.append(
            f'<section class="pair" data-a="{html.escape(p.a.label)}" data-b="{html.escape(p.b.label)}">'
            f"<h2>{html.escape(p.b.label)} against {html.escape(p.a.label)}</h2>"
            f'<p class="verdict">{_inline(p.verdict)}</p>'
            f"<h3>Findings that changed</h3>{_changes_html(p)}"
            + (f'<h3>At the last common step</h3><table class="run"><tr><th>quantity</th><th>step</th>'
               f"<th>{html.escape(p.a.label)}</th><th>{html.escape(p.b.label)}</th></tr>{nums}</table>" if nums else "")
            + f"<h3>Gradient-norm ratio {html.escape(p.b.label)}/{html.escape(p.a.label)}</h3>"
            '<p class="hint">Each layer (rows, forward order) in step bins (columns): red, B\'s gradient is '
            "larger; blue, smaller; white, unchanged (log scale).</p>"
            f"{ratio}</section>")
    title = " vs ".join(r.label for r in cmp.runs)
    body = (f'<header class="{sev}"><div class="brand">gradvitals compare</div>'
            f'<h1 id="verdict">{_inline(cmp.pairs[0].verdict)}</h1><ul class="sub">{verdicts}</ul></header><main>'
            f'<section id="runs-section"><h2>Runs</h2><table class="run"><tr><th>run</th><th>file</th>'
            f"<th>steps</th><th>verdict</th></tr>{runs}</table></section>"
            f'<section id="curves-section"><h2>Loss and gradient norm, overlaid by step</h2><div class="charts">'
            f'{_curves_html(cmp, "loss", "loss")}{_curves_html(cmp, "grad_norm_global", "grad norm")}</div></section>'
            f'{"".join(pairs)}</main>')
    return _page(f"gradvitals compare: {title}", body)
