"""Which reader a path needs, and the readers of the formats without a library of their own."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator

from .build import Builder, natural_key
from .errors import LogError
from .names import KeyMap

#: Columns (or JSON keys) that number the rows, by preference. ``_step``: Weights &
#: Biases exports; ``trainer/global_step``: Lightning's WandbLogger.
STEP_KEYS = ("step", "global_step", "trainer/global_step", "_step", "iteration", "iter")

_TB_MARK = "tfevents"


def read(path: Path, mapping: KeyMap) -> Any:
    if not path.exists():
        raise LogError(path, "no such file or folder")
    if path.is_dir():
        path = _pick_in_folder(path)
    name = path.name.lower()
    if _TB_MARK in name or path.is_dir():
        from .tensorboard import read_tensorboard

        return read_tensorboard(path, mapping)
    text = _read_text(path)
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return _read_rows(path, _jsonl_rows(path, text), mapping, "jsonl")
    if name.endswith(".json"):
        return _read_json(path, text, mapping)
    if name.endswith(".csv") or name.endswith(".tsv"):
        fmt = "lightning_csv" if name == "metrics.csv" else "csv"
        return _read_rows(path, _csv_rows(path, text), mapping, fmt)
    raise LogError(path, "not a log gradvitals reads (a gradvitals .json report, trainer_state.json, "
                         "a TensorBoard event file, a .csv or a .jsonl file)")


def _pick_in_folder(folder: Path) -> Path:
    """The log a folder holds: an HF output dir's trainer_state.json (or its newest
    checkpoint's), TensorBoard event files (the newest run's folder), or Lightning's
    metrics.csv (the newest version's)."""
    state = folder / "trainer_state.json"
    if state.is_file():
        return state
    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                         key=lambda p: natural_key(p.name))
    if checkpoints:
        return checkpoints[-1] / "trainer_state.json"
    events = [p for p in folder.rglob(f"*{_TB_MARK}*") if p.is_file()]
    if events:
        newest = max(events, key=lambda p: (p.stat().st_mtime, p.name))
        return newest.parent
    metrics = [p for p in folder.rglob("metrics.csv") if p.is_file()]
    if metrics:
        return max(metrics, key=lambda p: (natural_key(str(p.parent)), p.stat().st_mtime))
    raise LogError(folder, "no log found in this folder (no trainer_state.json, checkpoint-*/, "
                           "TensorBoard event file or metrics.csv)")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LogError(path, f"cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LogError(path, f"not a text file (byte {exc.start} is not UTF-8): corrupt, or not this kind "
                             "of log") from None


def _read_json(path: Path, text: str, mapping: KeyMap) -> Any:
    from . import Imported

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        ended = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        cut = " (cut off: the file ends mid-value)" if ended and text.strip() else ""
        raise LogError(path, f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{cut}") from None
    if isinstance(data, dict) and isinstance(data.get("schema"), str) and data["schema"].startswith("gradvitals."):
        from ..report import Report

        try:
            report = Report.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise LogError(path, str(exc)) from None
        return Imported(record=report.record, path=str(path), format="gradvitals", report=report)
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        return _read_trainer_state(path, data, mapping)
    raise LogError(path, "JSON, but neither a gradvitals report (\"schema\": \"gradvitals.report/1\") nor a "
                         "Hugging Face trainer_state.json (\"log_history\")")


def _read_trainer_state(path: Path, data: dict[str, Any], mapping: KeyMap) -> Any:
    """HF Trainer: ``log_history`` holds one entry per logging step (``loss``,
    ``grad_norm``, ``learning_rate``, ``step``: optimizer steps done, from 1), eval
    entries (``eval_*``) and a closing summary (``train_runtime``, ``train_loss``: the
    mean over the run, not a step's loss)."""
    b = Builder(mapping)
    for entry in data["log_history"]:
        if not isinstance(entry, dict) or "train_runtime" in entry:
            continue
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key, value in entry.items():
            if key not in ("step", "epoch"):
                # gradvitals counts optimizer steps from 0: HF's step k is the k-th step's log.
                b.add(key, max(step - 1, 0), value)
    run = {"imported": {"format": "hf_trainer_state", "path": str(path)}}
    if isinstance(data.get("logging_steps"), int):
        run["imported"]["logging_steps"] = data["logging_steps"]
    return _finish(path, b, run, "hf_trainer_state")


def _finish(path: Path, b: Builder, run: dict[str, Any], fmt: str) -> Any:
    from . import Imported

    if not b.series:
        seen = ", ".join(list(b.ignored)[:8]) or "none"
        raise LogError(path, f"no training loss or gradient norm in it (keys: {seen}); name them with "
                             "--map LOG_KEY=QUANTITY")
    record = b.record(run)
    return Imported(record=record, path=str(path), format=fmt, sources=dict(b.sources), ignored=list(b.ignored))


def _csv_rows(path: Path, text: str) -> Iterator[dict[str, Any]]:
    dialect = "excel-tab" if path.name.lower().endswith(".tsv") else "excel"
    if "\x00" in text:
        raise LogError(path, "not a CSV file (it holds NUL bytes): corrupt, or not this kind of log")
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    try:
        header = reader.fieldnames
        if not header:
            raise LogError(path, "empty: no header row")
        for row in reader:
            if None in row:
                raise LogError(path, f"line {reader.line_num} has more cells than the header's {len(header)}")
            yield row
    except csv.Error as exc:
        raise LogError(path, f"not a readable CSV file at line {reader.line_num}: {exc}") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LogError(path, f"line {n} is not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LogError(path, f"line {n} is not a JSON object")
        yield row


def _read_rows(path: Path, rows: Iterator[dict[str, Any]], mapping: KeyMap, fmt: str) -> Any:
    """One row per step (Lightning's CSVLogger writes one row per log call: a step's
    metrics can be spread over several rows, each with the cells it logged)."""
    b = Builder(mapping)
    step_key = None
    for i, row in enumerate(rows):
        if step_key is None:
            step_key = next((k for k in STEP_KEYS if k in row), "")
        step = _step_of(row.get(step_key), i) if step_key else i
        if step is None:
            continue
        for key, value in row.items():
            if key != step_key and key not in ("epoch",) and value not in ("", None):
                b.add(key, step, value)
    run = {"imported": {"format": fmt, "path": str(path), "step_column": step_key or None}}
    return _finish(path, b, run, fmt)


def _step_of(value: Any, index: int) -> int | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if math.isfinite(v) and v >= 0 else None
