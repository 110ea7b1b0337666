"""output_logit_divergence on hand-built records, at its edges."""

from __future__ import annotations

from rulebuild import Build, falling_loss, flat_loss

from gradvitals.rules import logits as L

EVERY = 25


def built(log_z, loss=None, every=EVERY):
    """log_z_mean (and log_z_max = mean + 2) at steps 0, every, 2*every, ...; the loss every step."""
    b = Build().mlp(3)
    steps = [i * every for i in range(len(log_z))]
    b.series("log_z_mean", dict(zip(steps, log_z)))
    b.series("log_z_max", {s: v + 2 for s, v in zip(steps, log_z)})
    n = steps[-1] + 1
    b.loss(loss(n) if loss is not None else falling_loss(n))
    return b.record


def ramp(start, end, n=10):
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def findings(record):
    return L.output_logit_divergence(record)


def test_fires_when_log_z_grows_past_the_level_and_keeps_growing():
    record = built(ramp(4.0, L.LOGZ_LEVEL + 3))
    (f,) = findings(record)
    # rising while the loss falls: the logits grow with the model's confidence (info)
    assert f.code == "output_logit_divergence" and f.severity == "info"
    ev = f.evidence
    assert ev["first"] == 4.0 and ev["last"] == L.LOGZ_LEVEL + 3 and ev["first_step"] == 0
    assert ev["last_step"] == 9 * EVERY
    # since: the first recorded point at or past the level
    vals = ramp(4.0, L.LOGZ_LEVEL + 3)
    first_past = next(i for i, v in enumerate(vals) if v >= L.LOGZ_LEVEL)
    assert ev["since"] == f.step == first_past * EVERY
    assert ev["max_log_z"] == L.LOGZ_LEVEL + 5 and ev["loss_still_falling"] is True
    assert ev["per_step"] > 0
    assert "torch.logsumexp(logits, dim=-1).pow(2).mean()" in f.advice and "1e-4" in f.advice
    assert "still falling" in f.summary


def test_silent_just_below_the_level():
    # drifted 6 nats from 2 and still growing: only the level decides (the last quarter's median)
    rise = ramp(2.0, L.LOGZ_LEVEL - 0.6, 8)
    assert findings(built(rise + [L.LOGZ_LEVEL - 0.05] * 2)) == []
    assert findings(built(rise + [L.LOGZ_LEVEL + 0.05] * 2)) != []
    # the last point alone past the level is not enough (the median of the last two: level - 0.05)
    assert findings(built(rise + [L.LOGZ_LEVEL - 1.0, L.LOGZ_LEVEL + 0.9])) == []


def test_silent_when_it_moved_less_than_the_drift_from_where_it_started():
    # a pretrained model whose log Z sits far from 0 from the first step and moves a little
    assert findings(built(ramp(-60.0, -60.0 - L.LOGZ_DRIFT + 0.5))) == []
    (f,) = findings(built(ramp(-60.0, -60.0 - L.LOGZ_DRIFT - 2)))
    assert "negative" in f.summary and f.evidence["per_step"] < 0
    assert f.severity == "warning"  # sinking together: a warning even while the loss falls


def test_silent_once_it_stopped_growing():
    # grew to 14 and then flat over the last half: not a divergence in progress
    vals = ramp(4.0, 14.0, 5) + [14.0] * 5
    assert findings(built(vals)) == []
    # the growth of the last quarter over the one before just under the named nats, then just over
    n = 12
    q = n // 4
    end = 14.0
    for growth, fires in ((L.LOGZ_STILL_GROWING - 0.05, False), (L.LOGZ_STILL_GROWING + 0.05, True)):
        prev = end - growth
        vals = ramp(4.0, prev, n - q) + [end] * q
        vals[-2 * q:-q] = [prev] * q
        assert bool(findings(built(vals))) is fires, growth


def test_needs_the_named_number_of_points():
    n = L.LOGZ_MIN_POINTS
    assert findings(built(ramp(4.0, 20.0, n))) != []
    assert findings(built(ramp(4.0, 20.0, n - 1))) == []


def test_says_when_the_loss_stopped_falling():
    (f,) = findings(built(ramp(4.0, 20.0), loss=flat_loss))
    assert f.evidence["loss_still_falling"] is False and "no longer falling" in f.summary
    assert f.severity == "warning"
    # a loss that falls by less than the named fraction between the last two quarters is not falling

    def slow(n, frac=L.LOSS_FALLING * 0.5):
        return [2.0 * (1 - frac * i / n) for i in range(n)]

    (f,) = findings(built(ramp(4.0, 20.0), loss=slow))
    assert f.evidence["loss_still_falling"] is False and f.severity == "warning"


def test_no_log_z_no_finding():
    b = Build().mlp(3)
    b.loss(falling_loss(300))
    assert findings(b.record) == []
