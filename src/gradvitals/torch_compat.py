"""What differs between torch builds and wrappers, behind one name each: the user's
model inside a DDP/DataParallel wrapper, the user's class name behind FSDP2's and
parametrization's generated classes, DTensor (FSDP2 shards) and its local parts, the
default process group's key-value store, the DDP wrapper whose forward is running.

Plain helpers, no process group: the recorder, the probes and the distributed merge
use them alike.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn


def unwrap(module: nn.Module) -> nn.Module:
    """The user's model inside a DDP / DataParallel wrapper (their names lack ``module.``)."""
    seen = 0
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and seen < 8:
        module = module.module
        seen += 1
    return module


def module_kind(module: nn.Module) -> str:
    """The user's class name: FSDP2 swaps ``Linear`` for a generated ``FSDPLinear``,
    a parametrization (spectral_norm, weight_norm) for ``ParametrizedLinear``."""
    if isinstance(module, torch.jit.ScriptModule):  # torch.jit.script(nn.Linear(...))
        return str(getattr(module, "original_name", None) or type(module).__name__)
    return module_kind_of_class(type(module))


def module_kind_of_class(cls: type) -> str:
    name = cls.__name__
    for prefix in ("FSDP", "Parametrized"):
        if name.startswith(prefix):
            for base in cls.__bases__:
                if base.__name__ == name[len(prefix):]:
                    return module_kind_of_class(base)
    return name


def dtensor_type() -> type | None:
    """torch's DTensor class (imports torch.distributed.tensor), or None without it."""
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except Exception:  # torch without distributed
        return None


def dtensor_type_if_loaded() -> type | None:
    """DTensor when torch.distributed.tensor is imported (only then can one exist);
    None otherwise, without importing it (a dict lookup: for the per-step path)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def local_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """Each DTensor's local shard (no communication); plain tensors unchanged. (No
    import: a DTensor exists only once its module is loaded.) Outside autograd:
    ``to_local`` then hands back the shard itself instead of running a differentiable
    conversion per tensor, and what is measured never needs a gradient."""
    dt = dtensor_type_if_loaded()
    if dt is None:
        return tensors
    with torch.no_grad():
        return [t.to_local() if isinstance(t, dt) else t for t in tensors]


def has_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


def default_store() -> object | None:
    """The default process group's key-value store (torchrun's TCPStore), or None where
    this torch has no accessor for it (a private one in every release so far)."""
    import torch.distributed.distributed_c10d as c10d

    getter = getattr(c10d, "_get_default_store", None)
    return getter() if getter is not None else None


def active_ddp() -> nn.Module | None:
    """The DistributedDataParallel whose forward is running (torch sets it for Dynamo's
    DDP optimizer, a private class attribute), or None: a model called inside a DDP
    wrapper a trainer made, which the watch was never given."""
    return getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
