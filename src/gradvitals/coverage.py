"""Which checks a record allows, and why the others could not run.

Derived from the rules' declared inputs (:data:`gradvitals.rules.requirements.REQUIRES`)
and what the record holds, never from the log's format: the same log with per-layer
columns added gets the per-layer checks. Pure: no torch, writes nothing.
"""

from __future__ import annotations

import statistics
from typing import Any

from .findings import CODES
from .record import Record, split_key
from .rules.requirements import LIVE_FACTS, REQUIRES, Needs

#: What a series pattern is, in the words of a "not checked" line.
_SERIES_WORDS: dict[str, str] = {
    "loss": "training loss",
    "grad_norm_global": "global gradient norm",
    "grad_norm/*": "per-layer gradient norms",
    "weight_norm/*": "weight norms",
    "update_ratio/*": "update/weight ratios",
    "dead_frac/*": "per-unit activation counts",
    "act_sat_frac/*": "activation saturation statistics",
    "act_mean/*": "activation statistics",
    "bn_batch/*": "BatchNorm batch sizes",
    "clip_clipped": "clip_grad_norm_ calls",
}


def describe(token: str) -> str:
    """An input of the requirement table in words ("per-layer gradient norms")."""
    if " or " in token:
        return " or ".join(describe(t) for t in token.split(" or "))
    return LIVE_FACTS.get(token) or _SERIES_WORDS.get(token) or token


def available(record: Record) -> dict[str, bool]:
    """Every input token of the requirement table -> whether the record holds it."""
    quantities: dict[str, int] = {}
    for key in record.series:
        q, name = split_key(key)
        token = f"{q}/*" if name is not None else q
        quantities[token] = quantities.get(token, 0) + 1
    have = {t: t in quantities for n in REQUIRES.values() for t in (*n.all, *n.any, *n.better_with)}
    live = record.run.get("imported") is None
    have.update({
        "model": any(l.kind for l in record.layers.values()),  # an imported log's layers have no kind
        "init_audit": bool(record.events_of("init_audit")),
        "optimizer": bool(record.run.get("optimizer_groups") or record.run.get("optimizers")),
        "hooks": live,
    })
    return have


def log_interval(record: Record, key: str) -> int | None:
    """The usual gap between logged steps of a series (the median), None when unknown."""
    s = record.get(key)
    if s is None:
        return None
    steps, _ = s.points()
    if len(steps) < 2:
        return None
    return int(statistics.median(b - a for a, b in zip(steps, steps[1:]))) * max(1, s.stride)


def _check(code: str, needs: Needs | None, have: dict[str, bool], record: Record) -> dict[str, Any]:
    if needs is None:
        return {"ran": True, "data": [], "why": None, "notes": ["inputs not declared"]}
    missing = [t for t in needs.all if not have.get(t)]
    if needs.any and not any(have.get(t) for t in needs.any):
        missing.append(" or ".join(needs.any))
    data = [t for t in (*needs.all, *needs.any, *needs.better_with) if have.get(t)]
    notes: list[str] = []
    if missing:
        logged = [t for t in missing if t not in LIVE_FACTS]
        live = [t for t in missing if t in LIVE_FACTS]
        parts = [f"no {describe(t)}" for t in logged]
        if live:
            parts.append(f"needs {' and '.join(describe(t) for t in live)}, which only a live run records")
        why = "; ".join(parts)
        return {"ran": False, "data": data, "missing": missing, "why": why, "notes": notes}
    for t in needs.better_with:
        if not have.get(t):
            notes.append(f"without {describe(t)}")
    if needs.step_to_step:
        for t in needs.all or needs.any:
            gap = log_interval(record, t) if "/" not in t else None
            if gap and gap > 1:
                notes.append(f"{t} logged every {gap} steps: spikes shorter than that are invisible")
    if code == "vanishing_gradients" and not have.get("weight_norm/*"):
        notes.append("compared absolute gradient norms, not |grad|/|weight|; layers ordered by name")
    if "grad_norm_global" in (record.run.get("derived") or ()) and "grad_norm_global" in data:
        notes.append("global gradient norm computed from the per-parameter norms")
    return {"ran": True, "data": data, "missing": [], "why": None, "notes": notes}


def coverage(record: Record, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``coverage`` section of a report: ``checks`` (per finding code: ``ran``,
    ``data``: the inputs it read, ``why``: for one that could not run, ``notes``: what
    it could not see), ``summary`` (one line per reason, the terminal's), and
    ``source`` (where the numbers came from, as the importer said)."""
    have = available(record)
    checks = {code: _check(code, REQUIRES.get(code), have, record) for code in CODES}
    summary: list[str] = []
    by_why: dict[str, list[str]] = {}
    for code, c in checks.items():
        if not c["ran"]:
            by_why.setdefault(c["why"], []).append(code)
    for why, codes in by_why.items():
        summary.append(f"{why}: {', '.join(codes)} not checked")
    by_note: dict[str, list[str]] = {}
    for code, c in checks.items():
        for note in c["notes"] if c["ran"] else ():
            if not note.startswith("without "):
                by_note.setdefault(note, []).append(code)
    for note, codes in by_note.items():
        summary.append(f"{note} ({', '.join(codes)})")
    ran = [code for code, c in checks.items() if c["ran"]]
    out: dict[str, Any] = {"ran": ran, "checks": checks, "summary": summary}
    if source is not None:
        out["source"] = source
    return out
