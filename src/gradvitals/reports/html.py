"""The HTML report: one self-contained file that opens offline.

Renders from the JSON report alone (``Report.to_json()``), so ``gradvitals report
RUN.json --html`` gives the same page as the live run. The page carries its own CSS
and a small hand-written canvas/SVG renderer (``assets/report.js``); the numbers it
plots are embedded as compact JSON: the gradient-flow heatmap as base64 uint16 codes
of log10(grad norm) (2.7 characters per cell), curves and depth panels rounded to
four significant digits. Findings, the run's command and environment are plain HTML,
readable with JavaScript off. No torch here.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from array import array
from importlib import resources
from typing import Any, Iterable

from ..findings import Finding, verdict
from ..record import QUANTITIES, SCHEMA, Record, split_key
from ..report import partial_note
from .html_format import fmt as _fmt
from .html_format import num as _num
from .html_attention import attention_html
from .html_trials import trials_html

#: Columns of the heatmap at most: a screen shows ~1,000 pixel columns; the record's
#: series hold 500-1,000 points each after decimation, so this rarely bins.
MAX_HEATMAP_COLUMNS = 1000
#: uint16 heatmap codes 0-3 are reserved for cells that have no colour on the scale.
CODE_MISSING, CODE_NAN, CODE_INF, CODE_ZERO = 0, 1, 2, 3
_FIRST_VALUE_CODE = 4
_MAX_CODE = 65535
_MISSING = -1.0  # a cell with no recorded step (a norm is never negative)
#: Significant digits kept for plotted values: a plot resolves far less, hover shows 4.
PLOT_DIGITS = 4
#: Healthy per-step update/weight ratio (docs/design.md: ~1e-3), drawn as a guide line.
UPDATE_RATIO_GUIDE = 1e-3
#: Quantities recorded as NaN where they do not apply (saturation of a ReLU output,
#: dead units of a sigmoid): such layers are left out of the panel, not drawn as NaN.
#: From the quantity table (``Quantity.nan_ok``).
NAN_MEANS_NOT_APPLICABLE = frozenset(q.name for q in QUANTITIES.values() if q.nan_ok)
#: Evidence lists longer than this are cut in the findings' evidence tables.
EVIDENCE_LIST_ITEMS = 8
#: Evidence strings longer than this are cut (a traceback does not belong in a table).
EVIDENCE_TEXT_CHARS = 300

#: Depth panels: (series quantity, title, log scale, what a reader should look for).
DEPTH_PANELS: tuple[tuple[str, str, bool, str], ...] = (
    ("update_ratio", "Update ratio |ΔW|/|W| per step", True,
     "~1e-3 is healthy; far above: learning rate too high, far below: too low"),
    ("dead_frac", "Dead fraction (units never positive)", False,
     "ReLU-family units that stopped firing; high and rising is bad"),
    ("act_sat_frac", "Saturation (sigmoid/tanh at their bounds)", False,
     "saturated units pass almost no gradient"),
    ("act_std", "Activation std", True,
     "should stay roughly constant with depth; collapsing or growing means an init/scale problem"),
)
#: What an empty panel means, per quantity.
EMPTY_PANEL = {
    "update_ratio": "No update ratios recorded (no optimizer step was seen).",
    "dead_frac": "No ReLU-family outputs in this model.",
    "act_sat_frac": "No sigmoid/tanh outputs in this model.",
    "act_std": "No activation statistics recorded.",
}


# ----------------------------------------------------------------- numbers
def _plot_value(v: float) -> float | str:
    """Rounded for the page; non-finite kept as the contract's strings."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    rounded = float(f"{v:.{PLOT_DIGITS}g}")
    return rounded if math.isfinite(rounded) else v  # 1.7975e308 would round up to Inf


def _series_points(series: dict[str, Any]) -> tuple[list[int], list[float]]:
    steps = [int(s) for s in series.get("steps", ())]
    values = [_num(v) for v in series.get("values", ())]
    n = min(len(steps), len(values))
    return steps[:n], values[:n]


# ----------------------------------------------------------------- layers
def _layers(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Layers in forward order (the contract lists them so; re-sort defensively)."""
    layers = [l for l in report.get("layers", []) if isinstance(l, dict) and "name" in l]
    seen = sorted((l for l in layers if l.get("depth") is not None), key=lambda l: l["depth"])
    return seen + [l for l in layers if l.get("depth") is None]


def _param_names(layer: dict[str, Any]) -> list[str]:
    out = []
    for p in layer.get("params", []):
        out.append(p["name"] if isinstance(p, dict) else str(p))
    return out


def _grad_record(report: dict[str, Any]) -> Record:
    """The report's layers and per-parameter gradient norms as a Record: what the
    heatmap reads (the per-layer norm is the record's, :meth:`Record.layer_grad_norms`)."""
    grads = {k: s for k, s in report.get("series", {}).items() if split_key(k)[0] == "grad_norm"}
    return Record.from_json({"schema": SCHEMA, "layers": _layers(report), "series": grads})


def _bins(steps: list[int], max_columns: int) -> list[tuple[int, int]]:
    """Group sorted steps into at most ``max_columns`` contiguous (first, last) ranges."""
    if len(steps) <= max_columns:
        return [(s, s) for s in steps]
    per = math.ceil(len(steps) / max_columns)
    return [(steps[i], steps[min(i + per, len(steps)) - 1]) for i in range(0, len(steps), per)]


def _cell(values: list[float]) -> float:
    """One heatmap cell from the values binned into it: NaN, then Inf, then the max."""
    if not values:
        return _MISSING
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def heatmap_data(report: dict[str, Any], max_columns: int = MAX_HEATMAP_COLUMNS) -> dict[str, Any]:
    """The gradient-flow heatmap: rows = layers in forward order, columns = steps.

    Cells are uint16 codes of log10(grad norm) on [lo, hi] (see CODE_*), base64
    little-endian, row-major. Binned columns (long runs beyond ``max_columns``) keep
    the max of their steps so a spike or NaN is never averaged away.
    """
    by_name = {l["name"]: l for l in _layers(report)}
    rows = [(by_name[name], dict(zip(steps, values)))
            for name, (steps, values) in _grad_record(report).layer_grad_norms().items() if name in by_name]
    all_steps = sorted({s for _, per in rows for s in per})
    bins = _bins(all_steps, max_columns)
    starts = [a for a, _ in bins]
    grid: list[list[float]] = []
    logs: list[float] = []
    for _, per in rows:
        cols: list[list[float]] = [[] for _ in bins]
        c = 0
        for step in sorted(per):
            while c + 1 < len(bins) and step > bins[c][1]:
                c += 1
            cols[c].append(per[step])
        row = [_cell(v) for v in cols]
        grid.append(row)
        logs.extend(math.log10(v) for v in row if math.isfinite(v) and v > 0)
    lo = min(logs) if logs else 0.0
    hi = max(logs) if logs else 1.0
    if hi - lo < 1e-9:  # one level: a decade below it, so the cells show the top colour
        lo = hi - 1.0
    codes = array("H")
    span = _MAX_CODE - _FIRST_VALUE_CODE
    for row in grid:
        for v in row:
            if v == _MISSING:
                codes.append(CODE_MISSING)
            elif math.isnan(v):
                codes.append(CODE_NAN)
            elif math.isinf(v):
                codes.append(CODE_INF)
            elif v <= 0:
                codes.append(CODE_ZERO)
            else:
                codes.append(_FIRST_VALUE_CODE + round((math.log10(v) - lo) / (hi - lo) * span))
    if codes.itemsize != 2:  # pragma: no cover - every CPython platform has 2-byte "H"
        raise RuntimeError("uint16 array expected")
    if array("H", [1]).tobytes() != b"\x01\x00":  # big-endian host: store little-endian
        codes.byteswap()
    data: dict[str, Any] = {
        "layers": [{"name": l["name"], "kind": l.get("kind", ""), "act": l.get("activation_after")}
                   for l, _ in rows],
        "steps": starts,
        "lo": lo, "hi": hi,
        "codes": base64.b64encode(codes.tobytes()).decode("ascii"),
    }
    if any(a != b for a, b in bins):
        data["ends"] = [b for _, b in bins]
    return data


def decode_heatmap(data: dict[str, Any]) -> list[list[float]]:
    """Inverse of :func:`heatmap_data`'s encoding (for tests and tools): values per row.

    Missing cells are None; NaN/Inf/0 come back as such; others to ~0.03% of a decade span.
    """
    raw = array("H")
    raw.frombytes(base64.b64decode(data["codes"]))
    if array("H", [1]).tobytes() != b"\x01\x00":  # pragma: no cover
        raw.byteswap()
    ncols = len(data["steps"])
    lo, hi = data["lo"], data["hi"]
    out: list[list[Any]] = []
    for r in range(len(data["layers"])):
        row: list[Any] = []
        for c in raw[r * ncols:(r + 1) * ncols]:
            if c == CODE_MISSING:
                row.append(None)
            elif c == CODE_NAN:
                row.append(math.nan)
            elif c == CODE_INF:
                row.append(math.inf)
            elif c == CODE_ZERO:
                row.append(0.0)
            else:
                exponent = lo + (c - _FIRST_VALUE_CODE) / (_MAX_CODE - _FIRST_VALUE_CODE) * (hi - lo)
                try:
                    row.append(10.0 ** exponent)
                except OverflowError:  # the largest floats, after quantisation
                    row.append(sys.float_info.max)
        out.append(row)
    return out


# ----------------------------------------------------------------- curves
def _curve(series: dict[str, Any]) -> dict[str, Any]:
    steps, values = _series_points(series)
    return {"steps": steps, "values": [_plot_value(v) for v in values],
            "first_nonfinite_step": series.get("first_nonfinite_step")}


def curves_data(report: dict[str, Any]) -> dict[str, Any]:
    """Loss curves (``loss`` and ``loss/<opt>``) and the global gradient norm."""
    series = report.get("series", {})
    loss = {k: _curve(s) for k, s in sorted(series.items()) if k == "loss" or k.startswith("loss/")}
    out: dict[str, Any] = {"loss": loss, "grad_norm": {}}
    if "grad_norm_global" in series:
        out["grad_norm"]["grad_norm_global"] = _curve(series["grad_norm_global"])
    if "clip_max_norm" in series:
        out["grad_norm"]["clip_max_norm"] = _curve(series["clip_max_norm"])
    if "log_z_mean" in series:  # the output logits' log Z (z-loss holds it near 0)
        out["log_z"] = {k: _curve(series[k]) for k in ("log_z_mean", "log_z_max") if k in series}
    return out


def markers_data(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A marker for every finding with a step, and for every ``*_step`` in its evidence
    (e.g. where an explosion became visible), labelled with the finding's code."""
    marks: list[dict[str, Any]] = []
    seen: set[tuple[int, str]] = set()
    for f in report.get("findings", []):
        code = str(f.get("code", "?"))
        cands: list[tuple[Any, str]] = [(f.get("step"), code)]
        for key, value in (f.get("evidence") or {}).items():
            if key != "step" and key.endswith("_step") and value != f.get("step"):
                cands.append((value, f"{code}: {key[:-5].replace('_', ' ')}"))
        for step, label in cands:
            if isinstance(step, bool) or not isinstance(step, int):
                continue
            if (step, label) in seen:
                continue
            seen.add((step, label))
            marks.append({"step": step, "label": label, "severity": f.get("severity", "info")})
    return sorted(marks, key=lambda m: m["step"])


# ----------------------------------------------------------- depth panels
def _first_last(s: dict[str, Any]) -> tuple[int, float, int, float] | None:
    steps, values = _series_points(s)
    if not steps:
        return None
    return steps[0], values[0], steps[-1], values[-1]


def depth_panels_data(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per quantity: value by depth at the first and the last recorded step."""
    series = report.get("series", {})
    layers = _layers(report)
    by_name = {l["name"]: l for l in layers}
    panels = []
    for quantity, title, log, hint in DEPTH_PANELS:
        names, kinds, first, last = [], [], [], []
        first_steps, last_steps = set(), set()
        for layer in layers:
            if quantity == "update_ratio":  # per parameter: the layer's largest
                points = [fl for p in _param_names(layer)
                          if (s := series.get(f"update_ratio/{p}")) and (fl := _first_last(s))]
                if not points:
                    continue
                fl = (points[0][0], _max_nan(p[1] for p in points), points[0][2],
                      _max_nan(p[3] for p in points))
            else:
                s = series.get(f"{quantity}/{layer['name']}")
                fl = _first_last(s) if s else None
                if fl is None or (quantity in NAN_MEANS_NOT_APPLICABLE
                                  and math.isnan(fl[1]) and math.isnan(fl[3])):
                    continue
            names.append(layer["name"])
            kinds.append(layer.get("kind", ""))
            first.append(_plot_value(fl[1]))
            last.append(_plot_value(fl[3]))
            first_steps.add(fl[0])
            last_steps.add(fl[2])
        if quantity == "dead_frac":  # only ReLU-family outputs can be dead
            keep = [i for i, n in enumerate(names) if _zeroing(by_name[n])]
            names, kinds, first, last = ([x[i] for i in keep] for x in (names, kinds, first, last))
        if quantity != "update_ratio":
            keep = _comparable(kinds)
            names, kinds, first, last = ([x[i] for i in keep] for x in (names, kinds, first, last))
        panel: dict[str, Any] = {"quantity": quantity, "title": title, "log": log, "hint": hint,
                                 "empty": EMPTY_PANEL.get(quantity, "Not recorded in this run."),
                                 "names": names, "kinds": kinds, "first": first, "last": last,
                                 "first_step": min(first_steps) if first_steps else None,
                                 "last_step": max(last_steps) if last_steps else None}
        if quantity == "update_ratio":
            panel["guide"] = UPDATE_RATIO_GUIDE
        panels.append(panel)
    return panels


def _zeroing(layer: dict[str, Any]) -> bool:
    from ..taxonomy import ZEROING_FAMILIES, activation_family

    fams = {activation_family(layer.get("kind")), activation_family(layer.get("activation_after"))}
    return bool(ZEROING_FAMILIES & fams)


def _comparable(kinds: list[str]) -> list[int]:
    """Indices of the modules to compare by depth: the activations' outputs if any,
    else the weight layers'. Alternating Linear/Sigmoid outputs would zigzag and
    hide the trend with depth."""
    from ..taxonomy import WEIGHT_LAYERS, activation_family

    acts = [i for i, k in enumerate(kinds) if activation_family(k)]
    if acts:
        return acts
    weights = [i for i, k in enumerate(kinds) if k in WEIGHT_LAYERS]
    return weights or list(range(len(kinds)))


def _max_nan(values: Iterable[float]) -> float:
    vals = list(values)
    if any(math.isnan(v) for v in vals):
        return math.nan
    return max(vals)


def payload(report: dict[str, Any]) -> dict[str, Any]:
    """Everything the page's script draws, from the JSON report alone."""
    run = report.get("run", {})
    return {
        "steps": int(run.get("steps") or 0),
        "heatmap": heatmap_data(report),
        "curves": curves_data(report),
        "markers": markers_data(report),
        "panels": depth_panels_data(report),
    }


# ------------------------------------------------------------------- HTML
def _asset(name: str) -> str:
    return resources.files("gradvitals.reports").joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no "</script>" or "<!--" can close or comment it."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n?(.*?)```", re.S)
_INLINE = re.compile(r"`([^`\n]+)`")


def _prose(text: str) -> str:
    """Escaped text with the findings' light markup: ```fenced``` and `inline` code, **bold**."""
    out = []
    pos = 0
    for m in _FENCE.finditer(text):
        out.append(_inline(text[pos:m.start()]))
        out.append(f"<pre><code>{html.escape(m.group(1).strip(chr(10)).rstrip())}</code></pre>")
        pos = m.end()
    out.append(_inline(text[pos:]))
    return "".join(out)


def _inline(text: str) -> str:
    parts = []
    pos = 0
    for m in _INLINE.finditer(text):
        parts.append(_bold(html.escape(text[pos:m.start()])))
        parts.append(f"<code>{html.escape(m.group(1))}</code>")
        pos = m.end()
    parts.append(_bold(html.escape(text[pos:])))
    return "".join(parts)  # newlines and indentation kept: the prose is white-space: pre-wrap


def _bold(escaped: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def _evidence_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        items = [_evidence_value(x) for x in v[:EVIDENCE_LIST_ITEMS]]
        more = f", … ({len(v) - EVIDENCE_LIST_ITEMS} more)" if len(v) > EVIDENCE_LIST_ITEMS else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_evidence_value(x)}" for k, x in list(v.items())[:EVIDENCE_LIST_ITEMS]) + "}"
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return _fmt(v)
    s = str(v)
    return s if len(s) <= EVIDENCE_TEXT_CHARS else s[:EVIDENCE_TEXT_CHARS] + "…"


def _findings_html(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return '<p class="ok">No findings: nothing in the recorded vital signs looks wrong.</p>'
    items = []
    for i, f in enumerate(findings):
        sev = html.escape(str(f.get("severity", "info")))
        code = html.escape(str(f.get("code", "?")))
        meta = []
        if f.get("step") is not None:
            meta.append(f"step {html.escape(str(f['step']))}")
        layers = [str(x) for x in f.get("layers", [])]
        if layers:
            shown = ", ".join(f"<code>{html.escape(x)}</code>" for x in layers[:6])
            meta.append(shown + (f" … +{len(layers) - 6}" if len(layers) > 6 else ""))
        if f.get("caused_by"):
            meta.append(f"caused by <code>{html.escape(str(f['caused_by']))}</code>")
        evidence = f.get("evidence") or {}
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_evidence_value(v))}</td></tr>"
                       for k, v in evidence.items())
        ev_html = (f'<details class="evidence"><summary>evidence</summary><table>{rows}</table></details>'
                   if rows else "")
        items.append(
            f'<li class="finding {sev}" id="finding-{i}" data-code="{code}">'
            f'<div class="fhead"><span class="sev {sev}">{sev}</span> <b>{code}</b>'
            f'<span class="meta">{" · ".join(meta)}</span></div>'
            f'<p class="summary">{_prose(str(f.get("summary", "")).strip())}</p>'
            f'<div class="advice"><span>Fix:</span> {_prose(str(f.get("advice", "")).strip())}</div>'
            f"{ev_html}</li>")
    return '<ol class="findings">' + "".join(items) + "</ol>"


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if not math.isfinite(s):
        return "unknown"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _run_html(run: dict[str, Any]) -> str:
    command = run.get("command") or " ".join(str(a) for a in run.get("argv", []))
    devices = run.get("devices") or []
    rows = [
        ("command", f"<code>{html.escape(str(command))}</code>" if command else "—"),
        ("optimizer steps", html.escape(str(run.get("steps", "?")))),
        ("duration", html.escape(_duration(run.get("duration_s")))),
        ("torch", html.escape(str(run.get("torch_version", "?")))),
        ("device", html.escape(", ".join(str(d) for d in devices) or "unknown")),
    ]
    if run.get("cuda"):
        rows.append(("CUDA", html.escape(str(run["cuda"]))))
    for key, label in (("python", "python"), ("platform", "platform"), ("started_at", "started"),
                       ("gradvitals_version", "gradvitals")):
        if run.get(key):
            rows.append((label, html.escape(str(run[key]))))
    note = partial_note(run)
    if note:
        rows.insert(0, ("partial report", html.escape(note)))
    elif run.get("ended") and run.get("ended") != "finished":
        rows.append(("ended", html.escape(str(run["ended"]))))
    if run.get("exit_status") not in (None, 0):
        rows.append(("exit status", html.escape(str(run["exit_status"]))))
    if run.get("script_error"):
        rows.append(("script error", f"<code>{html.escape(str(run['script_error']))}</code>"))
    notes = [e for e in run.get("events", []) if isinstance(e, dict) and e.get("type") in ("probe_error", "rule_error")]
    for e in notes[:EVIDENCE_LIST_ITEMS]:
        what = e.get("probe") or e.get("rule") or "?"
        rows.append((f"{e['type'].replace('_', ' ')}", html.escape(f"{what}: {e.get('error', '')}")))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="run">{body}</table>'


def _severity_class(findings: list[dict[str, Any]]) -> str:
    sev = {f.get("severity") for f in findings}
    return "critical" if "critical" in sev else ("warning" if "warning" in sev else "healthy")


def _verdict(report: dict[str, Any]) -> str:
    run = report.get("run", {})
    if run.get("verdict"):
        return str(run["verdict"])
    try:
        return verdict([Finding.from_json(f) for f in report.get("findings", [])])
    except (KeyError, ValueError, TypeError):
        return f"{len(report.get('findings', []))} finding(s)"


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{html.escape(title)}</title><style>{_asset('report.css')}</style>"
        f"<script>{_asset('errors.js')}</script></head>"
        f"<body>{body}<ul id=\"gv-errors\" hidden></ul>"
        f"<script>{_asset('report.js')}</script></body></html>\n")


def _coverage_html(cov: Any) -> str:
    """What an imported log let ``gradvitals diagnose`` check, and why the rest was not
    (the report's ``coverage``; absent for a live run, which checks everything)."""
    if not isinstance(cov, dict):
        return ""
    ran = [str(c) for c in cov.get("ran", [])]
    checks = cov.get("checks") if isinstance(cov.get("checks"), dict) else {}
    items = "".join(f"<li>{html.escape(str(line))}</li>" for line in cov.get("summary", []))
    return (f'<section id="coverage-section"><h2>Coverage <small>({len(ran)} of {len(checks)} checks ran on '
            f'this log)</small></h2><p>Checked: {html.escape(", ".join(ran)) or "nothing"}</p>'
            f'{f"<ul>{items}</ul>" if items else ""}</section>')


def render_html(report: dict[str, Any]) -> str:
    """The whole report as one HTML page (a ``gradvitals.report/1`` dict in, text out)."""
    run = report.get("run", {})
    findings = [f for f in report.get("findings", []) if isinstance(f, dict)]
    verdict = _verdict(report)
    name = run.get("script") or run.get("command") or "training run"
    data = _script_json(payload(report))
    log_z = '<div class="chart" data-role="log_z"></div>' if "log_z_mean" in report.get("series", {}) else ""
    body = f"""
<header class="{_severity_class(findings)}"><div class="brand">gradvitals</div>
<h1 id="verdict">{_inline(verdict)}</h1><div class="sub">{html.escape(str(name))}</div></header>
<main>
<section id="heatmap-section"><h2>Gradient flow</h2>
<p class="hint">Gradient norm of each layer (rows, in forward order: input at the top) at each recorded
step (columns), log colour scale. Dark early rows = vanishing gradients; bright late columns and red
cells = explosion and NaN. Hover a cell for its value.</p>
<div class="gv-report" data-payload="gv-data-0">
<div class="heatmap" data-role="heatmap"></div>
<section id="curves-section"><h2>Loss and gradient norm</h2>
<div class="charts"><div class="chart" data-role="loss"></div><div class="chart" data-role="grad_norm"></div>{log_z}</div>
</section>
<section id="panels-section"><h2>Per layer, by depth</h2>
<p class="hint">Each point is a layer in forward order; grey: first recorded step, orange: last.</p>
<div class="panels" data-role="panels"></div></section>
</div>
<noscript><p class="hint">Charts need JavaScript; the findings below do not.</p></noscript>
</section>
<section id="findings-section"><h2>Findings <small>(root cause first)</small></h2>{_findings_html(findings)}</section>
{_coverage_html(report.get("coverage"))}
{attention_html(report)}
{trials_html([t for t in report.get("trials", []) if isinstance(t, dict)])}
<section id="run-section"><h2>Run</h2>{_run_html(run)}</section>
</main>
<script type="application/json" id="gv-data-0">{data}</script>"""
    return _page(f"gradvitals: {name}", body)


def render_gallery(entries: Iterable[tuple[str, dict[str, Any]]]) -> str:
    """Several reports' heatmaps side by side; ``entries`` = (title, report dict)."""
    cards, blobs = [], []
    for i, (title, report) in enumerate(entries):
        findings = [f for f in report.get("findings", []) if isinstance(f, dict)]
        data = {"steps": int(report.get("run", {}).get("steps") or 0),
                "heatmap": heatmap_data(report, max_columns=MAX_HEATMAP_COLUMNS // 2),
                "markers": markers_data(report)}
        codes = ", ".join(sorted({str(f.get("code")) for f in findings
                                  if f.get("severity") in ("critical", "warning")})) or "healthy"
        cards.append(
            f'<figure class="card {_severity_class(findings)}"><figcaption><b>{html.escape(str(title))}</b>'
            f'<span class="codes">{html.escape(codes)}</span></figcaption>'
            f'<div class="verdict">{_inline(_verdict(report))}</div>'
            f'<div class="gv-report" data-payload="gv-data-{i}"><div class="heatmap small" data-role="heatmap"></div></div>'
            f"</figure>")
        blobs.append(f'<script type="application/json" id="gv-data-{i}">{_script_json(data)}</script>')
    body = ('<header class="healthy"><div class="brand">gradvitals</div><h1>Gradient flow gallery</h1>'
            '<div class="sub">Rows: layers in forward order (input at the top); columns: steps; '
            'log colour of each layer\'s gradient norm.</div></header>'
            f'<main class="gallery">{"".join(cards)}</main>{"".join(blobs)}')
    return _page("gradvitals gallery", body)
