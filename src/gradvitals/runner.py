"""``gradvitals run SCRIPT``: watch an unmodified training script, in-process.

Like ``python -m cProfile``: the script runs as ``__main__`` with ``sys.argv =
[SCRIPT, *ARGS]`` and its folder first on ``sys.path``. This is the one module that
installs process-global hooks (module forward hooks, optimizer step hooks, the
optimizer constructor): nothing is attached to the user's modules between steps,
so ``torch.save(model)`` pickles exactly what it would without gradvitals. Every
hook is removed in ``finally``.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import os
import signal
import sys
import traceback
import types
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

from .probes import patches
from . import autosave, distributed
from .autosave import mark_complete
from .recorder import Options, Recorder, WatchedModel
from .reports import tensorboard
from .report import Report, check_writable, write_atomic


try:
    from torch.nn.utils.parametrize import ParametrizationList as _ParametrizationList

    _PARAMETRIZATION_TYPES: tuple[type, ...] = (_ParametrizationList,)
except Exception:  # pragma: no cover - torch without parametrize
    _PARAMETRIZATION_TYPES = ()

class UsageError(Exception):
    """Bad input to gradvitals itself (exit status 2, one line, no traceback)."""


@dataclass
class RunResult:
    status: int
    report: Report
    error: str | None = None  # the script's exception, one line
    outputs: list[str] = field(default_factory=list)


class ScriptRunner:
    """Runs one script under a Recorder with process-global hooks."""

    def __init__(self, script: str, args: list[str], options: Options | None = None,
                 *, stop_after_first_step: bool = False, budget_steps: int | None = None,
                 remedy: Any = None) -> None:
        self.script = script
        self.budget_steps = budget_steps
        self.remedy = remedy  # a prescribe.RemedyApplier for --try-fixes trials
        self._budget_used = 0
        self._suspended = False  # while a remedy runs its own forward
        self.args = list(args)
        self.options = options or Options()
        self.stop_after_first_step = stop_after_first_step
        self.recorder: Recorder | None = None
        self._seen: dict[int, Any] = {}  # id(module) -> weakref (None for plain objects)
        self._roots: dict[int, WatchedModel] = {}
        self._handles: list[Any] = []
        self._opt_init: Callable[..., Any] | None = None
        self._globals: dict[str, Any] | None = None
        self._compiled: set[int] = set()  # id() of root models run through torch.compile
        #: The optimizer whose step is running (a weakref; None between steps), and the
        #: optimizers that step only inside another's (see _on_step_pre): not watched.
        self._stepping: weakref.ref[torch.optim.Optimizer] | None = None
        self._inner: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self.progress: Any = None  # reports.progress.Progress, handed to the recorder (CLI)
        #: (json, html) paths the report is autosaved to while the script runs (the CLI
        #: sets them; the final write stays the caller's, see write_outputs).
        self.autosave_paths: tuple[str | None, str | None] = (None, None)

    # ------------------------------------------------------------ checks
    def compile(self) -> types.CodeType:
        path = Path(self.script)
        if not path.exists():
            raise UsageError(f"script not found: {self.script}")
        if path.is_dir():
            raise UsageError(f"script is a directory, not a Python file: {self.script}")
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read script {self.script}: {exc.strerror}") from None
        try:
            # python names a script's code by its absolute path (tracebacks, __file__)
            return compile(source, os.path.abspath(path), "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise UsageError(f"syntax error in {self.script}, line {exc.lineno}: {exc.msg}") from None
        except ValueError as exc:
            raise UsageError(f"cannot compile {self.script}: {exc}") from None

    # ------------------------------------------------------------- hooks
    def _install(self) -> None:
        rec = self.recorder
        assert rec is not None
        self._handles.append(nn_module.register_module_forward_pre_hook(self._on_forward_pre))
        self._handles.append(nn_module.register_module_forward_hook(
            self._on_forward_post, with_kwargs=True, always_call=True))
        self._handles.append(optim_module.register_optimizer_step_pre_hook(self._on_step_pre))
        self._handles.append(optim_module.register_optimizer_step_post_hook(self._on_step_post))
        orig_init = torch.optim.Optimizer.__init__
        runner = self

        def __init__(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
            orig_init(opt, *args, **kwargs)
            try:
                runner._on_optimizer(opt)
            except Exception as exc:
                rec.fail("optimizer_discovery", exc)

        self._opt_init = orig_init
        torch.optim.Optimizer.__init__ = __init__  # type: ignore[method-assign]
        if self.stop_after_first_step:  # a script without an optimizer: stop after its first backward
            self._handles.append(patches.install(_StopAfterBackward(rec)))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._opt_init is not None:
            torch.optim.Optimizer.__init__ = self._opt_init  # type: ignore[method-assign]
            self._opt_init = None

    def _on_optimizer(self, opt: torch.optim.Optimizer) -> None:
        if self.recorder is not None:
            self.recorder.add_optimizer(opt, local_hooks=False)
        if self.remedy is not None:
            self.remedy.on_optimizer(opt)

    def _on_forward_pre(self, module: nn.Module, args: tuple) -> None:
        if self._suspended or torch.compiler.is_compiling():
            return  # inside a graph Dynamo is tracing: a hook body here would break the graph
        compiled = _compiled_inner(module)
        if compiled is not None:
            module = compiled  # torch.compile(model): the user's model is the root, not the wrapper
        elif id(module) in self._compiled:
            return  # the compiled model's own forward (Dynamo's eager fallback)
        ref = self._seen.get(id(module))
        if ref is None or ref() is not module:
            try:
                self._discover(module)
            except Exception as exc:
                self.recorder.fail("model_discovery", exc)  # type: ignore[union-attr]
                return
            if self.remedy is not None and id(module) in self._roots:
                self._suspended = True
                try:
                    self.remedy.on_new_model(module, args)
                finally:
                    self._suspended = False
                self.recorder.remove_model(module)  # re-index: the remedy may have swapped modules
                self._roots[id(module)] = self.recorder.add_model(module, label=self._label(module),
                                                                   local_hooks=False)
                for m in module.modules():
                    self._seen[id(m)] = weakref.ref(m)
        model = self._roots.get(id(module))
        if model is not None and model.module is module:
            self._stepping = None  # (a step that raised before its post-hook is over)
            if compiled is not None:
                # No per-module activation hooks inside a compiled model: they would be
                # traced into its graph (graph breaks, a recompile per scheduled step).
                self._compiled.add(id(module))
                return
            try:
                self.recorder.forward_start(model)  # type: ignore[union-attr]
            except Exception as exc:
                self.recorder.fail("activations", exc)  # type: ignore[union-attr]

    def _on_forward_post(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        # (module, args, kwargs, output); when the forward raised, torch calls a global
        # always-called hook as (module, args, result) whatever with_kwargs says: then
        # the forward has no output, and the root's tracing must still be undone.
        raised = len(rest) != 2
        kwargs, output = ({}, None) if raised else (rest[0], rest[1])
        if self._suspended or torch.compiler.is_compiling():
            return
        compiled = _compiled_inner(module)
        if compiled is not None:
            module = compiled
        model = self._roots.get(id(module))
        if model is not None and model.module is module:
            try:
                self.recorder.forward_end(model, args, kwargs, output, raised=raised)  # type: ignore[union-attr]
            except Exception as exc:
                self.recorder.fail("activations", exc)  # type: ignore[union-attr]

    def _discover(self, module: nn.Module) -> None:
        """A module called for the first time: a new root model, unless it belongs to one."""
        rec = self.recorder
        assert rec is not None
        self._seen[id(module)] = weakref.ref(module)
        entry = rec.model_of(module)
        if entry is not None and entry[0].module is not module:
            return  # a submodule of a known model called on its own
        if not any(p.requires_grad for p in module.parameters()):
            return  # loss modules, frozen feature extractors: nothing to train
        if isinstance(module, _PARAMETRIZATION_TYPES):
            # A parametrized weight being read (spectral_norm, weight_norm: `layer.weight`
            # calls it), e.g. by `.to()` before the model's first forward: part of the
            # layer that owns it, never a model of its own.
            return
        # The outermost module runs its pre-hook first, so this is a root; it may
        # contain models that were called on their own before (absorb them).
        inner = {id(m) for m in module.modules()}
        for r in list(rec.models):
            if id(r.module) in inner and r.module is not module:
                rec.remove_model(r.module)
                self._roots.pop(id(r.module), None)
        model = rec.add_model(module, label=self._label(module), local_hooks=False)
        self._roots[id(module)] = model
        for m in module.modules():
            self._seen[id(m)] = weakref.ref(m)

    def _label(self, module: nn.Module) -> str:
        """The variable that holds the model in the script (``netD``), else its class."""
        frame = sys._getframe(2)
        while frame is not None:
            if "torch" + os.sep + "nn" not in frame.f_code.co_filename and "gradvitals" not in frame.f_code.co_filename:
                for name, value in frame.f_locals.items():
                    if value is module and not name.startswith("_") and name != "self":
                        return name
            frame = frame.f_back  # type: ignore[assignment]
        for name, value in (self._globals or {}).items():
            if value is module and not name.startswith("_"):
                return name
        return type(module).__name__

    def _on_step_pre(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        rec = self.recorder
        if rec is None or opt in self._inner:
            return
        outer = self._stepping() if self._stepping is not None else None
        if outer is not None and outer is not opt:
            # Its step runs inside another optimizer's: a wrapper's inner optimizer
            # (ZeroRedundancyOptimizer's local one, Lookahead-style wrappers). The wrapper's
            # step is the script's; this one holds a part of its parameters (under
            # torchrun, another part on each rank): watched once, as the wrapper.
            self._inner.add(opt)
            rec.drop_optimizer(opt)
            return
        self._stepping = weakref.ref(opt)
        try:
            rec.add_optimizer(opt, local_hooks=False)
        except Exception as exc:
            rec.fail("optimizer_discovery", exc)
            return
        rec.step_pre(opt, args, kwargs)
        if self.stop_after_first_step and not rec.closure_pending:
            # (a closure step, LBFGS: measured at the closure's first backward, where
            # _StopAfterBackward ends the script; stopping here would end it before any)
            raise _StopAtFirstStep()
        if self.remedy is not None:
            self.remedy.on_step_pre(opt)

    def _on_step_post(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if opt in self._inner:
            return
        self._stepping = None
        if self.recorder is not None:
            self.recorder.step_post(opt, args, kwargs)
        done = self.remedy.on_step_post(opt) if self.remedy is not None else False
        if self.budget_steps is not None:
            self._budget_used += 1
            done = done or self._budget_used >= self.budget_steps
        if done:
            raise _StopAtFirstStep()  # the trial's step budget is spent: end the script here

    # --------------------------------------------------------------- run
    def run(self) -> RunResult:
        code = self.compile()
        script_path = os.path.abspath(self.script)
        command = " ".join(["gradvitals checkup" if self.stop_after_first_step else "gradvitals run",
                            self.script, *self.args])
        self.recorder = Recorder(self.options, command=command)
        tensorboard.open_for(self.recorder, self.options.tensorboard)
        self.recorder.progress = self.progress
        self.recorder.on_retire = lambda model: self._roots.pop(id(model.module), None)
        self.recorder.record.run["script"] = self.script
        self.recorder.record.run["script_argv"] = [self.script, *self.args]
        if not self.stop_after_first_step and distributed.writes_report():
            autosave.attach(self.recorder, *self.autosave_paths, self.options.autosave_s)
        saved_argv, saved_path0 = sys.argv, list(sys.path)
        saved_main = sys.modules.get("__main__")
        main = types.ModuleType("__main__")
        # Exactly the globals ``python SCRIPT`` gives __main__ (a config system that
        # exec()s into globals() or lists them must see nothing else).
        main.__dict__.update({"__file__": script_path, "__builtins__": builtins,
                              "__cached__": None, "__spec__": None, "__package__": None,
                              "__loader__": importlib.machinery.SourceFileLoader("__main__", script_path),
                              "__annotations__": {}})
        self._globals = main.__dict__
        old_term = _install_sigterm()
        status, error, ended = 0, None, "finished"
        try:
            sys.argv = [self.script, *self.args]
            sys.path.insert(0, os.path.dirname(script_path))
            sys.modules["__main__"] = main
            self._install()
            try:
                with warnings.catch_warnings():
                    # torch warns once per compiled call that global module hooks exist:
                    # they are ours, and the script's stderr must stay its own.
                    warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
                    exec(code, main.__dict__)
            except _StopAtFirstStep:
                status, ended = 0, "stopped"
            except _Terminated as exc:
                status, error = _exit_status(exc)
                ended = "SIGTERM"
            except SystemExit as exc:
                status, error = _exit_status(exc)
                ended = "sys.exit"
            except KeyboardInterrupt:
                status, error, ended = 130, "KeyboardInterrupt", "KeyboardInterrupt"
                _print_script_traceback(script_path)
            except BaseException as exc:  # the script's own error: show it as python would
                status, error, ended = 1, f"{type(exc).__name__}: {exc}", "exception"
                _print_script_traceback(script_path)
        finally:
            self._uninstall()
            self.recorder.close()
            tensorboard.close_for(self.recorder)
            sys.argv = saved_argv
            sys.path[:] = saved_path0
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
            _restore_sigterm(old_term)
        self.recorder.record.run["exit_status"] = status
        mark_complete(self.recorder.record, ended)
        if self.remedy is not None:
            self.recorder.record.run["remedy_status"] = self.remedy.status()
        if self.budget_steps is not None:
            self.recorder.record.run["budget_steps"] = self.budget_steps
        if error:
            self.recorder.record.run["script_error"] = error
        report = Report.from_record(self.recorder.record)
        return RunResult(status=status, report=report, error=error)


def _compiled_inner(module: nn.Module) -> nn.Module | None:
    """The user's model inside a ``torch.compile`` wrapper (OptimizedModule), else None."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule" else None


class _StopAtFirstStep(BaseException):
    """Raised from the first optimizer step in checkup mode to stop the script there."""


class _StopAfterBackward:
    """Checkup mode, scripts that step no optimizer: a backward listener (after the
    recorder's, which has measured that backward as step 0) that ends the script."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def backward_end(self, tensor: Any, seed: Any = None) -> None:
        if (self.recorder.backward_mode and self.recorder.step >= 1) or self.recorder.closure_measured:
            raise _StopAtFirstStep()  # (after the recorder measured it: its listener runs first)

    def fail(self, probe: str, exc: BaseException) -> None:
        self.recorder.fail(probe, exc)


class _Terminated(SystemExit):
    pass


def _install_sigterm() -> Any:
    """SIGTERM ends the script through ``finally`` (so the report is written), status 143."""
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return None

        def handler(signum: int, frame: Any) -> None:
            raise _Terminated(128 + signum)

        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread
        return None


def _restore_sigterm(old: Any) -> None:
    if old is not None:
        try:
            signal.signal(signal.SIGTERM, old)
        except (ValueError, OSError):
            pass


def _exit_status(exc: SystemExit) -> tuple[int, str | None]:
    code = exc.code
    if code is None:
        return 0, None
    if isinstance(code, int):
        return code, (f"sys.exit({code})" if code else None)
    print(code, file=sys.stderr)  # as python does for sys.exit("message")
    return 1, f"sys.exit({code!r})"


def _print_script_traceback(script_path: str) -> None:
    """The script's traceback without gradvitals' own frames, as python prints it."""
    etype, value, tb = sys.exc_info()
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script_path:
        tb = tb.tb_next
    traceback.print_exception(etype, value, tb, file=sys.stderr)


def write_outputs(report: Report, json_path: str | None, html_path: str | None) -> list[str]:
    written: list[str] = []
    if not distributed.writes_report():
        return written  # torchrun: rank 0 writes the merged report, the other ranks nothing
    with distributed.sigterm_deferred():
        if json_path:
            report.save(json_path)
            written.append(json_path)
        if html_path:
            from .reports.html import render_html

            write_atomic(html_path, render_html(report.to_json()))
            written.append(html_path)
    return written


def check_outputs(paths: dict[str, str | None]) -> None:
    for flag, path in paths.items():
        if path:
            why = check_writable(path)
            if why:
                raise UsageError(f"{flag} {path}: cannot write the report there ({why})")
