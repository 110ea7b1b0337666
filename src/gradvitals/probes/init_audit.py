"""Init and architecture audit: the facts a preflight needs, measured once per model.

Runs at the model's first traced forward (``Recorder.forward_start``) and writes
plain facts into the record, so the rules (``rules/init.py``,
``rules/architecture.py``) stay pure and a watched run is linted like a checkup:

- per Linear/Conv layer (``LayerInfo.extra``): ``weight_std``, ``weight_mean``,
  ``fan_in``, ``fan_out``, ``weight_constant`` (every element equal, e.g. zero init),
  ``identical_rows`` (every output unit has the same incoming weights: the units
  are interchangeable), ``identical_cols``;
- per RNN/LSTM/GRU (cell) layer: ``spectral_radius`` (largest |eigenvalue| of the
  recurrent weight ``weight_hh``; per gate block for LSTM/GRU) and ``nonlinearity``;
- per weight layer spanned by a skip connection: ``residual_bypass: True``, and
  ``residual_branch_last``: whether it is the last weight layer of the branch an
  ``add`` joins back (the one a Fixup/ReZero-style init may start at zero);
- one ``init_audit`` event per model: Post-LN transformer layers
  (``nn.TransformerEncoderLayer/DecoderLayer(norm_first=False)``), residual adds
  seen, and the norm modules whose output is the skip operand of a residual add
  (the Post-LN pattern ``x = norm(x + f(x))`` in any implementation).

How skip connections are found (from the traced forward, not from names): a torch
function mode stamps every tensor the forward produces with the number of weight
layers (Linear/Conv/attention/RNN) *started* so far when it was produced (ops
inside a weight layer) or the newest stamp among its inputs (other ops). An ``add``
(or ``cat``) whose operands carry different stamps ``a < b`` joins a tensor from
before weight layers ``a+1..b`` with one computed through them: those layers have a
residual path around them (dy/dx = dF/dx + 1). A plain MLP never adds tensors of
different stamps; a bias kept as a Parameter is not a stamped tensor.

Observation only: no RNG, no writes to weights or buffers; the weight facts cost one
host sync and the eigenvalues a CPU copy of each recurrent matrix, once per model.
"""

from __future__ import annotations

import math
import sys
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..taxonomy import WEIGHT_LAYERS
from ..torch_compat import local_tensors

#: Recurrent matrices larger than this are skipped: an eigen-decomposition of an
#: n x n matrix costs O(n^3) on the CPU (2048: well under a second).
MAX_EIG_SIZE = 2048

#: Functions that merge two paths; operands of different stamps make a skip connection.
_MERGE_OPS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "cat", "concat", "concatenate"})

#: Modules that count as one "weight layer" for stamping (ops inside them are the layer).
_STAMP_LAYERS: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.MultiheadAttention,
                                   nn.RNNBase, nn.RNNCellBase)
#: Normalisations whose output, used as a skip operand, marks Post-LN.
_POST_LN_NORMS: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_audited: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def plain_weight(mod: nn.Module) -> Tensor | None:
    """``mod.weight`` when reading it only reads: None when it is computed by a
    parametrization (``torch.nn.utils.parametrizations.spectral_norm`` / ``weight_norm``,
    ``orthogonal``...). Reading such a weight runs the parametrization, and
    spectral_norm's runs a power iteration that updates its buffers in training mode:
    the watched run's numbers would change."""
    params = getattr(mod, "parametrizations", None)
    if params is not None and "weight" in params:
        return None
    w = getattr(mod, "weight", None)
    return w if isinstance(w, Tensor) else None


def start(recorder: Any, model: Any) -> None:
    """Audit ``model`` (a recorder ``WatchedModel``) once: weight facts now, skip
    connections over the forward that is starting (finished by a root hook)."""
    done = _audited.setdefault(recorder, set())
    if id(model.module) in done:
        return
    done.add(id(model.module))
    record = recorder.record
    event = record.event("init_audit", model=model.label, step=recorder.step)
    write_weight_facts(model.module, model.names, record.layers, event)
    _SkipTrace(model.module, model.names, record, event, recorder, model.handles).begin()


# --------------------------------------------------------------------- weights
def write_weight_facts(module: nn.Module, names: dict[int, str], layers: dict[str, Any],
                       event: dict[str, Any]) -> None:
    """Weight statistics of every Linear/Conv, recurrent spectral radii and Post-LN
    transformer layers, into ``layers[name].extra`` and ``event``."""
    rows: list[tuple[str, Tensor]] = []
    post_ln: list[str] = []
    for mod in module.modules():
        name = names.get(id(mod))
        if name is None:
            continue
        kind = type(mod).__name__
        if isinstance(mod, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            if not getattr(mod, "norm_first", False):
                post_ln.append(name)
            continue
        layer = layers.get(name)
        if layer is None:
            continue
        w = plain_weight(mod)
        # A DTensor (tensor parallel, FSDP2) is judged on this rank's shard (a reduction
        # over the whole of it would be a collective); its fans are the global shape's.
        mine = local_tensors([w])[0] if w is not None else None
        if kind in WEIGHT_LAYERS and mine is not None and w.dim() >= 2 and mine.numel() > 0:
            fan_in, fan_out = fans(w)
            layer.extra["fan_in"] = fan_in
            layer.extra["fan_out"] = fan_out
            rows.append((name, _weight_stats(mine)))
        elif isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
            _recurrent_facts(mod, layer.extra)
    if rows:
        values = torch.stack([t.to(rows[0][1].device) for _, t in rows]).tolist()  # one host sync
        for (name, _), (std, mean, constant, same_rows, same_cols) in zip(rows, values):
            extra = layers[name].extra
            extra["weight_std"] = std
            extra["weight_mean"] = mean
            extra["weight_constant"] = bool(constant)
            extra["identical_rows"] = bool(same_rows)
            extra["identical_cols"] = bool(same_cols)
    event["weight_layers"] = len(rows)
    event["post_ln_layers"] = post_ln


def fans(w: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them (receptive field included)."""
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return int(w.shape[1]) * receptive, int(w.shape[0]) * receptive


def _weight_stats(w: Tensor) -> Tensor:
    """[std, mean, all equal, rows equal, columns equal] as float64, no sync."""
    with torch.no_grad():
        x = w.detach()
        x = x.double() if x.device.type == "cpu" else x.float()
        m = x.reshape(x.shape[0], -1)
        std = x.std(correction=0) if x.numel() > 1 else torch.zeros((), dtype=x.dtype, device=x.device)
        constant = (x.amax() == x.amin()).to(x.dtype)
        same_rows = (m == m[:1]).all().to(x.dtype) if m.shape[0] > 1 else torch.zeros((), dtype=x.dtype,
                                                                                         device=x.device)
        same_cols = (m == m[:, :1]).all().to(x.dtype) if m.shape[1] > 1 else torch.zeros((), dtype=x.dtype,
                                                                                            device=x.device)
        return torch.stack([std, x.mean(), constant, same_rows, same_cols]).double()


def _recurrent_facts(mod: nn.Module, extra: dict[str, Any]) -> None:
    """Largest |eigenvalue| of each recurrent weight (per gate block for LSTM/GRU)."""
    radii: dict[str, float] = {}
    gates = {"LSTM": 4, "LSTMCell": 4, "GRU": 3, "GRUCell": 3}.get(type(mod).__name__, 1)
    for pname, p in mod.named_parameters(recurse=False):
        if not pname.startswith("weight_hh") or p.dim() != 2:
            continue
        hidden = p.shape[0] // gates
        if hidden != p.shape[1] or hidden > MAX_EIG_SIZE:
            continue  # LSTM with proj_size (not square), or too large to decompose cheaply
        w = p.detach().to("cpu", torch.float64)
        best = 0.0
        for g in range(gates):
            block = w[g * hidden:(g + 1) * hidden]
            best = max(best, float(torch.linalg.eigvals(block).abs().max()))
        radii[pname] = best
    if radii:
        extra["spectral_radius"] = max(radii.values())
        extra["spectral_radius_by_param"] = radii
        extra["recurrent_gates"] = gates
    nl = getattr(mod, "nonlinearity", None)
    if isinstance(nl, str):
        extra["nonlinearity"] = nl


# ----------------------------------------------------------------- skip trace
class _Stamps(TorchFunctionMode):
    """Stamps produced tensors; notes merges of tensors with different stamps."""

    def __init__(self, trace: _SkipTrace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.trace.mode is not self:
            return out  # ended (left on the stack only if another mode misbehaved): pass through
        try:
            self.trace.note(getattr(func, "__name__", ""), (args, kwargs), out)
        except Exception as exc:  # observation must never break the forward
            self.trace.error = exc
        return out


class _SkipTrace:
    def __init__(self, root: nn.Module, names: dict[int, str], record: Any, event: dict[str, Any],
                 recorder: Any, model_handles: list[Any]) -> None:
        self.root = root
        self.model_handles = model_handles
        self.names = names
        self.record = record
        self.event = event
        self.recorder = recorder
        self.stamp = 0  # weight layers started so far
        self.inside = 0  # depth inside weight layers
        self.order: list[str | None] = []  # stamp - 1 -> weight layer name
        self.tensors: dict[int, tuple[Any, int, str | None]] = {}  # id -> (weakref, stamp, norm name)
        self.bypassed: set[int] = set()
        self.branch_last: set[int] = set()  # order index of each added branch's last weight layer
        self.residual_adds = 0
        self.post_ln_norms: list[str] = []
        self.handles: list[Any] = []
        self.end_handle: Any = None
        self.mode: _Stamps | None = None
        self.error: BaseException | None = None

    # -- lifetime
    def begin(self) -> None:
        try:
            for mod in self.root.modules():
                if mod is self.root or isinstance(mod, torch.jit.ScriptModule):
                    continue  # (a scripted submodule takes no Python hooks; its inside is not seen)
                self.handles.append(mod.register_forward_pre_hook(self._pre))
                self.handles.append(mod.register_forward_hook(self._post, always_call=True))
            self.end_handle = self.root.register_forward_hook(self._end, always_call=True)
            self.handles.append(self.end_handle)
            self.model_handles.append(self.end_handle)  # the recorder removes it too (close, remove_model)
            self.mode = _Stamps(self)
            self.mode.__enter__()
        except BaseException:
            self._remove()
            raise

    def _remove(self, keep_root: bool = False) -> None:
        for h in self.handles:
            if not (keep_root and h is self.end_handle):
                h.remove()
        self.handles = []

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.mode is None:
            return
        try:
            # When the forward raised, torch is iterating the root's hook dict itself:
            # leave our root hook there (a no-op now; the recorder removes it on close).
            self._remove(keep_root=sys.exc_info()[0] is not None)
            mode, self.mode = self.mode, None
            _exit_mode(mode)
            self._write()
        except Exception as exc:
            self.recorder.fail("init_audit", exc)

    # -- hooks
    def _pre(self, mod: nn.Module, args: Any) -> None:
        for t in _tensors(args):  # the model's own inputs first meet a module here
            self._stamp_if_new(t, self.stamp)
        if _is_stamp_layer(mod):
            if self.inside == 0:
                self.stamp += 1
                name = self.names.get(id(mod))
                layer = self.record.layers.get(name) if name else None
                self.order.append(name if layer is not None and layer.kind in WEIGHT_LAYERS else None)
            self.inside += 1

    def _post(self, mod: nn.Module, args: Any, output: Any) -> None:
        if _is_stamp_layer(mod):
            self.inside = max(0, self.inside - 1)
        if isinstance(mod, _POST_LN_NORMS) and isinstance(output, Tensor):
            entry = self.tensors.get(id(output))
            stamp = entry[1] if entry is not None and entry[0]() is output else self.stamp
            self.tensors[id(output)] = (weakref.ref(output), stamp, self.names.get(id(mod)))

    # -- the mode's callback
    def _lookup(self, t: Tensor) -> tuple[int, str | None] | None:
        entry = self.tensors.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    def _stamp_if_new(self, t: Tensor, stamp: int) -> None:
        if isinstance(t, nn.Parameter) or self._lookup(t) is not None:
            return
        self.tensors[id(t)] = (weakref.ref(t), stamp, None)

    def note(self, name: str, inputs: Any, out: Any) -> None:
        found = [(t, self._lookup(t)) for t in _tensors(inputs)]
        known = [(t, s) for t, s in found if s is not None]
        if self.inside > 0 or not known:
            stamp = self.stamp
        else:
            stamp = max(s[0] for _, s in known)
        if name in _MERGE_OPS and len(known) >= 2:
            lo = min(s[0] for _, s in known)
            hi = max(s[0] for _, s in known)
            if lo < hi:
                self.residual_adds += 1
                self.bypassed.update(range(lo, hi))  # order indices of layers lo+1..hi
                if name not in ("cat", "concat", "concatenate"):  # a sum: x + f(x), f ends with layer hi
                    self.branch_last.add(hi - 1)
                for _, (s, norm) in known:
                    if s == lo and norm is not None and norm not in self.post_ln_norms:
                        self.post_ln_norms.append(norm)
        for t in _tensors(out):
            if not isinstance(t, nn.Parameter):
                self.tensors[id(t)] = (weakref.ref(t), stamp, None)

    # -- results
    def _write(self) -> None:
        bypassed = []
        for i in sorted(self.bypassed):
            name = self.order[i] if i < len(self.order) else None
            if name is not None and name in self.record.layers:
                self.record.layers[name].extra["residual_bypass"] = True
                self.record.layers[name].extra["residual_branch_last"] = i in self.branch_last
                bypassed.append(name)
        self.event["residual_adds"] = self.residual_adds
        self.event["residual_bypassed_layers"] = len(bypassed)
        self.event["post_ln_norms"] = self.post_ln_norms
        self.event["traced_weight_layers"] = len(self.order)
        self.tensors.clear()
        if self.error is not None:
            self.recorder.fail("init_audit", self.error)


def _is_stamp_layer(mod: nn.Module) -> bool:
    # Hugging Face's GPT-2 "Conv1D" is a Linear with a transposed weight
    return isinstance(mod, _STAMP_LAYERS) or type(mod).__name__ == "Conv1D"


def _exit_mode(mode: TorchFunctionMode) -> None:
    """Pop exactly ``mode`` off torch's function-mode stack, keeping any mode above it
    (``mode.__exit__`` pops whatever is on top, which is only right in LIFO order)."""
    above = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


def _tensors(obj: Any) -> list[Tensor]:
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, Tensor)]
