"""What a loss was computed from, read off its autograd graph when a backward starts.

A loss given what it computes itself: ``cross_entropy`` (its graph: ``NllLossBackward0``
over ``LogSoftmaxBackward0``) over a softmax, ``nll_loss`` straight over a softmax,
``binary_cross_entropy_with_logits`` over a sigmoid. Node types and one saved tensor's
shape only: no value is read, nothing is patched (TorchScript still compiles the
user's loss functions), and the walk from the backward's root is bounded.
"""

from __future__ import annotations

from typing import Any

#: Nodes the walk from the root visits at most: the loss sits within a few nodes of it
#: (``loss = ce + 0.1 * reg``, ``loss / accum``, label smoothing's sum).
MAX_NODES = 48

#: Autograd nodes that only move or copy elements: looked through to what made them.
PASS_THROUGH = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "TransposeBackward0", "PermuteBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "CloneBackward0",
    "ToCopyBackward0", "SliceBackward0", "SelectBackward0", "ExpandBackward0", "TBackward0",
})
_NLL = frozenset({"NllLossBackward0", "NllLoss2DBackward0"})


def _made_by(node: Any) -> Any:
    """The first node under ``node``'s first input that is not a pass-through."""
    nxt = node.next_functions
    return _past_views(nxt[0][0] if nxt else None)


def _past_views(node: Any) -> Any:
    """``node``, or the first node under it (first inputs) that is not a pass-through."""
    for _ in range(8):
        if node is None or type(node).__name__ not in PASS_THROUGH:
            return node
        nxt = node.next_functions
        node = nxt[0][0] if nxt else None
    return None


def _name(node: Any) -> str | None:
    return type(node).__name__ if node is not None else None


def _classes(node: Any) -> int | None:
    try:
        saved = node._saved_self
        return int(saved.shape[1]) if saved.dim() >= 2 else None
    except Exception:
        return None


def wrong_loss_inputs(root: Any) -> set[tuple[str, str, int | None]]:
    """(loss function, the node that made its input, classes) for each loss in the graph
    of ``root`` (a tensor, or a list of them) given what it computes itself."""
    roots = root if isinstance(root, (list, tuple)) else [root]
    todo = [getattr(t, "grad_fn", None) for t in roots]
    seen: set[int] = set()
    found: set[tuple[str, str, int | None]] = set()
    while todo and len(seen) < MAX_NODES:
        node = todo.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = type(node).__name__
        if name in _NLL:
            inp = _made_by(node)
            if _name(inp) == "LogSoftmaxBackward0" and _name(_made_by(inp)) == "SoftmaxBackward0":
                found.add(("cross_entropy", "SoftmaxBackward0", _classes(node)))
            elif _name(inp) == "SoftmaxBackward0":
                found.add(("nll_loss", "SoftmaxBackward0", _classes(node)))
            continue  # what feeds a loss is the model: not walked
        if name == "BinaryCrossEntropyWithLogitsBackward0":
            if _name(_made_by(node)) == "SigmoidBackward0":
                found.add(("binary_cross_entropy_with_logits", "SigmoidBackward0", None))
            continue
        todo.extend(n for n, _ in node.next_functions)
    return found


def cross_entropy_input(root: Any) -> tuple[Any, int, Any, int] | None:
    """What the first ``cross_entropy`` in the graph of ``root`` was given: (the node
    that made its logits, past views and copies; the number of classes; the target
    tensor the loss saved; its ignore_index), or None. Node types and saved tensors only
    (no value is read); the walk is bounded as :func:`wrong_loss_inputs`'s."""
    todo = [getattr(root, "grad_fn", None)]
    seen: set[int] = set()
    while todo and len(seen) < MAX_NODES:
        node = todo.pop(0)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in _NLL:
            inp = _made_by(node)
            classes = _classes(node)
            if _name(inp) != "LogSoftmaxBackward0" or classes is None:
                return None
            made = _made_by(inp)
            if made is None or _name(made) == "SoftmaxBackward0":
                return None
            try:
                target, ignore = node._saved_target, int(node._saved_ignore_index)
            except Exception:
                target, ignore = None, -100
            if ignore >= 2 ** 63:  # saved as an unsigned 64-bit integer: -100 reads 2**64 - 100
                ignore -= 2 ** 64
            return made, classes, target, ignore
        todo.extend(n for n, _ in node.next_functions)
    return None


def made_by(t: Any) -> Any:
    """The autograd node that made ``t``, past views and copies (None for a leaf)."""
    return _past_views(getattr(t, "grad_fn", None))
