"""Run every rule over a record and order the findings root-cause first."""

from __future__ import annotations

import logging

from .findings import Finding
from .record import Record

log = logging.getLogger("gradvitals")

_SEVERITY_RANK = {"critical": 0, "warning": 1, "info": 2}

#: The chapter's causal chain, cause first: a finding earlier in this list explains
#: the ones after it when both are present ("connection triangle").
CAUSAL_ORDER: tuple[str, ...] = (
    "symmetric_weights",
    "architecture_risk",
    "poor_initialization",
    "saturated_activations",
    "dead_relu",
    "update_ratio_high",
    "batchnorm_small_batch",
    "exploding_gradients",
    "vanishing_gradients",
    "no_gradient",
    "not_updated",
    "clipping_always_active",
    "update_ratio_low",
    "nonfinite",
    "loss_spike",
    "loss_plateau",
)


def diagnose(record: Record) -> list[Finding]:
    """All findings of all rules, root cause first, then by severity."""
    from .rules import RULES

    findings: list[Finding] = []
    for rule in RULES:
        try:
            findings.extend(rule(record))
        except Exception as exc:  # a broken rule must not hide the others
            log.warning("gradvitals: rule %s failed: %r", getattr(rule, "__name__", rule), exc)
            record.event("rule_error", rule=getattr(rule, "__name__", str(rule)), error=repr(exc))
    return order(findings)


def order(findings: list[Finding]) -> list[Finding]:
    """Root cause first: problems (critical/warning) before info, then causal order."""
    rank = {c: i for i, c in enumerate(CAUSAL_ORDER)}

    def key(f: Finding) -> tuple[int, int, int]:
        problem = 0 if f.severity in ("critical", "warning") else 1
        return (problem, rank.get(f.code, len(rank)), _SEVERITY_RANK[f.severity])

    return sorted(findings, key=key)


def verdict(findings: list[Finding]) -> str:
    """One line for the whole run."""
    problems = [f for f in findings if f.severity in ("critical", "warning")]
    if not problems:
        return "Healthy: no warning or critical findings."
    root = problems[0]
    state = "BROKEN" if any(f.severity == "critical" for f in problems) else "TRAINING POORLY"
    where = f" ({', '.join(root.layers[:2])})" if root.layers else ""
    more = f"; {len(problems) - 1} related finding(s)" if len(problems) > 1 else ""
    return f"{state}: root cause {root.code}{where}: {root.summary}{more}"
