"""Read the logs a training run already wrote into a :class:`~gradvitals.record.Record`.

One entry point, :func:`load_any`: a gradvitals JSON report, a TensorBoard log dir or
event file, a Hugging Face ``trainer_state.json`` (or the output/checkpoint dir holding
it), a Lightning log dir / ``metrics.csv``, or a generic CSV / JSONL file (one row per
step). The readers name each log key by the conventions in :mod:`.names` (overridden by
``mapping``: log key -> ``quantity`` or ``quantity/<name>``) and build the Record with
the recorder's series keys, so the rules and renderers read it unchanged.

No torch here (the TensorBoard reader imports tensorboard's own data API on demand).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..record import Record
from .errors import LogError
from .names import KeyMap, parse_mapping


@dataclass
class Imported:
    """What :func:`load_any` read: the record and where its numbers came from."""

    record: Record
    #: The file read (for a folder: the file chosen in it).
    path: str
    #: "gradvitals", "hf_trainer_state", "tensorboard", "lightning_csv", "csv", "jsonl".
    format: str
    #: series key -> the log key it was read from (empty for a gradvitals report).
    sources: dict[str, str] = field(default_factory=dict)
    #: Log keys that name no vital sign (accuracy, epoch, eval loss...): not read.
    ignored: list[str] = field(default_factory=list)
    #: The saved report itself, for a gradvitals JSON (its findings as the run made them).
    report: Any = None


def load_any(path: str | os.PathLike[str], mapping: Mapping[str, str] | KeyMap | None = None) -> Imported:
    """Read the log at ``path`` (a file or a folder) into a Record.

    ``mapping``: log key -> gradvitals quantity (``{"objective": "loss",
    "gnorm": "grad_norm_global"}``; ``"grads/*": "grad_norm"`` maps every key under
    ``grads/`` to a per-parameter ``grad_norm/<rest>``). Raises :class:`LogError`
    (a ValueError whose message is one line naming the file) for a log it cannot
    read or a mapping to an unknown quantity.
    """
    from . import detect

    keys = mapping if isinstance(mapping, KeyMap) else parse_mapping(mapping or {})
    return detect.read(Path(path), keys)


__all__ = ["Imported", "LogError", "load_any"]
