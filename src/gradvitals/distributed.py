"""torch.distributed runs (DDP, FSDP2 ``fully_shard``, HSDP, tensor and sequence
parallel DTensors, FSDP2 x TP on a 2-D mesh) under torchrun: one merged record.

Every rank records; the recorder's pending values are merged across ranks by fused
all-reduces (a float64 SUM over a small CPU buffer, on a private gloo group with a
time-out): one for a first or scheduled step, one for each batch of ordinary steps (see
below), so every rank holds the same, global record and rank 0 alone writes the report.
What each value becomes:

========================  ===========================================================
value                     how it is merged
========================  ===========================================================
grad / weight norm        sharded DTensor (FSDP2, TP, both nested on a 2-D mesh):
                          ``sqrt(sum over ranks of |local shard|^2)``, divided by
                          the copies of each shard (HSDP replicas, TP ranks of one
                          FSDP shard); replicated (DDP: gradients are already
                          averaged by DDP's own all-reduce; TP Replicate):
                          ``sqrt(mean of squares)``, which returns the identical
                          per-rank value exactly. A gradient's own placements count,
                          not its parameter's (a row-parallel embedding's gradient is
                          whole on each rank)
partial gradient          a DTensor gradient with a Partial placement (SequenceParallel
                          LayerNorm weights: each rank's part of the sequence) is a
                          sum still to be taken: its local values are summed in the
                          buffer and the norm taken of the sum
grad_norm_global          recomputed from the merged per-parameter norms
update ratio              sharded: ``|dW| / |W|`` from merged |dW| and |W|; else mean
clip_rank_norm            each rank's own value, kept as ``clip_rank_norm/<rank>``
replicas (DDP, Replicate  on scheduled steps, each replicated parameter's norm / world
DTensors)                 beside its square: their spread across ranks; a per-rank
                          digest names the ranks that differ (``replica_spread/<param>``,
                          ``replica_rank_off/<rank>``, written only when some differ)
loss, lr, clip values     mean over ranks (each rank's loss is its micro-batch's mean;
                          with equal micro-batches that is the global batch's loss)
maxima (log Z's max,      the largest over ranks: each rank's value in its own slot
attention max logit)      (O(world) values each)
activation mean/std/      weighted by each rank's share of the elements (the numel of
zero/sat/NaN fractions    the model's input on that rank): mean and second moment are
                          combined, then std = sqrt(E[x^2] - mean^2)
dead_frac                 units never positive on ANY rank over the layer's window
                          (per-unit "ever active" masks are summed, whether the layer
                          was measured alone or with others); under tensor
                          parallelism, where ranks hold different units, the ranks'
                          counts of never-active units over their counts of units;
                          under FSDP2 x TP the masks in one slot per TP rank (the
                          data-parallel ranks holding the same units add theirs)
========================  ===========================================================

Cost per recorded step: 8 bytes x (1 + world_size + #gradient tensors + #losses +
#param groups whose lr is a tensor + #elements of partial gradients), plus on a step
that clips 8 bytes x (2 + world_size), plus on scheduled steps 8 bytes x (2 x #parameter
tensors + 6 x #recorded modules + #output units of the ReLU/weight/BatchNorm layers),
8 bytes x (#replicated parameter tensors + world_size) for the replicas, and for log Z and
attention 8 bytes per mean and 8 x world_size per max. That is O(#tensors + #units), never
O(#parameters) but for the partial gradients (SequenceParallel LayerNorm vectors,
hidden-size each): see :func:`allreduce_bytes`.

Before the values of the first merge and of each scheduled step, a 16-byte all-reduce of
[layout checksum, size] (:meth:`Merger._check_layout_first`): gloo aborts the process
when ranks all-reduce buffers of different sizes, so a layout that may differ (pipeline
stages, a module that ran on some ranks only) stops the merge on every rank instead.

Ordinary steps (not the first merge, not scheduled) are not waited for, and they are
batched, :data:`BATCH_STEPS` per all-reduce (:meth:`Merger.start`): the all-reduce's fixed
cost is paid once per batch and lands at the flush after it is sent; the bytes per step
stay those above, the header (1 + world_size) once per batch. Under FSDP2 and tensor
parallelism a rank's own values are shards: a mid-run report leaves their unmerged steps
out instead of showing them (``run.distributed.in_flight_steps``).

Crash safety: every collective added here waits at most ``GRADVITALS_DIST_TIMEOUT_S``
seconds (default :data:`DEFAULT_TIMEOUT_S`); at the end of the run only the batch every
rank holds is sent (when the script destroys its process group, or at close), padded to a
full batch's size and waited for at most ``SETTLE_PATIENCE_S`` (a rank that is gone
leaves this rank's own values for those steps, and the report says which; under FSDP2
and TP, whose own values are shards, those steps are dropped instead); the values
still pending when the run ends stay local and are dropped; a time-out or a layout
mismatch switches merging off for the rest of the run (the report says so).

The NaN-origin replay under FSDP2 and tensor parallelism is made by every rank at
once (the forward's collectives need every rank, :func:`replay_plan`): at a merge every
rank waited for, or, in a batched step, when every rank met a NaN/Inf at that same step
and says so in the process group's store within :data:`REPLAY_MEET_S` (a NaN made on
one rank reaches every rank through the run's own collectives: TP's all-reduces, FSDP's
reduce-scatter). The origin kept is the one met first in the forward, with its rank
(:meth:`Merger.merge_origin`). Without the merge no such replay runs (the bad rank
checks its own batch instead).

Not merged: ``bn_batch`` (what each rank's BatchNorm really normalised over), per-rank events.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
import os
import signal
import threading
import time
import zlib
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .record import QUANTITIES, quantity_of, split_key
from .recorder.options import scheduled
from .torch_compat import default_store, dtensor_type, dtensor_type_if_loaded, has_fsdp, local_tensors, unwrap

log = logging.getLogger("gradvitals")

#: Seconds a gradvitals collective may wait for the other ranks. The merge runs just
#: before ``optimizer.step()``, right after the gradient all-reduce synchronised the
#: ranks, so a healthy peer arrives within milliseconds; 300 s leaves room for a rank
#: that checkpoints between backward and step, and still ends a hang.
DEFAULT_TIMEOUT_S = 300.0
TIMEOUT_ENV = "GRADVITALS_DIST_TIMEOUT_S"
#: "0": no merge; each rank records its own values (for a watch on some ranks only).
MERGE_ENV = "GRADVITALS_DIST_MERGE"

#: Ordinary steps (neither the first merge nor a scheduled one) merged together in one
#: all-reduce. An all-reduce's fixed cost (starting it on gloo's thread, landing it) is
#: paid once per this many steps instead of every step; the merged values reach the
#: record (and the live status line) at most this many steps later, the report lands
#: them all. Override with GRADVITALS_DIST_BATCH (1: no batching).
BATCH_STEPS = 8
BATCH_ENV = "GRADVITALS_DIST_BATCH"

#: How long a rank that met a NaN/Inf in a batched step under FSDP2 or tensor
#: parallelism waits for every rank to say it met one at that step too (a key each in
#: the process group's store), before the replay every rank must join. The run's own
#: collectives tie the ranks within milliseconds when they all met it; a rank that did
#: not never says so, and the others go on without a replay after this long, once per run.
REPLAY_MEET_S = 5.0
REPLAY_KEY = "gradvitals/replay/{serial}"

#: Where each watching rank says so, in the process group's key-value store (torchrun's
#: TCPStore): no collective, so a rank that does not watch is never waited for.
WATCHING_KEY = "gradvitals/watching/{rank}"
#: How long the first merge waits for the other ranks to say they watch when nothing ties
#: their training to this rank's (independent or replicated models: no collective in the
#: step). Under DDP, FSDP2 and tensor parallelism there is no wait: a rank says it at its
#: first forward, before the collective of its first backward, so a rank unheard of once
#: that collective has completed does not watch.
WATCHING_GRACE_S = 30.0

#: |W| below this is treated as this (the recorder clamps the same way) so a ratio
#: of an all-zero shard can be turned back into |dW|.
_W_FLOOR = 1e-12

#: Relative spread across ranks of a replicated parameter's norm above which the replicas
#: differ. Identical bytes give bit-identical float32 norms on every rank; the spread is
#: taken in float64 as sqrt(E[v^2] - E[v]^2), whose rounding (~1e-16 relative inside the
#: sqrt) leaves at most ~1e-8: 1e-6 is 100x that.
REPLICA_SPREAD_FLOOR = 1e-6

#: A module's activation statistics as the recorder pends them, in this order: the
#: quantity table's "moment" rows (mean, std, then the fractions). Merged as one
#: block: element counts, first and second moments, fractions weighted alike.
_MOMENT_BLOCK = tuple(q.name for q in QUANTITIES.values() if q.merge == "moment")


# ---------------------------------------------------------------- ranks
_DIST: Any = None


def _dist() -> Any:
    global _DIST
    if _DIST is None:
        import torch.distributed as dist

        _DIST = dist
    return _DIST


_IS_INITIALIZED: Any = None  # torch.distributed.is_initialized, or a False-returning stand-in


def initialized() -> bool:
    """True when a default process group exists (and torch was built with distributed).
    Called every step: whether torch has distributed is looked up once."""
    global _IS_INITIALIZED
    try:
        if _IS_INITIALIZED is None:
            dist = _dist()
            _IS_INITIALIZED = dist.is_initialized if dist.is_available() else (lambda: False)
        return bool(_IS_INITIALIZED())
    except Exception:
        return False


def announce() -> bool:
    """Say in the store that this rank watches (:data:`WATCHING_KEY`), once a process
    group exists; True once said, or where there is nothing to say (one rank, no store).
    Called at each watched forward until it returns True. Never raises."""
    if not initialized():
        return False
    try:
        dist = _dist()
        if dist.get_world_size() < 2:
            return True
        store: Any = default_store()
        if store is not None:
            store.set(WATCHING_KEY.format(rank=dist.get_rank()), "1")
    except Exception as exc:  # the merge then waits for the ranks as before (its time-out)
        log.debug("gradvitals: could not say this rank watches: %s", exc)
    return True


def ranks_not_watching(grace_s: float) -> list[int]:
    """The ranks that have not said they watch (:func:`announce`), waiting at most
    ``grace_s`` for them; [] when every rank has, or where no store can tell."""
    try:
        dist = _dist()
        store: Any = default_store()
        if store is None:
            return []
        keys = [WATCHING_KEY.format(rank=r) for r in range(dist.get_world_size())]
        end = time.monotonic() + grace_s
        while True:
            if store.check(keys):
                return []
            if time.monotonic() >= end:
                return [r for r, k in enumerate(keys) if not store.check([k])]
            time.sleep(0.05)
    except Exception as exc:
        log.debug("gradvitals: could not tell which ranks watch: %s", exc)
        return []


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size): from the process group once it exists,
    else from torchrun's environment (RANK, WORLD_SIZE), else (0, 1)."""
    if initialized():
        dist = _dist()
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def writes_report() -> bool:
    """Only rank 0 writes the (already merged) report; other ranks write nothing."""
    return rank_and_world()[0] == 0


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


# ------------------------------------------------------------ tensors
def square_share(t: Any, world: int) -> float:
    """Weight of this rank's ``|local|^2`` in the sum over ranks that gives ``|t|^2``.
    A plain tensor (DDP: replicated) is whole on every rank: 1/world. A DTensor split
    in S shards over its mesh (FSDP2: S = world) appears world/S times (HSDP
    replicas): S/world."""
    dt = dtensor_type()
    if dt is None or not isinstance(t, dt):
        return 1.0 / world
    shards = 1
    for dim, placement in enumerate(t.placements):
        if _sharded(placement):
            shards *= t.device_mesh.size(dim)
    return shards / world


def _sharded(placement: Any) -> bool:
    """A Shard placement, the nested one FSDP2 puts over a tensor-parallel shard
    included: ``_StridedShard`` (FSDP2 x TP) is no ``Shard`` and its ``is_shard()``
    is False, yet each rank holds a disjoint part of the tensor."""
    return placement.is_shard() or getattr(placement, "split_factor", None) is not None


def partial_scale(t: Any, world: int) -> float | None:
    """For a gradient that is a partial sum on each rank (a DTensor with a ``Partial``
    placement: a SequenceParallel LayerNorm's weight, whose rank saw only its part of
    the sequence; torch adds the parts only when the optimizer uses them): the factor
    that turns the SUM over all ranks of the local tensors into the gradient (a mesh
    of S ranks covering the world W in W/S replicas: S/W for a sum, 1/W for a mean).
    None for any other tensor, and for a partial one the merge cannot sum (a mesh
    smaller than the world, or sharded as well)."""
    dt = dtensor_type()
    if dt is None or not isinstance(t, dt):
        return None
    placements = t.placements
    partial = [d for d, pl in enumerate(placements) if pl.is_partial()]
    if len(partial) != 1 or t.device_mesh.size() != world:
        return None
    if any(not pl.is_replicate() for d, pl in enumerate(placements) if d != partial[0]):
        return None
    op = getattr(placements[partial[0]], "reduce_op", "sum")
    if op == "sum":
        return t.device_mesh.size(partial[0]) / world
    return 1.0 / world if op == "avg" else None


def _outer(model: Any) -> nn.Module:
    """The module a watched model trains in: the wrapper a trainer put it in (Lightning's
    DistributedDataParallel, WatchedModel.wrapper), else the model itself."""
    ref = getattr(model, "wrapper", None)
    wrapper = ref() if ref is not None else None
    return wrapper if wrapper is not None else model.module


def replicated(p: Any, module: nn.Module) -> bool:
    """Whether every rank should hold ``p`` identically: a parameter DDP synchronises
    (not one of its ``parameters_to_ignore``), or a DTensor replicated on every mesh
    dimension (tensor-parallel norms and biases). A plain model under a process group
    is not assumed to be a replica (each rank may train its own on purpose)."""
    dt = dtensor_type()
    if dt is not None and isinstance(p, dt):
        return all(placement.is_replicate() for placement in p.placements)
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        return False
    ignored = getattr(module, "parameters_to_ignore", None)
    if ignored:
        return not any(q is p for n, q in module.module.named_parameters() if n in ignored)
    return True


_MERGERS = 0  # Mergers made in this process (Merger.serial)


def _meet(serial: int, step: int, world: int, patience_s: float) -> bool:
    """Say in the store that this rank met a NaN/Inf at ``step``; whether every rank
    did. One verdict per step for every rank, set once and atomically: "yes" by the
    last rank to arrive, "no" by a rank whose patience ran out first (or at once when a
    rank gave up at an earlier step: each searches once, so a rank that learns of the
    NaN a step later waits for nobody). No store: False."""
    try:
        store: Any = default_store()
        if store is None:
            return False
        base = REPLAY_KEY.format(serial=serial)
        gave_up, verdict_key = f"{base}/gave_up", f"{base}/{step}/verdict"
        verdict = None
        if store.add(gave_up, 0) == 0 and store.add(f"{base}/{step}/count", 1) >= world:
            verdict = store.compare_set(verdict_key, "", "yes")
        end = time.monotonic() + patience_s
        while verdict is None:
            if store.check([verdict_key]):
                verdict = store.get(verdict_key)
            elif time.monotonic() >= end or store.add(gave_up, 0) > 0:
                verdict = store.compare_set(verdict_key, "", "no")
            else:
                time.sleep(0.001)
        if verdict != b"yes":
            store.add(gave_up, 1)
        return verdict == b"yes"
    except Exception as exc:
        log.debug("gradvitals: could not meet the other ranks for a replay: %s", exc)
        return False


def replay_plan(recorder: Any, module: nn.Module) -> tuple[nn.Module | None, bool]:
    """(what a NaN-origin replay runs, whether every rank must replay it too).

    Without FSDP or tensor parallelism: the module inside DDP (DDP's own forward may
    broadcast buffers), on this rank alone. Under FSDP2 the forward all-gathers
    parameters with every rank, under tensor parallelism (DTensor parameters) it
    all-reduces and all-gathers activations: the module itself, replayed by every
    rank at once — only while the merge is on (every rank records, and every rank
    decided to look at this same flush, from the same merged values, every rank
    waiting for them at that step; or, in a batched step, every rank met a NaN/Inf at
    it: :meth:`Merger.meet`); (None, False) otherwise: no replay. None either
    on a rank whose merge landed a step late (its weights and inputs are the next
    step's: the ranks that saw the NaN replayed theirs)."""
    if not initialized():
        return unwrap(module), False
    merger = getattr(recorder, "merger", None)
    merged = isinstance(merger, Merger) and merger.active
    if merged and merger.late:
        return None, False
    if not _replays_on_every_rank(module):
        return unwrap(module), False
    if merged and (merger.meet() if merger.alone else merger.together):
        return module, True
    return None, False


def no_replay_reason(recorder: Any) -> str:
    """Why :func:`replay_plan` gave no replay, for the ``nonfinite_origin`` event."""
    merger = getattr(recorder, "merger", None)
    if isinstance(merger, Merger) and merger.active:
        if merger.alone:
            return (f"skipped: a batched step, and not every rank met a NaN/Inf at it within {REPLAY_MEET_S:g} s: "
                    "an FSDP or tensor-parallel forward needs every rank at once")
        if merger.late:
            return "skipped: this rank's values were finite; it learned of the NaN a step later"
        return ("skipped: an FSDP or tensor-parallel forward needs every rank, and only the ranks "
                "that saw the NaN stopped at that step")
    return "skipped: an FSDP or tensor-parallel forward needs every rank, and not every rank records"


def strategy(module: nn.Module) -> str:
    """"ddp", "fsdp2", "hsdp" (fully_shard on a (replicate, shard) mesh), either with
    "+tensor_parallel" (a mesh dimension more: FSDP2 x TP), "tensor_parallel",
    "replicated" (a plain model under a process group) or "none"."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return "ddp"
    dt = dtensor_type()
    placements = [p.placements for p in module.parameters() if dt is not None and isinstance(p, dt)]
    if has_fsdp(module):
        # fully_shard's own placements come first: (Shard,) or, for HSDP, (Replicate, Shard).
        hsdp = any(len(pl) >= 2 and pl[0].is_replicate() for pl in placements)
        tp = any(len(pl) > (2 if hsdp else 1) for pl in placements)
        return ("hsdp" if hsdp else "fsdp2") + ("+tensor_parallel" if tp else "")
    if placements:
        return "tensor_parallel"
    return "replicated" if initialized() else "none"


def unit_slot(module: nn.Module) -> tuple[int, int] | None:
    """Under FSDP2 x TP: (this rank's coordinate on the tensor-parallel mesh dimension,
    that dimension's size), else None. fully_shard puts its own mesh dimensions first
    and TP's after them (torch's FSDPParam: the data-parallel mesh concatenated with
    TP's); FSDP2 takes a 1-D TP mesh, so TP's is the last."""
    if not has_fsdp(module):
        return None
    dt = dtensor_type()
    meshes = [p.device_mesh for p in module.parameters() if dt is not None and isinstance(p, dt)]
    mesh = max(meshes, key=lambda m: m.ndim, default=None)
    if mesh is None or mesh.ndim < 2:
        return None
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    return int(coordinate[-1]), int(mesh.shape[-1])


# ------------------------------------------------------------ the merge
def allreduce_bytes(world_size: int, grad_tensors: int, losses: int = 1, lr_groups: int = 1,
                    weight_tensors: int = 0, modules: int = 0, units: int = 0, clips: int = 0,
                    replicas: int = 0, scalars: int = 0, maxima: int = 0, partial_elements: int = 0) -> int:
    """Bytes each rank sends into the one fused all-reduce of a recorded step.

    ``weight_tensors``, ``modules`` and ``units`` are non-zero on scheduled steps only:
    weight norms + update ratios (2 per tensor), 6 numbers per recorded module
    (element weight, mean, second moment, 3 fractions), one "ever active" flag per
    output unit of a dead-unit-tracked layer; ``replicas``: replicated parameter tensors
    (their norms' mean and a digest per rank, scheduled steps). ``clips``: clip calls of the step (its
    total norm and whether it clipped, as means, and every rank's own total norm).
    ``scalars``: the other scheduled statistics merged as means (log Z's mean when the loss
    is a cross-entropy, the two entropies of each attention module); ``maxima``: those merged
    as the max over ranks, one slot per rank each (log Z's max, each attention module's max
    logit). ``partial_elements``: the elements of the gradients that are partial sums on each
    rank (SequenceParallel LayerNorms' weights and biases, :func:`partial_scale`), sent whole
    on every recorded step: the one part that is O(#parameters) of those tensors, which are
    small vectors.
    """
    elements = (1 + world_size + grad_tensors + losses + lr_groups + 2 * weight_tensors + 6 * modules + units
                + clips * (2 + world_size) + (replicas + world_size if replicas else 0) + scalars
                + maxima * world_size + partial_elements)
    return 8 * elements


def moment_terms(weight: Tensor | float, mean: Tensor, std: Tensor) -> Tensor:
    """What one part contributes to the SUM all-reduce: [n, n*mean, n*E[x^2]] for n
    elements with this mean and population std. Summed over parts, then
    :func:`moments_from_sums` gives the whole's mean and std."""
    w = torch.as_tensor(weight, dtype=torch.float64)
    mean, std = mean.double(), std.double()
    return torch.stack([w, w * mean, w * (std * std + mean * mean)])


def moments_from_sums(sums: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, population std) from summed :func:`moment_terms`."""
    total = sums[0]
    mean = sums[1] / total
    return mean, (sums[2] / total - mean * mean).clamp_min(0).sqrt()


class Merger:
    """Merges a recorder's pending values across ranks, one all-reduce per flush."""

    def __init__(self, recorder: Any) -> None:
        dist = _dist()
        self.recorder = recorder
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.timeout = datetime.timedelta(seconds=timeout_s())
        self.active = True
        self.calls = 0
        self.bad_ranks: list[int] = []
        self.flight: _Flight | None = None  # a merge start() launched and did not wait for
        self.batch: _Batch | None = None  # ordinary steps fetched, not yet sent (see start())
        self._layouts: dict[tuple, _Layout | None] = {}  # per item keys: how a batched step merges
        self.batch_k = 1  # steps per batch; decided with the shares (_shares)
        self.alone = False  # searching a batched step's NaN alone (replay_plan: meet() first)
        self.alone_step = -1  # ... of this step
        self._met: tuple[int, bool] | None = None  # (step, whether every rank met a NaN there)
        self.shards = False  # FSDP2/TP: this rank's values are shards (set with the shares)
        global _MERGERS
        _MERGERS += 1
        self.serial = _MERGERS  # the same on every rank: each creates its watches' mergers alike
        self.together = True  # every rank waited for the last merge landed (see _land)
        self.late = False  # the last merge landed was this rank's from an earlier flush
        self.origin_due = False  # this rank gathers its stashed NaN origin at its next flush
        self._local_w: dict[tuple[int, str], float] = {}
        self._global_w: dict[tuple[int, str], float] = {}
        self._share: dict[str, float] = {}
        self._params: dict[str, Tensor] = {}
        self._grad_share: dict[str, tuple[float, float | None]] = {}  # name -> (share, partial_scale)
        self._replicas: set[str] = set()  # parameters every rank should hold identically
        self._e2: dict[tuple[int, str], float] = {}  # merged mean of a replica's squared norm
        self._share_version = -1
        self.group = _side_group(self.timeout)
        self.info: dict[str, Any] = {
            "world_size": self.world, "rank": self.rank, "backend": str(dist.get_backend()),
            "strategy": ",".join(sorted({strategy(_outer(m)) for m in recorder.models})) or "none",
            "merge": "one fused float64 all-reduce (SUM) per recorded step on a gloo group",
            "allreduce_calls": 0, "allreduce_bytes_last": 0, "allreduce_bytes_max": 0,
            "timeout_s": self.timeout.total_seconds(),
            "replica_checks": 0, "replica_tensors": 0, "replica_last_equal_step": None, "layout_checks": 0,
            "merges_landed_late": 0, "batch_steps": 1, "batches": 0,
        }
        recorder.record.run["distributed"] = self.info
        # Under tensor parallelism a layer's output units may be split over the ranks (a
        # column-parallel Linear): unit i of one rank is another unit than unit i of the
        # next, so "ever active" flags cannot be added unit by unit.
        self.units_split = "tensor_parallel" in self.info["strategy"]
        self.unit_slot = next((slot for m in recorder.models if (slot := unit_slot(_outer(m))) is not None),
                              None) if self.units_split else None

    # -- what each parameter is --------------------------------------------
    def _shares(self) -> dict[str, float]:
        """Per parameter name: :func:`square_share` (cached until the models change)."""
        rec = self.recorder
        if self._share_version != rec.version:
            self._params = {name: p for m in rec.models for name, p in m.params}
            self._share = {name: square_share(p, self.world) for name, p in self._params.items()}
            self._grad_share = {}
            self._replicas = {name for m in rec.models for name, p in m.params if replicated(p, _outer(m))}
            self.info["replica_tensors"] = len(self._replicas)
            self._share_version = rec.version
            # The same on every rank (the same models and environment): batch boundaries must match.
            self.shards = any(_replays_on_every_rank(_outer(m)) for m in rec.models)
            self.batch_k = _batch_steps() or BATCH_STEPS
            self.info["batch_steps"] = self.batch_k
            self._layouts = {}
            if self.batch_k > 1:
                self.info["merge"] = (f"one fused float64 all-reduce (SUM) on a gloo group per {self.batch_k} "
                                      "ordinary recorded steps, and per first or scheduled step")
        return self._share

    def _grad_parts(self, names: list[str]) -> tuple[list[float], list[tuple[int, float, Tensor]]]:
        """Per gradient: its :func:`square_share` from the gradient's own placements
        (a row-parallel embedding's gradient is whole on every rank while its weight is
        sharded), and the partial sums among them (:func:`partial_scale`), as (index,
        scale, the gradient): their vectors, not their norms, are summed."""
        shares: list[float] = []
        partial: list[tuple[int, float, Tensor]] = []
        for i, n in enumerate(names):
            p = self._params.get(n)
            g = p.grad if p is not None else None
            known = self._grad_share.get(n)
            if known is None and g is not None:  # placements never change: looked at once
                known = self._grad_share[n] = (square_share(g, self.world), partial_scale(g, self.world))
            if known is None:
                shares.append(self._share.get(n, 1.0 / self.world))
            elif known[1] is not None and g is not None:
                partial.append((i, known[1], g))
                shares.append(0.0)
            else:
                shares.append(known[0])
        return shares, partial

    def _input_numel(self) -> dict[str, float]:
        """Per module name: the element count of its model's last input on this rank."""
        out: dict[str, float] = {}
        for m in self.recorder.models:
            n = 1.0
            if m.last_inputs is not None:
                leaves = [t for t in tree_leaves(m.last_inputs) if isinstance(t, Tensor)]
                if leaves:
                    n = float(leaves[0].numel())
            for name in m.names.values():
                out[name] = n
        return out

    # -- the merge ---------------------------------------------------------
    def merge(self, pending: list[tuple[int, list[str], Tensor]]) -> list[tuple[int, list[str], Tensor]]:
        """Global values for ``pending`` (same items, same keys), now. Holds the step's
        one device-to-host copy and the one all-reduce. How each value merges is its
        quantity's ``merge`` (gradvitals.record.QUANTITIES)."""
        return self._land(self._launch(pending, defer=False, forced=self._check_layout_first(pending)))

    def start(self, pending: list[tuple[int, list[str], Tensor]]) -> list[tuple[int, list[str], Tensor]]:
        """:meth:`merge`, except that the all-reduce of an ordinary step is not waited
        for: its global values are [] now and come from :meth:`collect` at the next
        flush, so no rank waits here for the slowest one (on an oversubscribed host that
        wait costs more than the rest of the watch). Waited for at once: the first merge
        and scheduled steps (their layout is checked first and replica checks read
        them) and any step whose values hold a NaN/Inf on this rank (its origin is
        searched for before the weights change).

        With :attr:`batch_k` > 1 (no replay needs every rank) ordinary steps are not
        sent one by one: they are prepared (the step's one copy) and sent together every
        ``batch_k`` steps, at the next forced step, or at the end of the run
        (:meth:`close_batch`) — the same flushes on every rank. A rank that holds a
        NaN/Inf in a batched step searches its origin alone at once (its own replay, as
        it would under a merged NaN) and gathers it with the others' when the batch
        lands."""
        if self.flight is not None:
            raise RuntimeError("a merge is still in flight: collect() it first")
        forced = self._check_layout_first(pending)
        self._shares()  # decides batch_k (the models may have changed)
        layout = self._batch_layout(pending) if self.batch_k > 1 and not forced else None
        if layout is not None:
            flat = _flat(pending)  # THE host sync of the step
            if self.batch is not None and self.batch.layout is not layout:
                # Another layout (a clip call begins, a parameter group is added): the batch so
                # far is sent first; this step begins the next one.
                self.flight = self._send_batch(defer=True)
            if self.batch is None:
                self.batch = _Batch(layout, [], [])
            self.batch.steps.append(pending[0][0])
            self.batch.flats.append(flat)
            if self.flight is None and len(self.batch.steps) >= self.batch_k:
                self.flight = self._send_batch(defer=True)
            if not bool(flat.isfinite().all()):
                self._origin_alone(layout, pending[0][0], flat)
            return []
        landed: list[tuple[int, list[str], Tensor]] = []
        if self.batch is not None:  # the batch goes first, in step order (every rank is at this flush)
            landed = self._land(self._send_batch(defer=False))
        flight = self._launch(pending, defer=True, forced=forced)
        if flight.waited:
            return landed + self._land(flight)
        self.flight = flight
        return landed

    # -- batches of ordinary steps ---------------------------------------------
    def _batch_layout(self, pending: list[tuple[int, list[str], Tensor]]) -> _Layout | None:
        """How a batched step's values merge, one rule per value (cached per item keys):
        None for items no fixed rule merges (partial gradients, statistics of a
        scheduled step, several steps in one flush); then the step is sent alone."""
        key = tuple(tuple(keys) for _, keys, _ in pending)
        if key in self._layouts:
            return self._layouts[key]
        self._layouts[key] = layout = self._new_layout(pending)
        return layout

    def _new_layout(self, pending: list[tuple[int, list[str], Tensor]]) -> _Layout | None:
        if len({st for st, _, _ in pending}) != 1:
            return None
        W = float(self.world)
        keys_of = [list(keys) for _, keys, _ in pending]
        square: list[bool] = []
        scale: list[float] = []
        summed: list[int] = []
        slotted: list[int] = []
        own: list[int] = []
        watched: list[bool] = []
        glob: list[tuple[int, int]] = []
        offsets: list[int] = []
        text: list[str] = []
        last_grad = None
        rank_keys: dict[int, list[str]] = {}
        at = 0
        for j, keys in enumerate(keys_of):
            it = _item(tuple(keys))
            kind = it.kind
            if kind == "rank":
                rank_keys[j] = [f"{split_key(k)[0]}/{r}" for k in keys for r in range(self.world)]
            offsets.append(at)
            if kind == "norm":
                if it.head != "grad_norm":
                    return None
                gshare, partial = self._grad_parts(it.names)
                if partial:
                    return None
                last_grad = j
            elif kind == "global":
                if last_grad is None:
                    return None
                glob.append((j, last_grad))
            elif kind not in ("mean", "rank"):
                return None
            own += [at + i for i in it.own]
            for i, k in enumerate(keys):
                q = quantity_of(k)
                watched.append(q is not None and q.watched)
                square.append(kind == "norm")
                scale.append(gshare[i] if kind == "norm" else 1.0 / W)
                if kind in ("norm", "mean"):
                    summed.append(at + i)
                elif kind == "rank":
                    slotted.append(at + i)
            sent = len(keys) * (self.world if kind == "rank" else 0 if kind == "global" else 1)
            shown = [split_key(k)[0] for k in keys] if kind == "rank" else keys
            text.append(f"{'|'.join(shown)}:{kind}:{sent}")
            at += len(keys)
        return _Layout(keys_of, offsets, torch.tensor(square), torch.tensor(scale, dtype=torch.float64),
                       torch.tensor(summed, dtype=torch.long), torch.tensor(slotted, dtype=torch.long),
                       glob, torch.tensor(own, dtype=torch.long), watched, "\n".join(text),
                       len(summed) + self.world * len(slotted), rank_keys)

    def _send_batch(self, defer: bool, pad_to: int = 0) -> _Flight:
        """Start the one all-reduce of the batched steps (the batch is emptied):
        [signature, a flag per rank, per step its summed values then its values slotted
        per rank], zeros up to ``pad_to``."""
        batch = self.batch
        assert batch is not None
        lay, W = batch.layout, self.world
        v = torch.stack(batch.flats)  # (steps, values)
        parts = [torch.where(lay.square, v * v, v)[:, lay.summed] * lay.scale[lay.summed]]
        if lay.slotted.numel():
            slots = torch.zeros(v.shape[0], lay.slotted.numel(), W, dtype=torch.float64)
            slots[:, :, self.rank] = v[:, lay.slotted]
            parts.append(slots.reshape(v.shape[0], -1))
        body = torch.cat(parts, 1).reshape(-1)
        signature = float(zlib.crc32(f"{lay.text}\nbatch:{len(batch.steps)}".encode()))
        bad_here = bool(lay.own.numel()) and not bool(v[:, lay.own].isfinite().all())
        buf = torch.cat([torch.tensor([signature], dtype=torch.float64), torch.zeros(W, dtype=torch.float64), body])
        if pad_to > buf.numel():
            buf = torch.cat([buf, torch.zeros(pad_to - buf.numel(), dtype=torch.float64)])
        buf[1 + self.rank] = (1.0 if bad_here else 0.0) + (0.0 if defer else 2.0)
        work = self._allreduce(buf, wait=not defer)
        self.batch = None  # sent: its values come with the flight
        self.info["batches"] += 1
        return _Flight([], [], [], [], buf, signature, [], not defer, work, batch)

    def _land_batch(self, flight: _Flight) -> list[tuple[int, list[str], Tensor]]:
        batch = flight.batch
        lay, W, k = batch.layout, self.world, len(batch.steps)
        n_sum = lay.summed.numel()
        body = flight.buf[1 + W:1 + W + k * lay.step_numel].view(k, lay.step_numel)
        g = torch.zeros(k, lay.square.numel(), dtype=torch.float64)
        g[:, lay.summed] = body[:, :n_sum]
        g = torch.where(lay.square, g.sqrt(), g)
        for j, i in lay.glob:  # a global norm: recomputed from its step's merged gradient norms
            o, n = lay.offsets[i], len(lay.keys[i])
            g[:, lay.offsets[j]] = g[:, o:o + n].square().sum(1).sqrt()
        g = g.float()
        slots = body[:, n_sum:].float()
        out: list[tuple[int, list[str], Tensor]] = []
        rank_keys = lay.rank_keys
        for row, step in enumerate(batch.steps):
            at = 0
            for j, keys in enumerate(lay.keys):
                if j in rank_keys:
                    n = len(keys) * W
                    out.append((step, rank_keys[j], slots[row, at:at + n]))
                    at += n
                else:
                    o = lay.offsets[j]
                    out.append((step, keys, g[row, o:o + len(keys)]))
        return out

    def close_batch(self, patience_s: float) -> list[tuple[int, list[str], Tensor]]:
        """At the end of the run: send the steps still batched (every rank ends its run
        here with the same batch) and land them, waiting at most ``patience_s``. Padded
        to a full batch's size: a rank still training would otherwise abort in gloo on
        buffers of different sizes; the signature tells the contents apart. If they do
        not come (a rank is gone), this rank's own values are kept for those steps and
        ``run.distributed.unmerged_steps`` says which (none of shards: :meth:`_own`)."""
        if self.batch is None or self.flight is not None:
            return []
        batch = self.batch
        self.flight = self._send_batch(defer=True, pad_to=1 + self.world + self.batch_k * batch.layout.step_numel)
        landed = self.collect(patience_s)
        return landed if landed else self._own(batch)

    def own_batch(self) -> list[tuple[int, list[str], Tensor]]:
        """The batched steps' values as this rank measured them, the batch emptied
        (their merge did not come, or failed): better than no values for those steps."""
        batch, self.batch = self.batch, None
        return self._own(batch) if batch is not None else []

    def _own(self, batch: _Batch) -> list[tuple[int, list[str], Tensor]]:
        """:func:`_own_values`, but none of shards (FSDP2/TP: a shard's norm is not the
        layer's): those steps are dropped, ``merge_dropped_step`` says the last."""
        if not self.shards:
            return _own_values(batch, self.info)
        if batch.steps:
            self.info["merge_dropped_step"] = max(batch.steps)
        return []

    def meet(self) -> bool:
        """Whether every rank met a NaN/Inf in its own values of the batched step this
        rank is searching (:meth:`_origin_alone`): each says so in the store and waits at
        most :data:`REPLAY_MEET_S` for the others (asked once per step: a run with several
        models asks per model)."""
        step = self.alone_step
        if self._met is None or self._met[0] != step:
            self._met = (step, _meet(self.serial, step, self.world, REPLAY_MEET_S))
        return self._met[1]

    def _origin_alone(self, lay: _Layout, step: int, flat: Tensor) -> None:
        """This rank's values of a batched step hold a NaN/Inf: if any is a watched
        quantity's, its origin, searched for now by this rank alone (before the weights
        change), is gathered with every rank's when the batch lands
        (OriginLocator.seen_alone)."""
        keys = [k for ks in lay.keys for k in ks]
        nonfinite = [(step, k, x) for k, x, w in zip(keys, flat.tolist(), lay.watched)
                     if w and not math.isfinite(x)]
        origin = getattr(self.recorder, "origin", None)
        if nonfinite and origin is not None:
            self.late = False  # this rank's own step: a replay on this rank alone is valid
            self.alone = True  # ... and one that needs every rank only if every rank met it (meet)
            self.alone_step = step
            try:
                origin.seen_alone(nonfinite)
            finally:
                self.alone = False

    def collect(self, patience_s: float | None = None) -> list[tuple[int, list[str], Tensor]]:
        """The global values of the merge :meth:`start` left in flight ([] when none).
        ``patience_s``: wait at most this long (an exit path: a rank that is gone
        must not hold the report); the values are dropped if they have not come."""
        flight, self.flight = self.flight, None
        if flight is None:
            return []
        if patience_s is not None:
            end = time.monotonic() + min(patience_s, self.timeout.total_seconds())
            while not flight.work.is_completed():
                if time.monotonic() > end:
                    self.info["merge_dropped_step"] = max(s for s, _, _ in flight.pending)
                    return []
                time.sleep(0.001)
        return self._land(flight)

    def _launch(self, pending: list[tuple[int, list[str], Tensor]], defer: bool, forced: bool) -> _Flight:
        """Start the merge of one flush's items (``forced``: _check_layout_first's answer)."""
        items = [_item(tuple(keys)) for _, keys, _ in pending]
        plans = [(it.kind, it.parts) for it in items]
        masks: dict[str, Tensor] = {}  # layer -> its "ever active" mask
        for _, parts in plans:
            for part, name in parts:
                if part == "mask" and name not in masks and (mask := self.recorder.ever_active(name)) is not None:
                    masks[name] = mask
        shares = self._shares()
        grad_parts: dict[int, tuple[list[float], list[tuple[int, float, Tensor]]]] = {}
        for j, it in enumerate(items):
            if it.kind == "norm" and it.head == "grad_norm":
                grad_parts[j] = self._grad_parts(it.names)
        partials = [g for _, part in grad_parts.values() for _, _, g in part]
        fetched = _fetch([t for _, _, t in pending] + list(masks.values()) + partials)  # THE host sync
        values = fetched[:len(pending)]
        masks = dict(zip(masks, fetched[len(pending):len(pending) + len(masks)]))
        vectors = iter(fetched[len(pending) + len(masks):])
        numel = None
        W = float(self.world)
        sends: list[Tensor] = []
        extras: list[Any] = []
        layout: list[str] = []
        replicas = self._replicas
        rep_at: list[tuple[int, str]] = []  # (step, parameter) of each replica's weight norm
        rep_v: list[float] = []
        bad_here = False
        for j, ((step, keys, _), v, it) in enumerate(zip(pending, values, items)):
            kind, parts, names, own = it.kind, it.parts, it.names, it.own
            if own:
                bad_here = bad_here or not bool(torch.isfinite(v[own]).all())
            extra: Any = None
            if kind == "norm":
                if j in grad_parts:
                    gshare, partial = grad_parts[j]
                    share = torch.tensor(gshare, dtype=torch.float64)
                else:
                    share, partial = torch.tensor([shares.get(n, 1.0 / W) for n in names], dtype=torch.float64), []
                send = v * v * share
                if partial:
                    # A partial sum's local values, whole: its norm is that of their sum
                    # over ranks. Rescaled to the norm measured (a clip between measuring
                    # and this merge scaled every rank's part alike).
                    vecs = []
                    for i, _, _ in partial:
                        vec = next(vectors)
                        now = float(vec.norm())
                        vecs.append(vec * (float(v[i]) / now) if now > 0 else vec)
                    send = torch.cat([send, *vecs])
                    extra = [(i, scale, vec.numel()) for (i, scale, _), vec in zip(partial, vecs)]
                if it.head == "weight_norm":  # the update ratios' denominators
                    for n, x in zip(names, v.tolist()):
                        self._local_w[(step, n)] = x
                        if n in replicas:
                            rep_at.append((step, n))
                            rep_v.append(x)
            elif kind == "global":
                send = v[:0]
            elif kind == "ratio":
                shard, local_w, share = [], [], []
                for n in names:
                    lw = self._local_w.pop((step, n), None)
                    share.append(shares.get(n, 1.0 / W))
                    shard.append(share[-1] * W > 1 and lw is not None)
                    local_w.append(max(lw if lw is not None else 1.0, _W_FLOOR))
                sh = torch.tensor(shard, dtype=torch.bool)
                d = v * torch.tensor(local_w, dtype=torch.float64)
                send = torch.where(sh, d * d * torch.tensor(share, dtype=torch.float64), v / W)
                extra = (sh, [(step, n) for n in names])
            elif kind == "rank":  # every rank's own value, in its slot: O(world) values
                send = torch.zeros(self.world * len(keys), dtype=torch.float64)
                send[self.rank::self.world] = v
                keys = [split_key(k)[0] for k in keys]  # the layout names the quantity, not the rank
            elif kind == "act":
                if numel is None:
                    numel = self._input_numel()
                send, extra = _act_sends(v, parts, numel, masks, W, self.units_split, self.unit_slot)
            elif kind == "max":
                send, extra = _max_sends(v, [part == "max" for part, _ in parts], self.rank, self.world)
            else:  # loss, lr, clip values and anything a newer probe adds: the mean
                send = v / W
            sends.append(send)
            extras.append(extra)
            layout.append(f"{'|'.join(keys)}:{kind}:{send.numel()}")
        tail = _replica_sends(rep_v, self.rank, self.world)
        layout.append(f"replicas:{len(rep_v)}")
        signature = float(zlib.crc32("\n".join(layout).encode()))
        # Per rank one flag: bit 0, a NaN/Inf in a value of its own batch (names the
        # rank); bit 1, it waited for this all-reduce at once (see start()).
        buf = torch.cat([torch.tensor([signature], dtype=torch.float64),
                         torch.zeros(self.world, dtype=torch.float64), *sends, tail])
        waited = not defer or forced or not bool(torch.isfinite(buf).all())
        buf[1 + self.rank] = (1.0 if bad_here else 0.0) + (2.0 if waited else 0.0)
        if forced:
            head = torch.tensor([signature, float(buf.numel())], dtype=torch.float64)
            self._allreduce(head, body=False)
            if head.tolist() != [signature * W, buf.numel() * W]:
                raise _LayoutMismatch(
                    "ranks record different values (different modules per rank, e.g. pipeline stages, "
                    "or a module that ran on some ranks only): each rank records its own from here")
        work = None if waited else self._allreduce(buf, wait=False)
        if waited:
            self._allreduce(buf)
        return _Flight(pending, plans, sends, extras, buf, signature, rep_at, waited, work)

    def _land_flags(self, flight: _Flight) -> None:
        """Check a landed merge's signature; read which ranks saw a NaN/Inf of their own
        and which waited for it at once."""
        buf = flight.buf
        if buf[0].item() != flight.signature * float(self.world):
            raise _LayoutMismatch("ranks recorded different values at this step "
                                  "(different models, schedules or unused parameters per rank)")
        flags = [int(f) for f in buf[1:1 + self.world].tolist()]
        self.bad_ranks = [r for r, f in enumerate(flags) if f & 1]
        # A NaN-origin replay that needs every rank (FSDP, tensor parallel) runs only
        # when every rank waited for this merge: those that did not are a step further.
        self.together = all(f & 2 for f in flags)
        self.late = not flight.waited
        if self.late:
            self.info["merges_landed_late"] += 1

    def _land(self, flight: _Flight) -> list[tuple[int, list[str], Tensor]]:
        """The global values of a launched merge (waits for its all-reduce if it was not)."""
        if flight.work is not None:
            flight.work.wait(timeout=self.timeout)  # raises after the time-out: a rank is gone or stuck
        self._land_flags(flight)
        if flight.batch is not None:
            return self._land_batch(flight)
        buf = flight.buf
        pending, plans, sends, extras, rep_at = flight.items, flight.plans, flight.sends, flight.extras, flight.rep_at
        replicas = self._replicas
        out: list[tuple[int, list[str], Tensor]] = []
        i = 1 + self.world
        last_grad: Tensor | None = None
        for (step, keys, _), send, (kind, _), extra in zip(pending, sends, plans, extras):
            s = buf[i:i + send.numel()]
            i += send.numel()
            if kind == "norm":
                g = s[:len(keys)].sqrt()
                at = len(keys)
                for idx, scale, n in extra or ():
                    g[idx] = s[at:at + n].norm() * scale
                    at += n
                if split_key(keys[0])[0] == "weight_norm":
                    for k, x, e2 in zip(keys, g.tolist(), s.tolist()):
                        n = split_key(k)[1] or k
                        self._global_w[(step, n)] = x
                        if n in replicas:
                            self._e2[(step, n)] = e2
                else:
                    last_grad = g
            elif kind == "global":
                g = (last_grad.square().sum().sqrt().reshape(1) if last_grad is not None
                     else torch.full((1,), math.nan, dtype=torch.float64))
            elif kind == "ratio":
                sh, where = extra
                gw = torch.tensor([max(self._global_w.pop(w, 1.0), _W_FLOOR) for w in where],
                                  dtype=torch.float64)
                g = torch.where(sh, s.sqrt() / gw, s)
            elif kind == "rank":
                keys = [f"{split_key(k)[0]}/{r}" for k in keys for r in range(self.world)]
                g = s
            elif kind == "act":
                g = _act_values(s, extra)
            elif kind == "max":
                g = _max_values(s, extra, self.world)
            else:
                g = s
            if g.numel() != len(keys):  # a value shifted would misname every later one
                raise _LayoutMismatch(f"{len(keys)} keys but {g.numel()} merged values for {keys[0]}")
            out.append((step, keys, g.float()))
        if rep_at:
            out += self._replica_items(rep_at, buf[i:])
        self._prune()
        return out

    def _replica_items(self, at: list[tuple[int, str]], tail: Tensor) -> list[tuple[int, list[str], Tensor]]:
        """Items for the replicas that differ across ranks at this flush: their relative
        spread (``replica_spread/<param>``) and which ranks hold other values than the
        most ranks do (``replica_rank_off/<rank>``); none when every replica agrees."""
        self.info["replica_checks"] += 1
        means = tail[:len(at)].tolist()
        digests = tail[len(at):].tolist()
        spread: dict[int, list[tuple[str, float]]] = {}
        for (step, n), m in zip(at, means):
            e2 = self._e2.pop((step, n), m * m)
            sd = math.sqrt(max(e2 - m * m, 0.0))
            rel = sd / abs(m) if m != 0 else (math.inf if sd > 0 else 0.0)
            if rel > REPLICA_SPREAD_FLOOR:
                spread.setdefault(step, []).append((n, rel))
        if not spread:
            self.info["replica_last_equal_step"] = at[-1][0]
            return []
        # Ranks whose digest differs from the one most ranks share (every rank on a tie).
        counts: dict[float, int] = {}
        for d in digests:
            counts[d] = counts.get(d, 0) + 1
        top = max(counts.values())
        common = [d for d, c in counts.items() if c == top]
        off = [0.0 if len(common) == 1 and d == common[0] else 1.0 for d in digests]
        out = []
        for step, items in spread.items():
            out.append((step, [f"replica_spread/{n}" for n, _ in items],
                        torch.tensor([r for _, r in items], dtype=torch.float32)))
            out.append((step, [f"replica_rank_off/{r}" for r in range(self.world)],
                        torch.tensor(off, dtype=torch.float32)))
        return out

    def _check_layout_first(self, pending: list[tuple[int, list[str], Tensor]]) -> bool:
        """Whether this flush all-reduces [layout signature, size] before its values.

        gloo aborts the process (not an exception) when ranks all-reduce buffers of
        different sizes, so a layout that may differ across ranks is compared first, in a
        buffer of fixed size: at the first merge (pipeline stages, different models per
        rank) and at scheduled steps (activation statistics of a module that ran on some
        ranks only, e.g. an expert no token of a rank's batch was routed to). Every rank
        decides alike: the first merge and the schedule are the same on every rank."""
        if self.calls == 0:
            return True
        options = getattr(self.recorder, "options", None)
        if options is None:
            return True
        return any(scheduled(options, step) for step in {s for s, _, _ in pending})

    def _allreduce(self, buf: Tensor, body: bool = True, wait: bool = True) -> Any:
        """All-reduce ``buf`` in place (``body``: a merge's values, else the layout
        check). ``wait=False``: only start it and return its Work (None once waited for)."""
        dist = _dist()
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        if not wait:
            self._count(buf)
            return work
        work.wait(timeout=self.timeout)  # raises after the time-out: a rank is gone or stuck
        if body:
            self._count(buf)
        else:
            self.info["layout_checks"] += 1
        return None

    def _count(self, buf: Tensor) -> None:
        nbytes = buf.numel() * buf.element_size()
        self.calls += 1
        self.info["allreduce_calls"] = self.calls
        self.info["allreduce_bytes_last"] = nbytes
        self.info["allreduce_bytes_max"] = max(self.info["allreduce_bytes_max"], nbytes)

    def _prune(self) -> None:
        step = self.recorder.step
        for d in (self._local_w, self._global_w, self._e2):
            for key in [k for k in d if k[0] < step - 1]:
                del d[key]

    # -- the first NaN, per rank -------------------------------------------
    def merge_origin(self, event: dict[str, Any]) -> dict[str, Any]:
        """Every rank's local origin, gathered; the report keeps the bad rank's whose
        replay reproduced it (over one read off its values), then whose origin comes first
        in the forward (the first bad rank's on a tie), with the bad
        ranks whose origin is that same module. Under tensor parallelism a NaN one rank
        makes reaches every rank at the next collective: every rank is bad, and the
        others' replays meet it only after that collective. Runs on every rank at the
        same flush (the merged values are identical)."""
        event = dict(event)
        # Seen in this rank's own values at its step: searched alone in a batch, or this
        # rank waited for the merge that brought it.
        saw = bool(event.pop("_alone", False)) or not self.late
        if str(event.get("replay", "")).startswith("skipped") and self.rank in self.bad_ranks:
            event = {**event, **self._input_origin()}
        gathered: list[Any] = [None] * self.world
        _dist().all_gather_object(gathered, (event, not saw), group=self.group)
        late = [bool(g[1]) if g else True for g in gathered]
        gathered = [g[0] if g else None for g in gathered]
        bad = self.bad_ranks
        if not bad and any(late) and not all(late):
            # No rank's own batch holds it (a gradient, not a loss), yet some ranks saw it in
            # their own values at its step (the ones that waited: e.g. the one FSDP shard of a
            # gradient that holds the NaN) and the others learned of it later: those ranks.
            bad = [r for r, x in enumerate(late) if not x]
        # A rank whose replay reproduced the NaN from its own inputs made it; a rank that only
        # read it off its values (gradients DDP all-reduced, a collective's output) received it.
        pick = min(bad, key=lambda r: ((gathered[r] or {}).get("source") != "replay",
                                       self._forward_order(gathered[r]), r)) if bad else None
        chosen = dict(gathered[pick if pick is not None else 0] or event)
        chosen["rank"] = pick
        chosen["ranks"] = [r for r in bad if (gathered[r] or {}).get("module") == chosen.get("module")]
        chosen["world_size"] = self.world
        return chosen

    def _forward_order(self, event: dict[str, Any] | None) -> float:
        """Where a rank's origin lies in the forward: its layer's depth; the input
        first, no module (the loss) or an unknown one last."""
        if not event or event.get("module") is None:
            return math.inf
        if event.get("kind") == "input":
            return -1.0
        rec = self.recorder.record
        layer = rec.layers.get(rec.layer_of(event["module"]))
        return float(layer.depth) if layer is not None and layer.depth is not None else math.inf


    def _input_origin(self) -> dict[str, Any]:
        """Without a replay (FSDP2), what this rank can still tell alone: whether the
        batch it was fed already held NaN/Inf."""
        for m in self.recorder.models:
            if m.last_inputs is None:
                continue
            leaves = [t for t in tree_leaves(m.last_inputs) if isinstance(t, Tensor) and t.is_floating_point()]
            if any(not bool(torch.isfinite(t).all()) for t in leaves):  # syncs: the NaN step only
                return {"kind": "input", "module": m.names.get(id(m.module)), "op": None}
        return {}


_GROUP: tuple[Any, Any] | None = None  # (the default group it belongs to, gradvitals' gloo group)


def _side_group(timeout: datetime.timedelta) -> Any:
    """gradvitals' private gloo group over every rank, made once per process group.

    Private: our CPU buffer never interleaves with the user's collectives (NCCL or
    gloo) and its time-out is ours. Made with ``use_local_synchronization`` so its
    name is a hash of the ranks, not the next number of torch's group counter: a
    rank that watches while another does not leaves the numbering of the user's
    later ``new_group`` calls the same on every rank. Creating it is a rendezvous:
    every watching rank gets here at its first recorded step.
    """
    global _GROUP
    dist = _dist()
    world = dist.group.WORLD
    if _GROUP is not None and _GROUP[0] is world:
        return _GROUP[1]
    group = dist.new_group(ranks=list(range(dist.get_world_size())), backend="gloo", timeout=timeout,
                           use_local_synchronization=True)
    _GROUP = (world, group)
    return group


class _LayoutMismatch(RuntimeError):
    pass


class _Flight(NamedTuple):
    """A merge launched: what :meth:`Merger._land` needs to read its values back."""
    items: list[tuple[int, list[str], Tensor]]  # the flush's pending items (none for a batch)
    plans: list[tuple[str, list[tuple[str, str]]]]
    sends: list[Tensor]
    extras: list[Any]
    buf: Tensor
    signature: float
    rep_at: list[tuple[int, str]]
    waited: bool  # this rank waited for the all-reduce when it launched it
    work: Any  # its Work while not waited for, else None
    batch: _Batch | None = None  # a batch of ordinary steps (then no items)

    @property
    def pending(self) -> list[tuple[int, list[str], Tensor]]:
        """This rank's own values of what it sends."""
        return _own_values(self.batch, None) if self.batch is not None else self.items


class _Layout(NamedTuple):
    """How the values of a batched step merge (Merger._new_layout): the items' keys, where
    each item's values start in the step's flat values, and per value one rule."""
    keys: list[list[str]]
    offsets: list[int]
    square: Tensor  # bool per value: a norm (its square x share is summed; the root taken)
    scale: Tensor  # float64 per value: the norm's share, else 1 / world (the mean)
    summed: Tensor  # indices of the values sent once (norms and means)
    slotted: Tensor  # indices of the values sent in one slot per rank (clip_rank_norm)
    glob: list[tuple[int, int]]  # (a global-norm item, the gradient-norm item it is the norm of)
    own: Tensor  # indices of the values whose NaN/Inf names this rank
    watched: list[bool]  # per value: a NaN/Inf there starts an origin search
    text: str  # for the signature
    step_numel: int  # values one step sends
    rank_keys: dict[int, list[str]]  # per item sent in slots: its merged keys, one per rank


class _Batch(NamedTuple):
    layout: _Layout
    steps: list[int]
    flats: list[Tensor]  # per step, this rank's values (float64, CPU), items in order


def _flat(pending: list[tuple[int, list[str], Tensor]]) -> Tensor:
    """A step's values, items in order, as one float64 CPU tensor (one copy per device)."""
    return _host_flat([t for _, _, t in pending])[0]


def _own_values(batch: _Batch, info: dict[str, Any] | None) -> list[tuple[int, list[str], Tensor]]:
    """A batch's values as this rank measured them (``info``: say which steps are so)."""
    lay = batch.layout
    if info is not None and batch.steps:
        info["unmerged_steps"] = [min(batch.steps), max(batch.steps)]
    out = []
    for step, flat in zip(batch.steps, batch.flats):
        for keys, o in zip(lay.keys, lay.offsets):
            out.append((step, keys, flat[o:o + len(keys)].float()))
    return out


class _Item(NamedTuple):
    """What a pending item's keys say about its merge (:func:`_item`)."""
    kind: str
    parts: list[tuple[str, str]]
    names: list[str]  # per key: the parameter or layer it is of (the key itself when none)
    own: list[int]  # indices of the values whose NaN/Inf names this rank
    head: str  # the first key's quantity


@functools.lru_cache(maxsize=4096)
def _item(keys: tuple[str, ...]) -> _Item:
    """:func:`_plan` and the rest the merge reads off an item's keys, worked out once per
    set of keys: a run stages the same keys step after step."""
    kind, parts = _plan(list(keys))
    own = [i for i, k in enumerate(keys) if (q := quantity_of(k)) is not None and q.names_bad_rank]
    return _Item(kind, parts, [split_key(k)[1] or k for k in keys], own, split_key(keys[0])[0] if keys else "")


def _plan(keys: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """How one pending item merges, from its keys' quantities (the table's ``merge``):
    "norm", "global", "ratio" or "mean" when its keys all merge alike; "act" for a
    module's statistics, as parts: ("moment", layer) for a block of
    :data:`_MOMENT_BLOCK` keys, ("mask", layer) for the dead fraction measured with
    that block, ("mean", layer) for any other value."""
    merges = [q.merge if (q := quantity_of(k)) is not None else "mean" for k in keys]
    if not merges:  # an item of no values (an optimizer holding no parameter on this rank)
        return "mean", []
    if "max" in merges and not any(m in ("moment", "dead") for m in merges):
        # e.g. an attention module's max logit beside its mean entropies
        return "max", [("max" if m == "max" else "mean", split_key(k)[1] or "") for m, k in zip(merges, keys)]
    if not any(m in ("moment", "dead") for m in merges):
        return ("mean" if merges[0] == "local" else merges[0]), []
    parts: list[tuple[str, str]] = []
    i = 0
    while i < len(keys):
        block = [split_key(k) for k in keys[i:i + len(_MOMENT_BLOCK)]]
        if (len(block) == len(_MOMENT_BLOCK) and tuple(q for q, _ in block) == _MOMENT_BLOCK
                and len({n for _, n in block}) == 1):
            parts.append(("moment", block[0][1] or ""))
            i += len(_MOMENT_BLOCK)
            continue
        # A dead fraction is its layer's window (Recorder.ever_active), however it was measured.
        parts.append(("mask" if merges[i] == "dead" else "mean", split_key(keys[i])[1] or ""))
        i += 1
    return "act", parts


def _replica_sends(values: list[float], rank: int, world: int) -> Tensor:
    """What the replicas' check adds to the SUM: each replica's norm / world (the mean
    over ranks; the norm item already sums its square / world), then one slot per rank
    holding this rank's digest of its replicas' norms (a weighted sum: identical
    replicas give the identical float64 value). 8 x (#replicated tensors + world) bytes
    on a scheduled step, nothing on the others."""
    if not values:
        return torch.zeros(0, dtype=torch.float64)
    v = torch.tensor(values, dtype=torch.float64)
    digest = torch.zeros(world, dtype=torch.float64)
    digest[rank] = float((v * torch.arange(1, len(values) + 1, dtype=torch.float64)).sum())
    return torch.cat([v / world, digest])


def _max_sends(v: Tensor, is_max: list[bool], rank: int, world: int) -> tuple[Tensor, list[bool]]:
    """What a "max" item sends into the SUM: a value merged as the max takes one slot per
    rank (this rank's value in its own slot, zeros in the others', so a NaN on one rank
    stays in its slot), any other value its mean's share (value / world)."""
    chunks = []
    for x, m in zip(v.reshape(-1, 1), is_max):
        if m:
            slots = torch.zeros(world, dtype=torch.float64)
            slots[rank] = x
            chunks.append(slots)
        else:
            chunks.append(x / world)
    return torch.cat(chunks), is_max


def _max_values(s: Tensor, is_max: list[bool], world: int) -> Tensor:
    """The merged values from the summed :func:`_max_sends`: the largest finite-or-inf
    value over ranks (NaN = "none here" on a rank, e.g. no attention in its batch;
    NaN only when every rank has none), the means as they are."""
    out = []
    at = 0
    for m in is_max:
        if m:
            slots = s[at:at + world]
            seen = slots[~slots.isnan()]
            out.append(seen.max().reshape(1) if seen.numel() else slots[:1])
            at += world
        else:
            out.append(s[at:at + 1])
            at += 1
    return torch.cat(out)


def _act_sends(v: Tensor, parts: list[tuple[str, str]], numel: dict[str, float], masks: dict[str, Tensor],
               world: float, units_split: bool = False,
               slot: tuple[int, int] | None = None) -> tuple[Tensor, list[tuple[str, int]]]:
    """What an "act" item sends into the SUM, and per part how many values: a moment
    block [n, n*mean, n*E[x^2], n*fractions...] for n = its input's elements on this
    rank, the "ever active" flags of a layer's mask (``masks``, by layer), or the value
    / world (the mean).

    ``units_split`` (tensor parallelism): ranks hold different units of a layer, so
    flags cannot be added unit by unit. Under TP alone a mask is sent as [units never
    active here, units here]: dead = the never-active units of all ranks over all their
    units, exact since every rank sees the same batch (TP's contract). With data
    parallelism on another mesh dimension (FSDP2 x TP, ``slot``: this rank's place
    among the tensor-parallel ranks, their number) the flags go in this rank's slot of
    a buffer of one slot per place: the ranks that hold the same units add theirs, and
    a unit is dead when no data-parallel rank's rows made it fire. (Ranks whose slots
    differ in size would merge buffers of different sizes: the layout check before a
    scheduled step's merge stops the merge instead.)"""
    chunks: list[Tensor] = []
    sizes: list[tuple[str, int]] = []
    at = 0
    for part, name in parts:
        if part == "moment":
            w = numel.get(name, 1.0)
            chunks += [moment_terms(w, v[at], v[at + 1]), w * v[at + 2:at + len(_MOMENT_BLOCK)]]
            sizes.append(("moment", len(_MOMENT_BLOCK) + 1))
            at += len(_MOMENT_BLOCK)
            continue
        mask = masks.get(name) if part == "mask" else None
        if mask is not None and mask.numel() and units_split and slot is not None:
            slots = torch.zeros(slot[1], mask.numel(), dtype=torch.float64)
            slots[slot[0]] = mask
            chunks.append(slots.reshape(-1))
            sizes.append(("mask", slots.numel()))
        elif mask is not None and mask.numel() and units_split:
            chunks.append(torch.tensor([float((mask == 0).sum()), float(mask.numel())], dtype=torch.float64))
            sizes.append(("count", 2))
        elif mask is not None and mask.numel():
            chunks.append(mask)
            sizes.append(("mask", mask.numel()))
        else:
            chunks.append(v[at:at + 1] / world)
            sizes.append(("mean", 1))
        at += 1
    return torch.cat(chunks), sizes


def _act_values(s: Tensor, sizes: list[tuple[str, int]]) -> Tensor:
    """The merged statistics from the summed :func:`_act_sends`."""
    stats: list[Tensor] = []
    at = 0
    for part, n in sizes:
        if part == "moment":
            mean, std = moments_from_sums(s[at:at + 3])
            stats += [mean.reshape(1), std.reshape(1), s[at + 3:at + n] / s[at]]
        elif part == "mask":  # summed "ever active" flags: dead = never active on any rank
            stats.append((s[at:at + n] == 0).double().mean().reshape(1))
        elif part == "count":  # summed [never-active units, units]
            stats.append((s[at] / s[at + 1]).reshape(1))
        else:
            stats.append(s[at:at + 1])
        at += n
    return torch.cat(stats)


def _host_flat(tensors: list[Tensor]) -> tuple[Tensor, list[int]]:
    """The tensors' values (a DTensor's local part), in order, as one flat float64 CPU
    tensor, with one copy per device; and each tensor's number of values in it."""
    ts = [t.reshape(-1) for t in local_tensors([t.detach() for t in tensors])]
    sizes = [t.numel() for t in ts]
    devices = {t.device for t in ts}
    if len(devices) == 1:
        return torch.cat(ts).double().cpu(), sizes
    parts = {d: iter(torch.cat([t.double() for t in ts if t.device == d]).cpu().split(
        [t.numel() for t in ts if t.device == d])) for d in devices}
    return torch.cat([next(parts[t.device]) for t in ts]), sizes


def _fetch(tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor as a flat float64 CPU tensor: views of one copy per device (_host_flat)."""
    flat, sizes = _host_flat(tensors)
    return list(flat.split(sizes))


# ------------------------------------------------ hooks the recorder calls
def merge_pending(recorder: Any, pending: list[tuple[int, list[str], Tensor]]) -> list[tuple[int, list[str], Tensor]]:
    """Called by ``Staging.flush``: the global values when this is a multi-rank run
    (else ``pending`` unchanged); [] while they are in flight (:func:`collect_merged`
    gives them at the next flush). Never raises; a failure turns merging off."""
    merger = getattr(recorder, "merger", None)
    if merger is False:
        return _local_items(pending)
    try:
        if merger is None:
            if not initialized() or _dist().get_world_size() < 2:
                return _local_items(pending)  # e.g. FSDP2 on one rank: clip_grad_norm_'s DTensor
            if os.environ.get(MERGE_ENV, "1").strip() == "0":
                recorder.merger = False
                rank, world = rank_and_world()
                recorder.record.run["distributed"] = {"world_size": world, "rank": rank, "merged": False,
                                                      "merge_stopped": f"{MERGE_ENV}=0: this rank's own values"}
                return _local_items(pending)
            if _not_watching_elsewhere(recorder):
                return _local_items(pending)
            merger = recorder.merger = Merger(recorder)
        if not merger.active or not initialized():
            return _unmerged(merger, pending)
        return merger.start(pending)
    except Exception as exc:
        _switch_off(recorder, exc)
        return _unmerged(merger, pending)


def _not_watching_elsewhere(recorder: Any) -> bool:
    """Before the first merge: True, with merging off and the reason in
    ``run.distributed``, when some rank does not watch (``gv.watch`` on rank 0 only, as
    ``wandb.watch`` is often called): the merge's first collective would wait for it
    until the time-out. Without a grace period when the models' own collectives have
    already tied the ranks together (see :data:`WATCHING_GRACE_S`)."""
    announce()  # (a watch no forward of has run yet says it now)
    tied = all(strategy(_outer(m)) not in ("replicated", "none") for m in recorder.models)
    missing = ranks_not_watching(0.0 if tied and recorder.models else WATCHING_GRACE_S)
    if not missing:
        return False
    recorder.merger = False
    rank, world = rank_and_world()
    who = f"rank {missing[0]} does not" if len(missing) == 1 else \
        f"ranks {', '.join(map(str, missing[:8]))}{', ...' if len(missing) > 8 else ''} do not"
    recorder.record.run["distributed"] = {
        "world_size": world, "rank": rank, "merged": False,
        "merge_stopped": (f"{who} watch: this rank records its own values (gv.watch on every rank "
                          f"merges them; {MERGE_ENV}=0 records each rank alone)")}
    return True


def _unmerged(merger: Any, pending: list[tuple[int, list[str], Tensor]]) -> list[tuple[int, list[str], Tensor]]:
    """This rank's own values: the steps a merge stopped in a batch, then ``pending``
    (unless it is among them)."""
    own = merger.own_batch() if isinstance(merger, Merger) and merger.batch is not None else []
    steps = {st for st, _, _ in own}
    return own + [item for item in _local_items(pending) if item[0] not in steps]


def collect_merged(recorder: Any, patience_s: float | None = None) -> list[tuple[int, list[str], Tensor]]:
    """The global values of an earlier flush's merge still in flight ([] when none);
    the flush that launched it returned none (:meth:`Merger.start`). First, an origin
    this rank holds for this flush's gather (:func:`merge_origin`). Never raises."""
    merger = getattr(recorder, "merger", None)
    if isinstance(merger, Merger) and merger.origin_due:
        merger.origin_due = False
        origin = getattr(recorder, "origin", None)
        if origin is not None:
            origin.gather_stashed(due=True)
    if not isinstance(merger, Merger) or merger.flight is None:
        return []
    pending = merger.flight.pending
    try:
        return merger.collect(patience_s)
    except Exception as exc:
        _switch_off(recorder, exc)
        return _local_items(pending)


def close_batch(recorder: Any, patience_s: float) -> list[tuple[int, list[str], Tensor]]:
    """At the end of the run: the global values of the steps still batched
    (:meth:`Merger.close_batch`), or this rank's own if their merge fails. Never raises."""
    merger = getattr(recorder, "merger", None)
    if not isinstance(merger, Merger) or merger.batch is None:
        return []
    if not merger.active or not initialized():
        return merger.own_batch()
    batch = merger.batch
    try:
        return merger.close_batch(patience_s)
    except Exception as exc:
        merger.flight = None
        merger.batch = None
        _switch_off(recorder, exc)
        return merger._own(batch)


def unsent_values(recorder: Any) -> list[tuple[int, list[str], Tensor]]:
    """This rank's own values of the batched steps not merged yet (a batch in flight, then
    the one still filling), for a mid-run report; [] when none. No communication. (A
    step in flight under FSDP/TP is left out: its local values are shards.)"""
    merger = getattr(recorder, "merger", None)
    if not isinstance(merger, Merger) or merger.shards:
        return []
    out: list[tuple[int, list[str], Tensor]] = []
    if merger.flight is not None and merger.flight.batch is not None:
        out += _own_values(merger.flight.batch, None)
    if merger.batch is not None:
        out += _own_values(merger.batch, None)
    return out


def steps_in_flight(recorder: Any) -> list[int]:
    """The steps not merged yet whose local values are shards (FSDP/TP: a merge in
    flight, a batch still filling) or are a first or scheduled step's: a mid-run report
    leaves them out and says so (``run.distributed.in_flight_steps``). No communication."""
    merger = getattr(recorder, "merger", None)
    if not isinstance(merger, Merger):
        return []
    steps: set[int] = set()
    flight = merger.flight
    if flight is not None:
        if flight.batch is None:
            steps.update(st for st, _, _ in flight.items)
        elif merger.shards:
            steps.update(flight.batch.steps)
    if merger.shards and merger.batch is not None:
        steps.update(merger.batch.steps)
    return sorted(steps)


def _replays_on_every_rank(module: nn.Module) -> bool:
    """Whether a NaN-origin replay of ``module`` needs every rank (FSDP2, DTensor
    parameters): then every rank must stop at the same step (replay_plan)."""
    if has_fsdp(module):
        return True
    dt = dtensor_type_if_loaded()
    return dt is not None and any(isinstance(p, dt) for p in module.parameters())


def _batch_steps() -> int | None:
    """GRADVITALS_DIST_BATCH as a positive integer, None when unset (or not one: warned)."""
    raw = os.environ.get(BATCH_ENV, "").strip()
    if not raw:
        return None
    try:
        k = int(raw)
    except ValueError:
        k = 0
    if k < 1:
        log.warning("gradvitals: %s=%r is not a positive integer; ignored", BATCH_ENV, raw)
        return None
    return k


def _local_items(pending: list[tuple[int, list[str], Tensor]]) -> list[tuple[int, list[str], Tensor]]:
    """This rank's values as plain tensors (a DTensor's local part; no communication)."""
    if not any(type(t).__name__ == "DTensor" for _, _, t in pending):  # no import on plain runs
        return pending
    return [(s, k, local_tensors([t])[0]) for s, k, t in pending]


def _switch_off(recorder: Any, exc: BaseException) -> None:
    merger = getattr(recorder, "merger", None)
    if isinstance(merger, Merger):
        merger.active = False
        merger.info["merged"] = False
        merger.info["merge_stopped"] = f"{type(exc).__name__}: {exc}"[:300]
    else:  # the merge could not even start (e.g. some rank does not record): never retry
        recorder.merger = False
        rank, world = rank_and_world()
        recorder.record.run["distributed"] = {
            "world_size": world, "rank": rank, "merged": False,
            "merge_stopped": (f"{type(exc).__name__}: {exc}"[:240] + f" (is gv.watch running on every "
                              f"rank? {MERGE_ENV}=0 records each rank alone)")}
    recorder.fail("distributed", exc)


def holds_pending(recorder: Any) -> bool:
    """At the end of a run (or a mid-run ``report()``) the pending values are NOT
    merged: that would be a collective on an exit path. They stay pending for the
    next step (or are dropped with the run)."""
    merger = getattr(recorder, "merger", None)
    return isinstance(merger, Merger) and merger.active and initialized()


def merge_origin(recorder: Any, event: dict[str, Any], due: bool = False) -> dict[str, Any] | None:
    """``event`` gathered with every rank's origin (:meth:`Merger.merge_origin`), or None
    when this rank must gather it at its next flush instead: it waited for the merge that
    brought the NaN and some rank did not. Those ranks learn of it at their next flush and
    gather there; gathering now would block this rank while they go on into the next
    step, whose own collectives (FSDP's all-gathers, DDP's all-reduce) need this rank.
    ``due``: that next flush has come."""
    merger = getattr(recorder, "merger", None)
    if not isinstance(merger, Merger) or not merger.active or not initialized():
        return event
    if not due and not merger.late and not merger.together:
        merger.origin_due = True
        return None
    try:
        return merger.merge_origin(event)
    except Exception as exc:
        _switch_off(recorder, exc)
        return {**event, "rank": merger.rank, "world_size": merger.world}


# --------------------------------------------------------- report writing
@contextlib.contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM while the report is written: torchrun SIGTERMs the surviving
    ranks as soon as one fails, which would otherwise cut rank 0's report short."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)
