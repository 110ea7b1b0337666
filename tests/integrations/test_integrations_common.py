"""The integrations' shared edges: optional extras, lazy imports, the logger's numbers."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys

import pytest

from gradvitals.record import ParamInfo, Record


@pytest.mark.parametrize("extra, module, framework", [
    ("lightning", "gradvitals.integrations.lightning", "lightning"),
    ("hf", "gradvitals.integrations.hf", "transformers"),
])
def test_missing_extra_names_the_pip_command(monkeypatch, extra, module, framework):
    monkeypatch.setitem(sys.modules, framework, None)  # import of it now raises ImportError
    monkeypatch.delitem(sys.modules, f"{framework}.pytorch", raising=False)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'gradvitals\[{extra}\]'"):
        importlib.import_module(module)


def test_gradvitals_never_imports_a_framework_by_itself():
    code = ("import sys, gradvitals, gradvitals.watcher, gradvitals.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_layer_grad_norms_combine_the_fetched_parameter_norms():
    from gradvitals.integrations._common import layer_grad_norms

    rec = Record()
    for name, layer in (("net.0.weight", "net.0"), ("net.0.bias", "net.0"), ("head.weight", "head")):
        rec.params[name] = ParamInfo(name=name, layer=layer, shape=[1], numel=1, requires_grad=True, dtype="float32")
    rec.add("grad_norm/net.0.weight", 3, 3.0)
    rec.add("grad_norm/net.0.bias", 3, 4.0)
    rec.add("grad_norm/head.weight", 2, 7.0)  # not measured at step 3: not logged as step 3's
    rec.add("grad_norm_global", 3, 5.0)
    assert layer_grad_norms(rec, 3) == {"gradvitals/grad_norm/net.0": 5.0, "gradvitals/grad_norm_global": 5.0}
    assert layer_grad_norms(rec, 2) == {"gradvitals/grad_norm/head": 7.0}
    assert math.isnan(next(iter(layer_grad_norms(_nan_record(), 0).values())))


def _nan_record() -> Record:
    rec = Record()
    rec.add("grad_norm/w", 0, float("nan"))
    return rec


def test_unwrap_optimizer_finds_the_torch_optimizer_inside_wrappers():
    import torch

    from gradvitals.integrations._common import unwrap_optimizer

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    class Wrapper:  # Lightning's LightningOptimizer shape: not an Optimizer, holds one
        def __init__(self, inner):
            self.optimizer = inner

    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        unwrap_optimizer(object())
