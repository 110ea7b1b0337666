"""Prescribe and prove: try the chapter's remedies on the user's own script.

``gradvitals run --try-fixes SCRIPT`` runs the script once as diagnosed, then, for each
remedy its findings point to, runs it again in a fresh subprocess (same arguments,
hence the script's own seed), capped at ``--budget-steps`` optimizer steps, with the
remedy applied in-process by :class:`RemedyApplier` — never by editing the script.
A baseline trial (no remedy, same cap) makes the comparison fair.

Remedies (``Remedy.name``):
    init          activation-aware re-initialisation (``gv.init_``) before the first forward
    clip          ``clip_grad_norm_`` with max_norm from the run's observed gradient norms
    agc           adaptive gradient clipping (``gv.clip_grad_agc_``, NFNets)
    lr_x0.1 ...   learning rate scaled at optimizer creation
    warmup        linear learning-rate warmup over the first steps
    swap_relu     nn.ReLU modules -> nn.LeakyReLU(0.01)     (dead units)
    swap_saturating  nn.Sigmoid/nn.Tanh modules -> nn.ReLU, then He init (vanishing)
    adam_eps      Adam-family groups' eps set to 1e-8 (PyTorch's default)
    beta2         Adam-family groups' beta2 set to 0.95 (Wortsman et al. 2023's default)

Remedies that need a code change (QK-layernorm, z-loss) are listed with their snippet
by :func:`code_changes`, not trialled.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

#: Steps each trial may run (the budget) unless --budget-steps says otherwise.
DEFAULT_BUDGET_STEPS = 200
#: Remedy trials per run unless --trials says otherwise (plus one baseline trial).
DEFAULT_TRIALS = 5
#: Warmup length as a fraction of the budget: long enough to matter, short enough to finish.
WARMUP_FRACTION = 0.25
#: Early global gradient norms above this are already an explosion, not a baseline to clip
#: at (the chapter's 1e3 per-layer ceiling, docs/design.md, with a margin for the global norm of many layers).
HEALTHY_NORM_CEILING = 100.0
#: A trial "improves the loss" when its best loss is below the baseline's by this factor.
IMPROVEMENT = 0.98


@dataclass(frozen=True)
class Remedy:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def label(self) -> str:
        if self.name == "clip":
            return f"clip_grad_norm_(max_norm={self.params['max_norm']:.3g})"
        if self.name.startswith("lr_x"):
            return f"learning rate x{self.params['factor']:g}"
        if self.name == "warmup":
            return f"linear warmup over {self.params['steps']} steps"
        return {"init": "gv.init_ (He/Xavier by activation)", "agc": "adaptive gradient clipping (AGC 0.01)",
                "swap_relu": "ReLU -> LeakyReLU(0.01)",
                "swap_saturating": "Sigmoid/Tanh -> ReLU with He init",
                "zero_grad": "optimizer.zero_grad() after each step",
                "adam_eps": f"Adam eps = {self.params.get('eps', ADAM_EPS):g}",
                "beta2": f"Adam beta2 = {self.params.get('beta2', BETA2):g}"}.get(self.name, self.name)

    def snippet(self) -> str:
        """The code change that makes the remedy permanent in the user's script."""
        p = self.params
        return {
            "init": "import gradvitals as gv\ngv.init_(model, example_batch)  # before creating the optimizer",
            "clip": f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={p.get('max_norm', 1.0):.3g})"
                    "  # before optimizer.step()",
            "agc": "import gradvitals as gv\ngv.clip_grad_agc_(model.parameters(), clipping=0.01)"
                   "  # before optimizer.step()",
            "warmup": f"scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / {p.get('steps', 50)}))"
                      "\n# call scheduler.step() after each optimizer.step()",
            "swap_relu": "nn.LeakyReLU(0.01)  # instead of nn.ReLU()",
            "swap_saturating": "nn.ReLU()  # instead of nn.Sigmoid()/nn.Tanh(), then gv.init_(model, example_batch)",
            "zero_grad": "optimizer.zero_grad()  # once per step: before loss.backward(), or right after optimizer.step()",
            "adam_eps": f"optimizer = torch.optim.AdamW(model.parameters(), lr=..., eps={p.get('eps', ADAM_EPS):g})",
            "beta2": f"optimizer = torch.optim.AdamW(model.parameters(), lr=..., betas=(0.9, {p.get('beta2', BETA2):g}))",
        }.get(self.name, f"lr = {p.get('factor', 1):g} * lr  # in the optimizer's constructor")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params}

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> Remedy:
        d = json.loads(data) if isinstance(data, str) else data
        if not isinstance(d, dict) or d.get("name") not in _KNOWN:
            raise ValueError(f"unknown remedy {d!r}; allowed: {', '.join(sorted(_KNOWN))}")
        return cls(name=d["name"], params=dict(d.get("params", {})))


_KNOWN = {"init", "clip", "agc", "lr_x0.1", "lr_x0.3", "lr_x3", "lr_x10", "warmup", "swap_relu",
          "swap_saturating", "zero_grad", "adam_eps", "beta2"}

_EXPLOSIVE = {"nonfinite", "exploding_gradients", "loss_spike", "update_ratio_high"}

#: Transformer instabilities (loss spikes at scale, growing attention or output logits):
#: beta2 0.95, a lower learning rate, a longer warmup (Wortsman et al. 2023, arXiv 2309.14322).
_TRANSFORMER = {"attention_logit_growth", "attention_entropy_collapse", "output_logit_divergence"}

#: Adam's eps the adam_eps remedy sets: PyTorch's default (rules/optimizer.py EPS_DEFAULT).
ADAM_EPS = 1e-8
#: beta2 the beta2 remedy sets: Wortsman et al. 2023's default (arXiv 2309.14322, §2), as in
#: PaLM, LLaMA and OLMo; 0.999 averages the second moment over ~1000 steps, too slow to
#: follow a gradient that grows suddenly, so the update spikes.
BETA2 = 0.95

#: Remedies that need a code change (not trialled): code -> (what, snippet).
CODE_CHANGES: dict[str, tuple[str, str]] = {
    "output_logit_divergence": (
        "z-loss (PaLM): holds the output logits' log Z near 0",
        "loss = loss + 1e-4 * torch.logsumexp(logits, dim=-1).pow(2).mean()"),
    "attention_logit_growth": (
        "QK-layernorm (Dehghani et al. 2023): normalise queries and keys before q @ k^T",
        "self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)  # in __init__\n"
        "q, k = self.q_norm(q), self.k_norm(k)  # in forward, before the attention scores"),
}
CODE_CHANGES["attention_entropy_collapse"] = CODE_CHANGES["attention_logit_growth"]


def code_changes(report: dict[str, Any]) -> list[dict[str, str]]:
    """The remedies the findings point to that need an edit of the script (listed, not
    trialled): ``[{"code", "remedy", "snippet"}]``, one per remedy."""
    out: list[dict[str, str]] = []
    for f in report.get("findings", []):
        change = CODE_CHANGES.get(f.get("code", ""))
        if (change is not None and f.get("severity") in ("critical", "warning")
                and change[1] not in {c["snippet"] for c in out}):
            out.append({"code": f["code"], "remedy": change[0], "snippet": change[1]})
    return out


def select_remedies(report: dict[str, Any], budget: int, limit: int) -> list[Remedy]:
    """The remedies the findings point to, most specific first, at most ``limit``."""
    findings = [f for f in report.get("findings", []) if f.get("severity") in ("critical", "warning")]
    codes = {f["code"] for f in findings}
    out: list[Remedy] = []

    def add(r: Remedy) -> None:
        if r.name not in {x.name for x in out}:
            out.append(r)

    if "grad_not_zeroed" in codes:  # a bug in the loop: first, whatever else it caused
        add(Remedy("zero_grad", why="backward() adds every new gradient to the ones earlier steps used"))
    if "adam_epsilon_too_large" in codes:
        add(Remedy("adam_eps", {"eps": ADAM_EPS}, why="Adam's eps as large as the layer's gradients damps its update"))
    if codes & _TRANSFORMER:
        add(Remedy("beta2", {"beta2": BETA2}, why="a second-moment average that follows growing gradients"))
        add(Remedy("lr_x0.3", {"factor": 0.3}, why="logits grow faster at a high learning rate"))
        add(Remedy("warmup", {"steps": max(5, int(budget * WARMUP_FRACTION))},
                   why="a longer warmup keeps the early updates small"))
    if codes & {"symmetric_weights", "poor_initialization"}:
        add(Remedy("init", why="initialisation does not match the activations"))
    if codes & {"vanishing_gradients", "saturated_activations"}:
        add(Remedy("swap_saturating", why="saturating activations shrink the gradient layer by layer"))
        add(Remedy("init", why="initialisation scale for the activations"))
    if "dead_relu" in codes:
        add(Remedy("swap_relu", why="dead ReLU units never recover; LeakyReLU keeps a gradient"))
        add(Remedy("init", why="He init with zero biases starts every unit in its active range"))
        add(Remedy("lr_x0.3", {"factor": 0.3}, why="large updates push units into the dead zone"))
    if codes & _EXPLOSIVE:
        early_nan = any(f["code"] == "nonfinite" and (f.get("step") or 0) <= 1 for f in findings)
        if early_nan or "poor_initialization" in codes:
            add(Remedy("init", why="the run overflows from the first step: the init scale is suspect"))
        add(Remedy("lr_x0.1", {"factor": 0.1}, why="updates too large for the loss surface"))
        add(Remedy("clip", {"max_norm": observed_max_norm(report)}, why="bound each step's gradient norm"))
        add(Remedy("warmup", {"steps": max(5, int(budget * WARMUP_FRACTION))},
                   why="small steps while the early gradients are large"))
        add(Remedy("lr_x0.3", {"factor": 0.3}, why="a milder learning-rate cut"))
        add(Remedy("agc", why="unit-wise clipping relative to the weights"))
        if "loss_spike" in codes and _adam_betas(report):
            add(Remedy("beta2", {"beta2": BETA2}, why="a second-moment average that follows growing gradients"))
    if "update_ratio_low" in codes or ("loss_plateau" in codes and not codes & {"vanishing_gradients"}):
        add(Remedy("lr_x10", {"factor": 10.0}, why="updates far below ~1e-3 of the weights"))
        add(Remedy("lr_x3", {"factor": 3.0}, why="a milder learning-rate increase"))
    return out[:limit]


def _adam_betas(report: dict[str, Any]) -> bool:
    """Some optimizer group of the run has Adam's betas with beta2 above BETA2."""
    for g in report.get("run", {}).get("optimizer_groups", []) or []:
        betas = g.get("betas")
        if isinstance(betas, (list, tuple)) and len(betas) == 2 and isinstance(betas[1], (int, float)) \
                and betas[1] > BETA2:
            return True
    return False


def observed_max_norm(report: dict[str, Any]) -> float:
    """max_norm for clipping: the median of the finite global gradient norms of the first
    fifth of the run (before any blow-up), at least 1e-3; 1.0 (the chapter's default)
    when nothing was recorded or the run overflowed from the start."""
    s = report.get("series", {}).get("grad_norm_global")
    if not s:
        return 1.0
    vals = [v for v in s.get("values", []) if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return 1.0
    early = sorted(vals[: max(1, len(vals) // 5)])
    median = float(early[len(early) // 2])
    if median > HEALTHY_NORM_CEILING:
        return 1.0  # overflowing from the start: the chapter's default for the threshold
    return max(1e-3, median)


# ---------------------------------------------------------------------------- in-process
class RemedyApplier:
    """Applies one remedy inside a ``ScriptRunner`` (the trial subprocess)."""

    def __init__(self, remedy: Remedy, budget_steps: int | None) -> None:
        self.remedy = remedy
        self.budget_steps = budget_steps
        self.steps = 0
        self.applied: list[str] = []
        self.not_applicable: str | None = None
        self._saved_lr: list[tuple[dict[str, Any], Any]] = []
        self._busy = False

    # called by the runner ------------------------------------------------
    def on_optimizer(self, opt: Any) -> None:
        if self.remedy.name.startswith("lr_x"):
            f = float(self.remedy.params["factor"])
            for g in opt.param_groups:
                g["lr"] = g["lr"] * f
                if "initial_lr" in g:
                    g["initial_lr"] = g["initial_lr"] * f
            self.applied.append(f"learning rate x{f:g} in {type(opt).__name__}")
        elif self.remedy.name in ("adam_eps", "beta2"):
            self._adam_groups(opt)

    def _adam_groups(self, opt: Any) -> None:
        """eps or beta2 of each param group that has Adam's (``eps`` and ``betas``)."""
        eps = self.remedy.name == "adam_eps"
        value = float(self.remedy.params.get("eps" if eps else "beta2", ADAM_EPS if eps else BETA2))
        changed = 0
        for g in opt.param_groups:
            betas = g.get("betas")
            if not isinstance(g.get("eps"), float) or not (isinstance(betas, tuple) and len(betas) == 2):
                continue
            if eps and g["eps"] > value:
                g["eps"] = value
                changed += 1
            elif not eps and isinstance(betas[1], float) and betas[1] > value:
                g["betas"] = (betas[0], value)
                changed += 1
        if changed:
            self.not_applicable = None  # another optimizer of the script had none
            what = f"eps={value:g}" if eps else f"betas[1]={value:g}"
            self.applied.append(f"{what} in {changed} param group(s) of {type(opt).__name__}")
        elif not self.applied:
            self.not_applicable = (f"no param group of {type(opt).__name__} with Adam's eps/betas "
                                   f"{'above' if eps else 'with beta2 above'} {value:g}")

    def on_new_model(self, model: Any, args: tuple) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self._on_new_model(model, args)
        finally:
            self._busy = False

    def _on_new_model(self, model: Any, args: tuple) -> None:
        import torch
        from torch import nn

        name = self.remedy.name
        if name == "swap_relu":
            n = _swap(model, (nn.ReLU, nn.ReLU6), lambda m: nn.LeakyReLU(0.01))
            if n:
                self.applied.append(f"{n} ReLU module(s) -> LeakyReLU(0.01) in {type(model).__name__}")
            else:
                self.not_applicable = ("no nn.ReLU modules to swap: the activation is a function call "
                                       "(F.relu / torch.relu) inside forward(), which cannot be swapped")
        elif name == "swap_saturating":
            n = _swap(model, (nn.Sigmoid, nn.Tanh), lambda m: nn.ReLU())
            if n:
                self.applied.append(f"{n} Sigmoid/Tanh module(s) -> ReLU in {type(model).__name__}")
                self._init(model, args)
            else:
                self.not_applicable = ("no nn.Sigmoid/nn.Tanh modules to swap: the activation is a function "
                                       "call (torch.sigmoid / torch.tanh) inside forward(), which cannot be swapped")
        elif name == "init":
            self._init(model, args)
        del torch

    def _init(self, model: Any, args: tuple) -> None:
        import torch

        from .fixes.init import init_

        example = args[0] if args and isinstance(args[0], torch.Tensor) else None
        done = init_(model, example)
        self.applied.append(f"gv.init_ re-initialised {len(done) if hasattr(done, '__len__') else '?'} layer(s)")

    def on_step_pre(self, opt: Any) -> None:
        import torch

        name = self.remedy.name
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if name == "clip":
            torch.nn.utils.clip_grad_norm_(params, float(self.remedy.params["max_norm"]))
        elif name == "agc":
            from .fixes.agc import clip_grad_agc_

            clip_grad_agc_(params, clipping=0.01)
        elif name == "warmup":
            ramp = min(1.0, (self.steps + 1) / int(self.remedy.params["steps"]))
            self._saved_lr = [(g, g["lr"]) for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = g["lr"] * ramp
        if not self.applied and name in ("clip", "agc", "warmup"):
            self.applied.append(self.remedy.label() + " before each optimizer step")

    def on_step_post(self, opt: Any) -> bool:
        """Returns True when the budget is spent (the runner then stops the script)."""
        if self.remedy.name == "zero_grad":
            opt.zero_grad(set_to_none=True)
            if not self.applied:
                self.applied.append(f"{type(opt).__name__}.zero_grad() after each step")
        for g, lr in self._saved_lr:
            g["lr"] = lr
        self._saved_lr = []
        self.steps += 1
        return self.budget_steps is not None and self.steps >= self.budget_steps

    def status(self) -> dict[str, Any]:
        return {"remedy": self.remedy.to_json(), "applied": self.applied,
                "applicable": self.not_applicable is None and bool(self.applied),
                "reason": self.not_applicable or ("; ".join(self.applied) if self.applied
                                                  else "the script never reached the point where it applies")}


def _swap(model: Any, kinds: tuple[type, ...], make: Callable[[Any], Any]) -> int:
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, make(child))
                n += 1
    return n


# ---------------------------------------------------------------------------- orchestration
@dataclass
class Trial:
    remedy: str
    applicable: bool
    reason: str
    remaining_codes: list[str]
    final_loss: float | None
    best_loss: float | None
    winner: bool = False
    label: str = ""
    snippet: str = ""
    status: int | None = None
    steps: int = 0
    steps_to_baseline_best: int | None = None
    loss_curve: dict[str, list[Any]] = field(default_factory=dict)
    critical_codes: list[str] = field(default_factory=list)  # findings of severity critical
    degenerate: str = ""  # why its loss means nothing ("non-finite values", all-zero gradients), or ""

    @property
    def sound(self) -> bool:
        """No critical finding, every value finite, gradients not all zero at the end:
        only then is its loss comparable with another trial's."""
        return not self.critical_codes and not self.degenerate

    def to_json(self) -> dict[str, Any]:
        from .record import json_safe

        return json_safe(asdict(self))


def _soundness(report: dict[str, Any]) -> tuple[list[str], str]:
    """(codes of its critical findings, why its loss is degenerate or "") for one trial's
    report: a loss or gradient norm that went non-finite, or every gradient exactly 0
    over its last RECOVERED_MIN_STEPS steps or more (a dead run whose loss may read 0.0)."""
    from .record import Record
    from .rules._common import zero_gradient_tail
    from .rules.nonfinite import RECOVERED_MIN_STEPS

    findings = report.get("findings", [])
    critical = sorted({f["code"] for f in findings if f.get("severity") == "critical"})
    series = report.get("series", {})
    try:
        record = Record.from_json(report)
    except (ValueError, KeyError, TypeError):
        record = None
    dead_from = zero_gradient_tail(record) if record is not None else None
    if record is not None and dead_from is not None and record.steps - dead_from >= RECOVERED_MIN_STEPS:
        return critical, f"every gradient exactly 0 for its last {record.steps - dead_from} steps"
    values = [v for key in ("loss", "grad_norm_global") for v in (series.get(key) or {}).get("values", [])]
    if any(f.get("code") == "nonfinite" for f in findings) or any(not math.isfinite(float(v)) for v in values):
        return critical, "non-finite values"
    return critical, ""


def _loss_stats(report: dict[str, Any]) -> tuple[float | None, float | None, list[int], list[float]]:
    s = report.get("series", {}).get("loss")
    if not s or not s.get("values"):
        return None, None, [], []
    steps = list(s["steps"])
    vals = [float(v) if not isinstance(v, str) else float(v) for v in s["values"]]
    tail = vals[-max(1, len(vals) // 10):]
    final = sum(tail) / len(tail)
    finite = [v for v in vals if math.isfinite(v)]
    best = min(finite) if finite else None
    return final, best, steps, vals


def run_trial(script: str, args: list[str], remedy: Remedy | None, budget: int,
              timeout: float = 900.0) -> tuple[dict[str, Any] | None, int, str]:
    """One trial in a fresh interpreter; returns (report, exit status, stderr tail)."""
    with tempfile.TemporaryDirectory(prefix="gradvitals-trial-") as tmp:
        out = os.path.join(tmp, "trial.json")
        cmd = [sys.executable, "-m", "gradvitals", "run", "-q", "--json", out, "--budget-steps", str(budget)]
        if remedy is not None:
            cmd += ["--remedy", json.dumps(remedy.to_json())]
        cmd += [script, *args]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, 124, f"trial timed out after {timeout:.0f} s"
        report = None
        if os.path.exists(out):
            with open(out, encoding="utf-8") as fh:
                report = json.load(fh)
        return report, p.returncode, p.stderr[-2000:]


def try_fixes(script: str, args: list[str], diagnosed: dict[str, Any], budget: int = DEFAULT_BUDGET_STEPS,
              trials: int = DEFAULT_TRIALS, echo: Callable[[str], None] = print) -> list[Trial]:
    """Run the baseline and each selected remedy; pick the winner. Returns the trials
    (baseline first, remedy "none")."""
    remedies = select_remedies(diagnosed, budget, trials)
    for c in code_changes(diagnosed):
        snippet = c["snippet"].replace("\n", "\n    ")
        echo(f"try-fixes: not trialled (needs a code change) for {c['code']}: {c['remedy']}:\n    {snippet}")
    if not remedies:
        echo("try-fixes: no warning or critical findings point to a remedy; nothing to try.")
        return []
    echo(f"try-fixes: baseline + {len(remedies)} remedies, {budget} steps each "
         f"({', '.join(r.name for r in remedies)})")
    results: list[Trial] = []
    for i, remedy in enumerate([None, *remedies]):
        name = remedy.name if remedy else "none"
        echo(f"  trial {i}/{len(remedies)}: {remedy.label() if remedy else 'baseline (as diagnosed)'} ...")
        report, status, err = run_trial(script, args, remedy, budget)
        if report is None:
            results.append(Trial(remedy=name, applicable=remedy is None, status=status,
                                 reason=f"the trial crashed (exit {status}): {err.strip().splitlines()[-1] if err.strip() else 'no output'}",
                                 remaining_codes=[], final_loss=None, best_loss=None,
                                 label=remedy.label() if remedy else "baseline"))
            continue
        final, best, steps, vals = _loss_stats(report)
        critical, degenerate = _soundness(report)
        applied = report.get("run", {}).get("remedy_status", {})
        codes = sorted({f["code"] for f in report.get("findings", []) if f.get("severity") in ("critical", "warning")})
        crashed = status not in (0,) and report.get("run", {}).get("script_error")
        reason = applied.get("reason", "baseline: the script as given") if remedy else "baseline: the script as given"
        if crashed:
            reason = f"the trial crashed: {report['run']['script_error']}"
        results.append(Trial(
            remedy=name, applicable=bool(applied.get("applicable", remedy is None)), reason=reason,
            remaining_codes=codes, final_loss=final, best_loss=best, status=status,
            steps=int(report.get("run", {}).get("steps", 0)), label=remedy.label() if remedy else "baseline",
            snippet=remedy.snippet() if remedy else "",
            loss_curve={"steps": steps, "values": vals}, critical_codes=critical, degenerate=degenerate,
        ))
    _judge(results)
    return results


def _critical(codes: list[str]) -> set[str]:
    return set(codes) & {"nonfinite", "exploding_gradients", "vanishing_gradients", "symmetric_weights",
                         "dead_relu", "loss_spike"}


def _judge(results: list[Trial]) -> None:
    """The winner removes the baseline's critical findings and has the best loss. Losses
    are compared only between sound trials: a baseline with critical findings, non-finite
    values or all-zero gradients sets no loss to beat (a dead run's loss can read 0.0),
    and a degenerate trial's loss beats nothing."""
    base = results[0]
    base_sound = base.sound
    base_best = base.best_loss if base.best_loss is not None and base_sound else math.inf
    base_final = (base.final_loss if base_sound and base.final_loss is not None and math.isfinite(base.final_loss)
                  else math.inf)
    candidates = []
    for t in results[1:]:
        if t.loss_curve.get("values") and base.best_loss is not None and not base.degenerate:
            for s, v in zip(t.loss_curve["steps"], t.loss_curve["values"]):
                if isinstance(v, float) and math.isfinite(v) and v <= base.best_loss:
                    t.steps_to_baseline_best = int(s)
                    break
        if not t.applicable or t.final_loss is None or not math.isfinite(t.final_loss) or t.degenerate:
            continue
        removes = not (_critical(t.remaining_codes) & _critical(base.remaining_codes)) or not _critical(base.remaining_codes)
        improves = (not base_sound or t.final_loss < base_final * IMPROVEMENT
                    or (t.best_loss is not None and t.best_loss < base_best * IMPROVEMENT))
        if removes and improves:
            candidates.append(t)
    if candidates:
        best = min(candidates, key=lambda t: (len(_critical(t.remaining_codes)), len(t.remaining_codes), t.final_loss))
        best.winner = True


def render_table(trials: list[Trial]) -> Any:
    from rich.table import Table

    table = Table(title="try-fixes: same script, same seed, same steps", title_justify="left")
    for col in ("trial", "applied", "findings left", "final loss", "best loss", "steps to baseline best", ""):
        table.add_column(col)

    def f(v: float | None) -> str:
        return "-" if v is None else ("NaN" if math.isnan(v) else f"{v:.4g}")

    from rich.text import Text

    for t in trials:  # Text cells: labels and reasons may hold the user's module names (not markup)
        table.add_row(Text(t.label), "yes" if t.applicable else "no", ", ".join(t.remaining_codes) or "none",
                      f(t.final_loss), f(t.best_loss),
                      "-" if t.steps_to_baseline_best is None else str(t.steps_to_baseline_best),
                      "WINNER" if t.winner else Text(t.reason[:60] if not t.applicable
                                                     else f"not comparable: {t.degenerate}"[:60] if t.degenerate
                                                     else ""))
    return table
