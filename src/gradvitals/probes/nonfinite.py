"""Where did the first NaN/Inf come from? Replay the step's forward with tracing.

Runs only when the recorder has seen a non-finite value (zero steady-state cost).
The replay re-runs the model's last forward on its last inputs under ``no_grad``
while the weights are still the ones that produced the NaN (the optimizer has not
stepped yet), checking the output of every torch function call; the first call
that turns finite inputs into non-finite outputs is the origin, attributed to the
innermost module running it. RNG state and buffers (BatchNorm running stats) are
restored afterwards, so the run's numbers do not change.

Infinities made on purpose are not origins: an attention mask built with
``torch.full(..., -inf)`` or ``masked_fill(mask, -inf)`` (a non-finite constant among
the op's arguments), whatever is computed from it without a new NaN (``triu``, a view,
``scores + mask``), and an additive mask passed in or kept as a buffer (0 and -inf
only). The origin is the first op whose finite inputs gave a non-finite output, or
whose by-design infinities gave a NaN (``softmax`` of a fully masked row), among those
whose NaN/Inf reaches the model's output (a guarded ``torch.where(x == 0, 0, 1 / x)``
does not).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import patches
from .isolated import isolated


def _tensors(obj: Any) -> list[Tensor]:
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())]


def _local(t: Tensor) -> Tensor:
    """A DTensor's shard on this rank (reading a DTensor whole would be a collective
    only this rank makes); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and hasattr(t, "placements") else t


def _nonfinite_scalar(obj: Any) -> bool:
    """A Python number among the arguments that is NaN/Inf (``float('-inf')`` filled in)."""
    leaves, _ = tree_flatten(obj)
    return any(isinstance(x, float) and not math.isfinite(x) for x in leaves)


def _nonfinite_nan(obj: Any) -> bool:
    leaves, _ = tree_flatten(obj)
    return any(isinstance(x, float) and math.isnan(x) for x in leaves)


def _has_nan(ts: list[Tensor]) -> bool:
    return any(t.numel() and not t.is_sparse and bool(torch.isnan(_local(t)).any()) for t in ts)


def _additive_mask(t: Tensor) -> bool:
    """0 where attended, -inf where masked, nothing else: an additive attention mask made
    outside the forward (an input, a buffer). A corrupt batch holds NaN, +Inf or other
    values beside its -inf."""
    t = _local(t)
    if t.numel() == 0 or t.is_sparse or not t.is_floating_point():
        return False
    neg_inf = torch.isneginf(t)
    return bool(neg_inf.any()) and bool(((t == 0) | neg_inf).all())


def _bad(ts: list[Tensor]) -> str | None:
    """'nan' / 'inf' if any tensor holds one (syncs: replay only)."""
    for t in ts:
        t = _local(t)
        if t.numel() == 0 or t.is_sparse:
            continue
        if torch.isnan(t).any():
            return "nan"
        if torch.isinf(t).any():
            return "inf"
    return None


#: Ops not judged: those that allocate without writing (their garbage may read as NaN)
#: and collectives (buffers the collective, maybe on another stream, is still filling).
#: What is computed from their results is judged.
_UNFILLED = ("empty", "new_empty")
_COLLECTIVE = ("all_gather", "reduce_scatter", "all_reduce", "allreduce", "broadcast", "all_to_all")
#: Profiler ranges of a wrapper's own bookkeeping (FSDP2: gathering parameters into
#: fresh buffers and viewing them as the parameters' dtype before they are filled):
#: nothing inside is the model's computation, nothing inside is judged.
_INTERNAL = ("FSDP::",)


def _judged(name: str) -> bool:
    return not (name.startswith(_UNFILLED) or any(c in name for c in _COLLECTIVE))


class _Tracer(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.origin: dict[str, Any] | None = None
        self.input_bad: dict[str, Any] | None = None
        self.internal: list[Any] = []  # open wrapper-bookkeeping ranges (record_function handles)
        # Tensors whose NaN/Inf is by design (masks), by id; the weak reference tells a
        # live tensor from a new one that reuses a freed one's id (a strong one would
        # keep every layer's masked scores alive through the replay).
        self.designed: dict[int, weakref.ref] = {}
        # Every op that made NaN/Inf from finite values, in order, and which of them the
        # non-finite values of a tensor come from (the earliest): the origin is the first
        # one whose values reach the model's output, not a guarded 1/x that
        # torch.where discards.
        self.candidates: list[dict[str, Any]] = []
        self.made_by: dict[int, tuple[weakref.ref, int]] = {}

    def design(self, t: Tensor) -> None:
        self.designed[id(t)] = weakref.ref(t)

    def is_designed(self, t: Tensor) -> bool:
        r = self.designed.get(id(t))
        return r is not None and r() is t

    def candidate_of(self, t: Tensor) -> int | None:
        entry = self.made_by.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _made(self, outs: list[Tensor], found: dict[str, Any]) -> None:
        if self.origin is None:
            self.origin = found
        self.candidates.append(found)
        for t in outs:
            self.made_by[id(t)] = (weakref.ref(t), len(self.candidates) - 1)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name == "_record_function_enter_new":
            if args and isinstance(args[0], str) and args[0].startswith(_INTERNAL):
                self.internal.append(out)
            return out
        if name.startswith("_record_function_exit"):
            if self.internal and args and args[0] is self.internal[-1]:
                self.internal.pop()
            return out
        if not self.internal and _judged(name):
            outs = _tensors(out)
            value = _bad(outs) if outs else None
            if value is not None:
                ins = _tensors((args, kwargs))
                module = self.stack[-1] if self.stack else None
                designed = [t for t in ins if self.is_designed(t)]
                bad_in = _bad([t for t in ins if not self.is_designed(t)])
                if bad_in is None and (designed or _nonfinite_scalar((args, kwargs))):
                    if value == "nan" and not _has_nan(designed) and not _nonfinite_nan((args, kwargs)):
                        # A NaN born from the mask's infinities (a fully masked row).
                        self._made(outs, {"op": name or str(func), "module": module, "value": value})
                    else:
                        for t in outs:  # the mask itself, or what carries it on
                            self.design(t)
                elif bad_in is None:
                    self._made(outs, {"op": name or str(func), "module": module, "value": value})
                else:
                    made = [c for c in map(self.candidate_of, ins) if c is not None]
                    if made:  # carries an earlier op's NaN/Inf on
                        for t in outs:
                            self.made_by[id(t)] = (weakref.ref(t), min(made))
                    elif self.input_bad is None:
                        self.input_bad = {"op": name or str(func), "module": module, "value": bad_in}
        return out


def replay_forward(model: nn.Module, names: dict[int, str], args: tuple, kwargs: dict,
                   collective: bool = False) -> dict[str, Any] | None:
    """Re-run ``model(*args, **kwargs)`` traced; return the origin of the first NaN/Inf.

    ``names`` maps id(module) -> the name to report. Returns None when the forward is
    finite. The result has ``module``, ``op``, ``value`` and ``kind``: "activation"
    (an op made finite inputs non-finite), "weight" (the module's own parameters are
    non-finite) or "input" (the model's input already held NaN/Inf); ``dropped``: True
    when the activation's NaN/Inf never reached the output (a ``torch.where`` or a mask
    dropped it), which leaves the forward finite and makes the backward's NaN.

    ``collective``: every rank replays its own last forward at this same point (FSDP2:
    the forward all-gathers parameters, so no rank may skip it, whatever its inputs
    hold); the FSDP modules are resharded afterwards (FSDP2 keeps the root's gathered
    parameters after a forward, and the optimizer is about to update the shards).
    """
    masks = [t for t in _tensors((args, kwargs)) if _additive_mask(t)]
    inputs_bad = _bad([t for t in _tensors((args, kwargs)) if not any(t is m for m in masks)])
    the_input = {"kind": "input", "module": names.get(id(model)) or next(iter(names.values()), None),
                 "op": None, "value": inputs_bad}
    if inputs_bad is not None and not collective:
        return the_input
    with _replay_frame(model, names) as (stack, buffers):
        tracer = _Tracer(stack)
        for t in [*masks, *(b for b in buffers if _additive_mask(b))]:
            tracer.design(t)
        # Its warnings are ours, not the user's (a checkpointed block run under no_grad
        # warns that no input requires grad).
        with warnings.catch_warnings(), torch.no_grad(), tracer:
            warnings.simplefilter("ignore")
            result = model(*args, **kwargs)
            # The first candidate whose NaN/Inf reaches the output; with none of them
            # there (a finite output, or one a weight made non-finite), the first op seen.
            reached = [c for c in map(tracer.candidate_of, _tensors(result)) if c is not None]
            output_bad = _bad(list(_tensors(result)))
            del result
        if collective:
            _reshard(model)
    if inputs_bad is not None:
        return the_input
    found = tracer.candidates[min(reached)] if reached else tracer.origin or tracer.input_bad
    if found is None:
        return None
    kind = "activation"
    mod_name = found.get("module")
    for m in model.modules():
        if names.get(id(m)) == mod_name:
            if _bad([p.detach() for p in m.parameters(recurse=False)]) is not None:
                kind = "weight"
            break
    found["kind"] = kind
    if kind == "activation" and not reached and output_bad is None:
        # The op's NaN/Inf never reached the output: a torch.where, a mask or an index
        # dropped it. The forward is finite; its backward is not (0 x NaN = NaN).
        found["dropped"] = True
    return found


def _reshard(model: nn.Module) -> None:
    """Free the parameters an FSDP2 forward gathered and put the shards back (what the
    backward would have done): the next forward then gathers the updated shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class _Tagger(TorchFunctionMode):
    """Labels each autograd node the replayed forward creates with the module and the
    function that made it, so that the backward's nodes can be named."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        module = self.stack[-1] if self.stack else None
        for t in _tensors(out):
            node = t.grad_fn
            if node is not None and "gradvitals" not in node.metadata:
                node.metadata["gradvitals"] = (module, getattr(func, "__name__", "") or str(func))
        return out


#: Autograd nodes the backward replay walks at most (a replay-only cost, bounded for
#: graphs with millions of nodes).
MAX_BACKWARD_NODES = 200_000



@contextlib.contextmanager
def _replay_frame(model: nn.Module, names: dict[int, str]) -> Any:
    """What both replays share: the stack of module names the replayed forward is in
    (pre/post hooks on every module but scripted ones, which take no Python hooks: their
    ops count as their caller's), run :func:`isolated` (RNG forked, buffers restored);
    yields the stack and the model's buffers."""
    stack: list[str] = []
    handles = []

    def pre(mod: nn.Module, _a: Any) -> None:
        stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod: nn.Module, _a: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    with isolated(model) as buffers:
        try:
            for m in model.modules():
                if not isinstance(m, torch.jit.ScriptModule):
                    handles.append(m.register_forward_pre_hook(pre))
                    handles.append(m.register_forward_hook(post, always_call=True))
            yield stack, buffers
        finally:
            for h in handles:
                h.remove()

def _surrogate_seeds(outputs: list[Tensor]) -> list[Tensor]:
    """The gradient of the sum of each output's mean: 1/numel everywhere. The real seed
    (the gradient of a loss computed outside the model) is out of reach at no
    steady-state cost; a mean-reduced loss gives gradients of about this size, and
    any finite seed shows an op whose derivative is infinite. Kept above the dtype's
    smallest normal number (a float16 output of 1e8 elements would seed zeros)."""
    return [torch.full_like(t, max(1.0 / max(t.numel(), 1), torch.finfo(t.dtype).tiny)) for t in outputs]


def _nonfinite_params(params: list[Tensor], grads: list[Tensor | None]) -> set[int]:
    """Indices of the parameters whose gradient holds NaN/Inf (syncs: NaN path only)."""
    return {i for i, g in enumerate(grads) if g is not None and not g.is_sparse
            and not bool(torch.isfinite(_local(g)).all())}


def replay_backward(model: nn.Module, names: dict[int, str], args: tuple, kwargs: dict
                    ) -> tuple[str | None, dict[str, Any] | None]:
    """Re-run ``model(*args, **kwargs)`` with autograd and replay its backward; return
    the first op of that backward whose incoming gradients were finite and whose
    outgoing ones are not: the producer of the first non-finite gradient, not the nodes
    that pass it on.

    The backward starts from the loss the model returns (a 0-d tensor, as GPT
    implementations do): seed "loss". A model that returns logits (the loss computed
    outside it) is differentiated from its outputs with a surrogate seed (seed
    "surrogate", see _surrogate_seeds). A surrogate reaches what the real loss may not
    (an output the loss ignores) and has another size than the real seed (an overflow
    may happen elsewhere), so its origin counts only where the replay's parameters with
    a non-finite gradient are exactly those of the run's own backward (their ``.grad``):
    it never names an origin the run did not have.

    Returns (the seed, that origin or None): seed None when nothing was replayed (no
    output to differentiate, or a non-finite loss: the forward is the origin); no
    origin when every replayed gradient is finite, except from a surrogate seed while
    the run's gradients are not: then the origin is the loss's backward, outside the
    model (``module`` None, ``from_loss``).

    The weights are those of the failing step (the optimizer has not stepped yet);
    gradients are taken with ``torch.autograd.grad`` (``.grad`` is left as it is), RNG
    state and buffers are restored. Random ops (dropout) draw other masks than the
    original forward did.
    """
    handles: list[Any] = []
    origin: dict[str, Any] = {}
    with _replay_frame(model, names) as (stack, _buffers), contextlib.ExitStack() as node_hooks:
        node_hooks.callback(lambda: [h.remove() for h in handles])
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            with _Tagger(stack):
                out = model(*args, **kwargs)
            differentiable = [t for t in _tensors(out) if t.grad_fn is not None]
            # The loss: a 0-d result (a reduction), not a one-element output (batch of 1).
            losses = [t for t in differentiable if t.dim() == 0]
            if losses:
                seed = "loss"
                roots = [losses[0] if len(losses) == 1 else torch.stack([t.reshape(()) for t in losses]).sum()]
                if _bad([roots[0].detach()]) is not None:
                    return None, None
                seeds: list[Tensor] | None = None
            elif differentiable:
                seed, roots = "surrogate", differentiable
                seeds = _surrogate_seeds(roots)
            else:
                return None, None
            # Every node the backward can run, each named by the nearest labelled one on
            # its way to the loss (the ops inside a fused function such as
            # multi_head_attention_forward are its caller's).
            label: dict[Any, tuple] = {}
            todo = [(t.grad_fn, (names.get(id(model)), seed == "loss" and "loss" or "output")) for t in roots]
            while todo and len(label) < MAX_BACKWARD_NODES:
                node, parent = todo.pop()
                if node is None or node in label:
                    continue
                label[node] = node.metadata.get("gradvitals", parent)
                for nxt, _ in node.next_functions:
                    if nxt is not None and nxt not in label:
                        todo.append((nxt, label[node]))

            def watch(node: Any) -> Any:
                def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
                    if origin:
                        return
                    made = _bad([g for g in grad_inputs if isinstance(g, Tensor)])
                    if made is not None and _bad([g for g in grad_outputs if isinstance(g, Tensor)]) is None:
                        module, op = label[node]
                        origin.update(module=module, op=op, backward_op=node.name(), value=made)
                return hook

            for node in label:
                if node.name() != "torch::autograd::AccumulateGrad":
                    handles.append(node.register_hook(watch(node)))
            params = [p for p in model.parameters() if p.requires_grad]
            if params:
                with patches.quiet():  # not a backward of the run's
                    grads = torch.autograd.grad(roots, params, grad_outputs=seeds, allow_unused=True)
                if seed == "surrogate":
                    replayed = _nonfinite_params(params, list(grads))
                    run = _nonfinite_params(params, [p.grad for p in params])
                    if origin and replayed != run:
                        origin.clear()  # not the run's backward (see above)
                    elif not origin and not replayed and any(
                            bool(torch.isnan(_local(params[i].grad)).any()) for i in run):  # type: ignore[arg-type]
                        # From a finite gradient of its outputs the model's backward is finite,
                        # the run's held NaN: the gradient the loss sent the outputs was not
                        # finite. (Not claimed for Inf alone: an overflow may need the real,
                        # larger seed.)
                        origin.update(module=None, op=None, from_loss=True)
    if not origin:
        return seed, None
    origin["kind"] = "gradient"
    return seed, origin
