"""Silent bugs of distributed training: numbers a rank computes that disagree with the
whole run's.

``grad_norm_misreported``: the total norm a clip call returned on a rank
(``clip_rank_norm/<rank>``, recorded only when the call clipped every gradient gradvitals
measures) against the true global norm gradvitals merged across ranks
(``grad_norm_global``, taken before clipping from the same gradients).

``replica_divergence``: parameters every rank should hold identically whose norms the
merge found spread across ranks (``replica_spread/<param>``, ``replica_rank_off/<rank>``).
"""

from __future__ import annotations

import math

from ..findings import Finding
from ..record import Record
from ._common import as_dict, median, points, sci

#: Relative difference between a clip call's norm and the global norm that is more than
#: float error. Both are the same L2 norm of the same gradients summed in a different
#: order; in bf16 each norm is rounded to 2^-8 = 0.4% (torch's _foreach_norm returns the
#: gradient's dtype, and clip_grad_norm_ rounds the norm of norms again): 2% is five such
#: roundings. The bugs it is for are off by sqrt(2) or more (a local shard of 2 ranks: -29%).
MISREPORT_REL_TOL = 0.02

#: Clip calls compared before a rank's norm is judged, and the share of them that must
#: disagree: a wrong formula is wrong on every step; one step's odd value is not a bug.
MISREPORT_MIN_POINTS = 3
MISREPORT_MIN_FRACTION = 0.8

#: Named causes: factor (reported / true) -> the factor for ``world`` ranks.
_FACTORS = (
    ("double_counted", "double counted across the ranks' replicas (x sqrt(world size))", lambda w: math.sqrt(w)),
    ("summed_over_ranks", "summed over the ranks instead of averaged (x world size)", lambda w: float(w)),
    ("one_shard", "the norm of one rank's shard (x 1/sqrt(world size))", lambda w: 1.0 / math.sqrt(w)),
)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= MISREPORT_REL_TOL * abs(b)


def grad_norm_misreported(record: Record) -> list[Finding]:
    """The rank(s) whose clip norm is off the true global norm on most of the steps
    compared (>= MISREPORT_MIN_POINTS), by more than MISREPORT_REL_TOL; the factor, its
    likely cause, and what it does to the clipping threshold."""
    per_rank = record.per_name("clip_rank_norm")
    true = {s: v for s, v in as_dict(record.get("grad_norm_global")).items() if math.isfinite(v) and v > 0}
    if not per_rank or not true:
        return []
    reported: dict[str, dict[int, float]] = {}
    factors: dict[str, float] = {}
    first: int | None = None
    for rank, series in sorted(per_rank.items()):
        steps, values = points(series)
        pairs = [(s, v) for s, v in zip(steps, values) if s in true and v >= 0]
        if len(pairs) < MISREPORT_MIN_POINTS:
            continue
        ratios = [(s, v / true[s]) for s, v in pairs]
        off = [s for s, r in ratios if not _close(r, 1.0)]
        if len(off) < MISREPORT_MIN_FRACTION * len(ratios):
            continue
        factor = median(r for _, r in ratios)
        if not (math.isfinite(factor) and factor > 0):
            continue
        reported[rank] = dict(pairs)
        factors[rank] = factor
        first = off[0] if first is None else min(first, off[0])
    if not factors:
        return []
    world = _world(record, per_rank)
    cause, why = _cause(record, per_rank, true, factors, world)
    ranks = sorted(factors, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    factor = median(factors.values())
    max_norms = points(record.get("clip_max_norm"))[1]
    max_norm = max_norms[-1] if max_norms else None
    wrong = _wrong_decisions(reported, true, record)
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(ranks)}"
    summary = (f"The gradient norm the clip call returned on {who} is {factor:.3g}x the true global norm "
               f"({why})")
    if max_norm is not None and math.isfinite(max_norm) and max_norm > 0:
        summary += (f": clipping at {sci(max_norm, 3)} actually clips at a true norm of {sci(max_norm / factor, 3)}"
                    f"{f', a different decision on {wrong} step(s)' if wrong else ''}")
    summary += "; every norm logged from it is off by the same factor."
    s0 = min(true)
    example = {r: reported[r].get(first if first is not None else s0) for r in ranks}
    evidence = {"ranks": [int(r) if r.isdigit() else r for r in ranks], "factor": factor,
                "factor_by_rank": {r: factors[r] for r in ranks}, "cause": cause, "world_size": world,
                "step": first, "reported_norm": example, "true_norm": true.get(first) if first is not None else None,
                "max_norm": max_norm, "effective_max_norm": (max_norm / factor) if max_norm else None,
                "clip_decisions_wrong": wrong, "steps_compared": len(next(iter(reported.values())))}
    advice = ("Clip with the global norm: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) takes "
              "DTensor (FSDP2, tensor-parallel) gradients and returns the norm of the full gradients. A norm "
              "computed by hand must add the ranks' squared local norms once per shard, not per replica:\n"
              "    local = torch.nn.utils.get_total_norm([p.grad.to_local() for p in params])\n"
              "    sq = local.pow(2); dist.all_reduce(sq)  # over the shard group only\n"
              "    torch.nn.utils.clip_grads_with_norm_(params, max_norm, sq.sqrt())")
    return [Finding(code="grad_norm_misreported", severity="warning", step=first, summary=summary,
                    evidence=evidence, advice=advice)]


def _world(record: Record, per_rank: dict) -> int:
    info = record.run.get("distributed")
    w = info.get("world_size") if isinstance(info, dict) else None
    return w if isinstance(w, int) and w >= 1 else max(len(per_rank), 1)


def _cause(record: Record, per_rank: dict, true: dict[int, float], factors: dict[str, float],
           world: int) -> tuple[str, str]:
    """(cause code, words) from the factor and, across ranks, whether the ranks' norms
    add up (as squares) to the true one: then each rank took its own shard's norm."""
    if world > 1 and len(per_rank) == world:
        series = [as_dict(s) for s in per_rank.values()]
        common = [s for s in true if all(s in d for d in series)]
        common = [s for s in common if all(math.isfinite(d[s]) for d in series)]
        sums = [math.sqrt(math.fsum(d[s] ** 2 for d in series)) / true[s] for s in common]
        # Ranks that all report one value computed one thing (not each its own shard).
        differ = any(not _close(d[s], series[0][s]) for s in common for d in series)
        if differ and len(sums) >= MISREPORT_MIN_POINTS and all(_close(x, 1.0) for x in sums):
            return "local_shard", ("each rank computed it on its local shard only: the ranks' norms, added as "
                                   "squares, give the true one")
    factor = median(factors.values())
    if world > 1:
        for code, words, f in _FACTORS:
            if _close(factor, f(world)):
                return code, f"{words}, world size {world}"
    return "other", (f"{'larger' if factor > 1 else 'smaller'} than the norm of the gradients it clipped: "
                     f"a norm taken over other tensors, or scaled")


def _wrong_decisions(reported: dict[str, dict[int, float]], true: dict[int, float], record: Record) -> int:
    """Steps where some rank's clip decision (its norm > max_norm) differs from the one
    the true norm gives."""
    limits = as_dict(record.get("clip_max_norm"))
    wrong = 0
    for s in sorted(true):
        m = limits.get(s)
        if m is None or not math.isfinite(m):
            continue
        if any(s in d and (d[s] > m) != (true[s] > m) for d in reported.values()):
            wrong += 1
    return wrong


#: Relative spread of a replica's norm across ranks from which the replicas train
#: different models in earnest (0.1%: a LayerNorm weight a rank rescales by 1.01 is 10x
#: over it); below it, down to the merge's floor (distributed.REPLICA_SPREAD_FLOOR, float
#: rounding), the drift is real but small (kernels that differ per device).
REPLICA_CRITICAL_SPREAD = 1e-3


def replica_divergence(record: Record) -> list[Finding]:
    """Parameters every rank should hold identically (DDP replicas, DTensors replicated on
    every mesh dimension) whose norms differ across ranks on a scheduled step: which, by
    how much, on which ranks, since when (the merge writes ``replica_spread/<param>``
    only where the spread is above float rounding)."""
    spreads: dict[str, tuple[list[int], list[float]]] = {}
    for name, series in record.per_name("replica_spread").items():
        steps, values = points(series, finite_only=False)
        kept = [(s, v) for s, v in zip(steps, values) if not (v <= 0)]  # NaN/Inf kept: differ
        if kept:
            spreads[name] = ([s for s, _ in kept], [v for _, v in kept])
    if not spreads:
        return []
    first = min(s[0] for s, _ in spreads.values())
    worst = {n: max((v for v in vals if math.isfinite(v)), default=math.inf) for n, (_, vals) in spreads.items()}
    params = sorted(spreads, key=lambda n: (-worst[n], n))
    off = []
    for rank, series in record.per_name("replica_rank_off").items():
        if any(v > 0 for v in points(series)[1]):
            off.append(rank)
    off.sort(key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    info = record.run.get("distributed")
    info = info if isinstance(info, dict) else {}
    last_equal = info.get("replica_last_equal_step")
    last_equal = last_equal if isinstance(last_equal, int) and last_equal < first else None
    layers = []
    for n in params:
        p = record.params.get(n)
        layer = p.layer if p is not None else n.rsplit(".", 1)[0]
        if layer not in layers:
            layers.append(layer)
    top = params[0]
    world = info.get("world_size")
    if off and isinstance(world, int) and len(off) < world:
        where = f"rank{'s' if len(off) > 1 else ''} {', '.join(off)} hold{'s' if len(off) == 1 else ''} other values than the rest"
    elif off:
        where = f"ranks {', '.join(off)} hold different values (no majority says which is right)"
    else:
        where = "the ranks hold different values"
    since = f"from step {first}" + (f" (equal at step {last_equal})" if last_equal is not None else "")
    summary = (f"Parameters every rank should hold identically differ across ranks {since}: "
               f"{len(params)} tensor{'s' if len(params) != 1 else ''}, the most apart {top} (its norm spreads "
               f"{worst[top]:.2g} relative across ranks); {where}. The ranks now train different models "
               f"on averaged gradients, and the checkpoint of one rank is not the others'.")
    evidence = {"params": params, "ranks": [int(r) if r.isdigit() else r for r in off], "first_step": first,
                "last_equal_step": last_equal, "spread": {n: worst[n] for n in params[:32]},
                "checks": info.get("replica_checks"), "replicated_tensors": info.get("replica_tensors")}
    advice = ("Change replicated parameters only through the optimizer, identically on every rank: look for an "
              f"in-place write to {top} (`.data`, `mul_`/`copy_` under `torch.no_grad()`) that depends on the "
              "rank or its data, a rank-dependent seed in an initialisation done after wrapping, or a load of a "
              "checkpoint on some ranks only. To bring the replicas back together, broadcast from rank 0:\n"
              "    for p in model.parameters(): dist.broadcast(p.data, src=0)\n"
              "(Local SGD / DiLoCo keep replicas apart on purpose between averagings: there this is expected.)")
    severity = "critical" if max(worst.values()) >= REPLICA_CRITICAL_SPREAD else "warning"
    return [Finding(code="replica_divergence", severity=severity, step=first, layers=tuple(layers),
                    summary=summary, evidence=evidence, advice=advice)]
