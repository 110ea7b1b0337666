"""The HTML report's "Attention" section: per attention layer, the max attention logit
(log scale) and the mean attention entropy against its uniform ceiling, as inline SVG
(no JavaScript needed). Present only when the attention probes recorded something.
No torch here.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .html_format import fmt, num

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
#: Layers drawn at most (the ones with the largest last logit); the rest are named only.
MAX_LAYERS = 8


def _curve(series: dict[str, Any], key: str) -> list[tuple[int, float]]:
    s = series.get(key)
    if not isinstance(s, dict):
        return []
    return [(int(a), num(b)) for a, b in zip(s.get("steps", ()), s.get("values", ()))]


def attention_layers(report: dict[str, Any]) -> list[str]:
    """The layers with an ``attn_max_logit`` series, largest last value first."""
    series = report.get("series") or {}
    names = [k.split("/", 1)[1] for k in series if isinstance(k, str) and k.startswith("attn_max_logit/")]

    def last(name: str) -> float:
        pts = [v for _, v in _curve(series, f"attn_max_logit/{name}") if not math.isnan(v)]
        return pts[-1] if pts else -math.inf

    return sorted(names, key=lambda n: (-last(n), n))


def _svg(lines: list[tuple[str, list[tuple[int, float]], bool]], label: str, log: bool,
         width: int = 420, height: int = 220) -> str:
    """Polylines (name, points, dashed) on one chart; ``log``: log10 y axis (values <= 0 left out)."""
    def y_of(v: float) -> float:
        return math.log10(v) if log else v

    pts_all = [(s, y_of(v)) for _, pts, _ in lines for s, v in pts
               if math.isfinite(v) and (v > 0 or not log)]
    if not pts_all:
        return f'<p class="hint">No finite {html.escape(label)} was recorded.</p>'
    smax = max(s for s, _ in pts_all) or 1
    lo, hi = min(y for _, y in pts_all), max(y for _, y in pts_all)
    hi = hi if hi > lo else lo + 1
    pad = 30
    top = f"10^{hi:.1f}" if log else fmt(hi)
    bottom = f"10^{lo:.1f}" if log else fmt(lo)
    out = [f'<svg class="attn-chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{html.escape(label)} per attention layer">',
           f'<text x="4" y="14" font-size="11">{html.escape(label)} {top}</text>'
           f'<text x="4" y="{height - 4}" font-size="11">{bottom}; step 0 .. {smax}</text>']
    paired = any(d for _, _, d in lines)  # (layer, its dashed ceiling) pairs share a colour
    for i, (name, pts, dashed) in enumerate(lines):
        kept = [(s, y_of(v)) for s, v in pts if math.isfinite(v) and (v > 0 or not log)]
        if not kept:
            continue
        colour = _COLOURS[(i // 2 if paired else i) % len(_COLOURS)]
        coords = " ".join(f"{pad + (width - 2 * pad) * s / smax:.1f},"
                          f"{pad + (height - 2 * pad) * (hi - y) / (hi - lo):.1f}" for s, y in kept)
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{coords}">'
                   f'<title>{html.escape(name)}</title></polyline>')
    out.append("</svg>")
    return "".join(out)


def attention_html(report: dict[str, Any]) -> str:
    """The section, or "" when no attention statistics were recorded."""
    names = attention_layers(report)
    if not names:
        return ""
    series = report.get("series") or {}
    shown = names[:MAX_LAYERS]
    logit_lines = [(n or "(model)", _curve(series, f"attn_max_logit/{n}"), False) for n in shown]
    ent_lines: list[tuple[str, list[tuple[int, float]], bool]] = []
    for n in shown:
        ent_lines.append((n or "(model)", _curve(series, f"attn_entropy/{n}"), False))
        ent_lines.append((f"{n or '(model)'}: uniform over its keys", _curve(series, f"attn_entropy_uniform/{n}"), True))
    legend = "".join(f'<li><span style="color:{_COLOURS[i % len(_COLOURS)]}">&#9632;</span> {html.escape(n or "(model)")}'
                     f' <small>last max logit {fmt(_last(logit_lines[i][1]))}</small></li>'
                     for i, n in enumerate(shown))
    more = (f'<p class="hint">{len(names) - len(shown)} more attention layers recorded (not drawn).</p>'
            if len(names) > len(shown) else "")
    return ('<section id="attention-section"><h2>Attention</h2>'
            '<p class="hint">Per attention layer, on scheduled steps: the largest pre-softmax score q&middot;k '
            '(log scale; growing past ~100 makes the softmax one-hot) and the mean entropy of the attention '
            'rows (nats), dashed: the entropy of uniform attention over the same keys.</p>'
            f'<div class="charts">{_svg(logit_lines, "max attention logit", True)}'
            f'{_svg(ent_lines, "attention entropy", False)}</div><ul class="attn-legend">{legend}</ul>{more}'
            '</section>')


def _last(pts: list[tuple[int, float]]) -> float:
    vals = [v for _, v in pts if not math.isnan(v)]
    return vals[-1] if vals else math.nan
