"""Command line: ``gradvitals run | report`` (and ``checkup``, ``diagnose``, ``compare``, ``demo``).

Exit codes: the script's own status for ``run``; 2 for bad usage (click's
convention), with one line naming the bad argument and no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from . import __version__

_RUN_CONTEXT = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"gradvitals: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradvitals")
def main() -> None:
    """gradvitals: the vital signs of a PyTorch training run, and why it is failing."""


def _check_script_arg(script: str) -> None:
    """SCRIPT in the place of an option this command does not have (``--out x.json``):
    one message naming it (and the closest option) instead of "script not found"."""
    if not script.startswith("-") or os.path.exists(script):
        return
    import difflib

    ctx = click.get_current_context()
    names = [n for p in ctx.command.params if isinstance(p, click.Option) and not p.hidden for n in p.opts]
    name = script.split("=", 1)[0]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    _fail(f"no such option: {name}{hint}; gradvitals options come before SCRIPT, "
          f"see `gradvitals {ctx.info_name} --help`")


def _options(every: int | None, full: bool, tensorboard: str | None, autosave_s: float | None = None) -> Any:
    from .recorder import Options

    kwargs: dict[str, Any] = {"full": full, "tensorboard": tensorboard}
    if every is not None:
        kwargs["every"] = every
    if autosave_s is not None:
        kwargs["autosave_s"] = autosave_s
    try:
        return Options(**kwargs)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--every") from None


@main.command("run", context_settings=_RUN_CONTEXT)
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here.")
@click.option("--html", "html_path", metavar="PATH", help="Write the self-contained HTML report here.")
@click.option("--tensorboard", metavar="DIR", help="Also log per-layer scalars and findings to TensorBoard.")
@click.option("--every", type=int, metavar="N", help="Activation stats / update ratios every N steps (default 25; every 4N after step 1000).")
@click.option("--full", is_flag=True, help="Record every probe on every step (slower).")
@click.option("--autosave", "autosave_s", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Rewrite the --json/--html report every SECONDS while the script runs, so a run "
                   "killed without a chance to write it (SIGKILL, OOM, node loss) leaves one "
                   "(default 60; 0: off).")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but the script's own output.")
@click.option("--try-fixes", is_flag=True, help="Then re-run the script with each remedy the findings point to "
              "and show which one cures it.")
@click.option("--budget-steps", type=click.IntRange(min=1), metavar="N",
              help="Stop each run after N optimizer steps (with --try-fixes: each trial; default 200).")
@click.option("--trials", type=click.IntRange(min=1, max=20), default=5, show_default=True, metavar="K",
              help="With --try-fixes: at most K remedies.")
@click.option("--remedy", "remedy_json", hidden=True, help="(internal) apply one remedy in this run.")
@click.argument("script", metavar="SCRIPT")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
def run_cmd(json_path: str | None, html_path: str | None, tensorboard: str | None, every: int | None,
            full: bool, autosave_s: float | None, quiet: bool, try_fixes: bool, budget_steps: int | None, trials: int,
            remedy_json: str | None, script: str, args: tuple[str, ...]) -> None:
    """Run SCRIPT with ARGS unmodified and diagnose its training.

    Options before SCRIPT belong to gradvitals; everything after it goes to the script.
    Exits with the script's own status.
    """
    from .runner import ScriptRunner, UsageError, check_outputs

    _check_script_arg(script)
    options = _options(every, full, tensorboard, autosave_s)
    applier = None
    if remedy_json:
        from .prescribe import Remedy, RemedyApplier

        try:
            applier = RemedyApplier(Remedy.from_json(remedy_json), budget_steps)
        except (ValueError, json.JSONDecodeError) as exc:
            raise click.BadParameter(str(exc), param_hint="--remedy") from None
    runner = ScriptRunner(script, list(args), options,
                          budget_steps=None if try_fixes else budget_steps, remedy=applier)
    runner.autosave_paths = (json_path, html_path)
    from .distributed import writes_report

    if not quiet and writes_report():  # torchrun: rank 0's line only
        from .reports.progress import Progress

        runner.progress = Progress()  # live status line on stderr
    try:
        check_outputs({"--json": json_path, "--html": html_path})
        from .report import check_folder

        if tensorboard and (why := check_folder(tensorboard)):
            raise UsageError(f"--tensorboard {tensorboard}: cannot write there ({why})")
        runner.compile()
    except UsageError as exc:
        _fail(str(exc))
    result = runner.run()
    if runner.progress is not None:
        runner.progress.close()
    if try_fixes:
        from .prescribe import DEFAULT_BUDGET_STEPS, code_changes, render_table, try_fixes as _try

        def say(line: str) -> None:
            if not quiet:
                click.echo(line, err=True)

        found = _try(script, list(args), result.report.to_json(), budget=budget_steps or DEFAULT_BUDGET_STEPS,
                     trials=trials, echo=say)
        result.report.extra["trials"] = [t.to_json() for t in found]
        changes = code_changes(result.report.to_json())
        if changes:
            result.report.extra["code_changes"] = changes  # listed, not trialled
        if found and not quiet:
            from rich.console import Console

            console = Console(stderr=True, no_color="NO_COLOR" in os.environ)
            console.print(render_table(found))
            winner = next((t for t in found if t.winner), None)
            if winner is not None:
                console.print(f"Winner: {winner.label}. Make it permanent:\n{winner.snippet}", markup=False)
            else:
                console.print("No remedy both removed the critical findings and improved the loss "
                              "within the budget.")
    _write_and_summarise(result.report, json_path, html_path, quiet)
    sys.exit(result.status)


def _write_and_summarise(report: Any, json_path: str | None, html_path: str | None, quiet: bool) -> None:
    from .runner import write_outputs

    try:
        written = write_outputs(report, json_path, html_path)
    except OSError as exc:
        _fail(f"could not write the report: {exc}", code=1)
        return
    if not quiet:
        _summary(report, written)


def _summary(report: Any, written: list[str]) -> None:
    from rich.console import Console

    if os.environ.get("RANK", "0") not in ("0", ""):
        return  # torchrun: rank 0 prints the merged summary once (no torch import: `report` stays light)

    console = Console(stderr=True, no_color="NO_COLOR" in os.environ)
    console.rule("gradvitals")
    console.print(report)
    for path in written:
        console.print(f"report written to {path}", markup=False)


@main.command("report")
@click.argument("report_json", metavar="RUN.json", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", metavar="PATH", help="Render the HTML report here.")
@click.option("--rediagnose", is_flag=True, help="Re-run the rules on the saved record.")
@click.option("--quiet", "-q", is_flag=True)
def report_cmd(report_json: str, html_path: str | None, rediagnose: bool, quiet: bool) -> None:
    """Print (and optionally re-render as HTML) a saved JSON report."""
    from .report import Report, check_writable, write_atomic

    try:
        with open(report_json, encoding="utf-8") as fh:
            data = json.load(fh)
        report = Report.from_json(data, rediagnose=rediagnose)
    # A file that cannot be read exits 1, as for diagnose and compare (2 is a usage error).
    except FileNotFoundError:
        _fail(f"RUN.json: no such file: {report_json}", code=1)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(f"RUN.json: {report_json} is not JSON ({exc})", code=1)
    except (ValueError, KeyError, TypeError) as exc:
        _fail(f"RUN.json: {report_json} is not a gradvitals report ({exc})", code=1)
    if html_path:
        why = check_writable(html_path)
        if why:
            _fail(f"--html {html_path}: {why}")
        from .reports.html import render_html

        write_atomic(html_path, render_html(report.to_json()))
    if not quiet:
        _summary(report, [html_path] if html_path else [])


@main.command("diagnose")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--json", "json_path", metavar="OUT", help="Write the JSON report (with its coverage) here.")
@click.option("--html", "html_path", metavar="OUT", help="Write the self-contained HTML report here.")
@click.option("--map", "maps", multiple=True, metavar="LOG_KEY=QUANTITY",
              help="Read LOG_KEY as QUANTITY (e.g. --map objective=loss --map gnorm=grad_norm_global; "
                   "'grads/*=grad_norm': every key under grads/ is a parameter's gradient norm). Repeatable.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
def diagnose_cmd(paths: tuple[str, ...], json_path: str | None, html_path: str | None, maps: tuple[str, ...],
                 quiet: bool) -> None:
    """Diagnose the logs a run already wrote: a gradvitals JSON, a TensorBoard log dir or
    event file, an HF trainer_state.json (or the output/checkpoint dir holding it), a
    Lightning log dir / metrics.csv, or a CSV/JSONL file with one row per step.

    Several PATHs are diagnosed one after another, each on its own (--json/--html need
    a single PATH). Exits 1 if a PATH could not be read (one line each), else 0.
    """
    from .importers import LogError
    from .importers.names import parse_mapping
    from .report import check_writable

    if len(paths) > 1 and (json_path or html_path):
        _fail("--json/--html write one report: give a single PATH (diagnose the others one at a time)")
    try:
        mapping = parse_mapping(list(maps))
    except LogError as exc:
        _fail(str(exc))
    for flag, out in (("--json", json_path), ("--html", html_path)):
        if out and (why := check_writable(out)):
            _fail(f"{flag} {out}: {why}")
    failed = False
    for path in paths:
        try:
            report = _diagnose_log(path, mapping)
        except LogError as exc:
            click.echo(f"gradvitals: error: {exc}", err=True)
            failed = True
            continue
        written = _write_diagnosis(report, json_path, html_path)
        if not quiet:
            if len(paths) > 1:
                click.echo(f"\n{path}", err=True)
            _summary(report, written)
            _coverage_summary(report.extra["coverage"])
    sys.exit(1 if failed else 0)


def _diagnose_log(path: str, mapping: Any) -> Any:
    from .coverage import coverage
    from .importers import load_any
    from .report import Report

    imported = load_any(path, mapping)
    record = imported.record
    # The saved diagnosis's failed rules go with its findings: this one is made anew.
    record.events = [e for e in record.events if not (isinstance(e, dict) and e.get("type") == "rule_error")]
    report = Report.from_record(record)
    if imported.report is not None:  # a gradvitals report: keep what it carried besides the diagnosis
        report.extra.update({k: v for k, v in imported.report.extra.items() if k != "coverage"})
    source = {**(record.run.get("imported") or {}),  # e.g. a TensorBoard file whose last record was cut off
              "format": imported.format, "path": imported.path, "read": _compact_sources(imported.sources),
              "ignored": imported.ignored[:50]}
    report.extra["coverage"] = coverage(record, source)
    return report


def _compact_sources(sources: dict[str, str]) -> dict[str, str]:
    """series key -> log key, with per-parameter series shown once per quantity (``grad_norm/*``)."""
    out: dict[str, str] = {}
    for key, log_key in sources.items():
        q, _, name = key.partition("/")
        if name and log_key.endswith(name):
            out.setdefault(f"{q}/*", log_key[: len(log_key) - len(name)] + "*")
        else:
            out[key] = log_key
    return out


def _write_diagnosis(report: Any, json_path: str | None, html_path: str | None) -> list[str]:
    """Both outputs rendered first, then written atomically: a failure leaves no half file."""
    from .report import write_atomic

    texts = []
    if json_path:
        texts.append((json_path, json.dumps(report.to_json(), allow_nan=False, separators=(",", ":"))))
    if html_path:
        from .reports.html import render_html

        texts.append((html_path, render_html(report.to_json())))
    try:
        return [str(write_atomic(path, text)) for path, text in texts]
    except OSError as exc:
        _fail(f"could not write the report: {exc}", code=1)
        return []


def _coverage_summary(cov: dict[str, Any]) -> None:
    """Coverage, briefly: what ran, what the log lacks for the others (one line per
    missing input), and the checks only a live run can make, on one line."""
    from .coverage import describe
    from .rules.requirements import LIVE_FACTS

    ran, checks = cov["ran"], cov["checks"]
    for path in cov.get("source", {}).get("truncated") or ():
        click.echo(f"{path}: its last record was cut off (written when the run stopped); read up to it", err=True)
    click.echo(f"Checked ({len(ran)} of {len(checks)}): {', '.join(ran) or 'nothing'}", err=True)
    lacking: dict[str, list[str]] = {}
    live: list[str] = []
    for code, c in checks.items():
        if c["ran"]:
            continue
        logged = [t for t in c.get("missing", ()) if t not in LIVE_FACTS]
        if logged:
            lacking.setdefault("; ".join(f"no {describe(t)}" for t in logged), []).append(code)
        else:
            live.append(code)
    for why, codes in lacking.items():
        click.echo(f"  not checked, {why} in the log: {', '.join(codes)}", err=True)
    if live:
        click.echo(f"  only a live run (gradvitals run, gv.watch) records what these need: {', '.join(live)}",
                   err=True)
    notes: dict[str, list[str]] = {}
    for code, c in checks.items():
        for note in c.get("notes", ()) if c["ran"] else ():
            if not note.startswith("without "):
                notes.setdefault(note, []).append(code)
    for note, codes in notes.items():
        click.echo(f"  {', '.join(codes)}: {note}", err=True)


@main.command("compare")
@click.argument("paths", nargs=-1, metavar="A B [C]...")
@click.option("--html", "html_path", metavar="PATH", help="Write the self-contained HTML comparison here.")
@click.option("--json", "json_path", metavar="PATH", help="Write the comparison as JSON here.")
@click.option("--map", "maps", multiple=True, metavar="LOG_KEY=QUANTITY",
              help="Read this log key as this gradvitals quantity (as for diagnose; repeatable).")
@click.option("--quiet", "-q", is_flag=True)
def compare_cmd(paths: tuple[str, ...], html_path: str | None, json_path: str | None, maps: tuple[str, ...],
                quiet: bool) -> None:
    """Compare runs: A is the baseline, each other run is compared with it (findings
    gone, new or changed; loss and gradient norm at a common step; the per-layer
    gradient-norm ratio). Each run is a gradvitals JSON report or any log `diagnose`
    reads."""
    from .compare import Run, compare, labels_for, load_run
    from .report import check_writable, write_atomic

    if len(paths) < 2:
        _fail(f"compare needs at least two runs (A B [C]...), got {len(paths)}; the first is the baseline")
    for flag, out in (("--html", html_path), ("--json", json_path)):
        if out and (why := check_writable(out)):
            _fail(f"{flag} {out}: {why}")
    from .importers import LogError
    from .importers.names import parse_mapping

    try:
        mapping = parse_mapping(list(maps))
    except LogError as exc:
        _fail(str(exc))
    try:
        runs = [Run(label, path, load_run(path, mapping)) for label, path in zip(labels_for(list(paths)), paths)]
    except LogError as exc:  # one line naming the file and what is wrong with it; diagnose's exit status
        _fail(str(exc), code=1)
    result = compare(runs)
    texts = []  # rendered in full before anything is written
    if json_path:
        texts.append((json_path, json.dumps(result.to_json(), allow_nan=False, indent=1)))
    if html_path:
        from .reports.compare_html import render_compare_html

        texts.append((html_path, render_compare_html(result)))
    for out, text in texts:
        try:
            write_atomic(out, text)
        except OSError as exc:
            _fail(f"could not write {out}: {exc}", code=1)
    if not quiet:
        from .reports.compare_terminal import render_compare
        from .reports.terminal import make_console

        from rich.text import Text

        console = make_console(stderr=False)
        for part in render_compare(result):
            console.print(part, soft_wrap=isinstance(part, Text))  # a verdict line stays one line
        for out, _ in texts:
            console.print(f"written to {out}", markup=False)


@main.command("demo")
@click.option("--out", "out_dir", default="gradvitals-demo", show_default=True, metavar="DIR",
              help="Where the gallery HTML and the per-run JSON reports go.")
@click.option("--steps", type=click.IntRange(min=10), metavar="N", help="Optimizer steps per run (default 300; --quick 120).")
@click.option("--quick", is_flag=True, help="Fewer steps (used by the test suite).")
@click.option("--only", multiple=True, metavar="CASE",
              type=click.Choice(["vanishing", "exploding", "symmetry", "lr", "dead", "saturation", "modern"]),
              help="Run only these gallery cases (repeatable).")
def demo_cmd(out_dir: str, steps: int | None, quick: bool, only: tuple[str, ...]) -> None:
    """The chapter's 20-layer digit classifier: every failure, its diagnosis and its fix."""
    import time
    from pathlib import Path

    from .demo import quick_steps, run_demo, write_gallery

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out_dir} exists and is not a folder", param_hint="--out")
    n = quick_steps(steps, quick)
    click.echo(f"gradvitals demo: the 20-layer digit classifier, {n} steps per run "
               f"(scikit-learn's bundled digits, no download)\n")
    t0 = time.perf_counter()
    results = run_demo(out, n, echo=lambda s: click.echo(s + "\n"), only=list(only) or None)
    gallery = write_gallery(results, out / "gallery.html")
    click.echo(f"finished in {time.perf_counter() - t0:.1f} s")
    click.echo(f"per-run JSON reports: {out}/*.json")
    if gallery is not None:
        click.echo(f"gallery: {gallery}")


@main.command("checkup", context_settings=_RUN_CONTEXT)
@click.option("--json", "json_path", metavar="PATH", help="Write the JSON report here.")
@click.option("--html", "html_path", metavar="PATH", help="Write the self-contained HTML report here.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but the script's own output.")
@click.argument("script", metavar="SCRIPT")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
def checkup_cmd(json_path: str | None, html_path: str | None, quiet: bool, script: str,
                args: tuple[str, ...]) -> None:
    """Preflight: run SCRIPT only to its first optimizer step (or first backward when it
    steps no optimizer), stop it there, and diagnose step 0: init, signal propagation,
    architecture. Same report as `run`. Exits 0 once step 0 is diagnosed; the script's
    own status if it fails before; 1 if it ends without a backward."""
    from .recorder import Options
    from .runner import ScriptRunner, UsageError, check_outputs

    _check_script_arg(script)
    runner = ScriptRunner(script, list(args), Options(every=1), stop_after_first_step=True)
    try:
        check_outputs({"--json": json_path, "--html": html_path})
        runner.compile()
    except UsageError as exc:
        _fail(str(exc))
    result = runner.run()
    result.report.record.run["mode"] = "checkup"
    if not result.status and not result.report.record.per_name("grad_norm"):
        # No "Healthy" summary for a run that never computed a gradient.
        _write_and_summarise(result.report, json_path, html_path, quiet=True)
        _fail(f"{script} ended before its first backward(): nothing to diagnose", code=1)
    _write_and_summarise(result.report, json_path, html_path, quiet)
    if result.status:
        sys.exit(result.status)


if __name__ == "__main__":  # pragma: no cover
    main()
