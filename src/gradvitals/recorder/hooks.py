"""Hooks on the user's own modules and optimizers (``gv.watch``): each calls the
recorder's event of the same meaning (events.TrainingEvents). ``gradvitals run``
attaches process-global hooks instead (runner.py) that call the same events, so
nothing lives on the user's objects there. Every registration is a removable handle,
kept on the model's or optimizer's registry entry."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .registry import Registry, WatchedModel, WatchedOptimizer


class LocalHooks:
    def __init__(self, events: Any, registry: Registry) -> None:
        self.events = events
        self.registry = registry

    def hook_model(self, model: WatchedModel) -> None:
        model.handles.append(model.module.register_forward_pre_hook(self._root_pre_hook))
        model.handles.append(model.module.register_forward_hook(self._root_post_hook, with_kwargs=True,
                                                                always_call=True))

    def hook_optimizer(self, o: WatchedOptimizer, opt: torch.optim.Optimizer) -> None:
        o.handles.append(opt.register_step_pre_hook(self.events.step_pre))
        o.handles.append(opt.register_step_post_hook(self.events.step_post))

    def attach_all(self) -> None:
        """Re-attach the local hooks of every entry that had them (after a pause)."""
        for m in self.registry.models:
            if m.local_hooks:
                self.hook_model(m)
        for o in self.registry.opts.values():
            opt = o.ref()
            if o.local_hooks and opt is not None:
                self.hook_optimizer(o, opt)

    def remove_all(self) -> None:
        for m in self.registry.models:
            for h in m.handles:
                h.remove()
            m.handles = []
        for o in self.registry.opts.values():
            for h in o.handles:
                h.remove()
            o.handles = []
            o.before = None

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        entry = self.registry.modules.get(id(module))
        if entry is not None:
            self.events.forward_start(entry[0])

    def _root_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        entry = self.registry.modules.get(id(module))
        if entry is not None:
            # Always called: also when the forward raised (torch calls it from the
            # handler of that exception, with no output).
            self.events.forward_end(entry[0], args, kwargs, output,
                                    raised=output is None and sys.exc_info()[1] is not None)
