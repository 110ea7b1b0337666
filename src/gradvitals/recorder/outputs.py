"""Statistics of module outputs (mean, std, zero/saturated/non-finite fractions) and
dead-unit fractions, measured with as few kernels as the outputs allow.

Small outputs are staged and measured together at the end of the forward (one set of
kernels per shape); large CPU float32 ones are reduced at once in the hook, while
still in cache ("lean": a few sums, finished on the host for all of them at once);
an output that is a view of one measured later takes its statistics. Every result is
a device tensor appended to the staging's pending list (fetched at the step's sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..probes import activations as act_probe
from ..record import LayerInfo
from .staging import Staging

_NAN = float("nan")
_NSTATS = len(act_probe.STAT_NAMES)

#: Module outputs up to this many elements are measured together at the end of the
#: forward (see OutputMeter.stage_add); larger ones at once, where the arithmetic
#: outweighs the per-kernel cost.
ACT_BATCH_MAX_NUMEL = 2**16
#: Staged elements held at most (then measured early): bounds the memory kept alive.
ACT_STAGE_MAX_NUMEL = 2**20
#: CPU float32 outputs too large to stage, of modules whose output is not changed in
#: place later, are reduced at once in the hook, while the output is still in cache
#: (see OutputMeter.lean_add); only their few sums wait for the end of the forward.
#: (On W1's 32k-element outputs staging stays cheaper, ~9 dispatches per output.)
ACT_LEAN_MIN_NUMEL = ACT_BATCH_MAX_NUMEL + 1
#: Module outputs whose sums wait at most (elements): bounds the memory kept alive.
ACT_LEAN_MAX_NUMEL = 2**23


@dataclass(eq=False)
class ActInfo:
    """What one module's activation statistics need, worked out once (per version)."""

    module: nn.Module
    name: str
    kind: str
    layer: LayerInfo | None
    keys: list[str]
    wants_dead: bool
    sat: str | None
    leaf: bool
    version: int
    batchable: bool | None = None  # None: not yet seen; False: changed in place later


class OutputMeter:
    """Measures the module outputs the activation tracer hands it."""

    def __init__(self, staging: Staging, step: Callable[[], int], fail: Callable[[str, BaseException], None]) -> None:
        self.staging = staging
        self.step = step
        self.fail = fail
        self.dead: dict[str, act_probe.DeadUnits] = {}  # per layer, however it is measured
        self.stage: list[tuple[Tensor, int, ActInfo, int]] = []
        self.lean: list[tuple[Tensor, int, ActInfo, list[Tensor], Tensor | None]] = []
        self.leaned = 0
        self.staged = 0
        # Outputs whose measurement waits (staged or lean), by where their elements are:
        # a later module returning a view of the same elements (Flatten after pooling,
        # Identity) takes their statistics instead of measuring them again.
        self.where: dict[tuple[int, torch.device], tuple[ActInfo, int, int, torch.dtype, bool]] = {}
        self.alias: dict[int, list[ActInfo]] = {}  # id(source info) -> its views' infos
        self.group_keys: dict[tuple[int, ...], list[str]] = {}
        self.scratch = act_probe.Scratch(ACT_STAGE_MAX_NUMEL)  # CPU work buffers, see Scratch

    def reset(self) -> None:
        """Drop what waits (a forward that raised, or the hooks removed)."""
        self.stage, self.staged = [], 0
        self.lean, self.leaned = [], 0
        self.where, self.alias = {}, {}

    def finish_forward(self) -> None:
        self.flush_stage()
        self.flush_lean()
        self.where, self.alias = {}, {}  # (a view whose source was lost: nothing)

    def rename(self, renames: dict[str, str]) -> None:
        for d in list(self.dead):
            if d in renames:
                self.dead[renames[d]] = self.dead.pop(d)

    def ever_active(self, name: str) -> Tensor | None:
        """Layer ``name``'s per-unit "ever active over the dead-unit window" mask, or None."""
        dead = self.dead.get(name)
        if dead is None or not dead.masks:
            return None
        return dead.ever().reshape(-1)

    # ------------------------------------------------------------ views
    def view_of(self, x: Tensor, info: ActInfo) -> bool:
        """Whether ``x`` holds exactly the elements of an output measured at the end of
        this forward (same memory, numel and dtype, both contiguous, not changed since):
        its statistics are then that output's, given to ``info`` too (no new passes)."""
        src = self.where.get((x.data_ptr(), x.device))
        if src is None:
            return False
        sinfo, version, numel, dtype, _ = src
        if (x._version != version or x.numel() != numel or x.dtype != dtype or sinfo.sat != info.sat
                or sinfo is info or not x.is_contiguous()):
            return False
        self.alias.setdefault(id(sinfo), []).append(info)
        return True

    def _waits(self, x: Tensor, info: ActInfo, lean: bool) -> None:
        """Note where an output measured later lies (see view_of)."""
        if x.is_contiguous():
            self.where[(x.data_ptr(), x.device)] = (info, x._version, x.numel(), x.dtype, lean)

    def _measured(self, lean: bool) -> None:
        """The waiting outputs of one kind (lean or staged) are being measured: views
        of them found later cannot wait for them."""
        where = self.where
        if where:
            self.where = {k: v for k, v in where.items() if v[4] != lean}

    def _views(self, info: ActInfo, row: Tensor) -> None:
        """``row``, the statistics of ``info``'s output, are also its views' (pending)."""
        for other in self.alias.pop(id(info), ()):
            self.staging.pending.append((self.step(), other.keys[:_NSTATS], row))

    def _keys_of(self, gid: tuple[int, ...], make: Callable[[], list[str]]) -> list[str]:
        keys = self.group_keys.get(gid)
        if keys is None:
            if len(self.group_keys) > 1024:
                self.group_keys.clear()
            keys = self.group_keys[gid] = make()
        return keys

    def _window(self, name: str) -> act_probe.DeadUnits:
        dead = self.dead.get(name)
        if dead is None:
            dead = self.dead[name] = act_probe.DeadUnits()
        return dead

    # ------------------------------------------------------------ staged
    def stage_add(self, x: Tensor, info: ActInfo, dim: int) -> None:
        """Small outputs are measured together at the end of the forward (one set of
        kernels per shape, see act_probe.row_stats). A tensor changed in place after
        its module returned (an in-place activation next) must not be measured late:
        its version is checked then; the first traced forward measures everything at
        once and learns which modules are safe to stage."""
        if info.batchable is None:  # first sight: measured now, staged only to learn
            self.measure([x], [info], dim)
        if self.staged + x.numel() > ACT_STAGE_MAX_NUMEL:
            # Measured before it grows past the bound, so a group always fits the kept
            # buffers (Scratch(ACT_STAGE_MAX_NUMEL)): one row over, and the stacked copy
            # and its temporary would be fresh multi-MB allocations, written at
            # page-fault speed.
            self.flush_stage()
        self.stage.append((x.detach(), x._version, info, dim))
        self.staged += x.numel()
        if info.batchable:
            self._waits(x, info, False)

    def flush_stage(self) -> None:
        stage = self.stage
        if not stage:
            return
        self.stage, self.staged = [], 0
        self._measured(False)
        groups: dict[tuple, list[tuple[Tensor, ActInfo]]] = {}
        for x, version, info, dim in stage:
            unchanged = x._version == version
            if info.batchable is None:  # its first forward: already measured, now learnt
                info.batchable = unchanged
                continue
            if not unchanged:
                # Changed in place since its module returned (a path not seen before):
                # this forward's stats for it are lost; measured at once from now on.
                info.batchable = False
                continue
            key = (x.shape, x.dtype, x.device, info.sat, info.wants_dead, dim)
            groups.setdefault(key, []).append((x, info))
        for (_, dtype, device, _, _, dim), members in groups.items():
            try:
                if len(members) == 1 and dtype == torch.float32 and device.type == "cpu":
                    # Nothing to share kernels with: its few sums now, finished with the
                    # lean outputs' (one read for all; a measurement of its own costs
                    # ~15 small ops).
                    self.lean_add(members[0][0], members[0][1], dim)
                    continue
                self.measure([x for x, _ in members], [i for _, i in members], dim)
            except Exception as exc:
                self.fail("activations", exc)

    # -------------------------------------------------------------- lean
    def lean_add(self, x: Tensor, info: ActInfo, dim: int) -> None:
        """A CPU output reduced now, while it is still in cache: its sum, sum of squares,
        non-zero (and saturation) counts and per-unit activity, a few kernels with no
        copy; the statistics are finished for all such outputs of the forward at once
        (flush_lean: one read, the host arithmetic of act_probe.finish_raw)."""
        x2 = x.detach().reshape(1, -1)
        n = x2.shape[1]
        c = self.scratch.get(2, 1, n, x2)
        if c is None:
            c = torch.empty_like(x2)
        parts = [x2.sum(1), torch.linalg.vector_norm(x2, 2, dim=1), torch.ne(x2, 0.0, out=c).sum(1)]
        sat = act_probe.saturation_count(x2, info.sat, c)
        if sat is not None:
            parts.append(sat)
        active = act_probe.active_units(x, dim) if info.wants_dead and x.dim() else None
        self.lean.append((x2, x._version, info, parts, active))
        self.leaned += n
        self._waits(x, info, True)
        if self.leaned > ACT_LEAN_MAX_NUMEL:
            self.flush_lean()

    def flush_lean(self) -> None:
        lean = self.lean
        if not lean:
            return
        self.lean, self.leaned = [], 0
        self._measured(True)
        step = self.step()
        try:
            vals = act_probe.cpu_values(torch.cat([t for e in lean for t in e[3]]))
            rows: list[float] = []
            i = 0
            for x2, version, info, parts, _ in lean:
                k = len(parts)
                row = act_probe.finish_raw(vals[i:i + k], x2.shape[1], info.sat)
                i += k
                if row is None:  # NaN/Inf or ill-conditioned: the exact passes, on the output itself
                    if x2._version == version:
                        row = act_probe.cpu_values(act_probe.row_stats(x2, info.sat, self.scratch)[0])
                    else:  # changed in place since (a path not seen before): measured at once from now on
                        info.batchable = False
                        row = [_NAN] * _NSTATS
                rows.extend(row)
                if self.alias and id(info) in self.alias:
                    self._views(info, torch.tensor(row, dtype=torch.float32))
            keys = self._keys_of(tuple(id(e[2]) for e in lean),
                                 lambda: [k for e in lean for k in e[2].keys[:_NSTATS]])
            self.staging.pending.append((step, keys, torch.tensor(rows, dtype=torch.float32)))
            # Dead units: the activity masks of a forward's outputs with the same number
            # of units, reduced together over each module's own window.
            by_units: dict[int, list[tuple[ActInfo, Tensor]]] = {}
            for _, _, info, _, active in lean:
                if active is not None:
                    by_units.setdefault(active.numel(), []).append((info, active))
            for members in by_units.values():
                gkey = ("lean",) + tuple(id(i.module) for i, _ in members)
                frac = act_probe.push_group([self._window(i.name) for i, _ in members],
                                            torch.stack([a.reshape(-1) for _, a in members]))
                dkeys = self._keys_of(gkey, lambda: [i.keys[-1] for i, _ in members])
                self.staging.pending.append((step, dkeys, frac))
        except Exception as exc:
            self.fail("activations", exc)

    # ------------------------------------------------------------ direct
    def measure(self, xs: list[Tensor], infos: list[ActInfo], dim: int) -> None:
        """Stats of module outputs of one shape (and dead-unit fractions): pending."""
        X = act_probe.stack_rows(xs, self.scratch)
        st = act_probe.row_stats(X, infos[0].sat, self.scratch)
        if infos[0].wants_dead:
            shape = xs[0].shape
            if len(xs) == 1:
                frac = self._window(infos[0].name).update(xs[0], dim).reshape(1)
            else:  # each module's own window, reduced together
                frac = act_probe.push_group([self._window(i.name) for i in infos],
                                            act_probe.batch_active_units(X, shape, dim))
            st = torch.cat([st, frac.reshape(-1, 1).to(st.dtype)], 1)
        if self.alias:
            for i, info in enumerate(infos):
                if id(info) in self.alias:
                    self._views(info, st[i, :_NSTATS])
        step = self.step()
        if len(infos) == 1:
            self.staging.pending.append((step, infos[0].keys, st[0]))
            return
        keys = self._keys_of(tuple(id(i) for i in infos), lambda: [k for i in infos for k in i.keys])
        self.staging.pending.append((step, keys, st.reshape(-1)))
