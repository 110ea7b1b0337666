"""The performance paths (issue 7) compute the same numbers as the plain ones.

Batched activation statistics, the in-place safety check that decides what may be
batched, the kept CPU buffers, and the thinned late schedule: each checked against
torch as the oracle on real modules and real training steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradvitals as gv
from gradvitals.probes import activations as ap
from gradvitals.recorder import Options

from models import mlp  # noqa: E402


def _oracle(x: torch.Tensor, sat: str | None) -> list[float]:
    x = x.double()
    fin = torch.isfinite(x)
    if sat == "tanh":
        s = (x.abs() > ap.TANH_SAT_LEVEL).double().mean().item()
    elif sat == "sigmoid":
        s = ((x < ap.SIGMOID_SAT_MARGIN) | (x > 1 - ap.SIGMOID_SAT_MARGIN)).double().mean().item()
    else:
        s = math.nan
    return [x.mean().item(), x.std(unbiased=False).item(), (x == 0).double().mean().item(), s,
            (~fin).double().mean().item()]


@pytest.mark.parametrize("sat", [None, "tanh", "sigmoid"])
def test_batched_stats_match_torch_row_by_row(sat):
    torch.manual_seed(0)
    xs = []
    for i in range(4):
        x = torch.randn(64, 33) * (1 + i)
        x[x.abs() < 0.4] = 0
        x = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}.get(sat, lambda t: t)(x)
        if i == 2:  # NaN and Inf: the mean/std become NaN, the fractions stay exact
            x.view(-1)[::97] = math.nan
            x.view(-1)[5::193] = math.inf
        xs.append(x)
    got = ap.batch_stats(xs, sat, ap.Scratch())
    single = torch.stack([ap.stats(x, sat) for x in xs])
    for x, row, one in zip(xs, got.tolist(), single.tolist()):
        want = _oracle(x, sat)
        for g, o, w in zip(row, one, want):
            if math.isnan(w):
                assert math.isnan(g) and math.isnan(o)
            else:
                assert g == pytest.approx(w, rel=1e-5, abs=1e-7)
                assert o == pytest.approx(w, rel=1e-5, abs=1e-7)


def test_std_is_centred_not_cancelled():
    """mean 1000, std 0.01: E[x^2] - E[x]^2 in float32 would be pure rounding noise."""
    torch.manual_seed(0)
    x = 1000 + 0.01 * torch.randn(128, 256)
    got = ap.stats(x, None).tolist()
    assert got[1] == pytest.approx(x.double().std(unbiased=False).item(), rel=1e-3)


@pytest.mark.parametrize("sat", [None, "tanh", "sigmoid"])
def test_three_pass_cpu_path_is_taken_and_exact_on_healthy_rows(sat, monkeypatch):
    """Finite, well-conditioned rows on the CPU: the raw-moment path answers (no
    fallback) and every statistic equals the float64 oracle."""
    torch.manual_seed(1)
    f = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}.get(sat, torch.relu)
    xs = [f(torch.randn(64, 40) * (1 + i) + 0.3 * i) for i in range(3)]
    answered = []
    real = ap._raw_moment_stats
    monkeypatch.setattr(ap, "_raw_moment_stats", lambda *a: answered.append(real(*a)) or answered[-1])
    got = ap.batch_stats(xs, sat, ap.Scratch()).tolist()
    assert len(answered) == 1 and answered[0] is not None
    for x, row in zip(xs, got):
        for g, w in zip(row, _oracle(x, sat)):
            if math.isnan(w):
                assert math.isnan(g)
            else:
                assert g == pytest.approx(w, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", ["nan", "inf", "overflow", "near_constant"])
def test_three_pass_cpu_path_hands_hard_rows_to_the_exact_path(case):
    """Rows whose raw moments would lie: a NaN/Inf (the non-finite count is needed), a
    finite value whose square overflows float32, a mean 1000x the spread (E[x^2] -
    E[x]^2 cancels). The fast path declines; the answer is still the oracle's."""
    torch.manual_seed(2)
    x = torch.randn(32, 50)
    if case == "nan":
        x[3, 7] = math.nan
    elif case == "inf":
        x[0, 0] = -math.inf
    elif case == "overflow":
        x[5, 5] = 3e19  # finite; x * x = inf in float32
    else:
        x = 1000 + 0.5 * x
    X = x.reshape(1, -1)
    assert ap._raw_moment_stats(X, X.sum(1), X.shape[1], torch.empty_like(X), None) is None
    got = ap.stats(x, None).tolist()
    want = _oracle(x, None)
    if case == "overflow":  # (3e19)^2 is past float32 in either variance: not comparable
        got, want = got[:1] + got[2:], want[:1] + want[2:]
    for g, w in zip(got, want):
        if math.isnan(w):
            assert math.isnan(g)
        else:
            assert g == pytest.approx(w, rel=1e-4, abs=1e-6)
    if case in ("nan", "inf"):
        assert got[4] == pytest.approx(1 / x.numel())


def test_a_staged_group_never_outgrows_the_kept_buffers(monkeypatch, digits):
    """The stage is measured before it would pass ACT_STAGE_MAX_NUMEL, so every
    stacked group fits Scratch (one row over, and the copy and its temporary were
    fresh multi-MB allocations every step). Real MLP, real steps, full=True."""
    from gradvitals.recorder import outputs as rec

    X, y = digits
    monkeypatch.setattr(rec, "ACT_STAGE_MAX_NUMEL", 5 * 64 * 32)  # 5 outputs of (64, 32)
    sizes = []
    real = ap.stack_rows
    monkeypatch.setattr(ap, "stack_rows", lambda xs, scratch=None: sizes.append(len(xs) * xs[0].numel())
                        or real(xs, scratch))
    torch.manual_seed(0)
    model = mlp(depth=7, width=32)  # 7 x (Linear, ReLU) of (64, 32) outputs, then Linear(32, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gv.watch(model, opt, full=True) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:64]), y[:64]).backward()
            opt.step()
    assert max(sizes) <= 5 * 64 * 32
    assert any(s == 5 * 64 * 32 for s in sizes)  # full groups were formed
    assert len(w.record.series["act_mean/12"]) == 3  # every output still measured every step


def test_scratch_is_reused_and_bounded():
    s = ap.Scratch(max_numel=1000)
    like = torch.zeros(1)
    a = s.get(1, 2, 100, like)
    b = s.get(1, 3, 50, like)
    assert a.data_ptr() == b.data_ptr()  # the same kept buffer
    assert s.get(1, 10, 101, like) is None  # over the bound: the caller allocates
    assert s.get(0, 1, 10, torch.zeros(1, dtype=torch.float64)) is not None  # float32 work buffer


def test_inplace_activation_after_a_layer_keeps_the_layers_own_stats():
    """nn.ReLU(inplace=True) rewrites the Linear's output after the Linear's hook ran:
    the Linear's statistics must be those of its own output (negative values, no
    zeros), on the first traced step and on every later (batched) one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 32), nn.ReLU(inplace=True),
                          nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, 16)
    pre = []
    h = model[0].register_forward_hook(lambda m, a, o: pre.append(o.detach().clone()))
    with gv.watch(model, opt, every=1) as w:
        for _ in range(4):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    h.remove()
    s = w.record.series
    assert list(s["act_mean/0"].steps) == [0, 1, 2, 3]
    for step, value in zip(s["act_zero_frac/0"].steps, s["act_zero_frac/0"].values):
        assert value == pytest.approx((pre[step] == 0).float().mean().item())
    for step, value in zip(s["act_mean/0"].steps, s["act_mean/0"].values):
        assert value == pytest.approx(pre[step].mean().item(), rel=1e-5, abs=1e-7)
    assert s["act_zero_frac/1"].values[-1] > 0.2  # the ReLU's own output: zeros


def _watched_outputs(model, opt, x, y, steps, **options):
    """Train ``steps`` watched steps; every child's output (cloned in its hook, before
    any in-place change), per step; and the watch."""
    outs: dict[int, dict[str, torch.Tensor]] = {}
    step = [0]
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: outs.setdefault(step[0], {}).__setitem__(n, o.detach().clone()))
             for n, m in model.named_children()]
    try:
        with gv.watch(model, opt, **options) as w:
            for i in range(steps):
                step[0] = i
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    finally:
        for h in hooks:
            h.remove()
    return outs, w


def test_batched_group_matches_one_by_one_on_a_real_mlp(digits):
    """A 6-layer MLP's equal-shape outputs go through one batched pass from step 1 on;
    every statistic equals torch's on the hooked outputs."""
    X, y = digits
    torch.manual_seed(0)
    layers = [nn.Linear(64, 48), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Linear(48, 48), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(48, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    outs, w = _watched_outputs(model, opt, X[:96], y[:96], 3, every=1)
    s = w.record.series
    for name, out in outs[2].items():
        sat = "tanh" if isinstance(model[int(name)], nn.Tanh) else None
        want = _oracle(out, sat)
        for q, wv in zip(ap.STAT_NAMES, want):
            got = s[f"{q}/{name}"].values[-1]
            assert s[f"{q}/{name}"].steps[-1] == 2
            if math.isnan(wv):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(wv, rel=1e-5, abs=1e-7), (q, name)
    # dead units over the window, for a Linear: never positive on any of the 3 batches
    never = torch.stack([(outs[i]["2"] > 0).any(0) for i in range(3)]).any(0)
    assert s["dead_frac/2"].values[-1] == pytest.approx(1 - never.float().mean().item())


def test_update_ratio_stays_exact_with_the_kept_snapshot(digits):
    """The CPU weight snapshot is a kept buffer, overwritten each scheduled step."""
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ratios = []
    with gv.watch(model, opt, every=2) as w:
        for i in range(6):
            before = model[0].weight.detach().clone()
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[:64]), y[:64]).backward()
            opt.step()
            ratios.append(((model[0].weight - before).norm() / before.norm()).item())
    s = w.record.series["update_ratio/0.weight"]
    assert list(s.steps) == [0, 2, 4]
    for step, value in zip(s.steps, s.values):
        assert value == pytest.approx(ratios[step], rel=1e-4)


def test_late_schedule_thins_the_scheduled_probes():
    o = Options()
    assert (o.every, o.late_every, o.late_after) == (25, 100, 1000)
    assert Options(every=5).late_every == 20
    with pytest.raises(ValueError, match="late_every"):
        Options(late_every=0)
    with pytest.raises(ValueError, match="late_after"):
        Options(late_after=-1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    with gv.watch(model, opt, every=2, late_every=5, late_after=6) as w:
        for _ in range(21):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
    assert list(w.record.series["act_mean/0"].steps) == [0, 2, 4, 10, 15, 20]
    assert list(w.record.series["weight_norm/0.weight"].steps) == [0, 2, 4, 10, 15, 20]
    assert len(w.record.series["grad_norm/0.weight"]) == 21  # every step, whatever the schedule


def test_ring_keeps_every_series_in_step_order_when_gradients_come_and_go(digits):
    """A parameter whose gradient is missing on some steps changes the set of keys a
    step measures; every series must still get its steps in increasing order, with the
    values torch computes, and reading watch.record brings the ring up to date."""
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    extra = nn.Linear(64, 10)
    opt = torch.optim.SGD(list(model.parameters()) + list(extra.parameters()), lr=0.1)
    want: dict[int, float] = {}
    with gv.watch(model, opt, every=3) as w:
        for i in range(70):
            opt.zero_grad(set_to_none=True)
            out = model(X[:64])
            if i % 5 == 0:
                out = out + extra(X[:64])  # the extra layer gets a gradient only on these steps
            nn.functional.cross_entropy(out, y[:64]).backward()
            want[i] = model[0].weight.grad.norm().item()
            opt.step()
            if i == 40:
                mid = w.record.series["grad_norm/0.weight"]
                assert mid.last_step == 40  # the ring was drained for the reader
    s = w.record.series
    for key, series in s.items():
        assert list(series.steps) == sorted(set(series.steps)), key
    g = s["grad_norm/0.weight"]
    assert list(g.steps) == list(range(70))
    for step, value in zip(g.steps, g.values):
        assert value == pytest.approx(want[step], rel=1e-5)
    assert list(s["act_mean/0"].steps) == list(range(0, 70, 3))
    assert list(s["update_ratio/0.weight"].steps) == list(range(0, 70, 3))


def _train_record(digits, fast: bool, monkeypatch, nan_at: int | None = None) -> dict:
    """A real run (MLP on digits, Adam, a step-decay lr schedule, a scheduled probe
    every 4 steps) with the one-pass steady-state path on or off: its JSON record."""
    from gradvitals.recorder import gradients

    monkeypatch.setattr(gradients, "FAST_PATH", fast)
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    with gv.watch(model, opt, every=4, late_every=6, late_after=20) as w:
        for i in range(45):
            opt.zero_grad()
            xb = X[(i * 32) % 1500:(i * 32) % 1500 + 32]
            if nan_at is not None and i == nan_at:
                with torch.no_grad():
                    model[2].weight[0, 0] = math.inf  # the layer that makes the NaN
            nn.functional.cross_entropy(model(xb), y[(i * 32) % 1500:(i * 32) % 1500 + 32]).backward()
            opt.step()
            sched.step()
            if nan_at is not None and i > nan_at + 2:
                break
    rec = w.record.to_json()
    for k in [k for k in rec["run"] if "time" in k or k.endswith(("_at", "seconds", "_s"))]:
        rec["run"].pop(k)  # wall-clock facts
    return rec


def test_one_pass_steady_state_equals_the_general_path(digits, monkeypatch):
    """GradientMeter's one-read path takes every unscheduled step of this run; its record
    equals, value for value, the record of the general path alone."""
    from gradvitals.recorder.gradients import GradientMeter

    calls = []
    real = GradientMeter.steady

    def counted(self, *args):
        took = real(self, *args)
        calls.append(took is not None)
        return took

    monkeypatch.setattr(GradientMeter, "steady", counted)
    fast = _train_record(digits, True, monkeypatch)
    assert sum(calls) >= 20  # it ran (not on scheduled steps, nor the steps after them: update ratios pend)
    assert not all(calls)
    slow = _train_record(digits, False, monkeypatch)
    assert fast["series"].keys() == slow["series"].keys()
    for key in slow["series"]:
        assert fast["series"][key] == slow["series"][key], key
    assert fast["run"].keys() == slow["run"].keys()
    for key in slow["run"]:
        assert fast["run"].get(key) == slow["run"][key], key
    assert fast == slow


def test_one_pass_path_hands_a_nan_to_the_origin_search(digits, monkeypatch):
    fast = _train_record(digits, True, monkeypatch, nan_at=9)
    slow = _train_record(digits, False, monkeypatch, nan_at=9)
    assert fast == slow
    found = [e for e in fast["run"]["events"] if e.get("module") is not None]
    assert found, fast["run"]["events"]  # the origin search ran from the fast path's fallback
    assert found[0]["module"] == "2" and found[0]["step"] == 9


def test_saturation_kind_follows_the_recurrent_nonlinearity():
    assert ap.saturation_kind(nn.RNN(4, 4)) == "tanh"
    assert ap.saturation_kind(nn.RNN(4, 4, nonlinearity="relu")) is None  # unbounded
    assert ap.saturation_kind(nn.LSTM(4, 4)) == "tanh"  # o * tanh(c)
    assert ap.saturation_kind(nn.GRU(4, 4)) == "tanh"
    assert ap.saturation_kind(nn.Sigmoid()) == "sigmoid"
    assert ap.saturation_kind(nn.ReLU()) is None


def test_large_outputs_reduced_in_the_hook_match_torch(digits, monkeypatch):
    """CPU outputs too large to stage (conv feature maps of 131k-262k elements) are
    reduced in their hook and finished at the end of the forward: every statistic of
    every module equals torch's on the hooked output, on every step, with an in-place
    ReLU after a BatchNorm (that BatchNorm's output is measured at once instead), and
    the dead-unit window of a conv layer over its last DEAD_WINDOW forwards."""
    from gradvitals.recorder.outputs import OutputMeter

    X, y = digits
    calls = []
    real = OutputMeter.lean_add
    monkeypatch.setattr(OutputMeter, "lean_add",
                        lambda self, x, info, dim: calls.append(info.name) or real(self, x, info, dim))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs, w = _watched_outputs(model, opt, X.reshape(-1, 1, 8, 8)[:128], y[:128], 6, full=True)
    assert {"0", "1", "2", "3"} <= set(calls) and "4" not in calls  # 4: rewritten in place by 5
    s = w.record.series
    for i in range(1, 6):
        for name, out in outs[i].items():
            for q, want in zip(ap.STAT_NAMES, _oracle(out, None)):
                got = dict(zip(s[f"{q}/{name}"].steps, s[f"{q}/{name}"].values))[i]
                if math.isnan(want):
                    assert math.isnan(got), (q, name, i)
                else:
                    assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (q, name, i)
    never = torch.stack([(outs[i]["3"] > 0).flatten(2).any(2).any(0) for i in range(2, 6)]).any(0)
    assert s["dead_frac/3"].values[-1] == pytest.approx(1 - never.float().mean().item())


@pytest.mark.parametrize("inplace_after", [False, True])
def test_views_of_a_measured_output_take_its_statistics(digits, monkeypatch, inplace_after):
    """Flatten after pooling and an Identity return the pooled output's own elements:
    their statistics are the pooled output's, not measured again (no stack, no pass),
    and equal torch's on their hooked outputs on every step. With an in-place ReLU
    after them (the pooled output rewritten after its module returned), each keeps the
    statistics of the output its module returned."""
    from gradvitals.recorder.outputs import OutputMeter

    X, y = digits
    measured: list[str] = []
    real, real_lean = OutputMeter.measure, OutputMeter.lean_add
    monkeypatch.setattr(OutputMeter, "measure", lambda self, xs, infos, dim:
                        measured.extend(i.name for i in infos) or real(self, xs, infos, dim))
    monkeypatch.setattr(OutputMeter, "lean_add", lambda self, x, info, dim:
                        measured.append(info.name) or real_lean(self, x, info, dim))
    torch.manual_seed(0)
    tail = [nn.ReLU(inplace=True)] if inplace_after else []
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(), nn.Identity(),
                          *tail, nn.Linear(8 * 4 * 4, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs, w = _watched_outputs(model, opt, X.reshape(-1, 1, 8, 8)[:64], y[:64], 5, full=True)
    s = w.record.series
    for i in range(5):
        for name in ("1", "2", "3"):
            got = {q: dict(zip(s[f"{q}/{name}"].steps, s[f"{q}/{name}"].values))[i] for q in ap.STAT_NAMES}
            for q, want in zip(ap.STAT_NAMES, _oracle(outs[i][name], None)):
                if math.isnan(want):
                    assert math.isnan(got[q]), (q, name, i)
                else:
                    assert got[q] == pytest.approx(want, rel=1e-5, abs=1e-7), (q, name, i)
    assert outs[4]["1"].min() < 0 and (outs[4]["1"] == 0).float().mean() < 0.01  # pooled conv: signed
    later = measured[len(measured) // 2:]  # steady state: the last steps' measurements
    if inplace_after:  # rewritten later: every module measured on its own output, at once
        assert {"1", "2", "3"} <= set(later)
    else:
        assert "1" in later and "2" not in later and "3" not in later


def test_a_layers_dead_unit_window_spans_the_ways_it_was_measured(digits):
    """A layer is measured alone on the first forward, then with the layers of its shape
    (or alone again when those change): its dead fraction is over its own last
    DEAD_WINDOW forwards however each was measured, never a window restarted when the
    way changed. Units biased to fire on a few samples of some batches only, on
    different batches each step: the oracle is the hooked outputs' masks."""
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        model[0].bias[:24] -= 1.5  # half the units fire on a few samples only
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(X), (24,), generator=g) for _ in range(8)]
    outs: dict[int, torch.Tensor] = {}
    hook = model[1].register_forward_hook(lambda m, a, o: outs.__setitem__(len(outs), o.detach().clone()))
    try:
        with gv.watch(model, opt, every=1) as w:
            for idx in batches:
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
    finally:
        hook.remove()
    got = w.record.series["dead_frac/1"].values
    want = []
    for i in range(len(batches)):
        window = [outs[j] for j in range(max(0, i - ap.DEAD_WINDOW + 1), i + 1)]
        want.append(1 - torch.stack([(o > 0).any(0) for o in window]).any(0).float().mean().item())
    assert len(set(want)) > 1  # the window matters: units fire on some batches only
    assert got == pytest.approx(want, abs=1e-7)
