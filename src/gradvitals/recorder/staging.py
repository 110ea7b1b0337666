"""Device values waiting for the step's one host sync, and where they go after it.

Probes append ``(step, keys, tensor)`` to :attr:`Staging.pending`; :meth:`Staging.flush`
fetches everything pending in one transfer per device (THE host sync of the step),
merges across ranks when there are several, and appends each value to its series
(``keys`` name them; see record.QUANTITIES). Per-parameter gradient norms and other
values nobody reads mid-run wait in a host-side ring and are appended in bulk.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .. import distributed
from ..record import QUANTITIES, Record, Series, split_key

#: Steps of per-parameter gradient norms (and scheduled values) fetched every step but
#: appended to their series together: one bulk extend per series, not an append per value.
RING_STEPS = 32
ROW_GRAD, ROW_NOW, ROW_LATER = 0, 1, 2  # how flush appends a row (see Staging.row)

#: A pending item: (step, series keys, a vector of their values or a list of 0-d tensors).
Item = tuple[int, list[str], Any]


class Staging:
    """The pending values of the open step, the ring, and the step's flush."""

    def __init__(self, owner: Any, record: Record) -> None:
        self.owner = owner  # the Recorder: the distributed merge reads its models and calls its fail()
        self.record = record
        self.pending: list[Item] = []
        self.merger: Any = None  # distributed.Merger once a multi-rank process group exists
        self.tensorboard: Any = None  # reports.tensorboard.TensorBoardSink: fed every flush
        self.progress: Any = None  # reports.progress.Progress: the CLI's live status line
        #: Called with the non-finite values of a flush: (step, key, value) each.
        self.on_nonfinite: Callable[[list[tuple[int, str, float]]], None] | None = None
        self.rows: dict[tuple[str, ...], tuple[list[Series], list[int], int]] = {}  # see row()
        self.rows_of: dict[str, Series] | None = None
        # Per-parameter gradient norms fetched but not yet appended: key tuple ->
        # (steps, rows of values, their series); appended in bulk (see ring_push).
        self.ring: dict[tuple[str, ...], tuple[list[int], list[list[float]], list[Series]]] = {}
        self.ring_rows = 0
        self._global_step = -1  # grad_norm_global of this step so far (several optimizers)
        self._global_value = 0.0

    def series(self, key: str) -> Series:
        s = self.record.series.get(key)
        if s is None:
            s = self.record.series[key] = Series(self.record.cap)
        return s

    # ---------------------------------------------------------------- ring
    def ring_push(self, tkeys: tuple[str, ...], row_series: list[Series], step: int, vals: list[float]) -> None:
        """A step's per-parameter gradient norms (already fetched) wait on the host; every
        RING_STEPS steps each parameter's series takes them in one extend: the Python
        work per value on the step's path becomes a list append per step."""
        entry = self.ring.get(tkeys)
        if entry is not None and entry[0][-1] >= step:  # the same step again (a closure): in order
            self.drain()
            entry = None
        elif entry is None and self.ring:
            # A new set of keys (e.g. some gradients missing this step) sharing series with
            # one waiting: that one first, so every series gets its steps in order.
            ids = {id(x) for x in row_series}
            if any(id(x) in ids for e in self.ring.values() for x in e[2]):
                self.drain()
        if entry is None:
            entry = self.ring[tkeys] = ([], [], row_series)
        entry[0].append(step)
        entry[1].append(vals)
        self.ring_rows += 1
        if self.ring_rows >= RING_STEPS * len(self.ring):  # ~RING_STEPS steps of each
            self.drain()

    def drain(self) -> None:
        """Append what waits in the ring (no device access)."""
        if not self.ring_rows:
            return
        ring, self.ring, self.ring_rows = self.ring, {}, 0
        for steps, rows, row_series in ring.values():
            for s, col in zip(row_series, zip(*rows)):
                s.extend(steps, list(col))

    def steady_row(self, tkeys: tuple[str, ...]) -> list[Series] | None:
        """The series of a row already built for ``tkeys`` (None: the general flush
        builds it): what the one-read path of a steady step appends to."""
        if self.rows_of is not self.record.series:
            return None
        row = self.rows.get(tkeys)
        return row[0] if row is not None else None

    def idle(self) -> bool:
        """Nothing pending, no TensorBoard, no cross-rank merge: a step's values can go
        straight to their series (GradientMeter's one-read path)."""
        return not self.pending and self.tensorboard is None and self.merger is None

    # --------------------------------------------------------------- flush
    def flush(self) -> None:
        """THE host sync of the step: one transfer per device of everything pending."""
        merging = self.merger is not None or distributed.initialized()
        if merging:
            # Multi-rank: the global values an earlier flush's all-reduce brought, first
            # (a NaN among them starts its origin search before this flush's collective).
            self.settle()
        if not self.pending:
            return
        pending = self.pending
        self.pending = []
        if merging:
            pending = [(st, k, torch.stack(t) if isinstance(t, list) else t) for st, k, t in pending]
            pending = distributed.merge_pending(self.owner, pending)  # global values, one all-reduce
            if not pending:
                return  # in flight: the next flush (or the report) lands them
            ring = False
        else:  # no process group: no DTensor either (FSDP2 needs one, even on one rank)
            ring = self.tensorboard is None
        self.apply(pending, ring)

    def settle(self, patience_s: float | None = None, final: bool = False) -> None:
        """Append the global values of a merge still in flight (multi-rank runs; see
        distributed.Merger.start). ``patience_s``: at most this long a wait (exit paths).
        ``final`` (the run ends on every rank): also the steps still batched."""
        landed = distributed.collect_merged(self.owner, patience_s)
        if landed:
            self.apply(landed, ring=False)
        if final and patience_s is not None:
            landed = distributed.close_batch(self.owner, patience_s)
            if landed:
                self.apply(landed, ring=False)

    def apply(self, pending: list[Item], ring: bool) -> None:
        """Fetch ``pending`` (one transfer per device) and append each value to its
        series; NaN/Inf among the watched ones go to :attr:`on_nonfinite`. ``ring``:
        per-parameter gradient norms may wait in the ring."""
        dev0 = _device(pending[0][2])
        one_device = True
        for item in pending:
            if _device(item[2]) != dev0:
                one_device = False
                break
        if one_device:
            groups = [pending]
        else:
            by_device: dict[torch.device, list[Item]] = {}
            for item in pending:
                by_device.setdefault(_device(item[2]), []).append(item)
            groups = list(by_device.values())
        nonfinite: list[tuple[int, str, float]] = []
        if self.rows_of is not self.record.series:  # renamed series (a second model): rebuild
            self.rows = {}
            self.rows_of = self.record.series
        rows = self.rows
        isfinite = math.isfinite
        for items in groups:
            # Scalars (the step's fused norms, loss, lr: lists of 0-d float32 tensors) go
            # in one stack, vectors (scheduled probes, clipping) after them.
            scalars: list[Tensor] = []
            vectors: list[Tensor] = []
            for _, _, t in items:
                if isinstance(t, list):
                    scalars.extend(t)
                else:
                    vectors.append(t.reshape(-1).float())
            if not vectors:
                flat = torch.stack(scalars)
            elif scalars:
                flat = torch.cat([torch.stack(scalars), *vectors])
            else:
                flat = torch.cat(vectors)
            values = flat.tolist()  # host sync (one per device)
            i = 0  # scalar items first, in order, then the vectors
            j = len(scalars)
            for step, keys, t in items:
                n = len(keys)
                if isinstance(t, list):
                    vals = values[i:i + n]
                    i += n
                else:
                    vals = values[j:j + n]
                    j += n
                tkeys = tuple(keys)
                row = rows.get(tkeys)
                if row is None:
                    row = rows[tkeys] = self.row(keys)
                row_series, watched, kind = row
                if kind == ROW_GRAD:
                    # The global norm from these, now; the values themselves in bulk
                    # later (the ring), unless a NaN/Inf needs them at once.
                    total = self.add_global_norm(step, vals, nonfinite)
                    if ring and isfinite(total):
                        self.ring_push(tkeys, row_series, step, vals)
                        continue
                else:
                    bad = False
                    for k in watched:  # the quantities whose NaN/Inf starts an origin search
                        if not isfinite(vals[k]):
                            nonfinite.append((step, keys[k], vals[k]))
                            bad = True
                    if ring and not bad and kind == ROW_LATER:  # scheduled probes, clipping
                        self.ring_push(tkeys, row_series, step, vals)
                        continue
                if self.ring_rows and kind != ROW_NOW:
                    self.drain()  # in order: what waits in the ring comes first
                for s, v in zip(row_series, vals):
                    s.append(step, v)
                if kind == ROW_GRAD:
                    for k in watched:
                        if not isfinite(vals[k]):
                            nonfinite.append((step, keys[k], vals[k]))
        if self.tensorboard is not None:
            self.tensorboard.write_step(self.record, pending)
        if nonfinite and self.on_nonfinite is not None:
            self.on_nonfinite(nonfinite)
        if self.progress is not None:
            self.progress.update(self.record)  # reads the values just fetched; never raises

    def row(self, keys: list[str]) -> tuple[list[Series], list[int], int]:
        """The series a pending item's values go to (cached per key tuple): no
        per-value dict lookups on the hot path."""
        if len(self.rows) > 4096:  # e.g. a gradient set that changes every step
            self.rows.clear()
        out = [self.series(k) for k in keys]
        watched = []
        for j, k in enumerate(keys):
            q = QUANTITIES.get(split_key(k)[0])
            if q is not None and q.watched:
                watched.append(j)
        q0 = QUANTITIES.get(split_key(keys[0])[0]) if keys else None
        if q0 is not None and q0.name == "grad_norm":
            kind = ROW_GRAD
        elif q0 is not None and q0.name in ("loss", "lr"):
            kind = ROW_NOW  # read every step (the live status line): appended at once
        else:
            kind = ROW_LATER
        return out, watched, kind

    def add_global_norm(self, step: int, norms: list[float], nonfinite: list[tuple[int, str, float]],
                        total: float | None = None) -> float:
        """grad_norm_global = sqrt(sum of squared per-parameter norms), in float64 on the
        host; a second optimizer of the same step adds its share (hypot). ``total``: that
        of ``norms``, when the caller has it already."""
        if total is None:
            total = math.hypot(*norms)
        if self._global_step == step:
            total = math.hypot(total, self._global_value)
        self._global_step, self._global_value = step, total
        self.series("grad_norm_global").append(step, total)
        if not math.isfinite(total):
            nonfinite.append((step, "grad_norm_global", total))
        return total

    def drop_clip(self) -> None:
        """A skipped step (GradScaler overflow): its clip values are not the run's."""
        self.pending = [item for item in self.pending
                        if split_key(item[1][0])[0] not in ("clip_total_norm", "clip_rank_norm")]


def _device(t: Any) -> torch.device:
    return t[0].device if isinstance(t, list) else t.device


def cpu_floats(ts: list[Tensor]) -> list[float]:
    """The values of one-element CPU tensors (the step's gradient norms and loss on the
    CPU): in host memory already, so no device synchronisation — the sync counter of
    benchmarks/overhead.py leaves reads made here out. One ``.item()`` each: cheaper
    there than stacking them first (a kernel, an allocation and a copy for a few dozen
    floats cost ~2x as much in a step). Refuses any tensor not on the CPU: read here,
    an accelerator tensor would be a hidden sync."""
    for x in ts:
        if not x.is_cpu:
            raise ValueError(f"cpu_floats() reads CPU tensors only, got one on {x.device}")
    out = []
    with torch._C.DisableTorchFunction():  # past any tracing mode active
        for x in ts:  # (a loop, not a comprehension: the sync counter knows this frame)
            out.append(x.item())
    return out
