"""Attention that runs away: logits that grow until the softmax is one-hot, and the
entropy collapse that follows.

Read from the attention probes' series (scheduled steps): ``attn_max_logit/<layer>``
(the largest pre-softmax score of a module), ``attn_entropy/<layer>`` (the mean entropy
of its attention rows) and ``attn_entropy_uniform/<layer>`` (the entropy uniform rows
over the same unmasked keys would have: log of their number, averaged).

Sources: Dehghani et al. 2023 ("Scaling Vision Transformers to 22 Billion Parameters",
arXiv 2302.05442, §2 "QK normalization"): training diverged at ~8B parameters from
extremely large attention logits giving near-zero-entropy (one-hot) attention;
LayerNorm on the queries and keys fixed it. Wortsman et al. 2023 ("Small-scale proxies
for large-scale Transformer training instabilities", arXiv 2309.14322, §3.1): the same
attention logit growth appears in small models at high learning rates, and qk-layernorm
removes it there too. Zhai et al. 2023 ("Stabilizing Transformer Training by Preventing
Attention Entropy Collapse", arXiv 2303.06296): pathologically low attention entropy
goes with oscillating loss or divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..findings import Finding
from ..record import Record, series_key
from ._common import points, reading

#: A max attention logit at or above this is one-hot attention: exp(-100) = 4e-44 is
#: below float32's smallest normal number, so a key 100 below the top one gets no weight.
#: The papers above show no threshold (ViT-22B's logits were "extremely large");
#: this is our reading, with margin: the tiny GPT of the tests stays under 30 at lr 3e-2
#: without qk-layernorm and under 16 at lr 0.1 with it, and passes 1000 at lr 0.1 without.
LOGIT_LEVEL = 100.0
#: ... reached by growing at least this many times its first recorded value: a model
#: fine-tuned from a checkpoint whose logits start high is not a run whose logits grow.
LOGIT_GROWTH_FACTOR = 10.0
#: A layer's mean attention entropy at or below this fraction of its first value ...
ENTROPY_OF_INITIAL = 0.1
#: ... and of the uniform ceiling log(#keys) (Zhai et al.'s "entropy collapse": attention
#: concentrated on ~one key; 10% of log 32 is 0.35 nats, ~1.4 keys' worth) is collapsed.
ENTROPY_OF_UNIFORM = 0.1
#: Fewer recorded points than this decide nothing (a first value and a trend).
MIN_POINTS = 3
#: Points of each layer's curve kept in the evidence.
EVIDENCE_POINTS = 12


@dataclass
class LayerGrowth:
    layer: str
    first: tuple[int, float]
    last: tuple[int, float]
    peak: tuple[int, float]
    since: int  # first step at or above LOGIT_LEVEL
    values: list[tuple[int, float]]


def _layers(record: Record, quantity: str) -> list[str]:
    prefix = quantity + "/"
    names = [k[len(prefix):] for k in record.series if k.startswith(prefix)]
    order = {name: i for i, name in enumerate(record.layers)}
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def _series(record: Record, quantity: str, layer: str) -> tuple[list[int], list[float]]:
    """The points that are numbers (+inf kept: a logit that overflowed grew)."""
    steps, values = points(record.series.get(series_key(quantity, layer)), finite_only=False)
    kept = [(s, v) for s, v in zip(steps, values) if not math.isnan(v)]
    return [s for s, _ in kept], [v for _, v in kept]


def _thin(steps: list[int], values: list[float]) -> list[list[float]]:
    n = len(steps)
    idx = sorted({round(i * (n - 1) / (EVIDENCE_POINTS - 1)) for i in range(EVIDENCE_POINTS)}) if n > 1 else [0]
    return [[steps[i], _round(values[i])] for i in idx if i < n]


def _round(v: float) -> float:
    return v if not math.isfinite(v) else float(f"{v:.4g}")


def logit_growth(record: Record) -> list[LayerGrowth]:
    """The layers whose max attention logit grew past LOGIT_LEVEL (shared reading)."""
    out = []
    for layer in _layers(record, "attn_max_logit"):
        steps, values = _series(record, "attn_max_logit", layer)
        if len(values) < MIN_POINTS:
            continue
        first, last = values[0], values[-1]
        if not last >= LOGIT_LEVEL or (first > 0 and not last >= LOGIT_GROWTH_FACTOR * first):
            continue
        since = next(s for s, v in zip(steps, values) if v >= LOGIT_LEVEL)
        i = max(range(len(values)), key=lambda j: values[j])
        out.append(LayerGrowth(layer, (steps[0], first), (steps[-1], last), (steps[i], values[i]), since,
                               list(zip(steps, values))))
    return out


def attention_logit_growth(record: Record) -> list[Finding]:
    hits = reading(logit_growth, record)
    if not hits:
        return []
    hits = sorted(hits, key=lambda h: -h.last[1])
    rows: list[dict[str, Any]] = []
    for h in hits:
        span = h.last[0] - h.first[0]
        per100 = (h.last[1] - h.first[1]) * 100.0 / span if span > 0 else math.inf
        factor = h.last[1] / h.first[1] if h.first[1] > 0 else math.inf
        rows.append({"layer": h.layer, "since_step": h.since, "first": [h.first[0], _round(h.first[1])],
                     "last": [h.last[0], _round(h.last[1])], "peak": [h.peak[0], _round(h.peak[1])],
                     "growth_per_100_steps": _round(per100), "factor": _round(factor),
                     "values": _thin([s for s, _ in h.values], [v for _, v in h.values])})
    worst = rows[0]
    n = len(rows)
    names = _names(rows)
    summary = (f"Attention logits grow without bound in {n} attention layer{'s' if n > 1 else ''} ({names}): "
               f"the largest q.k score of {worst['layer'] or 'the model'} went from {worst['first'][1]:.3g} "
               f"(step {worst['first'][0]}) to {worst['last'][1]:.4g} (step {worst['last'][0]}), "
               f"+{worst['growth_per_100_steps']:.3g} per 100 steps, past {LOGIT_LEVEL:g} since step "
               f"{worst['since_step']}: the softmax is one-hot there, attention stops mixing and "
               f"the run is on the path Dehghani et al. and Wortsman et al. saw end in divergence.")
    evidence = {"layers": rows[:20], "level": LOGIT_LEVEL, "growth_factor": LOGIT_GROWTH_FACTOR}
    return [Finding(code="attention_logit_growth", severity="warning", step=min(r["since_step"] for r in rows),
                    layers=tuple(r["layer"] for r in rows), summary=summary, evidence=evidence,
                    advice=ADVICE)]


def _names(rows: list[dict[str, Any]]) -> str:
    """The first layers of a finding's rows, for its summary."""
    return ", ".join(r["layer"] or "(model)" for r in rows[:4]) + (", ..." if len(rows) > 4 else "")


def attention_entropy_collapse(record: Record) -> list[Finding]:
    rows: list[dict[str, Any]] = []
    for layer in _layers(record, "attn_entropy"):
        steps, values = _series(record, "attn_entropy", layer)
        if len(values) < MIN_POINTS or not values[0] > 0:
            continue
        usteps, uvalues = _series(record, "attn_entropy_uniform", layer)
        uniform = dict(zip(usteps, uvalues))
        first, last = values[0], values[-1]
        ceiling = uniform.get(steps[-1], math.nan)
        if not (last <= ENTROPY_OF_INITIAL * first and last <= ENTROPY_OF_UNIFORM * ceiling):
            continue
        since = next(s for s, v in zip(steps, values)
                     if v <= ENTROPY_OF_INITIAL * first and v <= ENTROPY_OF_UNIFORM * uniform.get(s, math.nan))
        rows.append({"layer": layer, "since_step": since, "first": [steps[0], _round(first)],
                     "last": [steps[-1], _round(last)], "uniform": _round(ceiling),
                     "of_initial": _round(last / first), "of_uniform": _round(last / ceiling) if ceiling > 0 else None,
                     "values": _thin(steps, values)})
    if not rows:
        return []
    rows.sort(key=lambda r: r["last"][1])
    worst = rows[0]
    n = len(rows)
    names = _names(rows)
    growth = {h.layer for h in reading(logit_growth, record)}
    caused = "attention_logit_growth" if any(r["layer"] in growth for r in rows) else None
    summary = (f"Attention entropy collapsed in {n} attention layer{'s' if n > 1 else ''} ({names}): "
               f"{worst['layer'] or 'the model'}'s mean attention entropy fell from {worst['first'][1]:.3g} to "
               f"{worst['last'][1]:.3g} nats (uniform over its keys: {worst['uniform']:.3g}) since step "
               f"{worst['since_step']}: each query attends to about one key, the state Zhai et al. found "
               f"with oscillating loss and divergence.")
    evidence = {"layers": rows[:20], "of_initial": ENTROPY_OF_INITIAL, "of_uniform": ENTROPY_OF_UNIFORM}
    return [Finding(code="attention_entropy_collapse", severity="warning", step=min(r["since_step"] for r in rows),
                    layers=tuple(r["layer"] for r in rows), summary=summary, evidence=evidence,
                    advice=ADVICE, caused_by=caused)]


ADVICE = """Normalise the queries and keys (QK-layernorm, Dehghani et al. 2023; Wortsman et al. 2023): in the attention block
    # __init__:
    self.q_norm = nn.LayerNorm(head_dim)
    self.k_norm = nn.LayerNorm(head_dim)
    # forward, after splitting the heads, before the scores / scaled_dot_product_attention:
    q, k = self.q_norm(q), self.k_norm(k)
(Hugging Face: models with a qk_norm / use_qk_norm config flag, e.g. OLMo 2, Qwen3, take it from the config.)
Also lower the learning rate (3-10x) or warm it up for longer: the logits grow fastest at high learning rates
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 2000))"""
