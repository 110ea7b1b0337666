"""Findings: what the rules conclude. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["critical", "warning", "info"]
SEVERITIES: tuple[str, ...] = ("critical", "warning", "info")

#: The fixed vocabulary of finding codes (docs/design.md, the report contract). Add, never rename.
CODES: tuple[str, ...] = (
    "vanishing_gradients",
    "exploding_gradients",
    "nonfinite",
    "dead_relu",
    "saturated_activations",
    "symmetric_weights",
    "poor_initialization",
    "loss_plateau",
    "loss_spike",
    "update_ratio_high",
    "update_ratio_low",
    "batchnorm_small_batch",
    "clipping_always_active",
    "no_gradient",
    "not_updated",
    "architecture_risk",
    "grad_not_zeroed",  # added to the first table: gradients never cleared between steps
    "eval_mode_training",  # added to the first table: trained in eval mode after train mode
    "loss_on_probabilities",  # added to the first table: a softmax fed to cross_entropy & co
    "adam_epsilon_too_large",  # added: Adam's eps as large as a layer's gradients (it stops learning)
    "output_logit_divergence",  # added: the output logits' log Z drifting away from 0 (z-loss)
    "grad_norm_misreported",  # added: a clip call's norm is not the true global norm (a rank's shard only, ...)
    "replica_divergence",  # added: parameters every rank should hold identically differ across ranks
    "attention_logit_growth",  # added: an attention layer's max q.k logit grows until its softmax is one-hot
    "attention_entropy_collapse",  # added: an attention layer's mean entropy falls to ~one key's worth
)


@dataclass(frozen=True)
class Finding:
    """One diagnosis: what (code), how bad, since when, where, why, and what to change."""

    code: str
    severity: Severity
    summary: str
    advice: str
    step: int | None = None
    layers: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    caused_by: str | None = None  # code of the finding this one is a consequence of

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}; allowed: {', '.join(CODES)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        from .record import json_safe

        d: dict[str, Any] = {
            "code": self.code,
            "severity": self.severity,
            "step": self.step,
            "layers": list(self.layers),
            "summary": self.summary,
            "evidence": json_safe(self.evidence),
            "advice": self.advice,
        }
        if self.caused_by is not None:
            d["caused_by"] = self.caused_by
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Finding:
        return cls(code=d["code"], severity=d["severity"], summary=d.get("summary", ""),
                   advice=d.get("advice", ""), step=d.get("step"), layers=tuple(d.get("layers", ())),
                   evidence=dict(d.get("evidence", {})), caused_by=d.get("caused_by"))


def verdict(findings: list[Finding]) -> str:
    """One line for the whole run: state, root cause, where, since when, why
    (``findings`` root cause first, as :func:`gradvitals.diagnose.diagnose` orders them)."""
    problems = [f for f in findings if f.severity in ("critical", "warning")]
    if not problems:
        return "Healthy: no warning or critical findings."
    root = problems[0]
    state = "BROKEN" if any(f.severity == "critical" for f in problems) else "TRAINING POORLY"
    where = f" ({', '.join(root.layers[:2])})" if root.layers else ""
    since = f" from step {root.step}" if root.step else ""
    more = f"; {len(problems) - 1} related finding(s)" if len(problems) > 1 else ""
    return f"{state}: root cause {root.code}{where}{since}: {root.summary}{more}"
