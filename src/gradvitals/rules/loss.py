"""The loss curve: a plateau from the start, and sudden jumps (spikes, divergence).

Both read the per-step ``loss`` series (finite points only, up to the first NaN,
which ``nonfinite`` reports). Levels are medians over windows, so mini-batch
noise never decides on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..findings import Finding
from ..record import Record
from ._common import first_nonfinite_step, loss_levels, mad, median, points, sci

# ----------------------------------------------------------------- plateau
#: Steps a run needs before "not decreasing" means anything (the first dozens of
#: steps of a healthy run can look flat, e.g. under warmup).
PLATEAU_MIN_STEPS = 50

#: A run that removed less than this fraction of its starting loss (median of the
#: first 10% of steps vs the last 10%) has not learned: a healthy digit MLP
#: removes > 80% in 300 steps; the broken ones measured 0-2%.
PLATEAU_PROGRESS = 0.05


def loss_plateau(record: Record) -> list[Finding]:
    """Loss not decreasing over the run.

    Decides from the ``loss`` series before any NaN: the median of the last 10% of
    points vs the first 10%; fires when less than PLATEAU_PROGRESS of the start
    was removed over at least PLATEAU_MIN_STEPS steps. Adversarial runs (several
    optimizers with their own loss) are skipped: their losses need not fall.
    """
    if _adversarial(record):
        return []
    nan_step = first_nonfinite_step(record)
    levels = loss_levels(record, until=nan_step)
    if levels is None or levels.end_step - levels.start_step < PLATEAU_MIN_STEPS:
        return []
    progress = levels.progress
    if not math.isfinite(progress) or progress >= PLATEAU_PROGRESS:
        return []
    if levels.end > DIVERGED_FACTOR * levels.start > 0:
        return []  # the loss climbed: divergence, which loss_spike reports
    span = levels.end_step - levels.start_step
    if progress < 0:
        how = f"rose {-progress:.0%}"
    else:
        how = f"fell only {progress:.1%}"
    summary = (f"Loss did not decrease: {sci(levels.start, 3)} at the start, {sci(levels.end, 3)} "
               f"after {span} steps (it {how}).")
    evidence = {"start_loss": levels.start, "end_loss": levels.end, "progress": progress,
                "steps": span, "threshold": PLATEAU_PROGRESS}
    advice = ("A loss flat from the start means no useful gradient reaches the weights. Check the findings "
              "linked to this one first (vanishing or dead units, a learning rate far off, clipping "
              "everything). Then sanity-check the pipeline: overfit one small batch "
              "(`for _ in range(200): train_step(x[:32], y[:32])` must drive the loss near 0), and make "
              "sure `optimizer.zero_grad()`, `loss.backward()` and `optimizer.step()` run every step.")
    return [Finding(code="loss_plateau", severity="warning", step=levels.start_step, layers=(),
                    summary=summary, evidence=evidence, advice=advice)]


# ----------------------------------------------------------------- spikes
#: Previous loss points the spike test compares each step with (a rolling window).
SPIKE_WINDOW = 20

#: Points in the window below which the reference is too thin; then only a jump to
#: more than SPIKE_EARLY_FACTOR x counts (e.g. 2.3 -> 40 right after step 0).
SPIKE_MIN_WINDOW = 3
SPIKE_EARLY_FACTOR = 2.0

#: A spike is this many robust standard deviations (MAD) above the window's median...
SPIKE_MADS = 6.0
#: ...and at least this fraction above it (so a very quiet curve's wiggle is not one)...
SPIKE_REL = 0.3
#: ...and it undoes at least this fraction of the progress made so far (near-zero
#: losses jump 5x between mini-batches in healthy runs without losing anything).
SPIKE_UNDO = 0.25

#: MAD floor as a fraction of the level: a perfectly flat window has MAD 0.
SPIKE_NOISE_FLOOR = 0.02

#: The loss ending above this multiple of its pre-spike level means the run
#: diverged instead of recovering: critical.
DIVERGED_FACTOR = 1.5

#: A spike that undoes this fraction of the progress made before it is a warning
#: even if the run recovers (a healthy residual MLP jumped 0.09 -> 0.76 from a
#: start of 2.3, undoing 30%, and went on to 0.09).
SPIKE_SEVERE_UNDO = 0.5

#: Before any progress, a spike this many times its pre-spike level is severe...
SPIKE_SEVERE_FACTOR = 3.0

#: ...but only if it persists: the median of the next SPIKE_RECOVERY_STEPS losses
#: stays above the middle of the jump. A single bad batch the next steps shrug off
#: (a healthy 20-layer He MLP: 1.24 -> 2.77 -> 1.34) is not severe.
SPIKE_RECOVERY_STEPS = 10

#: A loss above this multiple of the run's starting loss is severe, persisting or
#: not: no initialisation produced it (Adam at lr=0.1: 2.3 -> 40 on its second step).
SPIKE_EXTREME_OF_START = 2.0

#: Recovered: the loss ends within this fraction of the jump above the pre-spike
#: level...
RECOVERED_JUMP_FRACTION = 0.25
#: ...and the run removed at least this fraction of its starting loss (a BatchNorm
#: CNN at a brisk lr goes 2.6 -> 3.5 in its first steps, then to 0.1: info; an lr
#: that pushes 2.3 -> 3.4 and then learns nothing: warning).
RECOVERED_PROGRESS = 0.5
#: ...or, in a run too short for that, it ended this far below the pre-spike level.
RECOVERED_BELOW = 0.75


@dataclass(frozen=True)
class Spike:
    step: int
    loss: float
    before: float  # median of the window before it

    @property
    def factor(self) -> float:
        return self.loss / self.before if self.before > 0 else math.inf


def find_spikes(record: Record) -> list[Spike]:
    """Every step whose loss jumps out of its recent window (see the SPIKE_* constants)."""
    steps, values = points(record.get("loss"))
    if len(values) < 2:
        return []
    start = median(values[: SPIKE_MIN_WINDOW])
    spikes: list[Spike] = []
    for i in range(1, len(values)):
        window = values[max(0, i - SPIKE_WINDOW): i]
        m = median(window)
        v = values[i]
        excess = v - m
        if excess <= 0:
            continue
        if len(window) < SPIKE_MIN_WINDOW:
            if m > 0 and v >= SPIKE_EARLY_FACTOR * m:
                spikes.append(Spike(steps[i], v, m))
            continue
        noise = max(mad(window, m), SPIKE_NOISE_FLOOR * abs(m))
        progress = max(start - m, 0.0)
        if excess >= SPIKE_MADS * noise and excess >= SPIKE_REL * abs(m) and excess >= SPIKE_UNDO * progress:
            spikes.append(Spike(steps[i], v, m))
    return spikes


def spike_severity(record: Record, spikes: list[Spike]) -> str:
    """critical: diverged; warning: severe or not recovered; info: moderate and recovered."""
    first = spikes[0]
    nan_step = first_nonfinite_step(record)
    levels = loss_levels(record, until=nan_step)
    end = levels.end if levels is not None else math.nan
    if (nan_step is not None and nan_step > first.step) or (
            math.isfinite(end) and end > DIVERGED_FACTOR * first.before):
        return "critical"
    if _adversarial(record):
        return "info"  # a GAN's losses jump by design when one player gains
    steps, values = points(record.get("loss"))
    start = median(values[:SPIKE_MIN_WINDOW])
    severe = False
    for s in spikes:
        if start > 0 and s.loss >= SPIKE_EXTREME_OF_START * start:
            severe = True
            continue
        after = [v for st, v in zip(steps, values) if st > s.step][:SPIKE_RECOVERY_STEPS]
        if after and median(after) <= s.before + 0.5 * (s.loss - s.before):
            continue  # transient: the next steps came back down
        made = start - s.before
        if made > SPIKE_NOISE_FLOOR * 5 * abs(start):
            severe |= s.loss - s.before >= SPIKE_SEVERE_UNDO * made
        else:
            severe |= s.factor >= SPIKE_SEVERE_FACTOR
    worst = max(spikes, key=lambda s: s.loss - s.before)
    recovered = (math.isfinite(end) and start > 0
                 and end <= worst.before + RECOVERED_JUMP_FRACTION * (worst.loss - worst.before)
                 and ((start - end) / start >= RECOVERED_PROGRESS or end <= RECOVERED_BELOW * worst.before))
    return "warning" if severe or not recovered else "info"


# ------------------------------------------------------- spikes at scale
#: The detector large runs use: OLMo-core's SkipStepOptimizer judges each step's loss
#: and gradient norm against a rolling window of the previous 128 steps, skipping the
#: step when either is more than 6 standard deviations above the window's mean, once
#: max(20, window // 2) samples are in (olmo_core/optim/skip_step_optimizer.py:
#: rolling_interval_length=128, sigma_factor=6). Here on the logs, with the median
#: and the MAD (robust: a spike does not widen its own window), from 20 samples on
#: (OLMo-core's floor: our runs are shorter than theirs).
SCALE_WINDOW = 128
SCALE_Z = 6.0
SCALE_MIN_SAMPLES = 20
#: Robust spread floor, in log units (a flat window has MAD 0): 1% of the level.
SCALE_LOG_FLOOR = 0.01
#: A loss spike must also undo this fraction of the progress made before it (from the
#: median of the first SCALE_MIN_SAMPLES losses down to the window's median): in log
#: units a converged loss near zero, or one logged rounded, jumps x3 (1e-4 -> 3e-4)
#: against a flat window while losing nothing. An LLM's 2.5 -> 2.6 after 10 -> 2.5
#: undoes 1.3%; the floor sits well below that.
SCALE_MIN_UNDO = 0.005
#: A loss spike and a gradient-norm spike this many steps apart or less are one
#: co-spike (the update of step t shows in the loss and the gradient of step t + 1).
CO_SPIKE_STEPS = 2
#: Spike steps closer than this belong to one event.
SCALE_EVENT_GAP = 5
#: Recovered: the loss back at or below the pre-spike median + this many robust
#: deviations within SCALE_RECOVERY_STEPS steps of the event's end (None: the run
#: ended before that many steps and had not come back).
SCALE_RECOVERED_Z = 3.0
SCALE_RECOVERY_STEPS = 100
#: A layer "jumped" when its own gradient norm's robust z-score (same window, logs)
#: reaches this; looked for from this many steps before the event to its end. Lower
#: than SCALE_Z: it only orders the layers around a spike the 6-deviation test found,
#: and one layer's norm is noisier than the global one (a tiny GPT's layers read z 2-4.4
#: on the step after a x100 learning rate, the loss z 8).
LAYER_JUMP_Z = 3.0
LAYER_LOOKBACK = 10
#: Events kept in the evidence.
SCALE_EVENTS_SHOWN = 10


def _log_points(series: Any) -> tuple[list[int], list[float]]:
    steps, values = points(series)
    kept = [(s, math.log(v)) for s, v in zip(steps, values) if v > 0]
    return [s for s, _ in kept], [v for _, v in kept]


def robust_z(values: list[float], i: int) -> tuple[float, float, float] | None:
    """(z, median, robust sd) of ``values[i]`` against the SCALE_WINDOW values before it,
    or None with fewer than SCALE_MIN_SAMPLES of them."""
    window = values[max(0, i - SCALE_WINDOW): i]
    if len(window) < SCALE_MIN_SAMPLES:
        return None
    m = median(window)
    sd = max(mad(window, m), SCALE_LOG_FLOOR)
    return (values[i] - m) / sd, m, sd


def _z_spikes(steps: list[int], logs: list[float], start: float | None = None) -> dict[int, float]:
    """{step: z} of the points SCALE_Z robust deviations above their window; with
    ``start`` (the loss's starting level) only those that also undo SCALE_MIN_UNDO of
    the progress made."""
    out: dict[int, float] = {}
    for i in range(len(logs)):
        r = robust_z(logs, i)
        if r is None or r[0] < SCALE_Z:
            continue
        level = math.exp(r[1])
        if start is not None and start > level and math.exp(logs[i]) - level < SCALE_MIN_UNDO * (start - level):
            continue
        out[steps[i]] = r[0]
    return out


def _layer_log_norms(record: Record) -> dict[str, tuple[list[int], list[float]]]:
    """Per-layer gradient norms (Record.layer_grad_norms), as logs; zero and NaN
    points left out."""
    out = {}
    for layer, (steps, norms) in record.layer_grad_norms().items():
        kept = [(st, v) for st, v in zip(steps, norms) if v > 0]
        out[layer] = ([st for st, _ in kept], [math.log(v) for _, v in kept])
    return out


def _first_jump(layers: dict[str, tuple[list[int], list[float]]], start: int, end: int) -> list[dict[str, Any]]:
    """The layers whose gradient norm jumped (z >= LAYER_JUMP_Z) between
    ``start - LAYER_LOOKBACK`` and ``end``, earliest first (ties: the larger jump)."""
    jumps = []
    for layer, (steps, logs) in layers.items():
        for i, st in enumerate(steps):
            if st < start - LAYER_LOOKBACK:
                continue
            if st > end:
                break
            r = robust_z(logs, i)
            if r is not None and r[0] >= LAYER_JUMP_Z:
                jumps.append({"layer": layer, "step": st, "z": r[0], "factor": math.exp(logs[i] - r[1])})
                break
    jumps.sort(key=lambda j: (j["step"], -j["z"]))
    return jumps


def scale_spikes(record: Record) -> dict[str, Any] | None:
    """Spikes as large runs detect them: robust z-scores (median/MAD over SCALE_WINDOW
    previous points) of log loss and log global gradient norm; events of nearby spike
    steps, whether loss and gradient norm spiked together, whether the loss recovered,
    and the layer whose gradient norm jumped first. None when the run is too short."""
    lsteps, llogs = _log_points(record.get("loss"))
    gsteps, glogs = _log_points(record.get("grad_norm_global"))
    if len(llogs) <= SCALE_MIN_SAMPLES and len(glogs) <= SCALE_MIN_SAMPLES:
        return None
    loss_z = _z_spikes(lsteps, llogs, math.exp(median(llogs[:SCALE_MIN_SAMPLES])) if llogs else None)
    grad_z = _z_spikes(gsteps, glogs)
    spike_steps = sorted(set(loss_z) | set(grad_z))
    groups: list[list[int]] = []
    for st in spike_steps:
        if groups and st - groups[-1][-1] <= SCALE_EVENT_GAP:
            groups[-1].append(st)
        else:
            groups.append([st])
    layers = _layer_log_norms(record) if groups else {}
    events = []
    for g in groups:
        start, end = g[0], g[-1]
        lz = [loss_z[s] for s in g if s in loss_z]
        gz = [grad_z[s] for s in g if s in grad_z]
        co = any(abs(a - b) <= CO_SPIKE_STEPS for a in g if a in loss_z for b in g if b in grad_z)
        ev: dict[str, Any] = {"step": start, "end_step": end, "loss_z": max(lz) if lz else None,
                              "grad_norm_z": max(gz) if gz else None, "co_spike": co,
                              "recovered": None, "recovered_step": None}
        if lz:
            ev["recovered"], ev["recovered_step"] = _recovered(lsteps, llogs, start, end)
        jumps = _first_jump(layers, start, end)
        ev["first_layer"] = jumps[0]["layer"] if jumps else None
        ev["first_layer_step"] = jumps[0]["step"] if jumps else None
        ev["layers_jumped"] = jumps[:5]
        events.append(ev)
    return {"window": SCALE_WINDOW, "z_threshold": SCALE_Z, "min_samples": SCALE_MIN_SAMPLES,
            "spikes": len(events), "loss_spikes": sum(1 for e in events if e["loss_z"] is not None),
            "grad_norm_spikes": sum(1 for e in events if e["grad_norm_z"] is not None),
            "co_spikes": sum(1 for e in events if e["co_spike"]), "events": events[:SCALE_EVENTS_SHOWN]}


def _recovered(steps: list[int], logs: list[float], start: int, end: int) -> tuple[bool | None, int | None]:
    i0 = steps.index(start)
    r = robust_z(logs, i0)
    if r is None:
        return None, None
    _, m, sd = r
    bound = m + SCALE_RECOVERED_Z * sd
    for st, v in zip(steps, logs):
        if st > end and v <= bound:
            return (st - end <= SCALE_RECOVERY_STEPS), st
    return (False if steps[-1] - end >= SCALE_RECOVERY_STEPS else None), None


def _adversarial(record: Record) -> bool:
    """Several optimizers with their own loss (GAN-style): losses need not fall."""
    return any(k.startswith("loss/") for k in record.series)


def loss_spike(record: Record) -> list[Finding]:
    """Sudden jumps of the loss, and divergence.

    Decides from the ``loss`` series: a step is a spike when its loss exceeds the
    median of the previous SPIKE_WINDOW points by SPIKE_MADS robust deviations,
    by SPIKE_REL of the level, and by SPIKE_UNDO of the progress made so far.
    Critical when the run diverged (a NaN followed, or the loss ended above
    DIVERGED_FACTOR x its pre-spike level); warning when a spike went above
    SPIKE_EXTREME_OF_START x the starting loss, or persisted and undid
    SPIKE_SEVERE_UNDO of the progress (SPIKE_SEVERE_FACTOR x before any), or the run
    did not recover (see RECOVERED_*); info for a spike it shrugged off.
    """
    spikes = find_spikes(record)
    scale = scale_spikes(record)
    if not spikes:
        return _scale_only(scale)
    first = spikes[0]
    worst = max(spikes, key=lambda s: s.factor)
    nan_step = first_nonfinite_step(record)
    levels = loss_levels(record, until=nan_step)
    end = levels.end if levels is not None else math.nan
    severity = spike_severity(record, spikes)
    diverged = severity == "critical"
    summary = (f"Loss jumped from {sci(first.before, 3)} to {sci(first.loss, 3)} at step {first.step}"
               + (f" ({len(spikes)} spikes, worst x{worst.factor:.3g} at step {worst.step})" if len(spikes) > 1 else "")
               + ("; the run never recovered." if diverged else "."))
    evidence = {"spikes": len(spikes), "first_step": first.step, "before": first.before, "after": first.loss,
                "worst_step": worst.step, "worst_factor": worst.factor,
                "spike_steps": [s.step for s in spikes[:20]], "diverged": diverged, "end_loss": end}
    advice = ("Loss spikes come from steps that are too large for the curvature. Lower the learning rate "
              "(divide by 3-10), add a warmup, and clip the gradient norm:\n"
              "    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 500))\n"
              "    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)  # before optimizer.step()\n"
              "If a single batch causes it, check that batch for outliers or bad labels.")
    layers: tuple[str, ...] = ()
    if scale is not None:
        evidence["scale"] = scale
        lead = _leading_layer(scale)
        if lead is not None:
            summary += f" {_lead_text(lead)}."
            layers = (lead["first_layer"],)
            advice += "\n" + _SCALE_ADVICE
    return [Finding(code="loss_spike", severity=severity, step=first.step, layers=layers, summary=summary,
                    evidence=evidence, advice=advice)]


_SCALE_ADVICE = (
    "At scale, an isolated spike the run recovers from is skipped, not fought: skip the step when the loss or "
    "the gradient norm is > 6 robust deviations above its last 128 steps (OLMo-core's SkipStepOptimizer), or "
    "roll back ~100 steps before the spike and skip the next few hundred batches (PaLM). Spikes that recur: "
    "lower the learning rate or lengthen warmup, clip at max_norm=1.0, and in attention add QK-layernorm "
    "(q, k = self.q_norm(q), self.k_norm(k) before q @ k.transpose(-2, -1)).")


def _leading_layer(scale: dict[str, Any]) -> dict[str, Any] | None:
    """The first loss-spike event with a first-jumping layer (else any event with one)."""
    events = [e for e in scale["events"] if e.get("first_layer")]
    loss_events = [e for e in events if e["loss_z"] is not None]
    return (loss_events or events or [None])[0]


def _lead_text(ev: dict[str, Any]) -> str:
    jump = ev["layers_jumped"][0]
    co = "loss and gradient norm spiked together" if ev["co_spike"] else "a one-sided spike"
    return (f"The gradient norm of {ev['first_layer']} jumped first (x{jump['factor']:.3g} its recent level at "
            f"step {ev['first_layer_step']}; {co})")


def _scale_only(scale: dict[str, Any] | None) -> list[Finding]:
    """Loss spikes only the rolling robust z-score sees (a jump small next to the loss's
    level, as at scale): info when each recovered, warning when one did not."""
    if scale is None:
        return []
    events = [e for e in scale["events"] if e["loss_z"] is not None]
    if not events:
        return []
    first = events[0]
    stuck = [e for e in events if e["recovered"] is False]
    severity = "warning" if stuck else "info"
    n = len(events)
    summary = (f"Loss spiked {n} time{'s' if n > 1 else ''} beyond {SCALE_Z:g} robust deviations of its last "
               f"{SCALE_WINDOW} steps, first at step {first['step']} (z = {first['loss_z']:.3g}"
               + (", with the gradient norm" if first["co_spike"] else "") + ")"
               + (f"; {len(stuck)} did not recover" if stuck else "") + ".")
    lead = _leading_layer(scale)
    layers: tuple[str, ...] = ()
    if lead is not None:
        summary += f" {_lead_text(lead)}."
        layers = (lead["first_layer"],)
    evidence = {"spikes": n, "first_step": first["step"], "spike_steps": [e["step"] for e in events[:20]],
                "diverged": False, "scale": scale}
    return [Finding(code="loss_spike", severity=severity, step=first["step"], layers=layers, summary=summary,
                    evidence=evidence, advice=_SCALE_ADVICE)]


# ----------------------------------------------------- the loss's input
#: What each loss function does to its input itself, and so must not be given
#: (the recorder's ``loss_on_probabilities`` events: the autograd node that made the
#: input of a loss a backward ran through, read on the scheduled steps; see
#: probes/loss_graph.py).
_DOES_ITSELF = {
    ("cross_entropy", "SoftmaxBackward0"): ("`F.cross_entropy` / `nn.CrossEntropyLoss`", "a softmax",
                                            "applies log_softmax to its input itself, so the model trains "
                                            "through two softmaxes"),
    ("nll_loss", "SoftmaxBackward0"): ("`F.nll_loss` / `nn.NLLLoss`", "a softmax",
                                       "expects log-probabilities (log_softmax), so it trains on "
                                       "probabilities taken for log-probabilities"),
    ("binary_cross_entropy_with_logits", "SigmoidBackward0"): (
        "`F.binary_cross_entropy_with_logits` / `nn.BCEWithLogitsLoss`", "a sigmoid",
        "applies the sigmoid to its input itself, so the model trains through two sigmoids"),
}
_FIX = {
    "cross_entropy": ("Return the logits from the model (remove the final softmax) and keep the loss; apply "
                      "softmax only where probabilities are needed (inference, metrics):\n"
                      "    logits = model(x)\n    loss = F.cross_entropy(logits, y)\n"
                      "    probs = logits.softmax(dim=1)  # for reporting only"),
    "nll_loss": ("Feed `nll_loss` log-probabilities: `log_softmax` instead of `softmax` (or return logits and "
                 "use `F.cross_entropy`, which does both):\n    loss = F.nll_loss(F.log_softmax(logits, dim=1), y)"),
    "binary_cross_entropy_with_logits": (
        "Give `BCEWithLogitsLoss` the raw logits (remove the final sigmoid); apply `torch.sigmoid` only for "
        "probabilities at inference:\n    loss = F.binary_cross_entropy_with_logits(logits, y)"),
}


def loss_on_probabilities(record: Record) -> list[Finding]:
    """A loss trained through that was given what it computes itself: a softmax into
    cross_entropy (two softmaxes: the gradient shrinks as outputs saturate and the loss
    has a floor above 0), a softmax into nll_loss (probabilities where log-probabilities
    belong), a sigmoid into BCE-with-logits."""
    out: list[Finding] = []
    for ev in record.events_of("loss_on_probabilities"):
        key = (ev.get("loss"), ev.get("input_from"))
        if key not in _DOES_ITSELF or not isinstance(ev.get("step"), int):
            continue
        fn, producer, why = _DOES_ITSELF[key]
        n = int(ev.get("steps") or 0)
        checked = max(int(ev.get("checked") or n), n)
        if n < 1:
            continue
        summary = (f"{fn} was given the output of {producer} at {n} of the {checked} steps checked from step "
                   f"{ev['step']}: it {why}")
        classes = ev.get("classes")
        evidence = {"loss": ev.get("loss"), "input_from": ev.get("input_from"), "steps": n, "checked": checked}
        if key[0] == "cross_entropy" and isinstance(classes, int) and classes >= 2:
            # Inputs in [0, 1]: at best the right class gets 1 and the others 0, so the
            # loss cannot go below log(1 + (C - 1) / e).
            floor = math.log(1 + (classes - 1) / math.e)
            summary += (f" (the gradient shrinks as the probabilities saturate, and with {classes} classes the "
                        f"loss cannot go below log(1 + {classes - 1}/e) = {floor:.3g})")
            evidence["classes"], evidence["loss_floor"] = classes, floor
        out.append(Finding(code="loss_on_probabilities", severity="warning", step=ev["step"], layers=(),
                           summary=summary + ".", evidence=evidence, advice=_FIX[key[0]]))
    return out
