"""Torch as the oracle for "which module produced the first NaN/Inf".

Runs a plain training script (``python nonfinite_oracle.py SCRIPT ARGS...``) with a
process-global forward hook that checks every module's output, and prints the
first module whose output is non-finite, named by its path in its root model
(``ORACLE <name> <class>``). Independent of gradvitals: it checks every forward of
every step, which gradvitals avoids doing for cost reasons.

``python nonfinite_oracle.py --backward SCRIPT ARGS...`` looks at the backward instead,
with torch's module backward hooks and parameter tensor hooks: the first module whose
gradient with respect to its input, or to one of its own parameters, is non-finite
while the gradient it received (with respect to its output) was finite: the module
that produced the first non-finite gradient (``ORACLE_BACKWARD <name> <class>``).
"""

from __future__ import annotations

import gc
import os
import runpy
import sys

import torch
from torch.nn.modules import module as nn_module

_found = False


def _name_in_root(mod: torch.nn.Module) -> str:
    """The module's path in the largest model that contains it (its root)."""
    best, best_size = "", -1
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module) and obj is not mod:
            subs = list(obj.named_modules())
            for name, m in subs:
                if m is mod and len(subs) > best_size:
                    best, best_size = name, len(subs)
    return best or "(root)"


def _check(mod: torch.nn.Module, args: tuple, out: object) -> None:
    global _found
    if _found:
        return
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        _found = True
        print(f"ORACLE {_name_in_root(mod)} {type(mod).__name__}", file=sys.stderr, flush=True)


def _finite(ts: object) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if isinstance(t, torch.Tensor))


_received_finite: dict[int, bool] = {}  # id(module) -> the gradient it received was finite
_hooked: set[int] = set()


def _report_backward(mod: torch.nn.Module) -> None:
    global _found
    if not _found:
        _found = True
        print(f"ORACLE_BACKWARD {_name_in_root(mod)} {type(mod).__name__}", file=sys.stderr, flush=True)


def _received(mod: torch.nn.Module, grad_output: tuple) -> None:
    _received_finite[id(mod)] = _finite(grad_output)


def _passed(mod: torch.nn.Module, grad_input: tuple, grad_output: tuple) -> None:
    if _finite(grad_output) and not _finite(grad_input):
        _report_backward(mod)


def _hook_params(mod: torch.nn.Module, args: tuple, out: object) -> None:
    if not torch.is_grad_enabled():
        return
    for p in mod.parameters(recurse=False):
        if p.requires_grad and id(p) not in _hooked:
            _hooked.add(id(p))
            p.register_hook(lambda g, mod=mod: _report_backward(mod)
                            if _received_finite.get(id(mod)) and not _finite([g]) else None)


if __name__ == "__main__":
    if sys.argv[1] == "--backward":
        del sys.argv[1]
        nn_module.register_module_full_backward_pre_hook(_received)
        nn_module.register_module_full_backward_hook(_passed)
        nn_module.register_module_forward_hook(_hook_params)
    else:
        nn_module.register_module_forward_hook(_check)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python SCRIPT` puts it
    runpy.run_path(sys.argv[0], run_name="__main__")
