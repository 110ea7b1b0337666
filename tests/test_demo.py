"""`gradvitals demo --quick`: every gallery case is diagnosed live and its fix cures it."""

from __future__ import annotations

import json

import pytest

from conftest import cli
from gradvitals.demo import gallery

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """The CLI in this process; `make wheel-check` runs `gradvitals demo --quick` as a command."""
    out = tmp_path_factory.mktemp("demo")
    p = cli(["demo", "--quick", "--out", out])
    assert p.exit_code == 0, (p.stderr, p.exception)
    return out, p.stdout


def _problems(report):
    return {f["code"] for f in report["findings"] if f["severity"] in ("critical", "warning")}


def _final_loss(report):
    vals = [v for v in report["series"]["loss"]["values"]]
    tail = [float(v) for v in vals[-10:]]
    return sum(tail) / len(tail)


@pytest.mark.parametrize("case", gallery(120), ids=lambda c: c.key)
def test_case_diagnosed_and_fixed(demo_out, case):
    out, stdout = demo_out
    broken = json.loads((out / f"{case.key}-broken.json").read_text())
    fixed = json.loads((out / f"{case.key}-fixed.json").read_text())
    found = _problems(broken)
    if case.expect:
        assert found & set(case.expect), (case.key, found)  # the chapter's failure, diagnosed live
        assert not _problems(fixed), (case.key, _problems(fixed))  # the fix removes it
        fixed_loss, broken_loss = _final_loss(fixed), _final_loss(broken)
        assert fixed_loss < broken_loss or broken_loss != broken_loss  # NaN counts as worse
    else:
        assert not found  # the modern recipe is healthy
    assert case.title in stdout and "diagnosed:" in stdout


def test_gallery_page_written(demo_out):
    out, stdout = demo_out
    page = out / "gallery.html"
    assert page.exists() and page.stat().st_size > 10_000
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text.replace("https://www.w3.org", "")
    assert f"gallery: {page}" in stdout


def test_bundled_digits_are_scikit_learns():
    # The demo runs on a plain install (no scikit-learn): the package ships the same data.
    from sklearn.datasets import load_digits as sklearn_digits

    from gradvitals.data import load_digits

    X, y = load_digits()
    X_ref, y_ref = sklearn_digits(return_X_y=True)
    assert X.dtype == X_ref.dtype and y.dtype == y_ref.dtype
    assert (X == X_ref).all() and (y == y_ref).all()
