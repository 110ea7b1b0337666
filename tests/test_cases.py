"""The public case library (examples/cases/): every script is run unmodified under
``gradvitals run --json`` and must produce the labels in its header.

Header (comment lines at the top of each script):
    # expect: code, code      codes that must be reported as warning or critical
    # forbid: code, code      codes that must not be reported at any severity
    # healthy: true           no warning or critical finding at all
    # origin: oracle          the nonfinite finding names the module that torch
                              (tests/nonfinite_oracle.py) sees produce the first NaN/Inf
    # exit: N                 the script's exit status (default 0)

Two oracles keep the library honest: ``test_case_shows_its_failure`` checks, from
the recorded numbers alone and without any rule, that each labelled failure really
happened (a case cannot pass on a rule that fires for the wrong reason, and a label
cannot be kept on a script that no longer fails); ``test_case_labels`` checks that
gradvitals' diagnosis says so.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, cli

CASES_DIR = ROOT / "examples" / "cases"
CASES = sorted(CASES_DIR.glob("*.py"))
ORACLE = Path(__file__).resolve().parent / "nonfinite_oracle.py"

#: Severities that mean "this run is broken or training worse than it should".
ALARM = ("warning", "critical")
#: The library must hold at least this many scripts (issue 3 §6).
MIN_CASES = 20
#: Wall-clock limit for the NaN oracle's run of one case (a subprocess) on a loaded CI core.
CASE_TIMEOUT_S = 240


@dataclass(frozen=True)
class Labels:
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    healthy: bool = False
    origin: str | None = None
    exit: int = 0


_HEADER = re.compile(r"^#\s*(expect|forbid|healthy|origin|exit)\s*:\s*(.*?)\s*$")


def parse_labels(path: Path) -> Labels:
    """Read the label comments at the top of a case script (before its docstring)."""
    values: dict = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = _HEADER.match(line)
        if m is None:
            raise ValueError(f"{path.name}: unknown header line {line!r}")
        key, value = m.groups()
        if key in ("expect", "forbid"):
            values[key] = tuple(c.strip() for c in value.split(",") if c.strip())
        elif key == "healthy":
            values[key] = value.lower() == "true"
        elif key == "exit":
            values[key] = int(value)
        else:
            values[key] = value
    return Labels(**values)


def run_case(path: Path) -> tuple[dict, str, int]:
    """(report, script stdout, exit status) of one case under `gradvitals run`. The CLI runs
    in this process: a fresh interpreter per case would re-import torch and proves nothing
    the subprocess runs of tests/realworld and tests/test_runner.py do not."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        result = cli(["run", "-q", "--json", out, path], cwd=CASES_DIR)
        assert out.exists(), f"{path.name}: no report written\n{result.output[-3000:]}\n{result.exception!r}"
        return json.loads(out.read_text()), result.stdout, result.exit_code


def _findings(report: dict, severities: tuple[str, ...] = ("critical", "warning", "info")) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for f in report["findings"]:
        if f["severity"] in severities:
            found.setdefault(f["code"], f)
    return found


def _values(report: dict, key: str) -> list[float]:
    s = report["series"].get(key)
    return [float(v) for v in s["values"]] if s else []


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if math.isfinite(x)]


def _weight_layers(report: dict) -> list[dict]:
    """Weight layers in forward order (those with a >=2-D weight)."""
    layers = [l for l in report["layers"] if l.get("depth") is not None
              and any(p["name"].endswith("weight") and len(p["shape"]) >= 2 and p["requires_grad"]
                      for p in l["params"])]
    return sorted(layers, key=lambda l: l["depth"])


def _weight(layer: dict) -> str:
    return next(p["name"] for p in layer["params"] if p["name"].endswith("weight") and len(p["shape"]) >= 2)


# ----------------------------------------------------------- failure oracles
# What each labelled failure looks like in the recorded numbers, judged without
# gradvitals' rules (deliberately blunt thresholds: a case must fail unmistakably).

def _shows_vanishing(r: dict) -> bool:
    first = [_finite(_values(r, "grad_norm/" + _weight(l)))[:1] for l in _weight_layers(r)]
    first = [v[0] for v in first if v]
    return len(first) >= 3 and max(first) > 1e4 * max(min(first), 1e-30)


def _shows_exploding(r: dict) -> bool:
    return max(_finite(_values(r, "grad_norm_global")) or [0.0]) > 1e3


def _shows_nonfinite(r: dict) -> bool:
    return any(s.get("first_nonfinite_step") is not None for k, s in r["series"].items()
               if k.split("/")[0] in ("loss", "grad_norm_global"))


def _loss_windows(r: dict) -> tuple[float, float]:
    loss = _finite(_values(r, "loss"))
    n = max(5, len(loss) // 5)
    return statistics.mean(loss[:n]), statistics.mean(loss[-n:])


def _shows_plateau(r: dict) -> bool:
    first, last = _loss_windows(r)
    return last > 0.95 * first


def _shows_spike(r: dict) -> bool:
    loss = _values(r, "loss")
    return max(_finite(loss)) > 10 * loss[0] or _shows_nonfinite(r)


def _shows_dead(r: dict) -> bool:
    return any(max(_finite(_values(r, "dead_frac/" + l["name"])) or [0]) >= 0.9
               for l in r["layers"] if l.get("activation_after") in ("relu", "ReLU") or l["kind"] == "ReLU")


def _shows_saturated(r: dict) -> bool:
    return any(max(_finite(_values(r, k)) or [0]) >= 0.5
               for k in r["series"] if k.startswith("act_sat_frac/"))


def _median_ratios(r: dict) -> list[float]:
    out = []
    for l in _weight_layers(r):
        v = _finite(_values(r, "update_ratio/" + _weight(l)))
        if v:
            out.append(statistics.median(v))
    return out


def _shows_ratio_high(r: dict) -> bool:
    return max(_median_ratios(r) or [0]) > 2e-2


def _shows_ratio_low(r: dict) -> bool:
    return 0 < max(_median_ratios(r) or [1]) < 1e-5


def _shows_small_batch(r: dict) -> bool:
    return any(l["extra"].get("batch_size", 1 << 30) <= 4 for l in r["layers"] if "Norm" in l["kind"])


def _shows_clipping(r: dict) -> bool:
    clipped = _values(r, "clip_clipped")
    return bool(clipped) and statistics.mean(clipped) >= 0.95


def _params(r: dict) -> list[dict]:
    return [p for l in r["layers"] for p in l["params"]]


def _shows_no_gradient(r: dict) -> bool:
    return any(p["requires_grad"] and not p["grad_seen"] for p in _params(r))


def _shows_not_updated(r: dict) -> bool:
    return any(p["requires_grad"] and p["grad_seen"] and p["in_optimizer"] is False for p in _params(r))


def _shows_grad_not_zeroed(r: dict) -> bool:
    """The recorded gradient is a running sum: its norm climbs step after step from the
    start (a fresh gradient each step fluctuates) and ends far above where it began."""
    g = [v for v in _values(r, "grad_norm_global") if math.isfinite(v)]
    if len(g) < 20:
        return False
    rises = sum(b > a for a, b in zip(g[:10], g[1:11]))
    return rises >= 8 and statistics.median(g[-10:]) > 10 * g[0]


def _shows_poor_init(r: dict) -> bool:
    std0 = [_values(r, "act_std/" + l["name"])[:1] for l in _weight_layers(r)]
    std0 = [v[0] for v in std0 if v and math.isfinite(v[0]) and v[0] > 0]
    return len(std0) >= 2 and (std0[-1] / std0[0] > 1e2 or std0[-1] / std0[0] < 1e-2)


def _shows_adam_eps(r: dict) -> bool:
    """Some parameter's gradient RMS (norm / sqrt(numel)) over the run's second half is
    below its Adam group's eps itself (the rule fires from a few times eps)."""
    eps = {p: g["eps"] for g in r["run"].get("optimizer_groups", []) if "eps" in g for p in g["params"]}
    for p in _params(r):
        g = _finite(_values(r, "grad_norm/" + p["name"]))
        if p["name"] in eps and len(g) >= 20:
            if statistics.median(g[len(g) // 2:]) / math.sqrt(p["numel"]) < eps[p["name"]]:
                return True
    return False


def _attention_series(r: dict, quantity: str) -> list[list[float]]:
    return [_finite(_values(r, k)) for k in r["series"] if k.startswith(quantity + "/")]


def _shows_attention_logit_growth(r: dict) -> bool:
    """Some layer's largest attention score grew 100x to over 1000: one-hot attention."""
    return any(len(v) >= 2 and v[0] > 0 and v[-1] > 1000 and v[-1] > 100 * v[0]
               for v in _attention_series(r, "attn_max_logit"))


def _shows_attention_entropy_collapse(r: dict) -> bool:
    """Some layer's mean attention entropy went from over 1 nat to under 0.1 (one key)."""
    return any(len(v) >= 2 and v[0] > 1 and v[-1] < 0.1 for v in _attention_series(r, "attn_entropy"))


SHOWS = {
    "vanishing_gradients": _shows_vanishing,
    "exploding_gradients": _shows_exploding,
    "nonfinite": _shows_nonfinite,
    "loss_plateau": _shows_plateau,
    "loss_spike": _shows_spike,
    "dead_relu": _shows_dead,
    "saturated_activations": _shows_saturated,
    "update_ratio_high": _shows_ratio_high,
    "update_ratio_low": _shows_ratio_low,
    "batchnorm_small_batch": _shows_small_batch,
    "clipping_always_active": _shows_clipping,
    "no_gradient": _shows_no_gradient,
    "not_updated": _shows_not_updated,
    "grad_not_zeroed": _shows_grad_not_zeroed,
    "poor_initialization": _shows_poor_init,
    "adam_epsilon_too_large": _shows_adam_eps,
    "attention_logit_growth": _shows_attention_logit_growth,
    "attention_entropy_collapse": _shows_attention_entropy_collapse,
    # symmetric_weights: the script prints torch's own check ("... identical: True").
    # architecture_risk: structural, visible in the script itself.
}


#: Codes no case can prove on every machine, and the real-run test that proves them.
PROVEN_ELSEWHERE = {
    # a warning once the loss stops falling while log Z grows; a tiny run's late loss at
    # the learning rate that makes log Z drift is chaotic (tests/realworld/logit_drift_gpt.py)
    "output_logit_divergence": "tests/test_transformer_rules_real.py",
    # need several processes (torchrun, gloo): the case library runs one-process scripts
    "grad_norm_misreported": "tests/distributed/test_silent_bugs.py",
    "replica_divergence": "tests/distributed/test_silent_bugs.py",
}


# ------------------------------------------------------------------- tests
def test_library_is_complete():
    """>= 20 cases, every finding code proven by at least one case, healthy cases present."""
    from gradvitals.findings import CODES

    labels = {p.name: parse_labels(p) for p in CASES}
    assert len(labels) >= MIN_CASES, sorted(labels)
    expected = {c for l in labels.values() for c in l.expect} | set(PROVEN_ELSEWHERE)
    assert set(CODES) <= expected, f"codes no case proves: {sorted(set(CODES) - expected)}"
    for name, l in labels.items():
        assert set(l.expect) | set(l.forbid) <= set(CODES), name
        assert bool(l.expect) != l.healthy, f"{name}: a case is either broken (expect:) or healthy"
        assert not set(l.expect) & set(l.forbid), name
    assert sum(l.healthy for l in labels.values()) >= 6
    assert "sigmoid20_digits.py" in labels  # the chapter's 20-layer digit classifier


def test_parse_labels_rejects_unknown_header(tmp_path):
    p = tmp_path / "case.py"
    p.write_text("# expect: dead_relu\n# expct: typo\nimport torch\n")
    with pytest.raises(ValueError, match="unknown header"):
        parse_labels(p)
    p.write_text("# expect: dead_relu, loss_plateau\n# forbid: nonfinite\n# exit: 3\n\"\"\"doc\"\"\"\n")
    assert parse_labels(p) == Labels(expect=("dead_relu", "loss_plateau"), forbid=("nonfinite",), exit=3)


def _nonfinite_oracle(case: Path) -> tuple[str, str]:
    """(module path, class) torch itself sees produce the first non-finite output."""
    p = subprocess.run([sys.executable, str(ORACLE), str(case)], capture_output=True, text=True,
                       timeout=CASE_TIMEOUT_S, cwd=CASES_DIR)
    m = re.search(r"^ORACLE (\S+) (\S+)$", p.stderr, re.M)
    assert m, f"{case.name}: the oracle saw no non-finite module output\n{p.stderr[-2000:]}"
    return m.group(1), m.group(2)


def _first_nonfinite_step(report: dict) -> int | None:
    steps = [s["first_nonfinite_step"] for k, s in report["series"].items()
             if k.split("/")[0] in ("loss", "grad_norm", "grad_norm_global") and s.get("first_nonfinite_step") is not None]
    return min(steps) if steps else None


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_case(case):
    """One run per case (two with the NaN oracle), three checks in order:
    1. the recorded numbers show each labelled failure (healthy: the loss falls);
    2. gradvitals' diagnosis carries the labels;
    3. ``origin: oracle``: the nonfinite finding names the module torch sees
       produce the first NaN/Inf, at the first non-finite step."""
    labels = parse_labels(case)
    report, stdout, status = run_case(case)
    assert status == labels.exit, f"{case.name}: exit {status}"
    assert report["run"]["exit_status"] == status

    # 1. the failure is real
    if labels.healthy:
        first, last = _loss_windows(report)
        assert last < 0.7 * first, f"{case.name}: healthy case whose loss did not fall ({first:.3g} -> {last:.3g})"
        assert not _shows_nonfinite(report)
    missing = [c for c in labels.expect if c in SHOWS and not SHOWS[c](report)]
    assert not missing, f"{case.name}: the run does not show {missing}"
    if "symmetric_weights" in labels.expect:
        assert "identical: True" in stdout, stdout

    # 2. the diagnosis says so
    alarms = _findings(report, ALARM)
    everything = _findings(report)
    problems = []
    missing = [c for c in labels.expect if c not in alarms]
    if missing:
        problems.append(f"missing {missing}")
    wrong = [f"{c} ({everything[c]['severity']}: {everything[c]['summary']})" for c in labels.forbid
             if c in everything]
    if wrong:
        problems.append(f"forbidden {wrong}")
    if labels.healthy and alarms:
        problems.append("healthy run with " + "; ".join(f"{c} {f['severity']}: {f['summary']}"
                                                        for c, f in alarms.items()))
    assert not problems, f"{case.name}: " + " | ".join(problems)

    # 3. the NaN's origin is where torch sees it
    if labels.origin == "oracle":
        module, kind = _nonfinite_oracle(case)
        nf = everything["nonfinite"]
        reported = nf["layers"][0].split(":", 1)[-1] if nf["layers"] else None
        assert reported == module, f"gradvitals says {nf['layers']}, torch says {module} ({kind})"
        assert nf["step"] == _first_nonfinite_step(report)
