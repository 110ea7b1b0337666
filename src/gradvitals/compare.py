"""Compare runs: what changed between a baseline run (the first) and each other run.

Pure data, no torch: findings that appear, disappear or change severity (by code
and layer), the loss and global gradient norm at a common step, the per-layer
gradient-norm ratio (other / baseline) binned by step, and a verdict line computed
from those numbers. The renderers are ``reports/compare_terminal.py`` and
``reports/compare_html.py``; ``gradvitals compare`` wires them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .findings import Finding
from .record import Record, json_safe
from .report import Report

#: The JSON that ``gradvitals compare --json`` writes (its own contract, additions only).
COMPARE_SCHEMA = "gradvitals.compare/1"
#: Severities that count as a problem in a verdict (info findings are notes).
PROBLEMS = ("critical", "warning")
_RANK = {"info": 0, "warning": 1, "critical": 2}
#: Step bins of the ratio heatmap at most: ~40 columns read at a glance on a page and
#: keep the inline SVG small (layers x 40 rectangles).
RATIO_BINS = 40


def load_run(path: str | os.PathLike[str], mapping: Any = None) -> Report:
    """The one place a compared input is read: anything ``gradvitals diagnose`` reads
    (a gradvitals JSON report, trainer_state.json, TensorBoard, metrics.csv, CSV/JSONL;
    ``mapping``: log key -> quantity, as ``--map``). A saved report keeps the findings
    its run made; a log, or a record saved without findings, is diagnosed here.
    Raises ``importers.LogError`` (one line naming the file)."""
    from .importers import load_any

    imported = load_any(path, mapping)
    report = imported.report
    if report is not None and report.findings:
        return report
    return Report.from_record(imported.record)


@dataclass(frozen=True)
class Run:
    label: str
    path: str
    report: Report


@dataclass(frozen=True)
class FindingChange:
    """A finding code on some layers (none: a run-level finding) that appeared
    (``added``), disappeared (``removed``) or changed ``severity`` from A to B."""

    code: str
    change: str
    before: str | None
    after: str | None
    layers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "change": self.change, "before": self.before, "after": self.after,
                "layers": list(self.layers)}


@dataclass(frozen=True)
class AtStep:
    """One quantity of both runs at the last step both recorded it."""

    quantity: str
    step: int
    a: float
    b: float

    def to_json(self) -> dict[str, Any]:
        return json_safe({"quantity": self.quantity, "step": self.step, "a": self.a, "b": self.b})


@dataclass
class Pair:
    """The baseline ``a`` against one other run ``b``."""

    a: Run
    b: Run
    changes: list[FindingChange]
    at_step: list[AtStep]
    ratio: dict[str, Any] | None
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a.label, "b": self.b.label, "verdict": self.verdict,
                "findings": [c.to_json() for c in self.changes],
                "at_step": [x.to_json() for x in self.at_step],
                "grad_ratio": json_safe(self.ratio) if self.ratio else None}


@dataclass
class Comparison:
    runs: list[Run]
    pairs: list[Pair] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"schema": COMPARE_SCHEMA,
                "runs": [{"label": r.label, "path": r.path, "verdict": r.report.verdict,
                          "steps": r.report.record.steps,
                          "problems": sorted({f.code for f in r.report.findings if f.severity in PROBLEMS})}
                         for r in self.runs],
                "pairs": [p.to_json() for p in self.pairs]}


def labels_for(paths: list[str]) -> list[str]:
    """Each input's file name without its extension; the path as given where two share it."""
    stems = [Path(p).stem or str(p) for p in paths]
    return [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]


def compare(runs: list[Run]) -> Comparison:
    """The first run is the baseline; each other run is compared against it."""
    if len(runs) < 2:
        raise ValueError(f"compare needs at least 2 runs, got {len(runs)}")
    out = Comparison(runs=list(runs))
    base = runs[0]
    for other in runs[1:]:
        pair = Pair(a=base, b=other, changes=finding_changes(base.report.findings, other.report.findings),
                    at_step=[x for q in ("loss", "grad_norm_global")
                             if (x := at_common_step(base.report.record, other.report.record, q))],
                    ratio=grad_ratio(base.report.record, other.report.record))
        pair.verdict = verdict_line(pair)
        out.pairs.append(pair)
    return out


def _by_code_layer(findings: list[Finding]) -> dict[tuple[str, str | None], str]:
    """(code, layer) -> the highest severity a finding gave it; None: run level."""
    out: dict[tuple[str, str | None], str] = {}
    for f in findings:
        for layer in f.layers or (None,):
            key = (f.code, layer)
            if key not in out or _RANK[f.severity] > _RANK[out[key]]:
                out[key] = f.severity
    return out


def finding_changes(a: list[Finding], b: list[Finding]) -> list[FindingChange]:
    """What differs between two runs' findings, keyed by code and layer; the layers of
    one code that changed the same way are grouped. Order: removed, severity, added."""
    ka, kb = _by_code_layer(a), _by_code_layer(b)
    groups: dict[tuple[str, str, str | None, str | None], list[str]] = {}
    for key in [*ka, *(k for k in kb if k not in ka)]:
        before, after = ka.get(key), kb.get(key)
        if before == after:
            continue
        change = "removed" if after is None else "added" if before is None else "severity"
        layers = groups.setdefault((key[0], change, before, after), [])
        if key[1] is not None:
            layers.append(key[1])
    order = {"removed": 0, "severity": 1, "added": 2}
    return sorted((FindingChange(code, change, before, after, tuple(layers))
                   for (code, change, before, after), layers in groups.items()),
                  key=lambda c: order[c.change])


def _value_at(steps: list[int], values: list[float], step: int) -> float:
    """The value recorded at ``step``, else the last one before it."""
    best = math.nan
    for s, v in zip(steps, values):
        if s > step:
            break
        best = v
    return best


def at_common_step(a: Record, b: Record, quantity: str) -> AtStep | None:
    """``quantity`` of both runs at the last step both reached (the shorter run's
    last recorded step), or None when one run has no such series."""
    sa, sb = a.get(quantity), b.get(quantity)
    if sa is None or sb is None or sa.last_step is None or sb.last_step is None:
        return None
    step = min(sa.last_step, sb.last_step)
    return AtStep(quantity, step, _value_at(*sa.points(), step), _value_at(*sb.points(), step))


def _geomean(values: list[float]) -> float:
    """Geometric mean of a bin's norms (norms spread over decades); NaN if any is
    NaN, Inf if any is Inf, so a blow-up is never averaged away."""
    if not values:
        return math.nan
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(math.isinf(v) for v in values):
        return math.inf
    if any(v <= 0 for v in values):
        return 0.0
    return 10 ** (sum(math.log10(v) for v in values) / len(values))


def grad_ratio(a: Record, b: Record, max_bins: int = RATIO_BINS) -> dict[str, Any] | None:
    """Per-layer gradient-norm ratio B/A: rows = the layers both runs have (A's
    forward order), columns = step bins over the steps both runs reached. Each cell is
    the ratio of the two runs' geometric-mean norms in that bin; None where a run has
    no value, ``nan``/``inf`` kept. None when either run has no per-layer norms."""
    la, lb = a.layer_grad_norms(), b.layer_grad_norms()
    layers = [name for name in la if name in lb and la[name][0] and lb[name][0]]
    if not layers:
        return None
    first = min(min(la[n][0][0], lb[n][0][0]) for n in layers)
    last = min(max(la[n][0][-1] for n in layers), max(lb[n][0][-1] for n in layers))
    if last < first:
        return None
    width = max(1, math.ceil((last - first + 1) / max_bins))
    edges = list(range(first, last + 1, width))
    bins = [(lo, min(lo + width - 1, last)) for lo in edges]

    def binned(steps: list[int], values: list[float]) -> list[list[float]]:
        cells: list[list[float]] = [[] for _ in bins]
        for s, v in zip(steps, values):
            if first <= s <= last:
                cells[(s - first) // width].append(v)
        return cells

    rows = []
    for name in layers:
        ca, cb = binned(*la[name]), binned(*lb[name])
        row: list[float | None] = []
        for xa, xb in zip(ca, cb):
            if not xa or not xb:
                row.append(None)
                continue
            ga, gb = _geomean(xa), _geomean(xb)
            if math.isnan(ga) or math.isnan(gb):
                row.append(math.nan)
            elif ga == 0:
                row.append(math.inf if gb > 0 else math.nan)
            elif math.isinf(ga):
                row.append(0.0 if math.isfinite(gb) else math.nan)
            else:
                row.append(gb / ga)
        rows.append(row)
    return {"layers": layers, "bins": [list(b) for b in bins], "ratio": rows}


def _num(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    if v == 0 or 1e-3 <= abs(v) < 1e4:
        return f"{v:.3g}"
    return f"{v:.2e}"


def verdict_line(pair: Pair) -> str:
    """"fixed X; introduced Y; loss at step N a → b", from the findings and the numbers."""
    problems_a = {f.code for f in pair.a.report.findings if f.severity in PROBLEMS}
    problems_b = {f.code for f in pair.b.report.findings if f.severity in PROBLEMS}
    order = [f.code for f in pair.a.report.findings] + [f.code for f in pair.b.report.findings]
    fixed = [c for c in dict.fromkeys(order) if c in problems_a and c not in problems_b]
    new = [c for c in dict.fromkeys(order) if c in problems_b and c not in problems_a]
    kept = [c for c in dict.fromkeys(order) if c in problems_a and c in problems_b]
    parts = []
    if fixed:
        parts.append(f"{pair.b.label} fixed {', '.join(fixed)}")
    if new:
        parts.append(f"{'introduced' if parts else pair.b.label + ' introduced'} {', '.join(new)}")
    if kept:
        parts.append(f"{'still has' if parts else pair.b.label + ' still has'} {', '.join(kept)}")
    if not parts:
        parts.append(f"{pair.b.label}: no problem findings in either run" if not problems_a
                     else f"{pair.b.label}: same findings")
    for x in pair.at_step[:1]:  # the loss when there is one, else the global gradient norm
        name = "loss" if x.quantity == "loss" else "grad norm"
        parts.append(f"{name} at step {x.step} {_num(x.a)} → {_num(x.b)}")
    return "; ".join(parts)
