"""Autosave: a run killed without a chance to write its report (SIGKILL: the OOM
killer, a scheduler past its grace period) leaves a valid partial report no older
than one autosave interval; a kill during a write leaves the previous complete file;
a write that fails warns once and training goes on."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch
import torch.nn as nn

import gradvitals as gv
from gradvitals import autosave as autosave_mod
from gradvitals.report import Report, schema

from conftest import gradvitals_cmd

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_forever.py"
VALIDATOR = jsonschema.Draft202012Validator(schema())
INTERVAL_S = 0.3
#: Allowance beyond one interval between the kill and the saved step, for the write
#: itself and the step in progress, on a shared 2-core machine running several of
#: these processes at once: measured there at load 14, steps took up to 0.25 s and
#: writes 0.01-0.05 s (a quiet machine needs ~0.05 s in all).
WRITE_SLACK_S = 1.5


def _start(tmp_path: Path, out: Path, *, watch: bool, extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    progress = tmp_path / f"progress-{time.monotonic_ns()}.txt"
    if watch:
        cmd = [sys.executable, str(SCRIPT), "--watch", str(out), "--autosave", str(INTERVAL_S)]
    else:
        cmd = [*gradvitals_cmd(), "run", "-q", "--autosave", str(INTERVAL_S), "--json", str(out), str(SCRIPT)]
    cmd += ["--progress", str(progress), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(gv.__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return proc, progress


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first autosave: {proc.stderr.read().decode()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("no autosave within the time-out")
        time.sleep(0.01)


def _progress(path: Path) -> list[tuple[int, float]]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), float(parts[1])))
    return out


def _check_partial(out: Path, progress: Path, t_kill: float) -> dict:
    """The file at ``out`` after a kill at ``t_kill``: a whole, schema-valid partial
    report whose steps are those the run had done at most one interval (plus the
    write) before the kill, and none it had not done."""
    data = json.loads(out.read_text())
    VALIDATOR.validate(data)
    run = data["run"]
    assert run["complete"] is False and run["ended"] is None
    steps = run["steps"]
    assert run["last_step"] == steps - 1
    done = _progress(progress)
    done_at_kill = max((n for n, t in done if t <= t_kill), default=0)
    floor = max((n for n, t in done if t <= t_kill - INTERVAL_S - WRITE_SLACK_S), default=0)
    # (+1: the snapshot is taken inside optimizer.step, before the script writes its
    # progress line; the writer process lands it even when the kill comes in between)
    assert floor <= steps <= done_at_kill + 1, (floor, steps, done_at_kill)
    # The series hold those steps: the loss up to the last one saved.
    assert data["series"]["loss"]["count"] == steps
    rep = Report.load(out)  # and it loads as any report
    assert rep.record.steps == steps
    return data


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended since the listing
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _kill_writer_and_run(proc: subprocess.Popen) -> None:
    """SIGKILL the autosave's writer process (it writes the file; it would finish a
    write the training process's death interrupts) and then the run: a node lost."""
    for child in _children(proc.pid):
        os.kill(child, signal.SIGKILL)
    proc.send_signal(signal.SIGKILL)


def _tmp_files(out: Path) -> list[str]:
    return [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.") and n.endswith(".tmp")]


def test_sigkill_at_random_moments_leaves_a_recent_partial_report(tmp_path):
    """Started together (their start-up overlaps): two runs under `gradvitals run
    --json` and two under gv.watch(path=...), each SIGKILLed at a random moment after its
    second autosave; one SIGKILLed with its writer process the moment an autosave's
    temporary file appears (a larger record, so a write takes a while), which must
    leave the previous complete file; one SIGTERMed, whose final report is complete."""
    rng = random.Random(26)
    runs = []
    for k, how in enumerate(["run", "run", "watch", "watch", "sigterm", "write"]):
        out = tmp_path / f"r{k}.json"
        extra = ["--layers", "24", "--every", "1", "--sleep", "0"] if how == "write" else ["--sleep", "0.01"]
        proc, progress = _start(tmp_path, out, watch=how == "watch", extra=extra)
        runs.append({"how": how, "out": out, "proc": proc, "progress": progress,
                     "delay": 0.0 if how == "sigterm" else rng.uniform(0.0, 3 * INTERVAL_S)})
    try:
        waiting = list(runs)
        t0 = time.monotonic()
        while waiting:
            # (a time-out, not the expected time: ~60-100 s on this project's loaded 2-core machine)
            assert time.monotonic() - t0 < 300, "no second autosave within the time-out"
            for r in list(waiting):
                if r["proc"].poll() is not None:
                    raise AssertionError(f"a run ended before it was killed: {r['proc'].stderr.read().decode()}")
                now = time.monotonic()
                if "first" not in r and r["out"].exists():
                    # From the second autosave on (the steady state): the first one waits
                    # for the run's first step, which traces the model.
                    ino = r["out"].stat().st_ino
                    if r.setdefault("ino", ino) != ino:
                        r["first"] = now
                        r["before"] = r["out"].read_bytes()
                if "first" not in r:
                    continue
                if r["how"] == "write":
                    due = bool(_tmp_files(r["out"])) or now - r["first"] > 30
                else:
                    due = now >= r["first"] + r["delay"]
                if due:
                    r["t_kill"] = time.monotonic()
                    if r["how"] == "write":
                        _kill_writer_and_run(r["proc"])
                    else:
                        r["proc"].send_signal(signal.SIGTERM if r["how"] == "sigterm" else signal.SIGKILL)
                    waiting.remove(r)
            time.sleep(0.001 if any(r["how"] == "write" for r in waiting) else 0.005)
    finally:
        for r in runs:
            if r["proc"].poll() is None and "t_kill" not in r:
                r["proc"].kill()
            r["proc"].wait(timeout=60)
    for r in runs:
        if r["how"] == "sigterm":
            assert r["proc"].returncode == 143
            data = json.loads(r["out"].read_text())
            VALIDATOR.validate(data)
            run = data["run"]
            assert run["complete"] is True and run["ended"] == "SIGTERM"
            # (the signal may land between the optimizer step and the script's progress line)
            assert run["steps"] - max(n for n, _ in _progress(r["progress"])) in (0, 1)
            assert run["last_step"] == run["steps"] - 1
            continue
        assert r["proc"].returncode == -signal.SIGKILL
        data = _check_partial(r["out"], r["progress"], r["t_kill"])
        if r["how"] == "write":
            r["caught"] = bool(_tmp_files(r["out"]))  # the kill interrupted a write
            assert data["run"]["steps"] >= json.loads(r["before"])["run"]["steps"]
    # `gradvitals report` reads a partial report like any other, and says it is partial.
    p = subprocess.run([*gradvitals_cmd(), "report", str(runs[0]["out"])], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "Partial report: autosaved at" in p.stderr
    if not runs[-1]["caught"]:
        _kill_during_a_write(tmp_path)


def _kill_during_a_write(tmp_path: Path, attempts: int = 2) -> None:
    """Alone (the concurrent kill above missed the write's window): kill the moment an
    autosave's temporary file appears, until a kill lands inside a write."""
    for attempt in range(attempts):
        out = tmp_path / f"w{attempt}.json"
        proc, progress = _start(tmp_path, out, watch=False, extra=["--layers", "24", "--every", "1", "--sleep", "0"])
        try:
            _wait_for(out, proc)
            before = json.loads(out.read_bytes())
            t0 = time.monotonic()
            # Spin, not sleep: the kill must land inside the write's window, milliseconds long.
            while time.monotonic() - t0 < 30 and not _tmp_files(out) and proc.poll() is None:
                continue
        finally:
            t_kill = time.monotonic()
            _kill_writer_and_run(proc)
            proc.wait(timeout=60)
        if _tmp_files(out):
            data = _check_partial(out, progress, t_kill)
            assert data["run"]["steps"] >= before["run"]["steps"]
            return
    raise AssertionError(f"no kill landed inside a write in {attempts + 1} attempts")


def _mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    return m, torch.optim.SGD(m.parameters(), lr=1e-2)


def _train(m: nn.Module, opt: torch.optim.Optimizer, steps: int, pause_s: float = 0.0,
           during: object = None) -> list[float]:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if during is not None:
            during(i)
        if pause_s:
            time.sleep(pause_s)
    return losses


def test_folder_removed_mid_run_warns_once_and_training_goes_on(tmp_path, caplog):
    folder = tmp_path / "reports"
    folder.mkdir()
    out = folder / "r.json"
    m, opt = _mlp()
    losses: list[float] = []
    with caplog.at_level(logging.WARNING, logger="gradvitals"):
        w = gv.watch(m, opt, path=out, autosave_s=0.02)
        try:
            saver = w._recorder.autosave
            t0 = time.monotonic()
            while not out.exists() and time.monotonic() - t0 < 60:
                losses += _train(m, opt, 5, pause_s=0.002)
            # The path becomes unwritable mid-run: the folder moves away in one rename (an
            # rmtree races the writer's next temporary file: "Directory not empty").
            folder.rename(tmp_path / "moved")
            while saver.failures < 2 and time.monotonic() - t0 < 120:
                losses += _train(m, opt, 5, pause_s=0.002)
        finally:
            w.close()  # the final write fails too: warned, not raised
    plain_m, plain_opt = _mlp()
    assert losses == _train(plain_m, plain_opt, len(losses))  # the run's numbers are its own
    assert saver.saves >= 1 and saver.failures >= 2
    autosave_warnings = [r for r in caplog.records if "could not autosave" in r.getMessage()]
    assert len(autosave_warnings) == 1
    assert any("could not write the report" in r.getMessage() for r in caplog.records)
    assert [e["probe"] for e in w.record.events_of("probe_error")] == ["autosave"]


def test_disk_full_warns_once_then_saves_again_when_space_returns(tmp_path, caplog, monkeypatch):
    out = tmp_path / "r.json"
    real = autosave_mod.write_atomic
    calls = {"n": 0}

    def full_disk_for_a_while(path, text):
        calls["n"] += 1
        if 2 <= calls["n"] <= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(autosave_mod, "write_atomic", full_disk_for_a_while)
    monkeypatch.setattr(autosave_mod, "WRITER_PROCESS", False)  # the in-process writer (its fallback)
    m, opt = _mlp()
    with caplog.at_level(logging.WARNING, logger="gradvitals"):
        with gv.watch(m, opt, path=out, autosave_s=0.01) as w:
            saver = w._recorder.autosave
            t0 = time.monotonic()
            while calls["n"] < 6 and time.monotonic() - t0 < 30:
                _train(m, opt, 5, pause_s=0.003)
    assert saver.failures == 3 and saver.saves >= 2
    assert len([r for r in caplog.records if "could not autosave" in r.getMessage()]) == 1
    data = json.loads(out.read_text())
    assert data["run"]["complete"] is True and data["run"]["ended"] == "closed"


def test_two_runs_one_path_never_leave_a_broken_file(tmp_path):
    """Both write the same path every 0.3 s: every read in between is one whole report
    (of one run or the other), and the last writer's is what stays."""
    out = tmp_path / "same.json"
    procs = [_start(tmp_path, out, watch=False, extra=["--steps", "150", "--sleep", "0.005", "--layers", str(3 + i)])
             for i in range(2)]
    reads = 0
    seen_layers = set()
    while any(p.poll() is None for p, _ in procs):
        if out.exists():
            data = json.loads(out.read_text())  # never a torn file
            VALIDATOR.validate(data)
            seen_layers.add(len(data["layers"]))
            reads += 1
        time.sleep(0.02)
    for p, _ in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()
    data = json.loads(out.read_text())
    assert data["run"]["complete"] is True and data["run"]["steps"] == 150
    assert reads > 5 and len(seen_layers) >= 1


def test_off_writes_nothing_until_the_end(tmp_path):
    out = tmp_path / "r.json"
    m, opt = _mlp()
    with gv.watch(m, opt, path=out, autosave_s=0) as w:
        assert w._recorder.autosave is None
        _train(m, opt, 20, pause_s=0.002)
        assert not out.exists()
    assert json.loads(out.read_text())["run"]["complete"] is True
    with pytest.raises(ValueError, match="autosave_s"):
        gv.watch(m, opt, path=out, autosave_s=-1)


def test_writer_process_killed_falls_back_to_writing_in_process(tmp_path, caplog):
    out = tmp_path / "r.json"
    m, opt = _mlp()
    with caplog.at_level(logging.WARNING, logger="gradvitals"):
        with gv.watch(m, opt, path=out, autosave_s=0.02) as w:
            saver = w._recorder.autosave
            assert saver._helper is None  # started with the first save, not before
            t0 = time.monotonic()
            while saver.saves < 2 and time.monotonic() - t0 < 60:
                _train(m, opt, 5, pause_s=0.005)
            helper = saver._helper
            assert helper is not None and helper.poll() is None
            helper.kill()
            helper.wait()
            before = saver.saves
            t0 = time.monotonic()
            while saver.saves < before + 2 and time.monotonic() - t0 < 60:
                _train(m, opt, 5, pause_s=0.005)
            assert saver.saves >= before + 2  # written here now
            partial = json.loads(out.read_text())
            assert partial["run"]["complete"] is False
    assert len([r for r in caplog.records if "could not autosave" in r.getMessage()]) == 1
    assert json.loads(out.read_text())["run"]["complete"] is True


def test_the_writer_process_imports_no_torch():
    """Its start-up is cheap and its memory small: record, rules and reports only."""
    code = ("import sys, gradvitals._autosave_writer, gradvitals.diagnose, gradvitals.reports.html; "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "False", p.stderr
