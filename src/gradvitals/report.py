"""The report: a record plus its findings, in the JSON contract ``gradvitals.report/1``.

No torch: a saved report can be loaded, re-diagnosed and re-rendered anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .findings import Finding, verdict
from .record import SCHEMA, Record, json_safe

#: How ``rich`` prints a Report (``console.print(report)``): a renderer taking the
#: Report. Installed by the package facade (``gradvitals/__init__.py`` wires in the
#: terminal renderer), so this data layer imports no renderer.
rich_renderer: Callable[[Report], Iterable[Any]] | None = None
#: How a notebook shows a report (``_repr_html_``): the HTML page of a report dict.
#: Installed by the package facade (the HTML renderer), like ``rich_renderer``.
html_renderer: Callable[[dict[str, Any]], str] | None = None
#: Height of the inline report in a notebook; the frame scrolls inside it.
NOTEBOOK_FRAME_PX = 900


def notebook_html(data: dict[str, Any]) -> str:
    """The report page for a notebook cell's output: the whole self-contained page in an
    iframe's ``srcdoc``, sandboxed to scripts only, so its CSS and script cannot touch
    the notebook (nor the notebook's the report) and nothing is fetched."""
    import html

    if html_renderer is None:  # pragma: no cover - the package facade installs one
        raise TypeError("no HTML renderer installed for Report")
    page = html_renderer(data)
    return (f'<iframe class="gradvitals-report" sandbox="allow-scripts" srcdoc="{html.escape(page, quote=True)}" '
            f'style="width:100%;height:{NOTEBOOK_FRAME_PX}px;border:1px solid #ddd"></iframe>')


class ReportDict(dict):  # type: ignore[type-arg]
    """The JSON report as a plain ``dict`` (``watch.report()``) that a notebook shows
    as the HTML report instead of a screen of nested numbers."""

    def _repr_html_(self) -> str:
        return notebook_html(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        run = self.get("run") or {}
        p.text(f"<gradvitals report dict: {run.get('verdict', '')} ({len(self.get('series') or {})} series)>")


@dataclass
class Report:
    """Findings over a record. ``to_json()`` is the stable contract (docs/design.md)."""

    record: Record
    findings: list[Finding] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "trials"
    #: The rules that failed in the diagnosis that made ``findings`` (``{"rule",
    #: "error"}``); written as ``rule_error`` events of ``run.events``.
    rule_errors: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: Record) -> Report:
        from .diagnose import diagnose

        findings = diagnose(record)
        return cls(record=record, findings=list(findings), rule_errors=list(findings.rule_errors))

    @classmethod
    def from_json(cls, data: dict[str, Any], *, rediagnose: bool = False) -> Report:
        _check_shape(data)
        try:
            record = Record.from_json(data)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a valid {SCHEMA} report: {type(exc).__name__}: {exc}") from None
        if rediagnose:  # the saved diagnosis's failed rules go with its findings
            record.events = [e for e in record.events if not (isinstance(e, dict) and e.get("type") == "rule_error")]
            return cls.from_record(record)
        findings = [Finding.from_json(f) for f in data.get("findings", [])]
        extra = {k: v for k, v in data.items() if k not in ("schema", "run", "layers", "series", "findings")}
        return cls(record=record, findings=findings, extra=extra)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not JSON ({exc}); expected a {SCHEMA} report") from None
        return cls.from_json(data)

    @property
    def verdict(self) -> str:
        if self.untrained:
            # Not "Healthy": nothing was measured (the script printed its --help, failed
            # early, only evaluated).
            if self.record.layers:
                return "Nothing to diagnose: the script built a model but ran no backward() or optimizer step."
            return "Nothing to diagnose: the script ran no backward() or optimizer step (no model was seen)."
        return verdict(self.findings)

    @property
    def untrained(self) -> bool:
        """No gradient and no loss was recorded, and so no finding."""
        r = self.record
        return not self.findings and r.get("grad_norm_global") is None and r.get("loss") is None

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity in ("critical", "warning")]

    def to_json(self) -> dict[str, Any]:
        out = self.record.to_json()
        out["run"]["verdict"] = self.verdict
        out["run"]["events"].extend(json_safe({"type": "rule_error", **e}) for e in self.rule_errors)
        out["findings"] = [f.to_json() for f in self.findings]
        out.update(self.extra)
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_atomic(path, json.dumps(self.to_json(), allow_nan=False, separators=(",", ":")))

    def _repr_html_(self) -> str:
        """A notebook cell whose value is a Report shows the HTML report inline."""
        return notebook_html(self.to_json())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # the notebook's text/plain: the verdict, not the record
        p.text(f"<gradvitals Report: {self.verdict}>")

    def __rich_console__(self, console: Any, options: Any) -> Any:
        if rich_renderer is None:  # pragma: no cover - the package facade installs one
            raise TypeError("no terminal renderer installed for Report")
        yield from rich_renderer(self)


def partial_note(run: dict[str, Any]) -> str | None:
    """What a reader must know about a report that is not the run's final one (an
    autosave, ``run.complete: false``); None for a final report or one that does not say."""
    if run.get("complete") is not False:
        return None
    step = run.get("last_step")
    at = run.get("autosaved_at")
    return (f"Partial report: autosaved {f'at {at}, ' if at else ''}"
            f"{f'up to step {step}' if step is not None else 'before the first step'}. "
            "The run had not ended then; if it is not still running, it ended without writing its "
            "final report (SIGKILL, the OOM killer, a lost node, a restarted kernel).")


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write text so that ``path`` is either the old file or the whole new one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the report to {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as exc:  # name the report, not the temporary file
        raise type(exc)(exc.errno, f"cannot write the report to {path} ({check_writable(path) or exc.strerror})") from None
    try:
        # mkstemp creates 0600; the report gets the mode any file the user creates gets
        # (or the mode of the file it replaces), so that it can be shared or served.
        os.chmod(tmp, _mode_for(path))
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


def _mode_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    # Read, not set-and-restore: os.umask(0) would let another thread create a file with
    # mode 0666 in between. Linux states it in /proc; elsewhere set-and-restore it is.
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def check_folder(path: str | os.PathLike[str]) -> str | None:
    """None if files can be written in folder ``path`` (created if missing, as the
    TensorBoard writer would); otherwise why not (said at start, not at the first write)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a folder"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create it: {exc.strerror or exc}"
    return check_writable(p / "gradvitals-check")


#: The top-level fields of a report and the JSON type each must have.
_SHAPE: dict[str, type] = {"run": dict, "layers": list, "series": dict, "findings": list}


def _check_shape(data: Any) -> None:
    """One clear error for a file that is JSON but not a report (instead of an AttributeError)."""
    if not isinstance(data, dict):
        raise ValueError(f"not a {SCHEMA} report: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} report (schema={data.get('schema')!r})")
    for key, kind in _SHAPE.items():
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"not a valid {SCHEMA} report: {key!r} must be a JSON "
                             f"{'object' if kind is dict else 'array'}, got {type(data[key]).__name__}")


def schema() -> dict[str, Any]:
    """The JSON Schema of ``gradvitals.report/1`` (shipped as package data), so tools
    that read reports can validate them: ``jsonschema.validate(report, schema())``."""
    from importlib import resources

    text = resources.files("gradvitals").joinpath("schema/report-1.json").read_text(encoding="utf-8")
    return json.loads(text)
