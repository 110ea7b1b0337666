"""The live progress line: rate limit, terminal vs plain output, reads only fetched values."""

from __future__ import annotations

import io
import math

from _report_records import mlp_record

from gradvitals.diagnose import Findings
from gradvitals.findings import Finding
from gradvitals.reports.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_redraws_in_place_at_most_every_interval():
    clock, out = Clock(), Tty()
    p = Progress(out, clock=clock)
    assert p.interactive
    rec = mlp_record(depth=2, steps=5)
    for i in range(40):  # 40 flushes within 1 s at 4 updates/s
        clock.t = i * 0.025
        p.update(rec)
    assert p.updates == 4
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 4 and "\n" not in text
    last = text.split("\r\x1b[2K")[-1]
    assert last.startswith("gradvitals  step 5  loss 2.26  grad norm ")
    p.close()
    assert out.getvalue().endswith("\r\x1b[2K")


def test_plain_stream_gets_occasional_lines():
    clock, out = Clock(), io.StringIO()
    p = Progress(out, clock=clock)
    assert not p.interactive
    rec = mlp_record(depth=2, steps=3)
    for i in range(100):
        clock.t = i * 1.0  # 100 s of flushes, one per second
        p.update(rec)
    lines = out.getvalue().splitlines()
    assert len(lines) == 7  # t = 0, 15, 30, ..., 90
    assert all(l.startswith("gradvitals  step 3") for l in lines)
    p.close()
    assert "\r" not in out.getvalue()


def test_shows_last_fetched_values_and_findings_so_far(monkeypatch):
    rec = mlp_record(depth=2, steps=4)
    rec.add("loss", 4, math.nan)
    calls = []

    def fake_diagnose(record):
        calls.append(record.steps)
        # a failed rule comes back with the findings; the status line must not write it into the record
        return Findings([Finding(code="nonfinite", severity="critical", summary="s", advice="a", step=4)],
                        [{"rule": "x", "error": "boom"}])

    monkeypatch.setattr("gradvitals.diagnose.diagnose", fake_diagnose)
    clock, out = Clock(), io.StringIO()
    p = Progress(out, clock=clock, interval_s=1.0, findings_interval_s=10.0)
    n_events = len(rec.events)
    p.update(rec)
    assert "loss NaN" in out.getvalue() and "findings: 1 critical (nonfinite)" in out.getvalue()
    assert len(rec.events) == n_events
    for t in (2.0, 4.0, 6.0):  # the rules wait for their own interval
        clock.t = t
        p.update(rec)
    assert len(calls) == 1 and p.updates == 4
    clock.t = 11.0
    p.update(rec)
    assert len(calls) == 2


def test_never_raises_into_the_training():
    class Broken(io.StringIO):
        def write(self, s):
            raise OSError("stderr closed")

    p = Progress(Broken(), clock=Clock())
    p.update(mlp_record(depth=1, steps=1))
    p.update(mlp_record(depth=1, steps=1))
    assert p.updates == 0


def test_a_failing_rule_pass_leaves_the_line_running(monkeypatch):
    def broken(record):
        raise RuntimeError("rule crashed")

    monkeypatch.setattr("gradvitals.diagnose.diagnose", broken)
    clock, out = Clock(), io.StringIO()
    p = Progress(out, clock=clock, interval_s=1.0)
    for t in (0.0, 1.0, 2.0):
        clock.t = t
        p.update(mlp_record(depth=1, steps=2))
    assert p.updates == 3 and out.getvalue().count("findings: none") == 3
