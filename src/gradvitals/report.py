"""The report: a record plus its findings, in the JSON contract ``gradvitals.report/1``.

No torch: a saved report can be loaded, re-diagnosed and re-rendered anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .findings import Finding
from .record import SCHEMA, Record


@dataclass
class Report:
    """Findings over a record. ``to_json()`` is the stable contract (DESIGN.md)."""

    record: Record
    findings: list[Finding] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "trials"

    @classmethod
    def from_record(cls, record: Record) -> Report:
        from .diagnose import diagnose

        return cls(record=record, findings=diagnose(record))

    @classmethod
    def from_json(cls, data: dict[str, Any], *, rediagnose: bool = False) -> Report:
        record = Record.from_json(data)
        if rediagnose:
            return cls.from_record(record)
        findings = [Finding.from_json(f) for f in data.get("findings", [])]
        extra = {k: v for k, v in data.items() if k not in ("schema", "run", "layers", "series", "findings")}
        return cls(record=record, findings=findings, extra=extra)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_json(data)

    @property
    def verdict(self) -> str:
        from .diagnose import verdict

        return verdict(self.findings)

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity in ("critical", "warning")]

    def to_json(self) -> dict[str, Any]:
        out = self.record.to_json()
        out["run"]["verdict"] = self.verdict
        out["findings"] = [f.to_json() for f in self.findings]
        out.update(self.extra)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_atomic(path, json.dumps(self.to_json(), allow_nan=False, separators=(",", ":")))

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from .reports.terminal import render

        yield from render(self)


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write text so that ``path`` is either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def check_writable(path: str | os.PathLike[str]) -> str | None:
    """None if a report can be written at ``path``; otherwise why not (said at start)."""
    p = Path(path)
    if p.exists() and p.is_dir():
        return f"{p} is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        return f"folder {parent} does not exist"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".gradvitals-check.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot write in {parent}: {exc.strerror or exc}"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{p} is not writable"
    return None


def schema_id() -> str:
    return SCHEMA


def schema() -> dict[str, Any]:
    """The JSON Schema of ``gradvitals.report/1`` (shipped as package data), so tools
    that read reports can validate them: ``jsonschema.validate(report, schema())``."""
    from importlib import resources

    text = resources.files("gradvitals").joinpath("schema/report-1.json").read_text(encoding="utf-8")
    return json.loads(text)
