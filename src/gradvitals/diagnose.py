"""Run every rule over a record and order the findings root-cause first.

Pure: :func:`diagnose` reads the record and returns what it concluded (the findings
and the rules that failed); it writes nothing into the record, so the live status
line can diagnose mid-run and the final report diagnoses once more from the same data.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .findings import Finding, verdict  # noqa: F401  (diagnose.verdict: the public name)
from .record import Record
from .rules._common import reading, shared_readings

log = logging.getLogger("gradvitals")

_SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}

#: The chapter's causal chain, cause first: among findings at the same place in a
#: chain, one earlier in this list is shown first ("connection triangle":
#: activation x init x gradient behaviour).
CAUSAL_ORDER: tuple[str, ...] = (
    "grad_not_zeroed",  # a bug in the loop: whatever else shows follows from it
    "replica_divergence",  # the ranks train different models: every merged number mixes them
    "eval_mode_training",
    "loss_on_probabilities",
    "symmetric_weights",
    "architecture_risk",
    "poor_initialization",
    "batchnorm_small_batch",
    "update_ratio_high",
    "saturated_activations",
    "dead_relu",
    "exploding_gradients",
    "vanishing_gradients",
    "grad_norm_misreported",  # a wrong clip threshold: what clipping does follows from it
    "clipping_always_active",
    "no_gradient",
    "not_updated",
    "update_ratio_low",
    "adam_epsilon_too_large",
    "attention_logit_growth",  # transformer chain: logit growth -> entropy collapse -> spikes
    "attention_entropy_collapse",
    "output_logit_divergence",
    "nonfinite",
    "loss_spike",
    "loss_plateau",
)

#: consequence -> the findings that can explain it, most direct first. The first one
#: present (a warning or critical, not later than the consequence) becomes its
#: ``caused_by``: nonfinite <- exploding_gradients <- update_ratio_high;
#: loss_plateau <- vanishing_gradients <- saturated_activations.
CAUSES: dict[str, tuple[str, ...]] = {
    "nonfinite": ("exploding_gradients", "update_ratio_high", "attention_logit_growth", "output_logit_divergence",
                  "loss_spike", "grad_not_zeroed", "batchnorm_small_batch"),
    "exploding_gradients": ("grad_not_zeroed", "poor_initialization", "architecture_risk", "update_ratio_high",
                            "batchnorm_small_batch"),
    "update_ratio_high": ("grad_not_zeroed", "exploding_gradients", "batchnorm_small_batch"),
    "loss_spike": ("grad_not_zeroed", "attention_logit_growth", "output_logit_divergence", "exploding_gradients",
                   "update_ratio_high", "batchnorm_small_batch"),
    # Attention logits grown large make the softmax one-hot (Zhai et al. 2023, arXiv 2303.06296).
    "attention_entropy_collapse": ("attention_logit_growth",),
    "dead_relu": ("update_ratio_high", "exploding_gradients", "poor_initialization", "batchnorm_small_batch"),
    "vanishing_gradients": ("saturated_activations", "poor_initialization", "symmetric_weights",
                            "architecture_risk", "batchnorm_small_batch"),
    "saturated_activations": ("poor_initialization", "update_ratio_high"),
    "update_ratio_low": ("clipping_always_active", "loss_on_probabilities", "adam_epsilon_too_large"),
    "not_updated": ("clipping_always_active", "adam_epsilon_too_large"),
    "loss_plateau": ("grad_not_zeroed", "loss_on_probabilities", "eval_mode_training", "vanishing_gradients", "dead_relu", "saturated_activations", "clipping_always_active",
                     "update_ratio_low", "update_ratio_high", "no_gradient", "not_updated",
                     "adam_epsilon_too_large", "symmetric_weights", "batchnorm_small_batch", "poor_initialization",
                     "architecture_risk", "exploding_gradients"),
}

#: Consequences judged over the whole run: their cause may show up later than their step.
_WHOLE_RUN = frozenset({"loss_plateau", "update_ratio_low", "not_updated"})


class Findings(list):  # list[Finding]
    """The ordered findings of one diagnosis, and ``rule_errors``: the rules that
    raised while producing them (``{"rule": name, "error": repr}``, one per failure).
    A rule that raises hides none of the others' findings."""

    def __init__(self, findings: list[Finding] = (), rule_errors: list[dict[str, str]] = ()) -> None:
        super().__init__(findings)
        self.rule_errors: list[dict[str, str]] = list(rule_errors)


def diagnose(record: Record) -> Findings:
    """All findings of all rules, causes linked, root cause first. Writes nothing."""
    errors: list[dict[str, str]] = []
    segments = record.segments()
    if len(segments) == 1:
        return Findings(order(link(_run_rules(record, errors))), errors)
    # Models trained one after another (k-fold, restarts): each segment is judged on
    # its own, its findings linked among themselves and labelled with where they hold.
    # The same finding in several segments (every fold at too low a learning rate) is
    # shown once, for the first, naming the others.
    findings: list[Finding] = []
    first: dict[tuple, int] = {}
    also: dict[int, list[str]] = {}
    for start, end, models in segments:
        part = record.segment(start, end, models)
        names = models or sorted({l.model for l in part.layers.values() if l.model})
        where = f"{', '.join(names) or 'steps'} (steps {start}-{end - 1})"
        for f in link(_run_rules(part, errors)):
            key = (f.code, f.severity, tuple(l.split(":", 1)[-1] for l in f.layers))
            if key in first:
                also.setdefault(first[key], []).append(where)
                continue
            first[key] = len(findings)
            findings.append(replace(f, summary=f"{where}: {f.summary}",
                                    evidence={**f.evidence, "segment": {"first_step": start, "last_step": end - 1,
                                                                        "models": names}}))
    for i, wheres in also.items():
        f = findings[i]
        findings[i] = replace(f, summary=f"{f.summary} The same in {', '.join(wheres)}.",
                              evidence={**f.evidence, "segment": {**f.evidence["segment"], "also": wheres}})
    return Findings(order(findings), errors)


def _run_rules(record: Record, errors: list[dict[str, str]]) -> list[Finding]:
    from .rules import RULES

    findings: list[Finding] = []
    with shared_readings():  # a rule another rule reads (exploding_gradients) runs once
        for rule in RULES:
            try:
                findings.extend(reading(rule, record))
            except Exception as exc:  # a broken rule must not hide the others
                log.warning("gradvitals: rule %s failed: %r", getattr(rule, "__name__", rule), exc)
                errors.append({"rule": getattr(rule, "__name__", str(rule)), "error": repr(exc)})
    return findings


def _explains(cause: Finding, effect: Finding) -> bool:
    if cause.severity == "info" or cause is effect:
        return False
    if cause.code == "exploding_gradients" and effect.code == "update_ratio_high":
        # Huge updates from gradients that were huge before the first step: the
        # initialisation, not the learning rate, is the cause.
        return bool(cause.evidence.get("at_init"))
    if cause.code == "update_ratio_high" and effect.code == "exploding_gradients":
        return not effect.evidence.get("at_init")
    if cause.code == "adam_epsilon_too_large" and effect.code in ("update_ratio_low", "not_updated"):
        # eps damps the updates of its own layers only: it explains a layer that stops
        # learning where the two name the same layers
        return bool(set(cause.layers) & set(effect.layers)) or not effect.layers
    if effect.code in _WHOLE_RUN or cause.step is None or effect.step is None:
        return True
    return cause.step <= effect.step


def link(findings: list[Finding]) -> list[Finding]:
    """Set ``caused_by`` on consequences (keeps one set by a rule); never forms a cycle."""
    by_code = {f.code: f for f in findings}
    parent: dict[str, str] = {f.code: f.caused_by for f in findings if f.caused_by}

    def reaches(start: str, target: str) -> bool:
        seen = set()
        while start in parent and start not in seen:
            seen.add(start)
            start = parent[start]
            if start == target:
                return True
        return False

    for f in findings:
        if f.code in parent:
            continue
        for cause in CAUSES.get(f.code, ()):
            c = by_code.get(cause)
            if c is not None and _explains(c, f) and not reaches(cause, f.code):
                parent[f.code] = cause
                break
    return [replace(f, caused_by=parent[f.code]) if parent.get(f.code) and f.caused_by is None else f
            for f in findings]


def _chain_depth(f: Finding, by_code: dict[str, Finding]) -> int:
    depth, seen, code = 0, set(), f.caused_by
    while code and code in by_code and code not in seen:
        seen.add(code)
        depth += 1
        code = by_code[code].caused_by
    return depth


def order(findings: list[Finding]) -> list[Finding]:
    """Root cause first: problems before info, then causes before their consequences
    (depth in the ``caused_by`` chain), then severity, then the chapter's causal order."""
    rank = {c: i for i, c in enumerate(CAUSAL_ORDER)}
    by_code = {f.code: f for f in findings}

    def key(f: Finding) -> tuple[int, int, int, int]:
        problem = 0 if f.severity in ("critical", "warning") else 1
        return (problem, _chain_depth(f, by_code), _SEVERITY_RANK[f.severity], rank.get(f.code, len(rank)))

    return sorted(findings, key=key)
