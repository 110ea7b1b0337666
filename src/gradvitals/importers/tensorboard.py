"""TensorBoard event files, read with tensorboard's own record reader and protobufs.

The reader is ``tensorboard.compat.tensorflow_stub`` (what tensorboard's
``event_file_loader`` uses without TensorFlow), called directly because the loader
swallows a corrupt record and stops without a word: a file of random bytes would read
as an empty log. Here a record that fails its checksum is an error naming the file;
only a cut-off last record (a run killed mid-write) is read up to the cut.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .build import Builder, natural_key
from .errors import LogError
from .names import KeyMap


def _scalar(value: Any) -> float | None:
    """The number a summary value holds: ``simple_value`` (torch's SummaryWriter) or
    a scalar tensor (TF2 / tensorboard's own summary writers)."""
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor"):
        from tensorboard.util import tensor_util

        try:
            arr = tensor_util.make_ndarray(value.tensor)
        except Exception:  # a string or image tensor: not a scalar
            return None
        if getattr(arr, "size", 0) == 1 and arr.dtype.kind in "fiu":
            return float(arr.reshape(()))
    return None


def read_tensorboard(path: Path, mapping: KeyMap) -> Any:
    try:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow
    except ImportError:  # pragma: no cover - tensorboard is a dependency of the extras
        raise LogError(path, "reading TensorBoard logs needs the tensorboard package: "
                             "pip install tensorboard") from None
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its reader logs each open
    files = sorted((p for p in path.iterdir() if p.is_file() and "tfevents" in p.name),
                   key=lambda p: natural_key(p.name)) if path.is_dir() else [path]
    if not files:
        raise LogError(path, "no TensorBoard event file (events.out.tfevents.*) in this folder")
    b = Builder(mapping)
    truncated = []
    for file in files:
        try:
            reader = pywrap_tensorflow.PyRecordReader_New(str(file), 0, b"", None)
        except Exception as exc:
            raise LogError(file, f"cannot open it as a TensorBoard event file ({exc})") from None
        read = 0
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            except errors.DataLossError as exc:
                if read and "truncated record" in str(exc):
                    truncated.append(str(file))  # the last record was being written when the run stopped
                    break
                where = f"after {read} readable records" if read else "at its first record"
                raise LogError(file, f"not a TensorBoard event file, or corrupt {where} "
                                     f"({str(exc).replace(str(file), '').strip()})") from None
            try:
                event = event_pb2.Event.FromString(reader.record())
            except Exception as exc:
                raise LogError(file, f"record {read + 1} is not a TensorBoard event ({exc})") from None
            read += 1
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                v = _scalar(value)
                if v is not None:
                    b.add(value.tag, int(event.step), v)
    run: dict[str, Any] = {"imported": {"format": "tensorboard", "path": str(path),
                                        "files": [str(f) for f in files]}}
    if truncated:
        run["imported"]["truncated"] = truncated
    from .detect import _finish

    return _finish(path, b, run, "tensorboard")
