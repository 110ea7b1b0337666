"""Torch as the oracle for "which module produced the first NaN/Inf".

Runs a plain training script (``python nonfinite_oracle.py SCRIPT ARGS...``) with a
process-global forward hook that checks every module's output, and prints the
first module whose output is non-finite, named by its path in its root model
(``ORACLE <name> <class>``). Independent of gradvitals: it checks every forward of
every step, which gradvitals avoids doing for cost reasons.
"""

from __future__ import annotations

import gc
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


if __name__ == "__main__":
    nn_module.register_module_forward_hook(_check)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
