"""Autosave: the report rewritten while the run goes on.

A run that ends without a chance to write its report (SIGKILL, the kernel's OOM
killer, a scheduler's SIGKILL after its grace period, a node lost, a notebook kernel
restarted) leaves the last autosave: a complete, schema-valid report of the run up to
at most ``interval_s`` before it ended, marked ``run.complete: false``.

How it stays off the training's path:

- :meth:`Autosave.tick` runs on the training thread at each step boundary
  (``StepClock.advance``, via the recorder); until a save is due it is one clock read.
- When one is due, the training thread takes a snapshot of the record
  (:meth:`Record.snapshot`: two array copies per series, 25 ms for 1,233 series of
  1,000 points) and hands it to one background thread, which pickles it to a writer
  process of its own (:mod:`gradvitals._autosave_writer`, no torch, started at the
  first save). That process diagnoses it, serialises it and writes it with
  :func:`gradvitals.report.write_atomic` (a temporary file in the same folder, fsync,
  ``os.replace``): a kill at any moment leaves the previous complete file. (Diagnosed
  and encoded in a thread, a long run's record held the training's GIL for seconds.)
  Without the writer process (it cannot start, or died) the thread writes. A save
  still being written when the next falls due is not queued: the next step boundary
  after it lands takes the snapshot.
- Nothing here touches a device or a process group: the record is already on the host
  (and already merged across ranks under torchrun, where rank 0 alone writes).

Two runs given the same path: each write is a whole file renamed into place, so the
path always holds one complete report, the one whose rename came last (last writer
wins). A failed write (disk full, the folder removed or made read-only) is warned
about once; training goes on and later saves are still tried.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import distributed
from .report import Report, write_atomic

log = logging.getLogger("gradvitals")

#: Default seconds between autosaves: a killed run loses at most about a minute, and
#: a save's cost (snapshot on the training thread, ~0.1-1 s of work beside it for a
#: long run's record) is a small fraction of that minute (benchmarks/README.md).
DEFAULT_INTERVAL_S = 60.0
#: Diagnose and serialise in a writer process of its own (gradvitals._autosave_writer):
#: in a thread of the training process, the JSON encoding of a long run's record
#: (~2.6 s for 1,000,000 steps x 100 layers) held the GIL the training thread needs
#: between its ops, and training all but stopped while it ran. False: that thread.
WRITER_PROCESS = True
#: Seconds stop() gives the writer process to end after its SIGTERM (it finishes a
#: file it is replacing: ~0.1-0.2 s for a 22 MB report) before it is killed. Its
#: handler runs only between bytecodes, i.e. after a json.dumps of seconds; a kill is
#: as safe (the rename is atomic; at worst a stray temporary file) and keeps a
#: preempted run's final write from waiting on it.
HELPER_STOP_S = 0.5


class Autosave:
    """Rewrites the report at ``json_path`` (and ``html_path``) every ``interval_s``
    seconds of wall time. Attach with ``recorder.autosave = Autosave(...)``; the
    recorder calls :meth:`tick` at each step boundary and :meth:`stop` when it closes,
    before the final report is written."""

    def __init__(self, json_path: str | os.PathLike[str] | None, html_path: str | os.PathLike[str] | None = None,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if not json_path and not html_path:
            raise ValueError("autosave needs a JSON or an HTML path")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.json_path = Path(json_path) if json_path else None
        self.html_path = Path(html_path) if html_path else None
        self.interval_s = float(interval_s)
        self._due = time.monotonic() + self.interval_s
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # held while a file is being replaced
        self._job: Any = None  # the snapshot waiting for the writer
        self._busy = False  # a snapshot is being diagnosed / written
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._warned = False
        self._recorder: Any = None
        self._helper: Any = None  # the writer process (subprocess.Popen), started at the first save
        self._helper_failed = False
        self.saves = 0  # completed writes of the JSON (or HTML) report
        self.failures = 0

    # -------------------------------------------------- the training thread
    def tick(self, recorder: Any) -> None:
        """At a step boundary: snapshot the record if a save is due. Never raises."""
        now = time.monotonic()
        if now < self._due or self._busy or self._stopped:
            # (a save still being written is never queued behind: the next step boundary
            # after it lands takes the snapshot, so the file lags a kill by at most about
            # one interval plus one write)
            return
        self._due = now + self.interval_s
        try:
            if not distributed.writes_report():
                return  # torchrun: rank 0 writes the merged record; the others nothing
            recorder.sync()  # host-side only: the ring's waiting gradient norms
            snap = recorder.record.snapshot()
            recorder.stamp(snap)
            run = snap.run
            run["complete"] = False
            run["ended"] = None  # still running when saved: how it ended is not known here
            run["last_step"] = snap.steps - 1 if snap.steps else None
            run["autosaved_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            run["autosave_interval_s"] = self.interval_s
            run["pid"] = os.getpid()
        except Exception as exc:
            self._warn(recorder, exc)
            return
        self._recorder = recorder
        with self._cond:
            self._job = snap
            self._busy = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gradvitals-autosave", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        """No autosave after this returns: a file being replaced is finished (the
        writer process ends at once otherwise, whatever it was diagnosing), a pending
        snapshot is dropped. Idempotent."""
        with self._cond:
            self._stopped = True
            self._job = None
            self._cond.notify_all()
        helper = self._helper
        if helper is not None and helper.poll() is None:
            try:
                helper.send_signal(signal.SIGTERM)
                helper.wait(timeout=HELPER_STOP_S)
            except Exception:
                helper.kill()
                helper.wait()
        with self._write_lock:
            pass

    # -------------------------------------------------------- the writer
    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    self._busy = False
                    return
                snap, self._job = self._job, None
            try:
                try:
                    sent = self._send(snap)
                except _WriterGone as exc:
                    self._warn(self._recorder, exc)
                    sent = False
                if not sent:
                    self._write(snap)  # no writer process: here, beside the training
            except Exception as exc:
                if not self._stopped:
                    self._warn(self._recorder, exc)
            finally:
                with self._cond:
                    self._busy = False

    def _send(self, snap: Any) -> bool:
        """Hand ``snap`` to the writer process and wait for its answer (this thread
        waits in a pipe read, without the GIL). False when there is no writer process."""
        helper = self._start_helper()
        if helper is None:
            return False
        if helper.poll() is not None:
            self._helper_failed = True
            raise _WriterGone(f"the autosave writer process ended (status {helper.poll()}); saving from a thread")
        blob = pickle.dumps((snap, self.json_path and str(self.json_path), self.html_path and str(self.html_path)),
                            protocol=pickle.HIGHEST_PROTOCOL)
        try:
            helper.stdin.write(len(blob).to_bytes(8, "little"))
            helper.stdin.write(blob)
            helper.stdin.flush()
            reply = helper.stdout.readline().strip()
        except (BrokenPipeError, OSError, ValueError):
            reply = ""
        if reply == "ok":
            self.saves += 1
            return True
        if not reply:  # the writer is gone, not stopped by us: write here from now on
            if self._stopped:
                return True
            self._helper_failed = True
            raise _WriterGone(f"the autosave writer process ended (status {helper.wait()}); saving from a thread")
        raise OSError(reply[4:] if reply.startswith("err ") else reply)

    def _start_helper(self) -> Any:
        if self._helper is not None or self._helper_failed:
            return None if self._helper_failed else self._helper
        if not WRITER_PROCESS or not sys.executable:
            return None
        src = str(Path(__file__).resolve().parents[1])
        code = f"import sys; sys.path.insert(0, {src!r}); from gradvitals._autosave_writer import main; main()"
        try:
            helper = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            self._helper_failed = True
            return None
        helper.stdout = io.TextIOWrapper(helper.stdout, encoding="utf-8")  # type: ignore[assignment]
        self._helper = helper
        return helper

    def _write(self, snap: Any) -> None:
        report = Report.from_record(snap)
        data = report.to_json()
        if self.json_path is not None:
            text = json.dumps(data, allow_nan=False, separators=(",", ":"))
            with self._write_lock:
                if self._stopped:
                    return
                write_atomic(self.json_path, text)
        if self.html_path is not None:
            from .reports.html import render_html

            page = render_html(data)
            with self._write_lock:
                if self._stopped:
                    return
                write_atomic(self.html_path, page)
        self.saves += 1

    def _warn(self, recorder: Any, exc: BaseException) -> None:
        self.failures += 1
        if self._warned:
            return
        self._warned = True
        where = self.json_path or self.html_path
        log.warning("gradvitals: could not autosave the report to %s (%s: %s); training continues, "
                    "later autosaves are still tried", where, type(exc).__name__, exc)
        if recorder is not None:
            recorder.record.event("probe_error", probe="autosave", error=f"{type(exc).__name__}: {exc}",
                                  step=recorder.step)


class _WriterGone(RuntimeError):
    """The writer process ended without being stopped (killed, crashed)."""


def attach(recorder: Any, json_path: str | os.PathLike[str] | None, html_path: str | os.PathLike[str] | None,
           interval_s: float | None) -> Autosave | None:
    """Autosave ``recorder``'s report to the given paths when there is one and the
    interval is on (``None`` or 0: off)."""
    if not interval_s or not (json_path or html_path):
        return None
    from . import diagnose  # noqa: F401  (imported here, not by the first save: its imports take the GIL)

    # (the writer process starts with the first save: a run shorter than the interval
    # never pays for it)
    recorder.autosave = Autosave(json_path, html_path, interval_s)
    return recorder.autosave


#: How a run's end is named in ``run.ended`` (the final report; an autosave has None).
ENDINGS = ("finished", "exception", "sys.exit", "KeyboardInterrupt", "SIGTERM", "stopped", "closed")


def mark_complete(record: Any, ended: str) -> None:
    """Mark ``record`` as the run's final report: complete, how it ended (one of
    :data:`ENDINGS`), its last step."""
    record.run["complete"] = True
    record.run["ended"] = ended
    record.run["last_step"] = record.steps - 1 if record.steps else None
