"""The autosave's writer process: reads record snapshots from stdin, diagnoses each,
serialises it and writes it atomically; answers one line per snapshot on stdout.

A process of its own so that the diagnosis and the JSON encoding (seconds for a long
run's record) never hold the training process's GIL. No torch here. It ends at EOF
(the training process closed the pipe, or was killed: then the last snapshot it had
whole is still written) and on SIGTERM (from the training process's final write,
:meth:`gradvitals.autosave.Autosave.stop`): at once, unless a file is being replaced,
which is finished first, so that the path never holds part of a file.

Frames: 8 bytes little-endian length, then a pickled ``(Record, json_path, html_path)``.
"""

from __future__ import annotations

import pickle
import signal
import sys
from typing import Any, BinaryIO, TextIO

_writing = False
_stop = False


def _on_term(signum: int, frame: Any) -> None:
    global _stop
    _stop = True
    if not _writing:
        raise SystemExit(0)


def _read_exact(inp: BinaryIO, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        b = inp.read(left)
        if not b:
            return None
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def write_snapshot(snap: Any, json_path: str | None, html_path: str | None) -> None:
    """Diagnose ``snap`` and write its report(s) atomically (also used in-process)."""
    global _writing
    import json

    from .report import Report, write_atomic

    data = Report.from_record(snap).to_json()
    outputs = []
    if json_path:
        outputs.append((json_path, json.dumps(data, allow_nan=False, separators=(",", ":"))))
    if html_path:
        from .reports.html import render_html

        outputs.append((html_path, render_html(data)))
    for path, text in outputs:
        _writing = True
        try:
            if _stop:
                return
            write_atomic(path, text)
        finally:
            _writing = False
    if _stop:
        raise SystemExit(0)


def serve(inp: BinaryIO, out: TextIO) -> None:
    while True:
        head = _read_exact(inp, 8)
        if head is None:
            return
        blob = _read_exact(inp, int.from_bytes(head, "little"))
        if blob is None:
            return  # the run was killed mid-frame: nothing whole to write
        try:
            snap, json_path, html_path = pickle.loads(blob)
            write_snapshot(snap, json_path, html_path)
            reply = "ok"
        except Exception as exc:
            reply = f"err {type(exc).__name__}: {exc}".replace("\n", " ")
        try:
            out.write(reply + "\n")
            out.flush()
        except (BrokenPipeError, OSError):
            return


def main() -> None:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process
    try:
        serve(sys.stdin.buffer, sys.stdout)
    except SystemExit:
        pass


if __name__ == "__main__":
    main()
