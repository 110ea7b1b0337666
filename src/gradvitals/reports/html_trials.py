"""The HTML report's "Tried fixes" section (``gradvitals run --try-fixes``): the
comparison table, the trials' loss curves overlaid as inline SVG (no JavaScript
needed) and the winner's code change. No torch here.
"""

from __future__ import annotations

import html
import math
from typing import Any

from .html_format import fmt, num

_TRIAL_COLOURS = ("#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _log_points(curve: dict[str, Any]) -> list[tuple[int, float]]:
    """A curve's (step, value) points that a log scale can draw."""
    pts = [(int(s), num(v)) for s, v in zip(curve.get("steps", []), curve.get("values", []))]
    return [(s, v) for s, v in pts if math.isfinite(v) and v > 0]


def overlaid_curves_svg(curves: list[tuple[str, dict[str, Any], bool]], *, quantity: str = "loss",
                        css_class: str = "trial-curves", what: str = "the trials",
                        width: int = 640, height: int = 240) -> str:
    """Curves overlaid by step (log scale), as inline SVG: no JS needed. ``curves``:
    (label, {"steps", "values"}, drawn wide); colours by position (``_TRIAL_COLOURS``)."""
    lines = [_log_points(curve) for _, curve, _ in curves]
    allp = [p for pts in lines for p in pts]
    if not allp:
        return f'<p class="hint">No finite {quantity} was recorded in any of {what}.</p>'
    smax = max(s for s, _ in allp) or 1
    lo, hi = math.log10(min(v for _, v in allp)), math.log10(max(v for _, v in allp))
    hi = hi if hi > lo else lo + 1
    pad = 30
    out = [f'<svg class="{css_class}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{quantity} curves of {what}">',
           f'<text x="4" y="14" font-size="11">{quantity} (log) 10^{hi:.1f}</text>'
           f'<text x="4" y="{height - 4}" font-size="11">10^{lo:.1f}; step 0 .. {smax}</text>']
    for i, ((label, _, wide), pts) in enumerate(zip(curves, lines)):
        if not pts:
            continue
        colour = _TRIAL_COLOURS[i % len(_TRIAL_COLOURS)]
        coords = " ".join(
            f"{pad + (width - 2 * pad) * s / smax:.1f},{pad + (height - 2 * pad) * (hi - math.log10(v)) / (hi - lo):.1f}"
            for s, v in pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{3 if wide else 1.5}" points="{coords}">'
                   f'<title>{html.escape(label)}</title></polyline>')
    out.append("</svg>")
    return "".join(out)


def _trial_curves_svg(trials: list[dict[str, Any]]) -> str:
    """Loss curves of all trials overlaid, the winner's drawn wide."""
    if not any(_log_points(t.get("loss_curve") or {}) for t in trials):
        return '<p class="hint">No finite loss was recorded in any trial.</p>'
    return overlaid_curves_svg([(str(t.get("label") or t.get("remedy")), t.get("loss_curve") or {},
                                 bool(t.get("winner"))) for t in trials])


def trials_html(trials: list[dict[str, Any]]) -> str:
    """try-fixes: the comparison table, the overlaid loss curves and the winner's code change."""
    if not trials:
        return ""
    rows = []
    for i, t in enumerate(trials):
        colour = _TRIAL_COLOURS[i % len(_TRIAL_COLOURS)]
        steps_to = t.get("steps_to_baseline_best")
        rows.append(
            f'<tr class="{"winner" if t.get("winner") else ""}"><td><span style="color:{colour}">&#9632;</span> '
            f'{html.escape(str(t.get("label") or t.get("remedy")))}</td>'
            f'<td>{"yes" if t.get("applicable") else "no: " + html.escape(str(t.get("reason", "")))}</td>'
            f'<td>{html.escape(", ".join(t.get("remaining_codes") or []) or "none")}</td>'
            f'<td>{fmt(t.get("final_loss"))}</td><td>{fmt(t.get("best_loss"))}</td>'
            f'<td>{"-" if steps_to is None else int(steps_to)}</td>'
            f'<td>{"WINNER" if t.get("winner") else ""}</td></tr>')
    winner = next((t for t in trials if t.get("winner")), None)
    fix = (f'<p><b>Winner: {html.escape(str(winner.get("label")))}.</b> Make it permanent:</p>'
           f'<pre>{html.escape(str(winner.get("snippet", "")))}</pre>' if winner else
           '<p>No remedy both removed the critical findings and improved the loss within the budget.</p>')
    return ('<section id="trials-section"><h2>Tried fixes <small>(same script, same seed, same steps)</small></h2>'
            '<table class="trials"><tr><th>trial</th><th>applied</th><th>findings left</th><th>final loss</th>'
            f'<th>best loss</th><th>steps to baseline best</th><th></th></tr>{"".join(rows)}</table>'
            f'{_trial_curves_svg(trials)}{fix}</section>')


